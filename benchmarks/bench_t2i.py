"""Benchmark of text-to-image fine-tuning (diffusers SD3 / FLUX with orw_fast's trainer): rollouts, training
steps and prompt handling, with random weights (speed and memory do not depend on their values; nothing is
downloaded).

Models: tiny-sd3, tiny-flux (orw_fast.tasks.tiny_pipelines, a few hundred thousand parameters: CPU runs in
seconds) and sd3.5-medium, flux-dev (the published transformer and VAE architectures, 2.2B and 12B parameters, in
bf16: GPU only). Variants, each at every batch:
  rollout_eager    one rollout of the last policy (``sampler_steps`` steps, the pipeline's sigma schedule, CFG for
                   SD3 / the guidance embedding for FLUX), eager loop
  rollout_graph    the same replayed from a CUDA graph (CUDA only)
  rollout_compile  the same with the transformer under torch.compile, eager loop
  step_lora        a whole ORWCFMTrainer.train_step with a LoRA adapter (rank --lora-rank) and cached prompt
                   embeddings (reward: mean brightness of the decoded images)
  step_full        the same, training the whole transformer (tiny models, and sd3.5-medium on a GPU with room)
  prompts_cached   the prompts' conditioning of one step from the embedding cache
  prompts_encoded  the same encoded by the text encoders every step (what the cache saves)
Reported: median (IQR) wall-clock ms with the device synchronized, samples/s, and peak allocated memory (CUDA) or
the peak extra memory of one call (CPU profiler).

    python benchmarks/bench_t2i.py                    # cuda if available (published sizes), else cpu (tiny)
    python benchmarks/bench_t2i.py --models tiny-sd3 --batches 4,8 --variants step_lora,step_full
    python benchmarks/bench_t2i.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import tempfile
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and this checkout's orw_fast importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from benchmarks import common, hardware

MODELS = {  # name -> (kind, published architecture, resolution in pixels)
    "tiny-sd3": ("sd3", False, 8),
    "tiny-flux": ("flux", False, 16),
    "sd3.5-medium": ("sd3", True, 512),
    "flux-dev": ("flux", True, 512),
}
VARIANTS = (
    "rollout_eager",
    "rollout_graph",
    "rollout_compile",
    "step_lora",
    "step_full",
    "prompts_cached",
    "prompts_encoded",
)
DEFAULT_MODELS = {"cuda": ("sd3.5-medium", "flux-dev"), "cpu": ("tiny-sd3", "tiny-flux")}
BATCHES = {"cuda": (4, 8), "cpu": (4, 16)}
STEPS = {"cuda": 28, "cpu": 10}
REPEATS = {"cuda": 5, "cpu": 5}
PROMPTS = [
    f"a photo of a {color} {thing}"
    for color in ("red", "blue", "green", "black")
    for thing in ("cat", "dog", "bird", "car", "house", "tree")
]
FULL_FINETUNE_LIMIT = 3e9  # parameters: four copies and Adam's state of more do not fit one 141 GB GPU


@contextlib.contextmanager
def _building(device: torch.device, dtype: torch.dtype):
    """Modules made inside are allocated on ``device`` in ``dtype`` (no CPU copy of a 12B model)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def make_flow(model: str, device: torch.device, *, lora_rank: int | None, keep_text_encoders: bool = False):
    from orw_fast.models.diffusers_flow import DiffusersFlowModel
    from orw_fast.tasks.tiny_pipelines import tiny_pipeline

    kind, published, resolution = MODELS[model]
    dtype = torch.bfloat16 if published else torch.float32
    with warnings.catch_warnings(), _building(device if published else torch.device("cpu"), dtype):
        warnings.simplefilter("ignore")
        pipeline = tiny_pipeline(kind, published=published, sample_size=resolution)
    return DiffusersFlowModel(
        pipeline,
        PROMPTS,
        lora_rank=lora_rank,
        resolution=resolution,
        max_sequence_length=77 if published else 16,
        keep_text_encoders=keep_text_encoders,
    )


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def _trainer(flow, device, batch: int, steps: int, savedir: str):
    from orw_fast.trainer import ORWCFMTrainer, TrainerConfig

    config = TrainerConfig(
        batch_size=batch,
        sampler_steps=steps,
        sampler_method="euler",
        learning_rate=1e-4,
        grid_size=0,
        checkpoint_every=0,
        savedir=savedir,
        precision="bf16" if device.type == "cuda" else "fp32",
    )
    return ORWCFMTrainer(flow, config, device, reward_fn=brightness)


