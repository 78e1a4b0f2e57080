"""ODE sampler: convergence order, agreement with torchdiffeq, autocast, errors, torchcfm's UNet and
(on a GPU) the CUDA-graph path against eager sampling."""

import gc
import math
import weakref

import pytest
import torch
import torchdiffeq
from conftest import requires_gpu

from orw_fast import sampling
from orw_fast.sampling import FIXED_STEP_METHODS, clear_graph_cache, sample

ONE_STEP_METHODS = ("euler", "midpoint", "heun")  # the multistep ones have their own oracles below


class MLPField(torch.nn.Module):
    """A small nonlinear velocity field v(t, x) for x [B, dim]; records the dtype of its last output."""

    def __init__(self, dim=3, hidden=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, dim))
        self.out_dtype = None

    def forward(self, t, x):
        assert t.shape == (x.shape[0],)
        v = self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))
        self.out_dtype = v.dtype
        return v


def linear_field(a, b):
    """dx/dt = (a + b t) x, solved by x1 = x0 exp(a + b/2)."""
    return lambda t, x: (a + b * t)[:, None] * x


def tiny_unet(seed=0):
    from torchcfm.models.unet.unet import UNetModelWrapper

    torch.manual_seed(seed)
    unet = UNetModelWrapper(
        dim=(1, 8, 8),
        num_channels=32,
        num_res_blocks=1,
        channel_mult=[1, 2],
        attention_resolutions="4",
        num_heads=1,
        num_head_channels=-1,
        dropout=0.0,
    ).eval()
    with torch.no_grad():  # torchcfm zero-initializes its output layers: give the field some signal
        for p in unet.parameters():
            if not p.any():
                p.normal_(std=0.05)
    return unet


def torchdiffeq_field(model, batch):
    return lambda t, x: model(t.expand(batch), x)


# ---------------------------------------------------------------------------------------------
# Accuracy


@pytest.mark.parametrize("method, order", [("euler", 1.0), ("midpoint", 2.0), ("heun", 2.0)])
def test_convergence_order(method, order):
    a, b, n = 1.0, 1.0, 64
    x0 = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = x0 * math.exp(a + b / 2)
    err = [(sample(linear_field(a, b), x0, steps=s, method=method) - exact).abs().max().item() for s in (n, 2 * n)]
    observed = math.log2(err[0] / err[1])
    assert abs(observed - order) < 0.1 * order, f"{method}: observed order {observed:.3f}, errors {err}"


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("ours, theirs", [("euler", "euler"), ("midpoint", "midpoint"), ("heun", "heun2")])
def test_fixed_step_matches_torchdiffeq(ours, theirs, dtype, tol):
    model = MLPField().to(dtype)
    x0 = torch.randn(5, 3, dtype=dtype, generator=torch.Generator().manual_seed(1))
    steps = 7
    x1, traj = sample(model, x0, steps=steps, method=ours, return_trajectory=True)
    with torch.no_grad():
        times = torch.linspace(0, 1, steps + 1, dtype=dtype)
        ref = torchdiffeq.odeint(torchdiffeq_field(model, 5), x0, times, method=theirs)
    torch.testing.assert_close(traj, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(x1, ref[-1], rtol=tol, atol=tol)


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "rk4"])
def test_torchdiffeq_methods_match_torchdiffeq(method):
    model = MLPField()
    x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    steps, tol = 6, dict(rtol=1e-6, atol=1e-6)
    # rk4 (fixed grid) takes `steps` steps; the adaptive solvers report t=0 and t=1 only
    times = torch.linspace(0, 1, steps + 1) if method == "rk4" else torch.tensor([0.0, 1.0])
    with torch.no_grad():
        ref = torchdiffeq.odeint(torchdiffeq_field(model, 5), x0, times, method=method, **tol)
    x1 = sample(model, x0, steps=steps, method=method, **tol)
    torch.testing.assert_close(x1, ref[-1], rtol=0, atol=0)
    x1_traj, traj = sample(model, x0, steps=steps, method=method, return_trajectory=True, **tol)
    assert traj.shape == (steps + 1, 5, 3)
    torch.testing.assert_close(traj[0], x0, rtol=0, atol=0)
    torch.testing.assert_close(x1_traj, x1, rtol=1e-6, atol=1e-6)


def test_fixed_step_methods_approach_dopri5():
    model = MLPField()
    x0 = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = sample(model.double(), x0, method="dopri5", rtol=1e-10, atol=1e-10)
    for method, tol in (("euler", 2e-2), ("midpoint", 1e-4), ("heun", 1e-4)):
        torch.testing.assert_close(sample(model, x0, steps=100, method=method), ref, rtol=0, atol=tol)


