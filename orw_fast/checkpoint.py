"""Checkpoint files: atomic writes, integrity-checked reads of torchcfm's and orw_fast's formats, and the schema of
a training checkpoint (what it holds, and the checks that make every load all-or-nothing: validate everything against
the live objects, then apply)."""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import secrets
import socket
import zipfile
from pathlib import Path

import numpy as np
import torch

from orw_fast import distributed as dist_utils
from orw_fast.rollouts import RolloutPool

ORW_FORMAT = "orw_fast.checkpoint"
ORW_VERSION = 2  # 2: "rng" holds one entry per rank (1: one process's dict)
_TMP_SUFFIX = ".tmp"


# -- writing ----------------------------------------------------------------------------------------


def _tmp_name(path: Path) -> Path:
    """``.NAME.HOST.PID.TOKEN.tmp`` next to ``path``: whose it is, so that stale ones can be told apart."""
    host = socket.gethostname().replace(".", "_")
    return path.with_name(f".{path.name}.{host}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(path) -> list[Path]:
    """Deletes the temporary files that writes of ``path`` killed mid-way left behind: those of this host whose
    writing process is gone (a live writer's file, or another host's, is never touched). Returns them."""
    path = Path(path)
    host = socket.gethostname().replace(".", "_")
    removed = []
    for tmp in path.parent.glob(f".{path.name}.{host}.*{_TMP_SUFFIX}"):
        pid = tmp.name[len(f".{path.name}.{host}.") :].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:  # another process cleaned it first
                pass
    return removed


def _write_atomic(path, write) -> Path:
    """Calls ``write(binary_file)`` so that ``path`` is either the old file or the complete new one: a temporary
    file in the same folder (created with the user's umask, like any file), flushed and fsynced, then renamed
    over ``path``. Temporaries left by earlier writes that were killed are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _tmp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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
    except OSError as err:  # some file systems cannot fsync a directory
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(dir_fd)
    return path


def save_atomic(obj, path) -> Path:
    """torch.save ``obj`` to ``path`` atomically (the zip records carry CRC-32s that :func:`load_file` checks)."""
    return _write_atomic(path, lambda f: torch.save(obj, f))


def write_text_atomic(path, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    return _write_atomic(path, lambda f: f.write(text.encode()))


def write_bytes_atomic(path, write) -> Path:
    """``write(binary_file)`` into ``path`` atomically (e.g. ``lambda f: image.save(f, format="PNG")``)."""
    return _write_atomic(path, write)


# -- reading ----------------------------------------------------------------------------------------


def verify_integrity(path) -> None:
    """Checks every record of a torch.save (zip) file against the CRC-32 stored with it, so that a flipped byte
    is an error instead of a silently changed weight. Files of torch's legacy (pre-zip) format carry no check
    and pass. Raises ValueError naming the file and the damaged record."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as err:
        raise ValueError(
            f"checkpoint {str(path)!r} is damaged ({type(err).__name__}: {err}); its zip structure cannot be read"
        ) from None
    if bad is not None:
        raise ValueError(
            f"checkpoint {str(path)!r} is damaged: record {bad!r} fails its CRC-32 check (the file "
            "changed after it was written); use another copy"
        )


def load_file(path, map_location="cpu") -> dict:
    """Reads a checkpoint dict after :func:`verify_integrity`, with errors that say what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    verify_integrity(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated, not a torch file, ...
        raise ValueError(
            f"checkpoint {str(path)!r} cannot be read ({type(err).__name__}: {err}); "
            "is it complete and written by torch.save?"
        ) from err
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, expected a dict")
    return obj


def _strip_module_prefix(state: dict) -> dict:
    """DataParallel / DDP checkpoints prefix every key with 'module.'."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def model_state_from(ckpt: dict, path, weights: str = "net") -> tuple[dict, str]:
    """(model state dict, its entry's name) in a checkpoint dict: orw_fast's (``weights``: "policy" or its alias
    "net", "ema" (the policy when no EMA was kept), "reference", "last_policy"), torchcfm's and the official
    code's ``{net_model, ema_model, ...}`` (``weights``: "net" or "ema"), or a bare state dict."""
    if ckpt.get("format") == ORW_FORMAT:
        key = {"net": "policy"}.get(weights, weights)
        if key == "ema" and ckpt.get("ema") is None:
            key = "policy"
        if key not in ("policy", "ema", "reference", "last_policy"):
            raise ValueError(f"weights must be one of 'policy', 'ema', 'reference', 'last_policy', got {weights!r}")
        return ckpt.get(key), key
    if "net_model" in ckpt or "ema_model" in ckpt:
        key = {"ema": "ema_model", "net": "net_model"}.get(weights)
        if key is None:
            raise ValueError(f"weights must be 'net' or 'ema' for a torchcfm checkpoint, got {weights!r}")
        if key not in ckpt:
            raise ValueError(f"torchcfm checkpoint {str(path)!r} has no {key!r} (keys: {sorted(ckpt)})")
        state = ckpt[key]
        return (_strip_module_prefix(state) if isinstance(state, dict) else state), key
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return _strip_module_prefix(ckpt), "state dict"
    raise ValueError(f"{str(path)!r} is neither an orw_fast nor a torchcfm checkpoint (keys: {sorted(ckpt)[:8]})")


# -- all-or-nothing: check against the live objects, then apply -------------------------------------------


def check_state_matches(module: torch.nn.Module, state, where: str) -> None:
    """Raises ValueError (naming ``where``, e.g. "checkpoint 'x.pt', entry 'policy'") unless ``state`` is a
    state dict with exactly ``module``'s keys and shapes (full shapes for an FSDP2 module), so that loading it
    cannot fail half-way."""
    if not isinstance(state, dict):
        raise ValueError(f"{where} is a {type(state).__name__}, not a state dict")
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [
        f"{k}: {list(state[k].shape)} instead of {list(own[k].shape)}"
        for k in own
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape
    ]
    not_tensors = sorted(k for k in own if k in state and not isinstance(state[k], torch.Tensor))
    problems = [
        f"{len(x)} {what} ({', '.join(map(str, x[:3]))}{', ...' if len(x) > 3 else ''})"
        for x, what in (
            (missing, "missing key(s)"),
            (unexpected, "unexpected key(s)"),
            (shapes, "shape mismatch(es)"),
            (not_tensors, "value(s) that are not tensors"),
        )
        if x
    ]
    if problems:
        raise ValueError(
            f"{where} does not match the model ({type(module).__name__}, {len(own)} tensors): "
            + "; ".join(problems)
            + "; nothing was loaded"
        )


def read_model_weights(model: torch.nn.Module, path, weights: str = "net") -> tuple[dict, str]:
    """(state dict, entry name) of ``weights`` in the checkpoint at ``path``, checked to fit ``model``."""
    state, key = model_state_from(load_file(path), path, weights)
    check_state_matches(model, state, f"checkpoint {str(path)!r}, entry {key!r}")
    return state, key


def _param_shapes(module: torch.nn.Module, optimizer: torch.optim.Optimizer, by_name: bool) -> list[list]:
    """Per parameter group, the (id or name, shape) of each parameter, as the optimizer's state dict keys them."""
    names = {id(p): n for n, p in module.named_parameters()}
    groups, index = [], 0
    for group in optimizer.param_groups:
        groups.append(
            [((names.get(id(p)) if by_name else index + k), tuple(p.shape)) for k, p in enumerate(group["params"])]
        )
        index += len(group["params"])
    return groups


def check_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state, where: str) -> None:
    """Raises ValueError unless ``state`` is an optimizer state dict for exactly ``optimizer``'s parameters:
    the same groups and parameter counts, and every per-parameter tensor of the parameter's shape (parameters
    keyed by index, or by name as FSDP2's full state dicts are)."""
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("state"), dict)
        or not isinstance(state.get("param_groups"), list)
    ):
        raise ValueError(f"{where} is not an optimizer state dict ({{'state': ..., 'param_groups': [...]}})")
    by_name = any(isinstance(p, str) for g in state["param_groups"] if isinstance(g, dict) for p in g.get("params", ()))
    groups = _param_shapes(module, optimizer, by_name)
    saved = [g.get("params") if isinstance(g, dict) else None for g in state["param_groups"]]
    if [len(g) if isinstance(g, list) else None for g in saved] != [len(g) for g in groups]:
        raise ValueError(
            f"{where} is for another model: parameter groups of "
            f"{[len(g) if isinstance(g, list) else g for g in saved]} parameters, this optimizer has "
            f"{[len(g) for g in groups]}; nothing was loaded"
        )
    shapes = dict(zip((key for g in saved for key in g), (shape for g in groups for _, shape in g)))
    if by_name and set(shapes) != {key for g in groups for key, _ in g}:
        raise ValueError(f"{where} names other parameters than this model's; nothing was loaded")
    for key, entry in state["state"].items():
        if key not in shapes or not isinstance(entry, dict):
            raise ValueError(f"{where} has state for an unknown parameter {key!r}; nothing was loaded")
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != shapes[key]:
                raise ValueError(
                    f"{where}: {name!r} of parameter {key!r} has shape {list(value.shape)}, the "
                    f"parameter {list(shapes[key])}: it is another model's optimizer state; nothing "
                    "was loaded"
                )


