"""The epoch loop of the experiments and demos: ORW-CFM-W2 epochs with an evaluation before training and after
every epoch, and the check that no recorded metric is NaN."""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

from orw_fast.trainer import ORWCFMTrainer, TrainerConfig


def fine_tune_by_epoch(trainer: ORWCFMTrainer, epochs: int, steps_per_epoch: int,
                       evaluate: Callable[[ORWCFMTrainer], dict], progress: bool = True) -> list[dict]:
    """Runs ``epochs`` ORW-CFM-W2 epochs of ``steps_per_epoch`` steps (the last policy is refreshed after
    each) and returns ``[evaluate(trainer)]`` for the model before training and after every epoch, each
    with "epoch", the epoch's mean training reward ("train_reward") and its wall time."""
    from tqdm.auto import tqdm

    records = [{"epoch": 0, **evaluate(trainer)}]
    bar = tqdm(total=epochs * steps_per_epoch, disable=not progress, unit="step", leave=False)
    for epoch in range(1, epochs + 1):
        start, rewards = time.perf_counter(), []
        for _ in range(steps_per_epoch):
            rewards.append(trainer.train_step()["reward_mean"])
            bar.update(1)
        trainer.refresh_last_policy()
        records.append({"epoch": epoch, "train_reward": float(np.mean(rewards)),
                        "seconds": time.perf_counter() - start, **evaluate(trainer)})
    bar.close()
    return records


def sweep(alphas, seeds, make_trainer: Callable[[float, int], ORWCFMTrainer], epochs: int, steps_per_epoch: int,
          evaluate: Callable[[ORWCFMTrainer], dict], after_first_seed: Callable[[float], None] | None = None,
          progress: bool = True) -> dict[str, dict[str, list[dict]]]:
    """:func:`fine_tune_by_epoch` for every ``(alpha, seed)`` with a trainer from ``make_trainer(alpha, seed)``;
    returns ``{f"{alpha:g}": {str(seed): records}}``. ``after_first_seed(alpha)`` runs after each alpha's
    first seed (to save that run's samples, for example)."""
    runs = {}
    for alpha in alphas:
        runs[f"{alpha:g}"] = {}
        for i, seed in enumerate(seeds):
            trainer = make_trainer(alpha, seed)
            if progress:
                print(f"alpha={alpha:g} seed={seed}")
            runs[f"{alpha:g}"][str(seed)] = fine_tune_by_epoch(trainer, epochs, steps_per_epoch, evaluate, progress)
            if i == 0 and after_first_seed is not None:
                after_first_seed(alpha)
    return runs


def sweep_config(settings, alpha: float, seed: int, **fields) -> TrainerConfig:
    """The config of one sweep run: ``settings``' learning_rate, temperature, weighting, batch_size and
    sampler_steps, W2 coefficient ``alpha``, ``seed``, no sample grids, and ``fields`` on top."""
    return TrainerConfig(learning_rate=settings.learning_rate, w2_coefficient=alpha, temperature=settings.temperature,
                         weighting=settings.weighting, batch_size=settings.batch_size,
                         sampler_steps=settings.sampler_steps, grid_size=0, seed=seed, **fields)


def check_finite(results: dict) -> None:
    """Raises if any recorded metric is NaN (a diverged run must not end up in a table)."""
    for alpha, by_seed in results["runs"].items():
        for seed, records in by_seed.items():
            for rec in records:
                if any(isinstance(v, float) and not math.isfinite(v) for v in rec.values()):
                    raise RuntimeError(f"alpha={alpha} seed={seed} epoch {rec['epoch']} has non-finite metrics")
