"""Methods: which online reward fine-tuning method reaches a reward soonest on the same task, model and clock, and at
what cost in diversity and quality (issue 24). Every method fine-tunes a copy of the same model with the same rollout
batch per step until a rolling reward target or a wall-clock cap.

Tasks (``--tasks``):
  digits  the demo's cached even-digits models; reward P(even) under the digit classifier; target: the rolling even
          fraction (the share of each step's rollouts the classifier calls even, over the last 10 steps) >= 0.95
  text    the experiments' SD3-architecture text-conditioned digits model with a rank-8 LoRA; reward P(prompted digit)
          on the training prompts; target: the rolling alignment (the share of the step's rollouts the classifier
          calls the prompted digit, last 10 steps) >= --text-target (0.7; the base model is at about 0.5); evaluated
          on the held-out prompts (orw_fast.tasks.text_alignment)

Methods (``--methods``), each at its paper's defaults adapted to the task (batch B = 32 for all: the same rollout
batch per step; "x10 lr" on text: a LoRA, at ten times the full fine-tuning rate, as the text experiments):
  | method         | code                          | defaults (digits; text)                                       |
  | official_orw   | baselines/official_eager.py   | exp weights, tau 5, alpha 1, Adam lr 1e-3, 100 Euler steps    |
  |                | (weights paired)              | (CUDA; 20 on the CPU, to fit the clock: this favours it),     |
  |                |                               | last policy every 5 steps, clip 1; text: not run (the         |
  |                |                               | official code is unconditional)                               |
  | orw_cfm_w2     | ORWCFMTrainer, orw_cfm_w2     | as official_orw with orw_fast's default rollouts (AB3, 9      |
  |                |                               | steps on the grid dense at both ends: 10 model calls);        |
  |                |                               | text: softmax weights, tau 10, alpha 1, lr 1e-2 (the          |
  |                |                               | experiments' alignment settings; Heun 10 steps)               |
  | nft            | ORWCFMTrainer, nft            | DiffusionNFT: beta 1, alpha 1e-4 (train.beta), adv clip 5,    |
  |                |                               | old policy = EMA decayed min(0.001 s, 0.5) at refreshes,      |
  |                |                               | lr 1e-3 (x10 text)                                            |
  | awm            | ORWCFMTrainer, awm            | AWM: alpha 1e-4 (train.beta), ema_beta 1 toward the EMA       |
  |                |                               | decayed min(0.001 s, 0.3) at refreshes (its default),         |
  |                |                               | batch-std advantages clipped at 5, lr 1e-3 (x10 text)         |
  | flow_grpo      | baselines/flow_grpo.py        | T = 10 SDE steps, noise 0.7, beta 0.04, clip 1e-4, AdamW lr   |
  |                |                               | 1e-4 (x10 text), 2 minibatches, groups: the batch (digits),   |
  |                |                               | 4 samples a prompt (text; uniform grid = its shift-1 schedule)|
  | flow_grpo_fast | flow_grpo.py, sde_window 2    | as flow_grpo, 2 SDE steps branched in the first half          |
The orw_fast objectives refresh the last policy every 5 steps (an epoch of 5 steps) like official_orw.

Sweep: every method runs the same number of sweep points (4), each with --sweep-seeds seeds: its defaults, the
learning rate x3, and two points on its own knobs: tau x2 and alpha 0 (ORW-CFM-W2, both), beta 0.1 and lr /3 (NFT),
alpha 1 and lr /3 (AWM), beta 0 and clip 1e-3 (Flow-GRPO, both). --points N keeps the first N of each.
Best point at equal diversity: the diversity floor is the lowest, over the methods that reached the target, of each
method's most diverse reaching point (class entropy on digits, diversity within a prompt on text), so every such
method has a point at or above it; each method's best point is its fastest (median wall-clock) point whose every run
reached the target with median diversity >= the floor; it is then run with --seeds seeds (the sweep's seeds reused).
Every run trains to its cap: the time-to-target numbers and an evaluation are taken when it first reaches the
target, and it is evaluated again at the cap. Quality-bounded reward front: each method's best evaluated reward over
all its runs' evaluation points (at the target and at the cap) whose samples keep digits FD <= 3x the base's and
background <= 2x the base's (digits), or diversity within a prompt >= 90 % and background <= 110 % of the base's
(text): the best reward it holds within the same budget at that quality.

Per run: steps, model forward calls and forward samples (every call of the model's class: policy, reference, old
policy, last policy, rollouts; counted by a forward hook, orw_fast's rollouts from its solver's calls per rollout as
a CUDA graph replay calls no Python forward) and backward calls (forwards whose output got a gradient),
wall-clock to the end (the step loop, rollouts and rewards included, evaluation excluded), and at that point, from a
fixed noise: class entropy, even entropy, diversity, digits FD, background, W2 to the base model's samples of the same
noise (digits), or alignment, diversity within a prompt, W2 to the reference, digits FD, background (text, held-out
prompts); peak memory: CUDA max_memory_allocated during the run, CPU the growth of the process's peak RSS
(ru_maxrss) during the run (0 when it stayed under an earlier peak).

Fit for the clock (the default run, both tasks, 2-core CPU). The protocol is cut to: batch 32 (the issue's runs used
64), one sweep seed, 4 points per method, 3 seeds only for the best points (the sweep's seed reused, so 2 more
runs), a cap of 25 s per run on both tasks, 128 evaluation samples x 10 midpoint steps on digits (about 4x cheaper;
FD is biased by N, so compare at equal N only) and 24 a prompt on text. Every run goes to its cap. Measured on
the 2-core Intel Xeon (2026-12-04, quiet machine): a digits run with its two evaluations takes 27 s (a step at
B = 32: orw_cfm_w2 0.23 s, awm 0.3 s, nft 0.3 s, official_orw 0.5 s, flow_grpo_fast 0.4 s, flow_grpo 1.2 s), a text
run 28-29 s (a step: 0.3 s for the orw_fast objectives, 0.7 s for flow_grpo); the 24 digits sweep runs and 10 finals
took 15.4 min (cd82c8e), the 24 text sweep rows (4 of them the official code, skipped) and 6 finals 12.1 min
(2df1d55); with the set-up (the base models' evaluation, about 30 s a task) the default run took about 28 min (60
runs), and would take about 31 if every method had a best point on both tasks (66 runs). Not counted: the one-time
pre-training of the cached models when they are missing (about 4 min digits, 6 min text).
--device cuda runs the same with the official rollout's 100 Euler steps, 500 evaluation samples x 20 steps and a cap
of 30 s per run (the "methods" stage of benchmarks/run_gpu.sh; its time there is not measured yet: 66 runs x (30 s +
two evaluations + set-up), about 35-40 min).

    python benchmarks/bench_methods.py                                    # both tasks, ~28 min on 2 CPU cores
    python benchmarks/bench_methods.py --device cuda
    python benchmarks/bench_methods.py --tasks digits --methods orw_cfm_w2,flow_grpo --seeds 5
    python benchmarks/bench_methods.py --quick                            # toy sizes, seconds
    python benchmarks/bench_methods.py --dry-run                          # lists the runs
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and this checkout's orw_fast importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from tqdm import tqdm

from benchmarks import common, hardware

TASKS = ("digits", "text")
METHODS = ("official_orw", "orw_cfm_w2", "nft", "awm", "flow_grpo", "flow_grpo_fast")
ORW_FAST_OBJECTIVES = {"orw_cfm_w2": "orw_cfm_w2", "nft": "nft", "awm": "awm"}
WINDOW = 10
STEPS_PER_EPOCH = 5
TEXT_LR_SCALE = 10.0
# the knobs of each method's defaults (digits), and its sweep points: overrides of those knobs
DEFAULTS = {
    "official_orw": {"lr": 1e-3, "tau": 5.0, "alpha": 1.0},
    "orw_cfm_w2": {"lr": 1e-3, "tau": 5.0, "alpha": 1.0},
    "nft": {"lr": 1e-3, "beta": 1.0, "alpha": 1e-4},
    "awm": {"lr": 1e-3, "alpha": 1e-4},
    "flow_grpo": {"lr": 1e-4, "beta": 0.04, "clip": 1e-4},
    "flow_grpo_fast": {"lr": 1e-4, "beta": 0.04, "clip": 1e-4},
}
TEXT_DEFAULTS = {"orw_cfm_w2": {"tau": 10.0}}  # the experiments' softmax weights at tau 10 (official: not run)
_ORW_SWEEP = [{}, {"lr": 3.0}, {"tau": 2.0}, {"alpha": 0.0}]
_GRPO_SWEEP = [{}, {"lr": 3.0}, {"beta": 0.0}, {"clip": 1e-3}]
# a float multiplies the default for lr and tau, and is the value for the other knobs
SWEEPS = {
    "official_orw": _ORW_SWEEP,
    "orw_cfm_w2": _ORW_SWEEP,
    "nft": [{}, {"lr": 3.0}, {"beta": 0.1}, {"lr": 1 / 3}],
    "awm": [{}, {"lr": 3.0}, {"alpha": 1.0}, {"lr": 1 / 3}],
    "flow_grpo": _GRPO_SWEEP,
    "flow_grpo_fast": _GRPO_SWEEP,
}
MULTIPLIED = ("lr", "tau")
DIVERSITY = {"digits": "class_entropy", "text": "prompt_diversity"}
QUALITY_BOUNDS = {
    "digits": "digits FD <= 3x the base's and background <= 2x the base's",
    "text": "diversity within a prompt >= 90 % and background <= 110 % of the base's",
}


@dataclass
class Sizes:
    """What a run of a task costs: batch, the official rollout's Euler steps, orw_fast's sampler steps (with the model's
    rollout method), cap per run in
    seconds and in steps, evaluation samples (digits: in all; text: per held-out prompt) and evaluation steps."""

    batch: int = 32
    official_steps: int = 20
    sampler_method: str | None = None  # None: the model's rollout method
    sampler_steps: int | None = None  # None: the trainer's default rollout of the model
    grpo_steps: int = 10
    cap_s: float = 20.0
    max_steps: int = 1000
    eval_samples: int = 256
    eval_steps: int = 20
    extra: dict = field(default_factory=dict)


def task_sizes(task: str, device: torch.device, quick: bool) -> Sizes:
    if quick:
        small = {"batch": 8 if task == "digits" else 16, "eval_samples": 8 if task == "digits" else 2}
        return Sizes(official_steps=2, sampler_steps=4, grpo_steps=2, cap_s=60.0, max_steps=2, eval_steps=2, **small)
    cap = 30.0 if device.type == "cuda" else 25.0
    if task == "text":  # the experiments' text settings: Heun 10 steps (20 transformer calls), 24 samples a prompt
        return Sizes(sampler_method="heun", sampler_steps=10, cap_s=cap, eval_samples=24, eval_steps=10)
    if device.type == "cpu":
        return Sizes(cap_s=cap, eval_samples=128, eval_steps=10)
    return Sizes(official_steps=100, cap_s=cap, eval_samples=500, eval_steps=20)  # the official code's 100 Euler steps


# ---------------------------------------------------------------------------------------------
# Sweep points


def knobs(task: str, method: str, point: int) -> dict:
    """The knob values of sweep point ``point`` of a method on a task."""
    values = dict(DEFAULTS[method])
    if task == "text":
        values["lr"] *= TEXT_LR_SCALE
        values.update(TEXT_DEFAULTS.get(method, {}))
    for key, value in SWEEPS[method][point].items():
        values[key] = values[key] * value if key in MULTIPLIED else value
    return values


def point_label(values: dict) -> str:
    return " ".join(f"{k}={v:.3g}" for k, v in values.items())


# ---------------------------------------------------------------------------------------------
# Counting model calls, memory


class CallCounter:
    """Counts forward calls (and samples) of every module of ``model_type`` while active, and backward calls: the
    forwards whose output receives a gradient."""

    def __init__(self, model_type: type):
        self.model_type, self.paused = model_type, False
        self.forward_calls = self.forward_samples = self.backward_calls = 0

    def add(self, calls: int, batch: int) -> None:
        self.forward_calls += calls
        self.forward_samples += calls * batch

    def _hook(self, module, args, output):
        if self.paused or not isinstance(module, self.model_type):
            return
        self.forward_calls += 1
        out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        if torch.is_tensor(out):
            self.forward_samples += out.shape[0]
            if out.requires_grad:
                out.register_hook(self._backward)

    def _backward(self, grad):
        self.backward_calls += 1

    @contextmanager
    def active(self):
        handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()


class PeakMemory:
    """Peak memory of a block in MB: CUDA max_memory_allocated minus what was allocated at the start; CPU the growth
    of the process's peak resident size (ru_maxrss)."""

    method = {
        "cuda": "torch.cuda.max_memory_allocated during the run minus memory_allocated at its start",
        "cpu": "growth of the process's peak RSS (ru_maxrss) during the run; 0 when it stayed under an earlier peak",
    }

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            common.synchronize(device)
            self.start = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def mb(self) -> float:
        if self.device.type == "cuda":
            common.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.start) / 1e6
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.start) / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------
# Tasks