# ---------------------------------------------------------------------------------------------
# Trajectory, autocast, models, errors


@pytest.mark.parametrize("method", FIXED_STEP_METHODS)
def test_trajectory(method):
    model = MLPField()
    x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(4))
    x0_copy = x0.clone()
    x1 = sample(model, x0, steps=4, method=method)
    x1_traj, traj = sample(model, x0, steps=4, method=method, return_trajectory=True)
    assert traj.shape == (5, 5, 3) and traj.dtype == x0.dtype
    assert torch.equal(traj[0], x0) and torch.equal(traj[-1], x1) and torch.equal(x1_traj, x1)
    assert torch.equal(x0, x0_copy), "x0 was modified"
    assert not torch.equal(traj[1], traj[2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cpu(dtype):
    model = MLPField(dim=8, hidden=64)
    x0 = torch.randn(16, 8, generator=torch.Generator().manual_seed(5))
    full = sample(model, x0, steps=10, method="heun")
    assert model.out_dtype == torch.float32
    low = sample(model, x0, steps=10, method="heun", autocast=dtype)
    assert model.out_dtype == dtype, "the model did not run under autocast"
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, rtol=0, atol=3e-2)
    assert not torch.equal(low, full)


def test_no_autocast_disables_ambient_autocast():
    model = MLPField()
    x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(6))
    plain = sample(model, x0, steps=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = sample(model, x0, steps=3)
    assert model.out_dtype == torch.float32 and torch.equal(inside, plain)


def test_leaves_mode_and_grad_alone():
    model = MLPField().train()
    x0 = torch.randn(5, 3, requires_grad=True)
    x1 = sample(model, x0, steps=2, cuda_graph=False)
    assert model.training and not x1.requires_grad
    assert model not in sampling._GRAPH_CACHE


@pytest.fixture(scope="module")
def cpu_unet():
    return tiny_unet()


@pytest.mark.parametrize("method", FIXED_STEP_METHODS)
def test_torchcfm_unet(cpu_unet, method):
    unet = cpu_unet
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    x1 = sample(unet, x0, steps=5, method=method)
    assert x1.shape == x0.shape and torch.isfinite(x1).all()
    assert (x1 - x0).abs().max() > 1e-3
    if method == "euler":  # an independent loop
        x = x0
        with torch.no_grad():
            for i in range(5):
                x = x + 0.2 * unet(torch.full((4,), i / 5), x)
        torch.testing.assert_close(x1, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, x0, error, match",
    [
        (dict(steps=0), None, ValueError, "steps"),
        (dict(steps=2.5), None, ValueError, "steps"),
        (dict(steps=True), None, ValueError, "steps"),
        (dict(method="leapfrog"), None, ValueError, "unknown method 'leapfrog'"),
        (dict(method=3), None, TypeError, "method"),
        (dict(cuda_graph=True), None, ValueError, "cuda_graph=True needs x0 on a CUDA device"),
        (dict(cuda_graph="yes"), None, ValueError, "cuda_graph"),
        (dict(autocast=torch.float32), None, ValueError, "autocast"),
        (dict(rtol=0.0), None, ValueError, "rtol"),
        (dict(atol=float("nan")), None, ValueError, "atol"),
        ({}, [[0.0, 1.0]], TypeError, "x0 must be a torch.Tensor"),
        ({}, torch.zeros(2, 3, dtype=torch.int64), TypeError, "x0 must be a floating tensor"),
        ({}, torch.zeros(()), ValueError, r"x0 must be a non-empty \[B, ...\]"),
    ],
)
def test_bad_arguments(kwargs, x0, error, match):
    x0 = torch.randn(2, 3) if x0 is None else x0
    with pytest.raises(error, match=match):
        sample(MLPField(), x0, **kwargs)


def test_bad_model():
    with pytest.raises(TypeError, match="model must be callable"):
        sample("not a model", torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"x's shape \[2, 3\], got \[2, 1\]"):
        sample(lambda t, x: x[:, :1], torch.randn(2, 3))


# ---------------------------------------------------------------------------------------------
# CUDA graphs


def cached(model):
    return dict(sampling._GRAPH_CACHE.get(model, {}))


class CondField(MLPField):
    """MLPField shifted by a conditioning tensor c [B, dim]: v(t, x, c) = net(t, x) + c."""

    def forward(self, t, x, c):
        return super().forward(t, x) + c


@pytest.mark.parametrize("method", ONE_STEP_METHODS)
def test_an_explicit_time_grid_is_followed(method):
    """A non-uniform grid (SD3's shifted sigmas as t = 1 - sigma): each step uses its own dt and times; the
    trajectory is reported at the grid's times."""
    model = MLPField()
    x0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(7))
    times = [0.0, 0.05, 0.2, 0.6, 1.0]
    x1, traj = sample(model, x0, times=times, method=method, return_trajectory=True)
    x = x0
    with torch.no_grad():
        for t0, t1 in zip(times[:-1], times[1:]):
            full = lambda t: torch.full((4,), t)  # noqa: E731
            dt = t1 - t0
            if method == "euler":
                x = x + dt * model(full(t0), x)
            elif method == "midpoint":
                x = x + dt * model(full((t0 + t1) / 2), x + 0.5 * dt * model(full(t0), x))
            else:
                k1 = model(full(t0), x)
                x = x + 0.5 * dt * (k1 + model(full(t1), x + dt * k1))
    torch.testing.assert_close(x1, x, rtol=1e-6, atol=1e-6)
    assert traj.shape == (5, 4, 3) and torch.equal(traj[-1], x1)
    uniform = sample(model, x0, steps=4, method=method)
    assert not torch.allclose(uniform, x1, atol=1e-4)


