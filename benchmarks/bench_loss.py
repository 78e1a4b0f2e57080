"""Benchmark of the ORW-CFM-W2 loss, forward + backward, across backends.

One timed step is ``orw_cfm_w2_loss(v, u, v_ref, rewards, alpha=1, weighting="softmax",
validate=False, backend=...)``, ``loss.backward()``, ``v.grad = None`` (v requires grad, u and
v_ref do not). Backends: eager, compile (torch.compile of the eager backend), native (the C++/CUDA
kernels) and triton (CUDA only).

As a script: prints a table and writes it to
benchmarks/results/<device-name>/loss_<YYYY-MM-DD>_<commit>.{json,md}

    python benchmarks/bench_loss.py                  # cuda if available, else cpu; fp32 and bf16
    python benchmarks/bench_loss.py --device cpu --dtypes fp32 --sizes 64x3x32x32 --repeats 100
    python benchmarks/bench_loss.py --quick          # smoke run: two small sizes, 10 repeats

With pytest-benchmark (the plain ``pytest`` run only collects tests/):

    pytest benchmarks/bench_loss.py --benchmark-only
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import importlib.util
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
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from orw_fast import _native, orw_cfm_w2_loss
from orw_fast.checkpoint import write_text_atomic

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
BACKENDS = ("eager", "compile", "native", "triton")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZES = {
    "cpu": ((64, 3, 32, 32), (8, 4, 64, 64), (256, 3, 32, 32)),
    "cuda": ((64, 3, 32, 32), (256, 3, 64, 64), (64, 4, 128, 128), (128, 8, 256, 256)),
}
QUICK_SIZES = ((16, 1, 8, 8), (64, 3, 32, 32))
COPY_BYTES = 512 * 2**20  # the device-to-device copy that gives the reference bandwidth on CUDA
BYTES_MODEL = "4 x numel x itemsize (reads of v, u, v_ref + write of grad_v)"
SETTINGS = "v requires grad (u, v_ref do not), alpha=1, weighting='softmax', validate=False for every backend"


# ---------------------------------------------------------------------------------------------
# The timed step


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def size_id(size) -> str:
    return "x".join(map(str, size))


def skip_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None when it can)."""
    if backend == "native" and not _native.has_kernel("orw_cfm_w2", device.type):
        return f"no native orw_cfm_w2 kernel for {device.type}"
    if backend == "triton" and device.type != "cuda":
        return "triton needs a CUDA device"
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def make_inputs(size, dtype: torch.dtype, device: torch.device):
    """v (requires grad), u, v_ref of ``size`` and float32 rewards [B]."""
    gen = torch.Generator(device=device).manual_seed(0)
    v, u, v_ref = (torch.randn(size, dtype=dtype, device=device, generator=gen) for _ in range(3))
    rewards = torch.randn(size[0], device=device, generator=gen)
    return v.requires_grad_(), u, v_ref, rewards


def _loss(v, u, v_ref, rewards, backend: str = "eager"):
    return orw_cfm_w2_loss(v, u, v_ref, rewards, alpha=1.0, weighting="softmax", backend=backend, validate=False)


def make_step(backend: str, v, u, v_ref, rewards):
    """One forward + backward; "compile" compiles (afresh, for these shapes) at its first call."""
    if backend == "compile":
        torch.compiler.reset()
        loss_fn = torch.compile(_loss, dynamic=False)
    else:
        loss_fn = functools.partial(_loss, backend=backend)

    def step():
        loss_fn(v, u, v_ref, rewards).backward()
        v.grad = None

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Measurements


