"""ODE sampling of flow-matching models: integrate dx/dt = model(t, x, *cond) from t=0 (noise) to t=1 (data).

Fixed-step methods on a uniform grid of ``steps`` steps, or on an explicit grid ``times`` (e.g. the shifted
sigma schedule of SD3/FLUX, t = 1 - sigma): "euler" (1st order, 1 model call per step), "midpoint" and "heun"
(explicit trapezoid), 2nd order, 2 calls per step; the multistep methods "ab2", "ab3" (Adams-Bashforth on the
velocity) and "unipc" (UniPC-bh2: DPM-Solver++(2M) in data-prediction form with its corrector), 1 call per step
(ab3: one more, :func:`calls`), coefficients computed once per grid in float64. Every other method name
("dopri5", "rk4", "bosh3", ...) goes to ``torchdiffeq.odeint``, the accuracy reference. ``cond`` is a tuple of
conditioning tensors (text embeddings, class labels) passed to every call, the same for all steps.

On CUDA the fixed-step loop is captured once into one CUDA graph and replayed per call (``cond`` is copied into
the graph's static inputs; a multistep method's history lives inside the captured loop, in the graph's memory);
the graph is cached per model (weakly: it dies with the model) and per (device, shape, dtype, time grid, method,
autocast, trajectory, cond shapes) and is keyed by the data_ptr()s of the model's parameters and buffers: refreshing
the weights in place (``model.load_state_dict(other.state_dict())``, ``p.copy_(...)``) keeps the graph
and the replay reads the new values; replacing parameter or buffer tensors makes a new capture.
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch

FIXED_STEP_METHODS = ("euler", "midpoint", "heun", "ab2", "ab3", "unipc")
GRIDS = ("uniform", "noise_dense", "data_dense", "both_dense")
GRID_SHIFT = 3.0
_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)
_WARMUP_STEPS = 3  # eager steps on a side stream before capture (lazy init, cuDNN/cuBLAS autotuning)

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Time grid and one step of each fixed-step method (shared by the eager and the graphed loop)


class _Step(NamedTuple):
    """One multistep step: x_{i+1} = decay * x_i + sum_j weights[j] * d_{i-j} (d newest first), where d_i = v_i, or
    x̂1_i = x_i + sigma * v_i (sigma = 1 - t_i) in data-prediction form; a ``heun`` step (a starter) is the
    trapezoid x_i + h/2 (v_i + v(t_{i+1}, x_i + h v_i)) with h = weights[0], and records d_i = v_i. A ``corrector``
    (decay', weights') first replaces x_i by decay' * x'_{i-1} + sum_j weights'[j] * d_{i-j}, x'_{i-1} the previous
    step's corrected x (d_i is still the value at the uncorrected x_i)."""

    decay: float
    weights: tuple[float, ...]
    sigma: float | None = None
    heun: bool = False
    corrector: tuple[float, tuple[float, ...]] | None = None


class _Grid(NamedTuple):
    """A fixed-step schedule: ``t`` [2*steps+1, batch], where step i uses rows 2i (start), 2i+1 (half step) and
    2i+2 (end), each t rounded once from float64; ``dt`` the steps' lengths (Python floats, from float64);
    ``plan`` a multistep method's steps (empty for the one-step methods)."""

    t: torch.Tensor
    dt: tuple[float, ...]
    plan: tuple[_Step, ...] = ()


def _uniform(steps: int) -> torch.Tensor:
    return torch.arange(steps + 1, dtype=torch.float64) / steps


