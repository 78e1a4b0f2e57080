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
from orw_fast.ops.awm import WEIGHTINGS as AWM_WEIGHTINGS
from orw_fast.ops.reward_weights import check_real
from orw_fast.sampling import FIXED_STEP_METHODS, GRIDS, check_method, min_steps

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
            raise ConfigError(
                key, f"a finite number{bounds} in float32's range (the kernels compute in it)", value
            ) from None
        if (minimum is not None and (number <= minimum if above else number < minimum)) or (
            below is not None and number >= below
        ):
            raise ConfigError(key, f"a finite number{bounds}", value)
        return number

    check.limits = {"minimum": minimum, "above": above, "below": below}
    return check


def _optional(check):
    """``check``, or None (a setting left to a default that depends on others, resolved in __post_init__)."""

    def optional(key, value):
        return None if value is None else check(key, value)

    if hasattr(check, "limits"):
        optional.limits = check.limits
    return optional


def _integer(minimum, maximum=None):
    def check(key, value):
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Integral)
            or value < minimum
            or (maximum is not None and value > maximum)
        ):
            raise ConfigError(
                key, f"an integer >= {minimum}" + ("" if maximum is None else f" and <= {maximum}"), value
            )
        return int(value)

    check.limits = {"minimum": minimum, "maximum": maximum}
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

    check.choices = tuple(options)
    return check


def _optional_choice(options):
    def check(key, value):
        if value is not None and (not isinstance(value, str) or value not in options):
            raise ConfigError(key, f"None or one of {tuple(options)}", value)
        return value

    check.choices = tuple(options)
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
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, (list, tuple, torch.Size))
        or not value
        or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in value)
    ):
        raise ConfigError(key, "None or the shape of one sample, e.g. (C, H, W), of positive integers", value)
    return tuple(int(d) for d in value)


def _strings(key, value):
    if value is not None and (
        isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value)
    ):
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


def option(default, check, help: str = "", *, cli: bool = True):
    """A TrainerConfig field: its default, its checker (run on every value) and its help; ``cli=False`` keeps it off
    the command line (``orw-fast finetune`` makes a flag of every other field)."""
    return dataclasses.field(default=default, metadata={"check": check, "help": help, "cli": cli})


