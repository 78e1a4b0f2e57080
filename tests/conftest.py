"""Test configuration.

- Without a GPU, Triton kernels run in its interpreter: TRITON_INTERPRET=1 must be set before triton is first
  imported, which happens here, before any test module imports orw_fast.
- In CI (CI=true) a test may skip only because there is no GPU (reason GPU_SKIP_REASON): any other skip, a
  missing package or tool, is turned into a failure, so a missing install step cannot pass as green.
"""

import os

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


def pytest_collection_modifyitems(config, items):
    """Marks the GPU tests ``gpu``: ``pytest -m gpu`` runs just them (benchmarks/run_gpu.sh --quick)."""
    for item in items:
        if _needs_gpu(item):
            item.add_marker(pytest.mark.gpu)


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


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """A model cache (what ``$ORW_FAST_CACHE`` points to) holding the digits flow model and classifier, pre-trained
    briefly (1000 flow-matching steps): shared by the reduced experiments."""
    from orw_fast.tasks.demo import pretrained_digits

    folder = tmp_path_factory.mktemp("cache")
    pretrained_digits(folder, steps=1000, device="cpu", progress=False)
    return folder