def test_conditioning_reaches_every_call():
    model = CondField()
    x0 = torch.zeros(2, 3)
    c = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    base = sample(model, x0, steps=5, cond=(torch.zeros(2, 3),))
    shifted = sample(model, x0, steps=5, cond=(c,))
    assert torch.allclose((shifted - base)[:, 2], torch.zeros(2), atol=0.1)  # the field shifts where c does
    assert shifted[0, 0] > base[0, 0] + 0.5 and shifted[1, 1] > base[1, 1] + 1.0


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(times=[0.0, 0.5, 0.4, 1.0]), ValueError, "times must be >= 2 increasing values in"),
        (dict(times=[0.0, 1.5]), ValueError, r"in \[0, 1\]"),
        (dict(times=[0.5]), ValueError, ">= 2 increasing"),
        (dict(times=[0.0, 0.5, 1.0], steps=3), ValueError, "steps=3 does not match times, which has 2 steps"),
        (dict(times="abc"), TypeError, "times must be a 1-D sequence"),
        (dict(cond=torch.zeros(2)), TypeError, "cond must be a tuple of tensors"),
    ],
)
def test_bad_grids_and_conditioning_are_refused(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sample(MLPField(), torch.zeros(2, 3), **kwargs)


class HostSyncField(MLPField):
    """Reads a value back to the host every call (``.item()``): not capturable in a CUDA graph."""

    def forward(self, t, x):
        return super().forward(t, x) * (1.0 + 0.0 * float(x.abs().max().item()))


@requires_gpu
def test_auto_samples_an_uncapturable_model_eagerly_with_one_warning():
    model = HostSyncField(dim=8).cuda()
    x0 = torch.randn(4, 8, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    eager = sample(model, x0, steps=5, cuda_graph=False)
    with pytest.warns(UserWarning, match="cannot be captured in a CUDA graph"):
        first = sample(model, x0, steps=5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # from now on eager without a new capture attempt or warning
        second = sample(model, x0, steps=5)
    torch.testing.assert_close(first, eager, rtol=0, atol=0)
    torch.testing.assert_close(second, eager, rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        sample(HostSyncField(dim=8).cuda(), x0, steps=5, cuda_graph=True)


@requires_gpu
def test_graph_with_conditioning_and_a_time_grid_replays_new_inputs():
    """The conditioning is a static input of the graph: a second call with other values replays, not recaptures."""
    model = CondField(dim=32, hidden=64).cuda()
    times = [0.0, 0.1, 0.3, 0.7, 1.0]
    for seed in (0, 1):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x0, c = torch.randn(8, 32, device="cuda", generator=g), torch.randn(8, 32, device="cuda", generator=g)
        eager = sample(model, x0, times=times, cond=(c,), cuda_graph=False)
        graphed = sample(model, x0, times=times, cond=(c,), cuda_graph=True)
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    assert len(cached(model)) == 1


@requires_gpu
@pytest.mark.parametrize("method", FIXED_STEP_METHODS)
@pytest.mark.parametrize("trajectory", [False, True])
def test_graph_matches_eager(method, trajectory):
    model = MLPField(dim=32, hidden=128).cuda()
    x0 = torch.randn(64, 32, device="cuda")
    eager = sample(model, x0, steps=8, method=method, cuda_graph=False, return_trajectory=trajectory)
    graphed = sample(model, x0, steps=8, method=method, cuda_graph=True, return_trajectory=trajectory)
    assert len(cached(model)) == 1
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)


@requires_gpu
def test_graph_matches_eager_unet():
    unet = tiny_unet().cuda()
    x0 = torch.randn(4, 1, 8, 8, device="cuda")
    eager = sample(unet, x0, steps=5, method="heun", cuda_graph=False)
    graphed = sample(unet, x0, steps=5, method="heun")  # "auto" on CUDA: graphed
    assert len(cached(unet)) == 1
    torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4)  # cuDNN may use TF32 either way


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_graph_autocast_matches_eager_autocast(dtype):
    model = MLPField(dim=32, hidden=128).cuda()
    x0 = torch.randn(64, 32, device="cuda")
    eager = sample(model, x0, steps=8, method="midpoint", autocast=dtype, cuda_graph=False)
    graphed = sample(model, x0, steps=8, method="midpoint", autocast=dtype, cuda_graph=True)
    assert graphed.dtype == torch.float32 and model.out_dtype == dtype
    torch.testing.assert_close(graphed, eager, rtol=1e-2, atol=1e-2)


@requires_gpu
def test_graph_replay_with_new_x0():
    model = MLPField(dim=32, hidden=128).cuda()
    xa, xb = torch.randn(2, 64, 32, device="cuda")
    ya = sample(model, xa, steps=6, method="heun", cuda_graph=True)
    yb = sample(model, xb, steps=6, method="heun", cuda_graph=True)
    assert len(cached(model)) == 1
    torch.testing.assert_close(yb, sample(model, xb, steps=6, method="heun", cuda_graph=False), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ya, sample(model, xa, steps=6, method="heun", cuda_graph=False), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ya, yb)


@requires_gpu
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_graph_sees_in_place_weight_refresh(autocast):
    last, policy = MLPField(dim=32, hidden=128, seed=0).cuda(), MLPField(dim=32, hidden=128, seed=1).cuda()
    x0 = torch.randn(64, 32, device="cuda")
    tol = 1e-5 if autocast is None else 1e-2
    before = sample(last, x0, steps=6, autocast=autocast, cuda_graph=True)
    (entry,) = cached(last).values()
    last.load_state_dict(policy.state_dict())  # the policy refresh of online fine-tuning: copies in place
    after = sample(last, x0, steps=6, autocast=autocast, cuda_graph=True)
    assert list(cached(last).values()) == [entry], "an in-place refresh must reuse the graph"
    assert not torch.allclose(after, before, rtol=tol, atol=tol)
    expected = sample(policy, x0, steps=6, autocast=autocast, cuda_graph=False)
    torch.testing.assert_close(after, expected, rtol=tol, atol=tol)


@requires_gpu
def test_graph_recaptured_when_parameters_replaced():
    model = MLPField(dim=32, hidden=128).cuda()
    x0 = torch.randn(64, 32, device="cuda")
    before = sample(model, x0, steps=6, cuda_graph=True)
    (entry,) = cached(model).values()
    model.net[0].weight = torch.nn.Parameter(torch.randn_like(model.net[0].weight))
    after = sample(model, x0, steps=6, cuda_graph=True)
    (new_entry,) = cached(model).values()  # the stale graph is dropped
    assert new_entry is not entry
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, sample(model, x0, steps=6, cuda_graph=False), rtol=1e-5, atol=1e-5)


@requires_gpu
def test_graph_cache_keys_and_lifetime():
    model = MLPField(dim=32, hidden=128).cuda()
    x0 = torch.randn(64, 32, device="cuda")
    sample(model, x0, steps=4)
    sample(model, x0, steps=4)
    sample(model, x0[:32], steps=4)
    sample(model, x0, steps=5)
    sample(model, x0, steps=4, method="midpoint")
    sample(model, x0, steps=4, cuda_graph=False)
    sample(model, x0, steps=4, method="dopri5")  # "auto" with an adaptive method: eager
    assert len(cached(model)) == 4
    with pytest.raises(ValueError, match="fixed-step method"):
        sample(model, x0, method="dopri5", cuda_graph=True)
    clear_graph_cache(model)
    assert model not in sampling._GRAPH_CACHE
    sample(model, x0, steps=4)
    alive, n_models = weakref.ref(model), len(sampling._GRAPH_CACHE)
    del model
    gc.collect()
    assert alive() is None and len(sampling._GRAPH_CACHE) == n_models - 1, "the cache must not keep the model alive"


def test_named_time_grids():
    from orw_fast.sampling import GRIDS, time_grid

    torch.testing.assert_close(time_grid("uniform", 4), torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64))
    dense = time_grid("data_dense", 4)  # t = 3u / (1 + 2u): steps shrink toward the data
    torch.testing.assert_close(dense, torch.tensor([0, 0.5, 0.75, 0.9, 1], dtype=torch.float64))
    torch.testing.assert_close(time_grid("noise_dense", 4), 1 - dense.flip(0))  # the mirror image
    for name in GRIDS:
        grid = time_grid(name, 7)
        assert grid.dtype == torch.float64 and grid[0] == 0 and grid[-1] == 1 and bool((grid.diff() > 0).all())
    with pytest.raises(ValueError, match="grid must be one of"):
        time_grid("cosine", 4)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        time_grid("uniform", 0)


