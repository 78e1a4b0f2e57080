"""A text-conditioned model of scikit-learn's 8x8 digits with the SD3 architecture: the offline text-to-image task.

A diffusers ``StableDiffusion3Pipeline`` at toy size, pre-trained here and saved as a diffusers folder, so that it
loads through the same loader as a real SD3 pipeline (``DiffusersFlowModel``, ``orw-fast finetune --pretrained``):

- captions say the digit and, where the data supports it, the stroke: "a handwritten seven", "a thick handwritten
  seven", "a thin handwritten seven" (thick/thin: the upper/lower third of ink within the digit's class);
- text path: a CLIP tokenizer whose vocabulary is written here (``tiny_pipelines.WORDS``, 8 tokens a prompt) and two
  CLIP text encoders with random but fixed weights (seeded; the transformer learns to read them); no T5: prompts are
  encoded with ``max_sequence_length=1`` (one zero T5 token), in pre-training and fine-tuning alike;
- VAE: a one-block ``AutoencoderKL`` that keeps the 8x8 resolution (4 latent channels), trained here to
  reconstruct the digits (as grey RGB images); its scaling and shift factors whiten the latents;
- transformer: ``SD3Transformer2DModel``, patch size 2 (16 image tokens), 3 joint blocks of width 64 (about 0.5M
  parameters), trained by rectified flow matching on the latents, with 10 % empty captions (classifier-free
  guidance works);
- **imperfect alignment on purpose**: during pre-training a share ``wrong_caption_share`` (default 0.3) of the
  captions name a uniformly drawn *wrong* digit, so the base model follows the prompt's digit only about 70 % of
  the time and fine-tuning toward alignment has room to improve.

The reward of the alignment task is :class:`PromptedDigitReward`: the digit classifier's probability of the
prompted digit, a stand-in for a CLIP score.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STROKES = ("", "thick ", "thin ")
MAX_SEQUENCE_LENGTH = 1  # the T5 zero tokens every prompt is encoded with (the pipeline has no T5)
_DIGIT = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r")\b")


def caption(digit: int, stroke: str = "") -> str:
    """ "a [thick |thin ]handwritten <digit word>"; ``stroke`` in STROKES."""
    if stroke not in STROKES:
        raise ValueError(f"stroke must be one of {STROKES}, got {stroke!r}")
    return f"a {stroke}handwritten {DIGIT_WORDS[digit]}"


def prompts_for(digits=range(10), strokes=STROKES) -> list[str]:
    """Every caption of ``digits`` x ``strokes``, digit-major."""
    return [caption(d, s) for d in digits for s in strokes]


def digit_of(prompt: str) -> int:
    """The digit a prompt names (its first digit word); ValueError if it names none."""
    match = _DIGIT.search(prompt)
    if match is None:
        raise ValueError(f"the prompt {prompt!r} names no digit ({', '.join(DIGIT_WORDS)})")
    return DIGIT_WORDS.index(match.group(1))


def stroke_words(images: torch.Tensor, labels: torch.Tensor) -> list[str]:
    """The stroke word (in STROKES) of every digit [N, 1, H, W] with its label [N]: "thick " for the upper third of
    ink (the sum of pixel values) within its class, "thin " for the lower third, "" between."""
    ink = (images.flatten(1) + 1).sum(1)
    out = [""] * len(labels)
    for digit in range(10):
        index = (labels == digit).nonzero().flatten()
        if not index.numel():
            continue
        lo, hi = torch.quantile(ink[index], torch.tensor([1 / 3, 2 / 3]))
        for i in index.tolist():
            out[i] = "thick " if ink[i] > hi else "thin " if ink[i] < lo else ""
    return out


def to_grey(images: torch.Tensor) -> torch.Tensor:
    """RGB images [B, 3, H, W] -> [B, 1, H, W], the channel mean (the VAE works on grey RGB digits)."""
    return images.mean(dim=1, keepdim=True)


class PromptedDigitReward(torch.nn.Module):
    """reward(images [B, 3, 8, 8] in [-1, 1], prompts: B strings) -> [B] float32: the digit classifier's
    probability of the digit each prompt names (a stand-in for a CLIP score)."""

    def __init__(self, classifier: torch.nn.Module):
        super().__init__()
        self.classifier = classifier.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts) -> torch.Tensor:
        if prompts is None or len(prompts) != images.shape[0]:
            raise ValueError(f"PromptedDigitReward needs one prompt per image ({images.shape[0]}), got {prompts!r}")
        probs = torch.softmax(self.classifier(to_grey(images)).float(), dim=1)
        digits = torch.tensor([digit_of(p) for p in prompts], device=probs.device)
        return probs.gather(1, digits[:, None]).squeeze(1)


def build_pipeline(seed: int = 0):
    """The untrained pipeline (random, seeded weights): tokenizer, two CLIP text encoders, VAE, transformer and a
    flow-matching Euler scheduler (shift 1)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from orw_fast.tasks.tiny_pipelines import clip_text_encoder, clip_tokenizer, tiny_vae

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer(
            Path(tmp) / "clip", 8, whole_words=("a", "thick", "thin", "handwritten", *DIGIT_WORDS)
        )
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=64,
        pooled_projection_dim=64,
        pos_embed_max_size=4,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=tiny_vae(),
        text_encoder=clip_text_encoder(len(tokenizer), True, 32),
        tokenizer=tokenizer,
        text_encoder_2=clip_text_encoder(len(tokenizer), True, 32),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.default_sample_size = 8
    return pipe


