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


def _shared_fixture_group(item) -> str | None:
    """The xdist group of a test that uses one of our session- or module-scoped fixtures (a pre-trained cache, built
    pipelines): the session fixture's name, else the test's module; None for a test that shares nothing."""
    ours = [
        fixture
        for fixtures in item._fixtureinfo.name2fixturedefs.values()
        for fixture in fixtures
        if fixture.baseid  # defined in tests/ (pytest's own, like tmp_path_factory, have an empty baseid)
    ]
    sessions = sorted(f.argname for f in ours if f.scope == "session")
    if sessions:
        return sessions[0]
    return item.module.__name__ if any(f.scope in ("package", "module", "class") for f in ours) else None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Marks the GPU tests ``gpu``: ``pytest -m gpu`` runs just them (benchmarks/run_gpu.sh --quick).

    Groups for pytest-xdist (``--dist loadgroup`` in pyproject.toml): the tests sharing an expensive fixture run on one
    worker, so it is built once, and they come first (session groups, then module groups, then the single tests), so
    the longest chain (the pre-trained caches: about 10 of the suite's minutes on 2 cores) starts at once while the
    other worker takes the rest."""
    rank = {}
    for item in items:
        if _needs_gpu(item):
            item.add_marker(pytest.mark.gpu)
        group = _shared_fixture_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
        rank[item.nodeid] = 2 if group is None else 1 if group == item.module.__name__ else 0
    items.sort(key=lambda item: rank[item.nodeid])


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
