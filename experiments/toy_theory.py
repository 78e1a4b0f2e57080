"""Theory check on a 2-D toy: at alpha = 0, ORW-CFM with exp weights tilts the base distribution by the
reward once per epoch, q_N(x) ∝ exp(N·τ·r(x))·q_0(x) (the paper's q_N ∝ w^N q_0).

The base distribution is a mixture of well separated Gaussians with prior masses π_k and a reward that
is constant on each mode (r_k), so the prediction is a closed form for the mode masses:
p_k(N) = π_k·exp(N·τ·r_k) / Σ_j π_j·exp(N·τ·r_j). A small MLP flow is pre-trained on the mixture, then
fine-tuned online with ``weighting="exp"``; after each epoch (long enough for the policy to converge to
the tilted last policy) the mode masses of its samples are measured and compared with p_k(N). Runs with
alpha > 0 show the W2 term holding the masses back toward the prior. Runs at alpha = 0 with ``rollout_reuse`` r > 1
(each rollout of the last policy serves r updates, 1/r of the rollouts) check that reusing rollouts does not move
the masses away from the prediction beyond the sampling noise.

    python -m experiments.toy_theory --out experiments/results/toy
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
from pathlib import Path

import torch

from experiments.common import pyplot, write_results
from orw_fast.sampling import sample
from orw_fast.tasks.sweeps import evaluated_run
from orw_fast.trainer import ORWCFMTrainer, TrainerConfig


@dataclasses.dataclass
class ToySettings:
    """The toy problem and its fine-tuning schedule (defaults: ~3 min on 2 CPU cores)."""

    prior: tuple[float, ...] = (0.4, 0.3, 0.2, 0.1)  # π_k
    mode_rewards: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)  # r_k: the rarest mode is the best
    radius: float = 3.0  # modes on a circle of this radius
    mode_std: float = 0.3
    tau: float = 1.0
    alphas: tuple[float, ...] = (0.0, 0.3, 1.0)
    reuse_factors: tuple[int, ...] = (2, 4, 8)  # rollout_reuse of extra alpha = 0 runs (1 is the alpha = 0 run)
    epochs: int = 5
    steps_per_epoch: int = 400  # enough for the policy to converge to the tilted last policy
    batch_size: int = 256
    learning_rate: float = 3e-3
    sampler_steps: int = 20
    pretrain_steps: int = 3000
    eval_samples: int = 4000
    seed: int = 0


def mode_centers(s: ToySettings) -> torch.Tensor:
    """[K, 2] centres, evenly spaced on a circle."""
    angles = torch.arange(len(s.prior), dtype=torch.float32) * (2 * math.pi / len(s.prior))
    return s.radius * torch.stack([angles.cos(), angles.sin()], dim=1)


def sample_mixture(s: ToySettings, n: int, generator: torch.Generator) -> torch.Tensor:
    """n points [n, 2] from the mixture with masses ``s.prior``."""
    modes = torch.multinomial(torch.tensor(s.prior), n, replacement=True, generator=generator)
    return mode_centers(s)[modes] + s.mode_std * torch.randn(n, 2, generator=generator)


def nearest_mode(s: ToySettings, x: torch.Tensor) -> torch.Tensor:
    """Index [N] of the closest mode centre of each point of x [N, 2]."""
    return torch.cdist(x.float(), mode_centers(s)).argmin(dim=1)


def mode_masses(s: ToySettings, x: torch.Tensor) -> list[float]:
    """Fraction of the points of x [N, 2] nearest to each mode."""
    return (torch.bincount(nearest_mode(s, x), minlength=len(s.prior)).double() / x.shape[0]).tolist()


def predicted_masses(s: ToySettings, epochs: int, start=None) -> list[float]:
    """The alpha = 0 theory: masses after ``epochs`` tilts of ``start`` (default the prior π),
    p_k ∝ start_k·exp(epochs·τ·r_k)."""
    start = torch.tensor(s.prior if start is None else start, dtype=torch.float64)
    logits = start.log() + epochs * s.tau * torch.tensor(s.mode_rewards, dtype=torch.float64)
    return torch.softmax(logits, dim=0).tolist()


class ToyField(torch.nn.Module):
    """MLP flow field v(t, x) on 2-D points; t: [B], x: [B, 2]."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, 2),
        )

    def forward(self, t, x):
        return self.net(torch.cat([t[:, None], x], dim=1))


