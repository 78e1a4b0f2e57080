"""Where a step's prompts come from: a list of prompts (a text file, one a line, or a Python list), drawn B at a
time, optionally k samples per prompt; and the class labels of a class-conditional pixel model.

Draws use a CPU generator the trainer owns (its state is in the checkpoint's random states), so choosing the
prompts costs no device sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


class PromptSource:
    """The distinct prompts ``prompts`` (a list/tuple of strings, or the path of a UTF-8 text file with one prompt a
    line; blank lines are skipped). ``samples_per_prompt`` k: a batch of B holds B / k prompts, each k times in a
    row, drawn uniformly with replacement."""

    def __init__(self, prompts: Sequence[str] | str | Path, *, samples_per_prompt: int = 1):
        if isinstance(prompts, (str, Path)):
            path = Path(prompts)
            if not path.is_file():
                raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
            try:
                prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            except UnicodeDecodeError as err:
                raise ValueError(f"prompt file {str(path)!r} is not UTF-8 text ({err})") from None
            prompts = [p for p in prompts if p]
            if not prompts:
                raise ValueError(f"prompt file {str(path)!r} holds no prompt (one prompt a line, blank lines skipped)")
        elif (
            not isinstance(prompts, (list, tuple))
            or not prompts
            or not all(isinstance(p, str) and p.strip() for p in prompts)
        ):
            raise ValueError(
                f"prompts must be a non-empty list of non-empty strings or a prompt file, got {prompts!r:.80}"
            )
        if isinstance(samples_per_prompt, bool) or not isinstance(samples_per_prompt, int) or samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be an integer >= 1, got {samples_per_prompt!r}")
        self.prompts = list(dict.fromkeys(p.strip() for p in prompts))  # distinct, in file order
        self.samples_per_prompt = samples_per_prompt

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, batch: int, generator: torch.Generator) -> list[str]:
        """``batch`` prompts for one step (``batch`` must be a multiple of samples_per_prompt)."""
        k = self.samples_per_prompt
        if batch % k:
            raise ValueError(f"the batch of each process ({batch}) must be a multiple of samples_per_prompt ({k})")
        picks = torch.randint(len(self.prompts), (batch // k,), generator=generator).tolist()
        return [self.prompts[i] for i in picks for _ in range(k)]

    def first(self, n: int) -> list[str]:
        """The first ``n`` prompts, cycled: a fixed set, for sample grids."""
        return [self.prompts[i % len(self.prompts)] for i in range(n)]


class ClassLabels(PromptSource):
    """The class labels 0..num_classes-1 of a class-conditional model, as a prompt source (the "prompts" are ints)."""

    def __init__(self, num_classes: int, *, samples_per_prompt: int = 1):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        self.prompts, self.samples_per_prompt = list(range(num_classes)), samples_per_prompt
