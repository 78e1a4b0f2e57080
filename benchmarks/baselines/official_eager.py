"""Speed baseline: an eager re-implementation of the official ORW-CFM-W2 training step
(markerthu/orw-cfm, ``finetune_fm.py``), written for this project from the paper and that code's structure.

It does the official step's work, in the official way:

- everything in fp32, eager: no autocast, no CUDA graph, no torch.compile, no fused kernels;
- rollout: the last policy (eval mode) integrated from x0 ~ N(0, I) over t in [0, 1] by a plain Python
  Euler loop of ``sampler_steps`` steps (the official script samples through torchcfm's
  ``generate_samples``; here Euler with the same number of model calls as orw_fast's sampler, so the two
  are compared at equal work);
- reward of the samples, weights ``w = exp(tau * r)``;
- torchcfm's ``ExactOptimalTransportConditionalFlowMatcher(sigma=0)``: fresh noise, the exact OT plan solved
  by POT on the CPU, (x0, x1) pairs drawn from the plan *with replacement* (numpy's global RNG);
- the reference evaluated as the official code does, ``ref_model(t, xt).detach()`` with autograd on (the
  reference is a deep copy whose parameters still require grad, so its forward records a graph that is
  then dropped);
- eager loss ``mean_i(w_i * mean_d (v - u)^2 + alpha * mean_d (v - v_ref)^2)``, backward, gradient-norm
  clipping, Adam, the official linear warm-up schedule, and the official metrics (``.item()`` host syncs).

Pairing of weights and samples: the official code computes ``w`` in rollout order and hands it to
``compute_loss`` next to ``x1``, but the exact-OT matcher returns x1 resampled from the OT plan (with
replacement: some samples twice, some not at all), so ``w_i`` multiplies the loss of another sample. This
baseline keeps the official compute path (same OT solve, same resampling) and carries the weights through the
same resampling with the matcher's ``guided_sample_location_and_conditional_flow(x0, x1, y1=w)``, which
indexes them with the same draw: the pairing is right and the cost is one extra [B] gather, so the speed is
the official code's. (orw_fast's couplings keep every x1 once, with its own weight.) ``pair_weights=False`` runs the
step exactly as published instead: the weights stay in rollout order while the matcher resamples x1.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher


@torch.no_grad()
def euler_rollout(model, x0: torch.Tensor, steps: int) -> torch.Tensor:
    """x1 from x0 by ``steps`` Euler steps of dx/dt = model(t, x), t from 0 to 1, in a plain Python loop."""
    x, dt = x0, 1.0 / steps
    for i in range(steps):
        t = torch.full((x.shape[0],), i * dt, device=x.device, dtype=x.dtype)
        x = x + dt * model(t, x)
    return x


class OfficialEagerTrainer:
    """The official ORWCFMTrainer's step (see the module docstring) with a pluggable reward.

    Args:
        model: the flow model ``model(t, x)``; trained in place (the last policy and the reference are copies).
        reward_fn: images [B, C, H, W] in model space -> rewards [B].
        image_shape: (C, H, W) of one sample.
        The rest are the official config's keys (``temperature`` is tau, ``w2_coefficient`` alpha);
        ``pair_weights``: carry the weights through the OT resampling (True) or leave them as published (False).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        reward_fn: Callable,
        *,
        image_shape,
        device=None,
        batch_size: int = 128,
        learning_rate: float = 2e-4,
        warmup_steps: int = 5000,
        w2_coefficient: float = 1.0,
        temperature: float = 0.5,
        grad_clip: float = 1.0,
        sampler_steps: int = 100,
        pair_weights: bool = True,
    ):
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.net_model = model.to(self.device).train()
        self.last_policy = copy.deepcopy(self.net_model).eval()
        self.ref_model = copy.deepcopy(self.net_model).eval()
        self.reward_fn = reward_fn
        self.image_shape = tuple(image_shape)
        self.batch_size = batch_size
        self.alpha, self.beta, self.grad_clip = w2_coefficient, temperature, grad_clip
        self.sampler_steps = sampler_steps
        self.pair_weights = pair_weights
        self.fm = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
        self.optimizer = torch.optim.Adam(self.net_model.parameters(), lr=learning_rate)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(step, warmup_steps) / warmup_steps if warmup_steps > 0 else 1.0
        )

    @torch.no_grad()
    def rollout(self, batch_size: int | None = None) -> torch.Tensor:
        """Samples of the last policy (eval mode, fp32, eager Euler loop)."""
        self.last_policy.eval()
        x0 = torch.randn((batch_size or self.batch_size, *self.image_shape), device=self.device)
        return euler_rollout(self.last_policy, x0, self.sampler_steps)

    def compute_loss(self, x1: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, dict]:
        x0 = torch.randn_like(x1)
        if self.pair_weights:
            t, xt, ut, _, weights = self.fm.guided_sample_location_and_conditional_flow(x0, x1, y1=weights)
        else:  # as published: x1 is resampled, the weights are not
            t, xt, ut = self.fm.sample_location_and_conditional_flow(x0, x1)
        vt = self.net_model(t, xt)
        vt_ref = self.ref_model(t, xt).detach()
        fm_loss = ((vt - ut) ** 2).mean(dim=tuple(range(1, vt.dim())))
        w2_loss = ((vt - vt_ref) ** 2).mean(dim=tuple(range(1, vt.dim())))
        loss = torch.mean(weights * fm_loss + self.alpha * w2_loss)
        metrics = {"fm_loss": fm_loss.mean().item(), "w2_loss": w2_loss.mean().item(), "total_loss": loss.item()}
        return loss, metrics

    def train_step(self) -> dict:
        """Rollout, reward, exp weights, OT coupling, loss, backward, clip, Adam, schedule; returns metrics."""
        x1 = self.rollout()
        rewards = self.reward_fn(x1)
        weights = torch.exp(self.beta * rewards).to(self.device)
        self.optimizer.zero_grad()
        loss, metrics = self.compute_loss(x1, weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net_model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        metrics.update(reward=rewards.mean().item(), max_reward=rewards.max().item())
        return metrics

    def update_last_policy(self) -> None:
        self.last_policy.load_state_dict(self.net_model.state_dict())
        self.last_policy.eval()
