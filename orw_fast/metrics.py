"""Batch statistics logged by the trainer and the demo."""
from __future__ import annotations

import math

import torch


def effective_sample_size(weights: torch.Tensor) -> float:
    """(sum w)^2 / sum w^2 for weights [B]: B for uniform weights, 1 when one sample takes all."""
    w = weights.detach().double()
    return (w.sum() ** 2 / (w * w).sum()).item()


def mean_pairwise_distance(x: torch.Tensor) -> float:
    """Mean Euclidean distance between the B flattened samples of x [B, ...] (batch diversity)."""
    flat = x.detach().reshape(x.shape[0], -1).double()
    return torch.pdist(flat).mean().item() if flat.shape[0] > 1 else 0.0


def class_entropy(labels: torch.Tensor, num_classes: int) -> float:
    """Entropy in nats of the empirical distribution of integer labels [N] over num_classes."""
    p = torch.bincount(labels.detach().cpu(), minlength=num_classes).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum()) if p.numel() else math.nan
