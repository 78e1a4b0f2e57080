"""The fused NFT and AWM losses (the quadratic_fm op) on every backend against float64 references written
plainly from the papers' formulas in orw_fast's convention (orw_fast/ops/nft.py, awm.py)."""

import zlib

import pytest
import torch
from conftest import DEVICES, poison_then_free, requires_gpu

import orw_fast
from orw_fast import _native
from orw_fast.ops.orw_cfm_w2 import _triton_available

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(1,), (5, 7), (3, 5, 7, 3), (64, 3, 32, 32), (2, 3, 75, 75)]  # the last: several chunks per sample
INTERPRETER_SHAPES = [(1,), (5, 7), (3, 5, 7, 3)]  # the Triton interpreter: ~0.3 s per launch
BACKENDS = ["eager", "native", "triton"]
NAMES = ("v", "u", "v_old", "v_ref")


def skip_unless(backend, device):
    ok = {
        "native": lambda: _native.has_kernel("quadratic_fm", device),
        "triton": lambda: _triton_available(torch.device(device)),
    }.get(backend, lambda: True)()
    if not ok:
        pytest.skip(f"no {backend} kernel for {device}")


def cases(adaptive=None):
    """(backend, device, shape[, adaptive]) for every backend and device; with ``adaptive`` (the NFT adaptive weight
    on or off) fewer shapes where it is on: odd ones and one of several chunks per sample (and one on the
    interpreter)."""
    if adaptive is None:
        return [
            pytest.param(b, d, s, id=f"{b}-{d}-{'x'.join(map(str, s))}")
            for b in BACKENDS
            for d in DEVICES
            for s in (INTERPRETER_SHAPES if b == "triton" and d == "cpu" else SHAPES)
        ]
    interpreter, shapes = (INTERPRETER_SHAPES, SHAPES) if not adaptive else ([(5, 7)], [(1,), (5, 7), (2, 3, 75, 75)])
    return [
        pytest.param(b, d, s, adaptive, id=f"{b}-{d}-{'x'.join(map(str, s))}{'-adaptive' if adaptive else ''}")
        for b in BACKENDS
        for d in DEVICES
        for s in (interpreter if b == "triton" and d == "cpu" else shapes)
    ]


# --- float64 references, from the formulas ------------------------------------------------------


def nft_reference(v, u, v_old, v_ref, r, beta, alpha, adaptive_scale=None):
    v, u, v_old, v_ref, r = (t.double() for t in (v, u, v_old, v_ref, r))
    B = v.shape[0]
    v_plus = (1 - beta) * v_old + beta * v
    v_minus = (1 + beta) * v_old - beta * v
    pos, neg = ((v_plus - u) ** 2).reshape(B, -1).mean(1), ((v_minus - u) ** 2).reshape(B, -1).mean(1)
    if adaptive_scale is not None:  # the reference code's weight, in our convention: s^2 / max(s mean|v± - u|, 1e-5)
        s = adaptive_scale.double()
        with torch.no_grad():
            w_pos = s**2 / torch.clamp(s * (v_plus - u).abs().reshape(B, -1).mean(1), min=1e-5)
            w_neg = s**2 / torch.clamp(s * (v_minus - u).abs().reshape(B, -1).mean(1), min=1e-5)
        pos, neg = w_pos * pos, w_neg * neg
    policy = (r * pos + (1 - r) * neg) / beta
    kl = ((v - v_ref) ** 2).reshape(B, -1).mean(1)
    return (policy + alpha * kl).mean(), policy, kl


def awm_reference(
    v, u, v_ref, adv, alpha, v_old=None, alpha_old=0.0, weighting="uniform", sigma=None, ghuber_power=0.25
):
    """The loss's value is mean_i [A_i f_i mse_i + α_old ...] + α kl (f_i the weighting's detached factor, written
    from its table); its gradient is the reference code's on-policy PPO term's, -mean_i A_i exp(ℓ_i - sg ℓ_i), with ℓ
    the reference's weighted "log-probability" (scxue/advantage_weighted_matching compute_log_prob_awm)."""
    v, u, v_ref, adv = (t.double() for t in (v, u, v_ref, adv))
    B = v.shape[0]
    mse = ((v - u) ** 2).reshape(B, -1).mean(1)
    s = None if sigma is None else sigma.double()
    p, eps = ghuber_power, 1e-10
    ell, factor = {
        "uniform": lambda m: (-m, torch.ones_like(m)),
        "t": lambda m: (-m * s, s),
        "t**2": lambda m: (-m * s**2, s**2),
        "huber": lambda m: (-(torch.sqrt(m + eps) - 1e-5) * s, s / (2 * torch.sqrt(m + eps))),
        "ghuber": lambda m: (-((m + eps) ** p - eps**p) * s / p, s * (m + eps) ** (p - 1)),
    }[weighting](mse)
    ppo = -adv * torch.exp(ell - ell.detach())  # value -A, gradient -A grad(ell)
    policy = adv * factor.detach() * mse.detach() + (ppo - ppo.detach())
    if v_old is not None:
        policy = policy + alpha_old * ((v - v_old.double()) ** 2).reshape(B, -1).mean(1)
    kl = ((v - v_ref) ** 2).reshape(B, -1).mean(1)
    return (policy + alpha * kl).mean(), policy, kl