class EvenFraction(torch.nn.Module):
    """bench_time_to_target's EvenReward on images clamped to [-1, 1], called with or without prompts."""

    def __init__(self, classifier):
        super().__init__()
        from benchmarks.bench_time_to_target import EvenReward

        self.reward = EvenReward(classifier)
        self.fractions = self.reward.even_fractions

    def forward(self, images, prompts=None):
        return self.reward(images.clamp(-1, 1))


class PromptedFraction(torch.nn.Module):
    """P(prompted digit) (PromptedDigitReward), recording for every call the share of images the classifier calls the
    prompted digit (the step's alignment)."""

    def __init__(self, classifier):
        super().__init__()
        from orw_fast.tasks.text_digits import PromptedDigitReward, digit_of, to_grey

        self.reward, self.classifier, self.digit_of, self.to_grey = (
            PromptedDigitReward(classifier),
            classifier,
            digit_of,
            to_grey,
        )
        self.fractions: list[float] = []

    @torch.no_grad()
    def forward(self, images, prompts):
        labels = self.classifier(self.to_grey(images)).argmax(dim=1)
        digits = torch.tensor([self.digit_of(p) for p in prompts], device=labels.device)
        self.fractions.append(float((labels == digits).float().mean()))
        return self.reward(images, prompts)


