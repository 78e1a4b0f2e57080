"""The offline demo: ORW-CFM-W2 toward even digits on scikit-learn's handwritten digits.

The paper's MNIST even-number experiment at small scale: a flow-matching model and a digit classifier
are pre-trained on the 1797 8x8 digits (cached), then the model is fine-tuned online with the reward
"probability mass on even digits" for each W2 coefficient alpha. The report folder holds sample grids
before/after, reward and diversity curves, metrics.json, and the printed table (fraction of even digits
and class entropy among generated digits).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from orw_fast.checkpoint import write_text_atomic
from orw_fast.cli_paths import prepare_output_dir
from orw_fast.images import save_image_grid
from orw_fast.metrics import background_level, class_entropy, frechet_distance, mean_pairwise_distance
from orw_fast.models.flow_model import PixelFlowModel, infer_image_shape
from orw_fast.pretrain import default_cache_dir, load_flow_model, pretrain_dataset
from orw_fast.rewards import ClassifierReward, load_classifier, split_indices
from orw_fast.sampling import sample, time_grid
from orw_fast.trainer import ORWCFMTrainer, TrainerConfig

EVEN_DIGITS = (0, 2, 4, 6, 8)


@dataclasses.dataclass
class DemoSettings:
    """Settings of the demo; the defaults take a few minutes on 2 CPU cores. The method settings are those of
    experiments/even_digits.py: the paper's exp weights, whose scale e^tau sets how strongly alpha pulls
    toward the reference (about alpha / e^tau of the reward-weighted term); the rollouts are the trainer's
    default (the experiments keep the 20 uniform Euler steps their results were measured with)."""

    alphas: tuple[float, ...] = (0.0, 1.0)
    epochs: int = 16
    steps_per_epoch: int = 15
    batch_size: int = 64
    temperature: float = 2.5
    weighting: str = "exp"
    learning_rate: float = 1e-3
    sampler_steps: int | None = None  # None: the trainer's default rollout (PixelFlowModel's), else its steps
    eval_samples: int = 500
    seed: int = 0
    pretrain_steps: int = 3000


def pretrained_digits(cache_dir, *, steps: int, device, progress: bool = True, seed: int = 0):
    """(flow model, classifier) for the digits from ``cache_dir``/digits (what ``orw-fast pretrain
    --dataset digits`` writes there), pre-trained first if missing."""
    folder = Path(cache_dir) / "digits"
    if not (folder / "flow.pt").is_file() or not (folder / "classifier.pt").is_file():
        prepare_output_dir(folder, "the cache folder (--cache-dir / $ORW_FAST_CACHE)")  # before minutes of work
        print(f"pre-training the digits flow model and classifier ({steps} steps), cached in {folder}")
        result = pretrain_dataset("digits", folder, steps=steps, seed=seed, device=device, progress=progress)
        print(f"digit classifier: {result['classifier_accuracy']}")
    model, _ = load_flow_model(folder / "flow.pt")
    return model.to(device).eval(), load_classifier(folder / "classifier.pt").to(device)


def held_out_digits() -> torch.Tensor:
    """The 359 digits [359, 1, 8, 8] (model space) the classifier never trained on (its fixed held-out split)."""
    from orw_fast.data.digits import load_digits_dataset

    images, _ = load_digits_dataset()
    return images[split_indices(images.shape[0])[1]]


class DigitsQuality:
    """Sample quality of digit images [N, 1, 8, 8] in model space, N >= 2, against real digits (default: the
    held-out ones):

    - ``digits_fd``: the Fréchet distance between Gaussians fitted to the classifier's 128 penultimate features of
      the samples and of the real digits (FID's formula in a digits feature space). It grows with blur, noise and
      missing or extra modes. It is biased upward for small N, so compare models at equal N: at 500 samples
      against the 359 held-out digits, 500 real training digits score 57 (the floor), the pre-trained model about
      72, and real digits with N(0, 0.3^2) pixel noise 121.
    - ``background``: the median brightness (0-255) of the pixels darker than mid-grey (metrics.background_level):
      about 0 for real digits; a grey, noisy background raises it.
    """

    def __init__(self, classifier, real: torch.Tensor | None = None):
        self.classifier = classifier
        real = held_out_digits() if real is None else real
        self.real_features = self._features(real.to(next(classifier.parameters()).device))

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.penultimate(images.clamp(-1, 1).float())

    def __call__(self, samples: torch.Tensor) -> dict:
        return {
            "digits_fd": frechet_distance(self._features(samples), self.real_features),
            "background": background_level(samples),
        }


@torch.no_grad()
def evaluate_digits(
    model,
    classifier,
    *,
    n: int,
    sampler_steps: int,
    method: str = "euler",
    grid: str = "uniform",
    seed: int = 1234,
    quality: DigitsQuality | None = None,
):
    """Statistics of n samples of ``model`` (``sampler_steps`` steps of ``method`` on ``grid``): fraction classified
    even, class entropy (nats, over the 10 digits), mean pairwise distance, and with ``quality`` its digits FD and
    background level; returns (stats, samples)."""
    device = next(model.parameters()).device
    x0 = torch.randn(
        (n, *infer_image_shape(model)), device=device, generator=torch.Generator(device=device).manual_seed(seed)
    )
    model.eval()
    x1 = sample(model, x0, times=time_grid(grid, sampler_steps), method=method, cuda_graph=False)
    labels = classifier(x1.clamp(-1, 1)).argmax(dim=1)
    counts = torch.bincount(labels.cpu(), minlength=10)
    stats = {
        "even_fraction": float(counts[list(EVEN_DIGITS)].sum()) / n,
        "class_entropy": class_entropy(labels, 10),
        "diversity": float(mean_pairwise_distance(x1)),
        "class_counts": counts.tolist(),
        **(quality(x1) if quality is not None else {}),
    }
    return stats, x1


def run_demo(out_dir, settings: DemoSettings | None = None, *, cache_dir=None, device="cpu", progress=True) -> dict:
    """Runs the demo and writes its report into ``out_dir``; returns the metrics."""
    s = settings or DemoSettings()
    out_dir, device = prepare_output_dir(out_dir, "the report folder"), torch.device(device)
    configs = {
        alpha: TrainerConfig(  # every setting is checked before the pre-training starts
            learning_rate=s.learning_rate,
            w2_coefficient=alpha,
            temperature=s.temperature,
            weighting=s.weighting,
            batch_size=s.batch_size,
            sampler_steps=s.sampler_steps,  # with the model's own rollout method and grid
            savedir=str(out_dir / f"alpha_{alpha:g}"),
            seed=s.seed,
            grid_size=64,
            checkpoint_every=0,
        )
        for alpha in s.alphas
    }
    base, classifier = pretrained_digits(
        cache_dir or default_cache_dir(), steps=s.pretrain_steps, device=device, progress=progress, seed=s.seed
    )
    reward, quality = ClassifierReward(classifier, EVEN_DIGITS), DigitsQuality(classifier)
    method, grid = PixelFlowModel.rollout_method, PixelFlowModel.rollout_grid  # the trainer's rollouts
    steps = s.sampler_steps or PixelFlowModel.rollout_steps
    stats, x1 = evaluate_digits(
        base, classifier, n=s.eval_samples, sampler_steps=steps, method=method, grid=grid, quality=quality
    )
    save_image_grid(x1[:64], out_dir / "samples_base.png", scale=4)
    report = {"settings": dataclasses.asdict(s), "base": stats, "runs": {}}
    for alpha, config in configs.items():
        start = time.perf_counter()
        trainer = ORWCFMTrainer(copy.deepcopy(base), config, device, reward_fn=reward)  # reference = base
        history = trainer.train(s.epochs, s.steps_per_epoch, progress=progress)
        stats, x1 = evaluate_digits(
            trainer.model,
            classifier,
            n=s.eval_samples,
            sampler_steps=steps,
            method=method,
            grid=grid,
            quality=quality,
        )
        save_image_grid(x1[:64], out_dir / f"samples_alpha_{alpha:g}.png", scale=4)
        stats["train_seconds"] = time.perf_counter() - start
        report["runs"][f"{alpha:g}"] = {"final": stats, "history": history}
    _plot_curves(report, out_dir / "curves.png")
    write_text_atomic(out_dir / "metrics.json", json.dumps(report, indent=1))
    print(format_table(report))
    return report


def format_table(report: dict) -> str:
    rows = [("base model", report["base"])] + [(f"alpha = {a}", r["final"]) for a, r in report["runs"].items()]
    lines = [
        "| model | even digits | class entropy (nats, max ln 10 = 2.30) | diversity | digits FD | background |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {st['even_fraction']:.1%} | {st['class_entropy']:.2f} | {st['diversity']:.2f} | "
        f"{st['digits_fd']:.1f} | {st['background']:.0f} |"
        for name, st in rows
    ]
    return "\n".join(lines)


def _plot_curves(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for alpha, run in report["runs"].items():
        history = run["history"]
        axes[0].plot([m["step"] for m in history], [m["reward_mean"] for m in history], label=f"alpha={alpha}")
        measured = [m for m in history if "diversity" in m]  # every config.diversity_every steps
        axes[1].plot([m["step"] for m in measured], [m["diversity"] for m in measured], label=f"alpha={alpha}")
    axes[0].set(xlabel="step", ylabel="mean reward (P[even])", title="reward")
    axes[1].set(xlabel="step", ylabel="mean pairwise distance", title="batch diversity")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
