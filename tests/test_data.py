"""Dataset loaders: sklearn digits, IDX files (plain and gzipped), image folders with Pillow and DALI."""

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from orw_fast.data import DATASETS, load_dataset, load_digits_dataset, load_folder_dataset, load_idx_dataset, read_idx
from orw_fast.data.folder import dali_available

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
PIXEL = 1 / 127.5  # one uint8 step in model space


def to_model_space(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.float32) / 127.5 - 1)


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_shape_and_range():
    images, labels = load_digits_dataset()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert images.min() == -1 and images.max() == 1
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert sorted(labels.unique().tolist()) == list(range(10))
    from sklearn.datasets import load_digits

    assert torch.equal(images[5, 0], torch.from_numpy(load_digits().images[5]).float() / 16 * 2 - 1)


# ---------------------------------------------------------------------------------------------
# IDX

_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, _CODES[array.dtype], array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path, array: np.ndarray):
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


@pytest.fixture
def mnist_like():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (5, 6, 7), dtype=np.uint8), rng.integers(0, 10, 5).astype(np.uint8)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, mnist_like, suffix):
    images, labels = mnist_like
    images_file = write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels)
    for path in (images_file, tmp_path):
        x, y = load_idx_dataset(path)
        assert x.shape == (5, 1, 6, 7) and x.dtype == torch.float32
        assert torch.equal(x[:, 0], to_model_space(images))
        assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
    x, y = load_dataset(f"idx:{tmp_path}")
    assert torch.equal(x[:, 0], to_model_space(images)) and y.tolist() == labels.tolist()


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_dtypes(tmp_path, dtype):
    array = (np.arange(24).reshape(2, 3, 4) * 37 - 300).astype(dtype)
    out = read_idx(write_idx(tmp_path / "a.idx", array))
    assert out.dtype == np.dtype(dtype).newbyteorder("=") and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)


def test_idx_directory_splits_and_missing_labels(tmp_path, mnist_like):
    images, labels = mnist_like
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte", images)
    write_idx(raw / "train-images-idx3-ubyte.gz", images)  # the uncompressed copy wins
    write_idx(raw / "t10k-images-idx3-ubyte.gz", images[:2])
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", labels[:2])
    x, y = load_idx_dataset(tmp_path)
    assert x.shape == (5, 1, 6, 7) and y is None  # no train labels file
    x, y = load_idx_dataset(tmp_path, split="t10k")
    assert x.shape == (2, 1, 6, 7) and y.tolist() == labels[:2].tolist()
    with pytest.raises(FileNotFoundError, match="valid-images"):
        load_idx_dataset(tmp_path, split="valid")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: b[:-1], "truncated: shape"),
        (lambda b: b + b"\0", "trailing bytes"),
        (lambda b: b[:6], "truncated IDX header"),
        (lambda b: b[:3], "truncated IDX header"),
        (lambda b: b"\x01" + b[1:], "not an IDX file"),
        (lambda b: b[:2] + b"\x07" + b[3:], "unknown IDX type code 0x07"),
        (lambda b: gzip.compress(b)[:-12], "corrupt gzip stream"),
    ],
)
def test_idx_corrupt_files(tmp_path, mnist_like, mutate, match):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(mutate(idx_bytes(mnist_like[0])))
    with pytest.raises(ValueError, match=match) as info:
        load_idx_dataset(path)
    assert str(path) in str(info.value)


def test_idx_bad_contents(tmp_path, mnist_like):
    images, labels = mnist_like
    path = write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels[:4])
    with pytest.raises(ValueError, match=r"labels must be integers of shape \[5\]"):
        load_idx_dataset(path)
    with pytest.raises(ValueError, match="must hold uint8 \\[N, H, W\\]"):
        load_idx_dataset(write_idx(tmp_path / "f.idx", images.astype(np.float32)))