def _rgb(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1)


def train_vae(
    vae,
    images: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> float:
    """Trains the VAE to reconstruct ``images`` [N, 1, 8, 8] (as grey RGB; MSE of the posterior mean's decoding plus
    1e-4 x KL), then sets its scaling and shift factors to whiten the latents; returns the final reconstruction
    RMSE (model space, all images)."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    bar = tqdm(range(steps), desc="VAE", disable=not progress)
    for _ in bar:
        x = _rgb(images[torch.randint(images.shape[0], (batch_size,), generator=gen)])
        posterior = vae.encode(x).latent_dist
        loss = torch.nn.functional.mse_loss(vae.decode(posterior.mean).sample, x) + 1e-4 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(_rgb(images)).latent_dist.mean
        rmse = float((vae.decode(latents).sample - _rgb(images)).pow(2).mean().sqrt())
    vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1 / latents.std()))
    return rmse


@torch.no_grad()
def encode_captions(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt embeddings [N, 9, 64], pooled [N, 64]) of ``captions`` as the pipeline encodes them for rollouts."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        captions, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH
    )
    return embeds, pooled


def pretrain_transformer(
    pipe,
    images: torch.Tensor,
    labels: torch.Tensor,
    strokes: list[str],
    *,
    steps: int,
    wrong_caption_share: float,
    batch_size: int = 128,
    lr: float = 1e-3,
    uncond_share: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> float:
    """Rectified flow matching of the transformer on the VAE latents of ``images`` [N, 1, 8, 8] with their captions
    (``labels`` [N], ``strokes``: N stroke words); in each draw a share ``wrong_caption_share`` of the captions names
    a uniformly drawn other digit (same stroke) and a share ``uncond_share`` is empty. Returns the last 100 steps'
    mean loss."""
    transformer, vae = pipe.transformer, pipe.vae
    vocabulary = sorted(set(prompts_for()) | {""})
    row = {c: i for i, c in enumerate(vocabulary)}
    embeds, pooled = encode_captions(pipe, vocabulary)
    with torch.no_grad():
        latents = (vae.encode(_rgb(images)).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 200))
    transformer.train()
    losses = []
    bar = tqdm(range(steps), desc="SD3 transformer", disable=not progress)
    for _ in bar:
        index = torch.randint(images.shape[0], (batch_size,), generator=gen)
        digits = labels[index].clone()
        wrong = torch.rand(batch_size, generator=gen) < wrong_caption_share
        digits[wrong] = (digits[wrong] + torch.randint(1, 10, (int(wrong.sum()),), generator=gen)) % 10
        uncond = torch.rand(batch_size, generator=gen) < uncond_share
        rows = torch.tensor(
            [
                row[""] if u else row[caption(int(d), strokes[i])]
                for d, u, i in zip(digits, uncond.tolist(), index.tolist())
            ]
        )
        z = latents[index]
        noise = torch.randn(z.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(batch_size, generator=gen))  # logit-normal, as SD3
        x = (1 - sigma[:, None, None, None]) * z + sigma[:, None, None, None] * noise
        out = transformer(
            hidden_states=x,
            timestep=sigma * 1000,
            encoder_hidden_states=embeds[rows],
            pooled_projections=pooled[rows],
            return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(out, noise - z)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    transformer.eval()
    return sum(losses[-100:]) / len(losses[-100:])


def pretrain_text_digits(
    out_dir,
    *,
    steps: int = 3000,
    vae_steps: int = 1000,
    wrong_caption_share: float = 0.3,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Builds and pre-trains the pipeline on all 1797 digits and saves it (``save_pretrained``) into ``out_dir``,
    written whole or not at all; returns what it measured (also in ``out_dir``/pretraining.json).

    Trains on one torch thread, whatever the process has, so that the model (and every number measured on it) is
    the same whether the demo, a test or ``experiments.run_all`` builds it; a second thread saves < 10 % here."""
    from orw_fast.data.digits import load_digits_dataset

    if not 0 <= wrong_caption_share < 0.9:
        raise ValueError(f"wrong_caption_share must be in [0, 0.9), got {wrong_caption_share!r}")
    images, labels = load_digits_dataset()
    pipe = build_pipeline(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        info = {"vae_rmse": train_vae(pipe.vae, images, steps=vae_steps, seed=seed, progress=progress)}
        info["flow_loss"] = pretrain_transformer(
            pipe,
            images,
            labels,
            stroke_words(images, labels),
            steps=steps,
            wrong_caption_share=wrong_caption_share,
            seed=seed,
            progress=progress,
        )
    finally:
        torch.set_num_threads(threads)
    info.update(
        steps=steps,
        vae_steps=vae_steps,
        wrong_caption_share=wrong_caption_share,
        seed=seed,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        pipe.save_pretrained(tmp)
        (tmp / "pretraining.json").write_text(json.dumps(info, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def pretrained_text_digits(cache_dir, *, steps: int = 3000, progress: bool = True) -> Path:
    """The pipeline folder ``cache_dir``/text_digits, pre-trained first if missing (``steps`` transformer steps and
    a third as many VAE steps)."""
    folder = Path(cache_dir) / "text_digits"
    if not (folder / "pretraining.json").is_file():
        print(f"pre-training the text-conditioned digits model ({steps} steps), cached in {folder}")
        pretrain_text_digits(folder, steps=steps, vae_steps=steps // 3, progress=progress)
    return folder
