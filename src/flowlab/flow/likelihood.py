"""Log-likelihood of a flow by the instantaneous change of variables.

For ``dx/dt = v(x, t)`` carrying ``p_0 = N(0, I)`` at ``t = 0`` to ``p_1`` at ``t = 1``,

    log p_1(x_1) = log p_0(x_0) - integral_0^1 div v(x_t, t) dt,

with ``x_t`` the ODE solution through ``x_1``. We integrate the augmented state
``[x, l]`` with ``dl/dt = div v`` from ``t = 1`` back to ``t = 0`` (``l(1) = 0``), so
``log p_1(x_1) = log p_0(x_0) + l(0)``. The divergence is exact (one backward pass per
dimension; for small dimensions) or Hutchinson's unbiased estimate ``E[e^T J e]`` with a
Rademacher probe ``e`` fixed along the trajectory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .solvers import Field, Solver, get_solver, time_grid

__all__ = ["LikelihoodOutput", "divergence", "gaussian_log_density", "log_likelihood"]


def gaussian_log_density(x: Tensor) -> Tensor:
    """``log N(x; 0, I)`` per sample, shape ``(B,)``."""
    flat = x.flatten(1)
    return -0.5 * (flat.pow(2).sum(1) + flat.shape[1] * math.log(2 * math.pi))


def divergence(v: Tensor, x: Tensor, probe: Tensor | None = None, create_graph: bool = False) -> Tensor:
    """Divergence of ``v(x)`` w.r.t. ``x`` per sample, shape ``(B,)``.

    ``probe=None`` gives the exact trace of the Jacobian (``D`` backward passes); otherwise
    Hutchinson's estimate ``probe^T J probe`` (one backward pass).
    """
    if probe is not None:
        (g,) = torch.autograd.grad((v * probe).sum(), x, create_graph=create_graph)
        return (g * probe).flatten(1).sum(1)
    v_flat = v.flatten(1)
    div = torch.zeros(v.shape[0], device=v.device, dtype=v.dtype)
    for d in range(v_flat.shape[1]):
        (g,) = torch.autograd.grad(v_flat[:, d].sum(), x, retain_graph=True, create_graph=create_graph)
        div = div + g.flatten(1)[:, d]
    return div


@dataclass
class LikelihoodOutput:
    """``log_prob`` ``(B,)`` of the inputs, the latent ``x_0`` they map to, and the NFE used."""

    log_prob: Tensor
    x_0: Tensor
    nfe: int


def log_likelihood(
    field: Field,
    x_1: Tensor,
    solver: str | Solver = "dopri5",
    num_steps: int = 64,
    estimator: str = "exact",
    generator: torch.Generator | None = None,
    differentiable: bool = False,
) -> LikelihoodOutput:
    """``log p_1(x_1)`` of the flow ``field`` under a standard-normal source.

    Args:
        field: velocity ``(x, t) -> v``.
        x_1: data points, shape ``(B, ...)``.
        solver: ``euler``, ``midpoint``, ``heun``, ``dopri5`` or a :class:`Solver`
            (fixed-step solvers use ``num_steps``).
        estimator: ``exact`` or ``hutchinson``.
        generator: RNG for the Hutchinson probe.
        differentiable: keep the graph so that gradients flow to ``x_1`` and the field's parameters.
    """
    if estimator not in ("exact", "hutchinson"):
        raise ValueError(f"unknown divergence estimator {estimator!r}; choose exact or hutchinson")
    if isinstance(solver, str) and solver == "multistep":
        raise ValueError("the multistep solver samples only; use euler, midpoint, heun or dopri5 for likelihoods")
    solver_obj = get_solver(solver) if isinstance(solver, str) else solver
    shape, b = x_1.shape, x_1.shape[0]
    probe = None
    if estimator == "hutchinson":
        probe = torch.randint(0, 2, shape, generator=generator, device="cpu").to(x_1) * 2 - 1

    def augmented(y: Tensor, t: Tensor) -> Tensor:
        with torch.enable_grad():
            x = y[:, :-1].reshape(shape)
            if not x.requires_grad:
                x = x.requires_grad_(True)
            v = field(x, t)
            div = divergence(v, x, probe, create_graph=differentiable)
        if not differentiable:
            v, div = v.detach(), div.detach()
        return torch.cat([v.reshape(b, -1), div[:, None]], dim=1)

    y1 = torch.cat([x_1.reshape(b, -1), torch.zeros(b, 1, device=x_1.device, dtype=x_1.dtype)], dim=1)
    times = time_grid(num_steps).flip(0).to(x_1.device)
    run = solver_obj._solve if differentiable else solver_obj.solve
    out = run(augmented, y1, times, False)
    x_0 = out.x[:, :-1].reshape(shape)
    return LikelihoodOutput(log_prob=gaussian_log_density(x_0) + out.x[:, -1], x_0=x_0, nfe=out.nfe)