@pytest.mark.parametrize("shape,match", [((0, 6, 7), "holds 0 image"), ((3, 0, 0), "of 0x0 pixels")])
def test_idx_without_pixels_is_refused(tmp_path, shape, match):
    """0 images (or 0x0 ones) loaded before, and pre-training crashed on them later."""
    path = write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros(shape, np.uint8))
    with pytest.raises(ValueError, match=match) as info:
        load_idx_dataset(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------
# image folders


def write_pngs(root, arrays, names):
    for array, name in zip(arrays, names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)


@pytest.fixture
def class_folder(tmp_path):
    """Grayscale 6x7 PNGs in class subfolders (one nested deeper, one upper-case extension)."""
    root, rng = tmp_path / "classes", np.random.default_rng(1)
    arrays = rng.integers(0, 256, (5, 6, 7), dtype=np.uint8)
    names = ["dog/b.png", "cat/z.png", "dog/a.PNG", "cat/sub/c.png", "bird/x.png"]
    write_pngs(root, arrays, names)
    (root / "cat" / "notes.txt").write_text("not an image")
    # sorted order: bird/x, cat/sub/c, cat/z, dog/a, dog/b; classes bird=0, cat=1, dog=2
    order = [4, 3, 1, 2, 0]
    return root, arrays[order], [0, 1, 1, 2, 2]


@pytest.fixture
def flat_rgb_folder(tmp_path):
    root, rng = tmp_path / "flat", np.random.default_rng(2)
    arrays = rng.integers(0, 256, (4, 5, 9, 3), dtype=np.uint8)
    write_pngs(root, arrays, [f"img{i}.png" for i in range(4)])
    return root, arrays


def test_folder_pillow_class_subfolders(class_folder):
    root, arrays, labels = class_folder
    x, y = load_folder_dataset(root, backend="pillow")
    assert x.shape == (5, 1, 6, 7) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], to_model_space(arrays))
    assert y.dtype == torch.int64 and y.tolist() == labels
    x3, _ = load_folder_dataset(root, channels=3, backend="pillow")
    assert x3.shape == (5, 3, 6, 7) and torch.equal(x3, x.expand(-1, 3, -1, -1))


def test_folder_pillow_flat_rgb(flat_rgb_folder):
    root, arrays = flat_rgb_folder
    x, y = load_dataset(f"folder:{root}", backend="pillow")
    assert y is None and x.shape == (4, 3, 5, 9)
    assert torch.equal(x, to_model_space(arrays).permute(0, 3, 1, 2))
    x, _ = load_folder_dataset(root, image_size=(4, 6), backend="pillow")
    assert x.shape == (4, 3, 4, 6) and x.min() >= -1 and x.max() <= 1


def test_folder_mixed_sizes_need_image_size(tmp_path):
    write_pngs(tmp_path, [np.zeros((4, 4), np.uint8), np.zeros((5, 4), np.uint8)], ["a.png", "b.png"])
    with pytest.raises(ValueError, match="different sizes.*image_size="):
        load_folder_dataset(tmp_path, backend="pillow")
    assert load_folder_dataset(tmp_path, image_size=3, backend="pillow")[0].shape == (2, 1, 3, 3)


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no .png"):
        load_folder_dataset(tmp_path)
    write_pngs(tmp_path, [np.zeros((4, 4), np.uint8)], ["a.png"])
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="bad.png"):
        load_folder_dataset(tmp_path, backend="pillow")
    with pytest.raises(ValueError, match="backend"):
        load_folder_dataset(tmp_path, backend="opencv")
    with pytest.raises(ValueError, match="channels"):
        load_folder_dataset(tmp_path, channels=2)
    with pytest.raises(ValueError, match="image_size"):
        load_folder_dataset(tmp_path, image_size=(0, 4))
    with pytest.raises(FileNotFoundError):
        load_folder_dataset(tmp_path / "missing")


