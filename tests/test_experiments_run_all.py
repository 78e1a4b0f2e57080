"""experiments.run_all's jobs: stages run at once in separate single-thread processes, log their output, and a
failing one is named with its log."""

import functools
import time
from pathlib import Path

import pytest

from experiments.run_all import main, run_stages


def _handshake(mine: Path, theirs: Path) -> None:
    """Writes ``mine`` and waits for ``theirs``: two of these finish only when they run at the same time."""
    print(f"stage {mine.name} started")
    mine.touch()
    deadline = time.monotonic() + 120
    while not theirs.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{theirs} never appeared")
        time.sleep(0.05)


def _fail() -> None:
    raise ValueError("broken on purpose")


def test_stages_run_at_once_on_one_thread_each_with_their_output_logged(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    stages = {"first": functools.partial(_handshake, a, b), "second": functools.partial(_handshake, b, a)}
    ran = run_stages(stages, tmp_path / "logs", jobs=2, threads=1, progress=False)
    assert set(ran) == {"first", "second"}
    assert [ran[n]["threads"] for n in ran] == [1, 1]
    assert ran["first"]["pid"] != ran["second"]["pid"]
    assert all(ran[n]["seconds"] >= 0 for n in ran)
    assert "stage a started" in (tmp_path / "logs" / "first.log").read_text()
    assert "stage b started" in (tmp_path / "logs" / "second.log").read_text()


def test_a_failing_stage_is_named_with_its_log(tmp_path):
    stages = {"broken": _fail, "never": functools.partial(_handshake, tmp_path / "x", tmp_path / "y")}
    with pytest.raises(RuntimeError, match=r"experiment broken failed \(ValueError: broken on purpose\).*broken\.log"):
        run_stages(stages, tmp_path / "logs", jobs=1, threads=1, progress=False)
    assert "ValueError: broken on purpose" in (tmp_path / "logs" / "broken.log").read_text()


@pytest.mark.parametrize("arg", ["jobs", "threads"])
def test_bad_job_counts_are_refused(tmp_path, arg):
    kwargs = {"jobs": 1, "threads": 1, arg: 0}
    with pytest.raises(ValueError, match=f"{arg} must be a positive integer, got 0"):
        run_stages({"x": _fail}, tmp_path, progress=False, **kwargs)
    with pytest.raises(SystemExit):
        main([f"--{arg}", "0", "--out", str(tmp_path)])
