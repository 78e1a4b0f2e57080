"""ODE sampling of flow-matching models: integrate dx/dt = model(t, x, *cond) from t=0 (noise) to t=1 (data).

Fixed-step methods on a uniform grid of ``steps`` steps, or on an explicit grid ``times`` (e.g. the shifted
sigma schedule of SD3/FLUX, t = 1 - sigma): "euler" (1st order, 1 model call per step), "midpoint" and "heun"
(explicit trapezoid), 2nd order, 2 calls per step. Every other method name ("dopri5", "rk4", "bosh3", ...) goes
to ``torchdiffeq.odeint``, the accuracy reference. ``cond`` is a tuple of conditioning tensors (text
embeddings, class labels) passed to every call, the same for all steps.

On CUDA the fixed-step loop is captured once into one CUDA graph and replayed per call (``cond`` is copied into
the graph's static inputs); the graph is cached per model (weakly: it dies with the model) and per (device,
shape, dtype, time grid, method, autocast, trajectory, cond shapes) and is keyed by the data_ptr()s of the
model's parameters and buffers: refreshing
the weights in place (``model.load_state_dict(other.state_dict())``, ``p.copy_(...)``) keeps the graph
and the replay reads the new values; replacing parameter or buffer tensors makes a new capture.
"""
from __future__ import annotations

import math
import numbers
import warnings
import weakref
from typing import Callable, NamedTuple

import torch

FIXED_STEP_METHODS = ("euler", "midpoint", "heun")
GRIDS = ("uniform", "noise_dense", "data_dense")
GRID_SHIFT = 3.0
_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)
_WARMUP_STEPS = 3  # eager steps on a side stream before capture (lazy init, cuDNN/cuBLAS autotuning)

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Time grid and one step of each fixed-step method (shared by the eager and the graphed loop)


class _Grid(NamedTuple):
    """A fixed-step schedule: ``t`` [2*steps+1, batch], where step i uses rows 2i (start), 2i+1 (half step) and
    2i+2 (end), each t rounded once from float64; ``dt`` the steps' lengths (Python floats, from float64)."""

    t: torch.Tensor
    dt: tuple[float, ...]


def _uniform(steps: int) -> torch.Tensor:
    return torch.arange(steps + 1, dtype=torch.float64) / steps


