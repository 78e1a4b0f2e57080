"""Even digits: the paper's MNIST even-number experiment on scikit-learn's 8x8 digits, as an alpha sweep.

Reward: the digit classifier's probability that a sample is an even digit. For each alpha and seed the
demo's pre-trained flow model is fine-tuned online; per epoch we measure the fraction of even digits,
the class entropy over the generated digits (ln 5 = 1.61 nats when the five even classes are equally
frequent), diversity and W2 to the reference samples (exact OT, POT). Writes ``even_digits.json``, a
Markdown table, the reward/diversity Pareto plot, per-epoch curves and sample grids into ``--out``.

    python -m experiments.even_digits --out experiments/results/even_digits
"""

from __future__ import annotations

from experiments.digits import SweepSettings, run_sweep, sweep_cli
from orw_fast.rewards import ClassifierReward
from orw_fast.tasks.demo import EVEN_DIGITS

COLUMNS = {
    "even_fraction": "even digits",
    "class_entropy": "class entropy (nats)",
    "diversity": "diversity",
    "w2_to_reference": "W2 to reference",
    "digits_fd": "digits FD",
    "background": "background (0-255)",
}
PARETO = ("even_fraction", "class_entropy", "fraction of even digits (reward)", "class entropy (nats, diversity)")


def run(s: SweepSettings, out_dir=None, *, cache_dir=None, progress: bool = True) -> dict:
    """The sweep with the even-digit reward; writes its report into ``out_dir`` when given."""
    return run_sweep(
        s,
        lambda classifier: ClassifierReward(classifier, EVEN_DIGITS),
        name="even_digits",
        columns=COLUMNS,
        pareto=PARETO,
        out_dir=out_dir,
        cache_dir=cache_dir,
        progress=progress,
    )


def main(argv=None) -> None:
    sweep_cli(argv, __doc__, SweepSettings(), "experiments/results/even_digits", run, COLUMNS)


if __name__ == "__main__":
    main()
