"""Helpers shared by the benchmark scripts: timing, run metadata, argument parsing, tables and the
result files (JSON, CSV, Markdown, PNG) under benchmarks/results/<device-slug>/.

Timing follows benchmarks' usual method on GPUs: warm up first (compilation, graph capture, autotuning
stay out of the numbers), time with CUDA events, repeat and report the median with its quartiles; with
``flush_l2`` each timed call starts from a cold L2 (a large buffer is zeroed before it, like
``triton.testing.do_bench``), so small inputs are not served from the cache.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import io
import itertools
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from orw_fast.checkpoint import write_text_atomic

try:
    import resource  # page-fault counts of the CPU timings
except ImportError:  # Windows: no getrusage, no counts
    resource = None

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
L2_FLUSH_BYTES = 256 * 10**6  # at least this many bytes are zeroed to evict L2 (triton's do_bench: 256 MB)


# ---------------------------------------------------------------------------------------------
# Devices


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M) if cpuinfo.exists() else None
    return match.group(1).strip() if match else (platform.processor() or platform.machine())


def slug(name: str) -> str:
    """'AMD EPYC 7B13 64-Core Processor' -> 'amd-epyc-7b13-64-core-processor'."""
    return re.sub(r"[^a-z0-9]+", "-", re.sub(r"\((r|tm)\)", "", name.lower())).strip("-")


def device_slug(device: torch.device) -> str:
    """The results folder of a device: benchmarks/results/<slug of its name>/."""
    return slug(device_name(device))


def parse_device(text: str) -> torch.device:
    """argparse type: cpu, cuda or cuda:N; "cuda" becomes the current device with its index (cuda:0)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device must be cpu or cuda[:N], got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    """Per-call times in ms (each sample the mean of ``calls_per_sample`` back-to-back calls) and, where measured,
    the minor page faults per call during the same samples (:data:`PAGE_FAULTS_METHOD`)."""

    samples_ms: list[float]
    calls_per_sample: int
    l2_flushed: bool
    faults_per_call: list[float] | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    def summary(self) -> dict:
        q1, _, q3 = (
            statistics.quantiles(self.samples_ms, n=4, method="inclusive")
            if len(self.samples_ms) > 1
            else (self.samples_ms * 3)
        )
        return {
            "median_ms": self.median,
            "q1_ms": q1,
            "q3_ms": q3,
            "min_ms": min(self.samples_ms),
            "max_ms": max(self.samples_ms),
            "samples": len(self.samples_ms),
            "calls_per_sample": self.calls_per_sample,
            "l2_flushed": self.l2_flushed,
            "page_faults_per_call": None if self.faults_per_call is None else statistics.median(self.faults_per_call),
        }


PAGE_FAULTS_METHOD = (
    "median over the timed samples of the minor page faults per call (getrusage ru_minflt around each sample): "
    "first touches of pages the process had not mapped, e.g. buffers malloc returned to the OS and maps again, "
    "each one spends operating-system time inside the call; CPU only"
)