def time_grid(name: str, steps: int) -> torch.Tensor:
    """A named grid of ``steps`` steps on [0, 1] (float64 [steps + 1], t=0 noise, t=1 data): "uniform" (k / N),
    "noise_dense" (SD3's time shift 3, t = 1 - 3s / (1 + 2s) with s = 1 - k / N: shorter steps near the noise) or
    "data_dense" (its mirror, t = 3u / (1 + 2u) with u = k / N: shorter steps near the data)."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    u = _uniform(int(steps))
    if name == "uniform":
        return u
    if name == "noise_dense":
        return 1 - GRID_SHIFT * (1 - u) / (1 + (GRID_SHIFT - 1) * (1 - u))
    if name == "data_dense":
        return GRID_SHIFT * u / (1 + (GRID_SHIFT - 1) * u)
    raise ValueError(f"grid must be one of {GRIDS}, got {name!r}")


def _time_grid(times: torch.Tensor, batch: int, device: torch.device, dtype: torch.dtype) -> _Grid:
    """The schedule of the float64 grid ``times`` [steps+1]; a uniform grid gets t = k / (2*steps) and dt =
    1/steps exactly."""
    steps = times.numel() - 1
    if torch.equal(times, _uniform(steps)):
        t, dt = torch.arange(2 * steps + 1, dtype=torch.float64) / (2 * steps), (1.0 / steps,) * steps
    else:
        half = (times[:-1] + times[1:]) / 2
        t = torch.cat([torch.stack([times[:-1], half], dim=1).reshape(-1), times[-1:]])
        dt = tuple((times[1:] - times[:-1]).tolist())
    return _Grid(t.to(device, dtype)[:, None].expand(-1, batch).contiguous(), dt)


def _euler_step(velocity: Velocity, x, t0, t_half, t1, dt: float):
    return x.add(velocity(t0, x), alpha=dt)


def _midpoint_step(velocity: Velocity, x, t0, t_half, t1, dt: float):
    return x.add(velocity(t_half, x.add(velocity(t0, x), alpha=0.5 * dt)), alpha=dt)


def _heun_step(velocity: Velocity, x, t0, t_half, t1, dt: float):
    k1 = velocity(t0, x)
    k2 = velocity(t1, x.add(k1, alpha=dt))
    return x.add(k1 + k2, alpha=0.5 * dt)


_STEPS = {"euler": _euler_step, "midpoint": _midpoint_step, "heun": _heun_step}


def _integrate(velocity: Velocity, x: torch.Tensor, grid: _Grid, method: str, return_trajectory: bool):
    """The fixed-step loop over ``grid`` (from :func:`_time_grid`); never writes ``x``.
    Returns (x1, trajectory [steps+1, *x.shape] or None)."""
    step, steps, t = _STEPS[method], len(grid.dt), grid.t
    trajectory = None
    if return_trajectory:
        trajectory = x.new_empty((steps + 1, *x.shape))
        trajectory[0].copy_(x)
    for i in range(steps):
        x = step(velocity, x, t[2 * i], t[2 * i + 1], t[2 * i + 2], grid.dt[i])
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
    grid = torch.linspace(0, 1, steps + 1, dtype=x0.dtype, device=x0.device) if uniform else times.to(x0.device, x0.dtype)
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
    grid = _time_grid(times, x0.shape[0], x0.device, x0.dtype)
    side = torch.cuda.Stream(x0.device)
    side.wait_stream(torch.cuda.current_stream(x0.device))
    with torch.cuda.stream(side):
        for _ in range(_WARMUP_STEPS):
            _STEPS[method](velocity, x_in, grid.t[0], grid.t[1], grid.t[2], grid.dt[0])
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
    key = (ptrs, x0.device, tuple(x0.shape), x0.dtype, tuple(times.tolist()), method, autocast, return_trajectory,
           tuple((tuple(c.shape), c.dtype, c.device) for c in cond))
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
            warnings.warn(f"sample(cuda_graph='auto'): {type(model).__name__} cannot be captured in a CUDA graph "
                          f"({_UNCAPTURABLE[model]:.300}); it is sampled eagerly from now on (pass cuda_graph=False "
                          "to silence this, or cuda_graph=True to make it an error)", stacklevel=3)
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
    if grid.numel() < 2 or not bool(torch.isfinite(grid).all()) or not bool((grid[1:] > grid[:-1]).all()) or \
            grid[0] < 0 or grid[-1] > 1:
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
        steps: number of uniform steps on [0, 1] (default 100) for "euler", "midpoint", "heun" and
            torchdiffeq's fixed-grid solvers ("rk4", ...); for adaptive solvers the number of trajectory
            intervals.
        times: instead of ``steps``, the grid itself: increasing t values in [0, 1] ([steps+1]; the
            scheduler's shifted schedule of a diffusers flow model as t = 1 - sigma).
        cond: conditioning tensors passed to every call of ``model`` after x (unchanged over the steps).
        method: "euler" (1 model call per step), "midpoint", "heun" (explicit trapezoid; 2 calls per
            step), or any ``torchdiffeq.odeint`` method ("dopri5", "rk4", "bosh3", ...), using rtol/atol.
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
    if method not in FIXED_STEP_METHODS:
        velocity = _velocity(model, cond, autocast, x0.device.type)
        x1, trajectory = _odeint(velocity, x0, grid_times, method, float(rtol), float(atol), return_trajectory)
    else:
        graphed = None
        if cuda_graph is True or (cuda_graph == "auto" and x0.device.type == "cuda" and model not in _UNCAPTURABLE):
            with torch.cuda.device(x0.device):
                graphed = _graphed(model, x0, cond, grid_times, method, autocast, return_trajectory,
                                   required=cuda_graph is True)
        if graphed is None:
            velocity = _velocity(model, cond, autocast, x0.device.type)
            graphed = _integrate(velocity, x0, _time_grid(grid_times, x0.shape[0], x0.device, x0.dtype), method,
                                 return_trajectory)
        x1, trajectory = graphed
    return (x1, trajectory) if return_trajectory else x1
