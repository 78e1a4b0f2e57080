"""Benchmark of one whole ORW-CFM-W2 training step: rollout + reward + coupling + reference forward +
loss + backward + optimizer, orw_fast against the official algorithm run eagerly.

Variants (same initial weights, reward, batch, sampler steps, alpha, tau, lr, grad clip; exp weights):
  official_eager  benchmarks/baselines/official_eager.py: fp32, eager Euler loop, torchcfm's exact-OT
                  matcher, eager loss (see its docstring)
  ours            orw_fast.ORWCFMTrainer.train_step with its fast paths: --precision autocast (bf16 on
                  cuda), CUDA-graph rollout (cuda), fused native loss; independent coupling
  ours_ot         the same with exact OT pairing (coupling="ot")
  ours_compile    ours with torch.compile of the policy's forward
The reward is orw_fast.rewards.jpeg_compressibility for every variant. Reported: median step time,
samples/s and the ratio to official_eager at the same batch (target on GPU: >= 3x, aim 4x), the rollout's
share of the step, and peak memory.

GPU defaults: the paper's CIFAR-10 UNet, 100 Euler steps, batch 64 and 128. CPU defaults: a small UNet
(3x16x16), 10 Euler steps, batch 16 and 64.

    python benchmarks/bench_train_step.py             # cuda if available, else cpu
    python benchmarks/bench_train_step.py --batches 128 --variants official_eager,ours
    python benchmarks/bench_train_step.py --quick     # smoke run
    pytest benchmarks/bench_train_step.py --benchmark-only
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and this checkout's orw_fast importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pytest
import torch
from tqdm import tqdm

from benchmarks import common, hardware

VARIANTS = ("official_eager", "ours", "ours_ot", "ours_compile")
DEFAULT_VARIANTS = {"cuda": VARIANTS, "cpu": ("official_eager", "ours", "ours_ot")}
BATCHES = {"cuda": (64, 128), "cpu": (16, 64)}
STEPS = {"cuda": 100, "cpu": 10}
REPEATS = {"cuda": 8, "cpu": 7}
PRECISION = {"cuda": "bf16", "cpu": "fp32"}
BASELINE = "official_eager"
HYPER = dict(learning_rate=2e-4, w2_coefficient=1.0, temperature=0.5, grad_clip=1.0)  # the official script's


def make_trainer(variant: str, model, shape, batch: int, steps: int, precision: str, savedir: str):
    """(trainer, rollout function) of a variant, training ``model`` (consumed) with the JPEG reward."""
    from orw_fast.rewards import jpeg_compressibility

    if variant == BASELINE:
        from benchmarks.baselines.official_eager import OfficialEagerTrainer

        trainer = OfficialEagerTrainer(
            model, jpeg_compressibility, image_shape=shape, batch_size=batch, sampler_steps=steps, **HYPER
        )
        return trainer, trainer.rollout
    from orw_fast.trainer import ORWCFMTrainer, TrainerConfig

    config = TrainerConfig(
        **HYPER,
        batch_size=batch,
        savedir=savedir,
        image_shape=shape,
        weighting="exp",
        coupling="ot" if variant == "ours_ot" else "independent",
        sampler_steps=steps,
        sampler_method="euler",
        sampler_grid="uniform",  # the official step's work
        precision=precision,
        compile=variant == "ours_compile",
        grid_size=0,
        checkpoint_every=0,
    )
    trainer = ORWCFMTrainer(model, config, reward_fn=jpeg_compressibility)
    return trainer, trainer.rollout


def run_case(
    variant: str, base_model, shape, batch: int, steps: int, precision: str, repeats: int, device: torch.device
) -> dict:
    row = {
        "batch": batch,
        "variant": variant,
        "sampler_steps": steps,
        "precision": "fp32" if variant == BASELINE else precision,
    }
    torch.manual_seed(0)
    np.random.seed(0)  # torchcfm's OT resampling draws from numpy's global RNG
    with tempfile.TemporaryDirectory() as savedir:
        trainer, rollout = make_trainer(variant, copy.deepcopy(base_model), shape, batch, steps, precision, savedir)
        start = time.perf_counter()
        trainer.train_step()  # captures the rollout graph / compiles
        common.synchronize(device)
        row["first_call_s"] = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            row["resident_mb"] = torch.cuda.memory_allocated(device) / 1e6
        timing = common.time_wall_ms(trainer.train_step, device, repeats=repeats, warmup_calls=1)
        if device.type == "cuda":
            row["peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 1e6
        rollout_timing = common.time_wall_ms(
            lambda: rollout(batch), device, repeats=max(2, repeats // 2), warmup_calls=0
        )
        row["peak_extra_mb"] = common.peak_extra_bytes(trainer.train_step, device) / 1e6
    row.update(status="ok", **timing.summary())
    row["samples_per_s"] = batch / (timing.median * 1e-3)
    row["rollout_ms"] = rollout_timing.median
    row["rollout_share"] = rollout_timing.median / timing.median
    return row


def add_ratios(rows: list[dict], flops_per_sample: int, matmul_tflops: float) -> None:
    """Ratio to official_eager at the same batch; the step's model TFLOP/s and its % of the measured matmul rate."""
    base = {r["batch"]: r["median_ms"] for r in rows if r["variant"] == BASELINE and r["status"] == "ok"}
    for r in rows:
        if r["status"] == "ok":
            r["speedup_vs_official"] = base[r["batch"]] / r["median_ms"] if r["batch"] in base else None
            r["model_tflops"] = flops_per_sample * r["batch"] / (r["median_ms"] * 1e-3) / 1e12
            r["pct_matmul_rate"] = 100 * r["model_tflops"] / matmul_tflops