def pretrain(s: ToySettings, progress: bool = True) -> ToyField:
    """Conditional flow matching (independent coupling) on the mixture; Adam with cosine decay."""
    from tqdm.auto import trange

    generator = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed)
    model = ToyField()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, s.pretrain_steps)
    for _ in trange(s.pretrain_steps, disable=not progress, desc="pre-training", leave=False):
        x1 = sample_mixture(s, 512, generator)
        x0, t = torch.randn(512, 2, generator=generator), torch.rand(512, generator=generator)
        xt = t[:, None] * x1 + (1 - t[:, None]) * x0
        loss = (model(t, xt) - (x1 - x0)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def make_evaluator(s: ToySettings):
    """trainer -> {"masses", "predicted"} measured on ``s.eval_samples`` samples from a fixed noise."""
    x0 = torch.randn(s.eval_samples, 2, generator=torch.Generator().manual_seed(s.seed + 999))

    def evaluate(trainer: ORWCFMTrainer) -> dict:
        trainer.model.eval()
        x1 = sample(trainer.model, x0, steps=50, method="midpoint", cuda_graph=False)
        return {"masses": mode_masses(s, x1)}

    return evaluate


def reward_fn(s: ToySettings):
    """r(x) = r_k of the nearest mode."""
    rewards = torch.tensor(s.mode_rewards)
    return lambda x: rewards[nearest_mode(s, x)]


def fine_tune(
    s: ToySettings, base, evaluate, alpha: float, progress: bool = True, *, stop_if_diverged=False, **overrides
) -> list[dict]:
    """One online fine-tuning of a copy of the pre-trained toy flow ``base`` with the toy's schedule, exp weights at
    τ and W2 coefficient ``alpha`` (``overrides``: other TrainerConfig values, e.g. the objective); the records of
    :func:`~orw_fast.tasks.sweeps.evaluated_run` with ``evaluate``."""
    config = TrainerConfig(
        image_shape=(2,),
        batch_size=s.batch_size,
        learning_rate=s.learning_rate,
        temperature=s.tau,
        weighting="exp",
        w2_coefficient=alpha,
        grad_clip=0.0,
        sampler_steps=s.sampler_steps,
        sampler_method="euler",
        sampler_grid="uniform",
        grid_size=0,
        seed=s.seed,
        **overrides,
    )
    return evaluated_run(
        lambda callbacks: ORWCFMTrainer(
            copy.deepcopy(base), config, "cpu", reward_fn=reward_fn(s), callbacks=callbacks
        ),
        s.epochs,
        s.steps_per_epoch,
        evaluate,
        progress,
        stop_if_diverged=stop_if_diverged,
    )


def run(s: ToySettings, out_dir=None, *, progress: bool = True) -> dict:
    """Pre-trains, fine-tunes once per alpha and returns (and, with ``out_dir``, writes) the masses per
    epoch with the prediction and the largest |measured − predicted| of the alpha = 0 run."""
    if not (len(s.prior) == len(s.mode_rewards) and abs(sum(s.prior) - 1) < 1e-9):
        raise ValueError("prior and mode_rewards must have one entry per mode and the prior must sum to 1")
    base = pretrain(s, progress)
    evaluate = make_evaluator(s)
    runs = {f"{alpha:g}": fine_tune(s, base, evaluate, alpha, progress) for alpha in s.alphas}
    reuse_runs = {str(r): fine_tune(s, base, evaluate, 0.0, progress, rollout_reuse=r) for r in s.reuse_factors}
    prediction = [predicted_masses(s, n) for n in range(s.epochs + 1)]

    def errors(records):  # q_N ∝ w^N q_0: the largest |measured - predicted| mass per epoch
        return [max(abs(m - p) for m, p in zip(rec["masses"], pred)) for rec, pred in zip(records, prediction)]

    alpha0 = runs.get("0", [])
    # q_N ∝ w q_{N-1}: one tilt of the previous epoch's measured masses
    one_epoch = [
        max(abs(m - p) for m, p in zip(rec["masses"], predicted_masses(s, 1, prev["masses"])))
        for prev, rec in zip(alpha0, alpha0[1:])
    ]
    results = {
        "settings": dataclasses.asdict(s),
        "predicted": prediction,
        "runs": runs,
        "alpha0_max_abs_error_per_epoch": errors(alpha0),
        "alpha0_one_epoch_max_abs_error": one_epoch,
        "reuse_runs": reuse_runs,
        "reuse_max_abs_error_per_epoch": {r: errors(records) for r, records in reuse_runs.items()},
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_results(out_dir / "toy_theory.json", results)
        plot(results, out_dir / "toy_mode_masses.png")
        (out_dir / "toy_theory.md").write_text(format_table(results) + "\n")
    return results


def format_table(results: dict) -> str:
    """Markdown: measured vs predicted mass of each mode per epoch (alpha = 0), then the alpha > 0 runs."""
    s, k = results["settings"], len(results["settings"]["prior"])
    head = " | ".join(f"mode {i} (r={r:g})" for i, r in enumerate(s["mode_rewards"]))
    lines = [f"| alpha | epoch | {head} | max abs error |", "|---" * (k + 3) + "|"]
    for alpha, records in results["runs"].items():
        for rec, pred in zip(records, results["predicted"]):
            cells = " | ".join(f"{m:.3f} ({p:.3f})" for m, p in zip(rec["masses"], pred))
            err = max(abs(m - p) for m, p in zip(rec["masses"], pred))
            lines.append(f"| {alpha} | {rec['epoch']} | {cells} | {err:.3f} |")
    if results.get("reuse_runs"):
        lines += [
            "",
            "alpha = 0 with rollout_reuse r (each rollout serves r updates): max abs error per epoch",
            "",
            "| rollout_reuse | " + " | ".join(f"epoch {n}" for n in range(len(results["predicted"]))) + " |",
            "|---" * (len(results["predicted"]) + 1) + "|",
            "| 1 | " + " | ".join(f"{e:.3f}" for e in results["alpha0_max_abs_error_per_epoch"]) + " |",
        ]
        lines += [
            f"| {r} | " + " | ".join(f"{e:.3f}" for e in errs) + " |"
            for r, errs in results["reuse_max_abs_error_per_epoch"].items()
        ]
    return "\n".join(lines)


def plot(results: dict, path) -> None:
    """Mode mass vs epoch: measured (markers, one panel per alpha) against the alpha = 0 prediction (lines)."""
    plt = pyplot()
    runs = results["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.6), sharey=True, squeeze=False)
    epochs = range(len(results["predicted"]))
    for ax, (alpha, records) in zip(axes[0], runs.items()):
        for k in range(len(results["settings"]["prior"])):
            (line,) = ax.plot(epochs, [p[k] for p in results["predicted"]], "--", alpha=0.6)
            ax.plot(
                [r["epoch"] for r in records],
                [r["masses"][k] for r in records],
                "o-",
                color=line.get_color(),
                label=f"mode {k}, r={results['settings']['mode_rewards'][k]:g}",
            )
        ax.set(title=f"alpha = {alpha}", xlabel="epoch N", ylabel="mode mass")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("measured (o) vs predicted p_k ∝ π_k exp(N τ r_k) (--)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="experiments/results/toy", help="output folder (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=ToySettings.epochs)
    parser.add_argument("--steps-per-epoch", type=int, default=ToySettings.steps_per_epoch)
    parser.add_argument("--seed", type=int, default=ToySettings.seed)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    settings = ToySettings(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, seed=args.seed)
    results = run(settings, args.out, progress=not args.quiet)
    print(format_table(results))


if __name__ == "__main__":
    main()
