"""The rollout pool: samples of the frozen last policy, made in bulk and used by the next updates.

The last policy does not change between refreshes, so the rollouts of several steps are samples of one fixed
model: they can be generated (and scored) in one sampler call of ``batches x B`` samples (``rollout_batches``), and
each can serve more than one update (``rollout_reuse``). A pool holds P = batches x B rollouts (x0, x1, prompts,
rewards) and serves ``batches x reuse`` updates of B samples: the first pass in generation order (so batches = reuse
= 1 is the plain one-rollout-per-step loop), every further pass in a fresh random order (each sample is used exactly
``reuse`` times). The trainer drops the pool when the last policy is refreshed.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class RolloutPool:
    """Rollouts [P, ...] of one last policy and the order they are served in. ``prompts``: P prompts or None;
    ``order``: [reuse * P] indices (CPU), ``cursor``: how many of them were served."""

    x0: torch.Tensor
    x1: torch.Tensor
    prompts: list | None
    rewards: torch.Tensor
    order: torch.Tensor
    cursor: int = 0

    @classmethod
    def make(cls, x0, x1, prompts, rewards, *, reuse: int, generator: torch.Generator) -> RolloutPool:
        """A pool whose first pass is in generation order and whose ``reuse - 1`` further passes are
        permutations drawn from ``generator`` (a CPU generator: no device sync)."""
        size = x1.shape[0]
        passes = [torch.arange(size)] + [torch.randperm(size, generator=generator) for _ in range(reuse - 1)]
        return cls(x0, x1, prompts, rewards, torch.cat(passes))

    def __len__(self) -> int:
        """Samples left to serve."""
        return self.order.numel() - self.cursor

    def take(self, batch: int):
        """The next ``batch`` rollouts: (x0, x1, prompts, rewards)."""
        if batch > len(self):
            raise ValueError(f"the rollout pool has {len(self)} samples left, {batch} were asked for")
        index = self.order[self.cursor : self.cursor + batch]
        self.cursor += batch
        device_index = index.to(self.x1.device)
        prompts = None if self.prompts is None else [self.prompts[i] for i in index.tolist()]
        return self.x0[device_index], self.x1[device_index], prompts, self.rewards[device_index]

    def state(self) -> dict:
        """The pool on the CPU, for checkpoints."""
        return {
            "x0": self.x0.cpu(),
            "x1": self.x1.cpu(),
            "prompts": self.prompts,
            "rewards": self.rewards.cpu(),
            "order": self.order,
            "cursor": self.cursor,
        }

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> RolloutPool:
        return cls(
            state["x0"].to(device),
            state["x1"].to(device),
            state["prompts"],
            state["rewards"].to(device),
            state["order"],
            int(state["cursor"]),
        )

    @staticmethod
    def check_state(state, sample_shape, where: str) -> None:
        """ValueError naming ``where`` unless ``state`` is a pool of samples of ``sample_shape`` (or None)."""
        if state is None:
            return
        try:
            x0, x1, rewards, order, cursor = (state[k] for k in ("x0", "x1", "rewards", "order", "cursor"))
            size = x1.shape[0]
            ok = (
                all(isinstance(t, torch.Tensor) for t in (x0, x1, rewards, order))
                and tuple(x0.shape) == tuple(x1.shape) == (size, *sample_shape)
                and tuple(rewards.shape) == (size,)
                and order.dtype == torch.int64
                and order.numel() % max(size, 1) == 0
                and bool(((order >= 0) & (order < size)).all())
                and isinstance(cursor, int)
                and 0 <= cursor <= order.numel()
                and (state["prompts"] is None or len(state["prompts"]) == size)
            )
        except (KeyError, TypeError, AttributeError, IndexError):
            ok = False
        if not ok:
            raise ValueError(
                f"{where} is not a rollout pool of samples of shape {list(sample_shape)}; nothing was loaded"
            )
