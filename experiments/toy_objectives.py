"""The three objectives on the 2-D toy of ``experiments.toy_theory``: does each raise the reward, and does its velocity
penalty to the reference hold the policy nearer the reference as the coefficient α grows?

The toy's mixture of four Gaussians (prior masses π_k, the rarest mode the best: reward r_k), the same pre-trained
MLP flow and schedule for every objective (``ToySettings``; objective settings at their defaults: orw_cfm_w2 with the
toy's exp weights at τ = 1, nft β = 1 with the adaptive weight, awm with its EMA schedule). Measured before training
and after every epoch on samples from a fixed noise: the mean reward Σ_k m_k r_k of the mode masses m_k, the total
variation ½ Σ_k |m_k − π_k| to the reference model's masses, and the mean squared velocity gap to the reference on fixed
points (t, x). A run whose step the trainer refuses as non-finite stops there and is reported as diverged, with its
last evaluation. Writes ``toy_objectives.json``, a Markdown table and a plot into ``--out``.

    python -m experiments.toy_objectives --out experiments/results/toy_objectives
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from experiments.common import pyplot, write_results
from experiments.toy_theory import ToySettings, fine_tune, make_evaluator, pretrain
from orw_fast.trainer import ORWCFMTrainer

OBJECTIVES = ("orw_cfm_w2", "nft", "awm")


@torch.no_grad()
def velocity_gap(trainer: ORWCFMTrainer, points: int = 2048, seed: int = 1) -> float:
    """mean (v_policy − v_reference)² on fixed points t ~ U(0, 1), x ~ N(0, 2² I)."""
    g = torch.Generator().manual_seed(seed)
    t, x = torch.rand(points, generator=g), torch.randn(points, 2, generator=g) * 2
    return float((trainer.model(t, x) - trainer.reference(t, x)).pow(2).mean())


def run(s: ToySettings, objectives=OBJECTIVES, out_dir=None, *, progress: bool = True) -> dict:
    """Fine-tunes the pre-trained toy flow once per (objective, α in ``s.alphas``); returns (and, with ``out_dir``,
    writes) the records per epoch: "reward", "tv_to_reference", "velocity_gap", "masses" (and in a diverged run's
    last record "diverged", the trainer's message)."""
    base = pretrain(s, progress)
    masses = make_evaluator(s)
    rewards = torch.tensor(s.mode_rewards)

    def evaluate(trainer: ORWCFMTrainer) -> dict:
        m = masses(trainer)["masses"]
        return {
            "masses": m,
            "reward": float(torch.tensor(m) @ rewards),
            "velocity_gap": velocity_gap(trainer),
        }

    runs = {
        objective: {
            f"{alpha:g}": fine_tune(s, base, evaluate, alpha, progress, stop_if_diverged=True, objective=objective)
            for alpha in s.alphas
        }
        for objective in objectives
    }
    reference = next(iter(next(iter(runs.values())).values()))[0]["masses"]  # epoch 0: the pre-trained model
    for by_alpha in runs.values():
        for records in by_alpha.values():
            for rec in records:
                rec["tv_to_reference"] = 0.5 * sum(abs(m - p) for m, p in zip(rec["masses"], reference))
    results = {"settings": dataclasses.asdict(s), "runs": runs}
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_results(out_dir / "toy_objectives.json", results)
        (out_dir / "toy_objectives.md").write_text(format_table(results) + "\n")
        plot(results, out_dir / "toy_objectives.png")
    return results


def format_table(results: dict) -> str:
    """Markdown: per objective and α, the final epoch's reward, TV and velocity gap (epoch 0 in the first row)."""
    runs = results["runs"]
    start = next(iter(next(iter(runs.values())).values()))[0]
    lines = [
        "| objective | α | mean reward | TV to reference | velocity gap |",
        "|---|---|---|---|---|",
        f"| reference | | {start['reward']:.3f} | 0 | 0 |",
    ]
    for objective, by_alpha in runs.items():
        for alpha, records in by_alpha.items():
            r = records[-1]
            note = f" (diverged after epoch {r['epoch']}: {r['diverged'].split(':')[0]})" if "diverged" in r else ""
            lines.append(
                f"| {objective} | {alpha}{note} | {r['reward']:.3f} | {r['tv_to_reference']:.3f} | "
                f"{r['velocity_gap']:.3f} |"
            )
    return "\n".join(lines)


def plot(results: dict, path) -> None:
    """Mean reward and TV to the reference against the epoch: one panel per objective, one line per α."""
    plt = pyplot()
    runs = results["runs"]
    fig, axes = plt.subplots(2, len(runs), figsize=(4 * len(runs), 6), sharey="row", squeeze=False)
    for col, (objective, by_alpha) in enumerate(runs.items()):
        for alpha, records in by_alpha.items():
            epochs = [r["epoch"] for r in records]
            axes[0][col].plot(epochs, [r["reward"] for r in records], "o-", label=f"α = {alpha}")
            axes[1][col].plot(epochs, [r["tv_to_reference"] for r in records], "o-", label=f"α = {alpha}")
        axes[0][col].set(title=objective, ylabel="mean reward")
        axes[1][col].set(xlabel="epoch", ylabel="TV to reference")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="experiments/results/toy_objectives", help="output folder (%(default)s)")
    parser.add_argument(
        "--objectives",
        default=",".join(OBJECTIVES),
        help="comma-separated subset of " + ", ".join(OBJECTIVES) + " (%(default)s)",
    )
    parser.add_argument("--alphas", default="0,1,5", help="comma-separated velocity-penalty coefficients (%(default)s)")
    parser.add_argument("--epochs", type=int, default=ToySettings.epochs, help="(%(default)s)")
    parser.add_argument("--steps-per-epoch", type=int, default=ToySettings.steps_per_epoch, help="(%(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    objectives = tuple(args.objectives.split(","))
    if unknown := sorted(set(objectives) - set(OBJECTIVES)):
        parser.error(f"--objectives: unknown {', '.join(unknown)}; choose from {', '.join(OBJECTIVES)}")
    try:
        alphas = tuple(float(a) for a in args.alphas.split(","))
    except ValueError:
        parser.error(f"--alphas must be comma-separated numbers, got {args.alphas!r}")
    if min(alphas) < 0:
        parser.error("--alphas must be >= 0")
    if min(args.epochs, args.steps_per_epoch) < 1:
        parser.error("--epochs and --steps-per-epoch must be >= 1")
    settings = ToySettings(alphas=alphas, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch)
    results = run(settings, objectives, args.out, progress=not args.quiet)
    print(format_table(results))


if __name__ == "__main__":
    main()
