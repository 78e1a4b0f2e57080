"""The Objective seam: the registry, ORW-CFM-W2 as the default objective, and a new objective (other frozen
velocities, per-prompt-group inputs) trained by the unchanged train_step."""

import dataclasses
import math

import pytest
import torch
from test_trainer import base_model, fresh, right_reward, toy_config  # noqa: F401 - base_model is a fixture

from orw_fast.config import ConfigError, TrainerConfig
from orw_fast.objectives import (
    OBJECTIVES,
    ORWCFMW2,
    Objective,
    group_ids,
    grouped_advantages,
    make_objective,
    register,
)
from orw_fast.ops import awm_loss, group_advantages, nft_loss, nft_optimality, orw_cfm_w2_loss
from orw_fast.trainer import ORWCFMTrainer


def test_unknown_objectives_are_refused_naming_the_choices():
    choices = r"\('awm', 'nft', 'orw_cfm_w2'\)"
    with pytest.raises(ValueError, match=rf"objective must be one of {choices}, got 'ppo'"):
        make_objective("ppo", TrainerConfig())
    with pytest.raises(ConfigError, match=rf"config.objective must be one of {choices}, got 'ppo'") as err:
        TrainerConfig(objective="ppo")
    assert err.value.key == "objective"


def test_register_checks_what_it_is_given():
    with pytest.raises(TypeError, match="register takes an Objective subclass"):
        register(object)

    class Bad(Objective):
        name = "bad"
        frozen = ("ema_teacher",)

    with pytest.raises(ValueError, match=r"Bad.frozen must name .* among \('reference', 'last_policy', 'ema'\)"):
        register(Bad)

    class Sometimes(Objective):
        name = "sometimes"
        ema_updates = "epoch"

    with pytest.raises(ValueError, match=r"Sometimes.ema_updates must be one of \('step', 'refresh'\), got 'epoch'"):
        register(Sometimes)

    class Twin(ORWCFMW2):
        pass

    with pytest.raises(ValueError, match="an objective named 'orw_cfm_w2' is already registered"):
        register(Twin)
    assert "bad" not in OBJECTIVES and "sometimes" not in OBJECTIVES and OBJECTIVES["orw_cfm_w2"] is ORWCFMW2


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
    want, components = orw_cfm_w2_loss(
        v, u, v_ref, rewards, alpha=0.3, tau=0.5, weighting="exp", return_components=True
    )
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

    def loss(self, v, u, frozen, inputs, t=None):
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
    trainer = ORWCFMTrainer(
        fresh(base_model),
        toy_config(tmp_path, batch_size=8, objective=group_centred.name),
        "cpu",
        reward_fn=right_reward,
        callbacks=[],
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.train_step()
    assert list(metrics)[:3] == ["step", "loss", "pull"] and "ess" not in metrics and "fm_loss" not in metrics
    assert math.isfinite(metrics["loss"]) and metrics["pull"] == 0.0  # the last policy is still the policy
    assert group_centred.seen == [("groups", [0] * 8), ("frozen", ["last_policy"], False)]
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    # a conditional model's batch: the groups are its prompts (gathered from every rank)
    assert trainer._prompt_groups(list("abcabcab")).tolist() == [0, 1, 2, 0, 1, 2, 0, 1]


def test_times_per_sample_trains_every_sample_at_stratified_times(tmp_path, base_model, group_centred):
    """times_per_sample = k: each rollout's row is repeated k times (the same x0, x1 and input) at one path time from
    each stratum [j/k, (j+1)/k), and the objective's loss is one mean over the k x B rows."""
    seen = []

    class Recording(group_centred):
        def loss(self, v, u, frozen, inputs, t=None):
            seen.append((u.detach().clone(), inputs.clone(), t.clone()))
            return super().loss(v, u, frozen, inputs, t)

    config = toy_config(tmp_path, batch_size=8, objective=group_centred.name, times_per_sample=3)
    trainer = ORWCFMTrainer(fresh(base_model), config, "cpu", reward_fn=right_reward, callbacks=[])
    trainer.objective = Recording(trainer.config)
    assert math.isfinite(trainer.train_step()["loss"])
    ((u, inputs, t),) = seen
    assert u.shape == (24, 2) and inputs.shape == t.shape == (24,)
    u, inputs, t = u.reshape(8, 3, 2), inputs.reshape(8, 3), t.reshape(8, 3)
    assert torch.equal(u, u[:, :1].expand_as(u)) and torch.equal(inputs, inputs[:, :1].expand_as(inputs))
    assert len(set(u[:, 0, 0].tolist())) == 8  # 8 different samples
    strata = torch.arange(3) / 3
    assert ((t >= strata) & (t < strata + 1 / 3)).all()


# -- DiffusionNFT and AWM ------------------------------------------------------------------------------------------

PAPER_OBJECTIVES = {"nft": {}, "awm": {}}  # their defaults: the old policy an EMA on the reference code's schedule


def paper_trainer(tmp_path, base_model, objective, reward_fn=right_reward, **overrides):
    config = toy_config(tmp_path, objective=objective, **{**PAPER_OBJECTIVES[objective], **overrides})
    return ORWCFMTrainer(fresh(base_model), config, "cpu", reward_fn=reward_fn, callbacks=[])


def test_grouped_advantages_are_the_ops_advantages_for_groups_in_any_order_and_of_any_size():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(12, generator=g)
    blocks = torch.arange(12) // 4
    torch.testing.assert_close(grouped_advantages(rewards, blocks, 1.5), group_advantages(rewards, 4, clip=1.5))
    torch.testing.assert_close(
        grouped_advantages(rewards, blocks, 1.5, "batch"), group_advantages(rewards, 4, clip=1.5, std="batch")
    )
    order = torch.randperm(12, generator=g)  # the same groups, shuffled: each sample keeps its advantage
    torch.testing.assert_close(
        grouped_advantages(rewards[order], blocks[order], 1.5), group_advantages(rewards, 4, clip=1.5)[order]
    )
    ids = torch.tensor([0, 1, 0, 0, 2, 1, 0])  # sizes 4, 2, 1; a group of one has advantage 0
    rewards = torch.tensor([1.0, 5.0, 2.0, 3.0, 7.0, 6.0, 4.0], dtype=torch.float64)
    got = grouped_advantages(rewards, ids, 5.0)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got[[0, 2, 3, 6]], group_advantages(rewards[[0, 2, 3, 6]]))
    torch.testing.assert_close(got[[1, 5]], group_advantages(rewards[[1, 5]]))
    assert got[4] == 0
    assert grouped_advantages(torch.full((5,), 0.1), torch.zeros(5, dtype=torch.int64), 5.0).tolist() == [0.0] * 5