class DigitsTask:
    """The even-digits task: the demo's models (tiny untrained ones with ``quick``)."""

    name, reward_key = "digits", "eval_even_fraction"

    def __init__(self, device: torch.device, quick: bool, sizes: Sizes):
        from benchmarks.bench_time_to_target import evaluate, load_models
        from orw_fast.models.flow_model import infer_image_shape
        from orw_fast.tasks.demo import DigitsQuality

        self.device, self.sizes, self._evaluate = device, sizes, evaluate
        self.base, self.classifier = load_models(device, quick)
        if quick:  # a smaller UNet than bench_time_to_target's toy one: this benchmark runs many more runs
            from orw_fast.models import make_flow_model

            torch.manual_seed(0)
            self.base = make_flow_model((1, 8, 8), "digits", num_channels=32, channel_mult=[1])[0].to(device)
        self.shape, self.quality = infer_image_shape(self.base), DigitsQuality(self.classifier)
        self.model_type = type(self.base)
        self.base_stats, self.reference = self._evaluate_samples(self.base)
        self.base_stats.update(w2_to_reference=0.0, eval_reward=self.base_stats[self.reward_key])

    def _evaluate_samples(self, model):
        s = self.sizes
        return self._evaluate(
            model, self.classifier, self.quality, self.shape, self.device, s.eval_samples, s.eval_steps, samples=True
        )

    def evaluate(self, policy) -> dict:
        from orw_fast.metrics import w2_distance

        stats, x1 = self._evaluate_samples(policy)
        return {**stats, "w2_to_reference": w2_distance(x1, self.reference), "eval_reward": stats[self.reward_key]}

    def reward(self):
        return EvenFraction(self.classifier)

    def orw_fast_flow(self):
        return copy.deepcopy(self.base).train()

    def grpo_parts(self, reward, seed: int):
        """(model, reward_fn(x1[, cond]), sample_shape, condition_fn, group_size, evaluate_module)."""
        model = copy.deepcopy(self.base).train()
        return model, reward, self.shape, None, None, model


