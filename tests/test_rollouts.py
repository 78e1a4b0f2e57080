"""The rollout pool: bulk rollouts of the frozen last policy and their reuse, alone and in the trainer (how often the
sampler and the reward run, which samples each update sees, refresh, exact resume with a pool half used)."""

import pytest
import torch
from test_trainer import base_model, fresh, right_reward, toy_config  # noqa: F401 - base_model is a fixture

from orw_fast.rollouts import RolloutPool
from orw_fast.trainer import ORWCFMTrainer


def pool(size=6, reuse=1, prompts=False, seed=0):
    x0 = torch.arange(size, dtype=torch.float32)[:, None].expand(size, 2).clone()
    return RolloutPool.make(
        x0,
        x0 + 100,
        [f"p{i}" for i in range(size)] if prompts else None,
        x0[:, 0] * 10,
        reuse=reuse,
        generator=torch.Generator().manual_seed(seed),
    )


def test_the_first_pass_is_in_order_and_every_sample_serves_reuse_updates():
    p = pool(size=6, reuse=3, prompts=True)
    assert len(p) == 18
    x0, x1, prompts, rewards = p.take(2)
    assert x0[:, 0].tolist() == [0, 1] and x1[:, 0].tolist() == [100, 101] and prompts == ["p0", "p1"]
    assert rewards.tolist() == [0, 10]
    seen = x0[:, 0].tolist()
    while len(p):
        x0, x1, prompts, rewards = p.take(2)
        assert torch.equal(x1, x0 + 100) and torch.equal(rewards, x0[:, 0] * 10)  # rows stay together
        assert prompts == [f"p{int(i)}" for i in x0[:, 0]]
        seen += x0[:, 0].tolist()
    assert sorted(seen) == sorted(list(range(6)) * 3)
    assert seen[6:] != list(range(6)) * 2  # the later passes are shuffled
    with pytest.raises(ValueError, match="has 0 samples left, 2 were asked for"):
        p.take(2)


def test_pool_state_round_trip_and_checks():
    p = pool(size=4, reuse=2)
    p.take(3)
    state = p.state()
    RolloutPool.check_state(state, (2,), "here")
    q = RolloutPool.from_state(state, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(p.take(5)[:2], q.take(5)[:2]))
    for broken in (
        {**state, "x1": state["x1"][:3]},
        {**state, "cursor": 99},
        {**state, "order": state["order"] + 4},
        {k: v for k, v in state.items() if k != "rewards"},
        "not a pool",
    ):
        with pytest.raises(ValueError, match="here is not a rollout pool of samples of shape \\[2\\]"):
            RolloutPool.check_state(broken, (2,), "here")
    with pytest.raises(ValueError, match="shape \\[3\\]"):
        RolloutPool.check_state(state, (3,), "here")


def counting(trainer):
    """Counts the trainer's sampler calls (with their batch sizes) and reward calls."""
    calls = {"rollout": [], "reward": 0}
    rollout, reward_fn = trainer.rollout, trainer.reward_fn

    def counted_rollout(batch):
        calls["rollout"].append(batch)
        return rollout(batch)

    def counted_reward(images, prompts=None):
        calls["reward"] += 1
        return reward_fn(images, prompts)

    trainer.rollout, trainer.reward_fn = counted_rollout, counted_reward
    return calls


def test_rollouts_are_made_in_bulk_and_reused_as_configured(tmp_path, base_model):
    trainer = ORWCFMTrainer(
        fresh(base_model), toy_config(tmp_path, rollout_batches=3, rollout_reuse=2), "cpu", reward_fn=right_reward
    )
    calls = counting(trainer)
    for _ in range(7):
        trainer.train_step()
    assert calls == {"rollout": [192, 192], "reward": 2}  # 3 x 64 samples serve 6 updates
    trainer.refresh_last_policy()  # a new last policy: the rest of the pool is dropped
    trainer.train_step()
    assert calls == {"rollout": [192] * 3, "reward": 3}


def test_the_default_is_one_fresh_rollout_per_step(tmp_path, base_model):
    trainer = ORWCFMTrainer(fresh(base_model), toy_config(tmp_path), "cpu", reward_fn=right_reward)
    calls = counting(trainer)
    for _ in range(3):
        trainer.train_step()
    assert calls == {"rollout": [64] * 3, "reward": 3}


def test_a_half_used_pool_resumes_exactly(tmp_path, base_model):
    def make(folder):
        return ORWCFMTrainer(
            fresh(base_model),
            toy_config(folder, rollout_batches=3, rollout_reuse=2, refresh_interval=2),
            "cpu",
            reward_fn=right_reward,
        )

    def losses(trainer, epochs):
        return [m["loss"] for m in trainer.train(num_epochs=epochs, steps_per_epoch=4, progress=False)]

    full = losses(make(tmp_path / "a"), 3)
    first = make(tmp_path / "b")
    part1 = losses(first, 1)  # 4 of the pool's 6 updates used, no refresh yet
    assert len(first._pool) == 2 * 64
    first.save_checkpoint(tmp_path / "b" / "mid_pool.pt")
    torch.manual_seed(123)
    second = make(tmp_path / "c")
    second.resume(tmp_path / "b" / "mid_pool.pt")
    assert part1 + losses(second, 3) == full
