"""Benchmark of the fused losses, forward + backward, across backends.

Ops (--ops): orw_cfm_w2 (default), nft, nft_adaptive, awm, awm_ghuber. One timed step is the op's loss with
validate=False and backend=..., ``loss.backward()``, ``v.grad = None`` (v requires grad, the other inputs do not):
``orw_cfm_w2_loss(v, u, v_ref, rewards, alpha=1, weighting="softmax")``,
``nft_loss(v, u, v_old, v_ref, r, beta=1, alpha=1)`` (nft_adaptive: with ``adaptive_scale=r``) and
``awm_loss(v, u, v_ref, advantages, v_old=v_old, alpha=1, alpha_old=1)`` (the published configs' EMA penalty;
awm_ghuber: with their ``weighting="ghuber"`` and sigma, the samples' noise levels 1 - t, drawn uniform in [0, 1] with
the other inputs, as a trainer has them from its sampled times).
Backends: eager, compile (torch.compile of the eager backend), native (the C++/CUDA kernels) and triton (CUDA
only). GB/s counts the bytes the fused pass must move (read each input once, write grad_v) and is compared
with the copy bandwidth measured in the same run (benchmarks/hardware.py).
On CUDA every timed call starts with a cold L2 (--l2 flush, the default there); on the CPU calls run back to back on
a warm cache unless --l2 flush (then the L3 is flushed before each, as in a training step).

As a script: prints a table and writes benchmarks/results/<device>/loss_<date>_<commit>.{json,csv,md,png}

    python benchmarks/bench_loss.py                  # cuda if available, else cpu; fp32 and bf16
    python benchmarks/bench_loss.py --device cpu --dtypes fp32 --sizes 64x3x32x32 --repeats 100
    python benchmarks/bench_loss.py --quick          # smoke run: two small sizes, 10 repeats
    python benchmarks/bench_loss.py --ops orw_cfm_w2,nft,awm --sizes 256x3x32x32 --dtypes fp32

With pytest-benchmark (the plain ``pytest`` run only collects tests/):

    pytest benchmarks/bench_loss.py --benchmark-only
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and this checkout's orw_fast importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch
from tqdm import tqdm

from benchmarks import common, hardware
from orw_fast import _native, awm_loss, nft_loss, orw_cfm_w2_loss

BACKENDS = ("eager", "compile", "native", "triton")
# op -> (native kernel it needs, predictions it reads, tensor passes its fused step must make: reads + the grad_v
# write; further passes on a GPU: the adaptive forms' norms pass over v, u, v_old, read from cache on the CPU)
OPS = {
    "orw_cfm_w2": ("orw_cfm_w2", 3, 4, 0),
    "nft": ("quadratic_fm", 4, 5, 0),
    "nft_adaptive": ("quadratic_fm_norms", 4, 5, 3),
    "awm": ("quadratic_fm", 4, 5, 0),
    "awm_ghuber": ("quadratic_fm_norms", 4, 5, 3),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZES = {
    "cpu": ((64, 3, 32, 32), (8, 4, 64, 64), (256, 3, 32, 32)),
    # 0.2M, 0.8M, 3.1M, 16.8M and 67.1M elements: from one CIFAR batch to well past the L2
    "cuda": ((64, 3, 32, 32), (256, 3, 32, 32), (256, 3, 64, 64), (128, 8, 128, 128), (256, 4, 256, 256)),
}
QUICK_SIZES = ((16, 1, 8, 8), (64, 3, 32, 32))
# --triton-sweep: Triton launch configurations (elements per tile, tiles per program, warps) at the largest size
TRITON_SWEEP = [(block, tiles, warps) for block in (1024, 2048, 4096) for tiles in (2, 4, 8) for warps in (4, 8)]
BYTES_MODEL = (
    "(inputs + 1) x numel x itemsize (one read of each input + the write of grad_v): 4 for orw_cfm_w2 "
    "(v, u, v_ref), 5 for nft, nft_adaptive, awm and awm_ghuber (v, u, v_old, v_ref); on a GPU 8 for nft_adaptive "
    "and awm_ghuber (+ v, u, v_old read by the op's norms pass; the CPU kernel reads a sample's inputs for both while "
    "they are in the cache)"
)
SETTINGS = (
    "v requires grad (the other inputs do not), alpha=1; orw_cfm_w2 weighting='softmax'; nft beta=1, r in "
    "[0, 1] (nft_adaptive: adaptive_scale = r); awm signed advantages, alpha_old=1 with v_old (awm_ghuber: "
    "ghuber p 0.25, sigma uniform in [0, 1], drawn with the inputs); validate=False for every backend"
)


# ---------------------------------------------------------------------------------------------
# The timed step


def size_id(size) -> str:
    return "x".join(map(str, size))


def skip_reason(backend: str, device: torch.device, op: str = "orw_cfm_w2") -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device`` (None when it can)."""
    kernel = OPS[op][0]
    if backend == "native" and not _native.has_kernel(kernel, device.type):
        return f"no native {kernel} kernel for {device.type}"
    if backend == "triton" and device.type != "cuda":
        return "triton needs a CUDA device"
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def make_inputs(size, dtype: torch.dtype, device: torch.device, op: str = "orw_cfm_w2"):
    """The op's inputs: v (requires grad), u, [v_old,] v_ref of ``size`` and a float32 [B] vector (rewards; r in
    [0, 1] for nft), and for awm_ghuber the noise levels sigma [B] in [0, 1]: what a trainer has before the loss."""
    gen = torch.Generator(device=device).manual_seed(0)
    tensors = [torch.randn(size, dtype=dtype, device=device, generator=gen) for _ in range(OPS[op][1])]
    per_sample = (
        torch.rand(size[0], device=device, generator=gen)
        if op.startswith("nft")
        else torch.randn(size[0], device=device, generator=gen)
    )
    sigma = (torch.rand(size[0], device=device, generator=gen),) if op == "awm_ghuber" else ()
    return tensors[0].requires_grad_(), *tensors[1:], per_sample, *sigma