def time_grid(name: str, steps: int) -> torch.Tensor:
    """A named grid of ``steps`` steps on [0, 1] (float64 [steps + 1], t=0 noise, t=1 data): "uniform" (k / N),
    "noise_dense" (SD3's time shift 3, t = 1 - 3s / (1 + 2s) with s = 1 - k / N: shorter steps near the noise),
    "data_dense" (its mirror, t = 3u / (1 + 2u) with u = k / N: shorter steps near the data) or "both_dense"
    (t = (1 - cos(pi u)) / 2: shorter steps at both ends)."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    u = _uniform(int(steps))
    if name == "uniform":
        return u
    if name == "noise_dense":
        return 1 - GRID_SHIFT * (1 - u) / (1 + (GRID_SHIFT - 1) * (1 - u))
    if name == "data_dense":
        return GRID_SHIFT * u / (1 + (GRID_SHIFT - 1) * u)
    if name == "both_dense":
        return (1 - torch.cos(math.pi * u)) / 2
    raise ValueError(f"grid must be one of {GRIDS}, got {name!r}")


def _lagrange_integrals(nodes: list[float], a: float, b: float) -> tuple[float, ...]:
    """(∫_a^b l_j(s) ds)_j for the Lagrange basis l_j on ``nodes`` (at most 3), exact in float64: the Gauss-Legendre
    rule with len(nodes) points integrates polynomials of degree len(nodes) - 1."""
    u, w = {
        1: ([0.0], [2.0]),
        2: ([-(3**-0.5), 3**-0.5], [1.0, 1.0]),
        3: ([-(0.6**0.5), 0.0, 0.6**0.5], [5 / 9, 8 / 9, 5 / 9]),
    }[len(nodes)]
    s = [(a + b) / 2 + (b - a) / 2 * u_k for u_k in u]
    return tuple(
        (b - a) / 2 * sum(w_k * math.prod((s_k - m) / (n - m) for m in nodes if m != n) for w_k, s_k in zip(w, s))
        for n in nodes
    )


# The real stability interval (-bound, 0) of constant-step AB_k. On the flow's stiff part, v ≈ (x̂1 - x) / (1 - t),
# a step has lambda*h = -h / (1 - t) (-1 on the last step to t = 1): a step beyond its order's bound lowers the order.
_AB_STABILITY = {1: 2.0, 2: 1.0, 3: 6 / 11}


def _adams_plan(times: list[float], order: int, heun_start: bool) -> tuple[_Step, ...]:
    """Variable-step Adams-Bashforth of ``order`` on v: step i integrates the Lagrange interpolant of
    v_i, ..., v_{i-k+1} over [t_i, t_{i+1}], k = min(order, i + 1), lowered while h_i / (1 - t_i) exceeds AB_k's
    stability bound; the first step is Heun's when ``heun_start``, else Euler's.

    Measured on the digits model (64 samples, error against dopri5 at 1e-6, median / max per-sample RMS): AB3's
    Heun start costs one call and keeps order 3 (an Euler start measures order 2 on the Gaussian-mixture test) and on
    the data_dense grid, whose first step is the longest, it gives 1.3e-2 / 0.16 at 10 steps where an Euler start
    gives 2.2e-2 / 0.41; lowering the last step (uniform grid: only it) to AB2 cuts the max error from 0.15 to 0.10
    at 10 steps and from 0.057 to 0.027 at 24 (the median rises by 10-25 %). AB2's own interval reaches h/(1 - t) = 1:
    it keeps its Euler start (order 2 either way) and is never lowered."""
    plan = []
    for i, (t0, t1) in enumerate(zip(times[:-1], times[1:])):
        if i == 0 and heun_start:
            plan.append(_Step(1.0, (t1 - t0,), heun=True))
            continue
        k = min(order, i + 1)
        while (t1 - t0) / (1 - t0) > _AB_STABILITY[k]:
            k -= 1
        plan.append(_Step(1.0, _lagrange_integrals(times[i - k + 1 : i + 1][::-1], t0, t1)))
    return tuple(plan)


def _lambdas(times: list[float]) -> list[float]:
    """lambda = log(t / (1 - t)), -inf at t = 0 and inf at t = 1."""
    return [math.log(t) - math.log1p(-t) if 0 < t < 1 else math.copysign(math.inf, t - 0.5) for t in times]


def _dpmpp2m_plan(times: list[float]) -> tuple[_Step, ...]:
    """DPM-Solver++(2M) on the rectified-flow path x_t = t x1 + (1 - t) x0 (alpha = t, sigma = 1 - t, lambda =
    log(t / (1 - t))): x_{i+1} = (sigma_{i+1} / sigma_i) x_i + alpha_{i+1} (1 - e^{-h}) D with D = (1 + 1/(2r)) x̂1_i
    - x̂1_{i-1} / (2r), h = lambda_{i+1} - lambda_i, r = h_{i-1} / h; alpha_{i+1} (1 - e^{-h}) = (t_{i+1} - t_i) /
    (1 - t_i). First order (D = x̂1_i, which is Euler's step) where lambda is infinite: the first step, the step
    after t = 0 and the step to t = 1. UniPC's predictor; not a method of its own: at equal calls unipc's errors
    were lower on every grid and budget of the digits benchmark (max RMS error often 2-10x). Alone it converges as
    log(N) / N^2 on a uniform grid (the lambda steps next to t = 0 and 1 do not shrink with N)."""
    lam = _lambdas(times)
    plan = []
    for i, (t0, t1) in enumerate(zip(times[:-1], times[1:])):
        decay, gain = (1 - t1) / (1 - t0), (t1 - t0) / (1 - t0)
        if i == 0 or not (math.isfinite(lam[i - 1]) and math.isfinite(lam[i + 1])):
            plan.append(_Step(decay, (gain,), sigma=1 - t0))
        else:
            half_inv_r = (lam[i + 1] - lam[i]) / (2 * (lam[i] - lam[i - 1]))
            plan.append(_Step(decay, (gain * (1 + half_inv_r), -gain * half_inv_r), sigma=1 - t0))
    return tuple(plan)


def _unipc_plan(times: list[float]) -> tuple[_Step, ...]:
    """UniPC-bh2 of order 2 in data-prediction form (Zhao et al. 2023, as diffusers' UniPCMultistepScheduler with
    predict_x0): its UniP-2 predictor is DPM-Solver++(2M); from step 1 on, UniC corrects x_i with the x̂1_i of the
    call just made at the predicted x_i (no extra call): with h = lambda_i - lambda_{i-1}, g = (t_i - t_{i-1}) /
    (1 - t_{i-1}), UniC-1 (after a first-order predictor step) x'_i = decay x'_{i-1} + g (x̂1_{i-1} + x̂1_i) / 2,
    UniC-2 solves [[1, 1], [r, 1]] rho = (b1, b2), r = (lambda_{i-2} - lambda_{i-1}) / h, b_k the bh2 phi-ratios, and
    puts weights g rho_1, g (1 - rho_1 - rho_0 / r), g rho_0 / r on x̂1_i, x̂1_{i-1}, x̂1_{i-2}. The corrector's
    order is the predictor's nominal one (1 after the first step, else 2: r = -inf after t = 0 gives its limit)."""
    lam, predictor = _lambdas(times), _dpmpp2m_plan(times)
    plan = [predictor[0]]
    for i in range(1, len(predictor)):
        decay, gain = (1 - times[i]) / (1 - times[i - 1]), (times[i] - times[i - 1]) / (1 - times[i - 1])
        if i == 1:  # after the first-order first step
            weights = (gain / 2, gain / 2)
        else:
            hh = lam[i - 1] - lam[i]  # -h, finite: 0 < t_{i-1} < t_i < 1
            phi = math.expm1(hh) / hh - 1
            b1 = phi / math.expm1(hh)
            b2 = 2 * (phi / hh - 0.5) / math.expm1(hh)
            r = (lam[i - 2] - lam[i - 1]) / -hh
            rho0 = (b2 - b1) / (r - 1)
            rho1 = b1 - rho0
            weights = (gain * rho1, gain * (1 - rho1 - rho0 / r), gain * rho0 / r)
        plan.append(predictor[i]._replace(corrector=(decay, weights)))
    return tuple(plan)


# multistep method -> (plan of a float64 grid given as a list, fewest steps that include one step of its order)
_MULTISTEP = {
    "ab2": (lambda times: _adams_plan(times, 2, heun_start=False), 2),
    "ab3": (lambda times: _adams_plan(times, 3, heun_start=True), 4),
    "unipc": (_unipc_plan, 4),
}


def min_steps(method: str) -> int:
    """The fewest steps ``sample`` takes with the fixed-step ``method`` (a multistep method needs one step of its own
    order between its lower-order first and last steps)."""
    if method not in FIXED_STEP_METHODS:
        raise ValueError(f"min_steps: method must be a fixed-step method {FIXED_STEP_METHODS}, got {method!r}")
    return _MULTISTEP[method][1] if method in _MULTISTEP else 1


def calls(method: str, steps: int) -> int:
    """Model calls of one rollout of ``steps`` steps with the fixed-step ``method``: "ab3" spends one more than its
    steps on its Heun starter (an Euler start would cap it at order 2)."""
    if method not in FIXED_STEP_METHODS:
        raise ValueError(f"calls: method must be a fixed-step method {FIXED_STEP_METHODS}, got {method!r}")
    return {"midpoint": 2 * steps, "heun": 2 * steps, "ab3": steps + 1}.get(method, steps)


def _time_grid(times: torch.Tensor, batch: int, device: torch.device, dtype: torch.dtype, method: str) -> _Grid:
    """The schedule of the float64 grid ``times`` [steps+1] for ``method``; a uniform grid gets t = k / (2*steps)
    and dt = 1/steps exactly."""
    steps = times.numel() - 1
    if torch.equal(times, _uniform(steps)):
        t, dt = torch.arange(2 * steps + 1, dtype=torch.float64) / (2 * steps), (1.0 / steps,) * steps
    else:
        half = (times[:-1] + times[1:]) / 2
        t = torch.cat([torch.stack([times[:-1], half], dim=1).reshape(-1), times[-1:]])
        dt = tuple((times[1:] - times[:-1]).tolist())
    plan = _MULTISTEP[method][0](times.tolist()) if method in _MULTISTEP else ()
    return _Grid(t.to(device, dtype)[:, None].expand(-1, batch).contiguous(), dt, plan)


def _euler_step(velocity: Velocity, x, t0, t_half, t1, dt: float):
    return x.add(velocity(t0, x), alpha=dt)


def _midpoint_step(velocity: Velocity, x, t0, t_half, t1, dt: float):
    return x.add(velocity(t_half, x.add(velocity(t0, x), alpha=0.5 * dt)), alpha=dt)


def _heun_step(velocity: Velocity, x, t0, t_half, t1, dt: float):
    k1 = velocity(t0, x)
    k2 = velocity(t1, x.add(k1, alpha=dt))
    return x.add(k1 + k2, alpha=0.5 * dt)


_STEPS = {"euler": _euler_step, "midpoint": _midpoint_step, "heun": _heun_step}


class _History:
    """A multistep method's memory within one rollout: d_i, d_{i-1}, ... (newest first) and the last corrected x."""

    def __init__(self):
        self.d: list[torch.Tensor] = []
        self.x: torch.Tensor | None = None


def _combine(x: torch.Tensor, decay: float, weights: tuple[float, ...], history: list) -> torch.Tensor:
    out = x if decay == 1 else x.mul(decay)
    for w, d in zip(weights, history):
        out = out.add(d, alpha=w)
    return out


def _multistep_step(velocity: Velocity, x, t0, t1, step: _Step, history: _History) -> torch.Tensor:
    """One step of a multistep plan (a fixed chain of ops with constant coefficients); updates ``history``."""
    v = velocity(t0, x)
    history.d = [v if step.sigma is None else x.add(v, alpha=step.sigma), *history.d[:2]]
    if step.corrector is not None:
        x = _combine(history.x, *step.corrector, history.d)
    history.x = x
    if step.heun:
        h = step.weights[0]
        return x.add(v + velocity(t1, x.add(v, alpha=h)), alpha=h / 2)
    return _combine(x, step.decay, step.weights, history.d)


def _integrate(
    velocity: Velocity, x: torch.Tensor, grid: _Grid, method: str, return_trajectory: bool, stop: int | None = None
):
    """The fixed-step loop over ``grid`` (from :func:`_time_grid`), its first ``stop`` steps when given; never writes
    ``x``. Returns (x1, trajectory [steps+1, *x.shape] or None)."""
    steps, t = len(grid.dt) if stop is None else stop, grid.t
    history = _History()
    trajectory = None
    if return_trajectory:
        trajectory = x.new_empty((steps + 1, *x.shape))
        trajectory[0].copy_(x)
    for i in range(steps):
        if grid.plan:
            x = _multistep_step(velocity, x, t[2 * i], t[2 * i + 2], grid.plan[i], history)
        else:
            x = _STEPS[method](velocity, x, t[2 * i], t[2 * i + 1], t[2 * i + 2], grid.dt[i])
        if trajectory is not None:
            trajectory[i + 1].copy_(x)
    return x, trajectory


def _velocity(model, cond: tuple, autocast: torch.dtype | None, device_type: str) -> Velocity:
    """model(t [B], x, *cond) under autocast (or with any ambient autocast disabled when ``autocast`` is
    None), returned in x's dtype. The autocast weight cache is off: casts are recomputed per call, which
    CUDA-graph capture needs and which keeps in-place weight refreshes visible."""

    def velocity(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=autocast, enabled=autocast is not None, cache_enabled=False):
            v = model(t, x, *cond)
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"model(t, x) must return a tensor of x's shape {list(x.shape)}, got {got}")
        return v.to(x.dtype)

    return velocity


