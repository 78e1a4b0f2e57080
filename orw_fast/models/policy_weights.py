"""The policy's weights and the frozen weights ORW-CFM-W2 needs beside them: the reference (the W2 anchor), the
last policy (the rollouts of an epoch) and an optional EMA. Two kinds behind one interface:

- :class:`FullCopies`: each is a whole copy of the model (small models, full fine-tuning);
- :class:`LoraAdapter`: one model carrying a peft LoRA adapter, the only thing that trains. The reference is the
  base model with the adapter disabled; the last policy and the EMA are copies of the adapter's tensors, swapped
  in for rollouts: one copy of the base weights in memory, not three.

Both keep tensors in place (weights are copied into them, never replaced), so a CUDA graph captured on the model
stays valid. ``distribute`` makes them multi-process: DDP around the training forward, or FSDP2 shards
(``fully_shard``) of every copy. States for checkpoints are full (unsharded) tensors, keyed by parameter name.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from orw_fast import distributed as dist_utils

_NO_EMA = "these policy weights keep no EMA (made with ema=False)"


def _frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).eval().requires_grad_(False)


@torch.no_grad()
def _copy_all(dst: list, src: list) -> None:
    """dst[i].copy_(src[i]) for all i: one fused kernel for plain tensors, one by one for FSDP2's DTensors."""
    if dst and hasattr(dst[0], "full_tensor"):
        for d, s in zip(dst, src):
            d.copy_(s)
    else:
        torch._foreach_copy_(dst, src)


class PolicyWeights:
    """The interface. ``module`` is the policy (unwrapped, what checkpoints and exports see), ``forward`` what the
    training forward calls (the module, its DDP wrapper, or a compiled one)."""

    module: torch.nn.Module
    forward: torch.nn.Module

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def reference(self):
        """Context manager yielding the module that computes the reference's prediction (call it without grad)."""
        raise NotImplementedError

    def last_policy(self):
        """Context manager yielding the module that computes the last policy's prediction (no grad)."""
        raise NotImplementedError

    def ema(self):
        """Context manager yielding the module that computes the EMA's prediction (no grad); RuntimeError when the
        weights keep no EMA."""
        raise NotImplementedError

    def refresh_last_policy(self) -> None:
        raise NotImplementedError

    def update_ema(self, decay: float) -> None:
        raise NotImplementedError

    def states(self) -> dict:
        """{"policy", "last_policy", "reference", "ema"} -> full state dict (or None); collective under FSDP2."""
        raise NotImplementedError

    def check_states(self, ckpt: dict, where: str) -> None:
        """Raises ValueError naming ``where`` and the entry unless ``ckpt``'s states fit (nothing is changed)."""
        raise NotImplementedError

    def load_states(self, ckpt: dict) -> None:
        """Loads states checked by :meth:`check_states` (an absent EMA starts from the policy)."""
        raise NotImplementedError

    def distribute(self, world_size: int, fsdp: bool, device: torch.device) -> None:
        raise NotImplementedError


class FullCopies(PolicyWeights):
    """Policy, reference, last policy and EMA as four copies of ``module`` (the copies frozen, in eval mode)."""

    def __init__(self, module: torch.nn.Module, *, ema: bool):
        self.module = self.forward = module
        self.reference_module = _frozen_copy(module)
        self.last_policy_module = _frozen_copy(module)
        self.ema_module = _frozen_copy(module) if ema else None

    def _named(self) -> dict:
        return {
            "policy": self.module,
            "last_policy": self.last_policy_module,
            "reference": self.reference_module,
            "ema": self.ema_module,
        }

    def trainable_parameters(self):
        return list(self.module.parameters())

    @contextlib.contextmanager
    def reference(self):
        yield self.reference_module

    @contextlib.contextmanager
    def last_policy(self):
        yield self.last_policy_module

    @contextlib.contextmanager
    def ema(self):
        if self.ema_module is None:
            raise RuntimeError(_NO_EMA)
        yield self.ema_module

    def refresh_last_policy(self) -> None:
        self.last_policy_module.load_state_dict(self.module.state_dict())

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        if self.ema_module is not None:
            for module in (self.ema_module, self.module):  # shard with shard under FSDP2, even after a no-grad forward
                dist_utils.reshard(module)
            for e, p in zip(self.ema_module.parameters(), self.module.parameters()):
                e.lerp_(p.detach(), 1 - decay)

    def states(self) -> dict:
        return {key: None if m is None else dist_utils.full_state_dict(m) for key, m in self._named().items()}

    def check_states(self, ckpt: dict, where: str) -> None:
        from orw_fast.checkpoint import check_state_matches

        for key, module in self._named().items():
            if key not in ckpt:
                raise ValueError(f"{where} has no entry {key!r}; nothing was loaded")
            if module is not None and (key != "ema" or ckpt["ema"] is not None):
                check_state_matches(module, ckpt[key], f"{where}, entry {key!r}")

    def load_states(self, ckpt: dict) -> None:
        for key, module in self._named().items():
            if module is not None:
                source = key if key != "ema" or ckpt["ema"] is not None else "policy"
                dist_utils.load_full_state_dict(module, ckpt[source])

    def load_pretrained(self, policy: dict, reference: dict) -> None:
        """Pre-trained weights (checked state dicts) into the policy, its last-policy and EMA copies, and the
        reference."""
        for module in (self.module, self.last_policy_module, self.ema_module):
            if module is not None:
                dist_utils.load_full_state_dict(module, policy)
        dist_utils.load_full_state_dict(self.reference_module, reference)

    def distribute(self, world_size: int, fsdp: bool, device: torch.device) -> None:
        if world_size == 1:
            return
        if fsdp:
            from torch.distributed.fsdp import fully_shard

            for module in self._named().values():
                if module is not None:
                    fully_shard(module)
            return
        from torch.nn.parallel import DistributedDataParallel

        self.forward = DistributedDataParallel(self.module, device_ids=[device] if device.type == "cuda" else None)