# ---------------------------------------------------------------------------------------------
# Multistep solvers (ab2, ab3, unipc) against independent oracles

MULTISTEP = ("ab2", "ab3", "unipc")


class GaussianMixtureFlow(torch.nn.Module):
    """The exact marginal velocity of the rectified-flow path x_t = t x1 + (1 - t) x0, x0 ~ N(0, I), x1 ~ sum_k pi_k
    N(mu_k, s_k^2 I): given component k, x_t ~ N(t mu_k, var_k I), var_k = t^2 s_k^2 + (1 - t)^2, and
    E[x1 - x0 | x_t, k] = mu_k + (t s_k^2 - (1 - t)) / var_k (x_t - t mu_k); v is their average under the posterior
    p(k | x_t). Broad components (s >= 0.5) keep the field smooth enough for the asymptotic regime at 32 steps."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mu", torch.tensor([[1.5, 0.0], [-1.0, 1.0], [-0.5, -1.5]], dtype=torch.float64))
        self.register_buffer("s", torch.tensor([0.6, 0.5, 0.7], dtype=torch.float64))
        self.register_buffer("log_pi", torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log())

    def forward(self, t, x):
        t = t[:, None, None]
        var = (t * self.s[:, None]) ** 2 + (1 - t) ** 2  # [B, K, 1]
        diff = x[:, None, :] - t * self.mu  # [B, K, D]
        log_w = self.log_pi[:, None] - (diff.square().sum(-1, keepdim=True) / var + x.shape[1] * var.log()) / 2
        v = self.mu + (t * self.s[:, None] ** 2 - (1 - t)) / var * diff
        return (torch.softmax(log_w, dim=1) * v).sum(dim=1)


@pytest.fixture(scope="module")
def mixture_and_reference():
    """The mixture flow, 64 noise samples and their x1 by torchdiffeq's dopri5 at rtol = atol = 1e-12 (float64)."""
    field = GaussianMixtureFlow()
    x0 = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = torchdiffeq.odeint(
            torchdiffeq_field(field, 64),
            x0,
            torch.tensor([0.0, 1.0], dtype=torch.float64),
            method="dopri5",
            rtol=1e-12,
            atol=1e-12,
        )[-1]
    return field, x0, ref


