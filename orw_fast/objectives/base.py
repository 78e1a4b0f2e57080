"""The Objective seam: the loss of one training step, and the registry of objectives by name.

The trainer's step is the same for every objective: rollouts and rewards, ``sample_inputs`` on the whole batch, the
coupling and the path, the policy's velocity (with grad) and the frozen velocities the objective names (without),
then ``loss``. A new objective is one new module that defines an :class:`Objective` subclass decorated with
:func:`register` (and is imported by ``orw_fast.objectives``); it picks its settings from the TrainerConfig.
"""

from __future__ import annotations

from typing import ClassVar

import torch

FROZEN_VELOCITIES = ("reference", "last_policy", "ema")  # the PolicyWeights context managers giving frozen modules
EMA_UPDATES = ("step", "refresh")  # when the trainer updates the EMA: after every step, or at last-policy refreshes


class Objective:
    """The loss of a step. ``frozen``: the velocities it needs besides the policy's, computed without grad at the
    same (t, x_t): "reference" (the pre-trained model, the W2 anchor), "last_policy" (the policy that made the
    rollouts) and/or "ema" (the policy's EMA, kept by the trainer whenever an objective names it, updated with
    :meth:`ema_decay` after every step, or, with ``ema_updates = "refresh"``, whenever the last policy is
    refreshed). ``grouped``: ``sample_inputs`` gets the prompt group of every sample (for advantages per prompt). An
    instance may name fewer frozen velocities than its class (those its settings need)."""

    name: ClassVar[str]
    frozen: ClassVar[tuple[str, ...]] = ()
    grouped: ClassVar[bool] = False
    ema_updates: ClassVar[str] = "step"  # when the EMA is updated: after every "step", or at every "refresh"
    old_policy_decay_max: ClassVar[float] = 0.0  # the paper's largest decay of an EMA old policy (old_policy_decay)
    advantage_std: ClassVar[str] = "group"  # the normaliser of :meth:`advantages` when config.advantage_std is None

    def __init__(self, config):
        """``config``: the trainer's TrainerConfig (already checked, :meth:`check_config` included)."""
        self.config = config

    @classmethod
    def check_config(cls, config) -> None:
        """Raises ConfigError naming the key when ``config``'s settings do not fit this objective (called by
        TrainerConfig once every field is checked)."""

    def ema_decay(self, step: int) -> float:
        """The decay of an EMA update made after ``step`` updates of the policy (1 after the first):
        ``config.ema_decay`` (unset: 0, no EMA) unless the objective schedules its own (its EMA is then its old
        policy, :meth:`old_policy_decay`)."""
        return self.config.ema_decay or 0.0

    def old_policy_decay(self, step: int) -> float:
        """The schedule of an EMA old policy, as NFT's and AWM's codes decay it once per sampling epoch:
        min(``config.old_policy_decay_rate`` * step, ``config.old_policy_decay_max`` or the objective's
        :attr:`old_policy_decay_max`), so it follows the policy closely at first and lags more as training goes on."""
        ceiling = self.config.old_policy_decay_max
        return min(self.config.old_policy_decay_rate * step, self.old_policy_decay_max if ceiling is None else ceiling)

    def sample_inputs(self, rewards: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
        """Per-sample inputs [N] (weights, advantages...) of the whole batch from its rewards [N] (every rank's,
        all-gathered, in rank order) and, when ``grouped``, its prompt-group ids [N] (int64 on the rewards' device,
        equal ids for equal prompts; else None). The same on every rank; each rank then takes its share, which moves
        with its samples under the coupling."""
        raise NotImplementedError

    def advantages(self, rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """:func:`grouped_advantages` of the rewards with ``config.advantage_clip`` and ``config.advantage_std`` (or,
        when that is None, this objective's ``advantage_std``)."""
        cfg = self.config
        return grouped_advantages(rewards, groups, cfg.advantage_clip, cfg.advantage_std or self.advantage_std)

    def input_metrics(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Metrics of the whole batch's inputs [N]: name -> 0-dim tensor on their device (no host sync)."""
        return {}

    def loss(
        self,
        v: torch.Tensor,
        u: torch.Tensor,
        frozen: dict[str, torch.Tensor],
        inputs: torch.Tensor,
        t: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, parts) of this rank's samples: v = v_theta(t, x_t) [B, ...] with grad, u the target [B, ...],
        ``frozen`` name -> velocity [B, ...] (no grad), ``inputs`` this rank's share [B], ``t`` the samples' path
        times [B] at which v was taken (the trainer passes them, by keyword, to every objective; None from a
        caller without them: an objective that needs them raises). The loss is a 0-dim mean
        over the rank's samples (the ranks' gradients are averaged); parts are 0-dim tensors logged as metrics
        (averaged over the ranks)."""
        raise NotImplementedError

    def non_finite_causes(self, rewards: torch.Tensor, inputs: torch.Tensor) -> list[str]:
        """Likely causes, due to the objective's inputs, of a non-finite loss (slow path, for the error message)."""
        return []


OBJECTIVES: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: makes ``cls`` available as ``config.objective = cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Objective)) or not isinstance(getattr(cls, "name", None), str):
        raise TypeError(f"register takes an Objective subclass with a string name, got {cls!r}")
    unknown = sorted(set(cls.frozen) - set(FROZEN_VELOCITIES))
    if unknown:
        raise ValueError(f"{cls.__name__}.frozen must name velocities among {FROZEN_VELOCITIES}, got {unknown}")
    if cls.ema_updates not in EMA_UPDATES:
        raise ValueError(f"{cls.__name__}.ema_updates must be one of {EMA_UPDATES}, got {cls.ema_updates!r}")
    if cls.name in OBJECTIVES and OBJECTIVES[cls.name] is not cls:
        raise ValueError(f"an objective named {cls.name!r} is already registered ({OBJECTIVES[cls.name].__name__})")
    OBJECTIVES[cls.name] = cls
    return cls