class LoraAdapter(PolicyWeights):
    """``module`` carries one peft LoRA adapter (e.g. added with diffusers' ``add_adapter``); its parameters that
    require grad (the adapter's, made float32 here) are the trainable ones. The reference is ``module`` with its
    adapters disabled; the last policy and the EMA are tensor copies of the adapter, swapped in for rollouts."""

    def __init__(self, module: torch.nn.Module, *, ema: bool):
        self.module = self.forward = module
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError("the model has no trainable (LoRA) parameters: add an adapter first")
        params = dict(module.named_parameters())
        self.params = [params[n] for n in self.names]
        with torch.no_grad():
            for p in self.params:  # adapters train in float32 whatever the base model's dtype
                p.data = p.data.float()
        self._last = [p.detach().clone() for p in self.params]
        self._ema = [p.detach().clone() for p in self.params] if ema else None
        self._scratch = [torch.empty_like(p) for p in self.params]

    def trainable_parameters(self):
        return list(self.params)

    @contextlib.contextmanager
    def reference(self):
        self.module.disable_adapters()
        try:
            yield self.module
        finally:
            self.module.enable_adapters()

    @contextlib.contextmanager
    def _swapped(self, tensors):
        _copy_all(self._scratch, self.params)
        _copy_all(self.params, tensors)
        try:
            yield self.module
        finally:
            _copy_all(self.params, self._scratch)

    def last_policy(self):
        return self._swapped(self._last)

    def ema(self):
        if self._ema is None:
            raise RuntimeError(_NO_EMA)
        return self._swapped(self._ema)

    def refresh_last_policy(self) -> None:
        _copy_all(self._last, self.params)

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        for e, p in zip(self._ema or (), self.params):
            e.lerp_(p.detach(), 1 - decay)

    def _full(self, tensors) -> dict:
        return {n: dist_utils.full_tensor(t).detach().cpu() for n, t in zip(self.names, tensors)}

    def states(self) -> dict:
        return {
            "policy": self._full(self.params),
            "last_policy": self._full(self._last),
            "reference": None,
            "ema": None if self._ema is None else self._full(self._ema),
        }

    def check_states(self, ckpt: dict, where: str) -> None:
        for key in ("policy", "last_policy", "ema"):
            if key not in ckpt:
                raise ValueError(f"{where} has no entry {key!r}; nothing was loaded")
            state = ckpt[key]
            if key == "ema" and state is None:
                continue
            if not isinstance(state, dict):
                raise ValueError(
                    f"{where}, entry {key!r} is a {type(state).__name__}, not LoRA weights; nothing was loaded"
                )
            if set(state) != set(self.names) or any(
                tuple(state[n].shape) != tuple(p.shape) for n, p in zip(self.names, self.params)
            ):
                raise ValueError(
                    f"{where}, entry {key!r} holds other LoRA weights than this model's adapter "
                    f"({len(state)} tensors, this adapter {len(self.names)}: another rank or target "
                    "modules?); nothing was loaded"
                )

    def load_states(self, ckpt: dict) -> None:
        with torch.no_grad():
            for key, tensors in (("policy", self.params), ("last_policy", self._last), ("ema", self._ema)):
                if tensors is not None:
                    state = ckpt[key] if key != "ema" or ckpt["ema"] is not None else ckpt["policy"]
                    for n, t in zip(self.names, tensors):
                        dist_utils.copy_full_into(t, state[n])

    def distribute(self, world_size: int, fsdp: bool, device: torch.device) -> None:
        if world_size == 1:
            return
        if fsdp:
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.module)  # parameters become DTensors in place: re-collect them and their copies
            params = dict(self.module.named_parameters())
            self.params = [params[n] for n in self.names]
            self._last = [p.detach().clone() for p in self.params]
            self._ema = None if self._ema is None else [p.detach().clone() for p in self.params]
            self._scratch = [torch.empty_like(p) for p in self.params]
            return
        from torch.nn.parallel import DistributedDataParallel

        self.forward = DistributedDataParallel(self.module, device_ids=[device] if device.type == "cuda" else None)
