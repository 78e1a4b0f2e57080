"""Process-group helpers for multi-process fine-tuning (torchrun + DistributedDataParallel or FSDP2).

Everything here degrades to the single-process case: without an initialised process group of two or
more ranks, rank() is 0, world_size() is 1, the gathers return their input and on_all_ranks only runs its
body. Collectives (marked so) must be called by every rank in the same order.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os

import torch
import torch.distributed as dist


class PeerError(RuntimeError):
    """Raised on the ranks that did not fail when another rank failed inside :func:`on_all_ranks`, so that
    every rank stops with the failing rank's error instead of waiting for it in the next collective."""


def is_distributed() -> bool:
    """Whether a process group of two or more ranks is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the one that prints and writes files."""
    return rank() == 0


def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device) -> torch.device:
    """The device this process computes on, from a torch.device or a string ("cpu", "cuda", "cuda:N", "auto":
    CUDA when available, else the CPU). An index-less "cuda" under torchrun becomes this rank's GPU
    (cuda:LOCAL_RANK), which also becomes the current CUDA device (NCCL collectives run on it). Raises
    ValueError for a string that names no device, or a CUDA device this machine does not have."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r} was asked for but no CUDA device is available here (this torch "
                f"{'has no CUDA support' if torch.version.cuda is None else 'finds no GPU'}); use 'cpu'"
            )
        if device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        torch.cuda.set_device(device)
    return device


def init_from_env(device: torch.device) -> bool:
    """Initialises the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) when WORLD_SIZE > 1 and no group exists yet: NCCL for a CUDA ``device`` (bound to it),
    gloo otherwise, and registers :func:`shutdown` to run at interpreter exit (a script that never
    destroys the group it did not create must still exit cleanly). Returns :func:`is_distributed`. A
    group the caller initialised (with their own backend or timeout) is used as it is, and left to them."""
    if env_world_size() > 1:
        if not dist.is_available():
            raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        if dist.is_initialized():
            return is_distributed()
        device = torch.device(device)
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        atexit.register(shutdown)
    return is_distributed()


def shutdown(synchronize: bool = False) -> None:
    """Tears the default process group down while the interpreter is fully alive: first collects the garbage
    that may still hold it (FSDP2 modules sit in reference cycles, so they outlive their trainer until a
    collection, which could otherwise come during interpreter finalization), then, with ``synchronize``
    (collective, for the normal end of a run), waits at a barrier until every rank is done with its
    collectives, then destroys the group. Does nothing when no group exists; safe to call twice."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    if synchronize and is_distributed():
        dist.barrier()
    dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where tensors for the default group's collectives live: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Collective: the ranks' tensors (same shape on every rank) concatenated along dim 0 in rank order."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Collective: the mean over ranks of ``tensor`` (same shape on every rank)."""
    if not is_distributed():
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)  # SUM: gloo has no AVG
    return total / world_size()


def all_gather_object(obj) -> list:
    """Collective: the list of every rank's picklable ``obj``, in rank order."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Collective: copies rank ``src``'s parameters and buffers into ``module`` on every rank, in place."""
    if not is_distributed():
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src)


@contextlib.contextmanager
def on_all_ranks(what: str):
    """Collective: runs the body, then has every rank learn whether any rank raised in it. If one did,
    every rank raises: the failing ranks their own exception, the others :class:`PeerError` naming the
    failing ranks and their errors. ``what`` says what the body does ("scoring rewards"). One all_reduce
    of a flag when nothing failed."""
    if not is_distributed():
        yield
        return
    error = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - every error must reach the other ranks
        error = err
    failed = torch.tensor([error is not None], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(failed)
    if failed.item() == 0:
        return
    messages = all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    report = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)
    raise PeerError(f"stopping rank {rank()} because another rank failed while {what} ({report})")


# -- FSDP2 ----------------------------------------------------------------------------------------


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module`` was sharded with FSDP2's fully_shard."""
    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def reshard(module: torch.nn.Module) -> None:
    """Registers an FSDP2 module's sharded parameters again (a no-op otherwise): a root module keeps its whole,
    plain parameters after a forward that no backward follows (a frozen copy's), until its next reshard."""
    if is_sharded(module):
        module.reshard()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or for an FSDP2 DTensor (collective) the whole tensor it is a shard of."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


@torch.no_grad()
def copy_full_into(dst: torch.Tensor, full: torch.Tensor) -> None:
    """dst.copy_(full) for a whole tensor ``full``; a DTensor ``dst`` takes its own shard of it (no collective:
    every rank holds ``full``)."""
    if hasattr(dst, "full_tensor"):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(dst.device, dst.dtype), dst.device_mesh, dst.placements, src_data_rank=None)
    dst.copy_(full)


def _full_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state_dict(module: torch.nn.Module) -> dict:
    """``module.state_dict()``; for an FSDP2 module (collective) the full, unsharded state dict on the CPU,
    on rank 0 only (empty elsewhere)."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_full_options(cpu_offload=True))


def load_full_state_dict(module: torch.nn.Module, state: dict) -> None:
    """``module.load_state_dict(state)`` for a full state dict; an FSDP2 module (collective) keeps its shard."""
    if not is_sharded(module):
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state, options=_full_options())


def optimizer_state_dict(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()``; for an FSDP2 ``module`` (collective) the full one on rank 0, keyed by
    parameter name."""
    if not is_sharded(module):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_full_options(cpu_offload=True))


def load_optimizer_state_dict(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """The inverse of :func:`optimizer_state_dict`."""
    if not is_sharded(module):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=_full_options())