def _orw_cfm_w2(v, u, v_ref, rewards, backend: str = "eager"):
    return orw_cfm_w2_loss(v, u, v_ref, rewards, alpha=1.0, weighting="softmax", backend=backend, validate=False)


def _nft(v, u, v_old, v_ref, r, backend: str = "eager"):
    return nft_loss(v, u, v_old, v_ref, r, beta=1.0, alpha=1.0, backend=backend, validate=False)


def _nft_adaptive(v, u, v_old, v_ref, r, backend: str = "eager"):
    return nft_loss(v, u, v_old, v_ref, r, beta=1.0, alpha=1.0, backend=backend, validate=False, adaptive_scale=r)


def _awm(v, u, v_old, v_ref, advantages, backend: str = "eager"):
    return awm_loss(v, u, v_ref, advantages, v_old=v_old, alpha=1.0, alpha_old=1.0, backend=backend, validate=False)


def _awm_ghuber(v, u, v_old, v_ref, advantages, sigma, backend: str = "eager"):
    return awm_loss(
        v,
        u,
        v_ref,
        advantages,
        v_old=v_old,
        alpha=1.0,
        alpha_old=1.0,
        weighting="ghuber",
        sigma=sigma,
        backend=backend,
        validate=False,
    )


LOSSES = {"orw_cfm_w2": _orw_cfm_w2, "nft": _nft, "nft_adaptive": _nft_adaptive, "awm": _awm, "awm_ghuber": _awm_ghuber}


def make_step(backend: str, *inputs, op: str = "orw_cfm_w2"):
    """One forward + backward; "compile" compiles (afresh, for these shapes) at its first call."""
    if backend == "compile":
        torch.compiler.reset()
        loss_fn = torch.compile(LOSSES[op], dynamic=False)
    else:
        loss_fn = functools.partial(LOSSES[op], backend=backend)
    v = inputs[0]

    def step():
        loss_fn(*inputs).backward()
        v.grad = None

    return step


# ---------------------------------------------------------------------------------------------
# Measurements