class TextTask:
    """Text-image alignment on the text-conditioned digits model (an untrained tiny pipeline with ``quick``)."""

    name, reward_key = "text", "alignment"

    def __init__(self, device: torch.device, quick: bool, sizes: Sizes):
        from diffusers import SD3Transformer2DModel

        from orw_fast.tasks.demo import DigitsQuality
        from orw_fast.tasks.text_alignment import AlignmentSettings, alignment_metrics, held_out_images
        from orw_fast.tasks.text_digits import PromptedDigitReward

        self.device, self.sizes, self.settings = device, sizes, AlignmentSettings()
        self._images, self._metrics = held_out_images, alignment_metrics
        if quick:
            from orw_fast.rewards import DigitClassifier
            from orw_fast.tasks.text_digits import build_pipeline

            torch.manual_seed(0)
            self.classifier = DigitClassifier(image_shape=(1, 8, 8), num_classes=10).to(device).eval()
            self.pipeline = lambda: build_pipeline(0)
        else:
            from orw_fast.pretrain import default_cache_dir
            from orw_fast.tasks.demo import DemoSettings, pretrained_digits
            from orw_fast.tasks.text_digits import pretrained_text_digits

            cache = default_cache_dir()
            _, self.classifier = pretrained_digits(cache, steps=DemoSettings().pretrain_steps, device=device)
            folder = pretrained_text_digits(cache, steps=self.settings.pretrain_steps)
            self.pipeline = lambda: folder
        self.quality, self.plain_reward = DigitsQuality(self.classifier), PromptedDigitReward(self.classifier)
        self.model_type = SD3Transformer2DModel
        flow = self.make_flow()
        flow.prepare(device, ema=False)
        self.reference = list(self._held_out(flow, flow.transformer, 1234).split(sizes.eval_samples))
        self.base_stats = self.evaluate_flow(flow, flow.transformer)

    def make_flow(self):
        from orw_fast.models.diffusers_flow import DiffusersFlowModel
        from orw_fast.prompts import PromptSource
        from orw_fast.tasks.text_alignment import HELD_OUT_PROMPTS, TRAIN_PROMPTS
        from orw_fast.tasks.text_digits import MAX_SEQUENCE_LENGTH

        s = self.settings
        per_prompt = s.samples_per_prompt  # the experiments' groups: a batch of 32 is 8 prompts x 4 samples
        if self.sizes.batch % per_prompt:
            raise ValueError(f"the text task's batch must be a multiple of {per_prompt}, got {self.sizes.batch}")
        return DiffusersFlowModel(
            self.pipeline(),
            PromptSource(TRAIN_PROMPTS, samples_per_prompt=per_prompt),
            lora_rank=s.lora_rank,
            lora_targets=s.lora_targets,
            guidance_scale=s.guidance_scale,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            eval_prompts=HELD_OUT_PROMPTS,
        )

    def _held_out(self, flow, module, noise_seed: int):
        return self._images(flow, module, self.sizes.eval_samples, noise_seed, self.sizes.eval_steps, self.device)

    def evaluate_flow(self, flow, module) -> dict:
        images = self._held_out(flow, module, 4321)
        stats = self._metrics(images, self.reference, self.classifier, self.plain_reward, self.quality)
        return {**stats, "eval_reward": stats[self.reward_key]}

    def reward(self):
        return PromptedFraction(self.classifier)

    def orw_fast_flow(self):
        return self.make_flow()

    def grpo_parts(self, reward, seed: int):
        from orw_fast.tasks.text_alignment import TRAIN_PROMPTS

        flow = self.make_flow()
        flow.prepare(self.device, ema=False)
        prompts = [*flow.prompts.prompts, *flow.eval_prompts]
        train_rows = torch.tensor([flow._row[p] for p in TRAIN_PROMPTS])
        generator = torch.Generator().manual_seed(seed)

        def condition_fn(n):
            return train_rows[torch.randint(len(train_rows), (n,), generator=generator)]

        def reward_fn(x1, rows):
            return reward(flow.to_images(x1), [prompts[r] for r in rows.tolist()])

        return (
            PromptedVelocity(flow),
            reward_fn,
            flow.sample_shape(),
            condition_fn,
            flow.prompts.samples_per_prompt,
            (flow, flow.transformer),
        )


class PromptedVelocity(torch.nn.Module):
    """A diffusers flow model's velocity as ``model(t, x, rows)``, rows indexing its cached prompt encodings: what
    the Flow-GRPO baseline calls (the transformer, its LoRA adapter the trained parameters)."""

    def __init__(self, flow):
        super().__init__()
        self.flow, self.transformer = flow, flow.transformer

    def forward(self, t, x, rows):
        rows = rows.to(self.flow._embeds.device)
        return self.flow.velocity(self.transformer, t, x, self.flow._embeds[rows], self.flow._pooled[rows])

    def __deepcopy__(self, memo):  # Flow-GRPO's frozen reference: a copy of the transformer, the same flow
        clone = PromptedVelocity.__new__(PromptedVelocity)
        torch.nn.Module.__init__(clone)
        clone.flow, clone.transformer = self.flow, copy.deepcopy(self.transformer, memo)
        return clone