@pytest.mark.parametrize(
    "method, grid, order",
    [
        *[(method, grid, order) for method, order in (("ab2", 2), ("ab3", 3)) for grid in ("uniform", "both_dense")],
        ("unipc", "uniform", 2),
        ("unipc", "both_dense", 3),
    ],
)
def test_multistep_convergence_order(mixture_and_reference, method, grid, order):
    """The least-squares slope of log(max error) against log(step) over N = 32..256 is the order within 10 % (the
    pre-asymptotic terms move the slope by O(1/N); heun and ab2 measure within 0.01 of 2 here, ab3 within 0.07 of
    3; ab3 with an Euler starter measures 2.0 on the uniform grid, so the Heun starter is what this checks).
    unipc (UniC lifts the 2M predictor to order 3) ends with an uncorrected first-order step to t = 1, x1 = x̂1 at
    t_{N-1}, whose error is ~ (1 - t_{N-1})^2: order 2 on the uniform grid, 3 on both_dense (last step ~ 1/N^2)."""
    from orw_fast.sampling import time_grid

    field, x0, ref = mixture_and_reference
    ns = torch.tensor([32, 64, 128, 256], dtype=torch.float64)
    errors = torch.tensor(
        [(sample(field, x0, times=time_grid(grid, int(n)), method=method) - ref).abs().max().item() for n in ns],
        dtype=torch.float64,
    )
    log_err = errors.log()
    log_h = -ns.log()
    slope = float(((log_err - log_err.mean()) * (log_h - log_h.mean())).sum() / (log_h - log_h.mean()).square().sum())
    assert abs(slope - order) < 0.1 * order, f"{method} on {grid}: slope {slope:.3f}, errors {errors.tolist()}"


