"""ORW-CFM-W2: w_i * mean_d (v_theta - u)^2 + alpha * mean_d (v_theta - v_ref)^2, w from the rewards of the whole
batch (config.weighting, config.temperature; alpha = config.w2_coefficient), in one fused pass."""

from __future__ import annotations

import torch

from orw_fast.metrics import effective_sample_size
from orw_fast.objectives.base import Objective, register
from orw_fast.ops import orw_cfm_w2_loss, reward_weights


@register
class ORWCFMW2(Objective):
    """The default objective. Inputs: the weights w [N] (softmax: normalised over the whole batch); metrics: their
    effective sample size "ess"; parts: "fm_loss" and "w2_loss" (batch means of the two terms)."""

    name = "orw_cfm_w2"
    frozen = ("reference",)

    def sample_inputs(self, rewards, groups):
        cfg = self.config
        return reward_weights(rewards, cfg.temperature, cfg.weighting, validate=False)

    def input_metrics(self, inputs):
        return {"ess": effective_sample_size(inputs)}

    def loss(self, v, u, frozen, inputs, t=None):
        loss, parts = orw_cfm_w2_loss(
            v,
            u,
            frozen["reference"],
            weights=inputs,
            alpha=self.config.w2_coefficient,
            return_components=True,
            validate=False,
        )
        return loss, {"fm_loss": parts.fm.mean(), "w2_loss": parts.w2.mean()}

    def non_finite_causes(self, rewards, inputs):
        cfg = self.config
        if bool(torch.isfinite(inputs).all()):
            return []
        return [
            (
                f"the {cfg.weighting} weights overflow: rewards span [{rewards.min().item():.4g}, "
                f"{rewards.max().item():.4g}] with temperature {cfg.temperature:g}, and exp(temperature * reward) is "
                "inf above 88.7; use weighting='softmax' (finite for any rewards), a smaller temperature, or rescale "
                "the reward"
            )
        ]
