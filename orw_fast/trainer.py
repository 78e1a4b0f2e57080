"""ORWCFMTrainer: online reward-weighted flow-matching fine-tuning with W2 regularization.

One step (see the design notes), the same for every model and objective: take B rollouts of the *last policy* (no
grad, the sampler of orw_fast.sampling) with their rewards from the rollout pool (orw_fast.rollouts: made
``rollout_batches`` steps at a time, each sample used ``rollout_reuse`` times; by default one fresh rollout per sample
and step); the objective (orw_fast.objectives, ``config.objective``; ORW-CFM-W2 by default) turns the whole batch's
rewards into per-sample inputs (weights); pair every x1 with noise (coupling; the input moves with its x1), draw t and
x_t, predict with the policy (grad) and the frozen models the objective names (no grad), its fused loss, backward,
grad clip, Adam or AdamW (``config.optimizer``) with LR warm-up, optional EMA. Every ``refresh_interval`` epochs the
last policy becomes a copy of the policy (copied in place, so the sampler's CUDA graph stays valid). Logs, sample
grids, checkpoints and evaluations are callbacks (orw_fast.callbacks); the checkpoint's schema is in
orw_fast.checkpoint.

The constructor follows the official ORW-CFM-W2 code: ``ORWCFMTrainer(model, config, device,
reward_fn=None)`` with a dict of its keys; :class:`TrainerConfig` holds them plus orw_fast's options. ``model`` is
a flow field ``model(t, x)`` or a :class:`~orw_fast.models.flow_model.FlowModel` (e.g. a diffusers SD3/FLUX model
with LoRA): everything that differs between kinds of models sits behind that interface, and the loop below is
the same for all of them. A conditional model's batch carries prompts (drawn from its prompt source by a CPU
generator); rewards get the decoded images and their prompts.

Host syncs: a step reads its metrics back once, before the update, because the update must not be applied when the
loss or the gradient norm is not finite (and a black-box reward reads the images on the host anyway). The batch
diversity, an O(B^2) all-gathered metric, is computed every ``diversity_every`` steps only.

Multi-process (torchrun; picked up when torch.distributed is initialised or WORLD_SIZE > 1): every rank
starts from rank 0's weights, rolls out and scores ``batch_size / world_size`` samples with its own seed
(``seed + rank``); the rewards are all-gathered so the weights are those of the whole batch (softmax
normalised over all ``batch_size`` samples); DistributedDataParallel averages the gradients of the ranks'
local mean losses. With the same x0, x1 and t this is the update of one process on the concatenated
batch, for the "independent" and "rollout" couplings; "ot" solves OT within each rank's share, not over
the whole batch. Logged metrics are those of the whole batch. Rank 0 alone writes files and wandb;
train, save_checkpoint and resume are collective (every rank calls them). ``config.fsdp`` shards
the policy and its frozen copies with FSDP2 instead of replicating them.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from orw_fast import distributed as dist_utils
from orw_fast.callbacks import Callback, ProgressBar, default_callbacks
from orw_fast.checkpoint import (
    check_training_checkpoint,
    load_file,
    read_model_weights,
    save_atomic,
    training_state,
)
from orw_fast.config import PRECISIONS, ConfigError, TrainerConfig
from orw_fast.couplings import couple, sample_path, stratified_times
from orw_fast.metrics import mean_pairwise_distance
from orw_fast.models.flow_model import FlowModel, PixelFlowModel
from orw_fast.models.policy_weights import FullCopies
from orw_fast.objectives import group_ids, make_objective
from orw_fast.rewards import as_reward_fn, check_rewards
from orw_fast.rollouts import RolloutPool

_OPTIMIZER_CLASSES = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}  # config.optimizer


class ORWCFMTrainer:
    """Online ORW-CFM-W2 fine-tuning of ``model`` (a flow field ``model(t, x)``, t: [B], or a
    :class:`~orw_fast.models.flow_model.FlowModel`) toward ``reward_fn`` (images [B, C, H, W] in [-1, 1], and the
    batch's prompts when it takes two arguments -> rewards [B]; defaults to a CLIP reward when ``config.text_prompts``
    is set). Under torchrun it joins the process group (NCCL for CUDA, gloo otherwise) and an index-less "cuda"
    device becomes cuda:LOCAL_RANK. ``callbacks``: what :meth:`train` runs around the steps; None: the run's files in
    ``config.savedir`` (:func:`~orw_fast.callbacks.default_callbacks`); a list replaces them (``[]``: a run that
    writes nothing; ``[*default_callbacks(config), mine]`` adds one)."""

    def __init__(
        self,
        model,
        config=None,
        device=None,
        reward_fn: Callable | None = None,
        *,
        callbacks: list[Callback] | None = None,
    ):
        self.config = cfg = TrainerConfig.coerce(config)
        flow = (
            model
            if isinstance(model, FlowModel)
            else PixelFlowModel(model, cfg.image_shape, channels_last=cfg.channels_last)
        )
        self.device = dist_utils.local_device(device if device is not None else flow.default_device())
        dist_utils.init_from_env(self.device)
        self.rank, self.world_size = dist_utils.rank(), dist_utils.world_size()
        if cfg.batch_size % self.world_size:
            raise ConfigError("batch_size", f"divisible by the number of processes ({self.world_size})", cfg.batch_size)
        if cfg.fsdp and self.world_size == 1:
            raise ConfigError(
                "fsdp", "False in one process (fsdp=True needs several processes: launch with torchrun)", cfg.fsdp
            )
        self.local_batch_size = cfg.batch_size // self.world_size
        self.rollout_method, self.rollout_steps, self.rollout_grid = flow.rollout_settings(
            cfg.sampler_method, cfg.sampler_steps, cfg.sampler_grid
        )
        if cfg.parallel:
            warnings.warn(
                "config.parallel=True (the official code's DataParallel) is not used: orw_fast trains on one "
                "device per process; for several GPUs launch with torchrun --nproc_per_node=N",
                stacklevel=2,
            )
        if reward_fn is None and cfg.text_prompts:
            from orw_fast.rewards import CLIPReward

            reward_fn = CLIPReward(cfg.text_prompts, model_path=cfg.clip_model_path, device=self.device)
        if reward_fn is None:
            raise ValueError("give reward_fn (images -> [B] rewards) or config.text_prompts for a CLIP reward")
        self.reward_fn = as_reward_fn(reward_fn)
        self.flow = flow
        self.objective = make_objective(cfg.objective, cfg)
        torch.manual_seed(cfg.seed)  # a LoRA adapter's initial weights: the same for a seed, whatever ran before
        flow.prepare(self.device, ema=(cfg.ema_decay or 0) > 0 or "ema" in self.objective.frozen)
        if flow.prompts is not None:
            flow.prompts.sample(self.local_batch_size, torch.Generator())  # a batch it cannot split is an error now
        self.image_shape = flow.sample_shape()
        if cfg.model_config is None:  # orw_fast's models know how to rebuild themselves (orw-fast sample needs it)
            cfg.model_config = flow.describe()
        self.weights = flow.weights
        self.weights.distribute(self.world_size, cfg.fsdp, self.device)
        self.forward = torch.compile(self.weights.forward) if cfg.compile else self.weights.forward
        self._compiled_rollout_modules = {}  # with rollout_compile: module -> its torch.compile'd wrapper
        self.optimizer = _OPTIMIZER_CLASSES[cfg.optimizer](
            self.weights.trainable_parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        warmup = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        )
        self.autocast_dtype = PRECISIONS[cfg.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed + self.rank)
        # draws on the host (which prompts, the rollout pool's orders): no device sync
        self.host_generator = torch.Generator().manual_seed(cfg.seed + self.rank)
        self._pool: RolloutPool | None = None
        torch.manual_seed(cfg.seed + self.rank)  # dropout and anything else drawing from the global RNG
        self.step = 0
        if callbacks is not None and not (
            isinstance(callbacks, (list, tuple)) and all(isinstance(c, Callback) for c in callbacks)
        ):
            raise TypeError(f"callbacks must be None or a list of orw_fast.callbacks.Callback, got {callbacks!r}")
        self.callbacks = default_callbacks(cfg) if callbacks is None else list(callbacks)

    # The modules of a fully trained model (FullCopies): the policy, and its frozen reference, last policy and EMA.
    model = property(lambda self: self.weights.module)
    reference = property(lambda self: self._full_copies().reference_module)
    last_policy = property(lambda self: self._full_copies().last_policy_module)
    ema = property(lambda self: self._full_copies().ema_module)

    def _full_copies(self) -> FullCopies:
        if not isinstance(self.weights, FullCopies):
            raise AttributeError(
                f"a {type(self.weights).__name__} policy has no separate reference, last-policy or "
                "EMA modules (trainer.weights holds them)"
            )
        return self.weights

    # -- weights -------------------------------------------------------------------------------

    def load_pretrained(self, path, *, weights: str = "net", verbose: bool = True) -> str:
        """Loads pre-trained weights into the policy, the last policy, the EMA and the reference (or, with
        ``config.ref_path``, that file's weights into the reference). Reads torchcfm's and the official code's
        checkpoints (``{net_model, ema_model, ...}``, with or without the ``module.`` prefix; ``weights`` "net",
        the official code's choice and the default, or "ema"), orw_fast's ("policy" (= "net"), "ema", ...) and
        bare state dicts. All or nothing: both files are read and checked against the model first, and on any
        error nothing has changed. Returns what it loaded (rank 0 prints it when ``verbose``). Fully trained
        models only (a LoRA policy's base weights come with its pipeline)."""
        cfg, copies = self.config, self._full_copies()
        policy, key = read_model_weights(copies.module, path, weights)
        reference, ref_key = (
            read_model_weights(copies.reference_module, cfg.ref_path, weights) if cfg.ref_path else (policy, key)
        )
        copies.load_pretrained(policy, reference)
        names = "policy, last policy" + (", EMA" if copies.ema_module is not None else "")
        message = (
            f"loaded {key!r} of {str(path)!r} into the {names} and reference"
            if not cfg.ref_path
            else f"loaded {key!r} of {str(path)!r} into the {names}, and {ref_key!r} of {cfg.ref_path!r} into the "
            "reference"
        )
        if verbose and self.rank == 0:
            print(message)
        return message

    def refresh_last_policy(self) -> None:
        """last policy <- policy, copied in place (the sampler's captured graph stays valid); the rollouts of the
        previous last policy that are left in the pool are dropped. An objective whose EMA is updated at refreshes
        (``ema_updates = "refresh"``) gets its update here."""
        if self.objective.ema_updates == "refresh":
            self.weights.update_ema(self.objective.ema_decay(self.step))
        self.weights.refresh_last_policy()
        self._pool = None

    # -- one step ------------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def generate(self, module, x0, prompts):
        """Samples of ``module`` from noise x0 [N, *sample_shape] (and N prompts, or None) with the trainer's rollout
        solver (no grad)."""
        cfg = self.config
        if cfg.rollout_compile:
            if module not in self._compiled_rollout_modules:
                self._compiled_rollout_modules[module] = torch.compile(module)
            module = self._compiled_rollout_modules[module]
        return self.flow.generate(
            module,
            x0,
            prompts,
            steps=self.rollout_steps,
            method=self.rollout_method,
            grid=self.rollout_grid,
            cuda_graph=False if cfg.fsdp else cfg.cuda_graph,
            autocast=self.autocast_dtype,
        )

    def rollout(self, batch_size: int):
        """(x0, x1, prompts): noise, the samples the last policy makes from it (no grad), and the batch's prompts
        (None for an unconditional model)."""
        prompts = None if self.flow.prompts is None else self.flow.prompts.sample(batch_size, self.host_generator)
        x0 = torch.randn((batch_size, *self.image_shape), device=self.device, generator=self.generator)
        with self.weights.last_policy() as module:
            x1 = self.generate(module, x0, prompts)
        return x0, x1, prompts

    def _next_rollouts(self):
        """The step's (x0, x1, prompts, rewards) from the rollout pool, which is refilled when empty: one rollout
        of ``rollout_batches`` x B samples, scored in one call of the reward function."""
        cfg, batch = self.config, self.local_batch_size
        if self._pool is None or len(self._pool) < batch:
            size = cfg.rollout_batches * batch
            x0, x1, prompts = self.rollout(size)
            with dist_utils.on_all_ranks("scoring rewards"):  # a bad reward on any rank stops all, before any update
                rewards = self.reward_fn(self.flow.to_images(x1), prompts).to(self.device)
                check_rewards(rewards, size)
            self._pool = RolloutPool.make(
                x0, x1, prompts, rewards, reuse=cfg.rollout_reuse, generator=self.host_generator
            )
        return self._pool.take(batch)

    def _prompt_groups(self, prompts):
        """The whole batch's prompt-group ids [batch_size] on the device when the objective asks for them, else
        None (collective then: every rank's prompts are gathered)."""
        if not self.objective.grouped:
            return None
        everyone = dist_utils.all_gather_object(prompts)
        return group_ids(
            None if prompts is None else [p for part in everyone for p in part], self.config.batch_size
        ).to(self.device)

    def train_step(self) -> dict:
        """One update of the whole batch by the objective; returns its metrics (the same on every rank)."""
        cfg, start = self.config, time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        x0, x1, prompts, rewards = self._next_rollouts()
        all_rewards = dist_utils.all_gather_cat(rewards)
        all_inputs = self.objective.sample_inputs(all_rewards, self._prompt_groups(prompts))
        share = slice(self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size)
        rollout_x0 = x0 if cfg.coupling == "rollout" else None
        x0, x1c, inputs = couple(x1, all_inputs[share], coupling=cfg.coupling, x0=rollout_x0, generator=self.generator)
        t, k = None, cfg.times_per_sample
        if k > 1:  # every sample at k stratified times: the batch's rows repeated k times, one loss mean over all
            x0, x1c, inputs = x0.repeat_interleave(k, 0), x1c.repeat_interleave(k, 0), inputs.repeat_interleave(k)
            prompts = None if prompts is None else [p for p in prompts for _ in range(k)]
            t = stratified_times(len(inputs) // k, k, generator=self.generator, device=x0.device, dtype=x0.dtype)
        cond = self.flow.conditions(prompts)
        t, xt, ut = sample_path(x0, x1c, t, sigma=cfg.sigma, generator=self.generator)
        self.model.train()
        frozen = {}
        with self._autocast():
            # the frozen ones first: a LoRA policy's last policy and EMA are swapped into its tensors in place, which
            # must not happen between the policy's forward and its backward
            for name in self.objective.frozen:
                with torch.no_grad(), getattr(self.weights, name)() as module:
                    frozen[name] = self.flow.velocity(module, t, xt, *cond)
            v = self.flow.velocity(self.forward, t, xt, *cond)
        loss, parts = self.objective.loss(v, ut, frozen, inputs, t=t)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # DDP / FSDP average the ranks' gradients: the whole batch's mean
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.weights.trainable_parameters(), cfg.grad_clip or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        # Every metric in one tensor and one host transfer, before the update: the whole batch's values, the
        # same on every rank, so every rank takes the same decision below.
        means = dist_utils.all_mean(torch.stack([x.detach().double() for x in (loss, *parts.values())]))
        input_metrics = self.objective.input_metrics(all_inputs)
        names = ["loss", *parts, "grad_norm", "reward_mean", "reward_std", "reward_max", *input_metrics]
        spread = all_rewards.std() if all_rewards.numel() > 1 else all_rewards.new_zeros(())
        values = [
            *means,
            grad_norm.detach().double(),
            all_rewards.mean().double(),
            spread.double(),
            all_rewards.max().double(),
            *(m.to(self.device) for m in input_metrics.values()),
        ]
        if self.step % cfg.diversity_every == 0:
            names.append("diversity")
            values.append(mean_pairwise_distance(dist_utils.all_gather_cat(x1)).to(self.device))
        metrics = dict(zip(names, torch.stack(values).tolist()))
        if not math.isfinite(metrics["loss"]) or not (math.isfinite(metrics["grad_norm"]) or self.scaler.is_enabled()):
            # (fp16: a non-finite gradient is the GradScaler's business, it skips the step and lowers the scale)
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(self._non_finite_report(metrics, all_rewards, all_inputs, x1, v, frozen))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        if self.objective.ema_updates == "step":
            self.weights.update_ema(self.objective.ema_decay(self.step))
        seconds = time.perf_counter() - start
        return {
            "step": self.step,
            **metrics,
            "lr": self.scheduler.get_last_lr()[0],
            "samples_per_s": cfg.batch_size / seconds,
            "peak_memory_mb": self._peak_memory_mb(),
        }

    def _peak_memory_mb(self) -> float:
        """This rank's peak memory: on CUDA the most allocated during this step, on the CPU the process's peak
        resident size so far."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e6
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # KiB on Linux

    def _non_finite_report(self, metrics, rewards, inputs, x1, v, frozen) -> str:
        """Why a step's loss or gradient norm is not finite, for the error that stops training (slow path; this
        rank's tensors only, no collectives). ``x1``: the step's rollout samples."""
        cfg = self.config

        def finite(tensors) -> bool:
            return all(bool(torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all()) for t in tensors)

        causes = self.objective.non_finite_causes(rewards, inputs)
        if not finite([x1]):  # then every prediction on the path is non-finite too: name the source alone
            causes.append(
                "the rollouts are non-finite: the last policy's samples overflowed (its velocity field diverged; "
                "a lower learning rate or a larger w2_coefficient keeps it near the reference)"
            )
            frozen = {}
        elif not finite(self.weights.trainable_parameters()):
            causes.append("the policy's weights were non-finite before this step (were they loaded that way?)")
        elif not finite([v]):
            causes.append(f"the policy's prediction overflowed (precision='{cfg.precision}')")
        causes += [
            f"the {name.replace('_', ' ')}'s prediction is non-finite (check its weights and the precision)"
            for name, velocity in frozen.items()
            if not finite([velocity])
        ]
        causes.append(
            f"a learning rate too high for this model (now {self.scheduler.get_last_lr()[0]:.3g}; lower "
            "learning_rate or raise warmup_steps)"
        )
        if cfg.precision != "fp32":
            causes.append(f"too little precision (precision='{cfg.precision}'; try 'fp32')")
        return (
            f"step {self.step + 1}: the loss is {metrics['loss']} and the gradient norm {metrics['grad_norm']}, so "
            "the update was not applied (the model, optimizer, scheduler and EMA are as before this step). Likely "
            "cause(s): " + "; ".join(causes) + "."
        )

    # -- loop ----------------------------------------------------------------------------------

    def train(self, num_epochs: int, steps_per_epoch: int, *, progress: bool = True) -> list[dict]:
        """Trains until ``num_epochs * steps_per_epoch`` steps in total (a resumed trainer continues where it
        stopped), refreshing the last policy after every ``config.refresh_interval``-th epoch; returns the steps'
        metrics (each with its "epoch", counted from 0). Around the steps the trainer's callbacks run (by default
        the run's files, see :func:`orw_fast.callbacks.default_callbacks`), after a progress bar when ``progress``.
        Multi-process: every rank calls it and gets the same history; rank 0 alone shows the bar and writes."""
        for name, value in (("num_epochs", num_epochs), ("steps_per_epoch", steps_per_epoch)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        total = num_epochs * steps_per_epoch
        callbacks = [ProgressBar()] * progress + self.callbacks
        for callback in callbacks:
            callback.on_train_start(self, total, steps_per_epoch)
        history = []
        while self.step < total:
            metrics = self.train_step()
            metrics["epoch"] = (self.step - 1) // steps_per_epoch
            history.append(metrics)
            for callback in callbacks:
                callback.on_step_end(self, metrics)
            if self.step % steps_per_epoch == 0:
                epoch = self.step // steps_per_epoch
                if epoch % self.config.refresh_interval == 0:
                    self.refresh_last_policy()
                for callback in callbacks:
                    callback.on_epoch_end(self, epoch)
        for callback in callbacks:
            callback.on_train_end(self)
        return history

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, path) -> Path:
        """Writes :func:`orw_fast.checkpoint.training_state` to ``path`` atomically (and the model's export beside
        it). Collective: every rank calls it, rank 0 writes."""
        state = training_state(self)
        with dist_utils.on_all_ranks("writing a checkpoint"):
            if self.rank == 0:
                save_atomic(state, path)
                self.flow.export(Path(path), state)
        return Path(path)

    def resume(self, path) -> None:
        """Restores a checkpoint written by :meth:`save_checkpoint`; training then continues exactly when as many
        processes run as wrote it. All or nothing: every entry is checked against this trainer first; on any
        error (naming the file and the entry) the trainer is exactly as before. An EMA that the checkpoint lacks
        starts from its policy. Collective: every rank calls it and reads ``path``."""
        with dist_utils.on_all_ranks("reading a checkpoint"):
            ckpt = load_file(path)
            ranks = check_training_checkpoint(self, ckpt, f"checkpoint {str(path)!r}")
        self.weights.load_states(ckpt)
        dist_utils.load_optimizer_state_dict(self.model, self.optimizer, ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step = ckpt["step"]
        self._pool = None
        if len(ranks) != self.world_size:
            warnings.warn(
                f"checkpoint {str(path)!r} was written by {len(ranks)} process(es), resumed by "
                f"{self.world_size}: training continues with this run's per-rank random streams, not exactly "
                "as an uninterrupted run would",
                stacklevel=2,
            )
            return
        rng = ranks[self.rank]
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng.get("host") is not None:  # (earlier checkpoints have none)
            self.host_generator.set_state(rng["host"])
        pools = ckpt.get("rollout_pools")
        self._pool = (
            None if pools is None or pools[self.rank] is None else RolloutPool.from_state(pools[self.rank], self.device)
        )
