"""DiffusionNFT (Zheng et al., arXiv 2509.16117) as an objective: the fused :func:`orw_fast.ops.nft_loss` with

- r = :func:`~orw_fast.ops.nft_optimality` of the advantages, normalised per prompt group (an unconditional model's
  batch is one group; ``advantage_std`` None or "group": each group's std) and clipped to ±``advantage_clip`` (the
  paper's adv_clip_max, 5);
- v_old the old policy: the policy's EMA, which this objective owns and updates as the reference code updates its
  old adapter (``return_decay``, decay_type 1): once per sampling epoch, i.e. whenever the trainer refreshes the last
  policy (every ``refresh_interval`` epochs), EMA <- d EMA + (1 - d) policy with d =
  min(``old_policy_decay_rate`` * s, ``old_policy_decay_max``) (0.001, 0.5) after s updates of the policy, so it
  follows the policy closely at first and lags more as training goes on;
- β = ``nft_beta`` (the paper's config.beta, 1 for SD3.5; > 0);
- α = ``w2_coefficient``: the velocity penalty to the reference is the same term as ORW-CFM-W2's W2 penalty, so it
  keeps its name and its flag. Its default (1) is ORW-CFM-W2's; the paper's train.beta is 1e-4
  (``--w2-coefficient 1e-4``);
- the reference code's adaptive weight when ``nft_adaptive_weight`` (default): each branch's squared x̂-error
  (1 - t)^2 mean (v± - u)^2 divided by its detached max((1 - t) mean |v± - u|, 1e-5), i.e. ``adaptive_scale = 1 - t``
  from the path times the trainer passes (orw_fast/ops/nft.py; one more read of v, u, v_old per step). Off: the
  plain velocity form.

Where the loss differs from the paper's code (no × adv_clip_max, float32 weights) see docs/objectives.md.
"""

from __future__ import annotations

from orw_fast.objectives.base import Objective, register
from orw_fast.ops import nft_loss, nft_optimality


@register
class NFT(Objective):
    """Inputs: r [N] in [0, 1]; metrics: "positive_fraction" (of r > 1/2); parts: "policy_loss" and "w2_loss"
    (batch means). The trainer's EMA is the old policy: ``ema_decay`` must stay unset or 0 (the objective schedules
    the EMA)."""

    name = "nft"
    frozen = ("reference", "ema")
    grouped = True
    ema_updates = "refresh"
    old_policy_decay_max = 0.5  # NVlabs/DiffusionNFT's return_decay, decay_type 1

    @classmethod
    def check_config(cls, config) -> None:
        from orw_fast.config import ConfigError

        if config.ema_decay:
            raise ConfigError(
                "ema_decay",
                "unset or 0 with objective='nft' (its old policy is the EMA, decayed on the "
                "schedule of old_policy_decay_rate and old_policy_decay_max)",
                config.ema_decay,
            )

    def ema_decay(self, step):
        return self.old_policy_decay(step)

    def sample_inputs(self, rewards, groups):
        return nft_optimality(self.advantages(rewards, groups), self.config.advantage_clip)

    def input_metrics(self, inputs):
        return {"positive_fraction": (inputs > 0.5).float().mean()}

    def loss(self, v, u, frozen, inputs, t=None):
        cfg = self.config
        adaptive_scale = None
        if cfg.nft_adaptive_weight:
            if t is None:
                raise ValueError("nft_adaptive_weight needs the path times t of the samples (pass t=...)")
            adaptive_scale = 1 - t.detach().reshape(-1)
        loss, parts = nft_loss(
            v,
            u,
            frozen["ema"],
            frozen["reference"],
            inputs,
            beta=cfg.nft_beta,
            alpha=cfg.w2_coefficient,
            return_components=True,
            validate=False,
            adaptive_scale=adaptive_scale,
        )
        return loss, {"policy_loss": parts.policy.mean(), "w2_loss": parts.kl.mean()}