def _minor_faults() -> int:
    """The process's minor page faults so far (getrusage ru_minflt; needs ``resource``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


_FLUSH_BUFFERS: dict = {}


def _last_level_cache_bytes(device: torch.device) -> int:
    """The GPU's L2, or the CPU's L3 as the OS reports it (0 when it does not)."""
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    try:
        return max(0, int(os.sysconf("SC_LEVEL3_CACHE_SIZE")))
    except (ValueError, OSError):
        return 0


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    if device not in _FLUSH_BUFFERS:
        nbytes = max(L2_FLUSH_BYTES, 4 * _last_level_cache_bytes(device))
        _FLUSH_BUFFERS[device] = torch.empty(nbytes // 4, dtype=torch.int32, device=device)
    return _FLUSH_BUFFERS[device]


def time_ms(fn: Callable[[], object], device: torch.device, **options) -> Timing:
    """Times ``fn()``: :func:`time_interleaved_ms` of one function (the same keyword options)."""
    return time_interleaved_ms({"fn": fn}, device, **options)["fn"]


def time_interleaved_ms(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    repeats: int,
    warmup_s: float = 0.2,
    warmup_calls: int = 3,
    min_sample_s: float = 0.0,
    flush_l2: bool = False,
) -> dict[str, Timing]:
    """Times each of ``fns`` side by side: after its warm-up (at least ``warmup_calls`` calls and ``warmup_s``
    seconds), ``repeats`` rounds of one sample of every function, in an order rotated each round, so that a
    machine that slows down or speeds up during the run moves every function's samples alike and their ratios
    hold. CUDA: events around the calls on the current stream; CPU: the clock, and the minor page faults of each
    sample (getrusage, read outside the timed region). ``flush_l2``: every sample is one call after the
    last-level cache is flushed (the GPU's L2, the CPU's L3: a buffer of >= 4x its size zeroed outside the timed
    region), as in a training step, where the model's forward and backward evict the loss's inputs. Otherwise a
    sample is the mean of as many back-to-back calls as last ``min_sample_s`` (timer resolution, launch gaps), after
    one untimed call of the same function: with the order rotated, each function always follows the same other one,
    and a first call on the caches a heavier predecessor left (on a CPU, 0.2-0.4 ms after a 10 ms eager loss) would
    bias the comparison against whichever function follows it."""
    number = {}
    for name, fn in fns.items():
        calls, start = 0, time.perf_counter()
        while calls < warmup_calls or time.perf_counter() - start < warmup_s:
            fn()
            calls += 1
        synchronize(device)
        per_call = (time.perf_counter() - start) / max(calls, 1)
        number[name] = 1 if flush_l2 else max(1, math.ceil(min_sample_s / max(per_call, 1e-9)))
    flush = _l2_flush_buffer(device) if flush_l2 else None
    names = list(fns)
    cuda = device.type == "cuda"
    samples: dict[str, list] = {name: [] for name in names}
    faults: dict[str, list] | None = None if cuda or resource is None else {name: [] for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            if flush is not None:
                flush.zero_()
            elif len(names) > 1:
                fns[name]()  # untimed (docstring): the timed calls start on this function's own caches
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
            else:
                f0 = 0 if faults is None else _minor_faults()
                t0 = time.perf_counter()
            for _ in range(number[name]):
                fns[name]()
            if cuda:
                end.record()
                samples[name].append((begin, end))
            else:
                samples[name].append((time.perf_counter() - t0) * 1e3 / number[name])
                if faults is not None:
                    faults[name].append((_minor_faults() - f0) / number[name])
    if cuda:
        synchronize(device)
        samples = {n: [b.elapsed_time(e) / number[n] for b, e in pairs] for n, pairs in samples.items()}
    return {
        name: Timing(samples[name], number[name], flush_l2, None if faults is None else faults[name]) for name in names
    }


def time_wall_ms(fn: Callable[[], object], device: torch.device, *, repeats: int, warmup_calls: int = 1) -> Timing:
    """Host wall-clock per call, the device synchronized before and after each call: for work that
    syncs with the host itself (``.item()``, a CPU reward, an OT solve on the CPU)."""
    for _ in range(warmup_calls):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return Timing(samples, 1, False)


@contextmanager
def _quiet_stderr():
    """Silences file descriptor 2 inside the block (the profiler's C++ start/stop logging)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory one call of ``fn`` allocates on top of what is allocated before it. CUDA: the
    caching allocator's peak statistics. CPU: the peak of the running sum of the allocations and frees
    that torch.profiler (profile_memory=True) records during the call."""
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with (
        _quiet_stderr(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


PEAK_MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated during one call minus memory_allocated before it",
    "cpu": "peak of the running sum of the allocations/frees torch.profiler (profile_memory=True) records during one "
    "call",
}


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Run metadata


def git_commit() -> str:
    """Short HEAD commit, with "-dirty" when files (results excepted) differ from it or are untracked."""

    def git(*args):
        cmd = ["git", "-C", str(REPO_ROOT), *args]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        changes = git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("ORW_FAST_COMMIT", "unknown")
    return commit + ("-dirty" if changes.strip() else "")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_metadata(device: torch.device, benchmark: str, **extra) -> dict:
    """Device, date, commit, versions, threads and load of this run (plus ``extra``)."""
    meta = {
        "benchmark": benchmark,
        "device": device.type,
        "device_name": device_name(device),
        "device_slug": device_slug(device),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
    }
    if device.type == "cuda":
        meta["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    meta.update(extra)
    return meta


def warn_if_loaded(meta: dict) -> None:
    load = meta["load_average_start"][0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {meta['load_average_start']} on {os.cpu_count()} CPUs: timings may be disturbed")


def finish_metadata(meta: dict) -> None:
    meta["load_average_end"] = [round(x, 2) for x in os.getloadavg()]


def dry_run(name: str, device, cases: Iterable[Sequence]) -> int:
    """What a benchmark's --dry-run prints instead of measuring: its name, device and one line per case; returns 0."""
    cases = [" ".join(map(str, case)) for case in cases]
    print(f"dry run of {name} on {device}: {len(cases)} case(s), nothing measured or written")
    for case in cases:
        print(f"  {case}")
    return 0


def finish_run(args, name: str, meta: dict, rows: list[dict], format_report: Callable, plot: Callable) -> int:
    """Ends a benchmark's run: prints its table, writes its results (and, with --plot, its figure) under
    args.out; returns the exit status, 0 when every row ran."""
    finish_metadata(meta)
    report = format_report(meta, rows)
    print(report)
    figure = plot(meta, rows) if args.plot else None
    paths = write_results(args.out, name, meta, rows, report, quick=args.quick, figure=figure)
    print("wrote " + ", ".join(map(str, paths)))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def report_head(meta: dict) -> list[str]:
    """A report's title (benchmark and device) and its metadata bullet lines."""
    return [f"# {meta['benchmark']}: {meta['device_name']}", "", *metadata_lines(meta)]


def metadata_lines(meta: dict) -> list[str]:
    """The Markdown bullet lines every report starts with."""
    hw = meta.get("hardware") or {}
    lines = [
        f"- date (UTC) {meta['date_utc']}, commit {meta['git_commit']}, torch {meta['torch']}, "
        f"triton {meta['triton']}, CUDA {meta['cuda']}, python {meta['python']}",
        f"- CPU count {meta['cpu_count']}, torch threads {meta['torch_threads']}, load average (1/5/15 min) "
        f"{meta['load_average_start']} at the start, {meta.get('load_average_end')} at the end",
        f"- command: `{meta['command']}`",
    ]
    if hw:
        lines.append(
            f"- measured in this run: {hw['copy_gbs']:.4g} GB/s copy bandwidth ({hw['copy_method']}), "
            f"{hw['matmul_tflops']:.4g} TFLOP/s {hw['matmul_dtype']} matmul ({hw['matmul_method']})"
        )
    return lines


# ---------------------------------------------------------------------------------------------
# Arguments


def parse_list(choices: Sequence[str]):
    """argparse type: a comma-separated subset of ``choices``."""

    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma-separated), got {text!r}")
        return items

    return parse


