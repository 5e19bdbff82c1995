"""One sampling entry: integrate a velocity field from noise (``t = 0``) to data (``t = 1``).

:func:`sample` is what every sampler in flowlab calls (``FlowPipeline``, ``WGFPipeline`` /
:class:`~flowlab.wgf.ProbabilityFlow`, the RL recipes' rollouts and evaluations): it builds the
time grid (:func:`~flowlab.flow.solvers.time_grid`, SD3-shifted when ``shift != 1``) and either
solves the probability-flow ODE ``dx/dt = v(x, t)`` with a named solver
(:func:`~flowlab.flow.solvers.get_solver`), or, given a :class:`~flowlab.flow.sde.MarginalSDE`,
runs Euler-Maruyama on the same-marginal SDE and keeps every step's log-probability.
Guidance is part of the field (:func:`flowlab.flow.guidance.guided_field`).
"""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field

import torch
from torch import Tensor

from .paths import AffinePath
from .sde import MarginalSDE
from .solvers import Field, Solver, get_solver, time_grid

__all__ = ["SampleOutput", "sample"]


@dataclass
class SampleOutput:
    """Result of :func:`sample`.

    Attributes:
        x: the final state ``(B, ...)`` (data end, ``t = 1``).
        nfe: number of field evaluations.
        times: the grid ``(K+1,)`` (for ``dopri5``: the requested output times).
        trajectory: the states at every time of ``times`` (``None`` unless asked for).
        log_probs: SDE only: each step's Gaussian log-probability ``(K, B)``.
    """

    x: Tensor
    nfe: int
    times: Tensor
    trajectory: list[Tensor] | None = dc_field(default=None)
    log_probs: Tensor | None = None

    @property
    def states(self) -> Tensor:
        """The trajectory stacked ``(K+1, B, ...)`` (needs ``return_trajectory=True``)."""
        if self.trajectory is None:
            raise ValueError("no trajectory was kept: sample with return_trajectory=True")
        return torch.stack(self.trajectory)


def sample(
    field: Field,
    x0: Tensor,
    *,
    solver: str | Solver = "euler",
    num_steps: int | None = None,
    shift: float = 1.0,
    times: Tensor | None = None,
    path: AffinePath | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    sde: MarginalSDE | None = None,
    noises: Tensor | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
) -> SampleOutput:
    """Sample from noise ``x0`` ``(B, ...)`` at ``t = 0`` to ``t = 1``.

    Args:
        field: velocity ``field(x, t) -> v`` with ``t`` of shape ``(B,)`` (flowlab time), guidance included;
            for ``solver="meanflow"`` an average velocity ``field(x, t, r) -> u`` (see :mod:`flowlab.flow.meanflow`).
        x0: the initial noise.
        solver: an ODE solver's name (``euler``, ``midpoint``, ``heun``, ``multistep``, ``dopri5``,
            ``meanflow``) or a :class:`Solver`. With ``sde`` only ``euler`` (Euler-Maruyama) is possible.
        num_steps: steps of the grid (``dopri5`` chooses its own steps and only reads the grid's ends).
        shift: SD3 time shift of the grid (``> 1``: more steps near noise).
        times: an explicit increasing grid ``(K+1,)`` instead of ``num_steps``/``shift``.
        path: the model's path (``multistep`` and the SDE need it; linear when ``None``).
        rtol, atol: ``dopri5``'s tolerances.
        sde: sample the same-marginal SDE instead of the ODE.
        noises: SDE only: the step noises ``(K, B, ...)``; otherwise drawn step by step from
            ``generator`` (on its device), only for the steps that add noise.
        generator: SDE only: RNG for the step noises.
        return_trajectory: keep the states at every grid time.

    Raises:
        ValueError: neither or both of ``num_steps`` and ``times``, an unknown solver, a solver
            other than ``euler`` with ``sde``, or ``noises`` of the wrong shape.
    """
    if (times is None) == (num_steps is None):
        raise ValueError("sample: give exactly one of num_steps and times")
    if times is None:
        times = time_grid(num_steps, shift=shift, device=x0.device)
    if sde is None:
        solver_obj = get_solver(solver, path=path, rtol=rtol, atol=atol) if isinstance(solver, str) else solver
        out = solver_obj.solve(field, x0, times, return_trajectory=return_trajectory)
        return SampleOutput(x=out.x, nfe=out.nfe, times=out.times, trajectory=out.trajectory)
    name = solver if isinstance(solver, str) else solver.name
    if name != "euler":
        raise ValueError(f"the SDE is sampled with Euler–Maruyama: pass solver='euler', not {name!r}")
    return _sample_sde(field, x0, times, sde, noises, generator, return_trajectory)


@torch.no_grad()
def _sample_sde(field, x, times, sde: MarginalSDE, noises, generator, return_trajectory) -> SampleOutput:
    K = len(times) - 1
    if noises is not None and tuple(noises.shape) != (K, *x.shape):
        raise ValueError(f"noises must have shape {(K, *x.shape)} (steps, *x.shape), got {tuple(noises.shape)}")
    t_cap = float(times[1])
    traj = [x] if return_trajectory else None
    log_probs = []
    for k in range(K):
        t, t_next = float(times[k]), float(times[k + 1])
        v = field(x, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype))
        add_noise = sde.noise_on_last_step or k < K - 1
        z = None
        if add_noise:
            z = noises[k] if noises is not None else torch.randn(
                x.shape, generator=generator, device="cpu" if generator is None else generator.device, dtype=x.dtype
            ).to(x.device)
        step = sde.step(x, v, t, t_next, t_cap, noise=z, add_noise=add_noise)
        x = step.x_next
        log_probs.append(step.log_prob)
        if traj is not None:
            traj.append(x)
    return SampleOutput(x=x, nfe=K, times=times, trajectory=traj, log_probs=torch.stack(log_probs))