def run_group(
    backends,
    size,
    dtype: str,
    device: torch.device,
    repeats: int,
    warmup_s: float,
    flush_l2: bool,
    op: str = "orw_cfm_w2",
) -> list[dict]:
    """The table's rows of ``backends`` for one op, size and dtype, timed side by side (interleaved samples:
    common.time_interleaved_ms). A backend that fails (torch.compile, out of memory...) in its set-up, first call or
    memory measurement gets a "failed: ..." status instead of stopping the sweep; a failure while the group is timed
    marks every backend of the group."""
    numel, itemsize = math.prod(size), DTYPES[dtype].itemsize
    rows, steps = {}, {}
    for backend in backends:
        rows[backend] = {"op": op, "size": list(size), "numel": numel, "dtype": dtype, "backend": backend}
        try:
            step = make_step(backend, *make_inputs(size, DTYPES[dtype], device, op), op=op)
            start = time.perf_counter()
            step()  # compiles for "compile"
            common.synchronize(device)
            rows[backend]["first_call_s"] = time.perf_counter() - start
            steps[backend] = step
        except Exception as err:  # reported in the table
            rows[backend]["status"] = common.error_status(err)
    bytes_moved = (OPS[op][2] + (OPS[op][3] if torch.device(device).type == "cuda" else 0)) * numel * itemsize
    try:
        timings = common.time_interleaved_ms(
            steps, device, repeats=repeats, warmup_s=warmup_s, min_sample_s=2e-3, flush_l2=flush_l2
        )
    except Exception as err:  # interleaved samples have no single culprit: the whole group is reported
        timings = {}
        for backend in steps:
            rows[backend]["status"] = common.error_status(err)
    for backend, timing in timings.items():
        try:
            peak = common.peak_extra_bytes(steps[backend], device)
        except Exception as err:  # reported in the table
            rows[backend]["status"] = common.error_status(err)
            continue
        rows[backend].update(
            status="ok",
            **timing.summary(),
            bytes_per_step=bytes_moved,
            gbps=bytes_moved / (timing.median * 1e-3) / 1e9,
            peak_extra_mb=peak / 1e6,
            peak_extra_grad_bufs=peak / (numel * itemsize),
        )
    return list(rows.values())


def triton_sweep(size, dtype: str, device: torch.device, repeats: int, warmup_s: float, flush_l2: bool) -> list[dict]:
    """run_group of the triton backend alone under each TRITON_SWEEP launch configuration (the module's CONFIG,
    restored afterwards); rows carry ``triton_config`` = "block/tiles/warps"."""
    from orw_fast.ops.triton import orw_cfm_w2 as triton_loss

    default, rows = triton_loss.CONFIG, []
    try:
        for block, tiles, warps in TRITON_SWEEP:
            triton_loss.CONFIG = triton_loss.LaunchConfig(block=block, tiles=tiles, num_warps=warps)
            (row,) = run_group(("triton",), size, dtype, device, repeats, warmup_s, flush_l2)
            rows.append(
                {
                    **row,
                    "triton_config": f"{block}/{tiles}/{warps}",
                    "triton_default": (block, tiles, warps) == (default.block, default.tiles, default.num_warps),
                }
            )
    finally:
        triton_loss.CONFIG = default
    return rows


def add_ratios(rows: list[dict], copy_gbs: float) -> None:
    """Speedups over eager and torch.compile of the same size and dtype, and % of the copy bandwidth."""
    base = {
        (r["op"], tuple(r["size"]), r["dtype"], r["backend"]): r["median_ms"]
        for r in rows
        if r["status"] == "ok" and "triton_config" not in r
    }
    for r in rows:
        if r["status"] != "ok":
            continue
        for ref in ("eager", "compile"):
            ref_ms = base.get((r["op"], tuple(r["size"]), r["dtype"], ref))
            r[f"speedup_vs_{ref}"] = None if ref_ms is None else ref_ms / r["median_ms"]
        r["pct_copy_bw"] = 100 * r["gbps"] / copy_gbs


# ---------------------------------------------------------------------------------------------
# Report


def format_table(rows: list[dict]) -> str:
    header = [
        "op",
        "size",
        "dtype",
        "backend",
        "median ms",
        "IQR (q1..q3) ms",
        "GB/s",
        "% copy BW",
        "peak extra MB",
        "peak / grad buf",
        "page faults / call",
        "vs eager",
        "vs compile",
    ]
    keys = lambda r: [r["op"], size_id(r["size"]), r["dtype"], r["backend"]]  # noqa: E731
    return common.results_table(
        header,
        rows,
        keys,
        lambda r: [
            f"{r['median_ms']:.4f}",
            f"{r['q1_ms']:.4f}..{r['q3_ms']:.4f}",
            f"{r['gbps']:.1f}",
            f"{r['pct_copy_bw']:.1f}",
            f"{r['peak_extra_mb']:.2f}",
            f"{r['peak_extra_grad_bufs']:.2f}x",
            common.fmt("{:.0f}", r["page_faults_per_call"]),
            common.fmt("{:.2f}x", r["speedup_vs_eager"]),
            common.fmt("{:.2f}x", r["speedup_vs_compile"]),
        ],
    )


