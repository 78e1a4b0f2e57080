"""Shared pieces of the experiments: result files and plotting (the runs and sweeps are orw_fast.tasks.sweeps)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from orw_fast.checkpoint import write_text_atomic


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(path, results: dict) -> Path:
    """Writes ``results`` as JSON (atomically) with the date and commit it was made at."""
    stamped = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit(), **results}
    return write_text_atomic(path, json.dumps(stamped, indent=1))


def pyplot():
    """matplotlib.pyplot with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
