"""Runs every experiment with its default settings into ``--out`` (default experiments/results) and records how
long each took (``timing.json``).

The digits model is pre-trained first (when not cached) in this process; the four experiments then run in
``--jobs`` processes of ``--threads`` torch threads each, longest first, each writing its progress into
``--out``/logs/<experiment>.log. On 2 CPU cores, 2 jobs of 1 thread take about 22 minutes with nothing cached
against 33 for one 2-thread process, since the small models gain little from a second thread. Results depend
slightly on the thread count: the committed ones are from 2 jobs of 1 thread.

    python -m experiments.run_all
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from experiments import even_digits, jpeg_digits, text_alignment, toy_theory
from experiments.common import write_results
from experiments.digits import SweepSettings
from orw_fast.cli import _POSITIVE_INT
from orw_fast.pretrain import default_cache_dir
from orw_fast.tasks.demo import pretrained_digits


def _toy(out: Path, progress: bool) -> None:
    print(toy_theory.format_table(toy_theory.run(toy_theory.ToySettings(), out / "toy", progress=progress)))


def _even(out: Path, progress: bool) -> None:
    even_digits.run(SweepSettings(), out / "even_digits", progress=progress)


def _jpeg(out: Path, progress: bool) -> None:
    jpeg_digits.run(jpeg_digits.DEFAULTS, out / "jpeg_digits", progress=progress)


def _text(out: Path, progress: bool) -> None:
    text_alignment.run(text_alignment.AlignmentSettings(), out / "text_alignment", progress=progress)


#: The experiments, longest first (the order they are handed to the jobs), each a function of (out, progress).
EXPERIMENTS: dict[str, Callable[[Path, bool], None]] = {
    "even_digits": _even,
    "text_alignment": _text,
    "jpeg_digits": _jpeg,
    "toy_theory": _toy,
}


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def run_in_job(fn: Callable[[], object], log: Path) -> dict:
    """Runs ``fn()`` with this process's stdout and stderr sent to ``log`` (a job of ``run_stages``); returns its
    seconds and the torch threads and process it ran on. An exception is written to the log and raised."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
        t0 = time.perf_counter()
        try:
            fn()
        except BaseException:
            traceback.print_exc()
            raise
        finally:
            sys.stdout.flush(), sys.stderr.flush()
        return {"seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(), "pid": os.getpid()}


def run_stages(
    stages: dict[str, Callable[[], object]], logs: Path, *, jobs: int, threads: int, progress: bool = True
) -> dict[str, dict]:
    """Runs each of ``stages`` (picklable callables, handed out in their order) in a fresh process of a pool of
    ``jobs``, each process with ``threads`` torch threads and its output in ``logs``/<name>.log; returns what
    ``run_in_job`` returned for each. When one fails, the others are stopped and a ``RuntimeError`` names it and
    its log."""
    for arg, value in (("jobs", jobs), ("threads", threads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    done: dict[str, dict] = {}
    ctx = multiprocessing.get_context("spawn")
    with (
        ctx.Pool(jobs, initializer=_set_threads, initargs=(threads,), maxtasksperchild=1) as pool,
        tqdm(
            total=len(stages),
            desc="experiments",
            disable=not progress,
            bar_format="{l_bar}{bar}| {n}/{total} [{elapsed}{postfix}]",
        ) as bar,
    ):
        pending = {name: pool.apply_async(run_in_job, (fn, logs / f"{name}.log")) for name, fn in stages.items()}
        while pending:
            for name, result in list(pending.items()):
                if not result.ready():
                    continue
                del pending[name]
                try:
                    done[name] = result.get()
                except Exception as e:
                    pool.terminate()
                    raise RuntimeError(
                        f"experiment {name} failed ({type(e).__name__}: {e}); its output is in {logs / f'{name}.log'}"
                    ) from e
                bar.write(f"{name}: {done[name]['seconds']:.0f} s")
                bar.update()
            bar.set_postfix_str(f"not done: {', '.join(pending)}" if pending else "")
            time.sleep(0.2)
    return done


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="experiments/results", help="output folder (%(default)s)")
    parser.add_argument(
        "--jobs", type=_POSITIVE_INT, default=2, help="experiments run at once, one process each (%(default)s)"
    )
    parser.add_argument("--threads", type=_POSITIVE_INT, default=1, help="torch threads per job (%(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    out, progress = Path(args.out), not args.quiet
    start = time.perf_counter()
    pretrained_digits(default_cache_dir(), steps=SweepSettings.pretrain_steps, device="cpu", progress=progress)
    timing = {"pretrain digits (skipped when cached)": round(time.perf_counter() - start, 1)}
    print(f"logs of the experiments: {out / 'logs'}", flush=True)
    stages = {name: functools.partial(fn, out, progress) for name, fn in EXPERIMENTS.items()}
    ran = run_stages(stages, out / "logs", jobs=args.jobs, threads=args.threads, progress=progress)
    timing.update({name: ran[name]["seconds"] for name in EXPERIMENTS})
    timing["total"] = round(time.perf_counter() - start, 1)
    write_results(
        out / "timing.json",
        {
            "seconds": timing,
            "jobs": args.jobs,
            "threads_per_job": args.threads,
            "pretrain_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
        },
    )
    print(json.dumps(timing, indent=1))


if __name__ == "__main__":
    main()