def format_sweep(rows: list[dict]) -> str:
    header = ["size", "dtype", "block/tiles/warps", "median ms", "GB/s", "% copy BW", "vs default"]
    lines = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        group = [r for r in rows if r["dtype"] == dtype and r["status"] == "ok"]
        default = next((r["median_ms"] for r in group if r["triton_default"]), None)
        for r in sorted(group, key=lambda r: r["median_ms"]):
            lines.append(
                [
                    size_id(r["size"]),
                    dtype,
                    r["triton_config"] + " (default)" * r["triton_default"],
                    f"{r['median_ms']:.4f}",
                    f"{r['gbps']:.1f}",
                    f"{r['pct_copy_bw']:.1f}",
                    common.fmt("{:.3f}x", default and default / r["median_ms"]),
                ]
            )
        lines += [
            [size_id(r["size"]), dtype, r["triton_config"], common.short_status(r["status"]), "", "", ""]
            for r in rows
            if r["dtype"] == dtype and r["status"] != "ok"
        ]
    return common.markdown_table(header, lines)


def format_report(meta: dict, rows: list[dict]) -> str:
    timing = (
        "one call per sample, after a last-level cache flush (a buffer of >= 256 MB and 4x the cache zeroed outside "
        "the timed region)"
        if meta["l2"] == "flush"
        else "each sample the mean of back-to-back calls lasting >= 2 ms, after one untimed call of the same backend"
    )
    lines = [
        *common.report_head(meta),
        f"- step: loss + loss.backward() + v.grad=None; {meta['settings']}",
        f"- time: median (and IQR) over {meta['repeats']} samples after warm-up, {timing}; the backends of one op, "
        "size and dtype are timed side by side, one sample of each in turn (order rotated every round), so a drift "
        "of the machine's speed during the run moves them alike",
        f"- bytes per step = {meta['bytes_model']}; GB/s = bytes / median time; % copy BW = GB/s / the copy "
        "bandwidth above (a buffer far larger than the caches: inputs that stay in a cache can exceed 100 %); "
        "MB = 1e6 bytes",
        f"- peak extra memory: {common.PEAK_MEMORY_METHOD[meta['device']]}; "
        "peak / grad buf = peak / (numel x itemsize)",
        f"- page faults / call: {common.PAGE_FAULTS_METHOD}",
    ]
    lines += [f"- skipped: {name} ({why})" for name, why in meta["skipped_backends"].items()]
    main_rows = [r for r in rows if "triton_config" not in r]
    sweep = [r for r in rows if "triton_config" in r]
    text = "\n".join(lines) + "\n\n" + format_table(main_rows) + "\n"
    if sweep:
        text += (
            "\n## Triton launch sweep (orw_fast.ops.triton.orw_cfm_w2.CONFIG: block, tiles, num_warps), fastest "
            "first\n\n" + format_sweep(sweep) + "\n"
        )
    return text


