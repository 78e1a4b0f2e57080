"""Image folders: every .png/.jpg/.jpeg/.bmp file under a directory, decoded with Pillow or NVIDIA DALI.

Files are taken recursively in sorted order of their path below the root. When every image lies in a
subfolder, the immediate subfolder names are the classes (label = index in their sorted list, as in
torchvision's ImageFolder); otherwise there are no labels.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
BACKENDS = ("auto", "pillow", "dali")
_GRAY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
_DALI_BATCH = 256


def list_image_files(root: str | Path) -> tuple[list[Path], list[str] | None]:
    """(image files under ``root``, sorted; class names when every file lies in a subfolder, else None)."""
    root = Path(root)
    files = sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
        key=lambda p: p.relative_to(root).parts,
    )
    if not files:
        raise ValueError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {root}")
    parts = [p.relative_to(root).parts for p in files]
    classes = sorted({r[0] for r in parts}) if all(len(r) > 1 for r in parts) else None
    return files, classes


def dali_available() -> bool:
    """Whether NVIDIA DALI is installed (checked without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no "nvidia" namespace package at all
        return False


def _check_image_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(image_size) if isinstance(image_size, (list, tuple)) else ()
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"image_size must be None, a positive int or (height, width), got {image_size!r}")
    return size


def _pil_errors() -> tuple:
    """What Pillow raises for a file it cannot or will not decode (a decompression bomb is not an OSError)."""
    from PIL import Image

    return (OSError, Image.DecompressionBombError, ValueError)


def _infer_channels(files: list[Path]) -> int:
    """1 when every image is grayscale (by its header), else 3."""
    from PIL import Image

    for f in files:
        try:
            with Image.open(f) as im:
                if im.mode not in _GRAY_MODES:
                    return 3
        except _pil_errors() as e:
            raise ValueError(f"cannot read image {f}: {e}") from None
    return 1


def _stack(arrays: list[np.ndarray], files: list[Path], layout: str) -> np.ndarray:
    """np.stack of same-shape HWC or CHW (``layout``) arrays; a ValueError naming two files otherwise."""
    for f, a in zip(files, arrays):
        if a.shape != arrays[0].shape:
            hw = (lambda s: f"{s[0]}x{s[1]}") if layout == "HWC" else (lambda s: f"{s[1]}x{s[2]}")
            raise ValueError(
                f"images have different sizes ({files[0]}: {hw(arrays[0].shape)}, {f}: {hw(a.shape)}); "
                "pass image_size= to resize them to one size"
            )
    return np.stack(arrays)


def _decode_pillow(files: list[Path], channels: int, size: tuple[int, int] | None) -> torch.Tensor:
    """[N, C, H, W] float32 in [-1, 1]: EXIF orientation applied, 16-bit images rounded to 8 bits
    (x / 257, as DALI does), converted to L or RGB, then resized bilinearly (antialiased)."""
    from PIL import Image, ImageOps

    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = ImageOps.exif_transpose(im)
                if im.mode.startswith("I;16"):
                    im = Image.fromarray(np.rint(np.asarray(im, dtype=np.float32) / 257).astype(np.uint8))
                im = im.convert("L" if channels == 1 else "RGB")
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                arrays.append(np.asarray(im).reshape(im.height, im.width, channels))
        except _pil_errors() as e:
            raise ValueError(f"cannot decode image {f}: {e}") from None
    images = torch.from_numpy(_stack(arrays, files, "HWC")).permute(0, 3, 1, 2)
    return images.to(torch.float32).div_(127.5).sub_(1.0).contiguous()


def _pillow_decodes(file: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(file) as im:
            im.load()
    except _pil_errors():
        return False
    return True


def _decode_dali(files: list[Path], channels: int, size: tuple[int, int] | None) -> torch.Tensor:
    """[N, C, H, W] float32 in [-1, 1] (on the CPU) from a DALI pipeline: fn.readers.file, then
    fn.decoders.image ("mixed", i.e. GPU decoding, when CUDA is available, else "cpu"), fn.resize
    (linear, antialiased) and fn.crop_mirror_normalize to CHW."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = torch.cuda.is_available()

    @pipeline_def(
        batch_size=min(len(files), _DALI_BATCH),
        num_threads=min(4, os.cpu_count() or 1),
        device_id=torch.cuda.current_device() if gpu else None,
    )
    def pipeline():
        data, _ = fn.readers.file(files=[str(f) for f in files])
        images = fn.decoders.image(
            data, device="mixed" if gpu else "cpu", output_type=types.GRAY if channels == 1 else types.RGB
        )
        if size is not None:
            images = fn.resize(images, size=list(size), interp_type=types.INTERP_LINEAR, antialias=True)
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=127.5, std=127.5)

    arrays: list[np.ndarray] = []
    try:
        pipe = pipeline()
        pipe.build()
        while len(arrays) < len(files):  # the reader wraps around after the last file: extra samples are cut
            (batch,) = pipe.run()
            batch = batch.as_cpu() if gpu else batch
            arrays.extend(np.array(batch[i]) for i in range(len(batch)))
    except RuntimeError as e:  # DALI's message does not name the file: find it with Pillow
        culprit = next((f for f in files if not _pillow_decodes(f)), "one of the images")
        raise ValueError(f"DALI could not decode {culprit}: {e}") from None
    return torch.from_numpy(_stack(arrays[: len(files)], files, "CHW"))


def load_folder_dataset(
    path: str | Path,
    *,
    image_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every image under a folder (see the module docstring for order and labels).

    Args:
        path: the root folder.
        image_size: resize every image to (size, size) or (height, width), bilinear with antialiasing;
            None keeps the files' size, which must then be the same for all.
        channels: 1 (grayscale) or 3 (RGB); None: 1 when every file is grayscale, else 3.
        backend: "pillow", "dali" (NVIDIA DALI; GPU decoding when CUDA is available) or "auto" (DALI
            when installed, else Pillow). Both give the same pixels up to decoder rounding (1/127.5)
            without resizing; their resize filters differ slightly.

    Returns:
        (images [N, C, H, W] float32 in [-1, 1] on the CPU, labels [N] int64 or None).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not (channels is None or (type(channels) is int and channels in (1, 3))):
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
    size = _check_image_size(image_size)
    if backend == "auto":
        backend = "dali" if dali_available() else "pillow"
    elif backend == "dali" and not dali_available():
        raise ValueError(
            "backend='dali' needs NVIDIA DALI, which is not installed: pip install nvidia-dali-cuda130 "
            "(or backend='pillow')"
        )
    files, classes = list_image_files(root)
    channels = _infer_channels(files) if channels is None else channels
    decode = _decode_dali if backend == "dali" else _decode_pillow
    images = decode(files, channels, size)
    if classes is None:
        return images, None
    index = {name: i for i, name in enumerate(classes)}
    return images, torch.tensor([index[f.relative_to(root).parts[0]] for f in files], dtype=torch.int64)
