"""ORWCFMTrainer: online reward-weighted flow-matching fine-tuning with W2 regularization.

One step (see the design notes): roll out B samples with the *last policy* (no grad, the sampler of
orw_fast.sampling), score them, turn rewards into weights, pair every x1 with noise (coupling; the
weight moves with its x1), draw t and x_t, predict with the policy (grad) and the frozen reference
(no grad), fused loss, backward, grad clip, Adam with LR warm-up, optional EMA. Every
``refresh_interval`` epochs the last policy becomes a copy of the policy (copied in place, so the
sampler's CUDA graph stays valid).

The constructor follows the official ORW-CFM-W2 code: ``ORWCFMTrainer(model, config, device,
reward_fn=None)`` with a dict of its keys; :class:`TrainerConfig` holds them plus orw_fast's options.

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
import copy
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
from orw_fast.checkpoint import ORW_FORMAT, ORW_VERSION, load_file, load_model_weights, save_atomic
from orw_fast.couplings import COUPLINGS, couple, sample_path
from orw_fast.images import save_image_grid
from orw_fast.metrics import effective_sample_size, mean_pairwise_distance
from orw_fast.ops import WEIGHTINGS, orw_cfm_w2_loss, reward_weights
from orw_fast.rewards import as_reward_fn, check_rewards
from orw_fast.sampling import FIXED_STEP_METHODS, sample

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class TrainerConfig:
    """Settings of :class:`ORWCFMTrainer`. The first block has the official code's keys and meaning."""

    learning_rate: float = 2e-4
    warmup_steps: int = 0  # linear LR warm-up over this many steps
    w2_coefficient: float = 1.0  # alpha
    temperature: float = 1.0  # tau
    grad_clip: float = 1.0  # max grad norm; 0 disables
    batch_size: int = 64  # the whole batch, split evenly over the processes
    use_wandb: bool = False
    wandb_project: str = "orw_fast"
    run_name: str | None = None
    savedir: str = "runs/orw"
    ref_path: str | None = None  # reference weights (default: the loaded pre-trained model)
    text_prompts: list[str] | None = None  # CLIP reward prompts (needs clip_model_path)
    # orw_fast options
    image_shape: tuple[int, ...] | None = None  # [C, H, W]; inferred from torchcfm UNets
    weighting: str = "softmax"  # "softmax" | "exp" (official) | "none"
    coupling: str = "independent"  # "independent" | "ot" | "rollout"
    sigma: float = 0.0  # path noise
    sampler_steps: int = 100
    sampler_method: str = "euler"
    cuda_graph: str | bool = "auto"
    refresh_interval: int = 1  # epochs between last-policy refreshes
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16" (autocast; GradScaler for fp16)
    compile: bool = False  # torch.compile the policy's forward
    channels_last: bool = False
    ema_decay: float = 0.0  # 0 disables the EMA copy
    seed: int = 0  # rank r draws from seed + r
    fsdp: bool = False  # multi-process: shard the policy and its copies with FSDP2 (fully_shard)
    clip_model_path: str | None = None
    grid_size: int = 64  # samples in the per-epoch grid (0: no grids)
    checkpoint_every: int = 1  # epochs between checkpoints (0: only at the end)
    model_config: dict | None = None  # how to rebuild the model (orw_fast.models), kept in checkpoints

    @classmethod
    def coerce(cls, config) -> "TrainerConfig":
        """A TrainerConfig from a TrainerConfig, a dict of its keys or None; unknown keys are errors."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return dataclasses.replace(config)
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict or TrainerConfig, got {type(config).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**config)

    def __post_init__(self):
        def bad(name, expected):
            raise ValueError(f"config.{name} must be {expected}, got {getattr(self, name)!r}")

        for name in ("learning_rate", "temperature"):
            if not isinstance(getattr(self, name), (int, float)) or not math.isfinite(getattr(self, name)):
                bad(name, "a finite number")
        if self.learning_rate <= 0:
            bad("learning_rate", "> 0")
        for name in ("w2_coefficient", "grad_clip", "sigma"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                bad(name, "a finite number >= 0")
        for name in ("batch_size", "sampler_steps", "refresh_interval"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        for name in ("warmup_steps", "grid_size", "checkpoint_every", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "an integer >= 0")
        if not 0 <= self.ema_decay < 1:
            bad("ema_decay", "in [0, 1)")
        if self.weighting not in WEIGHTINGS:
            bad("weighting", f"one of {WEIGHTINGS}")
        if self.coupling not in COUPLINGS:
            bad("coupling", f"one of {COUPLINGS}")
        if self.precision not in PRECISIONS:
            bad("precision", f"one of {tuple(PRECISIONS)}")
        if self.image_shape is not None:
            self.image_shape = tuple(int(d) for d in self.image_shape)
        if self.fsdp:  # every rank must make the same number of (collective) model calls
            if self.sampler_method not in FIXED_STEP_METHODS:
                bad("sampler_method", f"a fixed-step method {FIXED_STEP_METHODS} with fsdp=True")
            if self.cuda_graph is True:
                bad("cuda_graph", "'auto' or False with fsdp=True (sharded models are not graph-captured)")
            if self.precision == "fp16":
                bad("precision", "'fp32' or 'bf16' with fsdp=True (no sharded GradScaler)")


def infer_image_shape(model) -> tuple[int, ...] | None:
    """[C, H, W] of a torchcfm UNet (it stores in_channels and image_size), else None."""
    channels, size = getattr(model, "in_channels", None), getattr(model, "image_size", None)
    return (int(channels), int(size), int(size)) if channels and size else None


class ORWCFMTrainer:
    """Online ORW-CFM-W2 fine-tuning of ``model`` (a flow field ``model(t, x)``, t: [B]) toward
    ``reward_fn`` (images [B, ...] in model space -> rewards [B]; defaults to a CLIP reward when
    ``config.text_prompts`` is set). Under torchrun it joins the process group (NCCL for CUDA, gloo
    otherwise) and an index-less "cuda" device becomes cuda:LOCAL_RANK."""

    def __init__(self, model: torch.nn.Module, config=None, device=None, reward_fn: Callable | None = None):
        self.config = cfg = TrainerConfig.coerce(config)
        self.device = dist_utils.local_device(device if device is not None else next(model.parameters()).device)
        dist_utils.init_from_env(self.device)
        self.rank, self.world_size = dist_utils.rank(), dist_utils.world_size()
        if cfg.batch_size % self.world_size:
            raise ValueError(f"config.batch_size must be divisible by the number of processes ({self.world_size}), "
                             f"got {cfg.batch_size}")
        if cfg.fsdp and self.world_size == 1:
            raise ValueError("config.fsdp=True needs several processes (launch with torchrun)")
        self.local_batch_size = cfg.batch_size // self.world_size
        self.image_shape = cfg.image_shape or infer_image_shape(model)
        if self.image_shape is None:
            raise ValueError("config.image_shape is needed: the shape [C, H, W] of one sample")
        if reward_fn is None and cfg.text_prompts:
            from orw_fast.rewards import CLIPReward

            reward_fn = CLIPReward(cfg.text_prompts, model_path=cfg.clip_model_path, device=self.device)
        if reward_fn is None:
            raise ValueError("give reward_fn (images -> [B] rewards) or config.text_prompts for a CLIP reward")
        self.reward_fn = as_reward_fn(reward_fn)
        memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
        self.model = model.to(self.device, memory_format=memory_format)
        dist_utils.broadcast_module(self.model)  # every rank (and every copy below) starts from rank 0's weights
        self.reference = self._frozen_copy(self.model)
        self.last_policy = self._frozen_copy(self.model)
        self.ema = self._frozen_copy(self.model) if cfg.ema_decay > 0 else None
        forward = self._distribute()
        self.forward = torch.compile(forward) if cfg.compile else forward
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.learning_rate)
        warmup = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        )
        self.autocast_dtype = PRECISIONS[cfg.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed + self.rank)
        torch.manual_seed(cfg.seed + self.rank)  # dropout and anything else drawing from the global RNG
        self.step = 0
        self.savedir = Path(cfg.savedir)
        self._wandb = None

    @staticmethod
    def _frozen_copy(model):
        return copy.deepcopy(model).eval().requires_grad_(False)

    def _distribute(self) -> torch.nn.Module:
        """The module train_step calls: the policy, wrapped in DDP when several processes run; with
        config.fsdp the policy and its frozen copies are sharded (in place) instead."""
        if self.world_size == 1:
            return self.model
        if self.config.fsdp:
            from torch.distributed.fsdp import fully_shard

            for module in (self.model, self.reference, self.last_policy, self.ema):
                if module is not None:
                    fully_shard(module)
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None)

    # -- weights -------------------------------------------------------------------------------

    def load_pretrained(self, path, *, weights: str = "ema") -> None:
        """Loads pre-trained weights into the policy, the last policy, the EMA and (unless
        ``config.ref_path`` names other weights) the reference. Reads torchcfm checkpoints
        (``{net_model, ema_model, ...}``, with or without the ``module.`` prefix; ``weights`` "ema" or
        "net") and orw_fast checkpoints."""
        load_model_weights(self.model, path, weights)
        for copy_ in (self.last_policy, self.ema):
            if copy_ is not None:
                copy_.load_state_dict(self.model.state_dict())
        if self.config.ref_path:
            load_model_weights(self.reference, self.config.ref_path, weights)
        else:
            self.reference.load_state_dict(self.model.state_dict())

    def refresh_last_policy(self) -> None:
        """last policy <- policy, copied in place (the sampler's captured graph stays valid)."""
        self.last_policy.load_state_dict(self.model.state_dict())

    # -- one step ------------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def rollout(self, batch_size: int, model=None):
        """(x0, x1): noise and the samples the last policy (or ``model``) makes from it, no grad."""
        cfg = self.config
        x0 = torch.randn((batch_size, *self.image_shape), device=self.device, generator=self.generator)
        x1 = sample(model or self.last_policy, x0, steps=cfg.sampler_steps, method=cfg.sampler_method,
                    cuda_graph=False if cfg.fsdp else cfg.cuda_graph, autocast=self.autocast_dtype)
        return x0, x1

    def train_step(self) -> dict:
        """One ORW-CFM-W2 update of the whole batch; returns its metrics (the same on every rank)."""
        cfg, start = self.config, time.perf_counter()
        x0, x1 = self.rollout(self.local_batch_size)
        with dist_utils.on_all_ranks("scoring rewards"):  # a bad reward on any rank stops all, before any update
            rewards = self.reward_fn(x1).to(self.device)
            check_rewards(rewards, self.local_batch_size)
        all_rewards = dist_utils.all_gather_cat(rewards)
        all_weights = reward_weights(all_rewards, cfg.temperature, cfg.weighting, validate=False)
        share = slice(self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size)
        weights = all_weights[share]  # normalised over the whole batch
        rollout_x0 = x0 if cfg.coupling == "rollout" else None
        x0, x1c, weights = couple(x1, weights, coupling=cfg.coupling, x0=rollout_x0, generator=self.generator)
        t, xt, ut = sample_path(x0, x1c, sigma=cfg.sigma, generator=self.generator)
        self.model.train()
        with self._autocast():
            v = self.forward(t, xt)
            with torch.no_grad():
                v_ref = self.reference(t, xt)
        loss, parts = orw_cfm_w2_loss(v, ut, v_ref, weights=weights, alpha=cfg.w2_coefficient,
                                      return_components=True, validate=False)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # DDP / FSDP average the ranks' gradients: the whole batch's mean
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.model.parameters()):
                    e.lerp_(p.detach(), 1 - cfg.ema_decay)
        self.step += 1
        means = torch.stack([x.detach().double() for x in (loss, parts.fm.mean(), parts.w2.mean())])
        loss_mean, fm_mean, w2_mean = dist_utils.all_mean(means).tolist()  # equal shares: the whole batch's means
        all_x1 = dist_utils.all_gather_cat(x1)
        elapsed = time.perf_counter() - start
        return {
            "step": self.step,
            "loss": loss_mean,
            "fm_loss": fm_mean,
            "w2_loss": w2_mean,
            "reward_mean": all_rewards.mean().item(),
            "reward_std": all_rewards.std().item() if all_rewards.numel() > 1 else 0.0,
            "reward_max": all_rewards.max().item(),
            "ess": effective_sample_size(all_weights),
            "diversity": mean_pairwise_distance(all_x1),
            "grad_norm": grad_norm.item(),
            "lr": self.scheduler.get_last_lr()[0],
            "samples_per_s": cfg.batch_size / elapsed,
        }

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
        """A grid of ``config.grid_size`` policy samples from a fixed noise (the same every epoch).
        Collective: every rank samples (sharded models need all of them), rank 0 writes."""
        x0 = torch.randn((self.config.grid_size, *self.image_shape), device=self.device,
                         generator=torch.Generator(device=self.device).manual_seed(12345))
        self.model.eval()
        x1 = sample(self.model, x0, steps=self.config.sampler_steps, method=self.config.sampler_method,
                    cuda_graph=False, autocast=self.autocast_dtype)
        with dist_utils.on_all_ranks("writing a sample grid"):
            if self.rank == 0:
                save_image_grid(x1, path)
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
        full = dist_utils.full_state_dict
        state = {
            "format": ORW_FORMAT,
            "version": ORW_VERSION,
            "policy": full(self.model),
            "last_policy": full(self.last_policy),
            "reference": full(self.reference),
            "ema": full(self.ema) if self.ema is not None else None,
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
            }),
        }
        with dist_utils.on_all_ranks("writing a checkpoint"):
            if self.rank == 0:
                save_atomic(state, path)
        return Path(path)

    def resume(self, path) -> None:
        """Restores a checkpoint written by :meth:`save_checkpoint`; training then continues exactly when
        as many processes run as wrote it. Collective: every rank calls it and reads ``path``."""
        with dist_utils.on_all_ranks("reading a checkpoint"):
            ckpt = load_file(path)
            if ckpt.get("format") != ORW_FORMAT:
                raise ValueError(f"{str(path)!r} is not an orw_fast training checkpoint (use load_pretrained for "
                                 "weights)")
            if ckpt["config"].get("fsdp", False) != self.config.fsdp:
                raise ValueError(f"checkpoint {str(path)!r} was written with fsdp={not self.config.fsdp}; resume it "
                                 f"with the same setting (load_pretrained reads its weights either way)")
        try:
            for module, key in ((self.model, "policy"), (self.last_policy, "last_policy"), (self.reference, "reference")):
                dist_utils.load_full_state_dict(module, ckpt[key])
            if self.ema is not None and ckpt["ema"] is not None:
                dist_utils.load_full_state_dict(self.ema, ckpt["ema"])
        except RuntimeError as err:
            raise ValueError(f"checkpoint {str(path)!r} does not match the model: {err}") from err
        dist_utils.load_optimizer_state_dict(self.model, self.optimizer, ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step = ckpt["step"]
        ranks = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]  # version 1: one process
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
