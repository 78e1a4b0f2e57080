"""Classifier reward: the probability (or log-probability) a classifier gives to a set of target classes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from orw_fast.rewards.base import check_images

CLASSIFIER_MODES = ("prob", "logprob")


class ClassifierReward(nn.Module):
    """reward_i = sum_{k in target_classes} softmax(classifier(x)_i)_k ("prob") or its log ("logprob").

    ``classifier`` maps model-space images [B, C, H, W] to logits [B, K]; it is put in eval mode here (move
    it together with this module with .to()). Evaluated without gradients, ``batch_size`` images at a time
    (None: all at once). Returns float32 [B] on the images' device; target classes are checked against K
    at call time.
    """

    def __init__(
        self,
        classifier: Callable[[torch.Tensor], torch.Tensor],
        target_classes: int | Sequence[int],
        mode: str = "prob",
        batch_size: int | None = None,
    ):
        super().__init__()
        if not callable(classifier):
            raise TypeError(f"classifier must be a callable images -> logits, got {type(classifier).__name__}")
        targets = [target_classes] if isinstance(target_classes, int) else list(target_classes)
        if (
            not targets
            or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in targets)
            or len(set(targets)) != len(targets)
        ):
            raise ValueError(
                f"target_classes must be a class index or a non-empty sequence of distinct class "
                f"indices >= 0, got {target_classes!r}"
            )
        if mode not in CLASSIFIER_MODES:
            raise ValueError(f"mode must be one of {CLASSIFIER_MODES}, got {mode!r}")
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
        self.classifier = classifier.eval() if isinstance(classifier, nn.Module) else classifier
        self.target_classes = tuple(targets)
        self.mode = mode
        self.batch_size = batch_size

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x)
        chunks = [x] if self.batch_size is None else x.split(self.batch_size)
        log_mass = torch.cat([self._log_mass(chunk) for chunk in chunks])
        return (log_mass if self.mode == "logprob" else log_mass.exp()).to(x.device)

    def _log_mass(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(x)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"classifier must return logits [B, K] = [{x.shape[0]}, K], got {shape}")
        if max(self.target_classes) >= logits.shape[1]:
            raise ValueError(
                f"target_classes {self.target_classes} out of range for a classifier with K = {logits.shape[1]} classes"
            )
        targets = torch.tensor(self.target_classes, device=logits.device)
        return torch.log_softmax(logits.float(), dim=1).index_select(1, targets).logsumexp(dim=1)

    def extra_repr(self) -> str:
        return f"target_classes={self.target_classes}, mode={self.mode!r}, batch_size={self.batch_size}"