def _png_claiming(path, width, height):
    """A valid 1x1 PNG whose header then claims width x height (the IHDR chunk's CRC kept valid)."""
    import io
    import zlib

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IHDR")
    data[start + 4 : start + 12] = struct.pack(">II", width, height)
    data[start + 17 : start + 21] = struct.pack(">I", zlib.crc32(bytes(data[start : start + 17])))
    path.write_bytes(bytes(data))


def test_a_decompression_bomb_is_refused_with_its_name(tmp_path):
    write_pngs(tmp_path, [np.zeros((4, 4), np.uint8)], ["a.png"])
    _png_claiming(tmp_path / "bomb.png", 200000, 200000)
    for channels in (None, 1):  # the header read (channels=None) and the decode
        with pytest.raises(ValueError, match=r"bomb.png.*decompression bomb"):
            load_folder_dataset(tmp_path, channels=channels, backend="pillow")


def test_dali_backend_without_dali_is_a_clear_error(tmp_path, monkeypatch):
    import orw_fast.data.folder as folder

    write_pngs(tmp_path, [np.zeros((4, 4), np.uint8)], ["a.png"])
    monkeypatch.setattr(folder, "dali_available", lambda: False)
    with pytest.raises(ValueError, match="backend='dali' needs NVIDIA DALI.*pip install nvidia-dali-cuda130"):
        load_folder_dataset(tmp_path, backend="dali")
    assert load_folder_dataset(tmp_path)[0].shape == (1, 1, 4, 4)  # "auto" falls back to pillow


@needs_dali
def test_folder_dali_matches_pillow(class_folder, flat_rgb_folder):
    for root in (class_folder[0], flat_rgb_folder[0]):
        for channels in (None, 1, 3):
            px, py = load_folder_dataset(root, channels=channels, backend="pillow")
            dx, dy = load_folder_dataset(root, channels=channels, backend="dali")
            assert dx.shape == px.shape and dx.dtype == torch.float32
            torch.testing.assert_close(dx, px, rtol=0, atol=PIXEL + 1e-6)  # RGB -> L may round differently
            assert (dy is None and py is None) or torch.equal(dy, py)


@needs_dali
def test_folder_dali_resize_close_to_pillow(flat_rgb_folder):
    root, _ = flat_rgb_folder
    px, _ = load_folder_dataset(root, image_size=(4, 6), backend="pillow")
    dx, _ = load_folder_dataset(root, image_size=(4, 6), backend="dali")
    assert dx.shape == px.shape == (4, 3, 4, 6)
    assert (dx - px).abs().mean() < 8 * PIXEL  # both bilinear + antialias, different filter details


@needs_dali
def test_folder_dali_errors(tmp_path):
    write_pngs(tmp_path, [np.zeros((4, 4), np.uint8), np.zeros((5, 4), np.uint8)], ["a.png", "b.png"])
    with pytest.raises(ValueError, match="different sizes"):
        load_folder_dataset(tmp_path, backend="dali")
    (tmp_path / "c.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="DALI could not decode .*c.png"):
        load_folder_dataset(tmp_path, image_size=4, channels=1, backend="dali")


# ---------------------------------------------------------------------------------------------
# load_dataset


def test_load_dataset_specs(tmp_path):
    images, labels = load_dataset("digits")
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    for spec in ("mnist", "digits:x", "idx", "folder", "cifar:/tmp"):
        with pytest.raises(ValueError, match="unknown dataset spec") as info:
            load_dataset(spec)
        assert "folder:PATH" in str(info.value)
    with pytest.raises(ValueError, match="no path"):
        load_dataset("folder:")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(f"idx:{tmp_path / 'missing'}")
    with pytest.raises(TypeError, match="spec must be a str"):
        load_dataset(None)
    with pytest.raises(TypeError, match="takes no options"):
        load_dataset("digits", image_size=8)
    assert "digits" in DATASETS and "idx:PATH" in DATASETS
