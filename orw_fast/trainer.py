"""ORWCFMTrainer: online reward-weighted flow-matching fine-tuning with W2 regularization.

One step (see the design notes): take B rollouts of the *last policy* (no grad, the sampler of orw_fast.sampling)
with their rewards from the rollout pool (orw_fast.rollouts: made ``rollout_batches`` steps at a time, each
sample used ``rollout_reuse`` times; by default one fresh rollout per sample and step), turn rewards into weights, pair every x1 with noise (coupling; the
weight moves with its x1), draw t and x_t, predict with the policy (grad) and the frozen reference
(no grad), fused loss, backward, grad clip, Adam with LR warm-up, optional EMA. Every
``refresh_interval`` epochs the last policy becomes a copy of the policy (copied in place, so the
sampler's CUDA graph stays valid).

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
save_checkpoint, save_samples and resume are collective (every rank calls them). ``config.fsdp`` shards
the policy and its frozen copies with FSDP2 instead of replicating them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from orw_fast import distributed as dist_utils
from orw_fast.checkpoint import (
    ORW_FORMAT,
    ORW_VERSION,
    check_optimizer_state,
    check_rng_state,
    check_scaler_state,
    check_scheduler_state,
    load_file,
    read_model_weights,
    save_atomic,
)
from orw_fast.config import PRECISIONS, ConfigError, TrainerConfig
from orw_fast.couplings import couple, sample_path
from orw_fast.images import save_image_grid
from orw_fast.metrics import effective_sample_size, mean_pairwise_distance
from orw_fast.models.flow_model import FlowModel, PixelFlowModel
from orw_fast.models.policy_weights import FullCopies
from orw_fast.ops import orw_cfm_w2_loss, reward_weights
from orw_fast.rewards import as_reward_fn, check_rewards
from orw_fast.rollouts import RolloutPool

class ORWCFMTrainer:
    """Online ORW-CFM-W2 fine-tuning of ``model`` (a flow field ``model(t, x)``, t: [B], or a
    :class:`~orw_fast.models.flow_model.FlowModel`) toward ``reward_fn`` (images [B, C, H, W] in [-1, 1], and the
    batch's prompts when it takes two arguments -> rewards [B]; defaults to a CLIP reward when ``config.text_prompts``
    is set). Under torchrun it joins the process group (NCCL for CUDA, gloo otherwise) and an index-less "cuda"
    device becomes cuda:LOCAL_RANK."""

    def __init__(self, model, config=None, device=None, reward_fn: Callable | None = None):
        self.config = cfg = TrainerConfig.coerce(config)
        flow = model if isinstance(model, FlowModel) else PixelFlowModel(model, cfg.image_shape,
                                                                          channels_last=cfg.channels_last)
        self.device = dist_utils.local_device(device if device is not None else flow.default_device())
        dist_utils.init_from_env(self.device)
        self.rank, self.world_size = dist_utils.rank(), dist_utils.world_size()
        if cfg.batch_size % self.world_size:
            raise ConfigError("batch_size", f"divisible by the number of processes ({self.world_size})", cfg.batch_size)
        if cfg.fsdp and self.world_size == 1:
            raise ConfigError("fsdp", "False in one process (fsdp=True needs several processes: launch with torchrun)",
                              cfg.fsdp)
        self.local_batch_size = cfg.batch_size // self.world_size
        if cfg.sampler_grid is not None and flow.rollout_grid is None:
            raise ConfigError("sampler_grid", f"None for a {type(flow).__name__} (its rollouts follow its scheduler's "
                              "sigma schedule)", cfg.sampler_grid)
        if cfg.parallel:
            warnings.warn("config.parallel=True (the official code's DataParallel) is not used: orw_fast trains on one "
                          "device per process; for several GPUs launch with torchrun --nproc_per_node=N", stacklevel=2)
        if reward_fn is None and cfg.text_prompts:
            from orw_fast.rewards import CLIPReward

            reward_fn = CLIPReward(cfg.text_prompts, model_path=cfg.clip_model_path, device=self.device)
        if reward_fn is None:
            raise ValueError("give reward_fn (images -> [B] rewards) or config.text_prompts for a CLIP reward")
        self.reward_fn = as_reward_fn(reward_fn)
        self.flow = flow
        torch.manual_seed(cfg.seed)  # a LoRA adapter's initial weights: the same for a seed, whatever ran before
        flow.prepare(self.device, ema=cfg.ema_decay > 0)
        if flow.prompts is not None:
            flow.prompts.sample(self.local_batch_size, torch.Generator())  # a batch it cannot split is an error now
        self.image_shape = flow.sample_shape()
        if cfg.model_config is None:  # orw_fast's models know how to rebuild themselves (orw-fast sample needs it)
            cfg.model_config = flow.describe()
        self.weights = flow.weights
        self.weights.distribute(self.world_size, cfg.fsdp, self.device)
        self.forward = torch.compile(self.weights.forward) if cfg.compile else self.weights.forward
        self.optimizer = torch.optim.Adam(self.weights.trainable_parameters(), lr=cfg.learning_rate)
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
        self.savedir = Path(cfg.savedir)
        self._wandb = None

    # The modules of a fully trained model (FullCopies): the policy, and its frozen reference, last policy and EMA.
    model = property(lambda self: self.weights.module)
    reference = property(lambda self: self._full_copies().reference_module)
    last_policy = property(lambda self: self._full_copies().last_policy_module)
    ema = property(lambda self: self._full_copies().ema_module)

    def _full_copies(self) -> FullCopies:
        if not isinstance(self.weights, FullCopies):
            raise AttributeError(f"a {type(self.weights).__name__} policy has no separate reference, last-policy or "
                                 "EMA modules (trainer.weights holds them)")
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
        reference, ref_key = (read_model_weights(copies.reference_module, cfg.ref_path, weights) if cfg.ref_path
                              else (policy, key))
        copies.load_pretrained(policy, reference)
        names = "policy, last policy" + (", EMA" if copies.ema_module is not None else "")
        message = (f"loaded {key!r} of {str(path)!r} into the {names} and reference" if not cfg.ref_path else
                   f"loaded {key!r} of {str(path)!r} into the {names}, and {ref_key!r} of {cfg.ref_path!r} into the "
                   "reference")
        if verbose and self.rank == 0:
            print(message)
        return message

    def refresh_last_policy(self) -> None:
        """last policy <- policy, copied in place (the sampler's captured graph stays valid); the rollouts of the
        previous last policy that are left in the pool are dropped."""
        self.weights.refresh_last_policy()
        self._pool = None

    # -- one step ------------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def _generate(self, module, x0, prompts):
        cfg = self.config
        return self.flow.generate(module, x0, prompts, steps=cfg.sampler_steps, method=cfg.sampler_method,
                                  grid=cfg.sampler_grid or self.flow.rollout_grid,
                                  cuda_graph=False if cfg.fsdp else cfg.cuda_graph, autocast=self.autocast_dtype)

    def rollout(self, batch_size: int):
        """(x0, x1, prompts): noise, the samples the last policy makes from it (no grad), and the batch's prompts
        (None for an unconditional model)."""
        prompts = None if self.flow.prompts is None else self.flow.prompts.sample(batch_size, self.host_generator)
        x0 = torch.randn((batch_size, *self.image_shape), device=self.device, generator=self.generator)
        with self.weights.last_policy() as module:
            x1 = self._generate(module, x0, prompts)
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
            self._pool = RolloutPool.make(x0, x1, prompts, rewards, reuse=cfg.rollout_reuse,
                                          generator=self.host_generator)
        return self._pool.take(batch)

    def train_step(self) -> dict:
        """One ORW-CFM-W2 update of the whole batch; returns its metrics (the same on every rank)."""
        cfg, start = self.config, time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        x0, x1, prompts, rewards = self._next_rollouts()
        cond = self.flow.conditions(prompts)
        all_rewards = dist_utils.all_gather_cat(rewards)
        all_weights = reward_weights(all_rewards, cfg.temperature, cfg.weighting, validate=False)
        share = slice(self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size)
        weights = all_weights[share]  # normalised over the whole batch
        rollout_x0 = x0 if cfg.coupling == "rollout" else None
        x0, x1c, weights = couple(x1, weights, coupling=cfg.coupling, x0=rollout_x0, generator=self.generator)
        t, xt, ut = sample_path(x0, x1c, sigma=cfg.sigma, generator=self.generator)
        self.model.train()
        with self._autocast():
            v = self.flow.velocity(self.forward, t, xt, *cond)
            with torch.no_grad(), self.weights.reference() as reference:
                v_ref = self.flow.velocity(reference, t, xt, *cond)
        loss, parts = orw_cfm_w2_loss(v, ut, v_ref, weights=weights, alpha=cfg.w2_coefficient,
                                      return_components=True, validate=False)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # DDP / FSDP average the ranks' gradients: the whole batch's mean
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.weights.trainable_parameters(), cfg.grad_clip or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        # Every metric in one tensor and one host transfer, before the update: the whole batch's values, the
        # same on every rank, so every rank takes the same decision below.
        means = dist_utils.all_mean(torch.stack([x.detach().double() for x in (loss, parts.fm.mean(), parts.w2.mean())]))
        names = ["loss", "fm_loss", "w2_loss", "grad_norm", "reward_mean", "reward_std", "reward_max", "ess"]
        values = [*means, grad_norm.detach().double(), all_rewards.mean().double(),
                  all_rewards.std().double() if all_rewards.numel() > 1 else all_rewards.new_zeros((), dtype=torch.float64),
                  all_rewards.max().double(), effective_sample_size(all_weights).to(self.device)]
        if self.step % cfg.diversity_every == 0:
            names.append("diversity")
            values.append(mean_pairwise_distance(dist_utils.all_gather_cat(x1)).to(self.device))
        metrics = dict(zip(names, torch.stack(values).tolist()))
        if not math.isfinite(metrics["loss"]) or not (math.isfinite(metrics["grad_norm"]) or self.scaler.is_enabled()):
            # (fp16: a non-finite gradient is the GradScaler's business, it skips the step and lowers the scale)
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(self._non_finite_report(metrics, all_rewards, all_weights, v, v_ref))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.weights.update_ema(cfg.ema_decay)
        self.step += 1
        return {"step": self.step, **metrics, "lr": self.scheduler.get_last_lr()[0],
                "samples_per_s": cfg.batch_size / (time.perf_counter() - start), "peak_memory_mb": self._peak_memory_mb()}

    def _peak_memory_mb(self) -> float:
        """This rank's peak memory: on CUDA the most allocated during this step, on the CPU the process's peak
        resident size so far."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e6
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # KiB on Linux

    def _non_finite_report(self, metrics, rewards, weights, v, v_ref) -> str:
        """Why a step's loss or gradient norm is not finite, for the error that stops training (slow path; this
        rank's tensors only, no collectives)."""
        cfg = self.config

        def finite(tensors) -> bool:
            return all(bool(torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all()) for t in tensors)

        causes = []
        if not finite([weights]):
            causes.append(f"the {cfg.weighting} weights overflow: rewards span [{rewards.min().item():.4g}, "
                          f"{rewards.max().item():.4g}] with temperature {cfg.temperature:g}, and exp(temperature * "
                          "reward) is inf above 88.7; use weighting='softmax' (finite for any rewards), a smaller "
                          "temperature, or rescale the reward")
        if not finite(self.weights.trainable_parameters()):
            causes.append("the policy's weights were non-finite before this step (were they loaded that way?)")
        elif not finite([v]):
            causes.append(f"the policy's prediction overflowed (precision='{cfg.precision}')")
        if not finite([v_ref]):
            causes.append("the reference's prediction is non-finite (check its weights and the precision)")
        causes.append(f"a learning rate too high for this model (now {self.scheduler.get_last_lr()[0]:.3g}; lower "
                      "learning_rate or raise warmup_steps)")
        if cfg.precision != "fp32":
            causes.append(f"too little precision (precision='{cfg.precision}'; try 'fp32')")
        return (f"step {self.step + 1}: the loss is {metrics['loss']} and the gradient norm {metrics['grad_norm']}, so "
                "the update was not applied (the model, optimizer, scheduler and EMA are as before this step). Likely "
                "cause(s): " + "; ".join(causes) + ".")

    # -- loop ----------------------------------------------------------------------------------

    def train(self, num_epochs: int, steps_per_epoch: int, *, progress: bool = True) -> list[dict]:
        """Trains until ``num_epochs * steps_per_epoch`` steps in total (a resumed trainer continues
        where it stopped). Logs each step to ``savedir/metrics.jsonl`` (and wandb), writes a sample grid
        and a checkpoint per epoch (``config.checkpoint_every``) and ``savedir/last.pt`` at the end.
        Multi-process: every rank calls it and gets the same history; rank 0 alone logs, shows the
        progress bar and writes."""
        for name, value in (("num_epochs", num_epochs), ("steps_per_epoch", steps_per_epoch)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        total = num_epochs * steps_per_epoch
        main = self.rank == 0
        log = None
        with dist_utils.on_all_ranks("opening the run's folder and log"):
            if main:
                self.savedir.mkdir(parents=True, exist_ok=True)
                self._start_wandb()
                log = open(self.savedir / "metrics.jsonl", "a")
        history = []
        bar = tqdm(total=total, initial=min(self.step, total), disable=not (progress and main), unit="step",
                   desc="ORW-CFM-W2")
        with log or contextlib.nullcontext():
            while self.step < total:
                metrics = self.train_step()
                metrics["epoch"] = (self.step - 1) // steps_per_epoch
                history.append(metrics)
                if log is not None:
                    log.write(json.dumps(metrics) + "\n")
                    log.flush()
                if self._wandb is not None:
                    self._wandb.log(metrics, step=self.step)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3g}", loss=f"{metrics['loss']:.3g}",
                                ess=f"{metrics['ess']:.1f}")
                if self.step % steps_per_epoch == 0:
                    self._end_of_epoch(self.step // steps_per_epoch, total)
        bar.close()
        self.save_checkpoint(self.savedir / "last.pt")
        return history

    def _end_of_epoch(self, epoch: int, total: int) -> None:
        cfg = self.config
        if epoch % cfg.refresh_interval == 0:
            self.refresh_last_policy()
        if cfg.grid_size:
            self.save_samples(self.savedir / f"samples_epoch{epoch:03d}.png")
        if cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0 and self.step < total:
            self.save_checkpoint(self.savedir / f"checkpoint_epoch{epoch:03d}.pt")

    def save_samples(self, path) -> Path:
        """A grid of ``config.grid_size`` policy samples from a fixed noise and fixed prompts (the same every epoch),
        each prompt under its image. Collective: every rank samples (sharded models need all of them), rank 0
        writes."""
        n = self.config.grid_size
        x0 = torch.randn((n, *self.image_shape), device=self.device,
                         generator=torch.Generator(device=self.device).manual_seed(12345))
        prompts = None if self.flow.prompts is None else self.flow.prompts.first(n)
        training = self.model.training
        self.model.eval()
        images = self.flow.to_images(self._generate(self.model, x0, prompts))
        self.model.train(training)
        with dist_utils.on_all_ranks("writing a sample grid"):
            if self.rank == 0:
                save_image_grid(images, path, captions=None if prompts is None else [str(p) for p in prompts])
        return Path(path)

    def _start_wandb(self) -> None:
        if not self.config.use_wandb or self._wandb is not None:
            return
        try:
            import wandb
        except ImportError as err:
            raise ValueError("config.use_wandb=True needs the wandb package (pip install wandb)") from err
        self._wandb = wandb.init(project=self.config.wandb_project, name=self.config.run_name,
                                 config=dataclasses.asdict(self.config))

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, path) -> Path:
        """Everything needed to continue exactly: models (full, unwrapped state dicts, loadable with or
        without torch.distributed), optimizer, scheduler, scaler, step, every rank's RNGs, config; written
        atomically. Collective: every rank calls it, rank 0 writes."""
        state = {
            "format": ORW_FORMAT,
            "version": ORW_VERSION,
            **self.weights.states(),
            "optimizer": dist_utils.optimizer_state_dict(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "config": dataclasses.asdict(self.config),
            "rng": dist_utils.all_gather_object({  # one entry per rank
                "generator": self.generator.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": np.random.get_state(),
                "python": random.getstate(),
                "host": self.host_generator.get_state(),
            }),
            "rollout_pools": dist_utils.all_gather_object(None if self._pool is None else self._pool.state()),
        }
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
            ranks = self._check_training_checkpoint(ckpt, f"checkpoint {str(path)!r}")
        self.weights.load_states(ckpt)
        dist_utils.load_optimizer_state_dict(self.model, self.optimizer, ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step = ckpt["step"]
        self._pool = None
        if len(ranks) != self.world_size:
            warnings.warn(f"checkpoint {str(path)!r} was written by {len(ranks)} process(es), resumed by "
                          f"{self.world_size}: training continues with this run's per-rank random streams, not exactly "
                          "as an uninterrupted run would", stacklevel=2)
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
        self._pool = None if pools is None or pools[self.rank] is None else \
            RolloutPool.from_state(pools[self.rank], self.device)

    def _check_training_checkpoint(self, ckpt: dict, where: str) -> list:
        """Raises ValueError naming ``where`` and the entry unless every entry of ``ckpt`` fits this trainer;
        returns the per-rank random states."""
        if ckpt.get("format") != ORW_FORMAT:
            raise ValueError(f"{where} is not an orw_fast training checkpoint (use load_pretrained for weights)")

        def entry(key):
            if key not in ckpt:
                raise ValueError(f"{where} has no entry {key!r}; nothing was loaded")
            return ckpt[key]

        config = entry("config")
        if not isinstance(config, dict):
            raise ValueError(f"{where}, entry 'config' is a {type(config).__name__}, not a dict; nothing was loaded")
        if config.get("fsdp", False) != self.config.fsdp:
            raise ValueError(f"{where} was written with fsdp={not self.config.fsdp}; resume it with the same setting "
                             "(load_pretrained reads its weights either way)")
        self.weights.check_states(ckpt, where)
        check_optimizer_state(self.model, self.optimizer, entry("optimizer"), f"{where}, entry 'optimizer'")
        check_scheduler_state(self.optimizer, entry("scheduler"), f"{where}, entry 'scheduler'")
        check_scaler_state(self.scaler, entry("scaler"), f"{where}, entry 'scaler'")
        step = entry("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{where}, entry 'step' must be an integer >= 0, got {step!r}; nothing was loaded")
        ranks = entry("rng") if isinstance(entry("rng"), list) else [ckpt["rng"]]  # version 1: one process
        if len(ranks) == self.world_size:
            check_rng_state(ranks[self.rank], self.device, f"{where}, entry 'rng' of rank {self.rank}")
            pools = ckpt.get("rollout_pools")
            if pools is not None:
                if not isinstance(pools, list) or len(pools) != self.world_size:
                    raise ValueError(f"{where}, entry 'rollout_pools' must hold one pool (or None) per rank; nothing "
                                     "was loaded")
                RolloutPool.check_state(pools[self.rank], self.image_shape,
                                        f"{where}, entry 'rollout_pools' of rank {self.rank}")
        return ranks
