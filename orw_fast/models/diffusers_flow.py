"""diffusers' text-to-image flow models as :class:`~orw_fast.models.flow_model.FlowModel` families: what they share
(pipeline loading, prompt-embedding cache, VAE decode, LoRA (peft) or full fine-tuning of the transformer, the
diffusers LoRA export, rebuilding from a checkpoint) is :class:`DiffusersFlowModel` here; what differs is in one
subclass per family: :class:`~orw_fast.models.sd3.SD3FlowModel` (SD3/SD3.5) and
:class:`~orw_fast.models.flux.FluxFlowModel` (FLUX.1). ``DiffusersFlowModel(pipeline, prompts, ...)`` builds the
family of the pipeline's transformer, found in :mod:`orw_fast.models.families`; adding a family is one file with
its subclass (the hooks marked "family" below), its line in the registry, and its tests.

Conventions. diffusers' flow models run from noise at sigma=1 to data at sigma=0, x_sigma = (1-sigma) x_data +
sigma eps, and the transformer predicts eps - x_data. In orw_fast's convention t = 1 - sigma, so
``velocity(t, x) = -transformer(x, sigma=1-t)``, and an Euler step x + (t' - t) v is the scheduler's
x + (sigma' - sigma) output. Rollouts follow the pipeline's own sigma schedule as the grid t = 1 - sigma, and its
guidance. The loss trains the conditional velocity (no guidance): guidance is a sampling-time combination of the
conditional and unconditional velocities, and fine-tuning the conditional one moves the guided samples with it, as
the reward asks.

Prompts are encoded by the pipeline's text encoders once per distinct prompt (and once for the negative prompt)
when the trainer prepares the model; the embeddings are cached on the device and the text encoders are dropped
(``keep_text_encoders=False``), so T5-XXL (about 9 GB in bf16) does not stay in memory. Samples are turned into
images for the rewards by the VAE.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from orw_fast import distributed as dist_utils
from orw_fast.models.flow_model import FlowModel, ModelArgumentError
from orw_fast.models.policy_weights import FullCopies, LoraAdapter
from orw_fast.prompts import PromptSource

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
EXPECTED_SOURCE = "a local folder written by save_pretrained or a hub id"
_ENCODE_CHUNK = 16  # prompts per text-encoder call while caching
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass
class PipelineConfigs:
    """What a pipeline's config files say, read without its weights: the pipeline's class name, the names of its
    transformer's class (and base classes, for an object), the transformer's and the VAE's configs."""

    pipeline_class: str
    transformer_classes: tuple[str, ...]  # empty: the pipeline has no transformer
    transformer: dict
    vae: dict

    @classmethod
    def of(cls, source) -> PipelineConfigs:
        """The configs of a pipeline object, or of a local folder or hub id (model_index.json, transformer/ and
        vae/config.json only). ModelArgumentError("pipeline") for a folder or id that is not a diffusers pipeline,
        TypeError for another object."""
        from diffusers import DiffusionPipeline

        if isinstance(source, DiffusionPipeline):
            transformer, vae = getattr(source, "transformer", None), getattr(source, "vae", None)
            classes = () if transformer is None else tuple(c.__name__ for c in type(transformer).__mro__)
            return cls(
                type(source).__name__,
                classes,
                dict(getattr(transformer, "config", {})),
                dict(getattr(vae, "config", {})),
            )
        if not isinstance(source, (str, Path)):
            raise TypeError(f"pipeline must be a diffusers pipeline, a folder or a hub id, got {type(source).__name__}")
        index = _read_config(source, None, "model_index.json")
        transformer = index.get("transformer") or [None, None]
        return cls(
            index.get("_class_name", "?"),
            (str(transformer[1]),) if transformer[1] else (),
            _read_config(source, "transformer", "config.json") if transformer[1] else {},
            _read_config(source, "vae", "config.json") if index.get("vae") else {},
        )

    def vae_scale(self) -> int:
        """The VAE's downsampling factor, as diffusers' pipelines compute their ``vae_scale_factor`` (8 without a
        VAE)."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1) if "block_out_channels" in self.vae else 8


def _read_config(source, subfolder: str | None, name: str) -> dict:
    """One JSON config file of a local pipeline folder or hub id (no weights)."""
    folder = Path(source)
    if folder.is_dir():
        path = folder / (subfolder or "") / name
        if not path.is_file():
            raise ModelArgumentError(
                "pipeline",
                f"cannot load a diffusers pipeline from {str(source)!r}: the folder "
                f"has no {path.relative_to(folder)}; expected {EXPECTED_SOURCE}",
            )
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(str(source), name, subfolder=subfolder)).read_text())
    except Exception as err:  # noqa: BLE001 - a bad id, no network, no such file: all say the same to the user
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise ModelArgumentError(
            "pipeline",
            f"cannot load a diffusers pipeline from {str(source)!r}: no such folder, "
            f"and not a hub id that answers ({reason}); expected {EXPECTED_SOURCE}",
        ) from None


def family_of(source) -> type[DiffusersFlowModel]:
    """The registered diffusers family of a pipeline (object, folder or hub id; configs only, no weights): the one
    whose transformer class is the pipeline's. ModelArgumentError("pipeline") naming the supported families
    otherwise."""
    return _family(PipelineConfigs.of(source), source)


def _family(configs: PipelineConfigs, source) -> type[DiffusersFlowModel]:
    from orw_fast.models.families import family_classes

    families = family_classes(DiffusersFlowModel)
    for family in families:
        if family.transformer_class in configs.transformer_classes:
            return family
    subject = repr(str(source)) if isinstance(source, (str, Path)) else "the pipeline object"
    classes = configs.transformer_classes
    has = f"transformer {classes[0]}" if classes else "no transformer"
    raise ModelArgumentError(
        "pipeline",
        f"{subject} ({configs.pipeline_class}, {has}) is not a supported pipeline: "
        f"orw_fast fine-tunes {' and '.join(f.title for f in families)}",
    )


def load_pipeline(source, *, dtype: torch.dtype = torch.float32):
    """The pipeline ``source`` of a supported family: a diffusers pipeline object (used as it is), or a local folder
    or hub id loaded with ``DiffusionPipeline.from_pretrained(source, dtype=dtype)`` (an SD3 folder without T5 loads
    without it). Its family is checked from the config files before any weight is read."""
    from diffusers import DiffusionPipeline

    family_of(source)
    if isinstance(source, DiffusionPipeline):
        return source
    listed = _read_config(source, None, "model_index.json")
    import diffusers

    expected = inspect.signature(getattr(diffusers, listed.get("_class_name", ""), DiffusionPipeline)).parameters
    optional = ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
    absent = {n: None for n in optional if n in expected and listed.get(n) in (None, [None, None])}
    try:
        return DiffusionPipeline.from_pretrained(str(source), dtype=dtype, **absent)
    except (OSError, ValueError, TypeError) as err:
        raise ModelArgumentError(
            "pipeline",
            f"cannot load a diffusers pipeline from {str(source)!r} "
            f"({type(err).__name__}: {err}); expected {EXPECTED_SOURCE}",
        ) from None


def _source_of(pipeline) -> str | None:
    """What describe() records of the pipeline argument: a local folder as an absolute path, a hub id as given,
    None for an object."""
    if not isinstance(pipeline, (str, Path)):
        return None
    return str(Path(pipeline).resolve()) if Path(pipeline).is_dir() else str(pipeline)


def find_pipeline(recorded: str, checkpoint) -> str:
    """The pipeline folder a checkpoint recorded, where it is now: the recorded path when it is a folder; else, the
    run folder having been moved, the longest tail of the path that is a pipeline folder (model_index.json) under the
    checkpoint's folder or one of its parents (nearest first); else ``recorded`` itself (a hub id)."""
    path = Path(recorded)
    if path.is_dir():
        return recorded
    parts = path.parts[1:] if path.is_absolute() else path.parts
    folder = Path(checkpoint).resolve().parent
    for start in range(len(parts)):
        for base in (folder, *folder.parents):
            candidate = base.joinpath(*parts[start:])
            if (candidate / "model_index.json").is_file():
                return str(candidate)
    return recorded


