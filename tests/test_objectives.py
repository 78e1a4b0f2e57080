"""The Objective seam: the registry, ORW-CFM-W2 as the default objective, and a new objective (other frozen
velocities, per-prompt-group inputs) trained by the unchanged train_step."""
import math

import pytest
import torch

from orw_fast.config import ConfigError, TrainerConfig
from orw_fast.objectives import OBJECTIVES, ORWCFMW2, Objective, group_ids, make_objective, register
from orw_fast.ops import orw_cfm_w2_loss
from orw_fast.trainer import ORWCFMTrainer

from test_trainer import base_model, fresh, right_reward, toy_config  # noqa: F401 - base_model is a fixture


def test_unknown_objectives_are_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"objective must be one of \('orw_cfm_w2',\), got 'nft'"):
        make_objective("nft", TrainerConfig())
    with pytest.raises(ConfigError, match=r"config.objective must be one of \('orw_cfm_w2',\), got 'nft'") as err:
        TrainerConfig(objective="nft")
    assert err.value.key == "objective"


def test_register_checks_what_it_is_given():
    with pytest.raises(TypeError, match="register takes an Objective subclass"):
        register(object)

    class Bad(Objective):
        name = "bad"
        frozen = ("ema_teacher",)

    with pytest.raises(ValueError, match=r"Bad.frozen must name .* among \('reference', 'last_policy', 'ema'\)"):
        register(Bad)

    class Twin(ORWCFMW2):
        pass

    with pytest.raises(ValueError, match="an objective named 'orw_cfm_w2' is already registered"):
        register(Twin)
    assert "bad" not in OBJECTIVES and OBJECTIVES["orw_cfm_w2"] is ORWCFMW2


def test_orw_cfm_w2_is_the_default_and_calls_the_fused_op():
    config = TrainerConfig(weighting="exp", temperature=0.5, w2_coefficient=0.3)
    objective = make_objective(config.objective, config)
    assert isinstance(objective, ORWCFMW2) and objective.frozen == ("reference",) and not objective.grouped
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(6, generator=g)
    v, u, v_ref = (torch.randn(6, 2, 3, generator=g) for _ in range(3))
    weights = objective.sample_inputs(rewards, None)
    torch.testing.assert_close(weights, (0.5 * rewards).exp())
    loss, parts = objective.loss(v, u, {"reference": v_ref}, weights)
    want, components = orw_cfm_w2_loss(v, u, v_ref, rewards, alpha=0.3, tau=0.5, weighting="exp",
                                       return_components=True)
    torch.testing.assert_close(loss, want)
    assert list(parts) == ["fm_loss", "w2_loss"]
    torch.testing.assert_close(parts["fm_loss"], components.fm.mean())
    assert list(objective.input_metrics(weights)) == ["ess"]
    assert objective.non_finite_causes(rewards, weights) == []
    assert "the exp weights overflow" in objective.non_finite_causes(rewards, weights * math.inf)[0]


def test_group_ids_number_prompts_by_first_appearance():
    assert group_ids(["b", "a", "b", "c", "a"], 5).tolist() == [0, 1, 0, 2, 1]
    assert group_ids(None, 3).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="prompts must hold 4 prompts, got 2"):
        group_ids(["a", "b"], 4)


class GroupCentred(Objective):
    """A test objective: flow matching toward the last policy's velocity, weighted by rewards centred per prompt
    group (an advantage), and what the trainer gave it."""

    name = "test_group_centred"
    frozen = ("last_policy",)
    grouped = True
    seen: list = []

    def sample_inputs(self, rewards, groups):
        self.seen.append(("groups", groups.tolist()))
        sums = torch.zeros(int(groups.max()) + 1).index_add_(0, groups, rewards)
        return rewards - (sums / torch.bincount(groups))[groups]

    def loss(self, v, u, frozen, inputs):
        self.seen.append(("frozen", sorted(frozen), frozen["last_policy"].requires_grad))
        fm = ((v - u) ** 2).flatten(1).mean(1)
        pull = ((v - frozen["last_policy"]) ** 2).flatten(1).mean(1)
        return (inputs * fm + pull).mean(), {"pull": pull.mean()}


@pytest.fixture
def group_centred():
    register(GroupCentred)
    GroupCentred.seen = []
    yield GroupCentred
    del OBJECTIVES[GroupCentred.name]


def test_a_new_objective_trains_through_the_same_step(tmp_path, base_model, group_centred):
    trainer = ORWCFMTrainer(fresh(base_model), toy_config(tmp_path, batch_size=8, objective=group_centred.name),
                            "cpu", reward_fn=right_reward, callbacks=[])
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.train_step()
    assert list(metrics)[:3] == ["step", "loss", "pull"] and "ess" not in metrics and "fm_loss" not in metrics
    assert math.isfinite(metrics["loss"]) and metrics["pull"] == 0.0  # the last policy is still the policy
    assert group_centred.seen == [("groups", [0] * 8), ("frozen", ["last_policy"], False)]
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    # a conditional model's batch: the groups are its prompts (gathered from every rank)
    assert trainer._prompt_groups(list("abcabcab")).tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
