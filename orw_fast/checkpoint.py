"""Checkpoint files: atomic writes, and reading torchcfm's and orw_fast's formats."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from orw_fast.distributed import load_full_state_dict

ORW_FORMAT = "orw_fast.checkpoint"
ORW_VERSION = 2  # 2: "rng" holds one entry per rank (1: one process's dict)


def _write_atomic(path, write) -> Path:
    """Calls ``write(binary_file)`` so that ``path`` is either the old file or the complete new one:
    a temporary file in the same folder, flushed and fsynced, then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)
    return path


def save_atomic(obj, path) -> Path:
    """torch.save ``obj`` to ``path`` atomically."""
    return _write_atomic(path, lambda f: torch.save(obj, f))


def write_text_atomic(path, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    return _write_atomic(path, lambda f: f.write(text.encode()))


def load_file(path, map_location="cpu") -> dict:
    """Reads a checkpoint dict, with errors that say what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated, not a torch file, ...
        raise ValueError(f"checkpoint {str(path)!r} cannot be read ({type(err).__name__}: {err}); "
                         "is it complete and written by torch.save?") from err
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, expected a dict")
    return obj


def _strip_module_prefix(state: dict) -> dict:
    """DataParallel / DDP checkpoints prefix every key with 'module.'."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def model_state_from(ckpt: dict, path, weights: str = "ema") -> dict:
    """The model state dict in a checkpoint dict: orw_fast's (``weights``: "policy", "ema", "reference",
    "last_policy"; "ema" falls back to the policy when no EMA was kept), torchcfm's
    ``{net_model, ema_model, optim, sched, step}`` (``weights``: "ema" or "net"), or a bare state dict."""
    if ckpt.get("format") == ORW_FORMAT:
        key = {"net": "policy", "ema": "ema"}.get(weights, weights)
        if key == "ema" and ckpt.get("ema") is None:
            key = "policy"
        if key not in ("policy", "ema", "reference", "last_policy"):
            raise ValueError(f"weights must be one of 'policy', 'ema', 'reference', 'last_policy', got {weights!r}")
        return ckpt[key]
    if "net_model" in ckpt or "ema_model" in ckpt:
        key = {"ema": "ema_model", "net": "net_model"}.get(weights)
        if key is None:
            raise ValueError(f"weights must be 'ema' or 'net' for a torchcfm checkpoint, got {weights!r}")
        if key not in ckpt:
            raise ValueError(f"torchcfm checkpoint {str(path)!r} has no {key!r} (keys: {sorted(ckpt)})")
        return _strip_module_prefix(ckpt[key])
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return _strip_module_prefix(ckpt)
    raise ValueError(f"{str(path)!r} is neither an orw_fast nor a torchcfm checkpoint (keys: {sorted(ckpt)[:8]})")


def load_model_weights(model: torch.nn.Module, path, weights: str = "ema") -> None:
    """Loads weights from any supported checkpoint into ``model``, in place (tensors are copied, so
    CUDA graphs captured on the model stay valid; an FSDP2 model keeps its shard). A shape or key mismatch
    raises ValueError."""
    state = model_state_from(load_file(path), path, weights)
    try:
        load_full_state_dict(model, state)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {str(path)!r} does not match the model: {err}") from err