def stable_seed(*key) -> int:
    """A seed per test case, the same in every process (hash() of a string is salted per process)."""
    return zlib.crc32(repr(key).encode())


def rel_err(got, want):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.isfinite(got).all(), "non-finite output"
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def make_inputs(shape, dtype, device, grads=(True, True, True, True), layout="contiguous", seed=0, scale=1.0):
    """v, u, v_old, v_ref (v_old near v, as an EMA of the policy is), fresh random values per seed."""
    g = torch.Generator().manual_seed(seed)

    def draw():
        if layout == "strided":  # every other element of a wider tensor: not dense
            return torch.randn(*shape[:-1], 2 * shape[-1], generator=g)[..., ::2]
        if layout == "transposed":  # batch dimension not outermost
            return torch.randn(*reversed(shape), generator=g).permute(*reversed(range(len(shape))))
        return torch.randn(*shape, generator=g)

    v = draw() * scale
    base = [v, draw() * scale, v + 0.3 * draw() * scale, draw() * scale]
    out = []
    for t, rg in zip(base, grads):
        t = t.to(device=device, dtype=dtype)
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(t.requires_grad_(rg))
    return out


def check(kind, backend, tensors, per_sample, **kw):
    """Runs the op, backward, and compares loss, components and every requested gradient with the float64
    reference; returns the loss."""
    dtype = tensors[0].dtype
    if kind == "nft":
        v, u, v_old, v_ref = tensors
        loss, comp = orw_fast.nft_loss(v, u, v_old, v_ref, per_sample, backend=backend, return_components=True, **kw)
        ref_fn = lambda a, b, c, d: nft_reference(a, b, c, d, per_sample, **kw)  # noqa: E731
    else:
        v, u, v_old, v_ref = tensors
        loss, comp = orw_fast.awm_loss(
            v, u, v_ref, per_sample, v_old=v_old, backend=backend, return_components=True, **kw
        )
        ref_fn = lambda a, b, c, d: awm_reference(a, b, d, per_sample, v_old=c, **kw)  # noqa: E731
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    present = [t for t in tensors if t is not None]
    if loss.requires_grad:
        loss.backward()
    leaves = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    ref = ref_fn(*leaves)
    if ref[0].requires_grad:
        ref[0].backward()
    tol = TOL[dtype]
    # The loss is a mean of signed terms (AWM's advantages): a float sum is accurate relative to the sum of the
    # terms' magnitudes, not to a result that cancels to near 0. For NFT (all terms >= 0) this is the loss itself.
    magnitude = (ref[1].abs() + kw.get("alpha", 0.0) * ref[2]).mean()
    assert abs(loss.item() - ref[0].item()) <= tol * magnitude.item()
    assert rel_err(comp.policy, ref[1]) <= tol and rel_err(comp.kl, ref[2]) <= tol
    for name, t, leaf in zip(NAMES, tensors, leaves):
        if t is not None and t.requires_grad:
            assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
            assert rel_err(t.grad, leaf.grad) <= tol, f"gradient of {name}"
    assert present
    return loss


def rand_r(batch, device, seed):
    r = torch.rand(batch, generator=torch.Generator().manual_seed(seed))
    r[0] = 1.0  # the ends of [0, 1]
    if batch > 1:
        r[1] = 0.0
    return r.to(device)


def rand_s(batch, device, seed):
    """s = 1 - t in [0, 1] with both ends, and 1e-7 (s mean|v± - u| < 1e-5: the weight's floor)."""
    s = torch.rand(batch, generator=torch.Generator().manual_seed(seed + 1))
    s[0] = 0.0
    s[1:2] = 1.0
    s[2:3] = 1e-7
    return s.to(device)


def rand_adv(batch, device, seed):
    return (2 * torch.randn(batch, generator=torch.Generator().manual_seed(seed))).to(device)  # signed


# --- against the references ---------------------------------------------------------------------


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend,device,shape,adaptive", cases(False) + cases(True))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nft_matches_float64_reference(backend, device, shape, dtype, adaptive):
    skip_unless(backend, device)
    seed = stable_seed(backend, shape, dtype, adaptive)
    tensors = make_inputs(shape, dtype, device, seed=seed)
    kw = dict(adaptive_scale=rand_s(shape[0], device, seed)) if adaptive else {}
    check("nft", backend, tensors, rand_r(shape[0], device, seed), beta=0.7, alpha=0.3, **kw)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend,device,shape", cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_old", [False, True], ids=["no_old", "ema_kl"])
def test_awm_matches_float64_reference(backend, device, shape, dtype, with_old):
    skip_unless(backend, device)
    seed = stable_seed(backend, shape, dtype, with_old)
    v, u, v_old, v_ref = make_inputs(shape, dtype, device, seed=seed)
    kw = dict(alpha_old=0.6) if with_old else {}
    check("awm", backend, [v, u, v_old if with_old else None, v_ref], rand_adv(shape[0], device, seed), alpha=0.4, **kw)