def time_ms(step, device: torch.device, repeats: int, warmup_s: float, min_sample_s: float = 2e-3):
    """Per-call times in ms of ``repeats`` samples, each the mean of ``number`` back-to-back calls
    (enough to last ``min_sample_s``), after ``warmup_s`` of warmup. CUDA events on CUDA.
    Returns (samples, number)."""
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < warmup_s:
        step()
        calls += 1
    synchronize(device)
    number = max(1, math.ceil(min_sample_s * calls / (time.perf_counter() - start)))
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)
        ]
        for begin, end in events:
            begin.record()
            for _ in range(number):
                step()
            end.record()
        synchronize(device)
        return [begin.elapsed_time(end) / number for begin, end in events], number
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            step()
        samples.append((time.perf_counter() - t0) * 1e3 / number)
    return samples, number


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


def peak_extra_bytes(step, device: torch.device) -> int:
    """Peak memory one step allocates on top of what is allocated before it (inputs included
    there). CUDA: the caching allocator's peak statistics. CPU: the peak of the running sum of the
    allocations and frees the profiler records (profile_memory=True)."""
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with _quiet_stderr(), torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def copy_bandwidth_gbs(device: torch.device, repeats: int, warmup_s: float) -> float:
    """Device-to-device copy bandwidth, 2 * COPY_BYTES / median time of dst.copy_(src), in GB/s."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    samples, _ = time_ms(lambda: dst.copy_(src), device, repeats, warmup_s)
    return 2 * COPY_BYTES / (statistics.median(samples) * 1e-3) / 1e9


def run_case(backend: str, size, dtype: str, device: torch.device, repeats: int, warmup_s: float) -> dict:
    """One row of the table. A backend that fails (torch.compile, out of memory...) gets a
    "failed: ..." status instead of stopping the sweep."""
    numel, itemsize = math.prod(size), DTYPES[dtype].itemsize
    row = {"size": list(size), "numel": numel, "dtype": dtype, "backend": backend}
    try:
        step = make_step(backend, *make_inputs(size, DTYPES[dtype], device))
        start = time.perf_counter()
        step()  # compiles for "compile"
        synchronize(device)
        first_call_s = time.perf_counter() - start
        samples, number = time_ms(step, device, repeats, warmup_s)
        peak = peak_extra_bytes(step, device)
    except Exception as err:  # reported in the table
        message = next(iter(str(err).strip().splitlines()), "")
        return {**row, "status": f"failed: {type(err).__name__}: {message}"}
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    median = statistics.median(samples)
    return {
        **row,
        "status": "ok",
        "median_ms": median,
        "q1_ms": q1,
        "q3_ms": q3,
        "min_ms": min(samples),
        "max_ms": max(samples),
        "samples": len(samples),
        "calls_per_sample": number,
        "first_call_s": first_call_s,
        "gbps": 4 * numel * itemsize / (median * 1e-3) / 1e9,
        "peak_extra_mb": peak / 1e6,
        "peak_extra_grad_bufs": peak / (numel * itemsize),
    }


def add_ratios(rows: list[dict], copy_gbs: float | None) -> None:
    """Speedup over eager of the same size and dtype, and % of the copy bandwidth."""
    eager = {
        (tuple(r["size"]), r["dtype"]): r["median_ms"] for r in rows if r["backend"] == "eager" and r["status"] == "ok"
    }
    for r in rows:
        if r["status"] != "ok":
            continue
        base = eager.get((tuple(r["size"]), r["dtype"]))
        r["speedup_vs_eager"] = None if base is None else base / r["median_ms"]
        r["pct_copy_bw"] = None if copy_gbs is None else 100 * r["gbps"] / copy_gbs


# ---------------------------------------------------------------------------------------------
# Report


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M) if cpuinfo.exists() else None
    return match.group(1).strip() if match else (platform.processor() or platform.machine())


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", re.sub(r"\((r|tm)\)", "", name.lower())).strip("-")


def git_commit() -> str:
    """Short HEAD commit, with "-dirty" when files (results excepted) differ from it or are untracked."""
    def git(*args):
        cmd = ["git", "-C", str(REPO_ROOT), *args]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        changes = git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if changes.strip() else "")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_metadata(device: torch.device, repeats: int, skipped: dict, copy_gbs: float | None) -> dict:
    return {
        "benchmark": "orw_cfm_w2_loss forward + backward",
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "settings": SETTINGS,
        "repeats": repeats,
        "bytes_model": BYTES_MODEL,
        "copy_bandwidth_gbs": copy_gbs,
        "skipped_backends": skipped,
    }


def _fmt(template: str, value) -> str:
    return "n/a" if value is None else template.format(value)


def format_table(rows: list[dict], with_copy_bw: bool) -> str:
    header = ["size", "dtype", "backend", "median ms", "IQR (q1..q3) ms", "GB/s"]
    header += ["% copy BW"] * with_copy_bw + ["peak extra MB", "peak / grad buf", "vs eager"]
    lines = []
    for r in rows:
        cells = [size_id(r["size"]), r["dtype"], r["backend"]]
        if r["status"] != "ok":
            status = r["status"] if len(r["status"]) <= 70 else r["status"][:67] + "..."
            lines.append(cells + [status] + [""] * (len(header) - 4))
            continue
        cells += [f"{r['median_ms']:.4f}", f"{r['q1_ms']:.4f}..{r['q3_ms']:.4f}", f"{r['gbps']:.1f}"]
        cells += [_fmt("{:.1f}", r["pct_copy_bw"])] * with_copy_bw
        cells += [f"{r['peak_extra_mb']:.2f}", f"{r['peak_extra_grad_bufs']:.2f}x"]
        cells += [_fmt("{:.2f}x", r["speedup_vs_eager"])]
        lines.append(cells)
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    out = [header, ["-" * w for w in widths], *lines]
    return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in out)


def format_report(meta: dict, rows: list[dict]) -> str:
    memory = (
        "torch.cuda.max_memory_allocated during one step minus memory_allocated before it"
        if meta["device"] == "cuda"
        else "peak of the running sum of the allocations/frees that torch.profiler (profile_memory=True) "
        "records during one step"
    )
    lines = [
        f"# {meta['benchmark']}: {meta['device_name']}",
        "",
        f"- date (UTC) {meta['date_utc']}, commit {meta['git_commit']}, torch {meta['torch']}, "
        f"triton {meta['triton']}, CUDA {meta['cuda']}, python {meta['python']}",
        f"- CPU count {meta['cpu_count']}, torch threads {meta['torch_threads']}, load average (1/5/15 min) "
        f"{meta['load_average_start']} at the start, {meta['load_average_end']} at the end",
        f"- command: `{meta['command']}`",
        f"- step: loss + loss.backward() + v.grad=None; {meta['settings']}",
        f"- time: median (and IQR) over {meta['repeats']} samples after warmup, each sample the mean of "
        "back-to-back calls lasting >= 2 ms",
        f"- bytes per step = {meta['bytes_model']}; GB/s = bytes / median time; MB = 1e6 bytes",
        f"- peak extra memory: {memory}; peak / grad buf = peak / (numel x itemsize)",
    ]
    if meta["copy_bandwidth_gbs"] is not None:
        lines.append(
            f"- copy bandwidth: {meta['copy_bandwidth_gbs']:.1f} GB/s (2 x {COPY_BYTES // 2**20} MiB / median "
            "dst.copy_(src)); small sizes may stay in L2 and exceed it"
        )
    lines += [f"- skipped: {name} ({why})" for name, why in meta["skipped_backends"].items()]
    has_bw = meta["copy_bandwidth_gbs"] is not None
    return "\n".join(lines) + "\n\n" + format_table(rows, has_bw) + "\n"


# ---------------------------------------------------------------------------------------------
# Script


def parse_sizes(text: str):
    sizes = []
    for item in text.split(","):
        try:
            size = tuple(int(d) for d in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"size {item!r} is not like 64x3x32x32") from None
        if min(size) < 1:
            raise argparse.ArgumentTypeError(f"size {item!r} needs positive dimensions")
        sizes.append(size)
    return sizes


def parse_list(choices):
    def parse(text: str):
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma-separated), got {text!r}")
        return items

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"default sizes: cpu {', '.join(map(size_id, SIZES['cpu']))}\n"
        f"               cuda {', '.join(map(size_id, SIZES['cuda']))}",
    )
    add = parser.add_argument
    add("--device", choices=("cpu", "cuda"), default=default_device(), help="default: %(default)s")
    add("--dtypes", type=parse_list(tuple(DTYPES)), default=["fp32", "bf16"], help="comma-separated, default fp32,bf16")
    add("--sizes", type=parse_sizes, help="comma-separated, e.g. 64x3x32x32,8x4x64x64")
    add("--backends", type=parse_list(BACKENDS), default=list(BACKENDS), help="comma-separated subset, default all")
    add("--repeats", type=int, help="timed samples per case (default 50, 10 with --quick)")
    add("--out", type=Path, default=RESULTS_DIR, help="results folder (default benchmarks/results)")
    add("--quick", action="store_true", help=f"smoke run: sizes {', '.join(map(size_id, QUICK_SIZES))}, 10 repeats, "
        "short warmup; files get a _quick suffix")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.repeats is not None and args.repeats < 2:
        parser.error("--repeats must be >= 2")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES[device.type])
    repeats = args.repeats or (10 if args.quick else 50)
    warmup_s = 0.05 if args.quick else 0.2
    skipped = {b: why for b in args.backends if (why := skip_reason(b, device))}
    backends = [b for b in args.backends if b not in skipped]

    copy_gbs = copy_bandwidth_gbs(device, repeats, warmup_s) if device.type == "cuda" else None
    meta = collect_metadata(device, repeats, skipped, copy_gbs)
    if meta["load_average_start"][0] > 0.5 * os.cpu_count():
        print(f"warning: load average {meta['load_average_start']} on {os.cpu_count()} CPUs: timings may be disturbed")
    rows = []
    with tqdm(list(itertools.product(sizes, args.dtypes, backends)), unit="case") as bar:
        for size, dtype, backend in bar:
            bar.set_postfix_str(f"{size_id(size)} {dtype} {backend}")
            rows.append(run_case(backend, size, dtype, device, repeats, warmup_s))
    add_ratios(rows, copy_gbs)
    meta["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report = format_report(meta, rows)
    print(report)
    stem = f"loss_{meta['date_utc'][:10]}_{meta['git_commit']}" + ("_quick" if args.quick else "")
    folder = args.out / slug(meta["device_name"])
    write_text_atomic(folder / f"{stem}.json", json.dumps({"metadata": meta, "results": rows}, indent=2) + "\n")
    write_text_atomic(folder / f"{stem}.md", report)
    print(f"wrote {folder / stem}.json and .md")


# ---------------------------------------------------------------------------------------------
# pytest-benchmark


PYTEST_DEVICE = default_device()
PYTEST_CASES = list(itertools.product(BACKENDS, SIZES[PYTEST_DEVICE], ("fp32", "bf16")))


@pytest.mark.parametrize(
    ("backend", "size", "dtype"), PYTEST_CASES, ids=[f"{b}-{size_id(s)}-{d}" for b, s, d in PYTEST_CASES]
)
def test_loss_fwd_bwd(benchmark, backend, size, dtype):
    device = torch.device(PYTEST_DEVICE)
    if reason := skip_reason(backend, device):
        pytest.skip(reason)
    step = make_step(backend, *make_inputs(size, DTYPES[dtype], device))
    try:
        step()  # compiles for "compile", outside the timing
    except Exception as err:
        if backend != "compile":
            raise
        pytest.skip(f"torch.compile failed: {type(err).__name__}: {err}")
    numel = math.prod(size)
    benchmark.extra_info.update(numel=numel, bytes_per_step=4 * numel * DTYPES[dtype].itemsize)

    def synced_step():
        step()
        synchronize(device)

    benchmark(synced_step)


if __name__ == "__main__":
    main()
