"""Baseline: Flow-GRPO (Liu et al., "Flow-GRPO: Training Flow Matching Models via Online RL", arXiv 2505.05470;
code github.com/yifan123/flow_grpo) and its Flow-GRPO-Fast variant, written for this project from the paper in eager
PyTorch, independently of orw_fast's trainer and sampler. It runs on any flow field ``model(t, x[, cond])``.

Convention (orw_fast's): t = 0 noise, t = 1 data, ``model(t, x)`` with t of shape [B] returns the velocity v. The paper
and its code use σ = 1 − t (σ = 1 is noise) and an SD3 output ε − x_data = −v; every formula here is converted.

SDE with the ODE's marginals (the paper's, s = 1 − t) on an explicit grid 0 ≤ t_0 < … < t_T ≤ 1, h_i = t_{i+1} − t_i:

    E[x_data | x_t] = x_t + (1 − t)·v,   E[x_noise | x_t] = x_t − t·v,   score = −(x_t − t·v)/(1 − t)
    dx = [v + (σ_t²/2)·score] dt + σ_t dW,   σ_t = a·√((1 − t)/t)   (the paper's a·√(s/(1 − s)))

where t_0 = 0 would divide by zero, t_1 is used in the denominator (as the reference code does with its largest σ < 1).
Euler–Maruyama makes transition i Gaussian: x_{i+1} ~ N(μ_i, (σ_i √h_i)² I), μ_i = x_i + h_i·[v_i + (σ_i²/2)·score_i].

Log-probability of a transition: the Gaussian log-density **averaged over all non-batch dimensions** (constants
included), as the reference code does (``log_prob.mean(dim=1..)``), so ratios and the clip range are per dimension.

Objective per trained transition j of sample i (PPO with GRPO's group-relative advantage):

    A_i = clip((r_i − mean_group(r)) / (std_group(r) + 1e-4), ±adv_clip)        (population std, as np.std)
    ρ_ij = exp(log π_θ(x_{j+1} | x_j) − log π_old(x_{j+1} | x_j))
    loss = mean_ij max(−A_i ρ_ij, −A_i clip(ρ_ij, 1 ± ε_clip)) + β · mean_ij KL_ij
    KL_ij = mean_d (μ_θ − μ_ref)² / (2 (σ_j √h_j)²)   (exact KL of two Gaussians with the same std, per dimension)

π_old is the policy that sampled the batch (this step's policy before its first update), so the first update's ratio
is exactly 1 wherever the model's forward on a minibatch reproduces its rows of the full batch bitwise (as in the CPU
tests; a GPU may pick other kernels for another batch size: ``first_ratio_max_dev`` in the metrics says). The batch
is shuffled and split into ``minibatches``, one optimizer step each (the reference code takes two per sampling epoch),
repeated for ``inner_epochs``. The gradient of a minibatch is accumulated over its trained transitions, each
contributing 1/(number trained), as the reference code's gradient accumulation does.

Flow-GRPO-Fast (the reference code's ``sde_window_size``): one window of ``sde_window`` consecutive steps starting at a
random step in ``sde_window_range`` (default the first half of the grid) is stochastic and trained; the steps before it
and after it are the deterministic Euler ODE, so the stochastic branch leaves an ODE trajectory at a random point.

Differences from the reference code, on purpose: fp32 throughout (it samples in bf16 autocast); the KL divides by the
transition variance σ²h, as the paper's closed form does (the code divides by σ² only, i.e. its β is the paper's β·h);
advantages use the group's std (the paper; the code's configs use the std of the whole batch: ``global_std=True``);
no CFG, no LoRA, no EMA (a flow field is trained in full).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def uniform_grid(steps: int) -> list[float]:
    """The uniform grid t_i = i/steps, i = 0..steps."""
    if steps < 2:
        raise ValueError(f"steps: expected T >= 2 rollout steps, got {steps}")
    return [i / steps for i in range(steps + 1)]


def check_grid(grid: Sequence[float]) -> list[float]:
    """The grid as floats; ValueError unless it has >= 3 points (T >= 2 steps), strictly increasing in [0, 1]."""
    g = [float(t) for t in grid]
    if len(g) < 3:
        raise ValueError(f"grid: expected at least 3 times (T >= 2 steps), got {len(g)}")
    if g[0] < 0 or g[-1] > 1 or any(b <= a for a, b in zip(g, g[1:])):
        raise ValueError(f"grid: expected strictly increasing times in [0, 1], got {g}")
    return g


def sde_sigmas(grid: Sequence[float], noise_level: float) -> list[float]:
    """σ_i = a·√((1 − t_i)/t_i) for each step i of the grid, with t_1 in the denominator where t_i = 0."""
    if not noise_level > 0:
        raise ValueError(f"noise_level: expected a > 0, got {noise_level}")
    return [noise_level * math.sqrt((1 - t) / (t if t > 0 else grid[1])) for t in grid[:-1]]


def sde_mean(v: torch.Tensor, x: torch.Tensor, t: float, h: float, sigma: float) -> torch.Tensor:
    """Mean of the Euler–Maruyama transition from (t, x) over a step h: x + h·[v + (σ²/2)·score],
    score = −(x − t·v)/(1 − t). Requires t < 1."""
    score = (t * v - x) / (1 - t)
    return x + h * (v + 0.5 * sigma**2 * score)


def gaussian_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """log N(x_next; mean, std² I) averaged over all non-batch dimensions: [B, ...] -> [B]."""
    lp = -((x_next - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def gaussian_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: float) -> torch.Tensor:
    """KL(N(mean, std² I) || N(mean_ref, std² I)) averaged over non-batch dimensions: [B, ...] -> [B]."""
    return ((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * std**2)


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, eps: float = 1e-4, global_std: bool = False
) -> torch.Tensor:
    """(r − mean_group)/(std_group + eps) for rewards [B] whose groups are contiguous runs of ``group_size``;
    population std of the group, or of the whole batch with ``global_std``. Returns [B]."""
    n = rewards.shape[0]
    if group_size < 1 or n % group_size:
        raise ValueError(f"group_size: expected a divisor of the batch size {n}, got {group_size}")
    r = rewards.reshape(-1, group_size)
    std = rewards.std(correction=0) if global_std else r.std(dim=1, keepdim=True, correction=0)
    return ((r - r.mean(dim=1, keepdim=True)) / (std + eps)).reshape(n)


def clipped_policy_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate mean_i max(−A ρ, −A clip(ρ, 1 ± clip_range)), ρ = exp(log_prob − old_log_prob);
    all [B]. Returns (loss, ρ)."""
    ratio = torch.exp(log_prob - old_log_prob)
    clipped = ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(-advantages * ratio, -advantages * clipped).mean(), ratio


