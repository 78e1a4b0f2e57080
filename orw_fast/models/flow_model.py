"""What differs between model families, behind the one small interface the trainer, the sampler and the
rewards use: :class:`FlowModel`. One subclass per family, found by name in :mod:`orw_fast.models.families`:
:class:`PixelFlowModel` ("pixel": ``model(t, x)``, torchcfm's UNets and orw_fast's own, unconditional or
class-conditional) and the diffusers families of :class:`orw_fast.models.diffusers_flow.DiffusersFlowModel`
("sd3": SD3/SD3.5, "flux": FLUX.1, in a VAE's latent space). :meth:`FlowModel.from_checkpoint` rebuilds any of
them from a checkpoint by the family it records.

Conventions (orw_fast's, torchcfm's): t=0 is noise, t=1 data; ``velocity(module, t, x, *cond)`` is dx/dt with t a
[B] tensor; ``cond`` are the conditioning tensors of a batch ([B, ...] each, empty for an unconditional model), made
by :meth:`FlowModel.conditions` from the batch's prompts (labels for a class-conditional model) and passed to every
call of a rollout; images for rewards are [B, C, H, W] in [-1, 1].
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch

from orw_fast.config import ConfigError
from orw_fast.models.policy_weights import FullCopies, PolicyWeights


class ModelArgumentError(ValueError):
    """A model argument that cannot be used. ``argument`` names it (the CLI reports the message under its flag); the
    message says what was wrong and what was expected, in words that also fit a command line."""

    def __init__(self, argument: str, message: str):
        self.argument = argument
        super().__init__(message)


class FlowModel:
    """The interface. ``family`` is the family's name in :data:`orw_fast.models.families.FAMILIES`; ``weights``
    holds the policy and its frozen companions (:mod:`orw_fast.models.policy_weights`); ``prompts`` is the prompt
    source (None: the model takes no prompts); ``rollout_method``, ``rollout_steps`` and ``rollout_grid`` the
    trainer's rollouts where its config leaves them unset (:meth:`rollout_settings`)."""

    family: str
    weights: PolicyWeights
    prompts = None
    # Pixel models: AB3, 9 steps on the grid dense at both ends, 10 model calls, the rollout that reached the
    # even-digits target soonest at no loss of quality, end to end at two protocols (bench_time_to_target.py; README)
    rollout_method: str = "ab3"
    rollout_steps: int = 9
    rollout_grid: str | None = "both_dense"

    def rollout_settings(self, method: str | None, steps: int | None, grid: str | None) -> tuple[str, int, str | None]:
        """(method, steps, grid) of the trainer's rollouts from its config's sampler_method, sampler_steps and
        sampler_grid, each None taking this model's; raises ConfigError naming the key when they do not fit."""
        from orw_fast.sampling import FIXED_STEP_METHODS, min_steps

        if grid is not None and self.rollout_grid is None:
            raise ConfigError(
                "sampler_grid",
                f"None for a {type(self).__name__} (its rollouts follow its scheduler's sigma schedule)",
                grid,
            )
        method, steps = method or self.rollout_method, steps or self.rollout_steps
        if method in FIXED_STEP_METHODS and steps < min_steps(method):
            raise ConfigError(
                "sampler_steps",
                f">= {min_steps(method)} with the model's rollout method {method!r} (or set sampler_method)",
                steps,
            )
        return method, steps, grid or self.rollout_grid

    def default_device(self) -> torch.device:
        """Where the model is (the trainer's device when none is given)."""
        raise NotImplementedError

    def prepare(self, device: torch.device, *, ema: bool) -> None:
        """Puts the model on ``device``, builds ``weights`` (with an EMA copy when ``ema``) and checks that the model
        runs; called once by the trainer before anything else."""
        raise NotImplementedError

    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample (and of its noise) in the space the flow runs in."""
        raise NotImplementedError

    def times(self, steps: int, grid: str | None = None) -> torch.Tensor | None:
        """The time grid of a rollout ([steps+1], increasing from 0 to 1; None: the uniform one) for the named
        ``grid`` (:data:`orw_fast.sampling.GRIDS`; None: uniform)."""
        from orw_fast.sampling import time_grid

        return None if grid in (None, "uniform") else time_grid(grid, steps)

    def conditions(self, prompts) -> tuple:
        """The conditioning tensors of a batch with these prompts (None for an unconditional model)."""
        return ()

    def velocity(self, module, t, x, *cond) -> torch.Tensor:
        """dx/dt of ``module`` (one of the weights' modules or the training forward): the conditional velocity,
        what the loss trains."""
        raise NotImplementedError

    def guided_velocity(self, module, t, x, *cond) -> torch.Tensor:
        """The velocity a rollout follows (with classifier-free guidance where the model uses it)."""
        return self.velocity(module, t, x, *cond)

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Samples -> images [B, C, H, W] in [-1, 1] for rewards and grids (a VAE decode for latents)."""
        return x

    def describe(self) -> dict | None:
        """How to rebuild this model, with its ``"family"`` (kept in checkpoints as ``model_config``; None when
        orw_fast cannot)."""
        return None

    @classmethod
    def from_checkpoint(cls, path, **overrides) -> FlowModel:
        """The model of a checkpoint that records its ``model_config`` (a training checkpoint, or a flow.pt of
        `orw-fast pretrain`), prepared with the checkpoint's weights (the family's ``_from_checkpoint`` says which)
        and ready to :meth:`generate` with ``weights.module``. Its family is the one the config records; configs
        written before families were recorded are pixel models, or a diffusers family picked from the pipeline when
        they say ``"kind": "diffusers"``. ``overrides`` are the family's options: ``device`` for every family;
        ``pipeline``, ``prompts`` and ``dtype`` for a diffusers one (``_from_checkpoint`` of each family says what
        they do). Called on a family's class, the checkpoint must be of that family."""
        from orw_fast.checkpoint import load_file
        from orw_fast.models.families import family_class

        ckpt = load_file(path)
        config = ckpt.get("model_config") or (ckpt.get("config") or {}).get("model_config") or {}
        if "family" in config:
            family = family_class(config["family"])
        elif config.get("kind") == "diffusers":  # before families were recorded
            from orw_fast.models.diffusers_flow import DiffusersFlowModel as family
        else:
            family = PixelFlowModel
        if not issubclass(family, cls) and not issubclass(cls, family):
            raise ValueError(f"{str(path)!r} is a checkpoint of a {family.__name__}, not of a {cls.__name__}")
        return (cls if issubclass(cls, family) else family)._from_checkpoint(path, ckpt, config, **overrides)

    @classmethod
    def _from_checkpoint(cls, path, ckpt: dict, config: dict, **overrides) -> FlowModel:
        """:meth:`from_checkpoint` of this family, given the file's contents and its model config."""
        raise NotImplementedError

    def export(self, checkpoint_path: Path, states: dict) -> None:
        """Writes, next to a checkpoint, what others load without orw_fast (rank 0; nothing by default)."""

    def generate(
        self,
        module,
        x0: torch.Tensor,
        prompts=None,
        *,
        steps: int = 100,
        method: str = "euler",
        grid: str | None = None,
        cuda_graph="auto",
        autocast=None,
    ) -> torch.Tensor:
        """Samples x1 of ``module`` from the noise x0 [B, *sample_shape()] for ``prompts`` (B of them, or None),
        following :meth:`guided_velocity` on :meth:`times` of ``steps`` steps and ``grid`` (no grad)."""
        from orw_fast.sampling import sample

        times = self.times(steps, grid)
        return sample(
            self.rollout_field(module),
            x0,
            steps=steps if times is None else None,
            times=times,
            cond=self.conditions(prompts),
            method=method,
            cuda_graph=cuda_graph,
            autocast=autocast,
        )

    def rollout_field(self, module) -> torch.nn.Module:
        """A stable module ``field(t, x, *cond)`` = guided velocity of ``module``: the sampler caches its CUDA graph
        per field, and the field's tensors are ``module``'s."""
        fields = self.__dict__.setdefault("_fields", weakref.WeakKeyDictionary())
        if module not in fields:
            fields[module] = _Field(self, module)
        return fields[module]


class _Field(torch.nn.Module):
    def __init__(self, flow: FlowModel, module: torch.nn.Module):
        super().__init__()
        self.flow = weakref.proxy(flow)
        self.module = module

    def forward(self, t, x, *cond):
        return self.flow.guided_velocity(self.module, t, x, *cond)


def infer_image_shape(model) -> tuple[int, ...] | None:
    """[C, H, W] of a torchcfm UNet (it stores in_channels and image_size), else None."""
    channels, size = getattr(model, "in_channels", None), getattr(model, "image_size", None)
    return (int(channels), int(size), int(size)) if channels and size else None


class PixelFlowModel(FlowModel):
    """A flow field ``model(t, x)`` on samples of ``image_shape`` (inferred from torchcfm UNets), trained fully
    (four copies: policy, reference, last policy, EMA). With ``num_classes`` the model is class-conditional,
    ``model(t, x, y)``, and the batch's "prompts" are its class labels, drawn uniformly."""

    family = "pixel"

    def __init__(
        self, model: torch.nn.Module, image_shape=None, *, channels_last: bool = False, num_classes: int | None = None
    ):
        if isinstance(model, torch.nn.DataParallel):  # the official code's parallel=True model
            model = model.module
        self.model, self.channels_last, self.num_classes = model, channels_last, num_classes
        self.image_shape = tuple(image_shape) if image_shape else infer_image_shape(model)
        if self.image_shape is None:
            raise ConfigError(
                "image_shape",
                f"the shape [C, H, W] of one sample (it cannot be inferred from a {type(model).__name__})",
                None,
            )
        if num_classes is not None:
            from orw_fast.prompts import ClassLabels

            self.prompts = ClassLabels(num_classes)

    def default_device(self):
        return next(self.model.parameters()).device

    def prepare(self, device, *, ema: bool) -> None:
        from orw_fast import distributed as dist_utils

        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        self.model = self.model.to(device, memory_format=memory_format)
        self._check_sample_shape(device)
        dist_utils.broadcast_module(self.model)  # every rank (and every copy) starts from rank 0's weights
        self.weights = FullCopies(self.model, ema=ema)

    def _check_sample_shape(self, device) -> None:
        """One no-grad forward (eval mode) on one sample of zeros: ``image_shape`` must be a shape the model takes
        and returns, found here rather than at the first step."""
        x = torch.zeros((1, *self.image_shape), device=device)
        cond = self.conditions(self.prompts.first(1)) if self.prompts is not None else ()
        training = self.model.training
        try:
            with torch.no_grad():
                out = self.velocity(self.model.eval(), torch.zeros(1, device=device), x, *cond)
        except Exception as err:  # noqa: BLE001 - whatever the model raises, the shape is the cause to report
            raise ConfigError(
                "image_shape",
                f"a sample shape the model takes (model(t, x) with x of shape "
                f"{list(x.shape)} raised {type(err).__name__}: {err})",
                self.image_shape,
            ) from None
        finally:
            self.model.train(training)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(
                "image_shape",
                f"a sample shape the model maps to itself (x of shape {list(x.shape)} gave {got})",
                self.image_shape,
            )

    def sample_shape(self):
        return self.image_shape

    def conditions(self, prompts) -> tuple:
        if self.num_classes is None:
            return ()
        return (torch.as_tensor(prompts, dtype=torch.long, device=next(self.model.parameters()).device),)

    def velocity(self, module, t, x, *cond):
        return module(t, x, *cond)

    def describe(self):
        """``{"family": "pixel", **the UNet's config}`` for a model of :mod:`orw_fast.models`, else None."""
        config = getattr(self.model, "orw_fast_model_config", None)
        return None if config is None else {"family": self.family, **config}

    @classmethod
    def _from_checkpoint(cls, path, ckpt, config, *, device="cpu", **unknown):
        """The unconditional model of ``path`` (:func:`orw_fast.pretrain.load_flow_model`: the EMA weights where
        the checkpoint keeps them, else the policy) on ``device``, in eval mode. ``unknown`` options (a
        diffusers model's ``pipeline``, ``prompts``, ``dtype``) are refused with a ModelArgumentError naming one."""
        from orw_fast.pretrain import load_flow_model

        if unknown:
            name = next(iter(unknown))
            raise ModelArgumentError(
                name,
                f"{name} is not an option of a pixel model's checkpoint ({str(path)!r} "
                "is not of a text-to-image model)",
            )
        model, _ = load_flow_model(path, checkpoint=ckpt)
        flow = cls(model)
        flow.prepare(torch.device(device), ema=False)
        flow.model.eval()
        return flow
