"""Advantage Weighted Matching (Xue et al., arXiv 2509.25050) as an objective: the fused
:func:`orw_fast.ops.awm_loss`, flow matching weighted by the signed advantages, centred per prompt group (an
unconditional model's batch is one group), divided by the whole batch's std (``advantage_std`` None or "batch": the
published configs' global_std) and clipped to ±``advantage_clip`` (adv_clip_max, 5);

- the penalty to the reference with α = ``w2_coefficient`` (the same term as ORW-CFM-W2's W2 penalty; the paper's
  train.beta, kl_weight "Uniform");
- the pull toward the old policy, the policy's EMA, with coefficient ``awm_old_coefficient`` (the paper's ema_beta,
  1). By default (``ema_decay`` unset) the EMA is updated as the reference code (scxue/advantage_weighted_matching,
  scripts/train_sd3_awm.py) updates its "ema" adapter: once per sampling epoch, i.e. at every last-policy refresh,
  EMA <- d EMA + (1 - d) policy with d = min(``old_policy_decay_rate`` * s, ``old_policy_decay_max``) (0.001, 0.3: its
  kl_ema_decay_type "linear" and kl_ema_decay) after s updates of the policy. A given ``ema_decay`` > 0 replaces
  that with an update after every step by that decay; 0 is an error while the pull is on.
  ``awm_old_coefficient=0`` drops the pull (no EMA needed).

- ``awm_weighting`` (the reference's train.weighting; default "uniform"; its published configs: "ghuber" with
  ``awm_ghuber_power`` 0.25): each sample's flow-matching term weighted by the detached factor of that weighting,
  from its mse and noise level σ = 1 − t (orw_fast/ops/awm.py);
- ``awm_advantage_max`` (None; the published configs: 1): the clipped advantages rescaled by max / advantage_clip.

The ratio: on-policy (the published configs) the PPO-clipped term's gradient is exactly that of A·f·|v − u|² with
the weighting's factor f, which is what is trained. Not covered (docs/objectives.md): the off-policy ratio and the
reference's choice of trained times (6 strata of the sampler's grid).
"""

from __future__ import annotations

from orw_fast.objectives.base import Objective, register
from orw_fast.ops import awm_loss


@register
class AWM(Objective):
    """Inputs: the advantages A [N]; metrics: "positive_fraction" (of A > 0); parts: "policy_loss" and "w2_loss"
    (batch means)."""

    name = "awm"
    frozen = ("reference", "ema")
    grouped = True
    advantage_std = "batch"
    old_policy_decay_max = 0.3  # kl_ema_decay of scxue/advantage_weighted_matching's config/dgx_awm.py

    def __init__(self, config):
        super().__init__(config)
        self.frozen = ("reference", "ema") if config.awm_old_coefficient > 0 else ("reference",)
        self.ema_updates = "refresh" if config.ema_decay is None else "step"  # None: the reference code's schedule

    @classmethod
    def check_config(cls, config) -> None:
        from orw_fast.config import ConfigError

        if config.awm_ghuber_power > 1:
            raise ConfigError("awm_ghuber_power", "a number in (0, 1] (ghuber's power p)", config.awm_ghuber_power)
        if config.awm_old_coefficient > 0 and config.ema_decay == 0:
            raise ConfigError(
                "ema_decay",
                f"unset (the AWM code's schedule) or > 0 with objective='awm' and awm_old_coefficient="
                f"{config.awm_old_coefficient:g} (the old policy is the policy's EMA; or set "
                "awm_old_coefficient=0)",
                config.ema_decay,
            )

    def ema_decay(self, step):
        if self.config.ema_decay is None:
            return self.old_policy_decay(step)
        return self.config.ema_decay

    def sample_inputs(self, rewards, groups):
        advantages = self.advantages(rewards, groups)
        if self.config.awm_advantage_max is not None:
            advantages = advantages * (self.config.awm_advantage_max / self.config.advantage_clip)
        return advantages

    def input_metrics(self, inputs):
        return {"positive_fraction": (inputs > 0).float().mean()}

    def loss(self, v, u, frozen, inputs, t=None):
        cfg = self.config
        sigma = None
        if cfg.awm_weighting != "uniform":
            if t is None:
                raise ValueError(
                    f"awm_weighting={cfg.awm_weighting!r} needs the path times t of the samples (pass t=...)"
                )
            sigma = 1 - t.detach().reshape(-1)
        loss, parts = awm_loss(
            v,
            u,
            frozen["reference"],
            inputs,
            alpha=cfg.w2_coefficient,
            v_old=frozen.get("ema"),
            alpha_old=cfg.awm_old_coefficient if "ema" in frozen else 0.0,
            weighting=cfg.awm_weighting,
            sigma=sigma,
            ghuber_power=cfg.awm_ghuber_power,
            return_components=True,
            validate=False,
        )
        return loss, {"policy_loss": parts.policy.mean(), "w2_loss": parts.kl.mean()}
