"""Benchmark of the rollout sampler: N Euler steps of a torchcfm UNet from noise to samples.

Variants (all start from the same noise; each is checked against the eager fp32 loop's samples):
  eager_fp32_loop          plain Python loop x += dt * model(t, x) in fp32 (what the official code does)
  torchdiffeq_euler        torchdiffeq.odeint(model, x0, linspace(0, 1, N+1), method="euler"), fp32
  ours_eager_fp32          orw_fast.sample(..., cuda_graph=False), fp32
  ours_eager_bf16          orw_fast.sample(..., cuda_graph=False, autocast=torch.bfloat16)
  ours_graph_bf16          orw_fast.sample(..., cuda_graph=True, autocast=torch.bfloat16): one CUDA graph of N steps
  ours_graph_compile_bf16  the same around torch.compile(model)
  ours_compile_fp32        ours_eager_fp32 around torch.compile(model) (the CPU's counterpart; 'first call s' holds
                           the compilation)
  ours_channels_last_fp32  ours_eager_fp32 with the model's weights in channels-last layout
For the graph variants the replay is compared with N x one graph-captured model forward (same batch,
bf16 autocast): the ratio is the sampler's own overhead (target: within 5 %).

GPU defaults: the paper's CIFAR-10 UNet, 100 steps, batch 16, 64, 256. CPU defaults: a small UNet
(3x16x16), 10 steps, batch 4, 16, 64 (graph variants need CUDA and are skipped with the reason).

    python benchmarks/bench_sampler.py                 # cuda if available, else cpu
    python benchmarks/bench_sampler.py --batches 64 --variants eager_fp32_loop,ours_graph_bf16
    python benchmarks/bench_sampler.py --quick         # smoke run
    pytest benchmarks/bench_sampler.py --benchmark-only
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and this checkout's orw_fast importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch
from tqdm import tqdm

from benchmarks import common, hardware
from benchmarks.baselines.official_eager import euler_rollout

VARIANTS = (
    "eager_fp32_loop",
    "torchdiffeq_euler",
    "ours_eager_fp32",
    "ours_eager_bf16",
    "ours_graph_bf16",
    "ours_graph_compile_bf16",
    "ours_compile_fp32",
    "ours_channels_last_fp32",
)
DEFAULT_VARIANTS = {
    "cuda": ("eager_fp32_loop", "torchdiffeq_euler", "ours_eager_bf16", "ours_graph_bf16", "ours_graph_compile_bf16"),
    "cpu": (
        "eager_fp32_loop",
        "torchdiffeq_euler",
        "ours_eager_fp32",
        "ours_eager_bf16",
        "ours_compile_fp32",
        "ours_channels_last_fp32",
    ),
}
BATCHES = {"cuda": (16, 64, 256), "cpu": (4, 16, 64)}
STEPS = {"cuda": 100, "cpu": 10}
REPEATS = {"cuda": 5, "cpu": 5}
BASELINE = "eager_fp32_loop"


def skip_reason(variant: str, device: torch.device) -> str | None:
    if "graph" in variant and device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if variant == "torchdiffeq_euler" and importlib.util.find_spec("torchdiffeq") is None:
        return "torchdiffeq is not installed"
    return None


class Sampler:
    """One variant for one model: ``__call__(x0) -> x1``; ``velocity_model`` is what each step calls."""

    def __init__(self, variant: str, model, steps: int, compile_mode: str | None):
        from orw_fast.sampling import sample

        self.variant, self.steps = variant, steps
        self.autocast = torch.bfloat16 if variant.endswith("bf16") else None
        self.velocity_model = model
        if "compile" in variant:
            self.velocity_model = torch.compile(model, dynamic=False, mode=compile_mode)
        if variant == "ours_channels_last_fp32":
            self.velocity_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        if variant == BASELINE:
            self.fn = lambda x0: euler_rollout(model, x0, steps)
        elif variant == "torchdiffeq_euler":
            import torchdiffeq

            def fn(x0):
                t_span = torch.linspace(0, 1, steps + 1, device=x0.device)
                with torch.no_grad():
                    return torchdiffeq.odeint(model, x0, t_span, method="euler")[-1]

            self.fn = fn
        else:
            graph = "graph" in variant
            self.fn = lambda x0: sample(
                self.velocity_model, x0, steps=steps, method="euler", cuda_graph=graph, autocast=self.autocast
            )

    def __call__(self, x0):
        return self.fn(x0)

    def release(self) -> None:
        from orw_fast.sampling import clear_graph_cache

        clear_graph_cache(self.velocity_model)


def graphed_forward_timing(model, x0: torch.Tensor, autocast, repeats: int) -> common.Timing:
    """Replay time of a CUDA graph holding one model(t, x) call (t = 0.5), bf16 autocast like the sampler."""
    t = torch.full((x0.shape[0],), 0.5, device=x0.device, dtype=x0.dtype)
    x = x0.clone()

    def forward():
        with torch.autocast("cuda", dtype=autocast, enabled=autocast is not None, cache_enabled=False):
            return model(t, x)

    side = torch.cuda.Stream(x0.device)
    side.wait_stream(torch.cuda.current_stream(x0.device))
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            forward()
    torch.cuda.current_stream(x0.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        forward()
    return common.time_ms(graph.replay, x0.device, repeats=max(repeats, 20), warmup_calls=3, min_sample_s=0.01)


def run_case(
    sampler: Sampler, x0: torch.Tensor, reference: torch.Tensor | None, repeats: int
) -> tuple[dict, torch.Tensor]:
    """Times one variant at one batch size; returns (row, its samples)."""
    device, batch = x0.device, x0.shape[0]
    row = {"batch": batch, "variant": sampler.variant, "steps": sampler.steps}
    common.synchronize(device)
    resident_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    start = time.perf_counter()
    x1 = sampler(x0)  # captures the graph / compiles
    common.synchronize(device)
    row["first_call_s"] = time.perf_counter() - start
    timing = common.time_ms(lambda: sampler(x0), device, repeats=repeats, warmup_s=0.0, warmup_calls=0)
    row.update(status="ok", **timing.summary())
    row["samples_per_s"] = batch / (timing.median * 1e-3)
    row["ms_per_step"] = timing.median / sampler.steps
    row["peak_extra_mb"] = common.peak_extra_bytes(lambda: sampler(x0), device) / 1e6
    if resident_before is not None:
        row["resident_mb"] = (torch.cuda.memory_allocated(device) - resident_before) / 1e6
    row["rel_err_vs_fp32_loop"] = (
        0.0 if reference is None else ((x1.float() - reference).norm() / reference.norm()).item()
    )
    if "graph" in sampler.variant:
        fwd = graphed_forward_timing(sampler.velocity_model, x0, sampler.autocast, repeats)
        row["forward_graph_ms"] = fwd.median
        row["n_forwards_ms"] = sampler.steps * fwd.median
        row["replay_vs_n_forwards"] = timing.median / row["n_forwards_ms"]
    return row, x1


def add_ratios(rows: list[dict], flops_per_sample_step: int, matmul_tflops: float) -> None:
    """Speedup over the eager fp32 loop at the same batch; model TFLOP/s and its % of the measured matmul rate."""
    base = {r["batch"]: r["median_ms"] for r in rows if r["variant"] == BASELINE and r["status"] == "ok"}
    for r in rows:
        if r["status"] == "ok":
            r["speedup_vs_fp32_loop"] = base[r["batch"]] / r["median_ms"] if r["batch"] in base else None
            r["model_tflops"] = flops_per_sample_step * r["batch"] * r["steps"] / (r["median_ms"] * 1e-3) / 1e12
            r["pct_matmul_rate"] = 100 * r["model_tflops"] / matmul_tflops


def format_table(rows: list[dict]) -> str:
    header = [
        "batch",
        "variant",
        "median ms",
        "IQR ms",
        "samples/s",
        "ms/step",
        "vs fp32 loop",
        "TFLOP/s",
        "% matmul",
        "rel err",
        "first call s",
        "peak extra MB",
        "graph fwd ms",
        "replay / N fwd",
    ]
    return common.results_table(
        header,
        rows,
        lambda r: [str(r["batch"]), r["variant"]],
        lambda r: [
            f"{r['median_ms']:.2f}",
            f"{r['q1_ms']:.2f}..{r['q3_ms']:.2f}",
            f"{r['samples_per_s']:.1f}",
            f"{r['ms_per_step']:.3f}",
            common.fmt("{:.2f}x", r.get("speedup_vs_fp32_loop")),
            f"{r['model_tflops']:.3g}",
            f"{r['pct_matmul_rate']:.1f}",
            f"{r['rel_err_vs_fp32_loop']:.1e}",
            f"{r['first_call_s']:.2f}",
            f"{r['peak_extra_mb']:.1f}",
            common.fmt("{:.3f}", r.get("forward_graph_ms")),
            common.fmt("{:.3f}", r.get("replay_vs_n_forwards")),
        ],
    )


def format_report(meta: dict, rows: list[dict]) -> str:
    lines = [
        *common.report_head(meta),
        f"- model: {meta['model']} ({meta['parameters'] / 1e6:.2f}M parameters, image {meta['image_shape']}), eval "
        f"mode, {meta['steps']} Euler steps from t=0 to t=1; compile mode {meta['compile_mode']}",
        f"- time: median (and IQR) of {meta['repeats']} calls after a first call (graph capture / compilation, "
        "column 'first call s'), CUDA events on GPU",
        "- vs fp32 loop: speedup over eager_fp32_loop at the same batch; rel err: ||x1 - x1_fp32_loop|| / "
        "||x1_fp32_loop|| from the same noise",
        f"- TFLOP/s: the model's {meta['flops_per_sample_step'] / 1e9:.3g} GFLOP per sample and step (FlopCounterMode) "
        f"x batch x steps / median time; % matmul: of the {meta['hardware']['matmul_dtype']} matmul rate measured "
        "above",
        "- graph fwd ms: replay of one graph-captured model forward (bf16 autocast); replay / N fwd: the sampler's "
        "replay over N x that (1.00 = no overhead; target <= 1.05)",
        f"- peak extra memory: {common.PEAK_MEMORY_METHOD[meta['device']]}",
    ]
    lines += [f"- skipped: {name} ({why})" for name, why in meta["skipped_variants"].items()]
    return "\n".join(lines) + "\n\n" + format_table(rows) + "\n"


def plot(meta: dict, rows: list[dict]):
    fig, (ax_rate, ax_speed) = common.new_figure(
        2, f"Rollout sampler ({meta['model']}, {meta['steps']} Euler steps), {meta['device_name']}"
    )
    for variant in VARIANTS:
        pts = [
            (r["batch"], r["samples_per_s"], r.get("speedup_vs_fp32_loop"))
            for r in rows
            if r["variant"] == variant and r["status"] == "ok"
        ]
        if pts:
            batches, rates, speedups = zip(*pts)
            ax_rate.plot(batches, rates, marker="o", label=variant)
            ax_speed.plot(batches, [s or float("nan") for s in speedups], marker="o", label=variant)
    ax_rate.set(xscale="log", yscale="log", xlabel="batch", ylabel="samples / s")
    ax_speed.set(xscale="log", xlabel="batch", ylabel="speedup vs eager fp32 loop")
    ax_rate.legend(fontsize="small")
    return fig


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    add = parser.add_argument
    add("--model", choices=tuple(common.BENCH_MODELS), help="default: cifar10 on cuda, small on cpu")
    add("--batches", type=common.parse_positive_ints, help="comma-separated (default cuda 16,64,256; cpu 4,16,64)")
    add("--steps", type=common.positive_int, help="Euler steps (default cuda 100, cpu 10)")
    add(
        "--variants",
        type=common.parse_list(VARIANTS),
        help=f"comma-separated subset of {', '.join(VARIANTS)} "
        f"(default cuda: {','.join(DEFAULT_VARIANTS['cuda'])}; cpu: {','.join(DEFAULT_VARIANTS['cpu'])})",
    )
    add("--repeats", type=common.positive_int, help="timed calls per case (default 5; 2 with --quick)")
    add(
        "--compile-mode",
        default=None,
        help="torch.compile mode of ours_graph_compile_bf16 (default: torch's "
        "default; 'max-autotune-no-cudagraphs' autotunes)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    kind = device.type
    model_name = args.model or common.default_model(device)
    batches = args.batches or ((2,) if args.quick else BATCHES[kind])
    steps = args.steps or (2 if args.quick else STEPS[kind])
    repeats = args.repeats or (2 if args.quick else REPEATS[kind])
    requested = args.variants or list(DEFAULT_VARIANTS[kind])
    skipped = {v: why for v in requested if (why := skip_reason(v, device))}
    variants = [v for v in requested if v not in skipped]
    if BASELINE in variants:  # first, so that every other variant is compared with its samples
        variants.remove(BASELINE)
        variants.insert(0, BASELINE)
    if args.dry_run:
        return common.dry_run(
            "sampler",
            device,
            [(model_name, f"batch {b}", v, f"{steps} steps") for b, v in itertools.product(batches, requested)],
        )

    model, shape, _ = common.make_model(model_name, device)
    model.eval()
    hw = hardware.measure(device, args.quick)
    flops = common.model_flops(model, shape, device)
    meta = common.run_metadata(
        device,
        "rollout sampler",
        hardware=hw,
        model=model_name,
        image_shape=list(shape),
        parameters=common.parameter_count(model),
        flops_per_sample_step=flops,
        steps=steps,
        repeats=repeats,
        compile_mode=args.compile_mode,
        skipped_variants=skipped,
    )
    common.warn_if_loaded(meta)
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    with tqdm(list(itertools.product(batches, variants)), unit="case") as bar:
        samplers = {}
        reference = None
        for batch, variant in bar:
            bar.set_postfix_str(f"batch {batch} {variant}")
            if variant == variants[0]:
                x0 = torch.randn((batch, *shape), device=device, generator=gen)
                reference = None
            try:
                sampler = samplers.get(variant) or samplers.setdefault(
                    variant, Sampler(variant, model, steps, args.compile_mode)
                )
                row, x1 = run_case(sampler, x0, reference, repeats)
                if variant == BASELINE:
                    reference = x1.float()
                sampler.release()  # the captured graphs of this batch size
            except Exception as err:  # reported in the table
                row = {"batch": batch, "variant": variant, "steps": steps, "status": common.error_status(err)}
            rows.append(row)
            common.free_memory(device)
    add_ratios(rows, flops, hw["matmul_tflops"])
    return common.finish_run(args, "sampler", meta, rows, format_report, plot)


# ---------------------------------------------------------------------------------------------
# pytest-benchmark: one batch (16 on cuda, 4 on cpu) of the default model, default steps


PYTEST_DEVICE = torch.device(common.default_device())


@pytest.mark.parametrize("variant", VARIANTS)
def test_sampler(benchmark, variant):
    device = PYTEST_DEVICE
    if reason := skip_reason(variant, device):
        pytest.skip(reason)
    model, shape, _ = common.make_model(common.default_model(device), device)
    sampler = Sampler(variant, model.eval(), STEPS[device.type], None)
    x0 = torch.randn((BATCHES[device.type][0], *shape), device=device)
    sampler(x0)  # capture / compile outside the timing
    benchmark.extra_info.update(steps=sampler.steps, batch=x0.shape[0])

    def synced():
        sampler(x0)
        common.synchronize(device)

    benchmark(synced)
    sampler.release()


if __name__ == "__main__":
    sys.exit(main())