def test_adams_weights_are_the_closed_form_ones():
    """Variable-step AB2 (DESIGN: x += h[(1 + rho/2) v_i - (rho/2) v_{i-1}], rho = h_i / h_{i-1}) and constant-step
    AB3 (h (23, -16, 5) / 12) against the plan's Gauss-Legendre integrals of the Lagrange basis."""
    times = [0.0, 0.1, 0.25, 0.3, 0.6, 1.0]
    for i, step in enumerate(sampling._adams_plan(times, 2, heun_start=False)[1:], start=1):
        h, rho = times[i + 1] - times[i], (times[i + 1] - times[i]) / (times[i] - times[i - 1])
        assert step.weights == pytest.approx((h * (1 + rho / 2), -h * rho / 2), rel=1e-13, abs=1e-15)
    uniform = [k / 10 for k in range(11)]
    plan = sampling._adams_plan(uniform, 3, heun_start=True)
    assert plan[0].heun and plan[1].weights == pytest.approx((0.1 * 1.5, -0.1 * 0.5), rel=1e-13)
    for step in plan[2:-1]:
        assert step.weights == pytest.approx((0.1 * 23 / 12, -0.1 * 16 / 12, 0.1 * 5 / 12), rel=1e-12)
    assert len(plan[-1].weights) == 2, "the last step (h / (1 - t) = 1 > 6/11) falls to AB2"


def plain_multistep(field, x0, times, method, cond=()):
    """The multistep methods written out from their textbook formulas, one model call per step (ab3: Heun's first
    step). AB weights: exact integrals of the Lagrange interpolant by numpy's polynomial algebra; unipc's predictor:
    the DPM-Solver++(2M) update with alpha = t, sigma = 1 - t, first order where lambda is infinite and on the first
    step; unipc: that predictor from the corrected state, after :func:`unic`."""
    import numpy as np

    x, vs, preds, corrected = x0, [], [], x0
    lam = [math.log(t / (1 - t)) if 0 < t < 1 else (-math.inf if t == 0 else math.inf) for t in times]
    for i in range(len(times) - 1):
        t0, t1 = times[i], times[i + 1]
        v = field(torch.full((x.shape[0],), t0, dtype=x.dtype), x, *cond)
        vs.append(v)
        if method == "ab3" and i == 0:
            x = x + (t1 - t0) / 2 * (v + field(torch.full((x.shape[0],), t1, dtype=x.dtype), x + (t1 - t0) * v, *cond))
        elif method in ("ab2", "ab3"):
            k = min(2 if method == "ab2" else (2 if (t1 - t0) / (1 - t0) > 6 / 11 else 3), i + 1)
            nodes = times[i - k + 1 : i + 1]
            for j, node in enumerate(nodes):
                roots = [m for m in nodes if m != node]
                basis = np.polynomial.Polynomial.fromroots(roots) if roots else np.polynomial.Polynomial([1.0])
                basis = (basis / basis(node)).integ()
                x = x + float(basis(t1) - basis(t0)) * vs[i - k + 1 + j]
        else:
            preds.append(x + (1 - t0) * v)
            if method == "unipc" and i > 0:  # UniC, its order that of the previous predictor step (nominal)
                x = unic(corrected, preds, times, lam, i, order=1 if i == 1 else 2)
            corrected = x
            d = preds[-1]
            if i > 0 and math.isfinite(lam[i - 1]) and math.isfinite(lam[i + 1]):
                r = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
                d = (1 + 1 / (2 * r)) * preds[-1] - preds[-2] / (2 * r)
            x = (1 - t1) / (1 - t0) * x + (t1 - t0) / (1 - t0) * d
    return x


