"""Rollout accuracy against model calls: which fixed-step sampler reaches 100-step Euler's accuracy cheapest.

For each model, the same noise x0 is integrated by every (method, time grid, number of steps) and compared with a
tight torchdiffeq ``dopri5`` solution (rtol = atol = --ref-tol) of the same ODE:
  rms_error   per-sample RMS of x1 - x1_ref (over the sample's elements), the median over the batch
  w2          W2 distance between the sample sets {x1} and {x1_ref} (exact OT, squared Euclidean cost, POT)
  rms_error_max  the largest per-sample RMS error over the batch
Methods (orw_fast.sampling.FIXED_STEP_METHODS): euler (1 call a step), midpoint and heun (2 calls a step), ab2,
unipc (1 call a step) and ab3 (1 call a step + 1 for its Heun starter); sampling.calls counts them. Grids on t in
[0, 1] (t=0 noise, orw_fast.sampling.time_grid):
  uniform      k / N
  noise_dense  SD3's shift 3: t = 1 - 3 s / (1 + 2 s), s = 1 - k / N (steps shorter near the noise)
  data_dense   its mirror, t = 3 u / (1 + 2 u), u = k / N (steps shorter near the data)
  both_dense   t = (1 - cos(pi u)) / 2 (steps shorter at both ends)
The chosen default is the cheapest (fewest model calls) configuration whose rms_error, rms_error_max and w2 are all
no larger than 100-step uniform Euler's (the official rollout) on every model measured; the report also names the
configuration closest to it (smallest worst ratio to the baseline) at each budget of 10 to 16 calls.

Models: "digits" (the demo's pre-trained digits flow model, cached in $ORW_FAST_CACHE/digits; pre-trained first if
missing) and "cifar10" (the paper's CIFAR-10 UNet, 35.7M parameters, random weights with the zero-initialized
layers filled: see benchmarks.common.make_model); on the CPU "small" (a 3x16x16 UNet) stands in for the CIFAR UNet
with --quick.

    python benchmarks/bench_rollout_error.py                       # digits + cifar10 (CPU: about 10 minutes)
    python benchmarks/bench_rollout_error.py --models digits --calls 10,20,100
    python benchmarks/bench_rollout_error.py --quick
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

if __package__ in (None, ""):  # run as a script: make `benchmarks` and this checkout's orw_fast importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from benchmarks import common, hardware
from orw_fast.sampling import FIXED_STEP_METHODS, GRIDS, min_steps, time_grid
from orw_fast.sampling import calls as model_calls

MODELS = ("digits", "text_digits", "cifar10", "small")
CALLS = (4, 8, 10, 16, 20, 24, 28, 32, 40, 48, 64, 100)
CIFAR_CALLS = (16, 24, 32, 40, 64)  # the CIFAR UNet takes about 0.5 s a call at batch 4 on 2 CPU cores
BATCH = {"digits": 64, "text_digits": 64, "cifar10": 4, "small": 16}
BASELINE = ("euler", "uniform", 100)  # the official rollout: 100 uniform Euler steps
SCHEDULER_GRID = "scheduler"  # a diffusers model's own shifted sigma schedule, its only grid (its baseline's too)
ERRORS = ("rms_error", "rms_error_max", "w2")  # what must be no worse than the baseline's
NEAR_CALLS = range(10, 17)  # the budgets whose best configuration the report names


class Subject(NamedTuple):
    """A model as the benchmark samples it: ``field(t, x, *cond)``, the shape of a sample, the conditioning of a
    batch, and its grids (name -> times of ``steps`` steps)."""

    field: Callable
    shape: tuple
    cond: Callable[[int], tuple]
    grids: dict


def load_model(name: str, device: torch.device) -> Subject:
    """The Subject of a MODELS name, in eval mode; "text_digits" is the SD3-architecture digits pipeline sampled as
    its text-alignment task does (guidance 1, prompts cycling through every caption), on its scheduler's sigmas."""
    from orw_fast.pretrain import default_cache_dir

    named_grids = {g: (lambda steps, g=g: time_grid(g, steps)) for g in GRIDS}
    if name == "text_digits":
        from orw_fast.models.diffusers_flow import DiffusersFlowModel
        from orw_fast.tasks.text_alignment import AlignmentSettings
        from orw_fast.tasks.text_digits import MAX_SEQUENCE_LENGTH, pretrained_text_digits, prompts_for

        folder = pretrained_text_digits(default_cache_dir(), steps=AlignmentSettings.pretrain_steps)
        prompts = prompts_for()
        flow = DiffusersFlowModel(
            folder,
            prompts,
            lora_rank=None,
            guidance_scale=AlignmentSettings.guidance_scale,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        flow.prepare(device, ema=False)
        field = flow.rollout_field(flow.pipe.transformer.eval())
        return Subject(
            field,
            tuple(flow.sample_shape()),
            lambda batch: flow.conditions([prompts[i % len(prompts)] for i in range(batch)]),
            {SCHEDULER_GRID: flow.times},
        )
    if name == "digits":
        from orw_fast.models.flow_model import infer_image_shape
        from orw_fast.tasks.demo import DemoSettings, pretrained_digits

        model, _ = pretrained_digits(default_cache_dir(), steps=DemoSettings().pretrain_steps, device=device)
        return Subject(model.eval(), infer_image_shape(model), lambda batch: (), named_grids)
    model, shape, _ = common.make_model(name, device)
    return Subject(model.eval(), shape, lambda batch: (), named_grids)


def baseline_of(model: str) -> tuple[str, str, int]:
    return ("euler", SCHEDULER_GRID, 100) if model == "text_digits" else BASELINE


def measure(
    subject: Subject, x0: torch.Tensor, cond: tuple, ref: torch.Tensor, method: str, grid: str, steps: int
) -> dict:
    from orw_fast.metrics import w2_distance
    from orw_fast.sampling import sample

    x1 = sample(subject.field, x0, times=subject.grids[grid](steps), cond=cond, method=method, cuda_graph=False)
    rms = (x1 - ref).flatten(1).square().mean(dim=1).sqrt()
    return {
        "method": method,
        "grid": grid,
        "steps": steps,
        "model_calls": model_calls(method, steps),
        "rms_error": float(rms.median()),
        "rms_error_max": float(rms.max()),
        "w2": w2_distance(x1, ref),
        "status": "ok",
    }


def cases(calls, grids=GRIDS, baseline=BASELINE) -> list[tuple[str, str, int]]:
    """(method, grid, steps) for every budget of model calls a method can spend exactly, and the baseline."""
    return sorted(
        {
            (m, g, s)
            for m, g, c in itertools.product(FIXED_STEP_METHODS, grids, calls)
            for s in range(min_steps(m), c + 1)
            if model_calls(m, s) == c
        }
        | {baseline}
    )


def grids_of(model: str) -> tuple[str, ...]:
    return (SCHEDULER_GRID,) if model == "text_digits" else GRIDS


def run_model(
    name: str, device: torch.device, calls: list[int], batch: int, ref_tol: float, seed: int, bar
) -> tuple[list[dict], dict]:
    from orw_fast.sampling import sample

    subject = load_model(name, device)
    x0 = torch.randn((batch, *subject.shape), device=device, generator=torch.Generator(device=device).manual_seed(seed))
    cond = subject.cond(batch)
    counter = {"calls": 0}

    def counted(t, x, *c):
        counter["calls"] += 1
        return subject.field(t, x, *c)

    ref = sample(counted, x0, cond=cond, method="dopri5", rtol=ref_tol, atol=ref_tol, cuda_graph=False)
    info = {
        "model": name,
        "batch": batch,
        "reference_calls": counter["calls"],
        "sample_rms": float(ref.flatten(1).square().mean(dim=1).sqrt().median()),
    }
    rows = []
    for method, grid, steps in cases(calls, grids_of(name), baseline_of(name)):
        bar.set_postfix_str(f"{name} {method} {grid} {steps}")
        try:
            rows.append({"model": name, **measure(subject, x0, cond, ref, method, grid, steps)})
        except Exception as err:  # reported in the table
            rows.append(
                {
                    "model": name,
                    "method": method,
                    "grid": grid,
                    "steps": steps,
                    "model_calls": model_calls(method, steps),
                    "status": common.error_status(err),
                }
            )
        bar.update(1)
    return rows, info


def _worst_ratios(rows: list[dict]) -> list[tuple[int, float, dict]]:
    """(model calls, worst ratio of rms_error, rms_error_max and w2 to the baseline's over every model, config) for
    each configuration measured on every model; [] without a baseline on every model."""
    ok = [r for r in rows if r["status"] == "ok"]
    models = sorted({r["model"] for r in ok})
    base = {r["model"]: r for r in ok if (r["method"], r["grid"], r["steps"]) == baseline_of(r["model"])}
    if set(base) != set(models):
        return []
    by_config: dict = {}
    for r in ok:
        by_config.setdefault((r["method"], r["grid"], r["steps"]), {})[r["model"]] = r
    out = []
    for (method, grid, steps), per_model in by_config.items():
        if set(per_model) == set(models):
            ratio = max(per_model[m][key] / base[m][key] for m in models for key in ERRORS)
            out.append(
                (
                    model_calls(method, steps),
                    ratio,
                    {
                        "method": method,
                        "grid": grid,
                        "steps": steps,
                        "model_calls": model_calls(method, steps),
                        "worst_error_vs_baseline": ratio,
                    },
                )
            )
    return sorted(out, key=lambda entry: entry[:2])


def choose_default(rows: list[dict]) -> dict | None:
    """The configuration with the fewest model calls whose rms_error, rms_error_max and w2 are at most the baseline's
    on every model (ties: the smaller worst ratio to the baseline); None when none qualifies. Models on their own
    grids (text_digits) share no configuration with the others: pass their rows alone."""
    return next((config for _, ratio, config in _worst_ratios(rows) if ratio <= 1.0), None)


def nearest(rows: list[dict]) -> list[dict]:
    """For each budget in NEAR_CALLS that was measured, the configuration with the smallest worst ratio."""
    best: dict = {}
    for n, ratio, config in _worst_ratios(rows):
        if n in NEAR_CALLS and (n not in best or ratio < best[n]["worst_error_vs_baseline"]):
            best[n] = config
    return [best[n] for n in sorted(best)]


def format_table(rows: list[dict]) -> str:
    header = ["model", "method", "grid", "steps", "model calls", "median RMS error", "max RMS error", "W2 to ref"]
    ordered = sorted(rows, key=lambda r: (r["model"], r["method"], r["grid"], r["model_calls"]))
    return common.results_table(
        header,
        ordered,
        lambda r: [r["model"], r["method"], r["grid"], str(r["steps"]), str(r["model_calls"])],
        lambda r: [f"{r['rms_error']:.2e}", f"{r['rms_error_max']:.2e}", f"{r['w2']:.2e}"],
    )


def _choice_lines(label: str, chosen: dict | None, near: list[dict]) -> list[str]:
    return [
        f"- chosen{label}: "
        + (
            "none reaches the baseline's error"
            if chosen is None
            else f"**{chosen['method']}, {chosen['grid']} grid, {chosen['steps']} steps = "
            f"{chosen['model_calls']} model calls** (median RMS error, max RMS error and W2 at "
            f"most {chosen['worst_error_vs_baseline']:.2f}x the baseline's): the cheapest "
            "configuration as accurate as 100-step Euler"
        ),
        f"- closest{label} at "
        + ", ".join(
            f"{c['model_calls']} calls: {c['method']} {c['grid']} {c['steps']} steps "
            f"({c['worst_error_vs_baseline']:.2f}x)"
            for c in near
        )
        + " (the worst of the three errors' ratios to the baseline's)",
    ]


def format_report(meta: dict, rows: list[dict]) -> str:
    lines = [
        *common.report_head(meta),
        "- reference: torchdiffeq dopri5, rtol = atol = "
        + f"{meta['ref_tol']:g}; "
        + "; ".join(
            f"{m['model']}: batch {m['batch']}, {m['reference_calls']} model calls, sample RMS {m['sample_rms']:.3f}"
            for m in meta["models"]
        ),
        "- median / max RMS error: per-sample RMS of x1 - x1_ref, median / max over the batch; W2: exact OT between "
        "the sets",
        "- baseline: 100 Euler steps (the official rollout; uniform grid, text_digits its scheduler's), "
        + "; ".join(
            f"{r['model']} {r['rms_error']:.2e} / {r['rms_error_max']:.2e} / {r['w2']:.2e}"
            for r in rows
            if r["status"] == "ok" and (r["method"], r["grid"], r["steps"]) == baseline_of(r["model"])
        ),
        *_choice_lines(f" ({', '.join(meta['chosen_over'])})", meta["chosen"], meta["nearest"]),
    ]
    for model, choice in meta.get("per_model", {}).items():
        lines += _choice_lines(f" ({model})", choice["chosen"], choice["nearest"])
    return "\n".join(lines) + "\n\n" + format_table(rows) + "\n"


def plot(meta: dict, rows: list[dict]):
    ok = [r for r in rows if r["status"] == "ok"]
    models = [m["model"] for m in meta["models"]]
    fig, axes = common.new_figure(max(len(models), 1), f"rollout error against model calls, {meta['device_name']}")
    for ax, model in zip(axes, models):
        for method, grid in itertools.product(FIXED_STEP_METHODS, grids_of(model)):
            pts = sorted(
                (r["model_calls"], r["rms_error"])
                for r in ok
                if r["model"] == model and r["method"] == method and r["grid"] == grid
            )
            if pts:
                ax.plot(
                    *zip(*pts),
                    marker="o",
                    ms=3,
                    label=f"{method}, {grid}",
                    linestyle={"noise_dense": "--", "data_dense": ":", "both_dense": "-."}.get(grid, "-"),
                )
        base = [
            r["rms_error"]
            for r in ok
            if r["model"] == model and (r["method"], r["grid"], r["steps"]) == baseline_of(model)
        ]
        if base:
            ax.axhline(base[0], color="grey", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="model calls", ylabel="median RMS error vs dopri5", title=model)
        ax.legend(fontsize="x-small")
    return fig


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser, dry_run=False)
    add = parser.add_argument
    add("--models", type=common.parse_list(MODELS), help="comma-separated (default digits,cifar10; --quick: small)")
    add(
        "--calls",
        type=common.parse_positive_ints,
        help=f"model-call budgets (default {','.join(map(str, CALLS))}; cifar10 {','.join(map(str, CIFAR_CALLS))})",
    )
    add("--batch", type=common.positive_int, help="samples per model (default digits 64, cifar10 4, small 16)")
    add("--ref-tol", type=float, default=1e-6, help="dopri5 rtol = atol of the reference (default 1e-6)")
    add("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    models = args.models or (("small",) if args.quick else ("digits", "cifar10"))
    calls = args.calls or ((4, 8) if args.quick else CALLS)
    ref_tol = 1e-4 if args.quick and args.ref_tol == 1e-6 else args.ref_tol
    meta = common.run_metadata(
        device,
        "rollout error against model calls",
        hardware=hardware.measure(device, args.quick),
        ref_tol=ref_tol,
        calls=list(calls),
    )
    common.warn_if_loaded(meta)
    rows, infos = [], []
    total = sum(
        len(
            cases(
                calls if args.calls or args.quick or name != "cifar10" else CIFAR_CALLS,
                grids_of(name),
                baseline_of(name),
            )
        )
        for name in models
    )
    with tqdm(total=total, unit="case") as bar:
        for name in models:
            batch = args.batch or (4 if args.quick else BATCH[name])
            model_calls = calls if args.calls or args.quick or name != "cifar10" else CIFAR_CALLS
            model_rows, info = run_model(name, device, list(model_calls), batch, ref_tol, args.seed, bar)
            rows += model_rows
            infos.append(info)
            common.free_memory(device)
    meta["models"] = infos
    named = [r for r in rows if r["model"] != "text_digits"] or rows  # the models that share grids (or the one)
    meta["chosen_over"] = sorted({r["model"] for r in named})
    meta["chosen"], meta["nearest"] = choose_default(named), nearest(named)
    meta["per_model"] = {}
    if len(infos) > 1:  # each model alone too
        for name in (m["model"] for m in infos):
            own = [r for r in rows if r["model"] == name]
            meta["per_model"][name] = {"chosen": choose_default(own), "nearest": nearest(own)}
    return common.finish_run(args, "rollout_error", meta, rows, format_report, plot)


if __name__ == "__main__":
    sys.exit(main())
