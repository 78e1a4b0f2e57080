"""Runs every experiment with its default settings into ``--out`` (default experiments/results) and
records how long each took (``timing.json``). About 33 minutes on 2 CPU cores with nothing cached (2026-12-02).

    python -m experiments.run_all
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from experiments import even_digits, jpeg_digits, text_alignment, toy_theory
from experiments.common import write_results
from experiments.digits import SweepSettings
from orw_fast.demo import pretrained_digits
from orw_fast.pretrain import default_cache_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="experiments/results", help="output folder (%(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    out, progress = Path(args.out), not args.quiet
    timing, start = {}, time.perf_counter()

    def timed(name, fn):
        t0 = time.perf_counter()
        fn()
        timing[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {timing[name]:.0f} s", flush=True)

    timed("pretrain digits (skipped when cached)",
          lambda: pretrained_digits(default_cache_dir(), steps=SweepSettings.pretrain_steps, device="cpu",
                                    progress=progress))
    timed("toy_theory", lambda: print(toy_theory.format_table(
        toy_theory.run(toy_theory.ToySettings(), out / "toy", progress=progress))))
    timed("even_digits", lambda: even_digits.run(SweepSettings(), out / "even_digits", progress=progress))
    timed("jpeg_digits", lambda: jpeg_digits.run(jpeg_digits.DEFAULTS, out / "jpeg_digits", progress=progress))
    timed("text_alignment (pre-training the text model when not cached)",
          lambda: text_alignment.run(text_alignment.AlignmentSettings(), out / "text_alignment", progress=progress))
    timing["total"] = round(time.perf_counter() - start, 1)
    write_results(out / "timing.json", {"seconds": timing, "cpu": platform.processor() or platform.machine(),
                                        "threads": torch.get_num_threads(), "torch": torch.__version__})
    print(json.dumps(timing, indent=1))


if __name__ == "__main__":
    main()
