"""Datasets as whole tensors: images [N, C, H, W] float32 in [-1, 1] (model space), labels [N] int64 or None.

``load_dataset(spec)`` takes one of the specs of :data:`DATASETS`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from orw_fast.data.digits import load_digits_dataset
from orw_fast.data.folder import load_folder_dataset
from orw_fast.data.idx import load_idx_dataset, read_idx

DATASETS = """\
digits        scikit-learn's 8x8 handwritten digits: 1797 images [1, 8, 8] with labels 0..9 (no download)
idx:PATH      MNIST-style IDX files: PATH is an images file (train-images-idx3-ubyte[.gz]; labels from the
              *-labels-idx1-ubyte[.gz] file next to it) or a directory holding them (options: split="train")
folder:PATH   every .png/.jpg/.jpeg/.bmp under the folder PATH, labels from class subfolders
              (options: image_size=, channels=1|3, backend="auto"|"pillow"|"dali")"""


def load_dataset(spec: str, **kw) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images [N, C, H, W] float32 in [-1, 1], labels [N] int64 or None) for ``spec``: "digits",
    "idx:PATH" or "folder:PATH" (see :data:`DATASETS`); ``kw`` goes to the loader (e.g. image_size=).

    Raises TypeError for a non-string spec or options the loader does not take, ValueError for an
    unknown spec, FileNotFoundError for a missing PATH.
    """
    kind, path = check_dataset_spec(spec)
    if kind == "digits":
        if kw:
            raise TypeError(f"dataset 'digits' takes no options, got {sorted(kw)}")
        return load_digits_dataset()
    return _LOADERS[kind](path, **kw)


_LOADERS = {"idx": load_idx_dataset, "folder": load_folder_dataset}


def check_dataset_spec(spec: str) -> tuple[str, Path | None]:
    """(kind, path) of a :func:`load_dataset` spec, checked without loading anything (what a command checks before
    it creates its output folder): TypeError for a non-string, ValueError for an unknown spec or a missing path
    after the colon, FileNotFoundError for a PATH that does not exist."""
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a str such as 'digits', 'idx:PATH' or 'folder:PATH', got {type(spec).__name__}")
    kind, sep, path = spec.partition(":")
    if kind == "digits" and not sep:
        return kind, None
    if kind not in _LOADERS or not sep:
        raise ValueError(f"unknown dataset spec {spec!r}; expected one of:\n{DATASETS}")
    if not path:
        raise ValueError(f"dataset spec {spec!r} has no path after '{kind}:'")
    if not Path(path).expanduser().exists():
        raise FileNotFoundError(f"dataset spec {spec!r}: path {path!r} does not exist")
    return kind, Path(path).expanduser()


__all__ = [
    "DATASETS",
    "check_dataset_spec",
    "load_dataset",
    "load_digits_dataset",
    "load_folder_dataset",
    "load_idx_dataset",
    "read_idx",
]
