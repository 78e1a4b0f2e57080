"""The frozen last policy on the CPU: does inference-mode execution of the rollout model pay?

The last policy makes the rollouts and does not change between refreshes; rollouts take no gradient. This times one
forward of the digits UNet (the demo's cached model, or with --quick an untrained one) at the rollout batch, the way
the sampler calls it (model(t, x) under no_grad, eval mode), against ways of running a frozen network faster:

  no_grad              what the trainer does today: eager, torch.no_grad()
  inference_mode       eager under torch.inference_mode() (no version counters, no view tracking)
  channels_last        eager, no_grad, the module and its input in channels-last memory format (oneDNN's layout)
  jit_freeze           torch.jit.trace + torch.jit.freeze + torch.jit.optimize_for_inference (weights folded in as
                       constants, oneDNN fusions): a refresh must trace and freeze again
  compile              torch.compile(model) (inductor, default mode)
  compile_autotune     torch.compile(model, mode="max-autotune-no-cudagraphs")

For each: the median forward time, its ratio to no_grad, the largest deviation from no_grad's output, the one-off
set-up time (tracing, compiling) and what a refresh of the weights costs: the weights are copied in place as
`refresh_last_policy` does, then the first forward is timed and checked against the eager model with the new
weights (a variant whose output does not follow the new weights has to be rebuilt: its set-up time is the refresh
cost). A profile of the eager forward (torch.profiler, the ops with the most self CPU time) says where the time goes.

    python benchmarks/bench_frozen_policy.py                     # the digits UNet, batch 64
    python benchmarks/bench_frozen_policy.py --batch 64,128 --threads 1,2
    python benchmarks/bench_frozen_policy.py --quick
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and this checkout's orw_fast importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from benchmarks import common, hardware

VARIANTS = ("no_grad", "inference_mode", "channels_last", "jit_freeze", "compile", "compile_autotune")


def build(variant: str, model: torch.nn.Module, t: torch.Tensor, x: torch.Tensor):
    """(forward, follows_weights): a no-argument callable running ``variant`` of ``model`` on (t, x), and whether
    in-place updates of ``model``'s parameters reach it (False: it holds a copy and must be rebuilt)."""
    if variant == "no_grad":
        return lambda: _no_grad(model, t, x), True
    if variant == "inference_mode":

        def run():
            with torch.inference_mode():
                return model(t, x)

        return run, True
    if variant == "channels_last":
        model.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        return lambda: _no_grad(model, t, x_cl), True
    if variant == "jit_freeze":
        with torch.no_grad():
            traced = torch.jit.trace(model, (t, x), check_trace=False)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        return lambda: _no_grad(frozen, t, x), False
    mode = "max-autotune-no-cudagraphs" if variant == "compile_autotune" else None
    compiled = torch.compile(model, mode=mode)
    return lambda: _no_grad(compiled, t, x), True


def _no_grad(module, t, x):
    with torch.no_grad():
        return module(t, x)