@pytest.mark.parametrize("objective", ["nft", "awm", "awm_published"])
def test_the_reward_rises_on_the_toy(tmp_path, base_model, objective):
    # 5 steps per sampling epoch: nft's old policy moves once per epoch, and the policy at most a bounded way from it
    # the published AWM configs' ghuber weighting and advantages in [-1, 1] (a fifth of the default's) rise more
    # slowly here: 1.0 in 40 steps against 3.2 with the defaults (a higher learning rate does not help): 80 steps
    published = dict(awm_weighting="ghuber", awm_advantage_max=1.0, times_per_sample=6)  # + its 6 trained times
    overrides = published if objective == "awm_published" else {}
    trainer = paper_trainer(tmp_path, base_model, objective.removesuffix("_published"), **overrides)
    history = trainer.train(num_epochs=16 if overrides else 8, steps_per_epoch=5, progress=False)
    first = sum(m["reward_mean"] for m in history[:5]) / 5
    last = sum(m["reward_mean"] for m in history[-5:]) / 5
    assert abs(first) < 1.0 and last > first + 1.0, (first, last)
    assert list(history[0])[1:4] == ["loss", "policy_loss", "w2_loss"]


@torch.no_grad()
def mean_velocity_gap(trainer):
    """mean (v_policy - v_ref)^2 on fixed points (t, x)."""
    g = torch.Generator().manual_seed(1)
    t, x = torch.rand(512, generator=g), torch.randn(512, 2, generator=g) * 2
    return (trainer.model(t, x) - trainer.reference(t, x)).pow(2).mean().item()


@pytest.mark.parametrize("objective", ["nft", "awm"])
def test_the_velocity_penalty_holds_the_policy_near_the_reference(tmp_path, base_model, objective):
    gaps = {}
    for alpha in (0.0, 30.0):
        trainer = paper_trainer(tmp_path / str(alpha), base_model, objective, w2_coefficient=alpha)
        trainer.train(num_epochs=2, steps_per_epoch=10, progress=False)
        gaps[alpha] = mean_velocity_gap(trainer)
    assert gaps[30.0] < 0.3 * gaps[0.0], gaps