# ---------------------------------------------------------------------------------------------
# One run


def count_rollouts(trainer, counter: CallCounter) -> None:
    """An ORWCFMTrainer's rollouts counted from its solver (sampling.calls) instead of hooked: on CUDA they replay a
    captured graph, which calls no Python forward."""
    from orw_fast.sampling import calls

    rollout = trainer.rollout

    def counted(batch_size):
        counter.paused = True
        try:
            out = rollout(batch_size)
        finally:
            counter.paused = False
        counter.add(calls(trainer.rollout_method, trainer.rollout_steps), batch_size)
        return out

    trainer.rollout = counted


def make_runner(task, method: str, values: dict, seed: int, reward, counter: CallCounter):
    """(step(), refresh() or None, evaluate()) of one method's run, its model calls counted by ``counter``."""
    s, device = task.sizes, task.device
    if method == "official_orw":
        if task.name == "text":
            raise NotImplementedError("skipped: the official ORW-CFM-W2 code is unconditional (no prompts)")
        from benchmarks.baselines.official_eager import OfficialEagerTrainer

        trainer = OfficialEagerTrainer(
            copy.deepcopy(task.base).train(),
            reward,
            image_shape=task.shape,
            device=device,
            batch_size=s.batch,
            learning_rate=values["lr"],
            warmup_steps=0,
            w2_coefficient=values["alpha"],
            temperature=values["tau"],
            grad_clip=1.0,
            sampler_steps=s.official_steps,
        )
        return trainer.train_step, trainer.update_last_policy, lambda: task.evaluate(trainer.net_model)
    if method in ORW_FAST_OBJECTIVES:
        from orw_fast.trainer import ORWCFMTrainer, TrainerConfig

        extra = {}
        if method == "orw_cfm_w2":
            weighting = "softmax" if task.name == "text" else "exp"
            extra = dict(weighting=weighting, temperature=values["tau"])
        elif method == "nft":
            extra = dict(nft_beta=values["beta"])
        config = TrainerConfig(
            objective=ORW_FAST_OBJECTIVES[method],
            learning_rate=values["lr"],
            w2_coefficient=values["alpha"],
            batch_size=s.batch,
            grad_clip=1.0,
            sampler_method=s.sampler_method,
            sampler_steps=s.sampler_steps,
            seed=seed,
            grid_size=0,
            checkpoint_every=0,
            savedir="unused",
            precision="bf16" if device.type == "cuda" else "fp32",
            **extra,
        )
        trainer = ORWCFMTrainer(task.orw_fast_flow(), config, device, reward_fn=reward, callbacks=[])
        count_rollouts(trainer, counter)
        if task.name == "text":
            evaluate = lambda: task.evaluate_flow(trainer.flow, trainer.model)  # noqa: E731
        else:
            evaluate = lambda: task.evaluate(trainer.model)  # noqa: E731
        return trainer.train_step, trainer.refresh_last_policy, evaluate
    from benchmarks.baselines.flow_grpo import FlowGRPOConfig, FlowGRPOTrainer

    model, reward_fn, shape, condition_fn, group_size, evaluated = task.grpo_parts(reward, seed)
    config = FlowGRPOConfig(
        batch_size=s.batch,
        group_size=group_size,
        steps=s.grpo_steps,
        lr=values["lr"],
        beta=values["beta"],
        clip_range=values["clip"],
        sde_window=min(2, s.grpo_steps // 2) if method == "flow_grpo_fast" else 0,
    )
    trainer = FlowGRPOTrainer(
        model, reward_fn, sample_shape=shape, config=config, condition_fn=condition_fn, device=device, seed=seed
    )
    if task.name == "text":
        evaluate = lambda: task.evaluate_flow(*evaluated)  # noqa: E731
    else:
        evaluate = lambda: task.evaluate(trainer.model)  # noqa: E731
    return trainer.train_step, None, evaluate


def run_one(task, method: str, point: int, seed: int, *, target: float) -> tuple[dict, dict]:
    """(row, curve) of one run, trained to its cap. The row's main fields are taken, and the policy evaluated, when
    the rolling reward first reaches ``target`` (at the cap if never); the "end_" fields are the evaluation at the cap
    (the same values when the target was reached on the last step or never). The evaluations are not timed and their
    model calls not counted."""
    values = knobs(task.name, method, point)
    row = {"task": task.name, "method": method, "point": point, "knobs": point_label(values), "seed": seed}
    torch.manual_seed(seed)
    np.random.seed(seed)  # torchcfm's exact-OT matcher draws its pairs from numpy's global RNG
    reward, counter = task.reward(), CallCounter(task.model_type)
    step, refresh, evaluate = make_runner(task, method, values, seed, reward, counter)
    s, device = task.sizes, task.device
    memory = PeakMemory(device)
    seconds, steps, curve, at_target = 0.0, 0, {"seconds": [], "reward": []}, None
    window_len = min(WINDOW, s.max_steps)  # a step cap under the window (toy runs) shortens it

    def snapshot() -> dict:
        state = dict(
            steps=steps,
            seconds=seconds,
            ms_per_step=1e3 * seconds / steps,
            rolling_reward=rolling,
            forward_calls=counter.forward_calls,
            forward_samples=counter.forward_samples,
            backward_calls=counter.backward_calls,
            peak_memory_mb=memory.mb(),
        )
        counter.paused = True
        try:
            return {**state, **evaluate()}
        finally:
            counter.paused = False

    with counter.active():
        while steps < s.max_steps and seconds < s.cap_s:
            common.synchronize(device)
            start = time.perf_counter()
            step()
            steps += 1
            if refresh is not None and steps % STEPS_PER_EPOCH == 0:
                refresh()
            common.synchronize(device)
            seconds += time.perf_counter() - start
            window = reward.fractions[-window_len:]
            rolling = sum(window) / len(window)
            curve["seconds"].append(round(seconds, 4))
            curve["reward"].append(rolling)
            if at_target is None and len(window) == window_len and rolling >= target:
                at_target = snapshot()
        end = at_target if at_target is not None and at_target["steps"] == steps else snapshot()
    row.update(status="ok", reached=at_target is not None, **(at_target or end))
    row.update({f"end_{k}": end[k] for k in END_KEYS if k in end})
    return row, curve


END_KEYS = (
    "steps",
    "seconds",
    "rolling_reward",
    "eval_reward",
    "class_entropy",
    "prompt_diversity",
    "digits_fd",
    "background",
    "w2_to_reference",
)


# ---------------------------------------------------------------------------------------------
# Best points and fronts (pure functions of the rows)


def _ok(rows, task: str, method: str | None = None):
    return [r for r in rows if r["task"] == task and r["status"] == "ok" and method in (None, r["method"])]


def point_summaries(rows: list[dict], task: str, diversity: str) -> list[dict]:
    """One entry per (method, point) of a task's ok runs: runs, how many reached, medians of wall-clock, steps and
    the diversity key."""
    out = []
    for method, point in dict.fromkeys((r["method"], r["point"]) for r in _ok(rows, task)):
        runs = [r for r in _ok(rows, task, method) if r["point"] == point]
        out.append(
            {
                "method": method,
                "point": point,
                "runs": len(runs),
                "reached": sum(bool(r["reached"]) for r in runs),
                "seconds": statistics.median(r["seconds"] for r in runs),
                "diversity": statistics.median(r[diversity] for r in runs),
            }
        )
    return out


def diversity_floor(summaries: list[dict]) -> float | None:
    """The lowest, over the methods with a point whose every run reached the target, of each method's most diverse
    such point: every one of those methods has a reaching point at or above it. None when no method reached."""
    best: dict[str, float] = {}
    for p in summaries:
        if p["runs"] and p["reached"] == p["runs"]:
            best[p["method"]] = max(best.get(p["method"], -float("inf")), p["diversity"])
    return min(best.values()) if best else None


def best_points(summaries: list[dict], floor: float | None) -> dict[str, int]:
    """{method: its fastest point (median wall-clock) whose every run reached the target with median diversity >=
    ``floor``}; methods without one are absent. Ties go to the lower point index (the defaults first)."""
    best: dict[str, dict] = {}
    for p in summaries:
        if not p["runs"] or p["reached"] < p["runs"] or floor is None or p["diversity"] < floor:
            continue
        held = best.get(p["method"])
        if held is None or (p["seconds"], p["point"]) < (held["seconds"], held["point"]):
            best[p["method"]] = p
    return {m: p["point"] for m, p in best.items()}


def within_quality(row: dict, base: dict, task: str) -> bool:
    """The quality bounds of the front (QUALITY_BOUNDS) against the base model's evaluation."""
    if task == "digits":
        return row["digits_fd"] <= 3 * base["digits_fd"] and row["background"] <= 2 * base["background"]
    return row["prompt_diversity"] >= 0.9 * base["prompt_diversity"] and row["background"] <= 1.1 * base["background"]


def front_candidates(row: dict) -> list[dict]:
    """The evaluated points of a run: at the target (or the cap, if never reached) and, after a target, at the cap."""
    keep = ("task", "method", "point", "knobs", "seed")
    first = {k: row.get(k) for k in keep} | {"at": "target" if row["reached"] else "cap"}
    points = [first | {k: row[k] for k in END_KEYS if k in row}]
    if row["reached"] and "end_eval_reward" in row:
        points.append(first | {"at": "cap"} | {k: row[f"end_{k}"] for k in END_KEYS if f"end_{k}" in row})
    return points


def quality_front(rows: list[dict], base: dict, task: str) -> dict[str, dict | None]:
    """{method: its evaluated point (:func:`front_candidates`) with the highest evaluated reward among those within
    the quality bounds (ties: the sooner), or None} for every method with an ok run on the task."""
    front: dict[str, dict | None] = {}
    for r in _ok(rows, task):
        front.setdefault(r["method"], None)
        for c in front_candidates(r):
            held = front[r["method"]]
            if within_quality(c, base, task) and (
                held is None or (-c["eval_reward"], c["seconds"]) < (-held["eval_reward"], held["seconds"])
            ):
                front[r["method"]] = c
    return front


# ---------------------------------------------------------------------------------------------
# Report


def _median(runs, key):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def final_rows(meta_task: dict, rows: list[dict], task: str) -> list[list[str]]:
    lines = []
    for method, point in meta_task["best_points"].items():
        runs = [r for r in _ok(rows, task, method) if r["point"] == point]
        med = {k: _median(runs, k) for k in FINAL_KEYS}
        lines.append(
            [
                method,
                runs[0]["knobs"] if runs else "",
                f"{sum(bool(r['reached']) for r in runs)}/{len(runs)}",
                *(common.fmt(FINAL_FORMATS[k], med[k]) for k in FINAL_KEYS),
            ]
        )
    return lines


FINAL_KEYS = (
    "steps",
    "seconds",
    "forward_calls",
    "backward_calls",
    "eval_reward",
    "class_entropy",
    "prompt_diversity",
    "digits_fd",
    "background",
    "w2_to_reference",
    "peak_memory_mb",
)
FINAL_FORMATS = {
    "steps": "{:.0f}",
    "seconds": "{:.1f}",
    "forward_calls": "{:.0f}",
    "backward_calls": "{:.0f}",
    "eval_reward": "{:.3f}",
    "class_entropy": "{:.2f}",
    "prompt_diversity": "{:.3f}",
    "digits_fd": "{:.1f}",
    "background": "{:.1f}",
    "w2_to_reference": "{:.3f}",
    "peak_memory_mb": "{:.0f}",
}
FINAL_HEADER = [
    "method",
    "best point",
    "reached",
    "steps",
    "wall-clock s",
    "fwd calls",
    "bwd calls",
    "eval reward",
    "class entropy",
    "diversity in prompt",
    "digits FD",
    "background",
    "W2 to ref",
    "peak MB",
]


def format_report(meta: dict, rows: list[dict]) -> str:
    text = [
        *common.report_head(meta),
        "- the same rollout batch per step for every method (below, per task); a run stops at the rolling reward "
        f"target (last {WINDOW} steps) or its cap; wall-clock: the step loop (rollouts and rewards included, "
        "evaluation excluded)",
        f"- peak memory: {meta['peak_memory_method']}",
        "- forward calls: every call of the model's class (policy, reference, old and last policy, rollouts); "
        "backward calls: the forwards whose output got a gradient",
    ]
    for task, t in meta["tasks"].items():
        floor = common.fmt("{:.3f}", t["diversity_floor"])
        text += [
            "",
            f"## {task}: target {t['target']}, batch {t['batch']}, cap {t['cap_s']:.0f} s / {t['max_steps']} steps",
            "",
            f"Base model: eval reward {t['base']['eval_reward']:.3f}, digits FD {t['base']['digits_fd']:.1f}, "
            f"background {t['base']['background']:.1f}, {DIVERSITY[task]} {t['base'][DIVERSITY[task]]:.3f}.",
            "",
            f"### Time to target at the best point at equal diversity ({DIVERSITY[task]} >= {floor})",
            "",
            common.markdown_table(FINAL_HEADER, final_rows(t, rows, task))
            if t["best_points"]
            else "No method reached the target.",
            "",
            f"### Quality-bounded reward front ({QUALITY_BOUNDS[task]})",
            "",
            common.markdown_table(
                ["method", "best eval reward", "point", "seed", "at", "wall-clock s", "digits FD", "background"],
                [
                    [m, "none within the bounds", "", "", "", "", "", ""]
                    if r is None
                    else [
                        m,
                        f"{r['eval_reward']:.3f}",
                        r["knobs"],
                        str(r["seed"]),
                        r["at"],
                        f"{r['seconds']:.1f}",
                        f"{r['digits_fd']:.1f}",
                        f"{r['background']:.1f}",
                    ]
                    for m, r in t["front"].items()
                ],
            ),
        ]
    text += [
        "",
        "## Every run",
        "",
        common.results_table(
            ["task", "method", "phase", "knobs", "seed", "reached", "steps", "wall-clock s", "eval reward", "FD"],
            rows,
            lambda r: [r["task"], r["method"], r.get("phase", ""), r.get("knobs", ""), str(r["seed"])],
            lambda r: [
                str(r["reached"]),
                str(r["steps"]),
                f"{r['seconds']:.1f}",
                f"{r['eval_reward']:.3f}",
                f"{r['digits_fd']:.1f}",
            ],
        ),
    ]
    return "\n".join(text) + "\n"


def plot(meta: dict, rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(meta["tasks"])
    fig, grid = plt.subplots(len(tasks), 3, figsize=(18, 4.5 * len(tasks)), squeeze=False)
    fig.suptitle(f"methods, {meta['device_name']}")
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for task, (curves_ax, front_ax, fd_ax) in zip(tasks, grid):
        t = meta["tasks"][task]
        for method in dict.fromkeys(r["method"] for r in _ok(rows, task)):
            point = t["best_points"].get(method, 0)
            runs = [r for r in _ok(rows, task, method) if r["point"] == point]
            curves = [meta["curves"][r["run_id"]] for r in runs if r["run_id"] in meta["curves"]]
            if curves:
                end = max(c["seconds"][-1] for c in curves)
                grid = np.linspace(0, end, 100)
                ys = np.array([np.interp(grid, c["seconds"], c["reward"]) for c in curves])
                curves_ax.plot(grid, np.median(ys, 0), color=colors[method], label=method)
                curves_ax.fill_between(grid, ys.min(0), ys.max(0), color=colors[method], alpha=0.2)
            mine = _ok(rows, task, method)
            reached = [r for r in mine if r["reached"]]
            front_ax.scatter([r[DIVERSITY[task]] for r in reached], [r["seconds"] for r in reached],
                             color=colors[method], label=method)  # fmt: skip
            fd_ax.scatter([r["digits_fd"] for r in mine], [r["eval_reward"] for r in mine], color=colors[method],
                          label=method)  # fmt: skip
        curves_ax.axhline(t["target"], color="grey", ls=":")
        curves_ax.set(xlabel="wall-clock (s)", ylabel="rolling reward", title=f"{task}: best points, seeds shaded")
        front_ax.set(xlabel=DIVERSITY[task], ylabel="wall-clock to target (s)", title=f"{task}: time to target")
        fd_ax.axvline(3 * t["base"]["digits_fd"] if task == "digits" else t["base"]["digits_fd"], color="grey", ls=":")
        fd_ax.set(xlabel="digits FD", ylabel="eval reward", title=f"{task}: reward vs FD")
        for ax in (curves_ax, front_ax, fd_ax):
            ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Main


TARGET = common.number_in(0, 1, what="a reward target")  # 0: every run reaches it once its window is full (smoke)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    add = parser.add_argument
    add("--tasks", type=common.parse_list(TASKS), default=list(TASKS), help="comma-separated subset of digits,text")
    add("--methods", type=common.parse_list(METHODS), default=list(METHODS), help=f"subset of {','.join(METHODS)}")
    add("--points", type=common.positive_int, default=4, help="sweep points per method, the first N (default 4)")
    add("--sweep-seeds", type=common.positive_int, default=1, help="seeds per sweep point (default 1)")
    add("--seeds", type=common.positive_int, default=3, help="seeds of each method's best point (default 3)")
    add("--target", type=TARGET, default=0.95, help="digits: rolling even fraction to reach (default 0.95)")
    add("--text-target", type=TARGET, default=0.7, help="text: rolling alignment to reach (default 0.7)")
    add(
        "--cap-s",
        type=common.number_in(0, open_low=True, what="seconds"),
        help="wall-clock cap per run in s (default: 25 digits, 10 text; 30 on CUDA)",
    )
    add("--max-steps", type=common.positive_int, help="step cap per run (default 1000; 2 with --quick)")
    add("--diversity-floor", type=float, help="the diversity of 'equal diversity' (default: chosen from the sweep)")
    args = parser.parse_args(argv)
    if args.points > 4:
        parser.error(f"argument --points: at most 4 sweep points per method, got {args.points}")
    return args


def sweep_cases(args) -> list[tuple[str, str, int, int]]:
    return [
        (task, method, point, seed)
        for task in args.tasks
        for method in args.methods
        for point in range(args.points)
        for seed in range(args.sweep_seeds)
    ]


def _run_cases(task, cases, rows, curves, target, phase: str, device) -> None:
    with tqdm(cases, unit="run", desc=f"{task.name} {phase}") as bar:
        for _, method, point, seed in bar:
            bar.set_postfix_str(f"{method} point {point} seed {seed}")
            run_id = f"{task.name}/{method}/{point}/{seed}"
            try:
                row, curve = run_one(task, method, point, seed, target=target)
                curves[run_id] = curve
            except Exception as err:  # recorded in the tables, the next run goes on
                status = str(err) if isinstance(err, NotImplementedError) else common.error_status(err)
                row = {"task": task.name, "method": method, "point": point, "seed": seed, "status": status}
            rows.append({"run_id": run_id, "phase": phase, **row})
            common.free_memory(device)


TASK_CLASSES = {"digits": DigitsTask, "text": TextTask}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    cases = sweep_cases(args)
    if args.dry_run:
        skip = {("text", "official_orw"): "(skipped: the official code is unconditional)"}
        lines = [(*c[:2], f"point {c[2]}", f"seed {c[3]}", skip.get(c[:2], "")) for c in cases]
        finals = [(t, m, "best point", f"seeds 0-{args.seeds - 1}") for t in args.tasks for m in args.methods]
        return common.dry_run("methods", device, lines + [f for f in finals if f[:2] not in skip])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    meta = common.run_metadata(
        device,
        "methods",
        hardware=hardware.measure(device, args.quick),
        peak_memory_method=PeakMemory.method[device.type],
        tasks={},
        curves={},
    )
    common.warn_if_loaded(meta)
    rows: list[dict] = []
    for name in args.tasks:
        sizes = task_sizes(name, device, args.quick)
        if args.cap_s is not None:
            sizes.cap_s = args.cap_s
        if args.max_steps is not None:
            sizes.max_steps = args.max_steps
        target = args.target if name == "digits" else args.text_target
        task = TASK_CLASSES[name](device, args.quick, sizes)
        _run_cases(task, [c for c in cases if c[0] == name], rows, meta["curves"], target, "sweep", device)
        summaries = point_summaries(rows, name, DIVERSITY[name])
        floor = args.diversity_floor if args.diversity_floor is not None else diversity_floor(summaries)
        best = best_points(summaries, floor)
        done = {(r["method"], r["point"], r["seed"]) for r in rows if r["task"] == name}
        finals = [(name, m, p, s) for m, p in best.items() for s in range(args.seeds) if (m, p, s) not in done]
        _run_cases(task, finals, rows, meta["curves"], target, "final", device)
        meta["tasks"][name] = {
            "target": target,
            "batch": sizes.batch,
            "cap_s": sizes.cap_s,
            "max_steps": sizes.max_steps,
            "base": task.base_stats,
            "diversity_floor": floor,
            "best_points": best,
            "front": quality_front(rows, task.base_stats, name),
        }
        del task
        common.free_memory(device)
    common.finish_run(args, "methods", meta, rows, format_report, plot)
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