def plot(meta: dict, rows: list[dict]):
    """GB/s against size, one panel per dtype, with the measured copy bandwidth as a line."""
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = common.new_figure(len(dtypes), f"{', '.join(ops)} loss fwd+bwd, {meta['device_name']}")
    for ax, dtype in zip(axes, dtypes):
        for op, backend in itertools.product(ops, BACKENDS):
            pts = [
                (r["numel"], r["gbps"])
                for r in rows
                if r["dtype"] == dtype
                and r["backend"] == backend
                and r["op"] == op
                and r["status"] == "ok"
                and "triton_config" not in r
            ]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=backend if len(ops) == 1 else f"{op} {backend}")
        ax.axhline(meta["hardware"]["copy_gbs"], color="gray", linestyle="--", label="copy bandwidth")
        ax.set(xscale="log", xlabel="elements per tensor", ylabel="GB/s (fused-pass bytes)", title=dtype)
        ax.legend()
    return fig


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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"default sizes: cpu {', '.join(map(size_id, SIZES['cpu']))}\n"
        f"               cuda {', '.join(map(size_id, SIZES['cuda']))}",
    )
    common.add_common_args(parser)
    add = parser.add_argument
    add(
        "--dtypes",
        type=common.parse_list(tuple(DTYPES)),
        default=["fp32", "bf16"],
        help="comma-separated, default fp32,bf16",
    )
    add("--sizes", type=parse_sizes, help="comma-separated, e.g. 64x3x32x32,8x4x64x64")
    add(
        "--backends",
        type=common.parse_list(BACKENDS),
        default=list(BACKENDS),
        help="comma-separated subset, default all",
    )
    add(
        "--ops",
        type=common.parse_list(tuple(OPS)),
        default=["orw_cfm_w2"],
        help=f"comma-separated subset of {','.join(OPS)}, default orw_cfm_w2",
    )
    add("--repeats", type=int, help="timed samples per case (default 50, 10 with --quick)")
    add(
        "--triton-sweep",
        action="store_true",
        help="also time the triton backend under each of "
        f"{len(TRITON_SWEEP)} launch configurations (block, tiles, warps) at the largest size",
    )
    add(
        "--l2",
        choices=("flush", "hot"),
        help="flush the last-level cache (CUDA: L2, the default there; CPU: L3) before every timed call, as a "
        "training step's forward and backward do, or time back-to-back calls on a warm cache (the CPU's default)",
    )
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 2:
        parser.error("--repeats must be >= 2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES[device.type])
    repeats = args.repeats or (10 if args.quick else 50)
    warmup_s = 0.05 if args.quick else 0.2
    l2 = args.l2 or ("flush" if device.type == "cuda" else "hot")
    if args.dry_run:
        return common.dry_run(
            "loss",
            device,
            [(op, size_id(s), d, b) for op, s, d, b in itertools.product(args.ops, sizes, args.dtypes, args.backends)],
        )
    name = (lambda op, b: b) if len(args.ops) == 1 else (lambda op, b: f"{op}/{b}")  # noqa: E731
    skipped = {
        name(op, b): why for op, b in itertools.product(args.ops, args.backends) if (why := skip_reason(b, device, op))
    }
    groups = [  # each group's backends are timed side by side
        (op, s, d, [b for b in args.backends if name(op, b) not in skipped])
        for op, s, d in itertools.product(args.ops, sizes, args.dtypes)
    ]

    hw = hardware.measure(device, args.quick)
    meta = common.run_metadata(
        device,
        f"{', '.join(args.ops)} loss forward + backward",
        hardware=hw,
        settings=SETTINGS,
        repeats=repeats,
        l2=l2,
        bytes_model=BYTES_MODEL,
        skipped_backends=skipped,
    )
    common.warn_if_loaded(meta)
    rows = []
    with tqdm([g for g in groups if g[3]], unit="case") as bar:
        for op, size, dtype, backends in bar:
            bar.set_postfix_str(f"{op} {size_id(size)} {dtype}")
            rows += run_group(backends, size, dtype, device, repeats, warmup_s, flush_l2=l2 == "flush", op=op)
    if args.triton_sweep and any("triton" in backends for *_, backends in groups):
        largest = max(sizes, key=math.prod)
        for dtype in tqdm(args.dtypes, desc="triton sweep", unit="dtype"):
            rows += triton_sweep(largest, dtype, device, repeats, warmup_s, flush_l2=l2 == "flush")
    add_ratios(rows, hw["copy_gbs"])
    return common.finish_run(args, "loss", meta, rows, format_report, plot)


# ---------------------------------------------------------------------------------------------
# pytest-benchmark


PYTEST_DEVICE = torch.device(common.default_device())
PYTEST_CASES = list(itertools.product(BACKENDS, SIZES[PYTEST_DEVICE.type], ("fp32", "bf16")))


@pytest.mark.parametrize(
    ("backend", "size", "dtype"), PYTEST_CASES, ids=[f"{b}-{size_id(s)}-{d}" for b, s, d in PYTEST_CASES]
)
def test_loss_fwd_bwd(benchmark, backend, size, dtype):
    device = PYTEST_DEVICE
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
        common.synchronize(device)

    benchmark(synced_step)


if __name__ == "__main__":
    sys.exit(main())