# ---------------------------------------------------------------------------------------------
# torchdiffeq (adaptive and other methods)


def _torchdiffeq_solvers() -> dict:
    try:
        from torchdiffeq._impl.odeint import SOLVERS
    except ImportError as e:
        raise ImportError(
            f"methods other than {FIXED_STEP_METHODS} need torchdiffeq (`pip install torchdiffeq`): {e}"
        ) from e
    return SOLVERS


def _odeint(velocity: Velocity, x0, times, method, rtol, atol, return_trajectory):
    """torchdiffeq.odeint over ``times`` (float64 [steps+1]). Its fixed-grid solvers (rk4, heun3,
    explicit_adams, ...) step on that grid; adaptive ones choose their steps by rtol/atol between its ends. The
    solution is reported at every grid time with a trajectory, else at the two ends only."""
    import torchdiffeq
    from torchdiffeq._impl.solvers import FixedGridODESolver

    steps = times.numel() - 1
    uniform = torch.equal(times, _uniform(steps))  # as torchdiffeq's users write it: linspace in x0's dtype
    grid = (
        torch.linspace(0, 1, steps + 1, dtype=x0.dtype, device=x0.device) if uniform else times.to(x0.device, x0.dtype)
    )
    fixed_grid = issubclass(_torchdiffeq_solvers()[method], FixedGridODESolver)
    options = {"grid_constructor": lambda f, y0, t: grid} if fixed_grid else None
    times = grid if return_trajectory else grid[[0, -1]]
    batch = x0.shape[0]
    solution = torchdiffeq.odeint(
        lambda t, x: velocity(t.expand(batch), x), x0, times, rtol=rtol, atol=atol, method=method, options=options
    )
    return (solution[-1], solution) if return_trajectory else (solution[-1].clone(), None)