@dataclasses.dataclass
class TrainerConfig:
    """Settings of :class:`ORWCFMTrainer`. The first block has the official code's keys and meaning. Every value
    is checked (type included: ``True`` is not a batch size, ``"no"`` is not False); a bad one raises
    :class:`ConfigError` naming its key. Each field is declared once, with :func:`option`."""

    learning_rate: float = option(2e-4, _real(0, above=True), "learning rate (after the warm-up)")
    warmup_steps: int = option(0, _integer(0), "linear learning-rate warm-up over this many steps")
    w2_coefficient: float = option(1.0, _real(0), "alpha, the W2 coefficient (pull toward the reference)")
    temperature: float = option(1.0, _real(), "tau, the reward temperature of the weights")
    grad_clip: float = option(1.0, _real(0), "max gradient norm (0: no clipping)")
    batch_size: int = option(64, _integer(1), "the whole batch; under torchrun split evenly over the processes")
    use_wandb: bool = option(False, _boolean, "log to Weights & Biases")
    wandb_project: str = option("orw_fast", _text(False), "wandb project")
    run_name: str | None = option(None, _text(True), "wandb run name")
    savedir: str = option(
        "runs/orw", _text(False, path=True), "output folder: checkpoints, metrics.jsonl, sample grids, config.yaml"
    )
    ref_path: str | None = option(None, _text(True, path=True), "reference weights (default: the pre-trained model)")
    text_prompts: list[str] | None = option(None, _strings, "CLIP reward prompts (needs clip_model_path)", cli=False)
    parallel: bool = option(
        False,
        _boolean,
        "the official code's DataParallel switch; orw_fast runs one process per GPU (torchrun)",
        cli=False,
    )
    # orw_fast options
    image_shape: tuple[int, ...] | None = option(
        None, _image_shape, "[C, H, W]; inferred from torchcfm UNets", cli=False
    )
    weighting: str = option(
        "softmax", _choice(WEIGHTINGS), "reward weights: B softmax(tau r) (mean 1), exp(tau r) (the paper's) or none"
    )
    coupling: str = option(
        "independent", _choice(COUPLINGS), "noise paired with each rollout: fresh, OT-permuted, or the rollout's own"
    )
    sigma: float = option(0.0, _real(0), "path noise")
    times_per_sample: int = option(
        1,
        _integer(1),
        "path times each sample is trained at in one update, stratified over [0, 1) (1: one t ~ U(0, 1); the AWM "
        "code trains 6, the DiffusionNFT code 9, on their samplers' grids)",
    )
    # Unset: the model family's rollout (FlowModel.rollout_method / rollout_steps / rollout_grid), chosen end to end
    # by benchmarks/bench_time_to_target.py (pixel models: ab3, 9 steps on the both_dense grid, 10 model calls)
    sampler_steps: int | None = option(
        None,
        _optional(_integer(1)),
        "rollout steps (unset: the model's; set it whenever sampler_method is set)",
    )
    sampler_method: str | None = option(
        None,
        _optional(_sampler_method),
        f"rollout solver: one of {', '.join(FIXED_STEP_METHODS)} or a torchdiffeq method (unset: the model's)",
    )
    sampler_grid: str | None = option(None, _optional_choice(GRIDS), "rollout time grid (unset: the model's)")
    cuda_graph: str | bool = option("auto", _choice(("auto", True, False)), "capture the rollouts in CUDA graphs")
    refresh_interval: int = option(1, _integer(1), "epochs between last-policy refreshes")
    rollout_batches: int = option(1, _integer(1), "make the rollouts of this many steps in one sampler call")
    rollout_reuse: int = option(
        1, _integer(1), "use each rollout in this many updates (1: a fresh rollout per sample and step)"
    )
    precision: str = option("fp32", _choice(tuple(PRECISIONS)), "autocast dtype (fp16 with a GradScaler)")
    compile: bool = option(False, _boolean, "torch.compile the policy's forward")
    rollout_compile: bool = option(
        False,
        _boolean,
        "torch.compile the last policy's forward for the rollouts: compiled once, not again at refreshes (the "
        "weights are copied in place); pays on the CPU once the compile time is spent (benchmarks/"
        "bench_frozen_policy.py)",
    )
    channels_last: bool = option(False, _boolean, "channels-last memory format for the policy")
    ema_decay: float | None = option(
        None,
        _optional(_real(0, below=1)),
        "decay of an EMA of the policy, updated after every step (0 or unset: none; nft and awm keep their old "
        "policy's EMA on their papers' schedule, old_policy_decay_rate/max, awm with ema_decay unset only)",
    )
    seed: int = option(0, _integer(0, 2**63 - 2**16), "random seed (rank r draws from seed + r)")
    fsdp: bool = option(
        False, _boolean, "under torchrun: shard the policy and its frozen copies with FSDP2 instead of DDP replicas"
    )
    clip_model_path: str | None = option(
        None, _text(True, path=True), "CLIP model of the text_prompts reward", cli=False
    )
    grid_size: int = option(64, _integer(0), "samples in the per-epoch grid (0: no grids)")
    diversity_every: int = option(
        10, _integer(1), "steps between batch-diversity metrics (O(B^2), all-gathered; the first step has one)"
    )
    checkpoint_every: int = option(1, _integer(0), "epochs between checkpoints (0: only at the end)")
    model_config: dict | None = option(
        None, _mapping, "how to rebuild the model (orw_fast.models), kept in checkpoints", cli=False
    )
    objective: str = option("orw_cfm_w2", _choice(OBJECTIVES), "the loss of a step (orw_fast.objectives.OBJECTIVES)")
    optimizer: str = option(
        "adam", _choice(OPTIMIZERS), "adam (weight_decay: an L2 term in the gradient) or adamw (decoupled weight decay)"
    )
    weight_decay: float = option(0.0, _real(0), "weight decay of the optimizer")
    # nft and awm (orw_fast.objectives.nft, .awm; the papers' values as defaults)
    advantage_clip: float = option(
        5.0, _real(0, above=True), "nft/awm: clip of the group-normalised advantages (the papers' adv_clip_max)"
    )
    advantage_std: str | None = option(
        None,
        _optional_choice(("group", "batch")),
        "nft/awm: divide the centred "
        "rewards by the std of their group or of the batch (None: the paper's, nft "
        "group, awm batch)",
    )
    nft_beta: float = option(
        1.0, _real(0, above=True), "nft: beta > 0, how far the implicit policies sit from the old policy"
    )
    nft_adaptive_weight: bool = option(
        True,
        _boolean,
        "nft: the reference code's adaptive weight, each branch's x-prediction error divided by its detached "
        "mean |error| per sample (false: the plain velocity-form loss)",
    )
    awm_old_coefficient: float = option(
        1.0, _real(0), "awm: pull toward the policy's EMA, its old policy (the paper's ema_beta; 0: none)"
    )
    awm_weighting: str = option(
        "uniform",
        _choice(AWM_WEIGHTINGS),
        "awm: the reference code's weighting of each sample's flow-matching term by its mse and noise level 1 - t "
        "(orw_fast.ops.awm; its published configs: ghuber)",
    )
    awm_ghuber_power: float = option(
        0.25, _real(0, above=True), "awm with awm_weighting='ghuber': its power p in (0, 1] (published: 0.25)"
    )
    awm_advantage_max: float | None = option(
        None,
        _optional(_real(0, above=True)),
        "awm: rescale the clipped advantages to [-max, max], i.e. by max / advantage_clip (the published configs' "
        "advantage_max: 1; None: not rescaled)",
    )
    # the old policy of nft and awm: an EMA of the policy decayed at each last-policy refresh by
    # min(rate * steps, max), as NVlabs/DiffusionNFT (decay_type 1: 0.001 * step, at most 0.5) and
    # scxue/advantage_weighted_matching (its "ema" adapter: kl_ema_decay_type "linear", kl_ema_decay 0.3 in
    # config/dgx_awm.py; its train.ema_decay 0.99 is another EMA, kept for evaluation only)
    old_policy_decay_rate: float = option(
        0.001,
        _real(0),
        "nft/awm: at each last-policy refresh the old policy (an EMA) decays by "
        "min(rate * steps, old_policy_decay_max) (both papers' codes: 0.001 * step)",
    )
    old_policy_decay_max: float | None = option(
        None,
        _optional(_real(0, below=1)),
        "nft/awm: the largest decay of the old policy's EMA (None: the paper's, nft 0.5, awm 0.3)",
    )

    @classmethod
    def coerce(cls, config) -> TrainerConfig:
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
        for field in dataclasses.fields(self):
            setattr(self, field.name, field.metadata["check"](field.name, getattr(self, field.name)))
        OBJECTIVES[self.objective].check_config(self)
        if self.sampler_method is not None and self.sampler_steps is None:
            raise ConfigError(
                "sampler_steps",
                f"set with sampler_method={self.sampler_method!r} (the model's default steps belong to its own solver)",
                self.sampler_steps,
            )
        if self.sampler_method in FIXED_STEP_METHODS and self.sampler_steps < min_steps(self.sampler_method):
            raise ConfigError(  # refused here, not at the first rollout after the models are loaded
                "sampler_steps",
                f">= {min_steps(self.sampler_method)} with sampler_method={self.sampler_method!r} (a multistep method "
                "needs a step of its own order between its lower-order first and last steps)",
                self.sampler_steps,
            )
        if self.fsdp:  # every rank must make the same number of (collective) model calls
            if self.sampler_method not in (None, *FIXED_STEP_METHODS):
                raise ConfigError(
                    "sampler_method", f"a fixed-step method {FIXED_STEP_METHODS} with fsdp=True", self.sampler_method
                )
            if self.cuda_graph is True:
                raise ConfigError(
                    "cuda_graph",
                    "'auto' or False with fsdp=True (sharded models are not graph-captured)",
                    self.cuda_graph,
                )
            if self.precision == "fp16":
                raise ConfigError(
                    "precision", "'fp32' or 'bf16' with fsdp=True (no sharded GradScaler)", self.precision
                )