@pytest.mark.parametrize("objective", ["nft", "awm"])
def test_a_constant_reward_gives_zero_advantage_and_a_finite_step(tmp_path, base_model, objective):
    trainer = paper_trainer(tmp_path, base_model, objective, reward_fn=lambda x: torch.full((x.shape[0],), 0.3))
    inputs = trainer.objective.sample_inputs(torch.full((8,), 0.3), torch.zeros(8, dtype=torch.int64))
    assert inputs.tolist() == ([0.5] * 8 if objective == "nft" else [0.0] * 8)  # r = 1/2: as likely good as bad
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.train_step()
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert trainer.step == 1 and all(torch.isfinite(p).all() for p in trainer.model.parameters())
    if objective == "awm":  # A = 0 and the EMA is the policy: only the (zero) pull to the reference is left
        assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_nft_turns_advantages_into_optimality_and_calls_the_fused_op():
    config = TrainerConfig(objective="nft", nft_beta=0.3, w2_coefficient=0.2, advantage_clip=2.0)
    objective = make_objective("nft", config)
    assert objective.frozen == ("reference", "ema") and objective.grouped
    g = torch.Generator().manual_seed(0)
    rewards, groups = torch.randn(8, generator=g), torch.tensor([0, 1] * 4)
    r = objective.sample_inputs(rewards, groups)
    torch.testing.assert_close(r, nft_optimality(grouped_advantages(rewards, groups, 2.0), 2.0))
    assert 0 <= r.min() < 0.5 < r.max() <= 1
    v, u, v_old, v_ref = (torch.randn(8, 3, generator=g) for _ in range(4))
    t, frozen = torch.rand(8, generator=g), {"reference": v_ref, "ema": v_old}
    loss, parts = objective.loss(v, u, frozen, r, t=t)  # the paper's adaptive weight by default, from s = 1 - t
    want = nft_loss(v, u, v_old, v_ref, r, beta=0.3, alpha=0.2, backend="eager", adaptive_scale=1 - t)
    torch.testing.assert_close(loss, want)
    assert list(parts) == ["policy_loss", "w2_loss"]
    with pytest.raises(ValueError, match="nft_adaptive_weight needs the path times t"):
        objective.loss(v, u, frozen, r)
    plain_config = TrainerConfig(
        objective="nft", nft_beta=0.3, w2_coefficient=0.2, advantage_clip=2.0, nft_adaptive_weight=False
    )
    plain = make_objective("nft", plain_config)
    torch.testing.assert_close(
        plain.loss(v, u, frozen, r, t=t)[0], nft_loss(v, u, v_old, v_ref, r, beta=0.3, alpha=0.2, backend="eager")
    )
    # the old policy's EMA decay: the reference code's schedule min(rate * step, max)
    assert [objective.ema_decay(s) for s in (0, 100, 499, 500, 10**6)] == pytest.approx([0, 0.1, 0.499, 0.5, 0.5])


def test_awm_weights_flow_matching_by_signed_advantages_and_pulls_toward_the_ema():
    config = TrainerConfig(objective="awm", ema_decay=0.9, w2_coefficient=0.2, awm_old_coefficient=0.7)
    objective = make_objective("awm", config)
    assert objective.frozen == ("reference", "ema") and objective.grouped
    g = torch.Generator().manual_seed(0)
    rewards, groups = torch.randn(8, generator=g), torch.tensor([0, 1] * 4)
    adv = objective.sample_inputs(rewards, groups)  # the published configs' global_std: the batch's std
    torch.testing.assert_close(adv, grouped_advantages(rewards, groups, 5.0, "batch"))
    per_group = TrainerConfig(objective="awm", ema_decay=0.9, advantage_std="group")
    torch.testing.assert_close(
        make_objective("awm", per_group).sample_inputs(rewards, groups),
        grouped_advantages(rewards, groups, 5.0, "group"),
    )
    v, u, v_old, v_ref = (torch.randn(8, 3, generator=g) for _ in range(4))
    loss, _ = objective.loss(v, u, {"reference": v_ref, "ema": v_old}, adv)
    torch.testing.assert_close(loss, awm_loss(v, u, v_ref, adv, alpha=0.2, v_old=v_old, alpha_old=0.7, backend="eager"))
    assert objective.ema_updates == "step" and objective.ema_decay(7) == 0.9  # a given ema_decay: every step
    default = make_objective("awm", TrainerConfig(objective="awm", old_policy_decay_rate=0.01))
    assert default.config.ema_decay is None and default.ema_updates == "refresh"  # the AWM code's schedule
    assert [default.ema_decay(s) for s in (0, 10, 29, 30, 10**6)] == pytest.approx([0, 0.1, 0.29, 0.3, 0.3])
    without = make_objective("awm", TrainerConfig(objective="awm", awm_old_coefficient=0.0, w2_coefficient=0.2))
    assert without.frozen == ("reference",)  # no old policy: no EMA needed
    loss, _ = without.loss(v, u, {"reference": v_ref}, adv)
    torch.testing.assert_close(loss, awm_loss(v, u, v_ref, adv, alpha=0.2, backend="eager"))


