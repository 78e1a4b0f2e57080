"""JPEG compressibility on the 8x8 digits (DDPO's reward: minus the quality-95 JPEG size in kB), as an
alpha sweep: the JPEG size and the diversity of the fine-tuned model per alpha. Expected: the smaller
alpha, the more compressible (and less diverse) the samples.

The rewards are a few hundredths of a kB apart, so the weights are B·softmax(τ·r) with a large τ (in
1/kB): "exp" weights exp(τ·r) of rewards near -0.35 kB would underflow float32 at such τ.

    python -m experiments.jpeg_digits --out experiments/results/jpeg_digits
"""
from __future__ import annotations

from pathlib import Path

from experiments.common import write_results
from experiments.digits import SweepSettings, check_finite, run_sweep, sweep_cli, write_report
from orw_fast.rewards import jpeg_compressibility

COLUMNS = {"jpeg_kb": "JPEG size (kB)", "diversity": "diversity", "w2_to_reference": "W2 to reference",
           "class_entropy": "class entropy (nats)"}
PARETO = ("jpeg_kb", "diversity", "JPEG size (kB, lower = more compressible)", "diversity (mean pairwise distance)")
DEFAULTS = SweepSettings(alphas=(0.0, 0.5, 2.0), seeds=(0,), epochs=6, steps_per_epoch=25, temperature=300.0,
                         weighting="softmax")


def run(s: SweepSettings = DEFAULTS, out_dir=None, *, cache_dir=None, progress: bool = True) -> dict:
    """The sweep with the JPEG-compressibility reward; writes its report into ``out_dir`` when given."""
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    results = run_sweep(s, jpeg_compressibility, cache_dir=cache_dir, progress=progress, grid_dir=out_dir)
    for by_seed in results["runs"].values():
        for records in by_seed.values():
            for rec in records:
                rec["jpeg_kb"] = -rec["reward"]
    check_finite(results)
    if out_dir is not None:
        write_results(out_dir / "jpeg_digits.json", results)
        write_report(results, out_dir, "jpeg_digits", COLUMNS, PARETO)
    return results


def main(argv=None) -> None:
    sweep_cli(argv, __doc__, DEFAULTS, "experiments/results/jpeg_digits", run, COLUMNS)


if __name__ == "__main__":
    main()
