"""Batch statistics logged by the trainer and the demo, and the W2 distance between sample sets."""
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
