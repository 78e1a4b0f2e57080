"""The alpha sweep on scikit-learn's 8x8 digits shared by the even-digits and JPEG experiments.

For every (alpha, seed) a copy of the pre-trained digits flow model (the demo's, cached) is fine-tuned
online toward a reward; after every epoch its samples (a fixed noise) are measured: fraction of even
digits and class entropy (by the digit classifier), diversity (mean pairwise distance), mean reward,
W2 to the reference model's samples (exact OT on the two sample sets, POT), and sample quality: the digits FD
to the held-out real digits and the background level (orw_fast.tasks.demo.DigitsQuality). Epoch 0 is the reference
itself drawn from other noise: its W2 is the estimator's floor at this sample size.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from experiments.common import pyplot, write_results
from orw_fast.images import save_image_grid
from orw_fast.metrics import w2_distance
from orw_fast.objectives import OBJECTIVES
from orw_fast.pretrain import default_cache_dir
from orw_fast.sampling import sample
from orw_fast.tasks.demo import DigitsQuality, evaluate_digits, pretrained_digits
from orw_fast.tasks.sweeps import check_finite, sweep, sweep_config
from orw_fast.trainer import ORWCFMTrainer


@dataclasses.dataclass
class SweepSettings:
    """One alpha sweep; every (alpha, seed) run gets ``epochs * steps_per_epoch`` steps."""

    # three points of the trade-off, so that experiments.run_all fits in 30 minutes on 2 cores (--alphas adds more)
    alphas: tuple[float, ...] = (0.0, 1.0, 5.0)
    seeds: tuple[int, ...] = (0, 1)
    epochs: int = 16
    steps_per_epoch: int = 15
    batch_size: int = 64
    temperature: float = 2.5
    weighting: str = "exp"  # the paper's w = exp(tau * r)
    learning_rate: float = 1e-3
    sampler_steps: int = 20
    sampler_method: str = "euler"  # the rollouts the results in experiments/README.md were measured with
    sampler_grid: str = "uniform"
    eval_samples: int = 300
    pretrain_steps: int = 3000
    # the loss of a step (orw_fast.objectives): nft and awm with their TrainerConfig defaults (the papers' values);
    # alpha is the w2_coefficient of each, and tau/weighting concern only orw_cfm_w2
    objective: str = "orw_cfm_w2"


def sweep_cli(argv, description: str, defaults: SweepSettings, out: str, run: Callable, columns: dict) -> None:
    """The command line of a sweep script: ``run(settings, out_dir, progress=...)`` with ``defaults``
    changed by --alphas/--seeds/--epochs/--steps-per-epoch, then prints the final table."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=out, help="output folder (%(default)s)")
    parser.add_argument(
        "--alphas",
        default=",".join(f"{a:g}" for a in defaults.alphas),
        help="comma-separated W2 coefficients (%(default)s)",
    )
    parser.add_argument("--seeds", type=int, default=len(defaults.seeds), help="number of seeds (%(default)s)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="(%(default)s)")
    parser.add_argument("--steps-per-epoch", type=int, default=defaults.steps_per_epoch, help="(%(default)s)")
    parser.add_argument(
        "--objective", default=defaults.objective, choices=tuple(OBJECTIVES), help="the loss of a step (%(default)s)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        alphas = tuple(float(a) for a in args.alphas.split(","))
    except ValueError:
        parser.error(f"--alphas must be comma-separated numbers, got {args.alphas!r}")
    if min(args.seeds, args.epochs, args.steps_per_epoch) < 1 or min(alphas) < 0:
        parser.error("--seeds, --epochs and --steps-per-epoch must be >= 1 and every alpha >= 0")
    settings = dataclasses.replace(
        defaults,
        alphas=alphas,
        seeds=tuple(range(args.seeds)),
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        objective=args.objective,
    )
    print(format_table(run(settings, args.out, progress=not args.quiet), columns))


def run_sweep(
    s: SweepSettings,
    make_reward: Callable,
    *,
    name: str,
    columns: dict[str, str],
    pareto: tuple[str, str, str, str],
    derive: Callable[[dict], dict] | None = None,
    out_dir=None,
    cache_dir=None,
    progress: bool = True,
) -> dict:
    """Runs every (alpha, seed) of ``s`` with the reward ``make_reward(classifier)`` and returns
    ``{"settings", "runs": {alpha: {seed: [per-epoch records]}}, "seconds"}``; ``derive(record)`` adds
    metrics computed from a record's others. With ``out_dir``: the final 64-sample grid of each alpha's
    first seed and of the reference, ``name``.json and the report of :func:`write_report` go there."""
    start = time.perf_counter()
    base, classifier = pretrained_digits(
        cache_dir or default_cache_dir(), steps=s.pretrain_steps, device="cpu", progress=progress
    )
    reward_fn, quality = make_reward(classifier), DigitsQuality(classifier)
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    ref_noise = torch.randn((s.eval_samples, 1, 8, 8), generator=torch.Generator().manual_seed(4321))
    with torch.no_grad():
        reference = sample(base, ref_noise, steps=s.sampler_steps, cuda_graph=False)

    @torch.no_grad()
    def evaluate(trainer: ORWCFMTrainer) -> dict:
        stats, x1 = evaluate_digits(
            trainer.model, classifier, n=s.eval_samples, sampler_steps=s.sampler_steps, quality=quality
        )
        evaluate.last = x1
        record = {**stats, "reward": float(reward_fn(x1).mean()), "w2_to_reference": w2_distance(x1, reference)}
        return {**record, **derive(record)} if derive is not None else record

    def make_trainer(alpha: float, seed: int, callbacks: list) -> ORWCFMTrainer:
        config = sweep_config(
            s, alpha, seed, sampler_method=s.sampler_method, sampler_grid=s.sampler_grid, objective=s.objective
        )
        return ORWCFMTrainer(copy.deepcopy(base), config, "cpu", reward_fn=reward_fn, callbacks=callbacks)

    def save_samples(alpha: float) -> None:
        if out_dir is not None:
            save_image_grid(evaluate.last[:64], out_dir / f"samples_alpha_{alpha:g}.png", scale=4)

    runs = sweep(s.alphas, s.seeds, make_trainer, s.epochs, s.steps_per_epoch, evaluate, save_samples, progress)
    results = {"settings": dataclasses.asdict(s), "runs": runs, "seconds": time.perf_counter() - start}
    check_finite(results)
    if out_dir is not None:
        save_image_grid(reference[:64], out_dir / "samples_reference.png", scale=4)
        write_results(out_dir / f"{name}.json", results)
        write_report(results, out_dir, name, columns, pareto)
    return results


METRICS = ("reward", "even_fraction", "class_entropy", "diversity", "w2_to_reference", "digits_fd", "background")


def final_summary(results: dict, metrics=METRICS) -> dict:
    """{alpha: {metric: (mean, std over seeds)}} of the last epoch."""
    summary = {}
    for alpha, by_seed in results["runs"].items():
        finals = [records[-1] for records in by_seed.values()]
        summary[alpha] = {
            m: (float(np.mean([f[m] for f in finals])), float(np.std([f[m] for f in finals]))) for m in metrics
        }
    return summary


def format_table(results: dict, metrics: dict[str, str]) -> str:
    """Markdown table of the final epoch, mean ± std over seeds (population std, ddof 0); ``metrics`` maps
    keys to column titles."""
    summary = final_summary(results, metrics)
    first = next(iter(results["runs"].values()))
    base = next(iter(first.values()))[0]
    lines = ["| model | " + " | ".join(metrics.values()) + " |", "|---" * (len(metrics) + 1) + "|"]
    lines.append("| reference (epoch 0) | " + " | ".join(f"{base[m]:.3f}" for m in metrics) + " |")
    seeds = len(results["settings"]["seeds"])
    for alpha, stats in summary.items():
        cells = (f"{mean:.3f} ± {std:.3f}" if seeds > 1 else f"{mean:.3f}" for mean, std in stats.values())
        lines.append(f"| alpha = {alpha} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(results: dict, out_dir, name: str, columns: dict[str, str], pareto: tuple[str, str, str, str]):
    """``name``.md (the final table), the Pareto plot ``pareto`` = (x key, y key, x label, y label) and the
    per-epoch curves of ``columns`` into ``out_dir`` (the JSON is written by the caller)."""
    x, y, xlabel, ylabel = pareto
    (Path(out_dir) / f"{name}.md").write_text(format_table(results, columns) + "\n")
    plot_pareto(results, Path(out_dir) / f"pareto_{x}_vs_{y}.png", x, y, xlabel, ylabel)
    plot_epochs(results, Path(out_dir) / "epochs.png", columns)


def plot_pareto(results: dict, path, x: str, y: str, xlabel: str, ylabel: str) -> None:
    """Final (x, y) per alpha and seed, with the per-alpha means joined: the reward/diversity trade-off."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    summary = final_summary(results, (x, y))
    for alpha, by_seed in results["runs"].items():
        points = [(r[-1][x], r[-1][y]) for r in by_seed.values()]
        ax.scatter(*zip(*points), s=14, alpha=0.5)
        ax.annotate(
            f"α={alpha}",
            (summary[alpha][x][0], summary[alpha][y][0]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.plot([summary[a][x][0] for a in summary], [summary[a][y][0] for a in summary], "k.-", lw=1)
    ax.set(xlabel=xlabel, ylabel=ylabel, title="final epoch, per alpha (dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_epochs(results: dict, path, metrics: dict[str, str]) -> None:
    """One panel per metric: seed-mean value vs epoch, one line per alpha."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], metrics.items()):
        for alpha, by_seed in results["runs"].items():
            values = np.array([[rec[key] for rec in records] for records in by_seed.values()])
            ax.plot(range(values.shape[1]), values.mean(0), label=f"α={alpha}")
        ax.set(xlabel="epoch", title=title)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