def parse_positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated positive integers, e.g. 16,64,256."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 16,64, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def number_in(low: float, high: float = math.inf, *, open_low: bool = False, what: str = "a number"):
    """argparse type: a float in [low, high] ((low, high] with ``open_low``); the error names the range."""
    if high < math.inf:
        span = f"in {'(' if open_low else '['}{low:g}, {high:g}]"
    else:
        span = f"{'>' if open_low else '>='} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not ((value > low if open_low else value >= low) and value <= high):
            raise argparse.ArgumentTypeError(f"expected {what} {span}, got {text!r}")
        return value

    return parse


def add_common_args(parser: argparse.ArgumentParser, *, plot: bool = True, dry_run: bool = True) -> None:
    """--device, --out, --quick, and --no-plot (with ``plot``) and --dry-run (with ``dry_run``: the script then
    returns :func:`dry_run` once its cases are known)."""
    add = parser.add_argument
    add(
        "--device",
        type=parse_device,
        default=default_device(),
        help="cpu or cuda[:N] (default: cuda when available, else cpu)",
    )
    add(
        "--out",
        type=Path,
        default=RESULTS_DIR,
        help="results folder; files go to OUT/<device-slug>/ (default benchmarks/results)",
    )
    add("--quick", action="store_true", help="smoke run at toy sizes; files get a _quick suffix")
    if dry_run:
        add(
            "--dry-run",
            action="store_true",
            help="check the arguments, print the cases and exit: nothing is "
            "measured or written (run_gpu.sh --dry-run runs every stage so on the CPU)",
        )
    if plot:
        add("--no-plot", dest="plot", action="store_false", help="skip the PNG plot")


# ---------------------------------------------------------------------------------------------
# Reports


