"""JPEG compressibility on the 8x8 digits (DDPO's reward: minus the quality-95 JPEG size in kB), as an
alpha sweep: the JPEG size and the diversity of the fine-tuned model per alpha. Expected: the smaller
alpha, the more compressible (and less diverse) the samples.

The rewards are a few hundredths of a kB apart, so the weights are B·softmax(τ·r) with a large τ (in
1/kB): "exp" weights exp(τ·r) of rewards near -0.35 kB would underflow float32 at such τ.

    python -m experiments.jpeg_digits --out experiments/results/jpeg_digits
"""

from __future__ import annotations

from experiments.digits import SweepSettings, run_sweep, sweep_cli
from orw_fast.rewards import jpeg_compressibility

COLUMNS = {
    "jpeg_kb": "JPEG size (kB)",
    "diversity": "diversity",
    "w2_to_reference": "W2 to reference",
    "class_entropy": "class entropy (nats)",
    "digits_fd": "digits FD",
    "background": "background (0-255)",
}
PARETO = ("jpeg_kb", "diversity", "JPEG size (kB, lower = more compressible)", "diversity (mean pairwise distance)")
DEFAULTS = SweepSettings(
    alphas=(0.0, 0.5, 2.0), seeds=(0,), epochs=6, steps_per_epoch=25, temperature=300.0, weighting="softmax"
)


def run(s: SweepSettings = DEFAULTS, out_dir=None, *, cache_dir=None, progress: bool = True) -> dict:
    """The sweep with the JPEG-compressibility reward; writes its report into ``out_dir`` when given."""
    return run_sweep(
        s,
        lambda classifier: jpeg_compressibility,
        name="jpeg_digits",
        columns=COLUMNS,
        pareto=PARETO,
        derive=lambda record: {"jpeg_kb": -record["reward"]},
        out_dir=out_dir,
        cache_dir=cache_dir,
        progress=progress,
    )


def main(argv=None) -> None:
    sweep_cli(argv, __doc__, DEFAULTS, "experiments/results/jpeg_digits", run, COLUMNS)


if __name__ == "__main__":
    main()
