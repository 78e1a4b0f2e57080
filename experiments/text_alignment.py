"""Text-image alignment: the paper's third task at small scale, offline, on an SD3-architecture digits model.

The text-conditioned digits pipeline of ``orw_fast.tasks.text_digits`` (pre-trained here and cached; a share of its
pre-training captions named a wrong digit, so it follows the prompt's digit only part of the time) is fine-tuned
with LoRA by ORW-CFM-W2 toward prompt alignment for every alpha and seed (``orw_fast.tasks.text_alignment``: the
reward, the prompts and the per-epoch measurements on held-out prompts). Writes ``text_alignment.json``, a Markdown
table, the alignment/diversity Pareto plot, per-epoch curves and sample grids (one held-out prompt a row) into
``--out``.

    python -m experiments.text_alignment --out experiments/results/text_alignment
"""

from __future__ import annotations

from pathlib import Path

from experiments.common import write_results
from experiments.digits import sweep_cli, write_report
from orw_fast.tasks.text_alignment import COLUMNS, AlignmentSettings, run_alignment

PARETO = ("alignment", "prompt_diversity", "alignment (held-out prompts)", "diversity within a prompt")


def run(s: AlignmentSettings | None = None, out_dir=None, *, cache_dir=None, progress: bool = True) -> dict:
    """The sweep (``s``: default AlignmentSettings()); writes its report into ``out_dir`` when given."""
    s = s if s is not None else AlignmentSettings()
    out_dir = Path(out_dir) if out_dir is not None else None
    results = run_alignment(s, out_dir, cache_dir=cache_dir, progress=progress)
    if out_dir is not None:
        write_results(out_dir / "text_alignment.json", results)
        write_report(results, out_dir, "text_alignment", COLUMNS, PARETO)
    return results


def main(argv=None) -> None:
    sweep_cli(argv, __doc__, AlignmentSettings(), "experiments/results/text_alignment", run, COLUMNS)


if __name__ == "__main__":
    main()