# ---------------------------------------------------------------------------------------------
# CUDA graphs


class _GraphedSampler(NamedTuple):
    """One captured N-step loop: static inputs (x0 and the conditioning) and outputs, and every tensor the graph
    reads that it does not own (the time grid, the model's parameters and buffers), kept alive so that their
    memory cannot be reused while the graph can replay."""

    graph: torch.cuda.CUDAGraph
    x_in: torch.Tensor
    cond_in: tuple
    x_out: torch.Tensor
    trajectory: torch.Tensor | None
    keep_alive: tuple

    def __call__(self, x0: torch.Tensor, cond: tuple):
        self.x_in.copy_(x0)
        for static, value in zip(self.cond_in, cond):
            static.copy_(value)
        self.graph.replay()
        x1 = self.x_out.clone()
        return x1, (None if self.trajectory is None else self.trajectory.clone())


# model -> {(tensor data_ptrs, device, shape, dtype, times, method, autocast, return_trajectory, cond): sampler}
_GRAPH_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _model_tensors(model) -> tuple:
    if isinstance(model, torch.nn.Module):
        return (*model.parameters(), *model.buffers())
    return ()


def _capture(model, x0, cond, times, method, autocast, return_trajectory, tensors) -> _GraphedSampler:
    x_in = x0.clone()
    cond_in = tuple(c.clone() for c in cond)
    velocity = _velocity(model, cond_in, autocast, x0.device.type)
    grid = _time_grid(times, x0.shape[0], x0.device, x0.dtype, method)
    side = torch.cuda.Stream(x0.device)
    side.wait_stream(torch.cuda.current_stream(x0.device))
    with torch.cuda.stream(side):
        _integrate(velocity, x_in, grid, method, False, stop=min(_WARMUP_STEPS, len(grid.dt)))
    torch.cuda.current_stream(x0.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x_out, trajectory = _integrate(velocity, x_in, grid, method, return_trajectory)
    return _GraphedSampler(graph, x_in, cond_in, x_out, trajectory, (grid.t, *tensors))


# models whose capture failed under cuda_graph="auto" -> why (they are sampled eagerly from then on)
_UNCAPTURABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _graphed(model, x0, cond, times, method, autocast, return_trajectory, *, required: bool):
    """Replays the cached graph for this model and call signature, capturing it first if needed.
    Graphs captured for other tensors of the model (replaced weights) are dropped. When the capture fails
    and the graph is not ``required``, warns once, records the model as uncapturable and returns None."""
    try:
        entries = _GRAPH_CACHE.setdefault(model, {})
    except TypeError as e:
        raise TypeError(
            f"cuda_graph needs a weak-referenceable model (an nn.Module or a function), got "
            f"{type(model).__name__}; pass cuda_graph=False"
        ) from e
    tensors = _model_tensors(model)
    ptrs = tuple(t.data_ptr() for t in tensors)
    key = (
        ptrs,
        x0.device,
        tuple(x0.shape),
        x0.dtype,
        tuple(times.tolist()),
        method,
        autocast,
        return_trajectory,
        tuple((tuple(c.shape), c.dtype, c.device) for c in cond),
    )
    sampler = entries.get(key)
    if sampler is None:
        for stale in [k for k in entries if k[0] != ptrs]:
            del entries[stale]
        try:
            sampler = _capture(model, x0, cond, times, method, autocast, return_trajectory, tensors)
        except Exception as err:  # noqa: BLE001 - whatever stops the capture, "auto" samples eagerly instead
            if required:
                raise
            _UNCAPTURABLE[model] = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"sample(cuda_graph='auto'): {type(model).__name__} cannot be captured in a CUDA graph "
                f"({_UNCAPTURABLE[model]:.300}); it is sampled eagerly from now on (pass cuda_graph=False "
                "to silence this, or cuda_graph=True to make it an error)",
                stacklevel=3,
            )
            return None
        entries[key] = sampler
    return sampler(x0, cond)