def test_awm_published_weighting_and_advantage_scale():
    """awm_weighting passes sigma = 1 - t to the op's weighting; awm_advantage_max rescales the clipped advantages
    by max / advantage_clip (the published configs: ghuber p 0.25, advantage_max 1 of adv_clip_max 5)."""
    config = TrainerConfig(
        objective="awm", awm_weighting="ghuber", awm_ghuber_power=0.5, awm_advantage_max=1.0, advantage_clip=4.0
    )
    objective = make_objective("awm", config)
    g = torch.Generator().manual_seed(1)
    rewards, groups = torch.randn(8, generator=g), torch.tensor([0, 1] * 4)
    adv = objective.sample_inputs(rewards, groups)
    torch.testing.assert_close(adv, grouped_advantages(rewards, groups, 4.0, "batch") / 4.0)
    assert adv.abs().max() <= 1.0
    v, u, v_old, v_ref = (torch.randn(8, 3, generator=g) for _ in range(4))
    t = torch.rand(8, generator=g)
    frozen = {"reference": v_ref, "ema": v_old}
    loss, _ = objective.loss(v, u, frozen, adv, t=t)
    want = awm_loss(
        v,
        u,
        v_ref,
        adv,
        alpha=1.0,
        v_old=v_old,
        alpha_old=1.0,
        weighting="ghuber",
        sigma=1 - t,
        ghuber_power=0.5,
        backend="eager",
    )
    torch.testing.assert_close(loss, want)
    with pytest.raises(ValueError, match="awm_weighting='ghuber' needs the path times t"):
        objective.loss(v, u, frozen, adv)


@pytest.mark.parametrize("objective", ["nft", "awm"])
def test_the_old_policy_is_the_ema_updated_at_each_refresh_on_its_schedule(tmp_path, base_model, objective):
    schedule = {"old_policy_decay_rate": 0.25, "old_policy_decay_max": 0.6}
    trainer = paper_trainer(tmp_path, base_model, objective, **schedule)
    assert trainer.ema is not None  # made for the objective although ema_decay is 0 / unset
    for decay in (0.5, 0.6):  # min(0.25 * steps, 0.6) after 2 and 4 steps
        ema = [e.detach().double().clone() for e in trainer.ema.parameters()]
        trainer.train_step()
        trainer.train_step()
        assert all(torch.equal(a, b.float()) for a, b in zip(trainer.ema.parameters(), ema))  # steps leave it
        trainer.refresh_last_policy()  # the end of a sampling epoch
        for got, e, p in zip(trainer.ema.parameters(), ema, trainer.model.parameters()):
            torch.testing.assert_close(
                got.double(), decay * e + (1 - decay) * p.detach().double(), rtol=1e-6, atol=1e-7
            )


@pytest.mark.parametrize("objective", ["nft", "awm"])
def test_resume_continues_exactly(tmp_path, base_model, objective):
    def losses(trainer, epochs):
        return [m["loss"] for m in trainer.train(num_epochs=epochs, steps_per_epoch=3, progress=False)]

    settings = dict(batch_size=16, old_policy_decay_rate=0.2)
    full_run = paper_trainer(tmp_path / "a", base_model, objective, **settings)
    full = losses(full_run, 4)
    first = paper_trainer(tmp_path / "b", base_model, objective, **settings)
    part1 = losses(first, 2)
    first.save_checkpoint(tmp_path / "b" / "interrupted.pt")
    torch.manual_seed(999)
    second = paper_trainer(tmp_path / "c", base_model, objective, **settings)
    second.resume(tmp_path / "b" / "interrupted.pt")
    assert part1 + losses(second, 4) == full
    for module in ("model", "ema", "last_policy"):
        assert all(
            torch.equal(a, b)
            for a, b in zip(getattr(second, module).parameters(), getattr(full_run, module).parameters())
        ), module


