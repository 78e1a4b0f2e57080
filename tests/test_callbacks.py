"""Callbacks around ORWCFMTrainer.train: hook order, the default callbacks' files, a run that writes nothing, the
evaluation records, and refresh_interval honoured by the one loop (the experiments' runs included)."""

import json

import numpy as np
import pytest
import torch
from test_trainer import base_model, fresh, right_reward, toy_config  # noqa: F401 - base_model is a fixture

from orw_fast.callbacks import Callback, Evaluation, default_callbacks
from orw_fast.checkpoint import load_file
from orw_fast.models import make_flow_model
from orw_fast.tasks.sweeps import evaluated_run
from orw_fast.trainer import ORWCFMTrainer


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_train_start(self, trainer, total_steps, steps_per_epoch):
        self.calls.append(("start", total_steps, steps_per_epoch, trainer.step))

    def on_step_end(self, trainer, metrics):
        self.calls.append(("step", metrics["step"], metrics["epoch"], trainer.step))

    def on_epoch_end(self, trainer, epoch):
        self.calls.append(("epoch", epoch, trainer.step))

    def on_train_end(self, trainer):
        self.calls.append(("end", trainer.step))


def test_hooks_are_called_in_order_and_an_explicit_list_writes_nothing(tmp_path, base_model):
    recorder = Recorder()
    trainer = ORWCFMTrainer(
        fresh(base_model),
        toy_config(tmp_path / "run", batch_size=8),
        "cpu",
        reward_fn=right_reward,
        callbacks=[recorder],
    )
    history = trainer.train(num_epochs=2, steps_per_epoch=3, progress=False)
    assert recorder.calls == [
        ("start", 6, 3, 0),
        ("step", 1, 0, 1),
        ("step", 2, 0, 2),
        ("step", 3, 0, 3),
        ("epoch", 1, 3),
        ("step", 4, 1, 4),
        ("step", 5, 1, 5),
        ("step", 6, 1, 6),
        ("epoch", 2, 6),
        ("end", 6),
    ]
    assert [m["step"] for m in history] == [1, 2, 3, 4, 5, 6]
    assert not (tmp_path / "run").exists()  # no metrics.jsonl, no checkpoints


def test_callbacks_must_be_callbacks(tmp_path, base_model):
    with pytest.raises(TypeError, match="callbacks must be None or a list of orw_fast.callbacks.Callback"):
        ORWCFMTrainer(
            fresh(base_model), toy_config(tmp_path), "cpu", reward_fn=right_reward, callbacks=[lambda trainer: None]
        )


def test_the_default_callbacks_write_the_runs_files(tmp_path):
    torch.manual_seed(0)
    model, _ = make_flow_model((1, 8, 8), preset="digits", num_channels=32)
    config = toy_config(
        tmp_path / "run",
        image_shape=None,
        batch_size=4,
        sampler_method="euler",
        sampler_steps=2,
        grid_size=4,
        checkpoint_every=1,
    )
    trainer = ORWCFMTrainer(model, config, "cpu", reward_fn=lambda x: x.mean(dim=(1, 2, 3)))
    assert [type(c).__name__ for c in trainer.callbacks] == ["MetricsLog", "SampleGrids", "Checkpoints"]
    history = trainer.train(num_epochs=2, steps_per_epoch=2, progress=False)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint_epoch001.pt",
        "last.pt",
        "metrics.jsonl",
        "samples_epoch001.png",
        "samples_epoch002.png",
    ]
    assert [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] == history
    assert load_file(run / "checkpoint_epoch001.pt")["step"] == 2 and load_file(run / "last.pt")["step"] == 4
    assert [type(c).__name__ for c in default_callbacks(toy_config(run, use_wandb=True, checkpoint_every=0))] == [
        "MetricsLog",
        "WandbLog",
        "Checkpoints",
    ]