def check_scheduler_state(optimizer: torch.optim.Optimizer, state, where: str) -> None:
    """Raises ValueError unless ``state`` is an LR scheduler state dict for ``optimizer``'s groups."""
    groups = len(optimizer.param_groups)
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("last_epoch"), int)
        or not isinstance(state.get("base_lrs"), list)
        or len(state["base_lrs"]) != groups
    ):
        raise ValueError(
            f"{where} is not an LR scheduler state dict for {groups} parameter group(s) "
            "(needs an integer 'last_epoch' and 'base_lrs' per group); nothing was loaded"
        )


def check_scaler_state(scaler: torch.amp.GradScaler, state, where: str) -> None:
    """Raises ValueError unless ``state`` can be loaded into ``scaler`` (a disabled scaler loads anything)."""
    if not isinstance(state, dict):
        raise ValueError(f"{where} is a {type(state).__name__}, not a GradScaler state dict; nothing was loaded")
    if scaler.is_enabled() and not all(
        k in state for k in ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
    ):
        raise ValueError(f"{where} holds no fp16 loss scale (the run was not precision='fp16'); nothing was loaded")


def check_rng_state(state, device: torch.device, where: str) -> None:
    """Raises ValueError unless ``state`` (one rank's entry of a training checkpoint's "rng") can be restored:
    each random state is tried on a scratch generator of its kind."""
    if not isinstance(state, dict) or not {"generator", "torch", "numpy", "python"} <= set(state):
        raise ValueError(f"{where} is not a random state (needs generator, torch, numpy, python); nothing was loaded")
    trials = {
        "generator": lambda s: torch.Generator(device=device).set_state(s),
        "torch": lambda s: torch.Generator().set_state(s),
        "numpy": lambda s: np.random.RandomState().set_state(s),
        "python": lambda s: random.Random().setstate(s),
    }
    if state.get("host") is not None:
        trials["host"] = lambda s: torch.Generator().set_state(s)
    if state.get("cuda") is not None and torch.cuda.is_available():
        trials["cuda"] = lambda s: [torch.Generator(device=f"cuda:{i}").set_state(x) for i, x in enumerate(s)]
    for name, trial in trials.items():
        try:
            trial(state[name])
        except Exception as err:  # noqa: BLE001 - each kind raises its own error types
            raise ValueError(
                f"{where}: the {name!r} random state cannot be restored ({type(err).__name__}: {err}); "
                "nothing was loaded"
            ) from None


