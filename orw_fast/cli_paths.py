"""Output locations of the command line (and of the tasks' reports): checked before long work starts, so that a
bad one fails at once; each error is a ValueError naming the flag or setting it came from (e.g. "--out")."""

from __future__ import annotations

import os
from pathlib import Path


def check_output_dir(path, name: str) -> Path:
    """Checks, creating nothing, that the folder ``path`` exists or can be created and written in."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is an existing file, not a folder; give a folder")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{name} {str(path)!r}: the folder cannot be created ({str(existing)!r} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"{name} {str(path)!r}: the folder is not writable"
            if existing == path
            else f"{name} {str(path)!r}: the folder cannot be created ({str(existing)!r} is not writable)"
        )
    return path


def prepare_output_dir(path, name: str) -> Path:
    """Creates the folder ``path`` (with its parents) if needed, once :func:`check_output_dir` passes."""
    path = check_output_dir(path, name)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{name} {str(path)!r}: the folder cannot be created ({err.strerror or err})") from None
    return path


def prepare_output_file(path, name: str) -> Path:
    """Checks that the file ``path`` can be written (its folder is created if needed)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a folder; give a file name such as {str(path / 'samples.png')!r}")
    prepare_output_dir(path.parent, f"the folder of {name}")
    return path