def _positive_int(name, value, *, optional=False):
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be {'None or ' if optional else ''}an integer >= 1, got {value!r}")
    return value


class DiffusersFlowModel(FlowModel):
    """A diffusers text-to-image flow pipeline fine-tuned toward a reward (rollouts on the scheduler's sigma
    schedule). ``DiffusersFlowModel(pipeline, ...)`` is an instance of the pipeline's family (:func:`family_of`);
    a family's class (``SD3FlowModel(pipeline, ...)``) refuses a pipeline of another family.

    Args:
        pipeline: a pipeline object, a local diffusers folder or a hub id (:func:`load_pipeline`).
        prompts: a :class:`~orw_fast.prompts.PromptSource`, a list of prompts or a prompt file (one a line).
        lora_rank: rank of the LoRA adapter on ``lora_targets`` of the transformer (alpha ``lora_alpha``, default
            the rank); None trains the whole transformer (small models: four copies of it are kept).
        lora_targets: module names of the transformer that get the adapter (default: the family's).
        resolution: image side in pixels (default the pipeline's); a multiple of :meth:`resolution_factor`
            (checked by :meth:`check_pipeline` before the weights load).
        guidance_scale: the family's rollout guidance (SD3's classifier-free guidance scale, 1 turning it off;
            FLUX's guidance embedding). Default: the family's ``default_guidance_scale``.
        negative_prompt: the unconditional prompt of classifier-free guidance (default empty).
        max_sequence_length: T5 tokens (default the family's ``default_max_sequence_length``).
        dtype: weights' dtype when loading from a folder or id (the state of a rollout stays float32).
        gradient_checkpointing: recompute the transformer's activations in backward (less memory, more time).
        keep_text_encoders: keep the text encoders after the prompts are cached (default: drop them).
        eval_prompts: prompts also encoded (for :meth:`generate` and rewards) but never drawn for training, e.g.
            held-out prompts of an evaluation.
    """

    # third-order Adams-Bashforth, 9 steps on the scheduler's sigmas (10 transformer calls): chosen end to end by
    # bench_time_to_target --task text (the same steps to the target as Heun 20 at a third of the time per step,
    # quality unchanged; README, time to target)
    rollout_method, rollout_steps = "ab3", 9
    rollout_grid = None  # the scheduler's sigma schedule
    # -- family: what a subclass declares ---------------------------------------------------------------
    transformer_class: str  # the diffusers transformer class (by name) whose pipelines the family fine-tunes
    title: str  # how errors name the family, e.g. "SD3/SD3.5 (StableDiffusion3Pipeline)"
    default_guidance_scale: float
    default_max_sequence_length: int
    default_lora_targets: tuple[str, ...] = LORA_TARGETS

    def __new__(cls, pipeline=None, *args, **kwargs):
        return super().__new__(family_of(pipeline) if cls is DiffusersFlowModel else cls)

    def __init__(
        self,
        pipeline,
        prompts,
        *,
        lora_rank: int | None = 16,
        lora_alpha: float | None = None,
        lora_targets=None,
        resolution: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str = "",
        max_sequence_length: int | None = None,
        dtype: torch.dtype = torch.float32,
        gradient_checkpointing: bool = False,
        keep_text_encoders: bool = False,
        eval_prompts=(),
    ):
        resolution = _positive_int("resolution", resolution, optional=True)
        type(self).check_pipeline(pipeline, resolution)
        self.pipe = load_pipeline(pipeline, dtype=dtype)
        self.source = _source_of(pipeline)
        self.prompts = prompts if isinstance(prompts, PromptSource) else PromptSource(prompts)
        self.lora_rank = _positive_int("lora_rank", lora_rank, optional=True)
        if lora_alpha is not None and (
            isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not lora_alpha > 0
        ):
            raise ValueError(f"lora_alpha must be None or a number > 0, got {lora_alpha!r}")
        self.lora_alpha = lora_alpha
        lora_targets = self.default_lora_targets if lora_targets is None else lora_targets
        if isinstance(lora_targets, str) or not lora_targets or not all(isinstance(t, str) for t in lora_targets):
            raise ValueError(f"lora_targets must be a non-empty list of module names, got {lora_targets!r}")
        self.lora_targets = list(lora_targets)
        pipe = self.pipe
        self.vae_scale = pipe.vae_scale_factor
        self.resolution = resolution or pipe.default_sample_size * self.vae_scale
        self.guidance_scale = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        if not np.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {negative_prompt!r}")
        self.negative_prompt = negative_prompt
        self.max_sequence_length = (
            _positive_int("max_sequence_length", max_sequence_length, optional=True) or self.default_max_sequence_length
        )
        self.gradient_checkpointing, self.keep_text_encoders = bool(gradient_checkpointing), bool(keep_text_encoders)
        if isinstance(eval_prompts, str) or not all(isinstance(p, str) and p for p in eval_prompts):
            raise ValueError(f"eval_prompts must be a list of non-empty strings, got {eval_prompts!r}")
        self.eval_prompts = list(dict.fromkeys(p for p in eval_prompts if p not in self.prompts.prompts))
        self.transformer = pipe.transformer
        self._times: dict[int, torch.Tensor] = {}

    # -- the resolution, checked from config files ---------------------------------------------------------

    @classmethod
    def resolution_factor(cls, configs: PipelineConfigs) -> tuple[int, str]:
        """(what the image side must be a multiple of, why in words): the VAE's downsampling times the family's
        :meth:`latent_patch`."""
        vae = configs.vae_scale()
        patch, why = cls.latent_patch(configs.transformer)
        return vae * patch, f"the VAE's {vae}x downsampling times {why}"

    @classmethod
    def check_pipeline(cls, pipeline, resolution: int | None = None) -> type[DiffusersFlowModel]:
        """The family of ``pipeline`` (object, folder or hub id), checked from its config files alone (no weights
        are read): one of this class's families, and ``resolution`` (None: the pipeline's default, not checked) a
        multiple of the family's :meth:`resolution_factor`. ModelArgumentError naming "pipeline" or "resolution"
        otherwise."""
        configs = PipelineConfigs.of(pipeline)
        family = _family(configs, pipeline)
        if not issubclass(family, cls):
            raise ModelArgumentError(
                "pipeline", f"{str(pipeline)!r} is a {family.title} pipeline; a {cls.__name__} fine-tunes {cls.title}"
            )
        factor, why = family.resolution_factor(configs)
        if resolution is not None and resolution % factor:
            raise ModelArgumentError(
                "resolution", f"resolution must be a multiple of {factor} for this pipeline ({why}), got {resolution}"
            )
        return family

    # -- family hooks --------------------------------------------------------------------------------------

    @classmethod
    def latent_patch(cls, transformer_config: dict) -> tuple[int, str]:
        """family: (side of the latent patch one image token covers, why in words), from the transformer's config."""
        raise NotImplementedError

    def encode_prompts(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """family: (token embeddings, pooled embeddings) of ``prompts`` by the pipeline's text encoders (there until
        :meth:`prepare` has cached the prompts, unless ``keep_text_encoders``)."""
        raise NotImplementedError

    def _prepare_family(self, device) -> None:
        """family: what the family's transformer calls need besides the prompts (on ``device``)."""

    def _transformer_output(self, module, t, x, embeds, pooled) -> torch.Tensor:
        """family: the transformer's prediction (eps - x_data) at sigma = 1 - t, in the dtype of ``x``."""
        raise NotImplementedError

    def _schedule_sigmas(self, steps: int) -> np.ndarray | None:
        """family: the sigmas the pipeline hands its scheduler for ``steps`` steps (None: the scheduler's own)."""

    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        """family: samples -> the VAE's latents [B, C, h, w] (FLUX unpacks its tokens)."""
        return x

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

            transformer.add_adapter(
                LoraConfig(
                    r=self.lora_rank,
                    lora_alpha=self.lora_alpha or self.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=self.lora_targets,
                )
            )
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
        self._prepare_family(device)

    @torch.no_grad()
    def _cache_prompts(self, device) -> None:
        """Every distinct prompt (and the negative prompt) through the text encoders once; the encoders are then
        dropped unless kept."""
        known = [*self.prompts.prompts, *self.eval_prompts]
        pipe, texts = self.pipe, [*known, self.negative_prompt]
        for name in _TEXT_ENCODERS:
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(device)
        embeds, pooled = [], []
        for start in range(0, len(texts), _ENCODE_CHUNK):
            e, p = self.encode_prompts(texts[start : start + _ENCODE_CHUNK], device)
            embeds.append(e)
            pooled.append(p)
        self._embeds, self._pooled = torch.cat(embeds), torch.cat(pooled)
        self._row = {prompt: i for i, prompt in enumerate(known)}
        if not self.keep_text_encoders:
            for name in _TEXT_ENCODERS:
                if hasattr(pipe, name):
                    setattr(pipe, name, None)

    def times(self, steps: int, grid: str | None = None) -> torch.Tensor:
        """t = 1 - sigma of the pipeline's own schedule for ``steps`` steps (float64, [steps+1]); a named ``grid`` is
        refused (the transformer was trained for its scheduler's schedule: ``rollout_grid`` is None)."""
        if grid is not None:
            raise ValueError(
                f"sampler_grid must be None for a diffusers model (its rollouts follow the scheduler's "
                f"sigma schedule), got {grid!r}"
            )
        if steps not in self._times:
            from diffusers import FlowMatchEulerDiscreteScheduler

            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
            config, tokens = scheduler.config, self._image_tokens()
            mu = None
            if config.get("use_dynamic_shifting", False):
                from diffusers.pipelines.flux.pipeline_flux import calculate_shift

                mu = calculate_shift(
                    tokens,
                    config.get("base_image_seq_len", 256),
                    config.get("max_image_seq_len", 4096),
                    config.get("base_shift", 0.5),
                    config.get("max_shift", 1.15),
                )
            sigmas = self._schedule_sigmas(steps)
            scheduler.set_timesteps(None if sigmas is not None else steps, sigmas=sigmas, mu=mu)
            self._times[steps] = 1 - scheduler.sigmas.to(torch.float64).cpu()
        return self._times[steps]

    def _image_tokens(self) -> int:
        patch, _ = self.latent_patch(dict(self.transformer.config))
        return (self.resolution // self.vae_scale // patch) ** 2

    def conditions(self, prompts) -> tuple:
        try:
            rows = torch.tensor([self._row[p] for p in prompts], device=self._embeds.device)
        except KeyError as err:
            raise ValueError(
                f"prompt {err.args[0]!r} is not one of the model's prompts or eval_prompts (they are "
                "encoded when the trainer prepares the model)"
            ) from None
        return self._embeds[rows], self._pooled[rows]

    def velocity(self, module, t, x, embeds, pooled):
        return -self._transformer_output(module, t, x, embeds, pooled)

    @torch.no_grad()
    def to_images(self, x):
        vae = self.pipe.vae
        latents = self._latents(x) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0].float().clamp(-1, 1)

    def describe(self) -> dict:
        """The family, the pipeline (a local folder as an absolute path, a hub id as given; None for an object) and
        the options :meth:`from_checkpoint` rebuilds the model with."""
        return {
            "family": self.family,
            "pipeline": self.source,
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "lora_targets": self.lora_targets,
            "resolution": self.resolution,
            "guidance_scale": self.guidance_scale,
            "negative_prompt": self.negative_prompt,
            "max_sequence_length": self.max_sequence_length,
            "prompts": self.prompts.prompts,
        }

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
    def _from_checkpoint(cls, path, ckpt, config, *, pipeline=None, prompts=None, device="cpu", dtype=torch.float32):
        """The fine-tuned model of a diffusers run's checkpoint, prepared on ``device`` with the checkpoint's
        policy (LoRA or full) loaded: built from ``pipeline`` (default: the one the run loaded, found by
        :func:`find_pipeline` when its folder has moved) with ``prompts`` (default: the run's) and the run's LoRA,
        resolution and guidance settings."""
        source = pipeline if pipeline is not None else config.get("pipeline")
        if source is None:
            raise ModelArgumentError(
                "pipeline",
                f"{str(path)!r} was trained on a pipeline object, not a folder or "
                "hub id: give the pipeline (a local folder or a hub id)",
            )
        if pipeline is None:
            source = find_pipeline(source, path)
        flow = cls(
            source,
            prompts if prompts is not None else config["prompts"],
            dtype=dtype,
            **{
                key: config[key]
                for key in (
                    "lora_rank",
                    "lora_alpha",
                    "lora_targets",
                    "resolution",
                    "guidance_scale",
                    "negative_prompt",
                    "max_sequence_length",
                )
            },
        )
        flow.prepare(torch.device(device), ema=False)
        flow.weights.check_states(ckpt, f"checkpoint {str(path)!r}")
        flow.weights.load_states(ckpt)
        return flow
