"""The fused loss on every backend against an independent float64 reference."""

import itertools
import warnings
import zlib

import pytest
import torch
from conftest import DEVICES, GPU_SKIP_REASON, poison_then_free, requires_gpu
from torch.utils._python_dispatch import TorchDispatchMode

import orw_fast
from orw_fast import _native
from orw_fast.ops.orw_cfm_w2 import _triton_available

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}
SHAPES = [(1,), (1, 1), (5, 7), (3, 5, 7, 3), (64, 3, 32, 32), (8, 4, 64, 64)]
# The Triton interpreter costs ~0.3 s per launch on CPU: small shapes only there.
INTERPRETER_SHAPES = [(1,), (5, 7), (3, 5, 7, 3), (4, 3, 8, 8)]


def backend_ok(backend, device):
    if backend == "native":
        return _native.has_kernel("orw_cfm_w2", device)
    if backend == "triton":
        return _triton_available(torch.device(device))
    return True


def skip_unless(backend, device):
    if not backend_ok(backend, device):
        pytest.skip(f"no {backend} kernel for {device}")


def shapes_for(backend, device):
    return INTERPRETER_SHAPES if backend == "triton" and device == "cpu" else SHAPES


def cases(backends=("eager", "native", "triton")):
    return [
        pytest.param(b, d, s, id=f"{b}-{d}-{'x'.join(map(str, s))}")
        for b in backends
        for d in DEVICES
        for s in shapes_for(b, d)
    ]


def reference(v, u, v_ref, rewards=None, weights=None, alpha=1.0, tau=1.0, weighting="softmax"):
    """float64 loss, per-sample terms and weights, written independently of orw_fast."""
    v, u, v_ref = (t.double() for t in (v, u, v_ref))
    B = v.shape[0]
    if weights is not None:
        w = weights.double()
    else:
        z = tau * rewards.double()
        w = {
            "softmax": B * torch.exp(z - z.max()) / torch.exp(z - z.max()).sum(),
            "exp": torch.exp(z),
            "none": torch.ones_like(z),
        }[weighting]
    fm = ((v - u) ** 2).reshape(B, -1).mean(1)
    w2 = ((v - v_ref) ** 2).reshape(B, -1).mean(1)
    return (w * fm + alpha * w2).mean(), fm, w2, w


def rel_err(got, want):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.isfinite(got).all(), "non-finite output"
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def make_inputs(shape, dtype, device, grads=(True, True, True), layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)

    def one(requires_grad):
        if layout == "strided":  # every other element of a wider tensor: not dense
            t = torch.randn(*shape[:-1], 2 * shape[-1], generator=g)[..., ::2]
        elif layout == "transposed" and len(shape) >= 2:  # batch dimension not outermost
            t = torch.randn(*reversed(shape), generator=g).permute(*reversed(range(len(shape))))
        else:
            t = torch.randn(*shape, generator=g)
        t = t.to(device=device, dtype=dtype)
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        if layout == "mixed_size1" and requires_grad:  # v channels-last with C = 1: strides differ only there
            t = t.contiguous(memory_format=torch.channels_last)
        return t.requires_grad_(requires_grad)

    v, u, v_ref = (one(rg) for rg in grads)
    rewards = torch.randn(shape[0], generator=g).to(device)
    return v, u, v_ref, rewards