def measure(variant: str, base: torch.nn.Module, batch: int, repeats: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    shape = _image_shape(base)
    x, t = torch.randn((batch, *shape), generator=g), torch.rand(batch, generator=g)
    model = copy.deepcopy(base).eval()
    reference = _no_grad(copy.deepcopy(base).eval(), t, x)
    start = time.perf_counter()
    forward, follows = build(variant, model, t, x)
    out = forward()  # the first call: tracing / compiling happens here
    setup_s = time.perf_counter() - start
    deviation = float((out.float() - reference.float()).abs().max())
    timing = common.time_ms(forward, torch.device("cpu"), repeats=repeats, warmup_calls=3, min_sample_s=0.05)
    # a refresh: new weights copied in place (as PolicyWeights.refresh_last_policy), then the first forward
    fresh = copy.deepcopy(base)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
        for target, source in zip(model.parameters(), fresh.parameters()):
            target.copy_(source)
    start = time.perf_counter()
    after = forward()
    first_after_refresh_ms = 1e3 * (time.perf_counter() - start)
    expected = _no_grad(fresh.eval(), t, x)
    follows_measured = bool(torch.allclose(after.float(), expected.float(), rtol=1e-3, atol=1e-4))
    if follows and not follows_measured:
        raise RuntimeError(f"{variant}: the output did not follow an in-place weight refresh")
    return {
        "variant": variant,
        "batch": batch,
        "status": "ok",
        "median_ms": timing.median,
        "timing": timing.summary(),
        "max_abs_deviation": deviation,
        "setup_s": setup_s,
        "follows_refresh": follows_measured,
        "refresh_cost_ms": first_after_refresh_ms if follows_measured else 1e3 * setup_s,
    }


def _image_shape(model) -> tuple:
    from orw_fast.models.flow_model import infer_image_shape

    return tuple(infer_image_shape(model))


def profile_rows(base: torch.nn.Module, batch: int, top: int) -> list[dict]:
    """The ``top`` ops by self CPU time over 10 eager no_grad forwards at ``batch``."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn((batch, *_image_shape(base)), generator=g), torch.rand(batch, generator=g)
    model = copy.deepcopy(base).eval()
    for _ in range(3):
        _no_grad(model, t, x)
    with common._quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            _no_grad(model, t, x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [
        {
            "op": e.key,
            "calls_per_forward": e.count / 10,
            "self_ms_per_forward": e.self_cpu_time_total / 10 / 1e3,
            "share": e.self_cpu_time_total / total,
        }
        for e in events[:top]
    ]


def format_report(meta: dict, rows: list[dict]) -> str:
    eager = {
        (r["threads"], r["batch"]): r["median_ms"] for r in rows if r["variant"] == "no_grad" and r["status"] == "ok"
    }

    def ratio(r):
        base = eager.get((r["threads"], r["batch"]))
        return None if base is None else base / r["median_ms"]

    header = ["threads", "batch", "variant", "median ms", "vs no_grad", "max |dev|", "set-up s", "follows refresh"]
    table = common.results_table(
        [*header, "refresh cost ms"],
        rows,
        lambda r: [str(r["threads"]), str(r["batch"]), r["variant"]],
        lambda r: [
            f"{r['median_ms']:.2f}",
            common.fmt("{:.2f}x", ratio(r)),
            f"{r['max_abs_deviation']:.1e}",
            f"{r['setup_s']:.2f}",
            "yes" if r["follows_refresh"] else "no",
            f"{r['refresh_cost_ms']:.0f}",
        ],
    )
    prof = meta["profile"]
    profile_table = common.markdown_table(
        ["op", "calls / forward", "self ms / forward", "share"],
        [
            [p["op"], f"{p['calls_per_forward']:.0f}", f"{p['self_ms_per_forward']:.3f}", f"{p['share']:.1%}"]
            for p in prof["ops"]
        ],
    )
    return (
        "\n".join(
            [
                *common.report_head(meta),
                f"- model: {meta['model']}, {meta['parameters']:,} parameters, input {meta['image_shape']}; "
                "forward as the sampler calls it, model(t, x), eval mode; medians of repeated timed samples",
                "- vs no_grad: no_grad's median / the variant's (> 1: faster); refresh cost: the first forward after "
                "an in-place weight copy, or the set-up time again where the variant holds its own copy of the weights",
                "",
                table,
                "",
                f"Where the eager forward's time goes (torch.profiler, batch {prof['batch']}, {prof['threads']} "
                "thread(s), 10 forwards, self CPU time):",
                "",
                profile_table,
            ]
        )
        + "\n"
    )


def plot(meta: dict, rows: list[dict]):
    fig, axes = common.new_figure(1, f"frozen policy forward, {meta['device_name']}")
    ok = [r for r in rows if r["status"] == "ok"]
    labels = [f"{r['variant']} (b{r['batch']}, {r['threads']}t)" for r in ok]
    axes[0].barh(labels, [r["median_ms"] for r in ok])
    axes[0].set(xlabel="median forward ms")
    return fig


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser, dry_run=False)
    add = parser.add_argument
    add("--variants", type=common.parse_list(VARIANTS), default=list(VARIANTS), help=f"subset of {', '.join(VARIANTS)}")
    add("--batch", type=common.parse_positive_ints, default=[64], help="rollout batch sizes (default 64)")
    add("--threads", type=common.parse_positive_ints, default=None, help="torch threads (default: torch's)")
    add("--repeats", type=common.positive_int, default=15, help="timed samples per case (default 15)")
    return parser.parse_args(argv)


def load_model(quick: bool) -> torch.nn.Module:
    if quick:
        from orw_fast.models import make_flow_model

        torch.manual_seed(0)
        return make_flow_model((1, 8, 8), "digits")[0]
    from orw_fast.pretrain import default_cache_dir
    from orw_fast.tasks.demo import DemoSettings, pretrained_digits

    return pretrained_digits(default_cache_dir(), steps=DemoSettings().pretrain_steps, device="cpu")[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.type != "cpu":
        print(
            "bench_frozen_policy.py: error: --device must be cpu (this is the CPU study; on a GPU the rollout is "
            "a captured CUDA graph)",
            file=sys.stderr,
        )
        return 2
    base = load_model(args.quick).eval()
    threads = args.threads or [torch.get_num_threads()]
    repeats = 3 if args.quick else args.repeats
    meta = common.run_metadata(
        args.device,
        "frozen policy forward",
        hardware=hardware.measure(args.device, args.quick),
        model="untrained digits UNet (quick)" if args.quick else "the demo's cached digits UNet",
        parameters=common.parameter_count(base),
        image_shape=list(_image_shape(base)),
    )
    common.warn_if_loaded(meta)
    cases = [(n, b, v) for n in threads for b in args.batch for v in args.variants]
    rows = []
    default_threads = torch.get_num_threads()
    with tqdm(cases, unit="case") as bar:
        for n, batch, variant in bar:
            bar.set_postfix_str(f"{variant} batch {batch}, {n} thread(s)")
            torch.set_num_threads(n)
            torch._dynamo.reset()
            try:
                rows.append({"threads": n, **measure(variant, base, batch, repeats, seed=batch)})
            except Exception as err:  # reported in the table
                rows.append({"threads": n, "batch": batch, "variant": variant, "status": common.error_status(err)})
    torch.set_num_threads(threads[-1])
    meta["profile"] = {"batch": args.batch[0], "threads": threads[-1], "ops": profile_rows(base, args.batch[0], 12)}
    torch.set_num_threads(default_threads)
    return common.finish_run(args, "frozen_policy", meta, rows, format_report, plot)


if __name__ == "__main__":
    sys.exit(main())