def test_evaluation_records_before_training_and_after_every_epoch(tmp_path, base_model):
    seen = []

    def evaluate(trainer):
        seen.append(trainer.step)
        return {"at_step": trainer.step}

    evaluation = Evaluation(evaluate)
    trainer = ORWCFMTrainer(
        fresh(base_model), toy_config(tmp_path, batch_size=8), "cpu", reward_fn=right_reward, callbacks=[evaluation]
    )
    history = trainer.train(num_epochs=3, steps_per_epoch=2, progress=False)
    records = evaluation.records
    assert seen == [0, 2, 4, 6]
    assert [r["epoch"] for r in records] == [0, 1, 2, 3] and [r["at_step"] for r in records] == seen
    assert set(records[0]) == {"epoch", "at_step"}
    for epoch, record in enumerate(records[1:]):
        assert record["train_reward"] == float(np.mean([m["reward_mean"] for m in history[2 * epoch : 2 * epoch + 2]]))
        assert record["seconds"] > 0


def _refreshes(trainer):
    """The steps at which the trainer refreshes its last policy."""
    steps, refresh = [], trainer.refresh_last_policy

    def counted():
        steps.append(trainer.step)
        refresh()

    trainer.refresh_last_policy = counted
    return steps


@pytest.mark.parametrize("interval", [1, 2, 3])
def test_the_last_policy_is_refreshed_exactly_every_refresh_interval_epochs(tmp_path, base_model, interval):
    def same_as_policy(trainer):
        return {
            "same": all(torch.equal(a, b) for a, b in zip(trainer.last_policy.parameters(), trainer.model.parameters()))
        }

    evaluation = Evaluation(same_as_policy)
    trainer = ORWCFMTrainer(
        fresh(base_model),
        toy_config(tmp_path, batch_size=8, refresh_interval=interval),
        "cpu",
        reward_fn=right_reward,
        callbacks=[evaluation],
    )
    steps = _refreshes(trainer)
    trainer.train(num_epochs=6, steps_per_epoch=2, progress=False)
    assert steps == [2 * e for e in range(1, 7) if e % interval == 0]
    assert [r["same"] for r in evaluation.records[1:]] == [e % interval == 0 for e in range(1, 7)]


def test_the_experiments_runs_honour_refresh_interval_and_write_nothing(tmp_path, base_model):
    made = []

    def make(callbacks):
        made.append(
            ORWCFMTrainer(
                fresh(base_model),
                toy_config(tmp_path / "run", batch_size=8, refresh_interval=2),
                "cpu",
                reward_fn=right_reward,
                callbacks=callbacks,
            )
        )
        made.append(_refreshes(made[0]))
        return made[0]

    records = evaluated_run(make, 4, 2, lambda trainer: {"step": trainer.step}, progress=False)
    assert [(r["epoch"], r["step"]) for r in records] == [(0, 0), (1, 2), (2, 4), (3, 6), (4, 8)]
    assert made[1] == [4, 8]
    assert not (tmp_path / "run").exists()


def test_a_diverged_run_stops_with_its_records_when_asked(tmp_path, base_model):
    """evaluated_run(stop_if_diverged=True): the trainer's refusal of a non-finite step ends the run, the records so far
    come back with the message on the last; without it the error propagates."""

    def make(callbacks):
        trainer = ORWCFMTrainer(
            fresh(base_model),
            toy_config(tmp_path, batch_size=8),
            "cpu",
            reward_fn=lambda x: x[:, 0].nan_to_num(),
            callbacks=callbacks,
        )
        generate = trainer.generate
        # from the 5th step on (epoch 2 of 2-step epochs) the rollouts overflow, as a diverged policy's do
        trainer.generate = lambda *a: generate(*a) * (float("nan") if trainer.step >= 4 else 1.0)
        return trainer

    evaluate = lambda trainer: {"step": trainer.step}
    records = evaluated_run(make, 4, 2, evaluate, progress=False, stop_if_diverged=True)
    assert [(r["epoch"], r["step"]) for r in records] == [(0, 0), (1, 2), (2, 4)]
    assert records[-1]["diverged"].startswith("step 5: the loss is nan") and "diverged" not in records[-2]
    with pytest.raises(FloatingPointError, match="the rollouts are non-finite"):
        evaluated_run(make, 4, 2, evaluate, progress=False)