def format_table(rows: list[dict]) -> str:
    header = [
        "batch",
        "variant",
        "precision",
        "median step ms",
        "IQR ms",
        "samples/s",
        "vs official",
        "TFLOP/s",
        "% matmul",
        "rollout ms",
        "rollout share",
        "first step s",
        "peak alloc MB",
        "peak extra MB",
    ]
    return common.results_table(
        header,
        rows,
        lambda r: [str(r["batch"]), r["variant"]],
        lambda r: [
            r["precision"],
            f"{r['median_ms']:.1f}",
            f"{r['q1_ms']:.1f}..{r['q3_ms']:.1f}",
            f"{r['samples_per_s']:.1f}",
            common.fmt("{:.2f}x", r.get("speedup_vs_official")),
            f"{r['model_tflops']:.3g}",
            f"{r['pct_matmul_rate']:.1f}",
            f"{r['rollout_ms']:.1f}",
            f"{100 * r['rollout_share']:.0f} %",
            f"{r['first_call_s']:.2f}",
            common.fmt("{:.0f}", r.get("peak_allocated_mb")),
            f"{r['peak_extra_mb']:.1f}",
        ],
    )


def format_report(meta: dict, rows: list[dict]) -> str:
    lines = [
        *common.report_head(meta),
        f"- model: {meta['model']} ({meta['parameters'] / 1e6:.2f}M parameters, image {meta['image_shape']}); "
        f"{meta['sampler_steps']} Euler steps per rollout; reward jpeg_compressibility; exp weights; ours' loss "
        f"backend {meta['loss_backend']}, rollout {'in a CUDA graph' if meta['device'] == 'cuda' else 'eager'}; "
        + ", ".join(f"{k} {v}" for k, v in meta["hyper"].items()),
        f"- step time: host wall clock of train_step() with the device synchronized, median (and IQR) of "
        f"{meta['repeats']} steps after the first step (graph capture / compilation: 'first step s') and one more",
        "- vs official: samples/s over official_eager's at the same batch (target on GPU >= 3x, aim 4x); rollout ms: "
        "the rollout alone (median), its share of the step",
        f"- TFLOP/s: {meta['flops_per_sample'] / 1e9:.4g} GFLOP per sample and step (FlopCounterMode: "
        f"{meta['sampler_steps']} "
        "rollout forwards + policy forward and backward + reference forward) x batch / median step time; % matmul: of "
        f"the {meta['hardware']['matmul_dtype']} matmul rate measured above",
        "- peak alloc MB (CUDA): torch.cuda.max_memory_allocated over the timed steps (model, copies, optimizer state, "
        f"graphs included); peak extra MB: {common.PEAK_MEMORY_METHOD[meta['device']].replace('one call', 'one step')}",
    ]
    return "\n".join(lines) + "\n\n" + format_table(rows) + "\n"