def rand_sigma(batch, device, seed):
    """σ = 1 - t in [0, 1] with both ends."""
    sigma = torch.rand(batch, generator=torch.Generator().manual_seed(seed + 2))
    sigma[0] = 1.0
    sigma[1:2] = 0.0
    return sigma.to(device)


def weighting_cases():
    """(backend, device, shape, weighting): every weighting on odd shapes and one of several chunks per sample; on
    the Triton interpreter one shape and the two kinds (a per-sample constant; one needing the first pass)."""
    return [
        pytest.param(b, d, s, w, id=f"{b}-{d}-{'x'.join(map(str, s))}-{w}")
        for b in BACKENDS
        for d in DEVICES
        for w in (("t", "ghuber") if b == "triton" and d == "cpu" else ("t", "t**2", "huber", "ghuber"))
        for s in ([(5, 7)] if b == "triton" and d == "cpu" else [(1,), (5, 7), (2, 3, 75, 75)])
    ]


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend,device,shape,weighting", weighting_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_awm_weightings_match_the_reference_codes_gradient(backend, device, shape, dtype, weighting):
    """Each weighting's loss against the float64 reference, whose gradient is the AWM code's on-policy PPO term
    with that weighting's ℓ: the detached factor f = -dℓ/dmse is the right one. One sample has v = u (mse 0: ghuber's
    factor is 1e-10^(p-1), ~3e7), and σ takes both ends."""
    skip_unless(backend, device)
    seed = stable_seed(backend, shape, dtype, weighting)
    v, u, v_old, v_ref = make_inputs(shape, dtype, device, seed=seed)
    if shape[0] > 2:
        with torch.no_grad():
            u[2] = v[2]
    kw = dict(weighting=weighting, sigma=rand_sigma(shape[0], device, seed), alpha_old=0.6)
    if weighting == "ghuber":
        kw["ghuber_power"] = 0.25 if shape[0] != 5 else 0.6
    check("awm", backend, [v, u, v_old, v_ref], rand_adv(shape[0], device, seed), alpha=0.4, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_awm_ghuber_without_old_policy(backend):
    skip_unless(backend, "cpu")
    v, u, _, v_ref = make_inputs((6, 4, 3), torch.float32, "cpu", seed=21)
    kw = dict(weighting="ghuber", sigma=rand_sigma(6, "cpu", 21))
    check("awm", backend, [v, u, None, v_ref], rand_adv(6, "cpu", 21), alpha=0.4, **kw)


def test_awm_weighting_uniform_is_the_plain_loss_bit_for_bit():
    v, u, v_old, v_ref = make_inputs((6, 4, 3), torch.float32, "cpu", grads=(False,) * 4, seed=22)
    adv, sigma = rand_adv(6, "cpu", 22), rand_sigma(6, "cpu", 22)
    for backend in BACKENDS:
        plain = orw_fast.awm_loss(v, u, v_ref, adv, v_old=v_old, alpha=0.4, alpha_old=0.6, backend=backend)
        same = orw_fast.awm_loss(
            v, u, v_ref, adv, v_old=v_old, alpha=0.4, alpha_old=0.6, weighting="uniform", sigma=sigma, backend=backend
        )
        assert torch.equal(plain, same)
        t_one = orw_fast.awm_loss(
            v,
            u,
            v_ref,
            adv,
            v_old=v_old,
            alpha=0.4,
            alpha_old=0.6,
            weighting="t",
            sigma=torch.ones(6),
            backend=backend,
        )
        torch.testing.assert_close(t_one, plain, rtol=1e-6, atol=0)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["strided", "transposed", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs(backend, device, layout, dtype):
    skip_unless(backend, device)
    tensors = make_inputs((5, 3, 6, 7), dtype, device, layout=layout, seed=2)
    # NFT's adaptive weight in bfloat16, the plain loss in float32: both forms in every layout at no extra cost
    kw = dict(adaptive_scale=rand_s(5, device, 2)) if dtype == torch.bfloat16 else {}
    check("nft", backend, tensors, rand_r(5, device, 2), beta=1.3, alpha=0.5, **kw)
    tensors = make_inputs((5, 3, 6, 7), dtype, device, layout=layout, seed=3)
    check("awm", backend, tensors, rand_adv(5, device, 3), alpha=0.5, alpha_old=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grads", [(True, False, False, False), (False, True, True, True), (False,) * 4])
def test_gradient_flags(backend, device, grads):
    """Only inputs that require grad get one; with none, the loss still comes out."""
    skip_unless(backend, device)
    tensors = make_inputs((4, 9), torch.float32, device, grads=grads, seed=4)
    loss = check("nft", backend, tensors, rand_r(4, device, 4), beta=0.4, alpha=1.5)
    assert loss.requires_grad == any(grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beta,adaptive", [(1e-3, False), (1.0, False), (30.0, False), (1e-3, True), (30.0, True)])
def test_nft_beta_range_and_extreme_values(backend, device, beta, adaptive):
    """Small and large beta, velocities of size 1e3 in bfloat16 (squares far beyond bf16's precision, accumulated
    in float32) and r at 0 and 1; with the adaptive weight, s at 0, 1, at its floor (1e-9) and large (1e3)."""
    skip_unless(backend, device)
    tensors = make_inputs((4, 2, 5), torch.bfloat16, device, seed=5, scale=1e3)
    kw = dict(adaptive_scale=torch.tensor([0.0, 1.0, 1e-9, 1e3], device=device)) if adaptive else {}
    check("nft", backend, tensors, torch.tensor([0.0, 1.0, 0.5, 1.0], device=device), beta=beta, alpha=0.1, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_awm_extreme_advantages(backend, device):
    skip_unless(backend, device)
    tensors = make_inputs((4, 2, 5), torch.bfloat16, device, seed=6, scale=1e2)  # fp16 grads would overflow
    check("awm", backend, tensors, torch.tensor([1e6, -1e6, 0.0, -3.5], device=device), alpha=0.2, alpha_old=1.0)


def test_nft_r1_beta1_is_orw_cfm_w2_with_unit_weights():
    """v+ = v at beta = 1: NFT with r = 1 is plain weighted flow matching; v_old drops out."""
    v, u, v_old, v_ref = make_inputs((6, 3, 4), torch.float64, "cpu", grads=(False,) * 4, seed=7)
    nft = orw_fast.nft_loss(v, u, v_old, v_ref, torch.ones(6, dtype=torch.float64), beta=1.0, alpha=0.3)
    orw = orw_fast.orw_cfm_w2_loss(v, u, v_ref, weights=torch.ones(6, dtype=torch.float64), alpha=0.3)
    assert rel_err(nft, orw) <= 1e-12


def test_nft_gradient_at_old_policy_does_not_depend_on_beta():
    """The 1/beta factor: at v = v_old the gradient is 2 (2r - 1)(v_old - u) / (B D) + the KL's, for every beta."""
    v, u, _, v_ref = make_inputs((3, 5), torch.float64, "cpu", grads=(False,) * 4, seed=8)
    r = torch.tensor([0.2, 0.9, 0.5], dtype=torch.float64)
    grads = []
    for beta in (0.1, 1.0, 3.0):
        x = v.clone().requires_grad_()
        (g,) = torch.autograd.grad(orw_fast.nft_loss(x, u, v, v_ref, r, beta=beta), x)
        grads.append(g)
    want = 2 * (2 * r[:, None] - 1) * (v - u) / v.numel()
    for g in grads:
        assert rel_err(g, want) <= 1e-12


def test_nft_optimality():
    adv = torch.tensor([-10.0, -5.0, 0.0, 2.5, 7.0])
    assert torch.equal(orw_fast.nft_optimality(adv, clip=5.0), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0]))
    with pytest.raises(ValueError, match="clip must be"):
        orw_fast.nft_optimality(adv, clip=0.0)
    with pytest.raises(ValueError, match="advantages has 1 non-finite"):
        orw_fast.nft_optimality(torch.tensor([0.0, float("nan")]))


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
def test_bitwise_deterministic(backend, device, adaptive):
    skip_unless(backend, device)
    shape = (3, 5, 7, 3) if device == "cpu" and backend == "triton" else (16, 3, 40, 41)
    v, u, v_old, v_ref = make_inputs(shape, torch.float32, device, grads=(True, False, False, False), seed=9)
    r = rand_r(shape[0], device, 9)
    kw = dict(adaptive_scale=rand_s(shape[0], device, 9)) if adaptive else {}
    runs = []
    for _ in range(2):
        loss, comp = orw_fast.nft_loss(
            v, u, v_old, v_ref, r, beta=0.5, alpha=0.1, backend=backend, return_components=True, **kw
        )
        runs.append((loss, *comp, *torch.autograd.grad(loss, v)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(7, 3, 5), (4, 2, 40, 40), (2, 3, 75, 75)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("form", ["plain", "nft_adaptive", "msq_power"])
def test_cpu_streaming_stores_change_no_bits(monkeypatch, dtype, shape, form):
    """The CPU kernel's streaming gradient stores and non-temporal input prefetches (csrc/cpu_stream.h: used when a
    call moves more bytes than ORW_FAST_STREAM_BYTES, default the last-level cache) give the outputs of plain stores
    bit for bit, on odd sizes (unaligned chunks fall back to plain stores), aligned ones, and a sample of two chunks,
    for every gradient."""
    if _native.IMPORT_ERROR is not None:
        pytest.fail(f"the native extension did not load: {_native.IMPORT_ERROR}")
    tensors = [t.detach() for t in make_inputs(shape, dtype, "cpu", grads=(False,) * 4, seed=41)]
    b = shape[0]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rows = [rand_r(b, "cpu", 41), torch.full((b,), 0.7), rand_r(b, "cpu", 42), torch.full((b,), -0.5)]
    rows.append(rand_r(b, "cpu", 43))
    if form == "nft_adaptive":
        rows.append(rand_s(b, "cpu", 41))
    coef = torch.stack(rows).to(acc).contiguous()
    msq_power = -0.75 if form == "msq_power" else 0.0
    op = torch.ops.orw_fast.quadratic_fm.default
    for flags in ((True,) * 4, (True, False, False, False), (False, True, False, True)):
        monkeypatch.setenv("ORW_FAST_STREAM_BYTES", str(2**62))
        plain = op(*tensors, coef, 0.3, *flags, msq_power)
        monkeypatch.setenv("ORW_FAST_STREAM_BYTES", "0")
        poison_then_free(tensors[0])
        streamed = op(*tensors, coef, 0.3, *flags, msq_power)
        for got, want in zip(streamed, plain):
            assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_grad_output_scaling_and_retained_graph(backend, device):
    skip_unless(backend, device)
    v, u, v_old, v_ref = make_inputs((4, 3, 5), torch.float32, device, grads=(True, False, True, False), seed=10)
    r = rand_r(4, device, 10)
    leaves = [v.detach().double().requires_grad_(), v_old.detach().double().requires_grad_()]
    want = torch.autograd.grad(-2.5 * nft_reference(leaves[0], u, leaves[1], v_ref, r, 0.5, 0.2)[0], leaves)
    loss = orw_fast.nft_loss(v, u, v_old, v_ref, r, beta=0.5, alpha=0.2, backend=backend)
    first = torch.autograd.grad(-2.5 * loss, (v, v_old), retain_graph=True)
    second = torch.autograd.grad(-2.5 * loss, (v, v_old))
    for a, b, w in zip(first, second, want):
        assert torch.equal(a, b) and rel_err(a, w) <= 1e-5


def test_gradcheck_float64_native():
    skip_unless("native", "cpu")
    v, u, v_old, v_ref = make_inputs((3, 4), torch.float64, "cpu", seed=11)
    r, adv = rand_r(3, "cpu", 11).double(), rand_adv(3, "cpu", 11).double()
    nft = lambda a, b, c, d: orw_fast.nft_loss(a, b, c, d, r, beta=0.6, alpha=0.3, backend="native")  # noqa: E731
    awm = lambda a, b, c, d: orw_fast.awm_loss(
        a,
        b,
        d,
        adv,
        v_old=c,
        alpha=0.3,
        alpha_old=0.5,  # noqa: E731
        backend="native",
    )
    assert torch.autograd.gradcheck(nft, (v, u, v_old, v_ref))
    assert torch.autograd.gradcheck(awm, (v, u, v_old, v_ref))


def test_per_sample_inputs_never_get_gradients():
    v, u, v_old, v_ref = make_inputs((4, 3), torch.float32, "cpu", seed=12)
    r, adv = rand_r(4, "cpu", 12).requires_grad_(), rand_adv(4, "cpu", 12).requires_grad_()
    orw_fast.nft_loss(v, u, v_old, v_ref, r).backward()
    orw_fast.awm_loss(v, u, v_ref, adv).backward()
    assert r.grad is None and adv.grad is None


# --- bad input ----------------------------------------------------------------------------------


def _nft(**overrides):
    v, u, v_old, v_ref = make_inputs((4, 3), torch.float32, "cpu", seed=13)
    args = dict(v=v, u=u, v_old=v_old, v_ref=v_ref, r=torch.full((4,), 0.5))
    args.update(overrides)
    pos = [args.pop(k) for k in ("v", "u", "v_old", "v_ref", "r")]
    return lambda: orw_fast.nft_loss(*pos, **args)


def _awm(**overrides):
    v, u, _, v_ref = make_inputs((4, 3), torch.float32, "cpu", seed=14)
    args = dict(v=v, u=u, v_ref=v_ref, advantages=torch.randn(4))
    args.update(overrides)
    pos = [args.pop(k) for k in ("v", "u", "v_ref", "advantages")]
    return lambda: orw_fast.awm_loss(*pos, **args)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (_nft(beta=0.0), ValueError, "beta must be a finite number > 0"),
        (_nft(beta=-1.0), ValueError, "beta must be a finite number > 0"),
        (_nft(beta=float("nan")), ValueError, "beta must be a finite number"),
        (_nft(beta=1e-39), ValueError, "1/beta finite"),
        (_nft(alpha=-0.5), ValueError, "alpha must be a finite number >= 0"),
        (_nft(r=torch.tensor([0.5, 1.5, 0.0, 0.2])), ValueError, r"r must lie in \[0, 1\]"),
        (_nft(r=torch.tensor([0.5, float("nan"), 0.0, 0.2])), ValueError, "r has 1 non-finite"),
        (_nft(r=torch.full((5,), 0.5)), ValueError, r"r must have shape \[B\] = \[4\]"),
        (_nft(r=[0.5] * 4), TypeError, "r must be a torch.Tensor"),
        (_nft(v_old=torch.randn(4, 4)), ValueError, "v_old must have the shape of v"),
        (_nft(v_old=torch.ones(4, 3, dtype=torch.int64)), TypeError, "v_old must be a floating tensor"),
        (_nft(backend="cuda"), ValueError, "backend must be one of"),
        (_nft(adaptive_scale=torch.ones(5)), ValueError, r"adaptive_scale must have shape \[B\] = \[4\]"),
        (_nft(adaptive_scale=torch.ones(4, 1)), ValueError, r"adaptive_scale must have shape \[B\] = \[4\]"),
        (_nft(adaptive_scale=torch.tensor([0.5, -0.1, 0.0, 1.0])), ValueError, "adaptive_scale must be >= 0"),
        (_nft(adaptive_scale=torch.tensor([0.5, float("nan"), 0.0, 1.0])), ValueError, "adaptive_scale has 1 non-fin"),
        (_nft(adaptive_scale=[1.0] * 4), TypeError, "adaptive_scale must be a torch.Tensor"),
        (_awm(advantages=torch.tensor([0.0, float("inf"), 1.0, 2.0])), ValueError, "advantages has 1 non-finite"),
        (_awm(advantages=torch.ones(4, dtype=torch.int64)), TypeError, "advantages must be a floating tensor"),
        (_awm(alpha_old=0.5), ValueError, "alpha_old > 0 needs v_old"),
        (_awm(alpha_old=-1.0, v_old=torch.randn(4, 3)), ValueError, "alpha_old must be a finite number >= 0"),
        (_awm(v_old=torch.randn(3, 3)), ValueError, "v_old must have the shape of v"),
        (_awm(v_ref=torch.randn(4, 3, device="meta")), ValueError, "v_ref is on meta but v is on cpu"),
        (_awm(weighting="Uniform"), ValueError, "weighting must be one of"),
        (_awm(weighting="ghuber"), ValueError, "weighting='ghuber' needs sigma"),
        (_awm(weighting="t", sigma=torch.tensor([0.5, 1.5, 0.0, 0.2])), ValueError, r"sigma must lie in \[0, 1\]"),
        (_awm(weighting="t", sigma=torch.tensor([0.5, float("nan"), 0.0, 0.2])), ValueError, "sigma has 1 non-fin"),
        (_awm(weighting="huber", sigma=torch.ones(3)), ValueError, r"sigma must have shape \[B\] = \[4\]"),
        (
            _awm(weighting="ghuber", sigma=torch.ones(4), ghuber_power=0.0),
            ValueError,
            r"ghuber_power must be .* \(0, 1\]",
        ),
        (
            _awm(weighting="ghuber", sigma=torch.ones(4), ghuber_power=1.5),
            ValueError,
            r"ghuber_power must be .* \(0, 1\]",
        ),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_bad_input_raises_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --- custom-op machinery ------------------------------------------------------------------------


def _op(backend):
    if backend == "native":
        return torch.ops.orw_fast.quadratic_fm.default
    from orw_fast.ops.triton.quadratic_fm import quadratic_fm_triton

    return quadratic_fm_triton


def _norms_op(backend):
    if backend == "native":
        return torch.ops.orw_fast.quadratic_fm_norms.default
    from orw_fast.ops.triton.quadratic_fm import quadratic_fm_norms_triton

    return quadratic_fm_norms_triton


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flags", [(True,) * 4, (True, False, False, False), (False,) * 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(backend, device, flags, dtype):
    skip_unless(backend, device)
    tensors = make_inputs((3, 2, 5), dtype, device, grads=flags, seed=15)
    # Non-negative weights (a positive loss): opcheck back-propagates grad_output = sign(sum of the outputs), and
    # with grad_output != 1 the backward scales the op's saved gradient outputs in place (no second gradient-sized
    # buffer: fused_op_support._backward), which opcheck would see as the raw outputs changing.
    coef = torch.randn(5, 3, device=device).abs()
    torch.library.opcheck(_op(backend), (*tensors, coef, 0.5, *flags))
    adaptive = torch.cat([coef, torch.rand(1, 3, device=device)])  # row 5: s, NFT's adaptive weight
    torch.library.opcheck(_op(backend), (*tensors, adaptive, 0.5, *flags))
    torch.library.opcheck(_op(backend), (*tensors, coef, 0.5, *flags, -0.75))  # the mean-square form (AWM ghuber)


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [1, 2])
def test_opcheck_norms(backend, device, p):
    """The norms op behind the adaptive forms (no autograd: its inputs never require grad), against float64."""
    skip_unless(backend, device)
    v, u, v_old, _ = make_inputs((3, 2, 5), torch.bfloat16, device, grads=(False,) * 4, seed=15)
    op = _norms_op(backend)
    coef = torch.randn(5, 3, device=device)
    torch.library.opcheck(op, (v, u, v_old, coef, p))
    a, e = v_old.double() - u.double(), v.double() - v_old.double()
    for got, m in zip(op(v, u, v_old, coef, p), (coef[1], coef[3])):
        want = (a + m.double()[:, None, None] * e).abs().pow(p).reshape(3, -1).mean(1)
        assert got.dtype == torch.float32 and rel_err(got, want) <= 1e-6
    with pytest.raises(RuntimeError, match="p must be 1 or 2"):
        op(v, u, v_old, coef, 3)


def op_cases(small, large):
    """(backend, device, shape) for the native and triton ops themselves: ``small``, and ``large`` too (two CPU
    chunks a sample) except on the Triton interpreter."""
    return [
        pytest.param(b, d, s, id=f"{b}-{d}-{'x'.join(map(str, s))}")
        for b in ("native", "triton")
        for d in DEVICES
        for s in ([small] if b == "triton" and d == "cpu" else [small, large])
    ]


def quadratic_reference(v, u, v_old, v_ref, coef, alpha, msq_power=0.0):
    """The op's contract (ops/quadratic_fm.py) in float64: loss, policy_i, kl_i from coef rows w1, m1, w2, m2, w3
    (with ``msq_power`` q, w1 and w2 times the detached (mean_d x^2 + 1e-10)^q of their square's residual)."""
    b = v.shape[0]
    v, u, o, r = (t.double().reshape(b, -1) for t in (v, u, v_old, v_ref))
    w1, m1, w2, m2, w3 = (row.double()[:, None] for row in coef)
    a, e = o - u, v - o
    x1, x2 = a + m1 * e, a + m2 * e
    if msq_power:
        w1 = w1 * (x1.detach().pow(2).mean(1, keepdim=True) + 1e-10) ** msq_power
        w2 = w2 * (x2.detach().pow(2).mean(1, keepdim=True) + 1e-10) ** msq_power
    policy = (w1 * x1**2 + w2 * x2**2 + w3 * e**2).mean(1)
    kl = ((v - r) ** 2).mean(1)
    return (policy + alpha * kl).mean(), policy, kl


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend,device,shape", op_cases((6, 3, 5), (3, 3, 75, 75)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", [(True,) * 4, (True, False, False, False), (False, True, True, True)])
@pytest.mark.parametrize("msq_power", [0.0, -0.75])
def test_op_with_mixed_coefficient_forms_matches_float64(backend, device, shape, dtype, flags, msq_power):
    """The op itself against its contract in float64, on a batch that mixes the forms the CPU kernel specialises:
    samples with m1 = 1 and w2 = 0 (AWM's one square, x1 = v - u), m1 = 1 with w2 != 0, and general coefficients;
    signed w1, every gradient set, the plain and the mean-square (msq_power) forms."""
    skip_unless(backend, device)
    tensors = [t.detach() for t in make_inputs(shape, dtype, device, grads=(False,) * 4, seed=51)]
    b = shape[0]
    g = torch.Generator().manual_seed(stable_seed(backend, shape, dtype, flags, msq_power))
    coef = torch.randn(5, b, generator=g)
    coef[[2, 4]] = coef[[2, 4]].abs()  # w2, w3 >= 0 (a loss bounded below); w1 (advantages) and m2 signed
    coef[1, 0::3], coef[2, 0::3] = 1.0, 0.0  # one square
    coef[1, 1::3] = 1.0  # m1 = 1 with a second square
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    coef = coef.to(device=device, dtype=acc).contiguous()
    loss, policy, kl, *grads = _op(backend)(*tensors, coef, 0.4, *flags, msq_power)
    leaves = [t.double().requires_grad_() for t in tensors]
    want = quadratic_reference(*leaves, coef, 0.4, msq_power)
    want[0].backward()
    tol = TOL[dtype]
    assert abs(loss.item() - want[0].item()) <= tol * (want[1].abs() + 0.4 * want[2]).mean().item()
    assert rel_err(policy, want[1]) <= tol and rel_err(kl, want[2]) <= tol
    for name, wanted, got, leaf in zip(NAMES, flags, grads, leaves):
        if wanted:
            assert got.dtype == dtype and rel_err(got, leaf.grad) <= tol, f"gradient of {name}"
        else:
            assert got.numel() == 0, f"gradient of {name} not requested"


@pytest.mark.parametrize("backend,device,shape", op_cases((7, 3, 5), (2, 3, 75, 75)))
@pytest.mark.parametrize("m1", [0.7, 1.0])
def test_adaptive_forms_are_the_norms_op_then_the_plain_op(backend, device, shape, m1):
    """coef [6, B] (row 5 = s): the same loss, components and gradients, bit for bit, as quadratic_fm_norms (p = 1),
    the factors s / max(l1, 1e-5 / s) on w1 and w2 (adaptive_coef), and the plain [5, B] op; s takes 0, 1, a floor
    case. msq_power q: the same as the norms op (p = 2), the factors (msq + 1e-10)^q and the plain op, to a few float32
    roundings (the kernels' scalar pow and ATen's vectorised pow may differ in the last bit); q = 0 is the plain op
    bit for bit. m1 = 1 (x1 = v - u) with w2 = 0 for one sample: the CPU kernel's norms of such a sample skip v_old."""
    skip_unless(backend, device)
    from orw_fast.ops.quadratic_fm import adaptive_coef

    tensors = [t.detach() for t in make_inputs(shape, torch.float32, device, grads=(False,) * 4, seed=31)]
    b = shape[0]
    rows = [
        rand_r(b, device, 31),
        torch.full((b,), m1, device=device),
        rand_r(b, device, 32),  # w2 = 0 for sample 1
        torch.zeros(b, device=device),
    ]
    coef6 = torch.stack([*rows, torch.full((b,), 0.2, device=device), rand_s(b, device, 31)]).contiguous()
    op, norms_op = _op(backend), _norms_op(backend)
    flags = (True,) * 4
    fused = op(*tensors, coef6, 0.3, *flags)
    plain = op(*tensors, adaptive_coef(coef6, *norms_op(*tensors[:3], coef6, 1), 0.0).contiguous(), 0.3, *flags)
    for got, want in zip(fused, plain):
        assert torch.equal(got, want)
    coef5 = coef6[:5].contiguous()
    for q in (-0.75, -0.5, 0.3):
        fused = op(*tensors, coef5, 0.3, *flags, q)
        plain = op(*tensors, adaptive_coef(coef5, *norms_op(*tensors[:3], coef5, 2), q).contiguous(), 0.3, *flags)
        for got, want in zip(fused, plain):
            assert rel_err(got, want) <= 1e-6
        assert not torch.equal(fused[1], op(*tensors, coef5, 0.3, *flags)[1])  # the factors did act
    for got, want in zip(op(*tensors, coef5, 0.3, *flags, 0.0), op(*tensors, coef5, 0.3, *flags)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["nft", "nft_adaptive", "awm", "awm_ghuber"])
def test_torch_compile_fullgraph(backend, device, kind):
    """A training-step-like function compiles into one graph and matches eager execution."""
    skip_unless(backend, device)
    torch._dynamo.reset()
    lin = torch.nn.Linear(6, 6).to(device)
    x, u, v_old, v_ref = make_inputs((5, 6), torch.float32, device, grads=(False,) * 4, seed=16)
    per_sample = rand_adv(5, device, 16) if kind.startswith("awm") else rand_r(5, device, 16)
    adaptive = dict(adaptive_scale=rand_s(5, device, 16)) if kind == "nft_adaptive" else {}
    weighting = dict(weighting="ghuber", sigma=rand_sigma(5, device, 16)) if kind == "awm_ghuber" else {}

    def step(x, u, v_old, v_ref, per_sample):
        if kind.startswith("nft"):
            loss, comp = orw_fast.nft_loss(
                lin(x),
                u,
                v_old,
                v_ref,
                per_sample,
                beta=0.5,
                alpha=0.3,
                backend=backend,
                return_components=True,
                validate=False,
                **adaptive,
            )
        else:
            loss, comp = orw_fast.awm_loss(
                lin(x),
                u,
                v_ref,
                per_sample,
                v_old=v_old,
                alpha=0.3,
                alpha_old=0.1,
                backend=backend,
                return_components=True,
                validate=False,
                **weighting,
            )
        return loss, comp.policy.sum()

    got, got_policy = torch.compile(step, fullgraph=True)(x, u, v_old, v_ref, per_sample)
    got_grad = torch.autograd.grad(got, lin.weight)[0]
    want, want_policy = step(x, u, v_old, v_ref, per_sample)
    want_grad = torch.autograd.grad(want, lin.weight)[0]
    assert rel_err(got, want) <= 1e-5 and rel_err(got_policy, want_policy) <= 1e-5
    assert rel_err(got_grad, want_grad) <= 1e-5


# --- GPU-only -----------------------------------------------------------------------------------


@requires_gpu
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["nft", "nft_adaptive", "awm_ghuber"])
def test_cuda_graph_capture(backend, dtype, kind):
    """Two-pass losses too (the first pass's per-sample reduction feeds the second's weights on the device)."""
    skip_unless(backend, "cuda")
    shape = (16, 3, 32, 32)
    v, u, v_old, v_ref = (t.detach() for t in make_inputs(shape, dtype, "cuda", seed=17))
    r, s = rand_r(16, "cuda", 17), rand_s(16, "cuda", 17)
    v.requires_grad_()

    def step():
        if kind == "awm_ghuber":
            loss = orw_fast.awm_loss(
                v,
                u,
                v_ref,
                2 * r - 1,
                v_old=v_old,
                alpha=0.1,
                alpha_old=1.0,
                weighting="ghuber",
                sigma=s,
                backend=backend,
            )
        else:
            kw = dict(adaptive_scale=s) if kind == "nft_adaptive" else {}
            loss = orw_fast.nft_loss(v, u, v_old, v_ref, r, beta=0.5, alpha=0.1, backend=backend, **kw)
        return loss, *torch.autograd.grad(loss, v)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_grad = step()
    fresh = make_inputs(shape, dtype, "cuda", seed=18)
    with torch.no_grad():
        for dst, src in zip((v, u, v_old, v_ref), fresh):
            dst.copy_(src)
        r.copy_(rand_r(16, "cuda", 18))
        s.copy_(rand_s(16, "cuda", 18).flip(0))
    graph.replay()
    torch.cuda.synchronize()
    want_loss, want_grad = step()
    assert torch.equal(static_loss, want_loss) and torch.equal(static_grad, want_grad)
