"""The model caches of the suite's slowest fixtures, pre-trained in a background process (tests/conftest.py):

    python tests/pretrain_in_background.py CACHE JOB [JOB ...]

runs each JOB in order into the cache folder CACHE and marks it done with CACHE/JOB.done. On one torch thread: the
suite's process keeps the other core."""

import sys
from pathlib import Path


def digits_cache(cache: Path) -> None:
    """The digits flow model and classifier, pre-trained briefly (1000 flow-matching steps): the reduced
    experiments' models."""
    from orw_fast.tasks.demo import pretrained_digits

    pretrained_digits(cache, steps=1000, device="cpu", progress=False)


def text_digits_model(cache: Path) -> None:
    """The text-digits pipeline pre-trained as the text-alignment experiment's (3000 steps, about 8 min)."""
    from orw_fast.tasks.text_alignment import AlignmentSettings
    from orw_fast.tasks.text_digits import pretrained_text_digits

    pretrained_text_digits(cache, steps=AlignmentSettings.pretrain_steps, progress=False)


JOBS = {"digits_cache": digits_cache, "text_digits_model": text_digits_model}  # in the order they run

if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    cache = Path(sys.argv[1])
    for job in sys.argv[2:]:
        JOBS[job](cache)
        (cache / f"{job}.done").touch()