def test_settings_an_objective_cannot_use_are_config_errors_naming_the_key():
    cases = [
        (dict(objective="nft", nft_beta=0.0), "nft_beta", r"config.nft_beta must be a finite number > 0, got 0.0"),
        (dict(objective="nft", nft_beta=-1.0), "nft_beta", "a finite number > 0"),
        (dict(objective="nft", advantage_clip=0.0), "advantage_clip", "a finite number > 0"),
        (dict(objective="awm", advantage_std="prompt"), "advantage_std", r"None or one of \('group', 'batch'\)"),
        (dict(objective="nft", old_policy_decay_max=1.0), "old_policy_decay_max", "a finite number >= 0 and < 1"),
        (
            dict(objective="nft", ema_decay=0.9),
            "ema_decay",
            r"must be unset or 0 with objective='nft' \(its old policy is the "
            "EMA",
        ),
        (
            dict(objective="awm", ema_decay=0),
            "ema_decay",
            r"config.ema_decay must be unset \(the AWM code's schedule\) or > 0 with objective='awm' and "
            r"awm_old_coefficient=1 \(the old policy is the policy's EMA; or set "
            r"awm_old_coefficient=0\), got 0.0",
        ),
        (dict(objective="awm", awm_weighting="Uniform"), "awm_weighting", r"one of \('uniform', 't', "),
        (dict(objective="awm", awm_ghuber_power=1.5), "awm_ghuber_power", r"a number in \(0, 1\]"),
        (dict(objective="awm", awm_ghuber_power=0.0), "awm_ghuber_power", "a finite number > 0"),
        (dict(objective="awm", awm_advantage_max=0.0), "awm_advantage_max", "a finite number > 0"),
        (dict(objective="awm", ema_decay=0.9, awm_old_coefficient=-1.0), "awm_old_coefficient", ">= 0"),
    ]
    for settings, key, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            TrainerConfig(**settings)
        assert err.value.key == key
    for objective in OBJECTIVES:  # an unset ema_decay stays unset, so any objective can be swapped in
        assert dataclasses.replace(TrainerConfig(), objective=objective).ema_decay is None
    no_old = make_objective("awm", TrainerConfig(objective="awm", awm_old_coefficient=0.0))
    assert no_old.frozen == ("reference",)  # no old policy, no EMA
    assert make_objective("orw_cfm_w2", TrainerConfig()).ema_decay(5) == 0.0  # unset: no EMA of its own
    TrainerConfig(nft_beta=0.0 + 1e-3, ema_decay=0.9)  # nft's settings do not concern the other objectives


def test_an_nft_lora_run_resumes_exactly(tmp_path):
    """The old policy of a LoRA policy (its EMA tensors) is in the checkpoint: 2 + resume + 2 steps = 4 steps."""
    from test_text_to_image import PROMPTS, brightness, config, flow_of

    from orw_fast.prompts import PromptSource
    from orw_fast.tasks.tiny_pipelines import save_tiny_pipeline

    folders = {"sd3": save_tiny_pipeline("sd3", tmp_path / "sd3", sample_size=8)}

    def run(folder, epochs, resume=None):
        trainer = ORWCFMTrainer(
            flow_of(folders, "sd3", prompts=PromptSource(PROMPTS, samples_per_prompt=2)),
            config(folder, objective="nft", old_policy_decay_rate=0.3),
            "cpu",
            reward_fn=brightness,
        )
        if resume:
            trainer.resume(resume)
        return [m["loss"] for m in trainer.train(epochs, 2, progress=False)], trainer

    full, whole = run(tmp_path / "full", 2)
    part1, _ = run(tmp_path / "part", 1)
    torch.manual_seed(999)
    part2, resumed = run(tmp_path / "resumed", 2, resume=tmp_path / "part" / "last.pt")
    assert part1 + part2 == full
    assert all(torch.equal(a, b) for a, b in zip(resumed.weights._ema, whole.weights._ema))