def run_case(
    model: str, variant: str, batch: int, steps: int, lora_rank: int, repeats: int, device: torch.device
) -> dict:
    row = {"model": model, "variant": variant, "batch": batch, "sampler_steps": steps}
    if variant == "rollout_graph" and device.type != "cuda":
        return {**row, "status": "skipped: CUDA graphs need a CUDA device"}
    full = variant == "step_full"
    flow = make_flow(
        model, device, lora_rank=None if full else lora_rank, keep_text_encoders=variant == "prompts_encoded"
    )
    if full and common.parameter_count(flow.transformer) > FULL_FINETUNE_LIMIT:
        return {**row, "status": "skipped: full fine-tuning of this model does not fit one GPU"}
    with tempfile.TemporaryDirectory() as savedir:
        trainer = _trainer(flow, device, batch, steps, savedir)
        prompts = flow.prompts.sample(batch, torch.Generator().manual_seed(0))
        x0 = torch.randn((batch, *flow.sample_shape()), device=device)
        if variant.startswith("rollout"):
            cuda_graph = variant == "rollout_graph"
            module = torch.compile(flow.transformer) if variant == "rollout_compile" else flow.transformer
            call = lambda: flow.generate(
                module,
                x0,
                prompts,
                steps=steps,
                cuda_graph=cuda_graph,  # noqa: E731
                autocast=trainer.autocast_dtype,
            )
        elif variant.startswith("step"):
            call = trainer.train_step
        elif variant == "prompts_cached":
            call = lambda: flow.conditions(prompts)  # noqa: E731
        else:
            call = lambda: _encode(flow, prompts, device)  # noqa: E731
        call()  # capture / compile / first allocation outside the timing
        common.synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timing = common.time_wall_ms(call, device, repeats=repeats, warmup_calls=1)
        if device.type == "cuda":
            row["peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 1e6
        row["peak_extra_mb"] = common.peak_extra_bytes(call, device) / 1e6
        row["trainable_parameters"] = sum(p.numel() for p in trainer.weights.trainable_parameters())
    row.update(status="ok", **timing.summary())
    row["samples_per_s"] = batch / (timing.median * 1e-3)
    return row


def _encode(flow, prompts, device):
    """The conditioning of ``prompts`` through the text encoders (what the embedding cache replaces)."""
    with torch.no_grad():
        return flow.encode_prompts(prompts, device)


def format_table(rows: list[dict]) -> str:
    header = [
        "model",
        "variant",
        "batch",
        "median ms",
        "IQR ms",
        "samples/s",
        "trainable params",
        "peak alloc MB",
        "peak extra MB",
    ]
    return common.results_table(
        header,
        rows,
        lambda r: [r["model"], r["variant"], str(r["batch"])],
        lambda r: [
            f"{r['median_ms']:.2f}",
            f"{r['q1_ms']:.2f}..{r['q3_ms']:.2f}",
            f"{r['samples_per_s']:.1f}",
            f"{r['trainable_parameters'] / 1e6:.3g}M",
            common.fmt("{:.0f}", r.get("peak_allocated_mb")),
            f"{r['peak_extra_mb']:.1f}",
        ],
    )


def format_report(meta: dict, rows: list[dict]) -> str:
    lines = [
        *common.report_head(meta),
        f"- models: {', '.join(meta['models'])} (random weights; published: the SD3.5-medium / FLUX.1-dev transformer "
        f"and VAE, bf16); {meta['sampler_steps']} steps per rollout on the pipeline's sigma schedule; LoRA rank "
        f"{meta['lora_rank']}; reward: mean brightness of the VAE-decoded images; precision {meta['precision']}",
        f"- time: host wall clock with the device synchronized, median (IQR) of {meta['repeats']} calls after one "
        "untimed call (graph capture, compilation) and one warm-up",
        "- peak alloc MB (CUDA): torch.cuda.max_memory_allocated over the timed calls; peak extra MB: "
        + common.PEAK_MEMORY_METHOD[meta["device"]],
    ]
    return "\n".join(lines) + "\n\n" + format_table(rows) + "\n"


def plot(meta: dict, rows: list[dict]):
    ok = [r for r in rows if r["status"] == "ok"]
    models = list(dict.fromkeys(r["model"] for r in ok))
    fig, axes = common.new_figure(max(len(models), 1), f"text-to-image fine-tuning, {meta['device_name']}")
    for ax, model in zip(axes, models):
        cases = [r for r in ok if r["model"] == model]
        labels = [f"{r['variant']}\nB={r['batch']}" for r in cases]
        ax.barh(range(len(cases)), [r["median_ms"] for r in cases])
        ax.set_yticks(range(len(cases)), labels, fontsize="x-small")
        ax.set(xlabel="median ms", title=model, xscale="log")
    return fig


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    add = parser.add_argument
    add(
        "--models",
        type=common.parse_list(tuple(MODELS)),
        help="comma-separated (default cuda: sd3.5-medium,flux-dev; cpu: tiny-sd3,tiny-flux)",
    )
    add("--batches", type=common.parse_positive_ints, help="comma-separated (default cuda 4,8; cpu 4,16)")
    add("--sampler-steps", type=common.positive_int, help="steps per rollout (default cuda 28, cpu 10)")
    add("--variants", type=common.parse_list(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    add("--lora-rank", type=common.positive_int, default=16)
    add("--repeats", type=common.positive_int, help="timed calls per case (default 5; 2 with --quick)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, kind = args.device, args.device.type
    if kind == "cuda":
        torch.cuda.set_device(device)
    models = args.models or (("tiny-sd3",) if args.quick else DEFAULT_MODELS[kind])
    batches = args.batches or ((2,) if args.quick else BATCHES[kind])
    steps = args.sampler_steps or (2 if args.quick else STEPS[kind])
    repeats = args.repeats or (2 if args.quick else REPEATS[kind])
    variants = args.variants or list(VARIANTS)
    if args.dry_run:
        return common.dry_run(
            "t2i",
            device,
            [(m, f"B={b}", v, f"{steps} steps") for m, b, v in itertools.product(models, batches, variants)],
        )
    if kind == "cpu" and any(MODELS[m][1] for m in models):
        raise SystemExit("error: the published architectures need a GPU; use tiny-sd3 or tiny-flux on the CPU")
    hw = hardware.measure(device, args.quick)
    meta = common.run_metadata(
        device,
        "text-to-image fine-tuning",
        hardware=hw,
        models=list(models),
        sampler_steps=steps,
        repeats=repeats,
        lora_rank=args.lora_rank,
        precision="bf16" if kind == "cuda" else "fp32",
    )
    common.warn_if_loaded(meta)
    rows = []
    with tqdm(list(itertools.product(models, batches, variants)), unit="case") as bar:
        for model, batch, variant in bar:
            bar.set_postfix_str(f"{model} B={batch} {variant}")
            try:
                rows.append(run_case(model, variant, batch, steps, args.lora_rank, repeats, device))
            except Exception as err:  # reported in the table
                rows.append({"model": model, "variant": variant, "batch": batch, "status": common.error_status(err)})
            common.free_memory(device)
    status = common.finish_run(args, "t2i", meta, rows, format_report, plot)
    skipped_only = all(r["status"] == "ok" or r["status"].startswith("skipped") for r in rows)
    return 0 if skipped_only else status


if __name__ == "__main__":
    sys.exit(main())