# -- the training checkpoint ------------------------------------------------------------------------------


def training_state(trainer) -> dict:
    """A training checkpoint of ``trainer`` (an ORWCFMTrainer): everything needed to continue exactly. "format",
    "version", the weights' states ("policy", "last_policy", "reference", "ema": full, unwrapped state dicts),
    "optimizer", "scheduler", "scaler", "step", "config" (a dict), "rng" (one entry per rank: the device and host
    generators', torch's, CUDA's, numpy's and Python's states) and "rollout_pools" (one per rank, or None).
    Collective: every rank calls it; every rank gets the whole state."""
    return {
        "format": ORW_FORMAT,
        "version": ORW_VERSION,
        **trainer.weights.states(),
        "optimizer": dist_utils.optimizer_state_dict(trainer.model, trainer.optimizer),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "step": trainer.step,
        "config": dataclasses.asdict(trainer.config),
        "rng": dist_utils.all_gather_object(
            {
                "generator": trainer.generator.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": np.random.get_state(),
                "python": random.getstate(),
                "host": trainer.host_generator.get_state(),
            }
        ),
        "rollout_pools": dist_utils.all_gather_object(None if trainer._pool is None else trainer._pool.state()),
    }


def check_training_checkpoint(trainer, ckpt: dict, where: str) -> list:
    """Raises ValueError naming ``where`` and the entry unless every entry of the training checkpoint ``ckpt`` fits
    ``trainer`` (its weights, optimizer, scheduler, scaler, fsdp and optimizer settings, and, when as many processes
    wrote it, this rank's random state and rollout pool); returns the per-rank random states."""
    if ckpt.get("format") != ORW_FORMAT:
        raise ValueError(f"{where} is not an orw_fast training checkpoint (use load_pretrained for weights)")

    def entry(key):
        if key not in ckpt:
            raise ValueError(f"{where} has no entry {key!r}; nothing was loaded")
        return ckpt[key]

    config = entry("config")
    if not isinstance(config, dict):
        raise ValueError(f"{where}, entry 'config' is a {type(config).__name__}, not a dict; nothing was loaded")
    if config.get("fsdp", False) != trainer.config.fsdp:
        raise ValueError(
            f"{where} was written with fsdp={not trainer.config.fsdp}; resume it with the same setting "
            "(load_pretrained reads its weights either way)"
        )
    if config.get("optimizer", "adam") != trainer.config.optimizer:  # (earlier checkpoints: Adam)
        raise ValueError(
            f"{where} was written with optimizer={config.get('optimizer', 'adam')!r}; resume it with the "
            "same setting; nothing was loaded"
        )
    trainer.weights.check_states(ckpt, where)
    check_optimizer_state(trainer.model, trainer.optimizer, entry("optimizer"), f"{where}, entry 'optimizer'")
    check_scheduler_state(trainer.optimizer, entry("scheduler"), f"{where}, entry 'scheduler'")
    check_scaler_state(trainer.scaler, entry("scaler"), f"{where}, entry 'scaler'")
    step = entry("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{where}, entry 'step' must be an integer >= 0, got {step!r}; nothing was loaded")
    ranks = entry("rng") if isinstance(entry("rng"), list) else [ckpt["rng"]]  # version 1: one process
    if len(ranks) == trainer.world_size:
        check_rng_state(ranks[trainer.rank], trainer.device, f"{where}, entry 'rng' of rank {trainer.rank}")
        pools = ckpt.get("rollout_pools")
        if pools is not None:
            if not isinstance(pools, list) or len(pools) != trainer.world_size:
                raise ValueError(
                    f"{where}, entry 'rollout_pools' must hold one pool (or None) per rank; nothing was loaded"
                )
            RolloutPool.check_state(
                pools[trainer.rank], trainer.image_shape, f"{where}, entry 'rollout_pools' of rank {trainer.rank}"
            )
    return ranks
