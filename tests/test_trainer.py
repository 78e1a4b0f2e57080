"""ORWCFMTrainer on small CPU problems: learning signal, the W2 trade-off, checkpoints, resume, errors."""

import math
import re

import pytest
import torch

from orw_fast.checkpoint import save_atomic
from orw_fast.config import ConfigError
from orw_fast.trainer import ORWCFMTrainer, TrainerConfig


class ToyField(torch.nn.Module):
    """A small MLP flow field v(t, x) on 2-D points; t: [B]."""

    def __init__(self, hidden=64):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, 2),
        )

    def forward(self, t, x):
        return self.net(torch.cat([t[:, None], x], dim=1))


def pretrained_toy(steps=300, seed=0):
    """A field trained by flow matching to a two-mode mixture at x = (-2, 0) and (2, 0)."""
    torch.manual_seed(seed)
    model = ToyField()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        x1 = torch.randn(256, 2) * 0.3 + torch.tensor([2.0, 0.0]) * (torch.randint(0, 2, (256, 1)) * 2 - 1)
        x0, t = torch.randn(256, 2), torch.rand(256)
        xt = t[:, None] * x1 + (1 - t[:, None]) * x0
        loss = (model(t, xt) - (x1 - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def right_reward(x):
    return x[:, 0]


def toy_config(tmp_path, **overrides):
    base = dict(
        image_shape=(2,),
        batch_size=64,
        sampler_steps=8,
        learning_rate=3e-3,
        temperature=2.0,
        w2_coefficient=0.0,
        grid_size=0,
        savedir=str(tmp_path),
        seed=0,
    )
    return TrainerConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def base_model():
    return pretrained_toy()


def fresh(model):
    import copy

    return copy.deepcopy(model)


def test_reward_rises_on_a_toy(tmp_path, base_model):
    trainer = ORWCFMTrainer(fresh(base_model), toy_config(tmp_path), "cpu", reward_fn=right_reward)
    history = trainer.train(num_epochs=6, steps_per_epoch=10, progress=False)
    first = sum(m["reward_mean"] for m in history[:5]) / 5
    last = sum(m["reward_mean"] for m in history[-5:]) / 5
    assert abs(first) < 1.0  # the base model covers both modes
    assert last > first + 1.0, (first, last)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 60
    assert (tmp_path / "last.pt").is_file()


def test_w2_regularization_keeps_diversity(tmp_path, base_model):
    results = {}
    for alpha in (0.0, 20.0):
        trainer = ORWCFMTrainer(
            fresh(base_model), toy_config(tmp_path / str(alpha), w2_coefficient=alpha), "cpu", reward_fn=right_reward
        )
        history = trainer.train(num_epochs=6, steps_per_epoch=10, progress=False)
        assert [m["step"] for m in history if "diversity" in m] == [1, 11, 21, 31, 41, 51]  # diversity_every=10
        results[alpha] = {**history[-1], "diversity": history[-10]["diversity"]}
    # alpha = 0 collapses onto the rewarded mode; a large alpha keeps both modes (larger spread)
    assert results[0.0]["diversity"] < 0.6 * results[20.0]["diversity"], results
    assert results[0.0]["reward_mean"] > results[20.0]["reward_mean"], results


def test_resume_continues_exactly(tmp_path, base_model):
    def losses(trainer, epochs):
        return [m["loss"] for m in trainer.train(num_epochs=epochs, steps_per_epoch=3, progress=False)]

    full = losses(
        ORWCFMTrainer(
            fresh(base_model), toy_config(tmp_path / "a", coupling="ot", ema_decay=0.9), "cpu", reward_fn=right_reward
        ),
        3,
    )
    first = ORWCFMTrainer(
        fresh(base_model), toy_config(tmp_path / "b", coupling="ot", ema_decay=0.9), "cpu", reward_fn=right_reward
    )
    part1 = losses(first, 1)
    first.save_checkpoint(tmp_path / "b" / "interrupted.pt")
    torch.manual_seed(999)  # whatever happens in between must not matter
    second = ORWCFMTrainer(
        fresh(base_model), toy_config(tmp_path / "c", coupling="ot", ema_decay=0.9), "cpu", reward_fn=right_reward
    )
    second.resume(tmp_path / "b" / "interrupted.pt")
    part2 = losses(second, 3)
    assert part1 + part2 == full


def test_nan_rewards_are_refused_before_any_update(tmp_path, base_model):
    def bad_reward(x):
        r = x[:, 0].clone()
        r[:3] = math.nan
        return r

    trainer = ORWCFMTrainer(fresh(base_model), toy_config(tmp_path), "cpu", reward_fn=bad_reward)
    before = [p.clone() for p in trainer.model.parameters()]
    with pytest.raises(ValueError, match="3 of 64"):
        trainer.train_step()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert trainer.step == 0


class Switchable(ToyField):
    """ToyField whose prediction becomes NaN once ``poisoned`` is set."""

    poisoned = False

    def forward(self, t, x):
        out = super().forward(t, x)
        return out * math.nan if self.poisoned else out


def _training_state(trainer):
    import copy

    return copy.deepcopy(
        {
            "model": trainer.model.state_dict(),
            "ema": trainer.ema.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "step": trainer.step,
        }
    )


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys() and all(_assert_same(a[k], b[k]) is None for k in a)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b) and all(_assert_same(x, y) is None for x, y in zip(a, b))
    else:
        assert a == b


@pytest.mark.parametrize(
    "case,match",
    [
        ("exp_overflow", "the exp weights overflow: rewards span"),
        ("nan_prediction", "the policy's prediction overflowed"),
        ("nan_rollouts", r"Likely cause\(s\): the rollouts are non-finite: the last policy's samples overflowed"),
    ],
)
def test_a_non_finite_update_is_refused_and_leaves_everything_as_it_was(tmp_path, base_model, case, match):
    model = Switchable()
    model.load_state_dict(base_model.state_dict())
    scale = {"value": 1.0}
    trainer = ORWCFMTrainer(
        model,
        toy_config(tmp_path, weighting="exp", ema_decay=0.9),
        "cpu",
        reward_fn=lambda x: x[:, 0].nan_to_num() * scale["value"],  # finite for non-finite samples
    )
    trainer.train_step()  # a good step first: the optimizer has state to keep
    before = _training_state(trainer)
    if case == "exp_overflow":
        scale["value"] = 1e3  # exp(2 * 1e3 * x) is inf in float32
    elif case == "nan_rollouts":  # a diverged last policy: its samples overflow, and the predictions on them with it
        trainer.generate = lambda module, x0, prompts: torch.full_like(x0, float("nan"))
    else:
        model.poisoned = True
    with pytest.raises(FloatingPointError, match=match) as err:
        trainer.train_step()
    assert "step 2: the loss is" in str(err.value) and "the update was not applied" in str(err.value)
    if case == "nan_rollouts":  # named alone, not as non-finite predictions (the consequence)
        assert "prediction" not in str(err.value)
    _assert_same(_training_state(trainer), before)
    assert all(p.grad is None for p in trainer.model.parameters())


def test_softmax_weights_train_on_rewards_beyond_float32(tmp_path, base_model):
    """temperature * reward beyond float32's range: the step runs and the weights stay finite."""
    trainer = ORWCFMTrainer(
        fresh(base_model), toy_config(tmp_path), "cpu", reward_fn=lambda x: torch.sign(x[:, 0]) * 3e38
    )
    metrics = trainer.train_step()
    assert math.isfinite(metrics["loss"]) and 1 <= metrics["ess"] <= 64
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_torchcfm_checkpoint_round_trip(tmp_path):
    from torchcfm.models.unet.unet import UNetModelWrapper

    def unet():
        torch.manual_seed(0)
        return UNetModelWrapper(
            dim=(1, 8, 8),
            num_channels=32,
            num_res_blocks=1,
            channel_mult=[1, 2],
            attention_resolutions="4",
            num_heads=1,
            dropout=0.0,
        )

    source = unet()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    ema = {k: v + 1 for k, v in source.state_dict().items()}
    ckpt = {
        "net_model": {f"module.{k}": v for k, v in source.state_dict().items()},
        "ema_model": {f"module.{k}": v for k, v in ema.items()},
        "optim": {},
        "sched": {},
        "step": 7,
    }
    save_atomic(ckpt, tmp_path / "cfm.pt")
    for weights, want in (("net", source.state_dict()), ("ema", ema)):
        trainer = ORWCFMTrainer(unet(), toy_config(tmp_path, image_shape=None), "cpu", reward_fn=right_reward)
        assert trainer.image_shape == (1, 8, 8)
        trainer.load_pretrained(tmp_path / "cfm.pt", weights=weights)
        for module in (trainer.model, trainer.reference, trainer.last_policy):
            assert all(torch.equal(module.state_dict()[k], want[k]) for k in want)
    # our own checkpoint reads back too
    trainer.save_checkpoint(tmp_path / "ours.pt")
    other = ORWCFMTrainer(unet(), toy_config(tmp_path, image_shape=None), "cpu", reward_fn=right_reward)
    other.load_pretrained(tmp_path / "ours.pt", weights="policy")
    assert all(
        torch.equal(a, b) for a, b in zip(other.model.state_dict().values(), trainer.model.state_dict().values())
    )


def test_bad_checkpoints_get_clear_errors(tmp_path, base_model):
    trainer = ORWCFMTrainer(fresh(base_model), toy_config(tmp_path), "cpu", reward_fn=right_reward)
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        trainer.load_pretrained(tmp_path / "corrupt.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        trainer.load_pretrained(tmp_path / "missing.pt")
    save_atomic({"net_model": {"weight": torch.zeros(3)}, "ema_model": {"weight": torch.zeros(3)}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="does not match the model"):
        trainer.load_pretrained(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not an orw_fast training checkpoint"):
        trainer.resume(tmp_path / "x.pt")


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    save_atomic({"a": 1}, tmp_path / "c.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"a": Unpicklable()}, tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt") == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.parametrize(
    "config,match",
    [
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"batch_size": 0}, "batch_size"),
        ({"coupling": "sinkhorn"}, "coupling"),
        ({"weighting": "max"}, "weighting"),
        ({"precision": "fp8"}, "precision"),
        ({"temperature": math.inf}, "temperature"),
        ({"w2_coefficient": -0.5}, "w2_coefficient"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"learning_rte": 1e-3}, "unknown config key"),
    ],
)
def test_bad_config_values_are_refused(config, match, base_model):
    with pytest.raises(ValueError, match=match):
        ORWCFMTrainer(fresh(base_model), {"image_shape": (2,), **config}, "cpu", reward_fn=right_reward)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("learning_rate", True, "config.learning_rate must be a finite number > 0, got True"),
        ("batch_size", True, "config.batch_size must be an integer >= 1, got True"),
        ("compile", "no", "config.compile must be True or False, got 'no'"),
        ("channels_last", "no", "config.channels_last must be True or False"),
        ("savedir", None, "config.savedir must be a non-empty path, got None"),
        ("ema_decay", "0.5", "config.ema_decay must be a finite number >= 0 and < 1"),
        ("seed", 2**70, "config.seed must be an integer >= 0 and <="),
        ("temperature", 1e39, "config.temperature must be a finite number in float32's range"),
        ("w2_coefficient", 10**400, "config.w2_coefficient must be a finite number >= 0"),
        ("image_shape", (-1, 8, 8), "config.image_shape must be None or the shape of one sample"),
        ("image_shape", "abc", "config.image_shape must be None or the shape of one sample"),
        ("sampler_method", "leapfrog", "config.sampler_method must be one of"),
        ("cuda_graph", 1, "config.cuda_graph must be one of"),
        ("parallel", "yes", "config.parallel must be True or False"),
    ],
)
def test_every_config_value_is_checked_and_named(key, value, match):
    """These ran with a coerced value, or failed later with an error that did not name the key."""
    with pytest.raises(ConfigError, match=re.escape(match)) as err:
        TrainerConfig(**{key: value})
    assert err.value.key == key


