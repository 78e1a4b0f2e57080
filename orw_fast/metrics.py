"""Batch statistics logged by the trainer and the demo; distances between sample sets (W2, Fréchet) and the
background-noise figure of digit images."""

from __future__ import annotations

import math

import torch


def effective_sample_size(weights: torch.Tensor) -> torch.Tensor:
    """(sum w)^2 / sum w^2 for weights [B]: B for uniform weights, 1 when one sample takes all. A 0-dim float64
    tensor on the weights' device (no host sync)."""
    w = weights.detach().double()
    return w.sum() ** 2 / (w * w).sum()


def mean_pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance between the B flattened samples of x [B, ...] (batch diversity; 0 for B = 1). A
    0-dim float64 tensor on x's device (no host sync)."""
    flat = x.detach().reshape(x.shape[0], -1).double()
    return torch.pdist(flat).mean() if flat.shape[0] > 1 else flat.new_zeros(())


def class_entropy(labels: torch.Tensor, num_classes: int) -> float:
    """Entropy in nats of the empirical distribution of integer labels [N] over num_classes."""
    p = torch.bincount(labels.detach().cpu(), minlength=num_classes).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum()) if p.numel() else math.nan


def w2_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact W2 distance between two equal-weight sample sets a [N, ...] and b [M, ...] (flattened),
    by optimal transport with POT (``ot.emd2`` on squared Euclidean costs, float64)."""
    import ot

    x = a.detach().reshape(a.shape[0], -1).double().cpu().numpy()
    y = b.detach().reshape(b.shape[0], -1).double().cpu().numpy()
    cost = ot.dist(x, y, metric="sqeuclidean")
    return math.sqrt(max(float(ot.emd2(ot.unif(len(x)), ot.unif(len(y)), cost, numItermax=1_000_000)), 0.0))


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, D] and b [M, D] (N, M >= 2):
    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64. The FID formula; on the digit
    classifier's penultimate features it is the experiments' "digits FD"."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(
            f"a and b must be feature sets [N, D] and [M, D] with N, M >= 2, got {list(a.shape)} and {list(b.shape)}"
        )
    x, y = a.detach().double().cpu(), b.detach().double().cpu()
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = torch.cov(x.T).reshape(x.shape[1], -1), torch.cov(y.T).reshape(y.shape[1], -1)
    vals, vecs = torch.linalg.eigh(cov_x)
    root_x = (vecs * vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_x @ cov_y @ root_x).clamp(min=0).sqrt().sum()
    return max(
        float(((mu_x - mu_y) ** 2).sum() + cov_x.trace() + cov_y.trace() - 2 * cross), 0.0
    )  # >= 0 up to rounding


def background_level(images: torch.Tensor, threshold: float = 0.0) -> float:
    """Median brightness of the background pixels of images [N, C, H, W] in [-1, 1], on the 0-255 scale: the pixels
    darker than ``threshold`` (the ink is bright). Real digits have a clean black background (about 0); grey, noisy
    backgrounds raise it."""
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got {list(images.shape)}")
    x = images.detach().double().clamp(-1, 1)
    background = x[x < threshold]
    return float((background.median() + 1) * 127.5) if background.numel() else math.nan
