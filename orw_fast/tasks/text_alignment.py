"""Text-image alignment on the text-conditioned digits model (orw_fast.tasks.text_digits): LoRA fine-tuning by
ORW-CFM-W2 toward prompt alignment, measured after every epoch on held-out prompts. Used by
``orw-fast demo --task text`` and experiments/text_alignment.py.

Reward: the digit classifier's probability of the digit the prompt names (``PromptedDigitReward``, the stand-in for
a CLIP score). Training prompts: "a handwritten <digit>" and "a thick handwritten <digit>"; held-out prompts, used
only for evaluation: "a thin handwritten <digit>". After every epoch, on the held-out prompts (a fixed noise,
``eval_per_prompt`` samples each): alignment (the share of samples the classifier calls the prompted digit), mean
reward, diversity within a prompt (mean pairwise distance among one prompt's images, averaged over prompts), W2 to
the reference model's images of the same prompt (exact OT, averaged over prompts; epoch 0 draws the reference from
other noise: the estimator's floor), and sample quality: the digits FD to the held-out real digits and the
background level (``orw_fast.tasks.demo.DigitsQuality``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from orw_fast.images import save_image_grid
from orw_fast.metrics import mean_pairwise_distance, w2_distance
from orw_fast.models.diffusers_flow import LORA_TARGETS
from orw_fast.pretrain import default_cache_dir
from orw_fast.tasks.demo import DemoSettings, DigitsQuality, pretrained_digits
from orw_fast.tasks.sweeps import check_finite, sweep, sweep_config
from orw_fast.tasks.text_digits import (
    MAX_SEQUENCE_LENGTH,
    PromptedDigitReward,
    digit_of,
    pretrained_text_digits,
    prompts_for,
    to_grey,
)
from orw_fast.trainer import ORWCFMTrainer

TRAIN_PROMPTS = prompts_for(strokes=("", "thick "))
HELD_OUT_PROMPTS = prompts_for(strokes=("thin ",))
COLUMNS = {
    "alignment": "alignment",
    "reward": "reward",
    "prompt_diversity": "diversity within a prompt",
    "w2_to_reference": "W2 to reference",
    "digits_fd": "digits FD",
    "background": "background (0-255)",
}


@dataclasses.dataclass
class AlignmentSettings:
    """One alpha sweep; every (alpha, seed) run gets ``epochs * steps_per_epoch`` LoRA steps."""

    alphas: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
    seeds: tuple[int, ...] = (0, 1)
    epochs: int = 6
    steps_per_epoch: int = 10
    batch_size: int = 32
    samples_per_prompt: int = 4  # each batch: 8 training prompts x 4 samples
    # weights B softmax(tau r), mean 1: alpha weighs the W2 term against a reward term of unit scale (with the
    # paper's exp weights the W2 term is about alpha / e^tau of it and alpha barely matters at tau 5-10)
    weighting: str = "softmax"
    temperature: float = 10.0
    learning_rate: float = 1e-2  # LoRA; 3e-2 diverged within 8 epochs
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = LORA_TARGETS
    guidance_scale: float = 1.0  # no CFG: guidance 2 and 4 take the base model's alignment to 86 % and 99 %
    sampler_method: str = "heun"  # the rollouts its results were measured with (not the model's default, AB3 9)
    sampler_steps: int = 10  # Heun on the scheduler's sigmas: 20 transformer calls
    eval_per_prompt: int = 24
    pretrain_steps: int = 3000


def _by_prompt(images: torch.Tensor, n: int) -> list[torch.Tensor]:
    return list(images.split(n))


@torch.no_grad()
def held_out_images(flow, module, per_prompt: int, noise_seed: int, sampler_steps: int, device) -> torch.Tensor:
    """Grey images [P * per_prompt, 1, 8, 8] of ``module`` (the transformer, LoRA in place) for every held-out prompt,
    ``per_prompt`` each in prompt order, from the fixed noise of ``noise_seed`` (Heun, ``sampler_steps`` steps)."""
    prompts = [p for p in HELD_OUT_PROMPTS for _ in range(per_prompt)]
    x0 = torch.randn((len(prompts), *flow.sample_shape()), generator=torch.Generator().manual_seed(noise_seed))
    x1 = flow.generate(module, x0.to(device), prompts, steps=sampler_steps, method="heun", cuda_graph=False)
    return to_grey(flow.to_images(x1))


def alignment_metrics(images: torch.Tensor, reference: list[torch.Tensor], classifier, reward_fn, quality) -> dict:
    """The held-out evaluation of :func:`held_out_images`' ``images`` (``reference``: the base model's images of each
    held-out prompt, one tensor a prompt): alignment, reward, diversity within a prompt, W2 to the reference (exact
    OT, averaged over prompts), digits FD and background (``quality``: a DigitsQuality)."""
    n = images.shape[0] // len(HELD_OUT_PROMPTS)
    prompts = [p for p in HELD_OUT_PROMPTS for _ in range(n)]
    digits = torch.tensor([digit_of(p) for p in prompts], device=images.device)
    labels = classifier(images).argmax(dim=1)
    groups = _by_prompt(images, n)
    return {
        "alignment": float((labels == digits).float().mean()),
        "reward": float(reward_fn(images.expand(-1, 3, -1, -1), prompts).mean()),
        "prompt_diversity": float(torch.stack([mean_pairwise_distance(g) for g in groups]).mean()),
        "w2_to_reference": sum(w2_distance(g, r) for g, r in zip(groups, reference)) / len(groups),
        **quality(images),
    }


def run_alignment(s: AlignmentSettings, out_dir=None, *, cache_dir=None, device="cpu", progress: bool = True) -> dict:
    """Runs every (alpha, seed) of ``s`` and returns ``{"settings", "train_prompts", "held_out_prompts", "runs":
    {alpha: {seed: [per-epoch records]}}, "seconds"}``; with ``out_dir`` the held-out prompts' images of the
    reference and of every alpha's first seed go there as grids, one prompt a row."""
    from orw_fast.models.diffusers_flow import DiffusersFlowModel
    from orw_fast.prompts import PromptSource

    start = time.perf_counter()
    cache = Path(cache_dir or default_cache_dir())
    device = torch.device(device)
    _, classifier = pretrained_digits(cache, steps=DemoSettings.pretrain_steps, device=device, progress=progress)
    folder = pretrained_text_digits(cache, steps=s.pretrain_steps, progress=progress)
    reward_fn, quality = PromptedDigitReward(classifier), DigitsQuality(classifier)
    n = s.eval_per_prompt
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    def make_flow():
        return DiffusersFlowModel(
            folder,
            PromptSource(TRAIN_PROMPTS, samples_per_prompt=s.samples_per_prompt),
            lora_rank=s.lora_rank,
            lora_targets=s.lora_targets,
            guidance_scale=s.guidance_scale,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            eval_prompts=HELD_OUT_PROMPTS,
        )

    def images_of(trainer: ORWCFMTrainer, noise_seed: int) -> torch.Tensor:
        return held_out_images(trainer.flow, trainer.model, n, noise_seed, s.sampler_steps, device)

    reference: list[torch.Tensor] = []

    def evaluate(trainer: ORWCFMTrainer) -> dict:
        images = images_of(trainer, 4321)
        if not reference:  # the base model's images of every held-out prompt, from other noise
            reference.extend(_by_prompt(images_of(trainer, 1234), n))
        evaluate.last = images
        return alignment_metrics(images, reference, classifier, reward_fn, quality)

    def make_trainer(alpha: float, seed: int, callbacks: list) -> ORWCFMTrainer:
        return ORWCFMTrainer(
            make_flow(),
            sweep_config(s, alpha, seed, sampler_method=s.sampler_method),
            device,
            reward_fn=reward_fn,
            callbacks=callbacks,
        )

    def save_samples(alpha: float) -> None:
        if out_dir is not None:
            _save_grid(evaluate.last, out_dir / f"samples_alpha_{alpha:g}.png", n)

    runs = sweep(s.alphas, s.seeds, make_trainer, s.epochs, s.steps_per_epoch, evaluate, save_samples, progress)
    results = {
        "settings": dataclasses.asdict(s),
        "train_prompts": TRAIN_PROMPTS,
        "held_out_prompts": HELD_OUT_PROMPTS,
        "runs": runs,
        "seconds": time.perf_counter() - start,
    }
    check_finite(results)
    if out_dir is not None:
        _save_grid(torch.cat(reference), out_dir / "samples_reference.png", n)
    return results