def check_against_reference(backend, v, u, v_ref, rewards=None, weights=None, **kw):
    dtype = v.dtype
    loss, comp = orw_fast.orw_cfm_w2_loss(
        v, u, v_ref, rewards, weights=weights, backend=backend, return_components=True, **kw
    )
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    loss.backward()
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in (v, u, v_ref)]
    ref = reference(*leaves, rewards=rewards, weights=weights, **kw)
    ref[0].backward()
    tol = TOL[dtype]
    assert rel_err(loss, ref[0]) <= tol
    for got, want in zip(comp, ref[1:]):
        assert rel_err(got, want) <= tol
    for t, r in zip((v, u, v_ref), leaves):
        if t.requires_grad:
            assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
            assert rel_err(t.grad, r.grad) <= tol, "gradient"
    return loss


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend,device,shape", cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_float64_reference(backend, device, shape, dtype):
    skip_unless(backend, device)
    torch.manual_seed(zlib.crc32(repr((backend, shape)).encode()))  # hash() of a str is salted per process
    v, u, v_ref, rewards = make_inputs(shape, dtype, device)
    check_against_reference(backend, v, u, v_ref, rewards, alpha=0.7, tau=1.3)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend", ["eager", "native", "triton"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighting", ["softmax", "exp", "none", "given"])
@pytest.mark.parametrize("alpha", [0.0, 2.5])
def test_weightings_and_alpha(backend, device, weighting, alpha):
    skip_unless(backend, device)
    v, u, v_ref, rewards = make_inputs((6, 2, 5, 3), torch.float32, device, seed=1)
    if weighting == "given":
        weights = torch.rand(6, device=device) * 3
        check_against_reference(backend, v, u, v_ref, weights=weights, alpha=alpha)
    else:
        check_against_reference(backend, v, u, v_ref, rewards, alpha=alpha, tau=0.8, weighting=weighting)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend", ["eager", "native", "triton"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["strided", "transposed", "channels_last", "mixed_size1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs(backend, device, layout, dtype):
    skip_unless(backend, device)
    shape = (5, 1, 6, 7) if layout == "mixed_size1" else (5, 3, 6, 7)
    grads = (True, False, False) if layout == "mixed_size1" else (True, True, True)
    v, u, v_ref, rewards = make_inputs(shape, dtype, device, grads=grads, layout=layout, seed=2)
    check_against_reference(backend, v, u, v_ref, rewards, alpha=0.5)


