"""Test configuration.

- Without a GPU, Triton kernels run in its interpreter: TRITON_INTERPRET=1 must be set before triton is first
  imported, which happens here, before any test module imports orw_fast.
- In CI (CI=true) a test may skip only because there is no GPU (reason GPU_SKIP_REASON): any other skip, a
  missing package or tool, is turned into a failure, so a missing install step cannot pass as green.
- The model caches of the slowest fixtures (``digits_cache``, 1000 steps; ``text_digits_model``, 3000 steps, about
  8 min) are pre-trained in one background process (tests/pretrain_in_background.py, one thread) started as soon as
  the tests are collected, when a selected test needs them; the suite runs on one torch thread until it ends. On a
  2-core machine the pre-training takes the core that the suite's single-threaded tests (imports, subprocesses,
  compiles) leave idle, instead of 10 min of its own; the fixtures wait for their job.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GPU_SKIP_REASON = "needs a CUDA GPU"
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason=GPU_SKIP_REASON)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _fail_skips_in_ci(report) -> None:
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if not reason.startswith(GPU_SKIP_REASON):
            report.outcome = "failed"
            report.longrepr = (
                f"skipped in CI for a reason other than a missing GPU: {reason!r}. In CI only "
                f"'{GPU_SKIP_REASON}' may skip: install what is missing (scripts/bootstrap.sh)."
            )


def _is_cuda(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    try:
        return isinstance(value, str) and torch.device(value).type == "cuda"
    except RuntimeError:  # a string that is not a device
        return False


def _needs_gpu(item) -> bool:
    """A test marked requires_gpu, or one parametrized with a CUDA device."""
    skips = [m for m in item.iter_markers("skipif") if GPU_SKIP_REASON in str(m.kwargs.get("reason", ""))]
    params = getattr(getattr(item, "callspec", None), "params", {})
    return bool(skips) or any(_is_cuda(v) for v in params.values())


COMPILE_HEAVY = ("test_build.py",)  # nvcc and CMake builds: run last, once the background pre-training is done


def pytest_collection_modifyitems(config, items):
    """Marks the GPU tests ``gpu``: ``pytest -m gpu`` runs just them (benchmarks/run_gpu.sh --quick). Moves the
    compile-heavy tests to the end (otherwise in order): their compilers would share the two cores with the
    background pre-training below."""
    for item in items:
        if _needs_gpu(item):
            item.add_marker(pytest.mark.gpu)
    items.sort(key=lambda item: item.path.name in COMPILE_HEAVY)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skips_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skips_in_ci(outcome.get_result())


@pytest.fixture
def poison_empty():
    """While active, every torch.empty (also at::empty inside the kernels) is filled with NaN, so an
    output element a kernel forgets to write shows up as NaN."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev_det)
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill


ROOT = Path(__file__).resolve().parents[1]
_background: dict = {}  # the pre-training process: "process", "folder", "log", and "threads" until it ends


def pytest_collection_finish(session):
    """Starts the background pre-training of the model caches the selected tests need (pretrain_in_background.py)
    and runs the suite on one torch thread until it ends."""
    from pretrain_in_background import JOBS

    if session.config.option.collectonly:
        return
    needed = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    jobs = [job for job in JOBS if job in needed]
    if jobs:
        _start_background(jobs)


def _start_background(jobs):
    folder = Path(tempfile.mkdtemp(prefix="orw_fast_test_cache_"))
    log = open(folder / "pretrain.log", "w+")  # closed at the session's end
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    script = Path(__file__).with_name("pretrain_in_background.py")
    process = subprocess.Popen(
        [sys.executable, str(script), str(folder), *jobs], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env
    )
    _background.update(process=process, folder=folder, log=log, threads=torch.get_num_threads())
    torch.set_num_threads(1)


def _restore_threads_once_done():
    if "threads" in _background and _background["process"].poll() is not None:
        torch.set_num_threads(_background.pop("threads"))


def _wait_for(job: str) -> Path:
    """The cache folder once the background process has done ``job`` (started now if no collected test asked)."""
    if "process" not in _background:
        _start_background([job])
    process, folder = _background["process"], _background["folder"]
    while not (folder / f"{job}.done").exists():
        if process.poll() is not None and not (folder / f"{job}.done").exists():
            _background["log"].seek(0)
            output = _background["log"].read()
            pytest.fail(f"the background pre-training ({job}) failed (exit {process.returncode}):\n{output[-4000:]}")
        time.sleep(0.2)
    _restore_threads_once_done()
    return folder


def pytest_runtest_setup(item):
    _restore_threads_once_done()


def pytest_sessionfinish(session):
    if "process" in _background:
        if _background["process"].poll() is None:  # the session ended first (-x, -k, Ctrl-C)
            _background["process"].kill()
            _background["process"].wait()
        _background["log"].close()
        shutil.rmtree(_background["folder"], ignore_errors=True)


@pytest.fixture(scope="session")
def digits_cache():
    """A model cache (what ``$ORW_FAST_CACHE`` points to) holding the digits flow model and classifier, pre-trained
    briefly (1000 flow-matching steps, on one thread, in the background): shared by the reduced experiments."""
    return _wait_for("digits_cache")


@pytest.fixture(scope="session")
def text_digits_model(digits_cache):
    """The digits cache with the text-digits pipeline (orw_fast.tasks.text_digits) added, pre-trained as the
    text-alignment experiment's (AlignmentSettings.pretrain_steps, on one thread, in the background)."""
    return _wait_for("text_digits_model")


def poison_then_free(like, count=4):
    """Fills `count` fresh buffers shaped like `like` with NaN and frees them, so that the next outputs the
    allocator hands out are likely to hold NaN wherever a kernel fails to write."""
    for _ in range(count):
        torch.full_like(like, float("nan"))