def unic(x_prev, preds, times, lam, i, order):
    """UniC-bh2 (Zhao et al. 2023, data-prediction form, B(h) = e^{-h} - 1) corrects x_i from the corrected x_{i-1}
    with the model's x̂1 at t_{i-2}, t_{i-1} and at the predicted x_i."""
    h = lam[i] - lam[i - 1]
    alpha, sigma_ratio, hh = times[i], (1 - times[i]) / (1 - times[i - 1]), -h
    m0, mt = preds[i - 1], preds[i]
    base = sigma_ratio * x_prev - alpha * math.expm1(hh) * m0
    if order == 1:
        return base - alpha * math.expm1(hh) * 0.5 * (mt - m0)
    r = (lam[i - 2] - lam[i - 1]) / h
    phi2 = math.expm1(hh) / hh - 1
    b = torch.tensor([phi2 / math.expm1(hh), 2 * (phi2 / hh - 0.5) / math.expm1(hh)], dtype=torch.float64)
    rho = (
        torch.linalg.solve(torch.tensor([[1.0, 1.0], [r, 1.0]], dtype=torch.float64), b)
        if math.isfinite(r)
        else torch.stack([torch.zeros((), dtype=torch.float64), b[0]])
    )  # the limit r -> -inf
    d1 = (preds[i - 2] - m0) / r
    return base - alpha * math.expm1(hh) * (float(rho[0]) * d1 + float(rho[1]) * (mt - m0))


class GuidedField(CondField):
    """Classifier-free guidance in the field, as FlowModel.rollout_field does it: v = v(∅) + w (v(c) - v(∅))."""

    def forward(self, t, x, c, scale):
        uncond = super().forward(t, x, torch.zeros_like(c))
        return uncond + scale[:, None] * (super().forward(t, x, c) - uncond)


@pytest.mark.parametrize("method", MULTISTEP)
@pytest.mark.parametrize("grid", ["uniform", "both_dense", "noise_dense"])
def test_multistep_with_conditioning_and_guidance_equals_the_plain_solver(method, grid):
    from orw_fast.sampling import time_grid

    model = GuidedField(dim=3, hidden=16).double()
    g = torch.Generator().manual_seed(8)
    x0, c = torch.randn(4, 3, dtype=torch.float64, generator=g), torch.randn(4, 3, dtype=torch.float64, generator=g)
    cond, times = (c, torch.full((4,), 3.0, dtype=torch.float64)), time_grid(grid, 7)
    x1, traj = sample(model, x0, times=times, cond=cond, method=method, return_trajectory=True)
    with torch.no_grad():
        expected = plain_multistep(model, x0, times.tolist(), method, cond)
    torch.testing.assert_close(x1, expected, rtol=1e-12, atol=1e-12)
    assert traj.shape == (8, 4, 3) and torch.equal(traj[-1], x1)
    unguided = sample(model, x0, times=times, cond=(c, torch.ones(4, dtype=torch.float64)), method=method)
    assert not torch.allclose(unguided, x1, atol=1e-3)


def test_calls():
    from orw_fast.sampling import calls

    assert [calls(m, 10) for m in FIXED_STEP_METHODS] == [10, 20, 20, 10, 11, 10]
    with pytest.raises(ValueError, match="calls: method must be a fixed-step method"):
        calls("dopri5", 10)


class CountingField(MLPField):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, t, x):
        self.calls += 1
        return super().forward(t, x)


@pytest.mark.parametrize("method", FIXED_STEP_METHODS)
def test_calls_counts_the_model_calls(method):
    from orw_fast.sampling import calls

    model = CountingField()
    sample(model, torch.randn(2, 3), steps=6, method=method)
    assert model.calls == calls(method, 6)


