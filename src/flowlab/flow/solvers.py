"""ODE solvers for ``dx/dt = v(x, t)`` in flowlab time (0 = noise, 1 = data).

A *field* is any callable ``field(x, t) -> v`` with ``x`` of shape ``(B, ...)`` and ``t`` of
shape ``(B,)``. Every solver integrates along a ``time_grid`` (increasing to sample,
decreasing to invert), counts network evaluations (NFE) and optionally returns the states
at every grid point.

* ``EulerSolver`` (order 1, 1 NFE/step), ``MidpointSolver`` and ``HeunSolver`` (order 2,
  2 NFE/step) work on any field and in either direction.
* ``MultistepSolver``: DPM-Solver++(2M) written for any affine Gaussian path in the flow
  parameterisation (1 NFE/step, second order from the third step; first order on the
  first step and on a final step that lands on ``sigma = 0``).
* ``Dopri5Solver``: adaptive Dormand-Prince through ``torchdiffeq``.
* ``MeanFlowSolver``: jumps ``x_r = x_t + (r - t) u(x_t, t, r)`` with an average-velocity model
  (:mod:`flowlab.flow.meanflow`; its field takes the step's end time: ``field(x, t, r)``).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field as dc_field
from typing import Callable

import torch
from torch import Tensor

from .conventions import shift_t
from .parameterization import to_x1
from .paths import AffinePath, expand_like

__all__ = [
    "Field",
    "SolverOutput",
    "Solver",
    "EulerSolver",
    "MidpointSolver",
    "HeunSolver",
    "MultistepSolver",
    "Dopri5Solver",
    "MeanFlowSolver",
    "SOLVERS",
    "AVERAGE_VELOCITY_SOLVERS",
    "get_solver",
    "time_grid",
    "steps_for_nfe",
]

Field = Callable[[Tensor, Tensor], Tensor]


def time_grid(
    num_steps: int, shift: float = 1.0, t_start: float = 0.0, t_end: float = 1.0, device=None
) -> Tensor:
    """``num_steps + 1`` times from ``t_start`` to ``t_end``: uniform, then SD3-shifted if ``shift != 1``.

    ``shift > 1`` spends more steps near noise (``t = 0``).
    """
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    t = torch.linspace(t_start, t_end, num_steps + 1, dtype=torch.float64, device=device)
    if shift != 1.0:
        t = shift_t(t, shift)
    return t


@dataclass
class SolverOutput:
    """Result of a solve.

    Attributes:
        x: final state, shape ``(B, ...)``.
        nfe: number of field evaluations used.
        times: the grid the solver stepped on (for dopri5: the requested output times).
        trajectory: states at each time of ``times`` (``None`` unless asked for).
    """

    x: Tensor
    nfe: int
    times: Tensor
    trajectory: list[Tensor] | None = dc_field(default=None)


class _Counter:
    def __init__(self, field: Field):
        self.field, self.nfe = field, 0

    def __call__(self, x: Tensor, t: Tensor | float, *times: Tensor | float) -> Tensor:
        """``field(x, t, *times)`` with every time broadcast to ``(B,)`` (``times``: e.g. MeanFlow's step end)."""
        self.nfe += 1
        return self.field(x, *(self._batch_time(x, s) for s in (t, *times)))

    @staticmethod
    def _batch_time(x: Tensor, t: Tensor | float) -> Tensor:
        if not torch.is_tensor(t):
            t = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
        elif t.ndim == 0:
            # keep t's graph: torchdiffeq's step times depend on the state (initial step selection), and
            # cutting them here (float(t)) makes differentiable solves return inconsistent gradients
            t = t.to(device=x.device, dtype=x.dtype).expand(x.shape[0]).clone()
        return t.to(x.dtype)


class Solver(ABC):
    """Base class: subclasses implement :meth:`step` (fixed-grid) or override :meth:`solve`."""

    name: str = "solver"
    nfe_per_step: int = 1
    order: int = 1

    @torch.no_grad()
    def solve(self, field: Field, x: Tensor, times: Tensor, return_trajectory: bool = False) -> SolverOutput:
        """Integrate ``field`` from ``times[0]`` to ``times[-1]`` starting at ``x``."""
        return self._solve(field, x, times, return_trajectory)

    def _solve(self, field, x, times, return_trajectory):
        f = _Counter(field)
        traj = [x] if return_trajectory else None
        self.reset()
        for i in range(len(times) - 1):
            x = self.step(f, x, float(times[i]), float(times[i + 1]), i, len(times) - 1)
            if traj is not None:
                traj.append(x)
        return SolverOutput(x=x, nfe=f.nfe, times=times, trajectory=traj)

    def reset(self) -> None:
        """Clear any multistep history before a new solve."""

    @abstractmethod
    def step(self, f: Field, x: Tensor, t: float, t_next: float, i: int, n: int) -> Tensor:
        """Advance ``x`` from ``t`` to ``t_next`` (step ``i`` of ``n``)."""


class EulerSolver(Solver):
    """Explicit Euler: ``x + h v(x, t)``."""

    name, nfe_per_step, order = "euler", 1, 1

    def step(self, f, x, t, t_next, i, n):
        return x + (t_next - t) * f(x, t)


class MidpointSolver(Solver):
    """Explicit midpoint: ``x + h v(x + h/2 v(x, t), t + h/2)``."""

    name, nfe_per_step, order = "midpoint", 2, 2

    def step(self, f, x, t, t_next, i, n):
        h = t_next - t
        return x + h * f(x + 0.5 * h * f(x, t), t + 0.5 * h)


class HeunSolver(Solver):
    """Heun (explicit trapezoid): predictor Euler, corrector average of both slopes."""

    name, nfe_per_step, order = "heun", 2, 2

    def step(self, f, x, t, t_next, i, n):
        h = t_next - t
        v = f(x, t)
        x_pred = x + h * v
        return x + 0.5 * h * (v + f(x_pred, t_next))


class MultistepSolver(Solver):
    """DPM-Solver++(2M) for an affine path, from a velocity field.

    With ``lambda_t = log(alpha_t / sigma_t)``, ``h = lambda_t - lambda_s`` and the data
    prediction ``x1_hat`` (converted from the velocity through the path), one step is

        x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) D,
        D   = (1 + 1/(2r)) x1_hat_s - 1/(2r) x1_hat_prev,  r = h_prev / h,

    with ``D = x1_hat_s`` on the first step and wherever an endpoint has ``alpha = 0`` or
    ``sigma = 0`` (infinite log-SNR). Sampling direction only (increasing ``t``).
    """

    name, nfe_per_step, order = "multistep", 1, 2

    def __init__(self, path: AffinePath | None = None):
        from .paths import LinearPath

        self.path = path if path is not None else LinearPath()
        self.reset()

    def reset(self):
        self._prev: tuple[Tensor, float] | None = None  # (x1_hat, lambda) at the previous step

    def _coef(self, t: float):
        tt = torch.tensor([t], dtype=torch.float64)
        a, s = float(self.path.alpha(tt)), float(self.path.sigma(tt))
        lam = math.log(a / s) if a > 0 and s > 0 else (float("-inf") if a <= 0 else float("inf"))
        return a, s, lam

    def step(self, f, x, t, t_next, i, n):
        if t_next < t:
            raise ValueError("MultistepSolver integrates forward in time only (noise -> data)")
        a_s, s_s, lam_s = self._coef(t)
        a_t, s_t, lam_t = self._coef(t_next)
        tb = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        x1_hat = to_x1(self.path, f(x, tb), x, tb, "velocity")
        finite = all(map(lambda v: abs(v) != float("inf"), (lam_s, lam_t)))
        if self._prev is not None and finite and abs(self._prev[1]) != float("inf"):
            h = lam_t - lam_s
            r = (lam_s - self._prev[1]) / h
            d = (1 + 0.5 / r) * x1_hat - (0.5 / r) * self._prev[0]
        else:
            d = x1_hat
        self._prev = (x1_hat, lam_s)
        if s_s <= 0:  # already at data
            return x1_hat
        # e^{-h} = (alpha_s sigma_t) / (sigma_s alpha_t), finite even at alpha_s = 0 or sigma_t = 0
        exp_neg_h = (a_s * s_t) / (s_s * a_t) if a_t > 0 else 0.0
        return (s_t / s_s) * x + a_t * (1 - exp_neg_h) * d


class Dopri5Solver(Solver):
    """Adaptive Dormand-Prince 5(4) via ``torchdiffeq.odeint``."""

    name, nfe_per_step, order = "dopri5", 6, 5

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5):
        self.rtol, self.atol = rtol, atol

    def step(self, f, x, t, t_next, i, n):  # pragma: no cover - dopri5 is adaptive, see _solve
        raise NotImplementedError("Dopri5Solver chooses its own steps; call solve()")

    def _solve(self, field, x, times, return_trajectory):
        from torchdiffeq import odeint

        f = _Counter(field)
        grid = times if return_trajectory else times[[0, -1]]
        out = odeint(lambda t, y: f(y, t), x, grid.to(x.device, x.dtype), rtol=self.rtol, atol=self.atol, method="dopri5")
        traj = list(out) if return_trajectory else None
        return SolverOutput(x=out[-1], nfe=f.nfe, times=grid, trajectory=traj)


