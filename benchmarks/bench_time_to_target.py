"""Time to target: how much sooner orw_fast's fine-tuning reaches a reward than the official algorithm, end to end,
and which rollout gets there soonest.

Tasks (``--task``):
  digits  (default) the even-digits task of the demo (its cached pre-trained flow model and digit classifier;
          pre-trained first if missing): reward = the classifier's probability of an even digit. Every variant
          fine-tunes a copy of the same model with the same method settings (the paper's exp weights, alpha = 1,
          tau 5, learning rate 1e-3, batch 64, the last policy refreshed every 5 steps, gradient clipping at 1, no
          warm-up) until the *rolling even fraction* (the share of each step's rollouts that the classifier calls
          even, averaged over the last 10 steps) reaches the target (0.95), or until --max-steps.
  text    text-image alignment on the experiments' SD3-architecture text-digits model (a rank-8 LoRA, the
          experiments' alignment settings: softmax weights, tau 10, alpha 1, learning rate 1e-2, batch 32 = 8
          prompts x 4, the last policy refreshed every 10 steps): reward P(prompted digit), target a rolling
          alignment (the share of the step's rollouts the classifier calls the prompted digit) >= 0.7 (the base
          model is at about 0.5); quality on the held-out prompts (orw_fast.tasks.text_alignment). Only orw_fast
          runs (the official code is unconditional): its default rollout (AB3, 9 steps on the scheduler's sigmas,
          chosen by this run at 2df1d55) against Heun 20 (the default before), Heun 10, AB2 15 and the pipeline's
          own 28-step Euler, the baseline of the ratio column.
Variants (digits; text: orw_fast and orw_fast@M/scheduler/N):
  official_paired     benchmarks/baselines/official_eager.py: fp32, eager, torchcfm's exact-OT matcher, a fresh batch
                      of 100-step Euler rollouts every step, the weights carried through the matcher's resampling
  official_published  the same step exactly as published: the matcher resamples x1 and the weights stay in rollout
                      order, so each weight scales another sample's loss
  orw_fast            ORWCFMTrainer at its defaults (sampler, coupling, fused loss, ...) with the method settings
                      above; bf16 autocast on CUDA
  orw_fast_reuse2     the same with rollout_reuse=2 (each rollout serves two updates; an option, not a default)
  orw_fast@M/G/N      (--rollouts M/G/N,...) orw_fast with another rollout: solver M, grid G (a diffusers model:
                      "scheduler", its own sigmas), N steps
Reported per run and as the median over seeds: steps and wall-clock to the target (training only: the step loop,
rollouts and rewards included, evaluation excluded), and at that point the class entropy, the even entropy (the
class entropy of the samples called even, max ln 5: unlike the class entropy it does not grow with the odd digits
left, so runs that stop at different even fractions compare), diversity (mean pairwise distance), digits FD and
background level (orw_fast.tasks.demo.DigitsQuality) and even fraction of 500 samples from a fixed noise (midpoint, 50
steps, the same for every variant; the base model's too), and the mean time split of a step: rollout / reward /
loss + backward / optimizer. On text the quality columns are the held-out prompts' alignment, diversity within a
prompt, W2 to the base model's samples of the same noise, digits FD and background (24 samples a prompt, Heun 10
steps). A run that reaches the reward with less diversity or worse quality is not faster: compare the columns.

The method settings are the demo's but tau 5 (not 2.5) and a refresh every 5 steps (not 15), so that the default
run fits in 12-25 minutes on 2 CPU cores: there a step of official_paired takes about 1.7-3.3 s, and with the demo's
settings (--temperature 2.5 --refresh-every 15; about an hour) it needed 190 steps or more than the 300-step cap;
with these, about 75.

    python benchmarks/bench_time_to_target.py                     # 2-core CPU: 12-25 minutes
    python benchmarks/bench_time_to_target.py --device cuda
    python benchmarks/bench_time_to_target.py --variants official_paired,orw_fast --seeds 5
    python benchmarks/bench_time_to_target.py --quick             # toy sizes (a tiny model, a few steps)
    python benchmarks/bench_time_to_target.py --temperature 2.5 --refresh-every 15  # the demo's settings
    python benchmarks/bench_time_to_target.py --variants orw_fast --rollouts ab3/both_dense/15,ab3/both_dense/9
    python benchmarks/bench_time_to_target.py --task text        # the default rollout against cheaper ones
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and this checkout's orw_fast importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from tqdm import tqdm

from benchmarks import common, hardware

VARIANTS = ("official_paired", "official_published", "orw_fast", "orw_fast_reuse2")
EVEN_DIGITS = (0, 2, 4, 6, 8)
METHOD = dict(
    weighting="exp",
    w2_coefficient=1.0,
    temperature=5.0,
    learning_rate=1e-3,
    batch_size=64,
    grad_clip=1.0,
    warmup_steps=0,
)
REFRESH_EVERY = 5
WINDOW = 10
PHASES = ("rollout", "reward", "loss_backward", "optimizer")
SCHEDULER_GRID = "scheduler"  # a diffusers model's own sigma schedule (its sampler_grid left unset)
TASKS = ("digits", "text")


class EvenReward(torch.nn.Module):
    """P(even digit) under the classifier (the demo's ClassifierReward), recording for every call the share of the
    images whose most likely class is even."""

    def __init__(self, classifier: torch.nn.Module):
        super().__init__()
        self.classifier = classifier.eval()
        self.even_fractions: list[float] = []

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(self.classifier(images).float(), dim=1)
        even = torch.tensor(EVEN_DIGITS, device=logp.device)
        self.even_fractions.append(float(torch.isin(logp.argmax(dim=1), even).float().mean()))
        return logp.index_select(1, even).logsumexp(dim=1).exp()


class PhaseTimer:
    """Wall-clock per phase of a step, from wrappers around the trainer's rollout and reward function and hooks on its
    optimizer (synchronizing the device around each, so a phase is its own time on a GPU too)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, dict.fromkeys(PHASES, 0.0)

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            common.synchronize(self.device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            common.synchronize(self.device)
            self.seconds[phase] += time.perf_counter() - start
            return out

        return timed

    def hook_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        started = {}

        def pre(*_):
            common.synchronize(self.device)
            started["t"] = time.perf_counter()

        def post(*_):
            common.synchronize(self.device)
            self.seconds["optimizer"] += time.perf_counter() - started["t"]

        optimizer.register_step_pre_hook(pre)
        optimizer.register_step_post_hook(post)


def parse_rollouts(text: str) -> list[str]:
    """argparse type: comma-separated rollouts METHOD/GRID/STEPS (a fixed-step solver of orw_fast.sampling, one of
    its grids or "scheduler" (a diffusers model's sigmas), at least the solver's minimum steps); returns their variant
    names ``orw_fast@METHOD/GRID/STEPS``."""
    from orw_fast.sampling import FIXED_STEP_METHODS, GRIDS, min_steps

    variants = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        method, grid, steps = (item.split("/") + ["", "", ""])[:3]
        if method not in FIXED_STEP_METHODS or grid not in (*GRIDS, SCHEDULER_GRID) or not steps.isdigit():
            raise argparse.ArgumentTypeError(
                f"expected METHOD/GRID/STEPS with METHOD in {', '.join(FIXED_STEP_METHODS)} and GRID in "
                f"{', '.join(GRIDS)} (pixel models) or {SCHEDULER_GRID} (text), e.g. ab3/both_dense/15; got {item!r}"
            )
        if int(steps) < min_steps(method):
            raise argparse.ArgumentTypeError(f"{method} needs at least {min_steps(method)} steps, got {item!r}")
        variants.append(f"orw_fast@{method}/{grid}/{int(steps)}")
    if not variants:
        raise argparse.ArgumentTypeError(f"expected METHOD/GRID/STEPS,..., got {text!r}")
    return variants


def rollout_overrides(variant: str) -> dict:
    """The TrainerConfig values of a variant ``orw_fast@METHOD/GRID/STEPS`` (none for the others)."""
    if "@" not in variant:
        return {}
    method, grid, steps = variant.split("@", 1)[1].split("/")
    grid = {"sampler_grid": grid} if grid != SCHEDULER_GRID else {}  # a diffusers model's own sigmas: left unset
    return {"sampler_method": method, "sampler_steps": int(steps), **grid}


@torch.no_grad()
def evaluate(
    model, classifier, quality, shape, device: torch.device, n: int, steps: int = 50, *, samples: bool = False
):
    """Even fraction, class entropy, diversity, digits FD and background level (``quality``: a
    orw_fast.tasks.demo.DigitsQuality) of n samples of ``model`` from a fixed noise (midpoint, ``steps`` steps);
    with ``samples`` (that dict, the samples)."""
    from orw_fast.metrics import class_entropy, mean_pairwise_distance
    from orw_fast.sampling import sample

    x0 = torch.randn((n, *shape), device=device, generator=torch.Generator(device=device).manual_seed(4321))
    training = model.training
    x1 = sample(model.eval(), x0, steps=steps, method="midpoint", cuda_graph=False)
    model.train(training)
    labels = classifier(x1.clamp(-1, 1)).argmax(dim=1)
    even = torch.isin(labels, torch.tensor(EVEN_DIGITS, device=device))
    stats = {
        "eval_even_fraction": float(even.float().mean()),
        "class_entropy": class_entropy(labels, 10) + 0.0,
        "even_entropy": class_entropy(labels[even], 10) + 0.0,
        "diversity": float(mean_pairwise_distance(x1)),
        **quality(x1),
    }
    return (stats, x1) if samples else stats


class EvenDigits:
    """The even-digits task: the demo's cached models (untrained tiny ones with ``quick``), evaluated on
    ``eval_samples`` samples of a fixed noise (midpoint, 50 steps)."""

    name, target, refresh_every, baseline = "digits", 0.95, REFRESH_EVERY, "official_paired"
    variants, default_rollouts = VARIANTS, ()
    method, temperature = METHOD, METHOD["temperature"]
    columns = (  # (key, header, format) of the quality columns
        ("class_entropy", "class entropy", "{:.2f}"),
        ("even_entropy", "even entropy", "{:.2f}"),
        ("diversity", "diversity", "{:.2f}"),
        ("digits_fd", "digits FD", "{:.1f}"),
        ("background", "background", "{:.0f}"),
        ("eval_even_fraction", "even (eval)", "{:.1%}"),
    )

    def __init__(self, device: torch.device, quick: bool, eval_samples: int):
        from orw_fast.models.flow_model import PixelFlowModel, infer_image_shape
        from orw_fast.tasks.demo import DigitsQuality

        self.device = device
        self.model, self.classifier = load_models(device, quick)
        self.quality, self.shape = DigitsQuality(self.classifier), infer_image_shape(self.model)
        self.eval_samples, self.eval_steps = (16, 2) if quick else (eval_samples, 50)
        self.rollout = f"{PixelFlowModel.rollout_method}, {PixelFlowModel.rollout_steps} steps on the " + (
            f"{PixelFlowModel.rollout_grid} grid"
        )
        self.base = self.evaluate(self.model)

    def new_model(self):
        return copy.deepcopy(self.model).train()

    def reward(self) -> tuple[torch.nn.Module, list[float]]:
        """(reward module, the list it appends each step's even fraction to)."""
        reward = EvenReward(self.classifier)
        return reward, reward.even_fractions

    def evaluate(self, model) -> dict:
        return evaluate(
            model, self.classifier, self.quality, self.shape, self.device, self.eval_samples, self.eval_steps
        )

    def evaluate_trainer(self, trainer) -> dict:
        return self.evaluate(trainer.model if hasattr(trainer, "model") else trainer.net_model)


class TextAlignment:
    """The text-image alignment task of bench_methods (its TextTask: the SD3-architecture text-digits model with a
    rank-8 LoRA, an untrained tiny pipeline with ``quick``), at the experiments' alignment settings."""

    name, target, baseline = "text", 0.7, f"orw_fast@euler/{SCHEDULER_GRID}/28"  # the pipeline's own rollout
    variants = ("orw_fast",)
    default_rollouts = (
        f"orw_fast@euler/{SCHEDULER_GRID}/28",
        *(f"orw_fast@{m}/{SCHEDULER_GRID}/{n}" for m, n in (("heun", 20), ("heun", 10), ("ab2", 15))),
    )
    columns = (
        ("alignment", "alignment (eval)", "{:.1%}"),
        ("prompt_diversity", "diversity in prompt", "{:.3f}"),
        ("w2_to_reference", "W2 to base", "{:.3f}"),
        ("digits_fd", "digits FD", "{:.1f}"),
        ("background", "background", "{:.0f}"),
    )

    def __init__(self, device: torch.device, quick: bool, eval_samples: int):
        from benchmarks.bench_methods import Sizes, TextTask
        from orw_fast.models.diffusers_flow import DiffusersFlowModel
        from orw_fast.tasks.text_alignment import AlignmentSettings

        settings = AlignmentSettings()
        self.refresh_every, self.temperature = settings.steps_per_epoch, settings.temperature
        self.method = dict(
            weighting=settings.weighting,
            w2_coefficient=1.0,
            temperature=settings.temperature,
            learning_rate=settings.learning_rate,
            batch_size=16 if quick else settings.batch_size,
            grad_clip=1.0,
            warmup_steps=0,
        )
        per_prompt = 2 if quick else eval_samples
        sizes = Sizes(batch=self.method["batch_size"], eval_samples=per_prompt, eval_steps=2 if quick else 10)
        self.inner, self.device, self.eval_samples = TextTask(device, quick, sizes), device, per_prompt
        self.shape = None  # only the official code reads it (digits only)
        self.rollout = f"{DiffusersFlowModel.rollout_method}, {DiffusersFlowModel.rollout_steps} steps on the " + (
            "scheduler's sigmas"
        )
        self.base = self.inner.base_stats

    def new_model(self):
        return self.inner.make_flow()

    def reward(self) -> tuple[torch.nn.Module, list[float]]:
        reward = self.inner.reward()
        return reward, reward.fractions

    def evaluate_trainer(self, trainer) -> dict:
        return self.inner.evaluate_flow(trainer.flow, trainer.model)


def make_task(name: str, device: torch.device, quick: bool, eval_samples: int | None):
    if name == "digits":
        return EvenDigits(device, quick, eval_samples or 500)
    from orw_fast.tasks.text_alignment import AlignmentSettings

    return TextAlignment(device, quick, eval_samples or AlignmentSettings.eval_per_prompt)


def make_trainer(task, variant: str, seed: int, reward, sampler_steps: int, overrides: dict, method: dict):
    """(trainer, refresh) of a variant on a task, fine-tuning a fresh copy of its model; ``refresh()`` makes the last
    policy the policy. ``sampler_steps``: the official rollout's; ``overrides``: TrainerConfig values of orw_fast's
    (none: its defaults); ``method``: the task's method settings."""
    model = task.new_model()
    if variant.startswith("official"):
        from benchmarks.baselines.official_eager import OfficialEagerTrainer

        trainer = OfficialEagerTrainer(
            model,
            reward,
            image_shape=task.shape,
            device=task.device,
            sampler_steps=sampler_steps,
            pair_weights=variant == "official_paired",
            **{k: v for k, v in method.items() if k != "weighting"},  # the official step always uses exp weights
        )
        return trainer, trainer.update_last_policy
    from orw_fast.trainer import ORWCFMTrainer, TrainerConfig

    extra = {"rollout_reuse": 2} if variant == "orw_fast_reuse2" else rollout_overrides(variant)
    config = TrainerConfig(
        **method,
        seed=seed,
        grid_size=0,
        checkpoint_every=0,
        savedir="unused",
        precision="bf16" if task.device.type == "cuda" else "fp32",
        **extra,
        **overrides,
    )
    trainer = ORWCFMTrainer(model, config, task.device, reward_fn=reward, callbacks=[])
    return trainer, trainer.refresh_last_policy


def run_one(
    task,
    variant: str,
    seed: int,
    *,
    max_steps: int,
    target: float,
    sampler_steps: int,
    overrides: dict,
    method: dict,
    refresh_every: int,
) -> dict:
    torch.manual_seed(seed)
    np.random.seed(seed)  # torchcfm's exact-OT matcher draws its pairs from numpy's global RNG
    device = task.device
    reward, fractions = task.reward()
    trainer, refresh = make_trainer(task, variant, seed, reward, sampler_steps, overrides, method)
    timer = PhaseTimer(device)
    trainer.rollout = timer.wrap("rollout", trainer.rollout)
    trainer.reward_fn = timer.wrap("reward", trainer.reward_fn)
    timer.hook_optimizer(trainer.optimizer)
    seconds, steps, reached = 0.0, 0, False
    while steps < max_steps and not reached:
        common.synchronize(device)
        start = time.perf_counter()
        trainer.train_step()
        steps += 1
        if steps % refresh_every == 0:
            refresh()
        common.synchronize(device)
        seconds += time.perf_counter() - start
        window = fractions[-WINDOW:]
        reached = len(window) == WINDOW and sum(window) / WINDOW >= target
    split = {f"{phase}_ms": 1e3 * timer.seconds[phase] / steps for phase in PHASES[:2] + ("optimizer",)}
    split["loss_backward_ms"] = 1e3 * seconds / steps - sum(split.values())
    return {
        "variant": variant,
        "seed": seed,
        "status": "ok",
        "reached": reached,
        "steps": steps,
        "seconds": seconds,
        "ms_per_step": 1e3 * seconds / steps,
        "rolling_fraction": sum(window) / len(window),
        **split,
        **task.evaluate_trainer(trainer),
    }


def summarize(rows: list[dict], columns, baseline: str) -> list[dict]:
    """One row per variant: medians over its seeds (time, steps, the task's quality ``columns``, the time split), the
    share of seeds that reached the target, and the wall-clock ratio to the ``baseline`` variant's median."""
    keys = ("steps", "seconds", "ms_per_step", *(key for key, _, _ in columns), *(f"{p}_ms" for p in PHASES))
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == variant and r["status"] == "ok"]
        if not runs:
            continue
        med = {k: statistics.median(r[k] for r in runs) for k in keys}
        out.append({"variant": variant, "seeds": len(runs), "reached": sum(r["reached"] for r in runs), **med})
    base = next((s for s in out if s["variant"] == baseline), None)
    base = base["seconds"] if base and base["reached"] == base["seeds"] else None
    for s in out:
        s["speedup"] = base / s["seconds"] if base and s["reached"] == s["seeds"] else None
    return out


def format_report(meta: dict, rows: list[dict]) -> str:
    columns = meta["columns"]
    header = [
        "variant",
        "reached",
        "steps",
        "wall-clock s",
        f"vs {meta['baseline']}",
        *(title for _, title, _ in columns),
        "ms/step",
        "rollout ms",
        "reward ms",
        "loss+bwd ms",
        "optim ms",
    ]
    b = meta["base"]
    lines = [["base model (no fine-tuning)", "", "", "", "", *(f.format(b[k]) for k, _, f in columns), *[""] * 5]]
    lines += [
        [
            s["variant"],
            f"{s['reached']}/{s['seeds']}",
            f"{s['steps']:.0f}",
            f"{s['seconds']:.1f}",
            common.fmt("{:.1f}x", s["speedup"]),
            *(f.format(s[k]) for k, _, f in columns),
            f"{s['ms_per_step']:.0f}",
            f"{s['rollout_ms']:.0f}",
            f"{s['reward_ms']:.1f}",
            f"{s['loss_backward_ms']:.0f}",
            f"{s['optimizer_ms']:.1f}",
        ]
        for s in meta["summary"]
    ]
    runs = common.results_table(
        ["variant", "seed", "reached", "steps", "wall-clock s", *(title for _, title, _ in columns)],
        rows,
        lambda r: [r["variant"], str(r["seed"])],
        lambda r: [str(r["reached"]), str(r["steps"]), f"{r['seconds']:.1f}", *(f.format(r[k]) for k, _, f in columns)],
    )
    if meta["task"] == "digits":
        task = (
            f"- task: even digits (the demo's cached models), reward P(even); target: rolling even fraction of the "
            f"step's rollouts >= {meta['target']} over {WINDOW} steps; at most {meta['max_steps']} steps "
            f"({meta['published_max_steps']} for official_published)"
        )
        quality = (
            "class entropy (nats, max 2.30), even entropy (the class entropy of the samples called "
            "even: how evenly they spread over the five even digits, max 1.61; unlike the class entropy it does not "
            "grow with the share of odd digits left), diversity, digits FD (to the held-out real digits, "
            "orw_fast.tasks.demo.DigitsQuality; lower is better), background (0-255) and even (eval): "
            f"{meta['eval_samples']} samples at that point (midpoint, 50 steps, fixed noise)"
        )
    else:
        task = (
            "- task: text-image alignment (the experiments' SD3-architecture text-digits model, rank-8 LoRA), reward "
            f"P(prompted digit) on the training prompts; target: rolling alignment of the step's rollouts >= "
            f"{meta['target']} over {WINDOW} steps; at most {meta['max_steps']} steps"
        )
        quality = (
            "on the held-out prompts, alignment, diversity within a prompt, W2 to the base model's samples of the "
            f"same noise, digits FD and background (0-255): {meta['eval_samples']} samples a prompt at that point "
            "(Heun 10 steps on the scheduler's sigmas, fixed noise)"
        )
    official = f"official rollouts: {meta['sampler_steps']} Euler steps; " if meta["task"] == "digits" else ""
    text = [
        *common.report_head(meta),
        task,
        "- method settings (every variant): "
        + ", ".join(f"{k} {v}" for k, v in meta["method"].items())
        + f", last policy refreshed every {meta['refresh_every']} steps; {official}orw_fast's default rollout: "
        f"{meta['orw_fast_sampler']}",
        "- wall-clock: the step loop until the target (rollouts and rewards included, evaluation excluded); "
        f"medians over seeds; {quality}",
        "",
        common.markdown_table(header, lines),
        "",
        "Every run:",
        "",
        runs,
    ]
    return "\n".join(text) + "\n"


def plot(meta: dict, rows: list[dict]):
    fig, axes = common.new_figure(2, f"time to target, {meta['device_name']}")
    summary = meta["summary"]
    names = [s["variant"] for s in summary]
    axes[0].barh(names, [s["seconds"] for s in summary])
    axes[0].set(xlabel="median wall-clock to the target (s)", xscale="log")
    bottom = np.zeros(len(summary))
    for phase in PHASES:
        values = np.array([s[f"{phase}_ms"] for s in summary])
        axes[1].barh(names, values, left=bottom, label=phase)
        bottom += values
    axes[1].set(xlabel="ms per step")
    axes[1].legend(fontsize="small")
    return fig


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser, dry_run=False)
    add = parser.add_argument
    add("--task", choices=TASKS, default="digits", help="even digits (default) or text-image alignment")
    add(
        "--variants",
        type=common.parse_list(VARIANTS),
        help=f"comma-separated subset of {', '.join(VARIANTS)} (text: orw_fast only)",
    )
    add(
        "--rollouts",
        type=parse_rollouts,
        default=None,
        help="more orw_fast variants with other rollouts: comma-separated METHOD/GRID/STEPS, e.g. ab3/both_dense/15 "
        f"(text: GRID {SCHEDULER_GRID}; default there: "
        + ",".join(v.split("@")[1] for v in TextAlignment.default_rollouts)
        + ")",
    )
    add(
        "--temperature",
        type=common.number_in(0, open_low=True, what="a temperature"),
        help=f"tau of the weights, every variant (default: digits {EvenDigits.temperature:g}, the demo's 2.5; text 10)",
    )
    add(
        "--refresh-every",
        type=common.positive_int,
        help=f"refresh the last policy every N steps, every variant (default: digits {REFRESH_EVERY}, the demo's 15; "
        "text 10)",
    )
    add("--seeds", type=common.positive_int, default=3, help="seeds per variant (default 3)")
    add(
        "--published-seeds",
        type=common.positive_int,
        default=1,
        help="seeds of official_published (default 1: it does not reach the target, and a run costs the full cap)",
    )
    add("--max-steps", type=common.positive_int, default=300, help="cap per run (default 300)")
    add(
        "--published-max-steps",
        type=common.positive_int,
        default=50,
        help="cap of official_published (default 50: official_paired reached the target in 56-75 steps)",
    )
    add(
        "--target",
        type=common.number_in(0, 1, what="a reward target"),
        help="rolling fraction to reach (default: digits 0.95 even, text 0.7 aligned)",
    )
    add("--sampler-steps", type=common.positive_int, default=100, help="the official rollout's Euler steps (100)")
    add("--eval-samples", type=common.positive_int, help="evaluation samples (default: digits 500, text 24 a prompt)")
    args = parser.parse_args(argv)
    grid_of = {"digits": lambda g: g != SCHEDULER_GRID, "text": lambda g: g == SCHEDULER_GRID}[args.task]
    wrong = [v.split("@")[1] for v in args.rollouts or [] if not grid_of(v.split("/")[1])]
    if wrong:
        parser.error(
            f"--rollouts: {', '.join(wrong)}: the {args.task} task's model takes "
            + (f"GRID {SCHEDULER_GRID} (its scheduler's sigmas)" if args.task == "text" else "a pixel grid")
        )
    if args.task == "text" and set(args.variants or ()) - set(TextAlignment.variants):
        parser.error("--variants: the text task runs orw_fast only (the official code is unconditional)")
    return args