def _save_grid(images: torch.Tensor, path: Path, per_prompt: int) -> None:
    """One row per held-out prompt (8 of its images), the prompt under the row."""
    rows = [g[:8] for g in _by_prompt(images, per_prompt)]
    save_image_grid(torch.cat(rows), path, nrow=8, scale=4, row_captions=HELD_OUT_PROMPTS)


def format_alignment_table(results: dict) -> str:
    """Markdown table: the reference (epoch 0) and every alpha's last epoch, mean over seeds."""
    runs = results["runs"]
    first = next(iter(next(iter(runs.values())).values()))[0]
    lines = [
        "| model | " + " | ".join(COLUMNS.values()) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
        "| reference (base model) | " + " | ".join(f"{first[k]:.3f}" for k in COLUMNS) + " |",
    ]
    for alpha, by_seed in runs.items():
        finals = [records[-1] for records in by_seed.values()]
        lines.append(
            f"| alpha = {alpha} | "
            + " | ".join(f"{sum(f[k] for f in finals) / len(finals):.3f}" for k in COLUMNS)
            + " |"
        )
    return "\n".join(lines)


def run_text_demo(
    out_dir, settings: AlignmentSettings | None = None, *, cache_dir=None, device="cpu", progress: bool = True
) -> dict:
    """``orw-fast demo --task text``: the alignment run (default: alpha 0 and 1, seed 0); writes the held-out
    prompts' sample grids (one prompt a row), curves.png (alignment and diversity within a prompt per epoch, first
    seed), metrics.json and prints the table."""
    import json

    import matplotlib

    from orw_fast.checkpoint import write_text_atomic
    from orw_fast.cli_paths import prepare_output_dir

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = prepare_output_dir(out_dir, "the report folder")
    s = settings or AlignmentSettings(alphas=(0.0, 1.0), seeds=(0,))
    results = run_alignment(s, out_dir, cache_dir=cache_dir, device=device, progress=progress)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for alpha, by_seed in results["runs"].items():
        records = next(iter(by_seed.values()))
        for ax, key in zip(axes, ("alignment", "prompt_diversity")):
            ax.plot([r["epoch"] for r in records], [r[key] for r in records], marker="o", label=f"alpha={alpha}")
    for ax, key in zip(axes, ("alignment", "prompt_diversity")):
        ax.set(xlabel="epoch", title=f"{COLUMNS[key]} (held-out prompts)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=100)
    plt.close(fig)
    write_text_atomic(out_dir / "metrics.json", json.dumps(results, indent=1))
    print(format_alignment_table(results))
    return results