def fmt(template: str, value) -> str:
    return "n/a" if value is None else template.format(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(row[i]) for row in [list(header), *rows]) for i in range(len(header))]
    lines = [list(header), ["-" * w for w in widths], *rows]
    return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in lines)


def short_status(status: str, limit: int = 70) -> str:
    return status if len(status) <= limit else status[: limit - 3] + "..."


def results_table(header: list[str], rows: list[dict], keys, values) -> str:
    """A Markdown table of result rows: ``keys(r)`` are the cells that name the case; a row whose status is "ok"
    continues with ``values(r)``, any other with its (shortened) status and empty cells."""
    lines = []
    for r in rows:
        cells = keys(r)
        rest = values(r) if r["status"] == "ok" else [short_status(r["status"])] + [""] * (len(header) - len(cells) - 1)
        lines.append(cells + rest)
    return markdown_table(header, lines)


def error_status(err: BaseException) -> str:
    return f"failed: {type(err).__name__}: {next(iter(str(err).strip().splitlines()), '')}"


def _csv_text(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("x".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in r.items()})
    return buffer.getvalue()


def write_results(
    out: Path, name: str, meta: dict, rows: list[dict], report: str, *, quick: bool, figure=None
) -> list[Path]:
    """Writes OUT/<device-slug>/<name>_<date>_<commit>[_quick].{json,csv,md,png} atomically; returns the paths."""
    stem = f"{name}_{meta['date_utc'][:10]}_{meta['git_commit']}" + ("_quick" if quick else "")
    folder = Path(out) / meta["device_slug"]
    paths = [
        write_text_atomic(folder / f"{stem}.json", json.dumps({"metadata": meta, "results": rows}, indent=2) + "\n"),
        write_text_atomic(folder / f"{stem}.csv", _csv_text(rows)),
        write_text_atomic(folder / f"{stem}.md", report),
    ]
    if figure is not None:
        path = folder / f"{stem}.png"
        figure.savefig(path, dpi=120, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(figure)
        paths.append(path)
    return paths


def new_figure(ncols: int, title: str):
    """A matplotlib figure (Agg backend) with ``ncols`` side-by-side axes; returns (figure, axes list)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.5), squeeze=False)
    fig.suptitle(title)
    return fig, list(axes[0])


# ---------------------------------------------------------------------------------------------
# Models of the sampler and training-step benchmarks

# name -> (image shape, orw_fast.models preset, overrides of the preset)
BENCH_MODELS = {
    # torchcfm's CIFAR-10 UNet of the ORW-CFM-W2 paper (35.7M parameters): UNetModelWrapper(dim=(3, 32, 32),
    # num_channels=128, num_res_blocks=2, channel_mult=[1, 2, 2, 2], num_heads=4, num_head_channels=64,
    # attention_resolutions="16", dropout=0.1)
    "cifar10": ((3, 32, 32), "cifar10", {}),
    # a small torchcfm UNet for CPU runs that take seconds
    "small": ((3, 16, 16), "digits", {"channel_mult": [1, 2], "attention_resolutions": "8"}),
}


def default_model(device: torch.device) -> str:
    return "cifar10" if device.type == "cuda" else "small"


def make_model(name: str, device: torch.device, seed: int = 0):
    """(model on ``device``, image shape, config dict) of a BENCH_MODELS entry, initialized from ``seed``.

    torchcfm zero-initializes the last layer of every residual and attention block and the output layer,
    so an untrained UNet's velocity is exactly 0 and every sampler would return its noise unchanged. Those
    weights get random values here (normal, std 1/sqrt(fan_in)), so that, as with trained weights, the
    samples are not the noise and the variants' numerical differences show."""
    from orw_fast.models import make_flow_model

    shape, preset, overrides = BENCH_MODELS[name]
    torch.manual_seed(seed)
    model, config = make_flow_model(shape, preset, **overrides)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
    return model.to(device), shape, config


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_flops(model: torch.nn.Module, shape, device: torch.device, *, backward: bool = False) -> int:
    """FLOPs per sample of one model(t, x) call (with its backward when ``backward``): matmuls, convolutions
    and attention as torch's FlopCounterMode counts them, at batch 1 (they scale with the batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    t, x = torch.full((1,), 0.5, device=device), torch.randn((1, *shape), device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(backward):
        out = model(t, x)
        if backward:
            out.square().mean().backward()
    if backward:
        model.zero_grad(set_to_none=True)
    return counter.get_total_flops()