def load_models(device: torch.device, quick: bool):
    """(flow model, classifier): the demo's cached digits models, or with ``quick`` untrained tiny ones."""
    if quick:
        from orw_fast.models import make_flow_model
        from orw_fast.rewards import DigitClassifier

        torch.manual_seed(0)
        model, _ = make_flow_model((1, 8, 8), "digits")
        return model.to(device), DigitClassifier(image_shape=(1, 8, 8), num_classes=10).to(device).eval()
    from orw_fast.pretrain import default_cache_dir
    from orw_fast.tasks.demo import DemoSettings, pretrained_digits

    return pretrained_digits(default_cache_dir(), steps=DemoSettings().pretrain_steps, device=device)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    task = make_task(args.task, device, args.quick, args.eval_samples)
    temperature = args.temperature or task.temperature
    refresh_every = args.refresh_every or task.refresh_every
    method = {**task.method, "temperature": temperature}
    target = task.target if args.target is None else args.target
    rollouts = args.rollouts if args.rollouts is not None else ([] if args.variants else list(task.default_rollouts))
    variants = (args.variants or ([] if args.rollouts else list(task.variants))) + rollouts
    max_steps = 3 if args.quick else args.max_steps
    published_max = 3 if args.quick else args.published_max_steps
    meta = common.run_metadata(
        device,
        "time to target",
        hardware=hardware.measure(device, args.quick),
        task=task.name,
        target=target,
        max_steps=max_steps,
        published_max_steps=published_max,
        sampler_steps=args.sampler_steps,
        temperature=temperature,
        refresh_every=refresh_every,
        method=method,
        baseline=task.baseline,
        columns=task.columns,
        eval_samples=task.eval_samples,
        orw_fast_sampler=task.rollout,
    )
    meta["base"] = task.base
    common.warn_if_loaded(meta)
    cases = [(v, s) for v in variants for s in range(args.published_seeds if v == "official_published" else args.seeds)]
    rows = []
    with tqdm(cases, unit="run") as bar:
        for variant, seed in bar:
            bar.set_postfix_str(f"{variant} seed {seed}")
            try:
                rows.append(
                    run_one(
                        task,
                        variant,
                        seed,
                        max_steps=published_max if variant == "official_published" else max_steps,
                        target=target,
                        sampler_steps=2 if args.quick else args.sampler_steps,
                        overrides={"sampler_steps": 4} if args.quick and "@" not in variant else {},
                        method=method,
                        refresh_every=refresh_every,
                    )
                )
            except Exception as err:  # reported in the table
                rows.append({"variant": variant, "seed": seed, "status": common.error_status(err)})
            common.free_memory(device)
    meta["summary"] = summarize(rows, task.columns, task.baseline)
    default_protocol = (temperature, refresh_every) == (task.temperature, task.refresh_every)
    name = "time_to_target" + ("_text" if task.name == "text" else "")
    name += "" if default_protocol else f"_tau{temperature:g}_refresh{refresh_every}"
    return common.finish_run(args, name, meta, rows, format_report, plot)


if __name__ == "__main__":
    sys.exit(main())