def test_unset_rollout_settings_are_the_models_and_a_method_needs_its_steps(tmp_path, base_model):
    """sampler_method / sampler_steps / sampler_grid left unset take the model family's rollout; steps alone keep
    the model's method (refused when too few for it); a method alone is refused (the default steps are another
    solver's)."""
    from orw_fast.models.diffusers_flow import DiffusersFlowModel
    from orw_fast.models.flow_model import PixelFlowModel

    trainer = ORWCFMTrainer(fresh(base_model), toy_config(tmp_path, sampler_steps=None), "cpu", reward_fn=right_reward)
    pixel = (PixelFlowModel.rollout_method, PixelFlowModel.rollout_steps, PixelFlowModel.rollout_grid)
    assert (trainer.rollout_method, trainer.rollout_steps, trainer.rollout_grid) == pixel
    assert (DiffusersFlowModel.rollout_method, DiffusersFlowModel.rollout_steps) == ("ab3", 9)
    trainer = ORWCFMTrainer(fresh(base_model), toy_config(tmp_path, sampler_steps=6), "cpu", reward_fn=right_reward)
    assert (trainer.rollout_method, trainer.rollout_steps) == (PixelFlowModel.rollout_method, 6)
    with pytest.raises(ConfigError, match="sampler_steps must be >= 4 with the model's rollout method 'ab3'") as err:
        ORWCFMTrainer(fresh(base_model), toy_config(tmp_path, sampler_steps=3), "cpu", reward_fn=right_reward)
    assert err.value.key == "sampler_steps"
    with pytest.raises(ConfigError, match=r"sampler_steps must be set with sampler_method='euler'") as err:
        TrainerConfig(sampler_method="euler")
    assert err.value.key == "sampler_steps"