@pytest.mark.parametrize("backend", ["eager", "native", "triton"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grads", [(True, False, False), (False, True, True), (False, False, False)])
def test_gradient_flags(backend, device, grads):
    """Only inputs that require grad get one; with none, the loss still comes out."""
    skip_unless(backend, device)
    v, u, v_ref, rewards = make_inputs((4, 9), torch.float32, device, grads=grads, seed=3)
    if any(grads):
        check_against_reference(backend, v, u, v_ref, rewards, alpha=1.5)
    else:
        loss = orw_fast.orw_cfm_w2_loss(v, u, v_ref, rewards, backend=backend)
        assert not loss.requires_grad
        assert rel_err(loss, reference(v, u, v_ref, rewards)[0]) <= 1e-5


@pytest.mark.parametrize("backend", ["eager", "native", "triton"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_extreme_rewards_stay_finite_under_softmax(backend, device, scale):
    skip_unless(backend, device)
    v, u, v_ref, _ = make_inputs((8, 5), torch.float32, device, seed=4)
    rewards = torch.tensor([1.0, -1.0, 0.5, 1.0, -0.25, 0.999, 0.0, -1.0], device=device) * scale
    loss = check_against_reference(backend, v, u, v_ref, rewards, tau=1.0)
    assert torch.isfinite(loss)


# (rewards, tau): tau * r beyond float32 (3e38 * 2), float64 rewards beyond float32 with float32 predictions,
# a reward spread beyond float32 (r - r* overflows) with a tiny tau, and with the largest negative tau.
RANGE_CASES = {
    "tau_r_overflows": ([3e38, 0.0, 1.0, 2.0], torch.float32, 2.0),
    "float64_rewards_1e300": ([1e300, 0.0, 1.0, 2.0], torch.float64, 1.0),
    "float64_rewards_tiny_tau": ([1e300, -1e300, 3.0, 2.0], torch.float64, 1e-300),
    "spread_overflows_small_tau": ([3e38, -3e38, 0.0, 1.0], torch.float32, 1e-37),
    "most_negative_tau": ([3e38, -3e38, 0.0, 1.0], torch.float32, -3.4e38),
    "zero_tau": ([3e38, -3e38, 0.0, 1.0], torch.float32, 0.0),
}


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend", ["eager", "native", "triton"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", RANGE_CASES)
def test_softmax_is_finite_for_every_finite_input(backend, device, case):
    """The softmax promise (finite weights, mean 1) holds where tau * r or r - max r leaves float32's range;
    the float64 reference shifts in float64, where these are representable."""
    skip_unless(backend, device)
    values, dtype, tau = RANGE_CASES[case]
    v, u, v_ref, _ = make_inputs((4, 5), torch.float32, device, seed=19)
    rewards = torch.tensor(values, dtype=dtype, device=device)
    loss = check_against_reference(backend, v, u, v_ref, rewards, tau=tau)
    assert torch.isfinite(loss)
    weights = orw_fast.reward_weights(rewards, tau)
    assert torch.isfinite(weights).all() and weights.sum().item() == pytest.approx(4.0, rel=1e-6)


@pytest.mark.parametrize("backend", ["eager", "native", "triton"])
@pytest.mark.parametrize("name", ["tau", "alpha"])
@pytest.mark.parametrize("value", [1e39, -1e39, 10**400, float("inf")], ids=["1e39", "-1e39", "10**400", "inf"])
def test_scalars_beyond_the_computation_dtype_are_refused(backend, name, value):
    """tau and alpha are used in float32 for float32 predictions: one float32 cannot hold must be refused
    (a Python int beyond float64 too), naming the argument; float64 predictions take float64's range."""
    skip_unless(backend, "cpu")
    if name == "alpha" and value < 0:
        value = -value
    with pytest.raises(ValueError, match=rf"{name} must be a finite number"):
        _bad(backend=backend, **{name: value})()
    v, u, v_ref, rewards = make_inputs((4, 3), torch.float64, "cpu", seed=13)
    call = lambda: orw_fast.orw_cfm_w2_loss(v, u, v_ref, rewards, backend=backend, **{name: value})  # noqa: E731
    if abs(value) == 1e39:  # float64 holds it
        assert torch.isfinite(call())
    else:
        with pytest.raises(ValueError, match=rf"{name} must be a finite number"):
            call()


def test_exp_weights_that_overflow_are_refused():
    """exp(tau r) of the official code is inf for tau * r > 88.7 in float32: a clear error instead of inf."""
    rewards = torch.tensor([100.0, 0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="weighting='exp' overflows"):
        _bad(rewards=rewards, weighting="exp")()
    with pytest.raises(ValueError, match="weighting='exp' overflows"):
        orw_fast.reward_weights(rewards, 1.0, "exp")
    assert torch.isinf(orw_fast.reward_weights(rewards, 1.0, "exp", validate=False)[0])


@pytest.mark.parametrize("backend", ["eager", "native"])
def test_gradcheck_float64(backend):
    skip_unless(backend, "cpu")
    v, u, v_ref, rewards = make_inputs((3, 4), torch.float64, "cpu", seed=5)
    for weighting in ("softmax", "exp"):

        def fn(a, b, c, weighting=weighting):
            return orw_fast.orw_cfm_w2_loss(a, b, c, rewards, alpha=0.3, weighting=weighting, backend=backend)

        assert torch.autograd.gradcheck(fn, (v, u, v_ref))


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("device", DEVICES)
def test_bitwise_deterministic(backend, device):
    skip_unless(backend, device)
    shape = (3, 5, 7, 3) if device == "cpu" and backend == "triton" else (16, 3, 40, 41)
    v, u, v_ref, rewards = make_inputs(shape, torch.float32, device, grads=(False, False, False), seed=6)
    v.requires_grad_()
    runs = []
    for _ in range(2):
        loss, comp = orw_fast.orw_cfm_w2_loss(v, u, v_ref, rewards, backend=backend, return_components=True)
        (grad,) = torch.autograd.grad(loss, v)
        runs.append((loss, *comp, grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(7, 3, 5), (4, 2, 40, 40), (2, 3, 75, 75)], ids=lambda s: "x".join(map(str, s)))
def test_cpu_streaming_stores_change_no_bits(monkeypatch, dtype, shape):
    """The CPU kernel's streaming gradient stores and non-temporal input prefetches (csrc/cpu_stream.h: used when a
    call moves more bytes than ORW_FAST_STREAM_BYTES, default the last-level cache) give the outputs of plain stores
    bit for bit, on odd sizes (unaligned chunks fall back to plain stores), aligned ones, and a sample of two chunks,
    for every gradient."""
    if _native.IMPORT_ERROR is not None:
        pytest.fail(f"the native extension did not load: {_native.IMPORT_ERROR}")
    v, u, v_ref, rewards = (t.detach() for t in make_inputs(shape, dtype, "cpu", grads=(False,) * 3, seed=12))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    op = torch.ops.orw_fast.orw_cfm_w2.default
    for flags in ((True, True, True), (True, False, False), (False, True, True)):
        monkeypatch.setenv("ORW_FAST_STREAM_BYTES", str(2**62))
        plain = op(v, u, v_ref, rewards.to(acc), 0.3, 1.0, 0, *flags)
        monkeypatch.setenv("ORW_FAST_STREAM_BYTES", "0")
        poison_then_free(v)
        streamed = op(v, u, v_ref, rewards.to(acc), 0.3, 1.0, 0, *flags)
        for got, want in zip(streamed, plain):
            assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["eager", "native", "triton"])
@pytest.mark.parametrize("device", DEVICES)
def test_grad_output_scaling_and_retained_graph(backend, device):
    """backward scales by grad_output (saved gradients are reused in place only when the graph is
    freed); a retained graph gives the same gradient twice."""
    skip_unless(backend, device)
    v, u, v_ref, rewards = make_inputs((4, 3, 5), torch.float32, device, grads=(True, False, True), seed=18)
    leaves = [v.detach().double().requires_grad_(), v_ref.detach().double().requires_grad_()]
    want = torch.autograd.grad(-2.5 * reference(leaves[0], u, leaves[1], rewards)[0], leaves)
    loss = orw_fast.orw_cfm_w2_loss(v, u, v_ref, rewards, backend=backend)
    first = torch.autograd.grad(-2.5 * loss, (v, v_ref), retain_graph=True)
    second = torch.autograd.grad(-2.5 * loss, (v, v_ref))
    for a, b, w in zip(first, second, want):
        assert torch.equal(a, b) and rel_err(a, w) <= 1e-5


@pytest.mark.parametrize("backend", ["eager", "native", "triton"])
def test_precomputed_global_weights_split_equals_full_batch(backend):
    """Multi-process training: weights normalized over the global batch, each process gets a slice;
    with equal shares the mean of the per-slice losses is the full-batch loss."""
    skip_unless(backend, "cpu")
    v, u, v_ref, rewards = make_inputs((8, 6), torch.float32, "cpu", grads=(False, False, False), seed=7)
    full = orw_fast.orw_cfm_w2_loss(v, u, v_ref, rewards, backend=backend, alpha=0.4)
    w = orw_fast.reward_weights(rewards, tau=1.0)
    halves = [
        orw_fast.orw_cfm_w2_loss(v[s], u[s], v_ref[s], weights=w[s], backend=backend, alpha=0.4)
        for s in (slice(0, 4), slice(4, 8))
    ]
    assert rel_err((halves[0] + halves[1]) / 2, full) <= 1e-6


def test_rewards_and_weights_never_get_gradients():
    v, u, v_ref, rewards = make_inputs((4, 3), torch.float32, "cpu", seed=8)
    rewards.requires_grad_()
    weights = torch.rand(4, requires_grad=True)
    orw_fast.orw_cfm_w2_loss(v, u, v_ref, rewards).backward()
    orw_fast.orw_cfm_w2_loss(v, u, v_ref, weights=weights).backward()
    assert rewards.grad is None and weights.grad is None


@pytest.mark.parametrize("backend", ["eager", "native"])
def test_mixed_input_dtypes_promote(backend):
    """Under autocast the model's prediction is bf16 while the target is fp32."""
    skip_unless(backend, "cpu")
    v, u, v_ref, rewards = make_inputs((4, 3, 5), torch.float32, "cpu", seed=9)
    vb = v.detach().bfloat16().requires_grad_()
    loss = orw_fast.orw_cfm_w2_loss(vb, u, v_ref, rewards, backend=backend)
    loss.backward()
    ref = reference(vb.detach(), u.detach(), v_ref.detach(), rewards)[0]
    assert rel_err(loss, ref) <= 1e-5 and vb.grad.dtype == torch.bfloat16 and u.grad.dtype == torch.float32


def test_module_matches_function_and_reports_settings():
    crit = orw_fast.ORWCFMW2Loss(
        alpha=0.5, tau=2.0, weighting="exp", backend="native" if backend_ok("native", "cpu") else "eager"
    )
    v, u, v_ref, rewards = make_inputs((4, 7), torch.float32, "cpu", grads=(False, False, False), seed=10)
    want = orw_fast.orw_cfm_w2_loss(v, u, v_ref, rewards, alpha=0.5, tau=2.0, weighting="exp", backend="eager")
    assert rel_err(crit(v, u, v_ref, rewards), want) <= 1e-5
    assert "alpha=0.5" in repr(crit)


def test_exp_weighting_equals_official_compute_loss():
    """The official trainer: weights = exp(tau * r); loss = mean(w * mse_i) + alpha * mean(w2_i)."""
    v, u, v_ref, rewards = make_inputs((5, 3, 4), torch.float32, "cpu", grads=(False, False, False), seed=11)
    w = torch.exp(0.7 * rewards)
    official = (w * ((v - u) ** 2).mean(dim=(1, 2))).mean() + 0.2 * ((v - v_ref) ** 2).mean(dim=(1, 2)).mean()
    ours = orw_fast.orw_cfm_w2_loss(v, u, v_ref, rewards, alpha=0.2, tau=0.7, weighting="exp")
    assert rel_err(ours, official) <= 1e-6


def test_reward_weights():
    r = torch.tensor([0.0, 1.0, 2.0])
    w = orw_fast.reward_weights(r, tau=2.0)
    assert rel_err(w, 3 * torch.softmax(2.0 * r.double(), 0)) <= 1e-6 and abs(w.mean().item() - 1) < 1e-6
    assert torch.equal(orw_fast.reward_weights(r, weighting="none"), torch.ones(3))
    assert rel_err(orw_fast.reward_weights(r, 0.5, "exp"), torch.exp(0.5 * r)) <= 1e-7
    assert orw_fast.reward_weights(r.double()).dtype == torch.float64


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not backend_ok("native", "cpu"), reason="extension not built")
def test_auto_backend_prefers_native():
    v, u, v_ref, rewards = make_inputs((2, 3), torch.float32, "cpu", seed=12)
    with RecordOps() as rec:
        orw_fast.orw_cfm_w2_loss(v, u, v_ref, rewards)
    assert "orw_fast.orw_cfm_w2.default" in rec.names


# --- bad input --------------------------------------------------------------------------------


def _bad(**overrides):
    v, u, v_ref, rewards = make_inputs((4, 3), torch.float32, "cpu", seed=13)
    args = dict(v=v, u=u, v_ref=v_ref, rewards=rewards)
    args.update(overrides)
    kwargs = {k: args.pop(k) for k in list(args) if k not in ("v", "u", "v_ref")}
    return lambda: orw_fast.orw_cfm_w2_loss(args["v"], args["u"], args["v_ref"], **kwargs)


@pytest.mark.parametrize(
    "overrides,exc,match",
    [
        (dict(u=torch.randn(4, 4)), ValueError, "u must have the shape"),
        (dict(v_ref=torch.randn(3, 3)), ValueError, "v_ref must have the shape"),
        (dict(rewards=torch.randn(5)), ValueError, r"rewards must have shape \[B\] = \[4\]"),
        (dict(rewards=torch.randn(4, 1)), ValueError, "rewards must have shape"),
        (dict(rewards=torch.ones(4, dtype=torch.int64)), TypeError, "rewards must be a floating tensor"),
        (dict(rewards=[1.0, 2.0, 3.0, 4.0]), TypeError, "rewards must be a torch.Tensor"),
        (dict(rewards=torch.tensor([0.0, float("nan"), 1.0, float("inf")])), ValueError, "rewards has 2 non-finite"),
        (dict(v=torch.ones(4, 3, dtype=torch.int32)), TypeError, "v must be a floating tensor"),
        (dict(u=torch.ones(4, 3, dtype=torch.int64)), TypeError, "u must be a floating tensor"),
        (dict(v=torch.randn(())), ValueError, "v must be a non-empty"),
        (dict(v=torch.randn(0, 3), u=torch.randn(0, 3), v_ref=torch.randn(0, 3)), ValueError, "v must be a non-empty"),
        (dict(u=torch.randn(4, 3, device="meta")), ValueError, "u is on meta but v is on cpu"),
        (dict(rewards=torch.randn(4, device="meta")), ValueError, "rewards is on meta"),
        (dict(weighting="linear"), ValueError, "weighting must be one of"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(alpha=-0.1), ValueError, "alpha must be a finite number >= 0"),
        (dict(alpha=float("nan")), ValueError, "alpha must be"),
        (dict(alpha=True), ValueError, "alpha must be a finite number"),
        (dict(alpha=10**400), ValueError, "alpha must be a finite number >= 0 representable"),
        (dict(alpha=1e39), ValueError, r"alpha must be a finite number >= 0 representable in torch.float32"),
        (dict(tau="1"), ValueError, "tau must be a finite number"),
        (dict(tau=float("inf")), ValueError, "tau must be a finite number"),
        (dict(tau=None), ValueError, "tau must be a finite number"),
        (dict(rewards=None), ValueError, "exactly one of rewards= or weights="),
        (dict(weights=torch.ones(4)), ValueError, "exactly one of rewards= or weights="),
    ],
)
def test_bad_input_raises_clear_error(overrides, exc, match):
    with pytest.raises(exc, match=match):
        _bad(**overrides)()


def test_argument_fast_paths_skip_only_calls_that_change_nothing():
    """as_constant and common_dtype (run on every loss call) equal .detach().to(dtype) and promote_types."""
    from orw_fast.ops.reward_weights import as_constant, common_dtype

    t = torch.randn(3)
    assert as_constant(t, torch.float32) is t
    graded = torch.randn(3, requires_grad=True)
    kept = as_constant(graded, torch.float32)
    assert not kept.requires_grad and kept.data_ptr() == graded.data_ptr()
    widened = as_constant(graded, torch.float64)
    assert not widened.requires_grad and torch.equal(widened, graded.detach().double())
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for a, b, c in itertools.product(floats, repeat=3):
        tensors = [torch.empty(1, dtype=d) for d in (a, b, c)]
        assert common_dtype(*tensors) == torch.promote_types(torch.promote_types(a, b), c)


def test_bad_module_settings_raise():
    with pytest.raises(ValueError, match="alpha"):
        orw_fast.ORWCFMW2Loss(alpha=-1)
    with pytest.raises(ValueError, match="weighting"):
        orw_fast.ORWCFMW2Loss(weighting="max")
    with pytest.raises(ValueError, match="backend"):
        orw_fast.ORWCFMW2Loss(backend="fast")


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _bad(backend="triton")()


# --- custom-op machinery ------------------------------------------------------------------------


def _op_args(device, dtype=torch.float32, flags=(True, True, True), weighting=0):
    v, u, v_ref, rewards = make_inputs((3, 2, 5), dtype, device, grads=flags, seed=14)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (v, u, v_ref, rewards.to(acc), 0.5, 1.2, weighting, *flags)


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flags", [(True, True, True), (True, False, False), (False, False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(backend, device, flags, dtype):
    skip_unless(backend, device)
    if backend == "native":
        op = torch.ops.orw_fast.orw_cfm_w2.default
    else:
        from orw_fast.ops.triton.orw_cfm_w2 import orw_cfm_w2_triton as op
    torch.library.opcheck(op, _op_args(device, dtype, flags))


@pytest.mark.parametrize("backend", ["native", "triton", "eager"])
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(backend, device, monkeypatch):
    """A training-step-like function compiles into one graph, without a warning from Dynamo (it warned on every
    lru_cache-wrapped helper it traced), and matches eager execution."""
    skip_unless(backend, device)
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.utils, "warn_once_cache", set())  # warn_once: once per process
    lin = torch.nn.Linear(6, 6).to(device)

    def step(x, u, v_ref, rewards):
        loss, comp = orw_fast.orw_cfm_w2_loss(
            lin(x), u, v_ref, rewards, alpha=0.3, backend=backend, return_components=True, validate=False
        )
        return loss, comp.fm.sum()

    x, u, v_ref, rewards = make_inputs((5, 6), torch.float32, device, grads=(False, False, False), seed=15)
    compiled = torch.compile(step, fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, got_fm = compiled(x, u, v_ref, rewards)
    assert not [str(w.message) for w in caught if "Dynamo" in str(w.message)]
    got_grad = torch.autograd.grad(got, lin.weight)[0]
    want, want_fm = step(x, u, v_ref, rewards)
    want_grad = torch.autograd.grad(want, lin.weight)[0]
    assert rel_err(got, want) <= 1e-5 and rel_err(got_fm, want_fm) <= 1e-5
    assert rel_err(got_grad, want_grad) <= 1e-5


# --- GPU-only ---------------------------------------------------------------------------------

gpu = requires_gpu


@gpu
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_graph_capture_of_loss_and_backward(backend, dtype):
    skip_unless(backend, "cuda")
    shape = (16, 3, 32, 32)
    v, u, v_ref, rewards = (t.detach() for t in make_inputs(shape, dtype, "cuda", seed=16))
    v.requires_grad_()

    def step():
        loss = orw_fast.orw_cfm_w2_loss(v, u, v_ref, rewards, backend=backend, alpha=0.5)
        (g,) = torch.autograd.grad(loss, v)
        return loss, g

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()  # warm-up: lazy init and the allocator's pools outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_grad = step()
    fresh = make_inputs(shape, dtype, "cuda", seed=17)
    with torch.no_grad():
        for dst, src in zip((v, u, v_ref, rewards), fresh):
            dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    want_loss, want_grad = step()
    assert torch.equal(static_loss, want_loss) and torch.equal(static_grad, want_grad)


@gpu
def test_cuda_large_tensor_offsets():
    """More than 2^31 elements in total: offsets must be 64-bit (needs ~13 GB of GPU memory)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip(f"{GPU_SKIP_REASON} with 16 GiB free")
    n = 2**31 + 2**20
    B = 2
    v = torch.zeros(B, n // B, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    u = torch.ones_like(v, requires_grad=False)
    loss, comp = orw_fast.orw_cfm_w2_loss(
        v, u, u, weights=torch.ones(B, device="cuda"), backend="native", alpha=0.0, return_components=True
    )
    assert abs(loss.item() - 1.0) < 1e-6 and torch.allclose(comp.fm, torch.ones(B, device="cuda"))
    (g,) = torch.autograd.grad(loss, v)
    assert g[-1, -1].item() == pytest.approx(-2.0 / n, rel=1e-2)
    del g
