"""SD3 and FLUX pipelines with random weights, built offline (nothing is downloaded): the real diffusers and
transformers classes at toy sizes (or, for GPU benchmarks, the published architectures), with tokenizers made from
a small vocabulary written here. For tests, CPU benchmarks and experiments of the text-to-image path;
:func:`save_tiny_pipeline` writes one with ``save_pretrained`` so that it loads like a real model folder.

Sizes: SD3 (2 transformer layers, 2 CLIP text encoders, no T5) about 0.2M parameters; FLUX (1 + 1 layers, CLIP
and T5 encoders) about 0.2M; a one-block VAE (latents at image resolution, 4 channels).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

WORDS = (
    "a an the of photo picture image small large thick thin red blue green yellow black white cat dog bird "
    "car house tree digit zero one two three four five six seven eight nine handwritten"
).split()


def clip_tokenizer(folder: Path, max_length: int, *, whole_words=()):
    """A ``CLIPTokenizer`` written into ``folder`` whose vocabulary is WORDS and single characters; ``max_length``
    tokens a prompt. It spells every word out in characters except ``whole_words`` (some of WORDS), which its BPE
    merges build into one token each (checked: ValueError if one word's merges split another)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for word in WORDS:
        vocab[f"{word}</w>"] = len(vocab)
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(f"{c}</w>", len(vocab))
    merges = []
    for word in whole_words:  # w1 w2 -> w1w2, w1w2 w3 -> w1w2w3, ..., the last symbol with its end-of-word mark
        symbols = [*word[:-1], f"{word[-1]}</w>"]
        for i in range(1, len(symbols)):
            merge = f"{''.join(symbols[:i])} {symbols[i]}"
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault("".join(symbols[: i + 1]), len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    split = [w for w in whole_words if len(tokenizer.tokenize(w)) != 1]
    if split:
        raise ValueError(f"the merges of whole_words split {split}: choose words without each other's prefixes inside")
    return tokenizer


def _t5_tokenizer(folder: Path, max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5TokenizerFast

    pieces = [
        "<pad>",
        "</s>",
        "<unk>",
        *dict.fromkeys(f"\u2581{w}" for w in WORDS),
        *"abcdefghijklmnopqrstuvwxyz0123456789",
    ]
    tokenizer = Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )
    fast.save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder), len(pieces)


def clip_text_encoder(vocab_size: int, projection: bool, width: int = 32, layers: int = 2):
    """A CLIP text encoder (``CLIPTextModelWithProjection`` with ``projection``) with random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=width,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


# The published architectures (their transformer and VAE configs; weights random): SD3.5-medium and FLUX.1-dev.
PUBLISHED = {
    "sd3": dict(
        transformer=dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=384,
            qk_norm="rms_norm",
            dual_attention_layers=tuple(range(13)),
        ),
        vae=dict(scaling_factor=1.5305, shift_factor=0.0609),
        scheduler=dict(shift=3.0),
        clip_widths=(768, 1280),
    ),
    "flux": dict(
        transformer=dict(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
        vae=dict(scaling_factor=0.3611, shift_factor=0.1159),
        scheduler=dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, shift=3.0),
        clip_widths=(768,),
    ),
}


def tiny_vae(latent_channels: int = 4, published: dict | None = None):
    """An ``AutoencoderKL`` with random weights: one block that keeps the resolution (RGB <-> ``latent_channels``),
    or with ``published`` (scaling and shift factors) the SD3/FLUX VAE's architecture."""
    from diffusers import AutoencoderKL

    if published is not None:  # the SD3 / FLUX VAE (8x downsampling, 16 latent channels)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=16,
            norm_num_groups=32,
            use_quant_conv=False,
            use_post_quant_conv=False,
            sample_size=1024,
            **published,
        )
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=8,
        scaling_factor=1.5,
        shift_factor=0.1,
    )


def _sd3(arch, text_encoder, tokenizer, vae, tmp: Path, *, sample_size: int, layers: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    config = (
        arch["transformer"]
        if arch
        else dict(
            sample_size=sample_size,
            patch_size=1,
            in_channels=4,
            num_layers=layers,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=32,
            pooled_projection_dim=64,
            out_channels=4,
            pos_embed_max_size=96,
        )
    )
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**config),
        scheduler=FlowMatchEulerDiscreteScheduler(**(arch["scheduler"] if arch else dict(shift=3.0))),
        vae=vae,
        text_encoder=text_encoder(0, True),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder(1, True),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def _flux(arch, text_encoder, tokenizer, vae, tmp: Path, *, sample_size: int, layers: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    t5_tokenizer, t5_vocab = _t5_tokenizer(tmp / "t5", 512 if arch else 16)
    t5_config = (
        dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64)
        if arch
        else dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    )
    t5 = T5EncoderModel(T5Config(vocab_size=t5_vocab, decoder_start_token_id=0, **t5_config))
    config = (
        arch["transformer"]
        if arch
        else dict(
            patch_size=1,
            in_channels=16,
            num_layers=max(1, layers - 1),
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=(4, 4, 8),
            guidance_embeds=True,
        )
    )
    scheduler = arch["scheduler"] if arch else dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    return FluxPipeline(
        transformer=FluxTransformer2DModel(**config),
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler),
        vae=vae,
        text_encoder=text_encoder(0, False),
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
    )


_BUILDERS = {"sd3": _sd3, "flux": _flux}  # kind -> builder (a tiny pipeline of each diffusers family)


def tiny_pipeline(kind: str, *, seed: int = 0, sample_size: int = 8, layers: int = 2, published: bool = False):
    """A tiny ``StableDiffusion3Pipeline`` ("sd3", no T5) or ``FluxPipeline`` ("flux") with random weights (seeded);
    the VAE keeps the resolution, and the SD3 transformer's default image side is ``sample_size`` pixels (a FLUX
    pipeline loaded from a folder defaults to 128: pass the resolution you want).

    ``published=True`` builds the published architectures instead (SD3.5-medium, 2.2B transformer parameters;
    FLUX.1-dev, 12B), with random weights and their VAE, the text encoders reduced to one layer of the published
    widths (no T5 for SD3): for speed and memory measurements, which do not depend on the weights' values. Build
    them under ``torch.device("cuda")`` and a bf16 default dtype (FLUX.1-dev is 24 GB in bf16)."""
    if kind not in _BUILDERS:
        raise ValueError(f"kind must be 'sd3' or 'flux', got {kind!r}")
    torch.manual_seed(seed)
    arch = PUBLISHED[kind] if published else None
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer(Path(tmp) / "clip", 77)
        vocab = len(tokenizer)
        widths, text_layers = (arch["clip_widths"], 1) if published else ((32, 32), 2)
        vae = tiny_vae(published=arch["vae"] if published else None)

        def text_encoder(index: int, projection: bool):
            return clip_text_encoder(vocab, projection, widths[index], text_layers)

        pipeline = _BUILDERS[kind](
            arch, text_encoder, tokenizer, vae, Path(tmp), sample_size=sample_size, layers=layers
        )
    if not published:
        pipeline.default_sample_size = sample_size // pipeline.vae_scale_factor
    return pipeline


def save_tiny_pipeline(kind: str, folder, **kwargs) -> Path:
    """:func:`tiny_pipeline` written to ``folder`` with ``save_pretrained`` (loads with from_pretrained)."""
    folder = Path(folder)
    tiny_pipeline(kind, **kwargs).save_pretrained(folder)
    return folder
