"""Callbacks: what happens around the steps and epochs of :meth:`ORWCFMTrainer.train` (logs, progress bar, sample
grids, checkpoints, evaluation), in the manner of trl's TrainerCallback and Lightning's callbacks.

``train`` calls, for each callback in order: ``on_train_start(trainer, total_steps, steps_per_epoch)`` once,
``on_step_end(trainer, metrics)`` after every step (``metrics``: the step's dict, with "epoch"; read it, do not change
it), ``on_epoch_end(trainer, epoch)`` after the last step of each epoch (epochs count from 1; the last policy has been
refreshed when the epoch is a multiple of ``refresh_interval``), and ``on_train_end(trainer)`` when every step is done.
Multi-process: every rank calls every hook (sample grids and checkpoints are collective); rank 0 alone writes.

:func:`default_callbacks` are the trainer's unless it is given a list: the run's files in ``config.savedir``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from orw_fast import distributed as dist_utils
from orw_fast.images import save_image_grid


class Callback:
    """Does nothing at every hook; subclasses override the hooks they need."""

    def on_train_start(self, trainer, total_steps: int, steps_per_epoch: int) -> None:
        pass

    def on_step_end(self, trainer, metrics: dict) -> None:
        pass

    def on_epoch_end(self, trainer, epoch: int) -> None:
        pass

    def on_train_end(self, trainer) -> None:
        pass


class MetricsLog(Callback):
    """Appends every step's metrics as one JSON line to ``folder``/metrics.jsonl (the folder is made, and the file
    opened, when training starts: a bad location fails before the first step)."""

    def __init__(self, folder):
        self.path = Path(folder) / "metrics.jsonl"

    def on_train_start(self, trainer, total_steps, steps_per_epoch):
        with dist_utils.on_all_ranks("opening the run's folder and log"):
            if trainer.rank == 0:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.open("a").close()

    def on_step_end(self, trainer, metrics):
        if trainer.rank == 0:
            with self.path.open("a") as log:
                log.write(json.dumps(metrics) + "\n")


class WandbLog(Callback):
    """Logs every step's metrics to a wandb run (started on the first training, with the trainer's config)."""

    def __init__(self, project: str, run_name: str | None = None):
        self.project, self.run_name, self.run = project, run_name, None

    def on_train_start(self, trainer, total_steps, steps_per_epoch):
        with dist_utils.on_all_ranks("starting wandb"):
            if trainer.rank == 0 and self.run is None:
                try:
                    import wandb
                except ImportError as err:
                    raise ValueError("config.use_wandb=True needs the wandb package (pip install wandb)") from err
                self.run = wandb.init(
                    project=self.project, name=self.run_name, config=dataclasses.asdict(trainer.config)
                )

    def on_step_end(self, trainer, metrics):
        if self.run is not None:
            self.run.log(metrics, step=trainer.step)


class ProgressBar(Callback):
    """A tqdm bar of the steps (rank 0) with the last step's mean reward, loss and ESS (when the objective has
    one); ``leave``: keep it on screen when training ends."""

    def __init__(self, leave: bool = True):
        self.leave, self.bar = leave, None

    def on_train_start(self, trainer, total_steps, steps_per_epoch):
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total_steps,
            initial=min(trainer.step, total_steps),
            disable=trainer.rank != 0,
            unit="step",
            desc="ORW-CFM-W2",
            leave=self.leave,
        )

    def on_step_end(self, trainer, metrics):
        self.bar.update(1)
        shown = {"reward": metrics["reward_mean"], "loss": metrics["loss"], "ess": metrics.get("ess")}
        self.bar.set_postfix({k: f"{v:.1f}" if k == "ess" else f"{v:.3g}" for k, v in shown.items() if v is not None})

    def on_train_end(self, trainer):
        self.bar.close()


@torch.no_grad()
def save_sample_grid(trainer, path, n: int) -> Path:
    """A grid of ``n`` policy samples from a fixed noise and fixed prompts (the same every time), each prompt under
    its image. Collective: every rank samples (sharded models need all of them), rank 0 writes."""
    x0 = torch.randn(
        (n, *trainer.image_shape),
        device=trainer.device,
        generator=torch.Generator(device=trainer.device).manual_seed(12345),
    )
    prompts = None if trainer.flow.prompts is None else trainer.flow.prompts.first(n)
    training = trainer.model.training
    trainer.model.eval()
    images = trainer.flow.to_images(trainer.generate(trainer.model, x0, prompts))
    trainer.model.train(training)
    with dist_utils.on_all_ranks("writing a sample grid"):
        if trainer.rank == 0:
            save_image_grid(images, path, captions=None if prompts is None else [str(p) for p in prompts])
    return Path(path)


class SampleGrids(Callback):
    """After every epoch E, a grid of ``size`` policy samples: ``folder``/samples_epoch{E:03d}.png."""

    def __init__(self, folder, size: int):
        self.folder, self.size = Path(folder), size

    def on_epoch_end(self, trainer, epoch):
        save_sample_grid(trainer, self.folder / f"samples_epoch{epoch:03d}.png", self.size)


class Checkpoints(Callback):
    """``folder``/checkpoint_epoch{E:03d}.pt every ``every`` epochs (0: none; none after the last step) and
    ``folder``/last.pt when training ends."""

    def __init__(self, folder, every: int):
        self.folder, self.every, self.total = Path(folder), every, None

    def on_train_start(self, trainer, total_steps, steps_per_epoch):
        self.total = total_steps

    def on_epoch_end(self, trainer, epoch):
        if self.every and epoch % self.every == 0 and trainer.step < self.total:
            trainer.save_checkpoint(self.folder / f"checkpoint_epoch{epoch:03d}.pt")

    def on_train_end(self, trainer):
        trainer.save_checkpoint(self.folder / "last.pt")


class Evaluation(Callback):
    """Measures the model before training and after every epoch. ``records``: ``{"epoch", **evaluate(trainer)}``
    when training starts (epoch: the epochs already done, 0 for a new trainer), then after each epoch
    ``{"epoch", "train_reward" (the epoch's mean of the steps' "reward_mean"), "seconds" (its wall time, evaluation
    excluded), **evaluate(trainer)}``. ``evaluate`` must not draw from the trainer's random generators."""

    def __init__(self, evaluate: Callable[..., dict]):
        self.evaluate, self.records = evaluate, []
        self._rewards, self._start = [], 0.0

    def on_train_start(self, trainer, total_steps, steps_per_epoch):
        self.records.append({"epoch": trainer.step // steps_per_epoch, **self.evaluate(trainer)})
        self._rewards, self._start = [], time.perf_counter()

    def on_step_end(self, trainer, metrics):
        self._rewards.append(metrics["reward_mean"])

    def on_epoch_end(self, trainer, epoch):
        seconds = time.perf_counter() - self._start
        self.records.append(
            {
                "epoch": epoch,
                "train_reward": float(np.mean(self._rewards)),
                "seconds": seconds,
                **self.evaluate(trainer),
            }
        )
        self._rewards, self._start = [], time.perf_counter()


def default_callbacks(config) -> list[Callback]:
    """The run's files from a TrainerConfig, in ``config.savedir``: metrics.jsonl, wandb (``use_wandb``), a sample
    grid per epoch (``grid_size`` > 0), checkpoints every ``checkpoint_every`` epochs and last.pt."""
    folder = Path(config.savedir)
    return [
        MetricsLog(folder),
        *([WandbLog(config.wandb_project, config.run_name)] if config.use_wandb else []),
        *([SampleGrids(folder, config.grid_size)] if config.grid_size else []),
        Checkpoints(folder, config.checkpoint_every),
    ]
