"""A stochastic sampler with the flow ODE's marginals, and its Gaussian step log-probabilities.

FlowGRPO (Liu et al., 2025) turns the probability-flow ODE of a rectified flow into an SDE
with the same marginals, so that each sampling step is a Gaussian transition with a
tractable log-probability. In diffusers' convention (``sigma = 1 - t``, noise at ``sigma = 1``,
model target ``v = eps - x_data``) a step from ``sigma`` to ``sigma_next`` (``d = sigma_next - sigma < 0``)
is::

    s      = a * sqrt(sigma / (1 - sigma))        (a: noise level; at sigma = 1 the denominator
                                                    uses the grid's second sigma)
    mean   = x * (1 + s^2 d / (2 sigma)) + v * (1 + s^2 (1 - sigma) / (2 sigma)) * d
    std    = s * sqrt(-d)
    x_next = mean + std * z,  z ~ N(0, I)

With ``a = 0`` it is exactly an Euler step of the ODE. Everything here takes flowlab
velocities (``u = x_data - noise = -v``) and flowlab times and converts through
:mod:`flowlab.flow.conventions`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .conventions import t_to_sigma, velocity_to_diffusers
from .paths import expand_like

__all__ = ["SDEStep", "SDETrajectory", "sde_noise_std", "flow_sde_step", "gaussian_log_prob", "sample_flow_sde"]


@dataclass
class SDEStep:
    """One SDE transition: ``x_next ~ N(mean, std^2 I)``; ``log_prob`` of ``x_next`` per sample ``(B,)``."""

    x_next: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor


@dataclass
class SDETrajectory:
    """States ``(K+1, B, ...)`` at the grid ``times`` ``(K+1,)`` and step log-probabilities ``(K, B)``."""

    states: Tensor
    log_probs: Tensor
    times: Tensor

    @property
    def x(self) -> Tensor:
        """The final sample."""
        return self.states[-1]


def sde_noise_std(t: Tensor, noise_level: float, t_cap: float) -> Tensor:
    """FlowGRPO's diffusion coefficient ``a * sqrt(sigma / (1 - sigma))`` at flowlab time ``t``.

    Args:
        t: flowlab times ``(B,)`` or scalar tensor.
        noise_level: ``a``.
        t_cap: used in the denominator where ``t = 0`` (``sigma = 1``), normally the grid's second time.
    """
    sigma = t_to_sigma(t)
    denom_sigma = torch.where(sigma >= 1.0, torch.as_tensor(t_to_sigma(t_cap), dtype=sigma.dtype, device=sigma.device), sigma)
    return noise_level * torch.sqrt(sigma / (1.0 - denom_sigma))


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Log-density of ``x`` under ``N(mean, std^2 I)``, **averaged** over the non-batch dimensions
    (as FlowGRPO does), computed in float32. Returns ``(B,)``."""
    x, mean = x.float(), mean.float()
    std = expand_like(std.float(), x) if std.ndim else std.float()
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def flow_sde_step(
    x: Tensor, velocity: Tensor, t: float | Tensor, t_next: float | Tensor, noise_level: float, t_cap: float,
    noise: Tensor | None = None, x_next: Tensor | None = None,
) -> SDEStep:
    """One marginal-preserving SDE step from flowlab time ``t`` to ``t_next > t``.

    Args:
        x: state ``(B, ...)`` at ``t``.
        velocity: the flowlab velocity ``u(x, t)`` (``data - noise``), same shape.
        t, t_next: flowlab times (floats or ``(B,)`` tensors).
        noise_level: FlowGRPO's ``a`` (0.7 in the public code; 0 gives an Euler step).
        t_cap: see :func:`sde_noise_std`.
        noise: ``z`` for a new sample (drawn with ``torch.randn_like`` if neither it nor ``x_next`` is given).
        x_next: an already drawn next state, to evaluate its log-probability under this step (training).
    """
    B = x.shape[0]
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(B)
    t_next = torch.as_tensor(t_next, dtype=torch.float64, device=x.device).expand(B)
    sigma, sigma_next = t_to_sigma(t), t_to_sigma(t_next)
    d = sigma_next - sigma  # < 0
    s = sde_noise_std(t, noise_level, t_cap)
    v = velocity_to_diffusers(velocity)
    c_x = expand_like((1 + s**2 * d / (2 * sigma)).to(x.dtype), x)
    c_v = expand_like(((1 + s**2 * (1 - sigma) / (2 * sigma)) * d).to(x.dtype), x)
    mean = x * c_x + v * c_v
    std = (s * torch.sqrt(-d)).to(x.dtype)
    if x_next is None:
        if noise is None:
            noise = torch.randn_like(x)
        x_next = mean + expand_like(std, x) * noise
    log_prob = gaussian_log_prob(x_next, mean, std) if float(std.min()) > 0 else torch.zeros(B, device=x.device)
    return SDEStep(x_next=x_next, mean=mean, std=std, log_prob=log_prob)


@torch.no_grad()
def sample_flow_sde(
    field: Callable[[Tensor, Tensor], Tensor], x: Tensor, times: Tensor, noise_level: float,
    noises: Tensor | None = None, generator: torch.Generator | None = None,
) -> SDETrajectory:
    """Sample with :func:`flow_sde_step` along ``times`` (increasing flowlab times, ``K+1`` of them).

    Args:
        field: flowlab velocity ``field(x, t)`` with ``t`` of shape ``(B,)``.
        x: initial noise ``(B, ...)``.
        times: the grid, from ``t = 0`` (noise) to ``t = 1`` (data).
        noise_level: ``a``.
        noises: the ``K`` step noises ``(K, B, ...)`` (drawn from ``generator`` if omitted).
    """
    K = len(times) - 1
    if noises is None:
        noises = torch.randn((K, *x.shape), generator=generator, dtype=x.dtype).to(x.device)
    t_cap = float(times[1])
    states, log_probs = [x], []
    for k in range(K):
        t = torch.full((x.shape[0],), float(times[k]), device=x.device, dtype=x.dtype)
        step = flow_sde_step(x, field(x, t), float(times[k]), float(times[k + 1]), noise_level, t_cap, noise=noises[k])
        x = step.x_next
        states.append(x)
        log_probs.append(step.log_prob)
    return SDETrajectory(states=torch.stack(states), log_probs=torch.stack(log_probs), times=times)
