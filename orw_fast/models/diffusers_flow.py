"""diffusers' text-to-image flow models, SD3/SD3.5 (``StableDiffusion3Pipeline``, ``SD3Transformer2DModel``) and
FLUX.1 (``FluxPipeline``, ``FluxTransformer2DModel``), as a :class:`~orw_fast.models.flow_model.FlowModel`: LoRA
(peft) or full fine-tuning of the transformer in the VAE's latent space, prompts encoded once and cached.

Conventions. diffusers' flow models run from noise at sigma=1 to data at sigma=0, x_sigma = (1-sigma) x_data +
sigma eps, and the transformer predicts eps - x_data at ``timestep`` = 1000 sigma (SD3; FLUX takes sigma itself).
In orw_fast's convention t = 1 - sigma, so ``velocity(t, x) = -transformer(x, sigma=1-t)``, and an Euler step
x + (t' - t) v is the scheduler's x + (sigma' - sigma) output. Rollouts follow the pipeline's own sigma schedule
(SD3: the scheduler's, shifted by ``shift``; FLUX: ``linspace(1, 1/N, N)`` shifted by the image's token count)
as the grid t = 1 - sigma, and its guidance: classifier-free guidance for SD3 (``guidance_scale`` > 1, against the
negative prompt), the guidance embedding for guidance-distilled FLUX models. The loss trains the conditional
velocity (no guidance): guidance is a sampling-time combination of the conditional and unconditional velocities,
and fine-tuning the conditional one moves the guided samples with it, as the reward asks.

Prompts are encoded by the pipeline's text encoders once per distinct prompt (and once for the negative prompt)
when the trainer prepares the model; the embeddings are cached on the device and the text encoders are dropped
(``keep_text_encoders=False``), so T5-XXL (about 9 GB in bf16) does not stay in memory. Samples are turned into
images for the rewards by the VAE (unpacking FLUX's 2x2 token packing first).
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch

from orw_fast import distributed as dist_utils
from orw_fast.models.flow_model import FlowModel
from orw_fast.models.policy_weights import FullCopies, LoraAdapter
from orw_fast.prompts import PromptSource

SUPPORTED = "SD3/SD3.5 (StableDiffusion3Pipeline) and FLUX.1 (FluxPipeline)"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_ENCODE_CHUNK = 16  # prompts per text-encoder call while caching


def pipeline_kind(pipeline) -> str:
    """"sd3" or "flux" by the pipeline's transformer; ValueError naming the supported kinds otherwise."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    transformer = getattr(pipeline, "transformer", None)
    if isinstance(transformer, SD3Transformer2DModel):
        return "sd3"
    if isinstance(transformer, FluxTransformer2DModel):
        return "flux"
    raise ValueError(f"a {type(pipeline).__name__} (transformer {type(transformer).__name__}) is not a supported "
                     f"pipeline: orw_fast fine-tunes {SUPPORTED}")


def load_pipeline(source, *, dtype: torch.dtype = torch.float32):
    """The pipeline ``source``: a diffusers pipeline object (used as it is), or a local folder or hub id loaded with
    ``DiffusionPipeline.from_pretrained(source, torch_dtype=dtype)`` (an SD3 folder without T5 loads without it)."""
    from diffusers import DiffusionPipeline

    if isinstance(source, DiffusionPipeline):
        pipeline = source
    elif isinstance(source, (str, Path)):
        index = Path(source) / "model_index.json"
        absent = {}
        if index.is_file():  # a folder saved without some optional parts (an SD3 without T5, say): load it so
            import json

            import diffusers

            listed = json.loads(index.read_text())
            expected = inspect.signature(getattr(diffusers, listed.get("_class_name", ""), DiffusionPipeline)).parameters
            optional = ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
            absent = {n: None for n in optional if n in expected and listed.get(n) in (None, [None, None])}
        try:
            pipeline = DiffusionPipeline.from_pretrained(str(source), dtype=dtype, **absent)
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"cannot load a diffusers pipeline from {str(source)!r} ({type(err).__name__}: {err}); "
                             "give a local folder written by save_pretrained, a hub id, or a pipeline object") from None
    else:
        raise TypeError(f"pipeline must be a diffusers pipeline, a folder or a hub id, got {type(source).__name__}")
    pipeline_kind(pipeline)
    return pipeline


def _positive_int(name, value, *, optional=False):
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be {'None or ' if optional else ''}an integer >= 1, got {value!r}")
    return value