class MeanFlowSolver(Solver):
    """One jump per step with an average-velocity model: ``x_r = x_t + (r - t) u(x_t, t, r)``.

    The field is MeanFlow's ``u(x, t, r)`` (:mod:`flowlab.flow.meanflow`), called with the step's end
    ``r = t_next`` as a third argument; exact for every grid if ``u`` is exact, so 1 or 2 steps suffice.
    Sampling direction only (increasing ``t``).
    """

    name, nfe_per_step, order = "meanflow", 1, 1

    def step(self, f, x, t, t_next, i, n):
        if t_next < t:
            raise ValueError("MeanFlowSolver steps forward in time only (noise -> data)")
        return x + (t_next - t) * f(x, t, t_next)


SOLVERS = {
    "euler": EulerSolver,
    "midpoint": MidpointSolver,
    "heun": HeunSolver,
    "multistep": MultistepSolver,
    "dopri5": Dopri5Solver,
    "meanflow": MeanFlowSolver,
}

#: solvers whose field is an average velocity ``u(x, t, r)`` rather than a velocity ``v(x, t)``
AVERAGE_VELOCITY_SOLVERS = frozenset({"meanflow"})


def get_solver(name: str, path: AffinePath | None = None, rtol: float = 1e-5, atol: float = 1e-5) -> Solver:
    """Build a solver by name from every setting a caller may hold; each solver takes what it uses.

    Args:
        name: ``euler``, ``midpoint``, ``heun``, ``multistep``, ``dopri5`` or ``meanflow`` (whose field is
            an average velocity ``u(x, t, r)``).
        path: the model's path (``multistep`` converts velocities to data predictions through it;
            linear when ``None``). Ignored by the other solvers.
        rtol, atol: ``dopri5``'s tolerances. Ignored by the fixed-step solvers.

    Raises:
        ValueError: unknown ``name``, or a non-positive tolerance.
    """
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    if name == "multistep":
        return MultistepSolver(path)
    if name == "dopri5":
        for key, value in (("rtol", rtol), ("atol", atol)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"dopri5 {key} must be a finite number > 0, got {value!r}")
        return Dopri5Solver(rtol=rtol, atol=atol)
    return SOLVERS[name]()


def steps_for_nfe(solver: str, nfe: int) -> int:
    """Number of grid steps that spends ``nfe`` evaluations with a fixed-step solver."""
    per = SOLVERS[solver].nfe_per_step
    if solver == "dopri5":
        raise ValueError("dopri5 is adaptive: its NFE is set by rtol/atol, not by a step count")
    if nfe % per:
        raise ValueError(f"{solver} uses {per} NFE per step; {nfe} is not a multiple")
    return nfe // per