def plot(meta: dict, rows: list[dict]):
    ok = [r for r in rows if r["status"] == "ok"]
    batches = sorted({r["batch"] for r in ok})
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in ok)]
    fig, (ax,) = common.new_figure(1, f"ORW-CFM-W2 training step ({meta['model']}), {meta['device_name']}")
    width = 0.8 / max(len(variants), 1)
    for k, variant in enumerate(variants):
        by_batch = {r["batch"]: r for r in ok if r["variant"] == variant}
        xs = [i + k * width for i, b in enumerate(batches) if b in by_batch]
        ys = [by_batch[b]["samples_per_s"] for b in batches if b in by_batch]
        bars = ax.bar(xs, ys, width, label=variant)
        for bar, b in zip(bars, [b for b in batches if b in by_batch]):
            ratio = by_batch[b].get("speedup_vs_official")
            if ratio is not None:
                ax.annotate(
                    f"{ratio:.1f}x",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize="small",
                )
    ax.set_xticks([i + width * (len(variants) - 1) / 2 for i in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set(ylabel="samples / s (training step)")
    ax.legend(fontsize="small")
    return fig


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    add = parser.add_argument
    add("--model", choices=tuple(common.BENCH_MODELS), help="default: cifar10 on cuda, small on cpu")
    add("--batches", type=common.parse_positive_ints, help="comma-separated (default cuda 64,128; cpu 16,64)")
    add("--sampler-steps", type=common.positive_int, help="Euler steps per rollout (default cuda 100, cpu 10)")
    add(
        "--variants",
        type=common.parse_list(VARIANTS),
        help=f"comma-separated subset of {', '.join(VARIANTS)} "
        f"(default cuda: all; cpu: {','.join(DEFAULT_VARIANTS['cpu'])})",
    )
    add("--precision", choices=("fp32", "bf16", "fp16"), help="autocast of ours (default bf16 on cuda, fp32 on cpu)")
    add("--repeats", type=common.positive_int, help="timed steps per case (default cuda 8, cpu 7; 2 with --quick)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    kind = device.type
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the trainers allocate on the current device (parse_device gives an index)
    model_name = args.model or common.default_model(device)
    batches = args.batches or ((4,) if args.quick else BATCHES[kind])
    steps = args.sampler_steps or (2 if args.quick else STEPS[kind])
    repeats = args.repeats or (2 if args.quick else REPEATS[kind])
    precision = args.precision or PRECISION[kind]
    variants = args.variants or list(DEFAULT_VARIANTS[kind])
    if args.dry_run:
        return common.dry_run(
            "train_step",
            device,
            [
                (model_name, f"batch {b}", v, f"{steps} steps", precision)
                for b, v in itertools.product(batches, variants)
            ],
        )

    from orw_fast.ops.orw_cfm_w2 import _resolve_backend

    base_model, shape, _ = common.make_model(model_name, device)
    hw = hardware.measure(device, args.quick)
    loss_backend = _resolve_backend("auto", device)  # what ORWCFMTrainer's fused loss runs on
    forward = common.model_flops(base_model, shape, device)
    flops = (steps + 1) * forward + common.model_flops(base_model, shape, device, backward=True)
    meta = common.run_metadata(
        device,
        "ORW-CFM-W2 training step",
        hardware=hw,
        model=model_name,
        image_shape=list(shape),
        parameters=common.parameter_count(base_model),
        flops_per_sample=flops,
        sampler_steps=steps,
        repeats=repeats,
        precision=precision,
        loss_backend=loss_backend,
        hyper=HYPER,
    )
    common.warn_if_loaded(meta)
    rows = []
    with tqdm(list(itertools.product(batches, variants)), unit="case") as bar:
        for batch, variant in bar:
            bar.set_postfix_str(f"batch {batch} {variant}")
            try:
                rows.append(run_case(variant, base_model, shape, batch, steps, precision, repeats, device))
            except Exception as err:  # reported in the table
                rows.append({"batch": batch, "variant": variant, "status": common.error_status(err)})
            common.free_memory(device)
    add_ratios(rows, flops, hw["matmul_tflops"])
    return common.finish_run(args, "train_step", meta, rows, format_report, plot)


# ---------------------------------------------------------------------------------------------
# pytest-benchmark: the default model and sampler steps, the first default batch


PYTEST_DEVICE = torch.device(common.default_device())


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step(benchmark, variant, tmp_path):
    device = PYTEST_DEVICE
    model, shape, _ = common.make_model(common.default_model(device), device)
    trainer, _ = make_trainer(
        variant, model, shape, BATCHES[device.type][0], STEPS[device.type], PRECISION[device.type], str(tmp_path)
    )
    trainer.train_step()  # capture / compile outside the timing

    def synced():
        trainer.train_step()
        common.synchronize(device)

    benchmark(synced)


if __name__ == "__main__":
    sys.exit(main())