@pytest.mark.parametrize("method,fewest", [("ab2", 2), ("ab3", 4), ("unipc", 4), ("euler", 1)])
def test_too_few_sampler_steps_for_the_method_are_refused_with_the_config(method, fewest):
    """Refused when the config is made (it used to fail at the first rollout, after the models were loaded)."""
    assert TrainerConfig(sampler_method=method, sampler_steps=fewest).sampler_steps == fewest
    if fewest > 1:
        with pytest.raises(ConfigError, match=re.escape(f">= {fewest} with sampler_method='{method}'")) as err:
            TrainerConfig(sampler_method=method, sampler_steps=fewest - 1)
        assert err.value.key == "sampler_steps"


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 8), r"a sample shape the model takes \(model\(t, x\) with x of shape \[1, 1, 8\] raised"),
        ((3, 8, 8), r"a sample shape the model takes"),  # the UNet has 1 input channel
    ],
)
def test_a_sample_shape_the_model_cannot_take_is_refused_when_the_trainer_is_made(tmp_path, shape, match):
    from orw_fast.models import make_flow_model

    model, _ = make_flow_model((1, 8, 8), preset="digits")
    with pytest.raises(ConfigError, match=match):
        ORWCFMTrainer(model, toy_config(tmp_path, image_shape=shape), "cpu", reward_fn=right_reward)