def make_objective(name: str, config) -> Objective:
    """The registered objective ``name`` built from ``config``; ValueError naming the choices for another name."""
    if not isinstance(name, str) or name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {tuple(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name](config)


def grouped_advantages(
    rewards: torch.Tensor, groups: torch.Tensor, clip: float, std: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """:func:`orw_fast.ops.group_advantages` (A = (r - mean_g r) / (std + eps), population std of the group (``std=
    "group"``) or of the whole batch ("batch"), 0 in a group of equal rewards, clamped to [-clip, clip]) over groups
    given by ids [N] (int64, each < N, e.g. :func:`group_ids`) instead of consecutive blocks: the groups of a batch
    of randomly drawn prompts need be neither consecutive nor of one size. Float64 inside, float32 out (float64 for
    float64 rewards); no host sync."""
    r, size = rewards.detach().double(), rewards.shape[0]

    def per_group(values, reduce="sum"):
        return r.new_zeros(size).scatter_reduce_(0, groups, values, reduce, include_self=False)

    count = per_group(torch.ones_like(r))
    centred = r - (per_group(r) / count.clamp(min=1))[groups]
    spread = (
        (per_group(centred.square()) / count.clamp(min=1)).sqrt()[groups] if std == "group" else r.std(correction=0)
    )
    constant = per_group(r, "amax")[groups] == per_group(r, "amin")[groups]
    adv = torch.where(constant, torch.zeros_like(r), centred / (spread + eps)).clamp(-clip, clip)
    return adv.to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)


def group_ids(prompts: list | None, size: int) -> torch.Tensor:
    """Prompt-group ids [size] (int64, CPU) numbered by first appearance: equal prompts share an id; without
    prompts (an unconditional model) the whole batch is one group."""
    if prompts is None:
        return torch.zeros(size, dtype=torch.int64)
    if len(prompts) != size:
        raise ValueError(f"prompts must hold {size} prompts, got {len(prompts)}")
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(str(p), len(ids)) for p in prompts], dtype=torch.int64)