def velocity(model, t: float, x: torch.Tensor, cond=None) -> torch.Tensor:
    """model(t, x[, cond]) at the scalar time t broadcast to shape [B]."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
    return model(tt, x) if cond is None else model(tt, x, cond)


@dataclass
class SDERollout:
    """A rollout and its K stochastic transitions (in grid order), enough to recompute their log-probabilities.

    x1: [B, *shape] final samples; steps: the grid index i of each recorded transition (t_i -> t_{i+1});
    xs, next_xs, means: [K, B, *shape] x_i, x_{i+1} and the sampling policy's mean; stds: K floats σ_i √h_i;
    log_probs: [K, B] under the sampling policy.
    """

    x1: torch.Tensor
    steps: list[int]
    xs: torch.Tensor
    next_xs: torch.Tensor
    means: torch.Tensor
    stds: list[float]
    log_probs: torch.Tensor


@torch.no_grad()
def sde_rollout(
    model,
    x0: torch.Tensor,
    grid: Sequence[float],
    noise_level: float,
    *,
    sde_steps: Sequence[int] | None = None,
    cond=None,
    generator: torch.Generator | None = None,
) -> SDERollout:
    """Integrate from x0 [B, *shape] at t_0 over ``grid``: Euler–Maruyama on the SDE at the steps in ``sde_steps``
    (all steps when None), Euler on the ODE dx = v dt elsewhere; records the stochastic transitions."""
    grid = check_grid(grid)
    sigmas = sde_sigmas(grid, noise_level)
    n_steps = len(grid) - 1
    stochastic = list(range(n_steps)) if sde_steps is None else sorted(set(sde_steps))
    if not stochastic or stochastic[0] < 0 or stochastic[-1] >= n_steps:
        raise ValueError(f"sde_steps: expected step indices in [0, {n_steps}), got {sde_steps}")
    rec = {"xs": [], "next_xs": [], "means": [], "stds": [], "log_probs": []}
    x = x0
    for i in range(n_steps):
        t, h = grid[i], grid[i + 1] - grid[i]
        v = velocity(model, t, x, cond)
        if i in stochastic:
            mean, std = sde_mean(v, x, t, h, sigmas[i]), sigmas[i] * math.sqrt(h)
            x_next = mean + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            for key, value in zip(rec, (x, x_next, mean, std, gaussian_log_prob(x_next, mean, std))):
                rec[key].append(value)
        else:
            x_next = x + h * v
        x = x_next
    return SDERollout(
        x1=x,
        steps=stochastic,
        xs=torch.stack(rec["xs"]),
        next_xs=torch.stack(rec["next_xs"]),
        means=torch.stack(rec["means"]),
        stds=rec["stds"],
        log_probs=torch.stack(rec["log_probs"]),
    )


@dataclass
class FlowGRPOConfig:
    """Flow-GRPO hyper-parameters. Paper / reference code (SD3.5-M, GenEval/OCR configs) -> ours, and why:

    - batch_size 32 (paper: 48 prompts × 24 images = 1152 per sampling epoch on 32 GPUs): ours run on one device.
    - group_size None = the whole batch (paper G = 24 images per prompt): an unconditional model has one group; for
      conditional tasks use e.g. 8 (4 conditions per batch of 32), a divisor of batch_size.
    - steps T = 10 (paper: 10 for rollouts, 40 for evaluation) and ``grid`` None = uniform (SD3 uses its shifted grid;
      pass it here converted to t = 1 − σ; a given grid sets steps).
    - noise_level a = 0.7 (paper), clip_range 1e-4 (code's ``clip_range``), adv_clip 5 (code's ``adv_clip_max``),
      adv_eps 1e-4 (code), beta β = 0.04 (paper, GenEval/OCR; 0.01 for PickScore), but see the module docstring for
      the KL's normalisation.
    - train_timesteps None = T − 1: the first T − 1 transitions are trained (code: ``timestep_fraction`` 0.99 -> 9 of
      10; the last transition, nearly deterministic, is left out to avoid precision overflow in its log-density).
    - lr 1e-4 (paper 3e-4 for a rank-32 LoRA on SD3.5-M): we train every weight of a small model, so a smaller step;
      AdamW betas (0.9, 0.999), weight_decay 1e-4, eps 1e-8, max_grad_norm 1.0 as the code.
    - minibatches 2, inner_epochs 1: the code takes two optimizer steps per sampling epoch over one pass of the data.
    - global_std False: the group's std (paper); the code's configs use True.
    - sde_window 0 = Flow-GRPO; 1–2 = Flow-GRPO-Fast with a window of that many SDE steps starting uniformly in
      ``sde_window_range`` (default (0, T//2): the window lies in the first half, the code's default).
    """

    batch_size: int = 32
    group_size: int | None = None
    steps: int = 10
    grid: Sequence[float] | None = None
    noise_level: float = 0.7
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    adv_eps: float = 1e-4
    beta: float = 0.04
    train_timesteps: int | None = None
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    minibatches: int = 2
    inner_epochs: int = 1
    global_std: bool = False
    sde_window: int = 0
    sde_window_range: tuple[int, int] | None = None

    def __post_init__(self):
        self.grid = check_grid(self.grid) if self.grid is not None else uniform_grid(self.steps)
        self.steps = len(self.grid) - 1  # a given grid decides T
        sde_sigmas(self.grid, self.noise_level)  # validates the noise level
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {self.batch_size}")
        group = self.batch_size if self.group_size is None else self.group_size
        if group < 1 or self.batch_size % group:
            raise ValueError(f"group_size: expected a divisor of batch_size {self.batch_size}, got {self.group_size}")
        if self.minibatches < 1 or self.batch_size % self.minibatches:
            raise ValueError(f"minibatches: expected a divisor of batch_size {self.batch_size}, got {self.minibatches}")
        if self.inner_epochs < 1:
            raise ValueError(f"inner_epochs: expected >= 1, got {self.inner_epochs}")
        if not self.clip_range > 0:
            raise ValueError(f"clip_range: expected > 0, got {self.clip_range}")
        if self.beta < 0:
            raise ValueError(f"beta: expected >= 0, got {self.beta}")
        if self.sde_window < 0:
            raise ValueError(f"sde_window: expected 0 (Flow-GRPO) or >= 1 SDE steps (Fast), got {self.sde_window}")
        if self.sde_window:
            if self.train_timesteps is not None:
                raise ValueError("train_timesteps: Flow-GRPO-Fast (sde_window > 0) trains its window; leave it None")
            lo, hi = self.sde_window_range or (0, self.steps // 2)
            if not (0 <= lo and lo + self.sde_window <= hi <= self.steps):
                raise ValueError(
                    f"sde_window_range: expected 0 <= lo, lo + sde_window <= hi <= steps {self.steps}, "
                    f"got {(lo, hi)} with sde_window {self.sde_window}"
                )
            self.sde_window_range = (lo, hi)
        else:
            if self.train_timesteps is None:
                self.train_timesteps = self.steps - 1
            if not 1 <= self.train_timesteps <= self.steps:
                raise ValueError(f"train_timesteps: expected 1 to steps {self.steps}, got {self.train_timesteps}")


class FlowGRPOTrainer:
    """Flow-GRPO (or -Fast) on a flow field, one rollout batch per ``train_step()``.

    Args:
        model: ``model(t, x[, cond])`` -> velocity, our convention; trained in place (the reference is a frozen copy).
        reward_fn: ``reward_fn(x1)`` -> [B] (unconditional) or ``reward_fn(x1, cond)`` with ``condition_fn``.
        sample_shape: shape of one sample (C, H, W) or (D,).
        config: FlowGRPOConfig.
        condition_fn: ``condition_fn(n)`` -> n conditions (a tensor with leading dim n), one per group; each is
            repeated group_size times. None for an unconditional model (then the batch is one group).
        device: where to run (default: the model's); seed: seeds the noise, window and shuffling draws.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        reward_fn: Callable,
        *,
        sample_shape: Sequence[int],
        config: FlowGRPOConfig | None = None,
        condition_fn: Callable | None = None,
        device=None,
        seed: int = 0,
    ):
        self.config = config = config or FlowGRPOConfig()
        self.group_size = config.batch_size if config.group_size is None else config.group_size
        if condition_fn is None and self.group_size != config.batch_size:
            raise ValueError(
                f"group_size: an unconditional model has one group, the whole batch; expected None or "
                f"batch_size {config.batch_size}, got {config.group_size}"
            )
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        self.ref_model = None
        if config.beta > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.reward_fn, self.condition_fn = reward_fn, condition_fn
        self.sample_shape = tuple(sample_shape)
        self.sigmas = sde_sigmas(config.grid, config.noise_level)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=config.lr,
            betas=config.betas,
            weight_decay=config.weight_decay,
            eps=config.adam_eps,
        )
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.cpu_generator = torch.Generator().manual_seed(seed)

    def sde_steps(self) -> list[int]:
        """The stochastic steps of the next rollout: all (Flow-GRPO) or a random window (Flow-GRPO-Fast)."""
        c = self.config
        if not c.sde_window:
            return list(range(c.steps))
        lo, hi = c.sde_window_range
        start = int(torch.randint(lo, hi - c.sde_window + 1, (), generator=self.cpu_generator))
        return list(range(start, start + c.sde_window))

    def rollout(self) -> tuple[SDERollout, torch.Tensor | None]:
        """One batch from the current policy (eval mode, no grad) and its conditions (None if unconditional)."""
        c = self.config
        cond = None
        if self.condition_fn is not None:
            cond = self.condition_fn(c.batch_size // self.group_size).to(self.device)
            cond = cond.repeat_interleave(self.group_size, dim=0)
        x0 = torch.randn((c.batch_size, *self.sample_shape), generator=self.generator, device=self.device)
        self.model.eval()
        return sde_rollout(
            self.model, x0, c.grid, c.noise_level, sde_steps=self.sde_steps(), cond=cond, generator=self.generator
        ), cond

    def _mean(self, model, ro: SDERollout, k: int, idx: torch.Tensor, cond) -> torch.Tensor:
        """The mean of recorded transition k under ``model`` for the samples ``idx``."""
        i = ro.steps[k]
        t, h = self.config.grid[i], self.config.grid[i + 1] - self.config.grid[i]
        x = ro.xs[k, idx]
        v = velocity(model, t, x, None if cond is None else cond[idx])
        return sde_mean(v, x, t, h, self.sigmas[i])

    def train_step(self) -> dict:
        """Rollout, rewards, advantages, then minibatches × inner_epochs clipped-PPO updates; returns metrics."""
        c = self.config
        start = time.perf_counter()
        ro, cond = self.rollout()
        rewards = self.reward_fn(ro.x1) if cond is None else self.reward_fn(ro.x1, cond)
        rewards = torch.as_tensor(rewards, device=self.device, dtype=torch.float32)
        if rewards.shape != (c.batch_size,) or not torch.isfinite(rewards).all():
            raise ValueError(f"reward_fn: expected {c.batch_size} finite rewards, got shape {tuple(rewards.shape)}")
        adv = group_advantages(rewards, self.group_size, eps=c.adv_eps, global_std=c.global_std)
        adv = adv.clamp(-c.adv_clip, c.adv_clip)
        trained = range(len(ro.steps)) if c.sde_window else range(c.train_timesteps)
        sums = dict.fromkeys(("loss", "policy_loss", "kl", "clip_fraction", "approx_kl"), 0.0)
        first_dev, n_terms = 0.0, 0
        self.model.train()
        for _ in range(c.inner_epochs):
            perm = torch.randperm(c.batch_size, generator=self.cpu_generator).to(self.device)
            for idx in perm.chunk(c.minibatches):
                self.optimizer.zero_grad(set_to_none=True)
                for k in trained:
                    mean = self._mean(self.model, ro, k, idx, cond)
                    log_prob = gaussian_log_prob(ro.next_xs[k, idx], mean, ro.stds[k])
                    policy_loss, ratio = clipped_policy_loss(log_prob, ro.log_probs[k, idx], adv[idx], c.clip_range)
                    kl = torch.zeros((), device=self.device)
                    if self.ref_model is not None:
                        with torch.no_grad():
                            mean_ref = self._mean(self.ref_model, ro, k, idx, cond)
                        kl = gaussian_kl(mean, mean_ref, ro.stds[k]).mean()
                    loss = policy_loss + c.beta * kl
                    (loss / len(trained)).backward()
                    with torch.no_grad():
                        if n_terms < len(trained):  # the first update: the policy is still the sampling policy
                            first_dev = max(first_dev, (ratio - 1).abs().max().item())
                        for key, value in (
                            ("loss", loss),
                            ("policy_loss", policy_loss),
                            ("kl", kl),
                            ("clip_fraction", ((ratio - 1).abs() > c.clip_range).float().mean()),
                            ("approx_kl", 0.5 * ((log_prob - ro.log_probs[k, idx]) ** 2).mean()),
                        ):
                            sums[key] += value.item()
                    n_terms += 1
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
                self.optimizer.step()
        metrics = {key: value / n_terms for key, value in sums.items()}
        metrics.update(
            reward_mean=rewards.mean().item(),
            reward_std=rewards.std(correction=0).item(),
            first_ratio_max_dev=first_dev,
            trained_steps=[ro.steps[k] for k in trained],
            seconds=time.perf_counter() - start,
        )
        return metrics
