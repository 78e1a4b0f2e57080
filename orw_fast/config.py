"""TrainerConfig: the settings of ORWCFMTrainer, each checked when the config is made (ConfigError names the
key; the command line reports it under the flag that set it)."""
from __future__ import annotations

import dataclasses
import numbers
import os

import torch

from orw_fast.couplings import COUPLINGS
from orw_fast.objectives import OBJECTIVES
from orw_fast.ops import WEIGHTINGS
from orw_fast.ops.reward_weights import check_real
from orw_fast.sampling import FIXED_STEP_METHODS, GRIDS, check_method

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("adam", "adamw")


class ConfigError(ValueError):
    """A TrainerConfig value that cannot be used; ``key`` names the field (the CLI reports it under its flag)."""

    def __init__(self, key: str, expected: str, value):
        shown = repr(value) if len(repr(value)) <= 60 else f"{repr(value)[:24]}... ({len(repr(value))} characters)"
        self.key, self.expected, self.value = key, expected, value
        super().__init__(f"config.{key} must be {expected}, got {shown}")


def _real(minimum=None, *, above=False, below=None):
    """A checker: a real number (no bool), finite in float32 (where the kernels use it), within the bounds."""
    bounds = "" if minimum is None else f" {'>' if above else '>='} {minimum:g}"
    bounds += "" if below is None else f"{' and' if bounds else ''} < {below:g}"

    def check(key, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(key, f"a finite number{bounds}", value)
        try:
            number = check_real(value, key, torch.float32)
        except ValueError:
            raise ConfigError(key, f"a finite number{bounds} in float32's range (the kernels compute in it)",
                              value) from None
        if (minimum is not None and (number <= minimum if above else number < minimum)) or \
                (below is not None and number >= below):
            raise ConfigError(key, f"a finite number{bounds}", value)
        return number
    return check


def _integer(minimum, maximum=None):
    def check(key, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum or \
                (maximum is not None and value > maximum):
            raise ConfigError(key, f"an integer >= {minimum}" + ("" if maximum is None else f" and <= {maximum}"), value)
        return int(value)
    return check


def _boolean(key, value):
    if not isinstance(value, bool):
        raise ConfigError(key, "True or False", value)
    return value


def _choice(options):
    def check(key, value):
        if not isinstance(value, (str, bool)) or value not in options:
            raise ConfigError(key, f"one of {tuple(options)}", value)
        return value
    return check


def _optional_choice(options):
    def check(key, value):
        if value is not None and (not isinstance(value, str) or value not in options):
            raise ConfigError(key, f"None or one of {tuple(options)}", value)
        return value
    return check


def _text(optional: bool, path: bool = False):
    kinds = (str, os.PathLike) if path else (str,)

    def check(key, value):
        if value is None and optional:
            return None
        if not isinstance(value, kinds) or not str(value):
            raise ConfigError(key, f"{'None or ' if optional else ''}a non-empty {'path' if path else 'string'}", value)
        return str(value)
    return check


def _image_shape(key, value):
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, torch.Size)) or not value or \
            not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in value):
        raise ConfigError(key, "None or the shape of one sample, e.g. (C, H, W), of positive integers", value)
    return tuple(int(d) for d in value)


def _strings(key, value):
    if value is not None and (isinstance(value, str) or not isinstance(value, (list, tuple)) or
                              not all(isinstance(p, str) for p in value)):
        raise ConfigError(key, "None or a list of strings", value)
    return None if value is None else list(value)


def _mapping(key, value):
    if value is not None and not isinstance(value, dict):
        raise ConfigError(key, "None or a dict", value)
    return value


def _sampler_method(key, value):
    try:
        check_method(value, key)
    except (TypeError, ValueError) as err:
        raise ConfigError(key, f"one of {FIXED_STEP_METHODS} or a torchdiffeq method", value) from err
    return value


