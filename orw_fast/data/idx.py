"""MNIST-style IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, optionally gzipped).

Format: 2 zero bytes, a type byte, the number of dimensions n, n big-endian uint32 sizes, then the
values in big-endian C order. Types: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
0x0E float64.
"""

from __future__ import annotations

import gzip
import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file (gzipped or not, detected from its first bytes), in native
    byte order with the file's dtype and shape.

    Raises ValueError naming the file when it is not IDX, is truncated, has trailing bytes or is a
    corrupt gzip stream; FileNotFoundError when it does not exist.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt gzip stream ({e})") from None
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need at least 4)")
    zero0, zero1, code, ndim = raw[:4]
    if zero0 != 0 or zero1 != 0:
        raise ValueError(f"{path}: not an IDX file (magic number {raw[:4].hex()} does not start with 0000)")
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02X} (expected one of {known})")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions need {header})")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_DTYPES[code])
    expected = math.prod(shape) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        what = "truncated" if found < expected else "trailing bytes after the data"
        raise ValueError(
            f"{path}: {what}: shape {list(shape)} of {dtype.name} needs {expected} data bytes, found {found}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def labels_path_for(images_path: str | Path) -> Path | None:
    """The labels file next to an images file by MNIST naming (``*-images-idx3-ubyte[.gz]`` ->
    ``*-labels-idx1-ubyte[.gz]``, uncompressed preferred), or None when there is none."""
    images_path = Path(images_path)
    stem = images_path.name.removesuffix(".gz")
    if "images" not in stem or "idx3" not in stem:
        return None
    name = stem.replace("images", "labels").replace("idx3", "idx1")
    for candidate in (images_path.with_name(name), images_path.with_name(name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def find_images_file(directory: str | Path, split: str = "train") -> Path:
    """The ``[prefix-]{split}-images[-.]idx3-ubyte[.gz]`` file under ``directory`` (searched
    recursively, e.g. torchvision's ``MNIST/raw``); an uncompressed file wins over its ``.gz``."""
    directory = Path(directory)
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string such as 'train' or 't10k', got {split!r}")
    pattern = re.compile(rf"(?:.+-)?{re.escape(split)}-images[-.]idx3-ubyte(?:\.gz)?")
    found = sorted(p for p in directory.rglob("*") if pattern.fullmatch(p.name) and p.is_file())
    found = [p for p in found if not (p.suffix == ".gz" and p.with_suffix("") in found)]
    if not found:
        raise FileNotFoundError(f"no {split}-images-idx3-ubyte[.gz] file under {directory}")
    if len(found) > 1:
        listing = ", ".join(str(p) for p in found)
        raise ValueError(f"several {split} images files under {directory} ({listing}); pass one file's path")
    return found[0]


def load_idx_dataset(path: str | Path, *, split: str = "train") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (and labels) from IDX files.

    Args:
        path: an images file ([N, H, W] uint8, e.g. ``train-images-idx3-ubyte[.gz]``) or a directory
            holding one for ``split`` (see :func:`find_images_file`).
        split: the file name's split when ``path`` is a directory: "train" (default) or "t10k" for MNIST.

    Returns:
        (images [N, 1, H, W] float32 in [-1, 1] (x / 255 * 2 - 1), labels [N] int64 from the
        ``*-labels-idx1-ubyte[.gz]`` file next to the images file, or None when there is none).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"IDX path {path} does not exist")
    images_path = find_images_file(path, split) if path.is_dir() else path
    array = read_idx(images_path)
    if array.ndim != 3 or array.dtype != np.uint8:
        raise ValueError(
            f"{images_path}: an images IDX file must hold uint8 [N, H, W], got {array.dtype.name} {list(array.shape)}"
        )
    if 0 in array.shape:
        raise ValueError(
            f"{images_path}: holds {array.shape[0]} image(s) of {array.shape[1]}x{array.shape[2]} pixels; "
            "a dataset needs at least one image of at least 1x1"
        )
    images = torch.from_numpy(array).to(torch.float32).div_(127.5).sub_(1.0).unsqueeze_(1)
    labels_path = labels_path_for(images_path)
    if labels_path is None:
        return images, None
    labels = read_idx(labels_path)
    if labels.ndim != 1 or labels.shape[0] != array.shape[0] or labels.dtype.kind not in "iu":
        raise ValueError(
            f"{labels_path}: labels must be integers of shape [{array.shape[0]}] to match {images_path.name}, "
            f"got {labels.dtype.name} {list(labels.shape)}"
        )
    return images, torch.from_numpy(labels.astype(np.int64))
