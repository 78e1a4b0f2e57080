"""The experiments' and demos' runs: ORW-CFM-W2 training with an evaluation before training and after every epoch
(orw_fast.callbacks.Evaluation) and no files written, alpha x seed sweeps of them, and the check that no recorded
metric is NaN."""

from __future__ import annotations

import math
from collections.abc import Callable

from orw_fast.callbacks import Callback, Evaluation, ProgressBar
from orw_fast.trainer import ORWCFMTrainer, TrainerConfig


def evaluated_run(
    make_trainer: Callable[[list[Callback]], ORWCFMTrainer],
    epochs: int,
    steps_per_epoch: int,
    evaluate: Callable[[ORWCFMTrainer], dict],
    progress: bool = True,
    *,
    stop_if_diverged: bool = False,
) -> list[dict]:
    """Trains ``make_trainer(callbacks)`` (a new trainer with these callbacks: the evaluation and, with ``progress``,
    a progress bar; it writes no files) for ``epochs`` epochs of ``steps_per_epoch`` steps and returns the records of
    :class:`~orw_fast.callbacks.Evaluation`: ``evaluate(trainer)`` before training and after every epoch, with
    "epoch", the epoch's mean training reward ("train_reward") and its wall time ("seconds").

    ``stop_if_diverged``: a step the trainer refuses as non-finite (FloatingPointError) ends the run instead of
    raising; the records so far are returned, the last one with "diverged": the trainer's message."""
    evaluation = Evaluation(evaluate)
    trainer = make_trainer([ProgressBar(leave=False)] * progress + [evaluation])
    try:
        trainer.train(epochs, steps_per_epoch, progress=False)
    except FloatingPointError as err:
        if not stop_if_diverged:
            raise
        evaluation.records[-1]["diverged"] = str(err)
    return evaluation.records


def sweep(
    alphas,
    seeds,
    make_trainer: Callable[[float, int, list[Callback]], ORWCFMTrainer],
    epochs: int,
    steps_per_epoch: int,
    evaluate: Callable[[ORWCFMTrainer], dict],
    after_first_seed: Callable[[float], None] | None = None,
    progress: bool = True,
) -> dict[str, dict[str, list[dict]]]:
    """:func:`evaluated_run` for every ``(alpha, seed)`` with a trainer from ``make_trainer(alpha, seed, callbacks)``;
    returns ``{f"{alpha:g}": {str(seed): records}}``. ``after_first_seed(alpha)`` runs after each alpha's first seed
    (to save that run's samples, for example)."""
    runs = {}
    for alpha in alphas:
        runs[f"{alpha:g}"] = {}
        for i, seed in enumerate(seeds):
            if progress:
                print(f"alpha={alpha:g} seed={seed}")
            runs[f"{alpha:g}"][str(seed)] = evaluated_run(
                lambda callbacks, alpha=alpha, seed=seed: make_trainer(alpha, seed, callbacks),
                epochs,
                steps_per_epoch,
                evaluate,
                progress,
            )
            if i == 0 and after_first_seed is not None:
                after_first_seed(alpha)
    return runs


def sweep_config(settings, alpha: float, seed: int, **fields) -> TrainerConfig:
    """The config of one sweep run: ``settings``' learning_rate, temperature, weighting, batch_size and
    sampler_steps, W2 coefficient ``alpha``, ``seed``, no sample grids, and ``fields`` on top."""
    return TrainerConfig(
        learning_rate=settings.learning_rate,
        w2_coefficient=alpha,
        temperature=settings.temperature,
        weighting=settings.weighting,
        batch_size=settings.batch_size,
        sampler_steps=settings.sampler_steps,
        grid_size=0,
        seed=seed,
        **fields,
    )


def check_finite(results: dict) -> None:
    """Raises if any recorded metric is NaN (a diverged run must not end up in a table)."""
    for alpha, by_seed in results["runs"].items():
        for seed, records in by_seed.items():
            for rec in records:
                if any(isinstance(v, float) and not math.isfinite(v) for v in rec.values()):
                    raise RuntimeError(f"alpha={alpha} seed={seed} epoch {rec['epoch']} has non-finite metrics")