@dataclasses.dataclass
class TrainerConfig:
    """Settings of :class:`ORWCFMTrainer`. The first block has the official code's keys and meaning. Every value
    is checked (type included: ``True`` is not a batch size, ``"no"`` is not False); a bad one raises
    :class:`ConfigError` naming its key."""

    learning_rate: float = 2e-4
    warmup_steps: int = 0  # linear LR warm-up over this many steps
    w2_coefficient: float = 1.0  # alpha
    temperature: float = 1.0  # tau
    grad_clip: float = 1.0  # max grad norm; 0 disables
    batch_size: int = 64  # the whole batch, split evenly over the processes
    use_wandb: bool = False
    wandb_project: str = "orw_fast"
    run_name: str | None = None
    savedir: str = "runs/orw"
    ref_path: str | None = None  # reference weights (default: the loaded pre-trained model)
    text_prompts: list[str] | None = None  # CLIP reward prompts (needs clip_model_path)
    parallel: bool = False  # the official code's DataParallel switch; orw_fast runs one process per GPU (torchrun)
    # orw_fast options
    image_shape: tuple[int, ...] | None = None  # [C, H, W]; inferred from torchcfm UNets
    weighting: str = "softmax"  # "softmax" | "exp" (official) | "none"
    coupling: str = "independent"  # "independent" | "ot" | "rollout"
    sigma: float = 0.0  # path noise
    # Heun, 20 steps on the model's rollout grid: 40 model calls, as accurate as the official 100 uniform Euler steps
    # (median RMS error and W2 to a tight dopri5 solution, benchmarks/bench_rollout_error.py)
    sampler_steps: int = 20
    sampler_method: str = "heun"
    sampler_grid: str | None = None  # rollout time grid (orw_fast.sampling.GRIDS); None: the model's rollout_grid
    cuda_graph: str | bool = "auto"
    refresh_interval: int = 1  # epochs between last-policy refreshes
    rollout_batches: int = 1  # rollouts for this many steps are made (and scored) in one sampler call
    rollout_reuse: int = 1  # each rollout serves this many updates (1: a fresh rollout per sample and step)
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16" (autocast; GradScaler for fp16)
    compile: bool = False  # torch.compile the policy's forward
    channels_last: bool = False
    ema_decay: float = 0.0  # 0 disables the EMA copy
    seed: int = 0  # rank r draws from seed + r
    fsdp: bool = False  # multi-process: shard the policy and its copies with FSDP2 (fully_shard)
    clip_model_path: str | None = None
    grid_size: int = 64  # samples in the per-epoch grid (0: no grids)
    diversity_every: int = 10  # steps between batch-diversity metrics (O(B^2), all-gathered); the first step has one
    checkpoint_every: int = 1  # epochs between checkpoints (0: only at the end)
    model_config: dict | None = None  # how to rebuild the model (orw_fast.models), kept in checkpoints
    objective: str = "orw_cfm_w2"  # the loss of a step (orw_fast.objectives.OBJECTIVES)
    optimizer: str = "adam"  # "adam" (weight_decay: an L2 term in the gradient) | "adamw" (decoupled weight decay)
    weight_decay: float = 0.0

    @classmethod
    def coerce(cls, config) -> "TrainerConfig":
        """A TrainerConfig from a TrainerConfig, a dict of its keys or None; unknown keys are errors."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return dataclasses.replace(config)
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict or TrainerConfig, got {type(config).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**config)

    def __post_init__(self):
        for name, check in _CONFIG_CHECKS.items():
            setattr(self, name, check(name, getattr(self, name)))
        if self.fsdp:  # every rank must make the same number of (collective) model calls
            if self.sampler_method not in FIXED_STEP_METHODS:
                raise ConfigError("sampler_method", f"a fixed-step method {FIXED_STEP_METHODS} with fsdp=True",
                                  self.sampler_method)
            if self.cuda_graph is True:
                raise ConfigError("cuda_graph", "'auto' or False with fsdp=True (sharded models are not graph-captured)",
                                  self.cuda_graph)
            if self.precision == "fp16":
                raise ConfigError("precision", "'fp32' or 'bf16' with fsdp=True (no sharded GradScaler)", self.precision)


_CONFIG_CHECKS = {
    "learning_rate": _real(0, above=True), "warmup_steps": _integer(0), "w2_coefficient": _real(0),
    "temperature": _real(), "grad_clip": _real(0), "batch_size": _integer(1), "use_wandb": _boolean,
    "wandb_project": _text(False), "run_name": _text(True), "savedir": _text(False, path=True),
    "ref_path": _text(True, path=True), "text_prompts": _strings, "parallel": _boolean, "image_shape": _image_shape,
    "weighting": _choice(WEIGHTINGS), "coupling": _choice(COUPLINGS), "sigma": _real(0), "sampler_steps": _integer(1),
    "sampler_method": _sampler_method, "sampler_grid": _optional_choice(GRIDS), "cuda_graph": _choice(("auto", True, False)), "refresh_interval": _integer(1),
    "rollout_batches": _integer(1), "rollout_reuse": _integer(1), "diversity_every": _integer(1),
    "precision": _choice(tuple(PRECISIONS)), "compile": _boolean, "channels_last": _boolean,
    "ema_decay": _real(0, below=1), "seed": _integer(0, 2**63 - 2**16), "fsdp": _boolean,
    "clip_model_path": _text(True, path=True), "grid_size": _integer(0), "checkpoint_every": _integer(0),
    "model_config": _mapping, "objective": _choice(OBJECTIVES), "optimizer": _choice(OPTIMIZERS),
    "weight_decay": _real(0),
}
assert set(_CONFIG_CHECKS) == {f.name for f in dataclasses.fields(TrainerConfig)}
