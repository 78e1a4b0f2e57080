"""Shared pieces of the experiments: the epoch loop over ORWCFMTrainer, result files."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np

from orw_fast.checkpoint import write_text_atomic
from orw_fast.trainer import ORWCFMTrainer


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


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(path, results: dict) -> Path:
    """Writes ``results`` as JSON (atomically) with the date and commit it was made at."""
    stamped = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit(), **results}
    return write_text_atomic(path, json.dumps(stamped, indent=1))


def pyplot():
    """matplotlib.pyplot with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
