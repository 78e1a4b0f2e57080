"""A small CNN digit classifier on model-space images, used as a reward model (e.g. "generate even digits")."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

_SPLIT_SEED = 0  # the held-out split is the same for every training seed


def split_indices(n: int, test_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices [N - k], [k] of a dataset of n items, k = round(n * test_fraction): one fixed
    permutation, the same for every seed and run (the classifier's split, and the real digits of the digits FD)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    num_test = round(n * test_fraction)
    if not 0 < num_test < n:
        raise ValueError(f"test_fraction {test_fraction} of {n} images leaves an empty train or test set")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_SPLIT_SEED))
    return perm[num_test:], perm[:num_test]


class DigitClassifier(nn.Module):
    """Images [B, C, H, W] in [-1, 1] -> logits [B, num_classes] (float32).

    Two 3x3 convolutions (32, 64 channels), a 2x2 max-pool, a third convolution, average-pooling to
    4x4 and a 2-layer MLP: 188k parameters for 1 channel, no dropout or batch norm (eval and train modes agree).
    """

    def __init__(self, image_shape: tuple[int, int, int] = (1, 8, 8), num_classes: int = 10):
        super().__init__()
        shape = tuple(image_shape) if isinstance(image_shape, (list, tuple)) else ()
        if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape) or min(shape[1:]) < 4:
            raise ValueError(f"image_shape must be (C, H, W) of positive ints with H, W >= 4, got {image_shape!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.image_shape, self.num_classes = shape, num_classes
        self.features = nn.Sequential(
            nn.Conv2d(shape[0], 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, self.image_shape))}], got {list(x.shape)}")
        return self.head(self.features(x))

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """The 128 features [B, 128] the last layer reads (after its ReLU): the space of the digits FD
        (orw_fast.metrics.frechet_distance)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, self.image_shape))}], got {list(x.shape)}")
        return self.head[:-1](self.features(x))


@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    correct = sum(
        int((model(images[i : i + batch_size]).argmax(dim=1) == labels[i : i + batch_size]).sum())
        for i in range(0, images.shape[0], batch_size)
    )
    return correct / images.shape[0]


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    test_fraction: float = 0.2,
    progress: bool = True,
) -> dict:
    """Trains ``model`` (images -> logits) with Adam and cross-entropy on a fixed split of the data,
    on the device of its parameters; leaves it in eval mode.

    Args:
        images: [N, C, H, W] floating, model space. labels: [N] integer class indices.
        seed: order of the minibatches. The held-out ``test_fraction`` of the data is the same for
            every seed (a fixed permutation), so test accuracies compare across runs.

    Returns:
        {"train_accuracy", "test_accuracy" (floats in [0, 1]), "num_train", "num_test"}.
    """
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4:
        raise TypeError(f"images must be a floating [N, C, H, W] tensor, got {getattr(images, 'shape', type(images))}")
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must have shape [{images.shape[0]}] (one per image), got {list(labels.shape)}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    train_idx, test_idx = split_indices(images.shape[0], test_fraction)

    device = next(model.parameters()).device
    images, labels = images.to(device, torch.float32), labels.to(device, torch.int64)
    train_idx, test_idx = train_idx.to(device), test_idx.to(device)
    x_train, y_train, x_test, y_test = images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]

    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    bar = tqdm(range(epochs), desc="classifier", disable=not progress)
    for _ in bar:
        order = torch.randperm(x_train.shape[0], generator=gen).to(device)
        for i in range(0, order.shape[0], batch_size):
            idx = order[i : i + batch_size]
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    return {
        "train_accuracy": _accuracy(model, x_train, y_train, 512),
        "test_accuracy": _accuracy(model, x_test, y_test, 512),
        "num_train": int(x_train.shape[0]),
        "num_test": int(test_idx.numel()),
    }


def save_classifier(model: DigitClassifier, path):
    """Writes the classifier's weights with its shape, atomically (read back by load_classifier);
    returns the path."""
    from orw_fast.checkpoint import save_atomic

    return save_atomic(
        {"state_dict": model.state_dict(), "image_shape": list(model.image_shape), "num_classes": model.num_classes},
        path,
    )


def load_classifier(path) -> DigitClassifier:
    """A DigitClassifier from a file written by save_classifier (ValueError if it is not one)."""
    from orw_fast.checkpoint import check_state_matches, load_file

    ckpt = load_file(path)
    if not {"state_dict", "image_shape", "num_classes"} <= set(ckpt):
        raise ValueError(f"{str(path)!r} is not a classifier file written by `orw-fast pretrain`")
    model = DigitClassifier(tuple(ckpt["image_shape"]), ckpt["num_classes"])
    check_state_matches(model, ckpt["state_dict"], f"classifier file {str(path)!r}, entry 'state_dict'")
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