def clear_graph_cache(model=None) -> None:
    """Drops the CUDA graphs captured for ``model`` (all models when None), freeing their memory and
    the tensors they keep alive (a graph holds the parameters it was captured with until the next
    ``sample`` of that model drops it). Needed for correctness only for a non-Module callable whose
    tensors were replaced: the cache cannot see them."""
    if model is None:
        _GRAPH_CACHE.clear()
    else:
        _GRAPH_CACHE.pop(model, None)


# ---------------------------------------------------------------------------------------------
# Public API


def check_method(method, name: str = "method") -> None:
    """Raises TypeError/ValueError (naming ``name``) unless ``method`` is a fixed-step or torchdiffeq method."""
    if not isinstance(method, str):
        raise TypeError(f"{name} must be a string, got {type(method).__name__}")
    if method not in FIXED_STEP_METHODS and method not in _torchdiffeq_solvers():
        raise ValueError(
            f"unknown {name} {method!r}: use one of {FIXED_STEP_METHODS} or a torchdiffeq method "
            f"{tuple(_torchdiffeq_solvers())}"
        )


def _check_times(times, steps) -> torch.Tensor:
    """The float64 grid of ``times`` (or of ``steps`` uniform steps), checked."""
    if times is None:
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        return _uniform(int(steps))
    try:
        grid = torch.as_tensor(times).detach().to("cpu", torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"times must be a 1-D sequence or tensor of t values, got {type(times).__name__}") from err
    if (
        grid.numel() < 2
        or not bool(torch.isfinite(grid).all())
        or not bool((grid[1:] > grid[:-1]).all())
        or grid[0] < 0
        or grid[-1] > 1
    ):
        raise ValueError(f"times must be >= 2 increasing values in [0, 1] (t=0 noise, t=1 data), got {grid.tolist()}")
    if steps is not None and steps != grid.numel() - 1:
        raise ValueError(f"steps={steps!r} does not match times, which has {grid.numel() - 1} steps; give one of them")
    return grid