def test_a_cuda_device_without_cuda_says_so(tmp_path, base_model, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda' was asked for but no CUDA device is available"):
        ORWCFMTrainer(fresh(base_model), toy_config(tmp_path), "cuda", reward_fn=right_reward)


def test_the_official_parallel_key_is_accepted(tmp_path, base_model):
    with pytest.warns(UserWarning, match="config.parallel=True .* torchrun"):
        trainer = ORWCFMTrainer(
            torch.nn.DataParallel(fresh(base_model)),
            {**vars(toy_config(tmp_path)), "parallel": True},
            "cpu",
            reward_fn=right_reward,
        )
    assert isinstance(trainer.model, ToyField)  # the DataParallel wrapper is taken off


def test_missing_reward_or_shape_is_refused(base_model):
    with pytest.raises(ValueError, match="reward_fn"):
        ORWCFMTrainer(fresh(base_model), {"image_shape": (2,)}, "cpu")
    with pytest.raises(ValueError, match="image_shape"):
        ORWCFMTrainer(fresh(base_model), {}, "cpu", reward_fn=right_reward)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps(tmp_path, base_model, precision):
    """Autocast (and the GradScaler for fp16) on a torchcfm UNet in channels_last memory format."""
    from torchcfm.models.unet.unet import UNetModelWrapper

    torch.manual_seed(0)
    unet = UNetModelWrapper(
        dim=(1, 8, 8),
        num_channels=32,
        num_res_blocks=1,
        channel_mult=[1, 2],
        attention_resolutions="4",
        num_heads=1,
        dropout=0.0,
    )
    config = toy_config(
        tmp_path,
        image_shape=None,
        precision=precision,
        channels_last=True,
        batch_size=8,
        sampler_method="euler",
        sampler_steps=2,
    )
    trainer = ORWCFMTrainer(unet, config, "cpu", reward_fn=lambda x: x.mean(dim=(1, 2, 3)))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    history = [trainer.train_step() for _ in range(2)]
    assert all(math.isfinite(m["loss"]) for m in history)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert trainer.scaler.is_enabled() == (precision == "fp16")


def test_compiled_policy_matches_eager(tmp_path, base_model):
    runs = []
    for compile_ in (False, True):
        torch._dynamo.reset()
        trainer = ORWCFMTrainer(
            fresh(base_model), toy_config(tmp_path / str(compile_), compile=compile_), "cpu", reward_fn=right_reward
        )
        runs.append([trainer.train_step()["loss"] for _ in range(3)])
    assert runs[1] == pytest.approx(runs[0], rel=1e-4)


def test_rollouts_follow_the_default_sampler_and_a_named_grid(tmp_path, base_model):
    """By default the trainer's rollouts are the configured method on the model's rollout grid (both_dense for
    pixel models); sampler_grid names another."""
    from orw_fast.sampling import sample, time_grid

    for grid, expected in ((None, "both_dense"), ("uniform", "uniform")):
        trainer = ORWCFMTrainer(
            fresh(base_model),
            toy_config(tmp_path, sampler_grid=grid, sampler_method="midpoint", sampler_steps=5),
            "cpu",
            reward_fn=right_reward,
        )
        torch.manual_seed(0)
        x0, x1, _ = trainer.rollout(8)
        want = sample(trainer.last_policy, x0, times=time_grid(expected, 5), method="midpoint", cuda_graph=False)
        torch.testing.assert_close(x1, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "name,weight_decay,kind", [("adam", 0.0, torch.optim.Adam), ("adamw", 0.01, torch.optim.AdamW)]
)
def test_the_optimizer_is_the_configured_one(tmp_path, base_model, name, weight_decay, kind):
    config = toy_config(tmp_path, optimizer=name, weight_decay=weight_decay, learning_rate=1e-3)
    trainer = ORWCFMTrainer(fresh(base_model), config, "cpu", reward_fn=right_reward)
    assert type(trainer.optimizer) is kind
    group = trainer.optimizer.param_groups[0]
    assert (group["weight_decay"], group["lr"]) == (weight_decay, 1e-3)
    assert group["decoupled_weight_decay"] == (name == "adamw")
    assert TrainerConfig().optimizer == "adam" and TrainerConfig().weight_decay == 0.0


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("optimizer", "sgd", "config.optimizer must be one of ('adam', 'adamw'), got 'sgd'"),
        ("weight_decay", -0.1, "config.weight_decay must be a finite number >= 0, got -0.1"),
        ("weight_decay", "0.1", "config.weight_decay must be a finite number >= 0, got '0.1'"),
    ],
)
def test_bad_optimizer_settings_are_refused(key, value, match):
    with pytest.raises(ConfigError, match=re.escape(match)) as err:
        TrainerConfig(**{key: value})
    assert err.value.key == key