class DiffusersFlowModel(FlowModel):
    """An SD3/SD3.5 or FLUX pipeline fine-tuned toward a reward (rollouts on the scheduler's sigma schedule).

    Args:
        pipeline: a pipeline object, a local diffusers folder or a hub id (:func:`load_pipeline`).
        prompts: a :class:`~orw_fast.prompts.PromptSource`, a list of prompts or a prompt file (one a line).
        lora_rank: rank of the LoRA adapter on ``lora_targets`` of the transformer (alpha ``lora_alpha``, default
            the rank); None trains the whole transformer (small models: four copies of it are kept).
        resolution: image side in pixels (default the pipeline's); must divide into the VAE's (and FLUX's 2x2) grid.
        guidance_scale: SD3's classifier-free guidance scale in rollouts (1 turns it off), FLUX's guidance embedding
            (guidance-distilled models; ignored by others). Default: the pipeline's own default (7.0, 3.5).
        negative_prompt: SD3's unconditional prompt for guidance (default empty).
        max_sequence_length: T5 tokens (default the pipeline's: 256 for SD3, 512 for FLUX).
        dtype: weights' dtype when loading from a folder or id (the state of a rollout stays float32).
        gradient_checkpointing: recompute the transformer's activations in backward (less memory, more time).
        keep_text_encoders: keep the text encoders after the prompts are cached (default: drop them).
        eval_prompts: prompts also encoded (for :meth:`generate` and rewards) but never drawn for training, e.g.
            held-out prompts of an evaluation.
    """

    rollout_grid = None  # the scheduler's sigma schedule

    def __init__(self, pipeline, prompts, *, lora_rank: int | None = 16, lora_alpha: float | None = None,
                 lora_targets=LORA_TARGETS, resolution: int | None = None, guidance_scale: float | None = None,
                 negative_prompt: str = "", max_sequence_length: int | None = None,
                 dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False,
                 keep_text_encoders: bool = False, eval_prompts=()):
        self.pipe = load_pipeline(pipeline, dtype=dtype)
        self.kind = pipeline_kind(self.pipe)
        self.source = str(pipeline) if isinstance(pipeline, (str, Path)) else None
        self.prompts = prompts if isinstance(prompts, PromptSource) else PromptSource(prompts)
        self.lora_rank = _positive_int("lora_rank", lora_rank, optional=True)
        if lora_alpha is not None and (isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float))
                                       or not lora_alpha > 0):
            raise ValueError(f"lora_alpha must be None or a number > 0, got {lora_alpha!r}")
        self.lora_alpha = lora_alpha
        if isinstance(lora_targets, str) or not lora_targets or not all(isinstance(t, str) for t in lora_targets):
            raise ValueError(f"lora_targets must be a non-empty list of module names, got {lora_targets!r}")
        self.lora_targets = list(lora_targets)
        pipe = self.pipe
        self.vae_scale = pipe.vae_scale_factor
        self.resolution = _positive_int("resolution", resolution, optional=True) or pipe.default_sample_size * self.vae_scale
        grid = self.vae_scale * (2 if self.kind == "flux" else getattr(pipe.transformer.config, "patch_size", 1))
        if self.resolution % grid:
            raise ValueError(f"resolution must be a multiple of {grid} for this pipeline (VAE x{self.vae_scale}"
                             f"{' and 2x2 packing' if self.kind == 'flux' else ''}), got {self.resolution}")
        default_guidance, default_tokens = (7.0, 256) if self.kind == "sd3" else (3.5, 512)
        self.guidance_scale = default_guidance if guidance_scale is None else float(guidance_scale)
        if not np.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {negative_prompt!r}")
        self.negative_prompt = negative_prompt
        self.max_sequence_length = _positive_int("max_sequence_length", max_sequence_length, optional=True) \
            or default_tokens
        self.gradient_checkpointing, self.keep_text_encoders = bool(gradient_checkpointing), bool(keep_text_encoders)
        if isinstance(eval_prompts, str) or not all(isinstance(p, str) and p for p in eval_prompts):
            raise ValueError(f"eval_prompts must be a list of non-empty strings, got {eval_prompts!r}")
        self.eval_prompts = list(dict.fromkeys(p for p in eval_prompts if p not in self.prompts.prompts))
        self.transformer = pipe.transformer
        self._times: dict[int, torch.Tensor] = {}

    # -- FlowModel -------------------------------------------------------------------------------

    def default_device(self):
        return self.transformer.device

    def prepare(self, device, *, ema: bool) -> None:
        pipe, transformer = self.pipe, self.transformer
        pipe.vae.to(device).eval().requires_grad_(False)
        transformer.to(device)
        self._cache_prompts(device)
        transformer.requires_grad_(False)
        if self.lora_rank is not None:
            from peft import LoraConfig

            transformer.add_adapter(LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha or self.lora_rank,
                                               init_lora_weights="gaussian", target_modules=self.lora_targets))
            self.weights = LoraAdapter(transformer, ema=ema)
            for p in self.weights.trainable_parameters():  # same adapter initialisation on every rank
                if dist_utils.is_distributed():
                    torch.distributed.broadcast(p.data, 0)
        else:
            transformer.requires_grad_(True)
            dist_utils.broadcast_module(transformer)
            self.weights = FullCopies(transformer, ema=ema)
        if self.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        side = self.resolution // self.vae_scale
        if self.kind == "flux":
            self._img_ids = pipe._prepare_latent_image_ids(1, side // 2, side // 2, device, transformer.dtype)

    @torch.no_grad()
    def _cache_prompts(self, device) -> None:
        """Every distinct prompt (and the negative prompt) through the text encoders once; the encoders are then
        dropped unless kept."""
        known = [*self.prompts.prompts, *self.eval_prompts]
        pipe, texts = self.pipe, [*known, self.negative_prompt]
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(device)
        embeds, pooled = [], []
        for start in range(0, len(texts), _ENCODE_CHUNK):
            chunk = texts[start:start + _ENCODE_CHUNK]
            if self.kind == "sd3":
                e, _, p, _ = pipe.encode_prompt(chunk, None, None, device=device, do_classifier_free_guidance=False,
                                                max_sequence_length=self.max_sequence_length)
            else:
                e, p, self._txt_ids = pipe.encode_prompt(chunk, None, device=device,
                                                         max_sequence_length=self.max_sequence_length)
            embeds.append(e)
            pooled.append(p)
        self._embeds, self._pooled = torch.cat(embeds), torch.cat(pooled)
        self._row = {prompt: i for i, prompt in enumerate(known)}
        if not self.keep_text_encoders:
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
                if hasattr(pipe, name):
                    setattr(pipe, name, None)

    def sample_shape(self):
        channels, side = self.transformer.config.in_channels, self.resolution // self.vae_scale
        return (side // 2 * (side // 2), channels) if self.kind == "flux" else (channels, side, side)

    def times(self, steps: int, grid: str | None = None) -> torch.Tensor:
        """t = 1 - sigma of the pipeline's own schedule for ``steps`` steps (float64, [steps+1]); a named ``grid`` is
        refused (the transformer was trained for its scheduler's schedule: ``rollout_grid`` is None)."""
        if grid is not None:
            raise ValueError(f"sampler_grid must be None for a diffusers model (its rollouts follow the scheduler's "
                             f"sigma schedule), got {grid!r}")
        if steps not in self._times:
            from diffusers import FlowMatchEulerDiscreteScheduler

            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
            config, tokens = scheduler.config, self._image_tokens()
            mu = None
            if config.get("use_dynamic_shifting", False):
                from diffusers.pipelines.flux.pipeline_flux import calculate_shift

                mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                     config.get("base_shift", 0.5), config.get("max_shift", 1.15))
            sigmas = np.linspace(1.0, 1 / steps, steps) if self.kind == "flux" else None
            scheduler.set_timesteps(None if sigmas is not None else steps, sigmas=sigmas, mu=mu)
            self._times[steps] = 1 - scheduler.sigmas.to(torch.float64).cpu()
        return self._times[steps]

    def _image_tokens(self) -> int:
        side = self.resolution // self.vae_scale
        patch = 2 if self.kind == "flux" else self.transformer.config.patch_size
        return (side // patch) ** 2

    def conditions(self, prompts) -> tuple:
        try:
            rows = torch.tensor([self._row[p] for p in prompts], device=self._embeds.device)
        except KeyError as err:
            raise ValueError(f"prompt {err.args[0]!r} is not one of the model's prompts or eval_prompts (they are "
                             "encoded when the trainer prepares the model)") from None
        return self._embeds[rows], self._pooled[rows]

    def _transformer_output(self, module, t, x, embeds, pooled):
        sigma = 1 - t
        dtype = self.transformer.dtype
        if self.kind == "sd3":
            out = module(hidden_states=x.to(dtype), timestep=sigma * 1000, encoder_hidden_states=embeds,
                         pooled_projections=pooled, return_dict=False)[0]
        else:
            guidance = (torch.full_like(sigma, self.guidance_scale, dtype=torch.float32)
                        if self.transformer.config.guidance_embeds else None)
            out = module(hidden_states=x.to(dtype), timestep=sigma.to(dtype), guidance=guidance,
                         pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=self._txt_ids,
                         img_ids=self._img_ids, return_dict=False)[0]
        return out.to(x.dtype)

    def velocity(self, module, t, x, embeds, pooled):
        return -self._transformer_output(module, t, x, embeds, pooled)

    def guided_velocity(self, module, t, x, embeds, pooled):
        if self.kind != "sd3" or self.guidance_scale == 1:
            return self.velocity(module, t, x, embeds, pooled)
        batch = x.shape[0]
        negative = self._embeds[-1:].expand(batch, -1, -1), self._pooled[-1:].expand(batch, -1)
        both = self._transformer_output(module, torch.cat([t, t]), torch.cat([x, x]),
                                        torch.cat([negative[0], embeds]), torch.cat([negative[1], pooled]))
        uncond, cond = both.chunk(2)
        return -(uncond + self.guidance_scale * (cond - uncond))

    @torch.no_grad()
    def to_images(self, x):
        vae = self.pipe.vae
        if self.kind == "flux":
            x = self.pipe._unpack_latents(x, self.resolution, self.resolution, self.vae_scale)
        latents = x / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0].float().clamp(-1, 1)

    def describe(self) -> dict:
        return {"kind": "diffusers", "pipeline": self.source, "lora_rank": self.lora_rank,
                "lora_alpha": self.lora_alpha, "lora_targets": self.lora_targets, "resolution": self.resolution,
                "guidance_scale": self.guidance_scale, "negative_prompt": self.negative_prompt,
                "max_sequence_length": self.max_sequence_length, "prompts": self.prompts.prompts}

    # -- LoRA export -----------------------------------------------------------------------------

    def export(self, checkpoint_path, states):
        """A LoRA run's adapter in diffusers' format, in ``<checkpoint name>_lora/`` beside the checkpoint."""
        if self.lora_rank is not None:
            path = Path(checkpoint_path)
            self.save_lora(path.with_name(f"{path.stem}_lora"), states["policy"])

    def save_lora(self, folder, policy_state: dict) -> Path:
        """The adapter (``policy_state``: the policy's LoRA tensors by parameter name) in diffusers' format, so that
        ``pipe.load_lora_weights(folder)`` on a fresh pipeline reproduces the fine-tuned model. Atomic per file."""
        import os
        import tempfile

        from peft.utils import get_peft_model_state_dict

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        layers = get_peft_model_state_dict(self.transformer, state_dict=policy_state)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp") as tmp:
            type(self.pipe).save_lora_weights(tmp, transformer_lora_layers=layers)
            for name in os.listdir(tmp):
                os.replace(Path(tmp) / name, folder / name)
        return folder

    # -- from a checkpoint -------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path, *, pipeline=None, prompts=None, device="cpu", dtype=torch.float32):
        """The fine-tuned model of a training checkpoint of a diffusers run, prepared on ``device`` with the
        checkpoint's policy (LoRA or full) loaded: built from ``pipeline`` (default: the one the run loaded) with
        ``prompts`` (default: the run's) and the run's LoRA, resolution and guidance settings."""
        from orw_fast.checkpoint import load_file

        ckpt = load_file(path)
        described = (ckpt.get("config") or {}).get("model_config") or {}
        if described.get("kind") != "diffusers":
            raise ValueError(f"{str(path)!r} is not a checkpoint of a diffusers (text-to-image) run")
        source = pipeline if pipeline is not None else described.get("pipeline")
        if source is None:
            raise ValueError(f"{str(path)!r} was trained on a pipeline object, not a folder or hub id: pass the "
                             "pipeline (--pretrained PATH_OR_ID)")
        flow = cls(source, prompts if prompts is not None else described["prompts"], dtype=dtype,
                   **{key: described[key] for key in ("lora_rank", "lora_alpha", "lora_targets", "resolution",
                                                       "guidance_scale", "negative_prompt", "max_sequence_length")})
        flow.prepare(torch.device(device), ema=False)
        flow.weights.check_states(ckpt, f"checkpoint {str(path)!r}")
        flow.weights.load_states(ckpt)
        return flow