def _check_args(model, x0, method, cuda_graph, autocast, rtol, atol, cond) -> None:
    if not callable(model):
        raise TypeError(f"model must be callable as model(t, x, *cond), got {type(model).__name__}")
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"x0 must be a torch.Tensor of shape [B, ...], got {type(x0).__name__}")
    if not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating tensor, got {x0.dtype}; convert it with .float()")
    if x0.dim() == 0 or x0.numel() == 0:
        raise ValueError(f"x0 must be a non-empty [B, ...] tensor, got shape {list(x0.shape)}")
    if not isinstance(cond, tuple) or not all(isinstance(c, torch.Tensor) for c in cond):
        raise TypeError(f"cond must be a tuple of tensors, got {type(cond).__name__}")
    check_method(method)
    if not isinstance(cuda_graph, (str, bool)) or cuda_graph not in ("auto", True, False):
        raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
    if cuda_graph is True and x0.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs x0 on a CUDA device, got x0 on {x0.device}")
    if cuda_graph is True and method not in FIXED_STEP_METHODS:
        raise ValueError(f"cuda_graph=True needs a fixed-step method {FIXED_STEP_METHODS}, got {method!r}")
    if autocast is not None and autocast not in _AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (math.isfinite(tol) and tol > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {tol!r}")


@torch.no_grad()
def sample(
    model,
    x0: torch.Tensor,
    *,
    steps: int | None = None,
    times=None,
    cond: tuple = (),
    method: str = "euler",
    cuda_graph: bool | str = "auto",
    autocast: torch.dtype | None = None,
    return_trajectory: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
):
    """Integrates dx/dt = model(t, x, *cond) from t=0 (x0, noise) to t=1 (samples), without gradients.

    Args:
        model: called as ``model(t, x, *cond)`` with t a [B] tensor in x0's dtype and device and x of x0's
            shape; returns the velocity, x's shape (e.g. torchcfm's UNetModelWrapper). Its train/eval
            mode is left as it is: in train mode dropout is sampled (and captured in the CUDA graph).
        x0: [B, ...] floating tensor, the initial noise (in model space). The state stays in its dtype.
        steps: number of uniform steps on [0, 1] (default 100) for the fixed-step methods and
            torchdiffeq's fixed-grid solvers ("rk4", ...); for adaptive solvers the number of trajectory
            intervals.
        times: instead of ``steps``, the grid itself: increasing t values in [0, 1] ([steps+1]; the
            scheduler's shifted schedule of a diffusers flow model as t = 1 - sigma).
        cond: conditioning tensors passed to every call of ``model`` after x (unchanged over the steps).
        method: "euler" (1 model call per step), "midpoint", "heun" (explicit trapezoid; 2 calls per
            step), "ab2" (>= 2 steps), "ab3" (>= 4 steps), "unipc" (>= 4 steps; 1 call per step, ab3 one
            more: :func:`calls`; unipc's trajectory holds its predicted, uncorrected states, as diffusers'), or any
            ``torchdiffeq.odeint`` method ("dopri5", "rk4", "bosh3", ...), using rtol/atol.
        cuda_graph: "auto" (CUDA graph when x0 is on CUDA and the method is fixed-step; a model whose capture
            fails is sampled eagerly from then on, with one warning), True (required; an error otherwise) or
            False (eager). The graph is captured on the first call for a
            (model, device, shape, dtype, grid, method, autocast, return_trajectory, cond shapes) and replayed
            afterwards; see the module docstring for weight refreshes. A model that syncs with the host
            (``.item()``, data-dependent shapes) cannot be captured: pass False.
        autocast: None (model runs in x0's dtype; an ambient autocast is disabled), torch.bfloat16 or
            torch.float16: the model runs under ``torch.autocast(x0.device.type, dtype)``, its output is
            cast back to x0's dtype.
        return_trajectory: also return the states at the grid's times.
        rtol, atol: tolerances of torchdiffeq's adaptive solvers (ignored by fixed-step methods).

    Returns:
        x1, x0's shape, dtype and device; with ``return_trajectory`` a tuple ``(x1, trajectory)``,
        trajectory [steps+1, *x0.shape] with trajectory[0] == x0 and trajectory[-1] == x1.
    """
    _check_args(model, x0, method, cuda_graph, autocast, rtol, atol, cond)
    grid_times = _check_times(times, 100 if steps is None and times is None else steps)
    if method in _MULTISTEP and grid_times.numel() - 1 < min_steps(method):
        raise ValueError(
            f"method {method!r} needs at least {min_steps(method)} steps (fewer never reach its "
            f"order), got {grid_times.numel() - 1}"
        )
    if method not in FIXED_STEP_METHODS:
        velocity = _velocity(model, cond, autocast, x0.device.type)
        x1, trajectory = _odeint(velocity, x0, grid_times, method, float(rtol), float(atol), return_trajectory)
    else:
        graphed = None
        if cuda_graph is True or (cuda_graph == "auto" and x0.device.type == "cuda" and model not in _UNCAPTURABLE):
            with torch.cuda.device(x0.device):
                graphed = _graphed(
                    model, x0, cond, grid_times, method, autocast, return_trajectory, required=cuda_graph is True
                )
        if graphed is None:
            velocity = _velocity(model, cond, autocast, x0.device.type)
            graphed = _integrate(
                velocity,
                x0,
                _time_grid(grid_times, x0.shape[0], x0.device, x0.dtype, method),
                method,
                return_trajectory,
            )
        x1, trajectory = graphed
    return (x1, trajectory) if return_trajectory else x1