def test_a_checkpoint_of_another_optimizer_is_not_resumed(tmp_path, base_model):
    adam = ORWCFMTrainer(fresh(base_model), toy_config(tmp_path, batch_size=8), "cpu", reward_fn=right_reward)
    adam.train_step()
    path = adam.save_checkpoint(tmp_path / "adam.pt")
    adamw = ORWCFMTrainer(
        fresh(base_model), toy_config(tmp_path, batch_size=8, optimizer="adamw"), "cpu", reward_fn=right_reward
    )
    with pytest.raises(ValueError, match="was written with optimizer='adam'; resume it with the same setting"):
        adamw.resume(path)
    assert adamw.step == 0


def test_compiled_rollouts_equal_eager_ones_and_follow_refreshes_without_recompiling(tmp_path, base_model):
    """rollout_compile: the last policy's compiled forward makes the eager rollouts, and a refresh (weights copied in
    place) reaches it without compiling again."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    eager = ORWCFMTrainer(fresh(base_model), toy_config(tmp_path / "a"), "cpu", reward_fn=right_reward)
    trainer = ORWCFMTrainer(
        fresh(base_model), toy_config(tmp_path / "b", rollout_compile=True), "cpu", reward_fn=right_reward
    )
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))  # the rollouts' batch: one shape
    graphs = []
    for _ in range(3):
        with trainer.weights.last_policy() as module:
            torch.testing.assert_close(trainer.generate(module, x0, None), eager.generate(module, x0, None))
        graphs.append(counters["stats"]["unique_graphs"])
        trainer.train_step()
        trainer.refresh_last_policy()
    assert graphs[0] >= 1 and graphs == graphs[:1] * 3  # compiled once, refreshes included
    assert list(trainer._compiled_rollout_modules) == [trainer.weights.last_policy_module]