def test_unipc_equals_diffusers_unipc_on_its_shifted_flow_grid(mixture_and_reference):
    """diffusers' UniPCMultistepScheduler (bh2, order 2, predict_x0, use_flow_sigmas, flow_shift 3 as SD3,
    flow_prediction: x̂1 = x - sigma * output, output = -v) on its own grid t = 1 - sigma: the same x̂1, lambda,
    predictor and corrector, first order on the first and last steps as ours; the whole trajectory (the predicted
    states, which is what step() returns). Defined the same way only with these choices: (1) the model here reads the
    scheduler's exact sigma; diffusers' pipelines pass timesteps floored to integers of 1000 sigma, a model-input
    difference, not the solver's; (2) diffusers' grid starts at sigma = 3 * 0.999 / (1 + 2 * 0.999), t = 3.3e-4,
    where lambda is finite, so its second predictor step is second order; on orw_fast's grids from t = 0 (lambda =
    -inf) ours falls to first order there (r = inf, the same formula's limit); (3) diffusers computes its
    coefficients in float32 from float32 sigmas: a relative 1e-7 per coefficient, so 1e-5 on states of size ~2 over
    10 steps is ample, while another solver (ab2) on the same grid differs by > 1e-3 (checked)."""
    from diffusers import UniPCMultistepScheduler

    field, x0, _ = mixture_and_reference
    scheduler = UniPCMultistepScheduler(
        predict_x0=True,
        solver_type="bh2",
        use_flow_sigmas=True,
        flow_shift=3.0,
        prediction_type="flow_prediction",
        solver_order=2,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(10)
    scheduler.set_begin_index(0)
    sigmas = scheduler.sigmas.double()
    x, theirs = x0, [x0]
    for i, timestep in enumerate(scheduler.timesteps):
        output = -field(torch.full((x.shape[0],), 1 - sigmas[i].item(), dtype=torch.float64), x)
        x = scheduler.step(output, timestep, x).prev_sample
        theirs.append(x)
    ours = sample(field, x0, times=1 - sigmas, method="unipc", return_trajectory=True)[1]
    torch.testing.assert_close(ours, torch.stack(theirs), rtol=0, atol=1e-5)
    assert (sample(field, x0, times=1 - sigmas, method="ab2") - theirs[-1]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="ab4", steps=8), "unknown method 'ab4'"),
        (dict(method="ab2", steps=1), "method 'ab2' needs at least 2 steps"),
        (dict(method="ab3", steps=3), "method 'ab3' needs at least 4 steps"),
        (dict(method="unipc", times=[0.0, 0.5, 1.0]), "method 'unipc' needs at least 4 steps"),
        (dict(method="ab3", times=[0.0, 0.2, 0.2, 0.6, 1.0]), "times must be >= 2 increasing values in"),
        (dict(method="unipc", times=[0.0, 0.3, 0.6, 0.9, 1.2]), r"in \[0, 1\]"),
        (dict(method="ab2", times=[1.0, 0.7, 0.3, 0.0]), "times must be >= 2 increasing values in"),
    ],
)
def test_multistep_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(MLPField(), torch.zeros(2, 3), **kwargs)


def test_both_dense_grid():
    from orw_fast.sampling import time_grid

    grid = time_grid("both_dense", 4)
    torch.testing.assert_close(
        grid, torch.tensor([0, (2 - 2**0.5) / 4, 0.5, (2 + 2**0.5) / 4, 1], dtype=torch.float64), rtol=0, atol=1e-15
    )
    steps = time_grid("both_dense", 10).diff()
    assert steps[0] < steps[4] and steps[-1] < steps[5] and torch.allclose(steps, steps.flip(0))


@requires_gpu
@pytest.mark.parametrize("method", MULTISTEP)
@pytest.mark.parametrize("trajectory", [False, True])
def test_multistep_graph_matches_eager(method, trajectory):
    """The captured loop (history inside the graph) replays new noise and conditioning like the eager loop."""
    model = CondField(dim=32, hidden=128).cuda()
    times = [0.0, 0.05, 0.15, 0.3, 0.5, 0.7, 0.85, 0.95, 1.0]
    for seed in (0, 1):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x0, c = torch.randn(64, 32, device="cuda", generator=g), torch.randn(64, 32, device="cuda", generator=g)
        kwargs = dict(times=times, cond=(c,), method=method, return_trajectory=trajectory)
        eager = sample(model, x0, cuda_graph=False, **kwargs)
        graphed = sample(model, x0, cuda_graph=True, **kwargs)
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    assert len(cached(model)) == 1


class ClassField(torch.nn.Module):
    """A class-conditional field on [B, 1, 2, 2] samples: model(t, x, y) with y [B] class labels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net, self.embed = MLPField(dim=4, hidden=16), torch.nn.Embedding(3, 4)

    def forward(self, t, x, y):
        return (self.net(t, x.flatten(1)) + self.embed(y)).view_as(x)


@pytest.mark.parametrize("method", MULTISTEP)
def test_flow_model_generate_with_a_multistep_method(method):
    """FlowModel.generate passes the named grid and the batch's conditions to the multistep solver: equal to the
    textbook loop on the same grid and labels."""
    from orw_fast.models.flow_model import PixelFlowModel
    from orw_fast.sampling import time_grid

    model = ClassField().double()
    flow = PixelFlowModel(model, (1, 2, 2), num_classes=3)
    x0 = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    labels = [0, 2, 1]
    x1 = flow.generate(model, x0, labels, steps=6, method=method, grid="both_dense", cuda_graph=False)
    with torch.no_grad():
        expected = plain_multistep(model, x0, time_grid("both_dense", 6).tolist(), method, (torch.tensor(labels),))
    torch.testing.assert_close(x1, expected, rtol=1e-12, atol=1e-12)
