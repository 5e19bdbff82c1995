"""The stochastic samplers with the flow ODE's marginals: one family, two parameterisations.

On an affine path ``x_t = alpha_t x1 + sigma_t x0`` (flowlab time: ``t = 0`` noise, ``t = 1``
data) with marginals ``p_t`` and probability-flow velocity ``v(x, t)``, every SDE

    dx = [v(x, t) + (eps(t)^2 / 2) grad log p_t(x)] dt + eps(t) dW

has the marginals ``p_t`` (in the Fokker-Planck equation the extra drift
``-div(p eps^2/2 grad log p) = -eps^2/2 lap p`` cancels the diffusion ``+eps^2/2 lap p``), for
any diffusion ``eps(t) >= 0``; ``eps = 0`` is the ODE. The score is affine in the velocity:
with ``D = alpha sigma' - alpha' sigma``,

    grad log p_t(x) = (alpha' x - alpha v) / (sigma D)

(:mod:`flowlab.flow.parameterization`), so one Euler-Maruyama step from ``t`` to
``t + h`` is the Gaussian transition

    mean = c_x x + c_v v,    c_x = 1 - h eps^2 alpha' / (2 sigma (-D)),
                              c_v = h (1 + eps^2 alpha / (2 sigma (-D))),
    std  = eps(t) sqrt(h)

with a tractable log-probability. :class:`MarginalSDE` is that family; it is parameterised
in one of two ways:

* ``eta`` (the WGF family): ``eps(t)^2 = eta^2 g^2(t)`` with ``g^2 = 2 sigma (sigma alpha'/alpha - sigma')``
  the squared diffusion of the forward (noising) SDE of the path (:func:`diffusion_coefficient`);
  ``eta = 1`` is the reverse-time SDE, ``eta = 0`` the probability-flow ODE.
* ``noise_level`` ``a`` (FlowGRPO, Liu et al., 2025): ``eps(t) = a sqrt((1 - t) / t)`` in flowlab
  time, i.e. ``a sqrt(sigma / (1 - sigma))`` in diffusers' ``sigma = 1 - t``; at ``t = 0`` the
  denominator uses ``t_cap`` (the grid's second time).

**Relation between the two.** They describe the same SDE when ``a^2 (1 - t) / t = eta^2 g^2(t)``:

* linear path (``alpha = t``, ``sigma = 1 - t``): ``g^2 = 2 (1 - t) / t``, so ``a = sqrt(2) eta`` at
  every ``t`` (FlowGRPO's default ``a = 0.7`` is ``eta = 0.495``; the reverse SDE is ``a = sqrt(2)``);
* any other path: ``eta(t) = a sqrt((1 - t) / (t g^2(t)))`` depends on ``t``; e.g. the cosine path
  (``alpha = sin(pi t/2)``, ``sigma = cos(pi t/2)``) has ``g^2 = pi cot(pi t / 2)``, so
  ``eta(t)^2 = a^2 (1 - t) tan(pi t / 2) / (pi t)``, which tends to ``a^2 / 2`` at ``t = 0`` and
  ``2 a^2 / pi^2`` at ``t = 1``.

On the linear path with ``noise_level`` the step is FlowGRPO's published update, written in
diffusers' ``sigma`` with ``d = sigma_next - sigma < 0`` and ``v_d = -v``::

    mean = x (1 + s^2 d / (2 sigma)) + v_d (1 + s^2 (1 - sigma) / (2 sigma)) d,   std = s sqrt(-d)

(the coefficients are computed in float64 in that order; ``h`` is taken as
``(1 - t) - (1 - t_next)``, so ``-h`` is FlowGRPO's ``d`` to the bit).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .conventions import t_to_sigma
from .paths import AffinePath, LinearPath, expand_like

__all__ = [
    "SDEStep",
    "SDETrajectory",
    "MarginalSDE",
    "diffusion_coefficient",
    "sde_noise_std",
    "flow_sde_step",
    "gaussian_log_prob",
    "sample_flow_sde",
]


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


def diffusion_coefficient(path: AffinePath, t: Tensor, like: Tensor) -> Tensor:
    """``g^2(t) = 2 sigma (sigma alpha'/alpha - sigma')``, broadcast like ``like``; 0 where ``alpha = 0``.

    It is the squared diffusion of the forward SDE that has the path's marginals, and
    ``v = (alpha'/alpha) x + (g^2 / 2) score``.
    """
    a, s, da, ds = path.coefficients(t, like)
    g2 = 2 * s * (s * da / a.clamp_min(1e-12) - ds)
    return torch.where(a > 0, g2, torch.zeros_like(g2)).clamp_min(0)


def sde_noise_std(t: Tensor, noise_level: float, t_cap: float) -> Tensor:
    """FlowGRPO's diffusion ``eps = a * sqrt(sigma / (1 - sigma))`` (``sigma = 1 - t``) at flowlab time ``t``.

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


def _as_times(t: float | Tensor, batch: int, device) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64, device=device).expand(batch)


@dataclass(frozen=True)
class MarginalSDE:
    """``dx = [v + (eps^2 / 2) grad log p_t] dt + eps dW`` on ``path``: the same marginals as the ODE.

    Give exactly one of ``eta`` and ``noise_level`` (see the module docstring for both and their
    relation); the constructors :meth:`from_eta` and :meth:`flowgrpo` set the defaults of each.

    Args:
        path: the model's affine path.
        eta: ``eps^2 = eta^2 g^2`` (0: the ODE, 1: the reverse-time SDE).
        noise_level: FlowGRPO's ``a``: ``eps = a sqrt((1 - t) / t)``.
        noise_on_last_step: add noise on the step that lands on ``t = 1`` (FlowGRPO does, to give
            every step a log-probability); otherwise the last step returns its mean.
    """

    path: AffinePath
    eta: float | None = None
    noise_level: float | None = None
    noise_on_last_step: bool = True

    def __post_init__(self):
        if (self.eta is None) == (self.noise_level is None):
            raise ValueError("MarginalSDE: give exactly one of eta and noise_level")
        name, value = ("eta", self.eta) if self.eta is not None else ("noise_level", self.noise_level)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    @classmethod
    def from_eta(cls, path: AffinePath, eta: float) -> "MarginalSDE":
        """The WGF family: ``eps^2 = eta^2 g^2``; the last step is deterministic (its mean)."""
        return cls(path, eta=eta, noise_on_last_step=False)

    @classmethod
    def flowgrpo(cls, noise_level: float, path: AffinePath | None = None) -> "MarginalSDE":
        """FlowGRPO's SDE (linear path unless ``path`` is given); every step is stochastic."""
        return cls(path if path is not None else LinearPath(), noise_level=noise_level, noise_on_last_step=True)

    # ------------------------------------------------------------------ coefficients
    def diffusion(self, t: Tensor, t_cap: float | None = None) -> Tensor:
        """``eps(t)`` at flowlab times ``t`` ``(B,)`` (float64). ``t_cap``: FlowGRPO's stand-in for ``t = 0``."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.noise_level is not None:
            if t_cap is None:
                raise ValueError("the noise_level parameterisation needs t_cap (the grid's second time) at t = 0")
            return sde_noise_std(t, self.noise_level, t_cap)
        return self.eta * torch.sqrt(diffusion_coefficient(self.path, t, t))

    def drift(self, x: Tensor, velocity: Tensor, t: Tensor, t_cap: float | None = None) -> Tensor:
        """``v + (eps^2 / 2) grad log p_t(x)`` with the score implied by the velocity on the path."""
        t = _as_times(t, x.shape[0], x.device)
        a, s, da, ds = self.path.coefficients(t, x)
        score = (da * x - a * velocity) / (s * (a * ds - da * s))
        return velocity + 0.5 * expand_like(self.diffusion(t, t_cap) ** 2, x) * score

    def transition(self, t: Tensor, t_next: Tensor, t_cap: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(c_x, c_v, std)``, each ``(B,)`` float64: ``x_next ~ N(c_x x + c_v v, std^2 I)``."""
        h = t_to_sigma(t) - t_to_sigma(t_next)  # = t_next - t, written as FlowGRPO's -d
        p = self.path
        a, s, da, ds = p.alpha(t), p.sigma(t), p.d_alpha(t), p.d_sigma(t)
        neg_det = -(a * ds - da * s)  # -D > 0: 1 on the linear path
        eps = self.diffusion(t, t_cap)
        eps2 = eps**2
        c_x = 1 + eps2 * (-h) * da / (2 * s * neg_det)
        c_v = -((1 + eps2 * a / (2 * s * neg_det)) * (-h))
        return c_x, c_v, eps * torch.sqrt(h)

    def step(
        self, x: Tensor, velocity: Tensor, t: float | Tensor, t_next: float | Tensor, t_cap: float | None = None,
        noise: Tensor | None = None, x_next: Tensor | None = None, add_noise: bool = True,
    ) -> SDEStep:
        """One step from flowlab time ``t`` to ``t_next > t``.

        Args:
            x: state ``(B, ...)`` at ``t``.
            velocity: the flowlab velocity ``v(x, t)`` (``data - noise``), same shape.
            t, t_next: flowlab times (floats or ``(B,)`` tensors).
            t_cap: the grid's second time (``noise_level`` only).
            noise: ``z`` for a new sample (drawn with ``torch.randn_like`` if neither it nor ``x_next`` is given).
            x_next: an already drawn next state, to evaluate its log-probability under this step (training).
            add_noise: ``False`` returns the mean as ``x_next`` (log-probability 0).
        """
        B = x.shape[0]
        t, t_next = _as_times(t, B, x.device), _as_times(t_next, B, x.device)
        c_x, c_v, std = self.transition(t, t_next, t_cap)
        mean = x * expand_like(c_x.to(x.dtype), x) + velocity * expand_like(c_v.to(x.dtype), x)
        std = std.to(x.dtype)
        if not add_noise:
            std = torch.zeros_like(std)
        if x_next is None:
            if not add_noise:
                x_next = mean
            else:
                if noise is None:
                    noise = torch.randn_like(x)
                x_next = mean + expand_like(std, x) * noise
        log_prob = gaussian_log_prob(x_next, mean, std) if float(std.min()) > 0 else torch.zeros(B, device=x.device)
        return SDEStep(x_next=x_next, mean=mean, std=std, log_prob=log_prob)


def flow_sde_step(
    x: Tensor, velocity: Tensor, t: float | Tensor, t_next: float | Tensor, noise_level: float, t_cap: float,
    noise: Tensor | None = None, x_next: Tensor | None = None, path: AffinePath | None = None,
) -> SDEStep:
    """One FlowGRPO step: :meth:`MarginalSDE.step` of ``MarginalSDE.flowgrpo(noise_level, path)``."""
    return MarginalSDE.flowgrpo(noise_level, path).step(x, velocity, t, t_next, t_cap, noise=noise, x_next=x_next)


@torch.no_grad()
def sample_flow_sde(
    field: Callable[[Tensor, Tensor], Tensor], x: Tensor, times: Tensor, noise_level: float,
    noises: Tensor | None = None, generator: torch.Generator | None = None, path: AffinePath | None = None,
) -> SDETrajectory:
    """FlowGRPO sampling along ``times`` (:func:`flowlab.flow.sampling.sample` with ``MarginalSDE.flowgrpo``).

    Args:
        field: flowlab velocity ``field(x, t)`` with ``t`` of shape ``(B,)``.
        x: initial noise ``(B, ...)``.
        times: the grid, from ``t = 0`` (noise) to ``t = 1`` (data), ``K+1`` times.
        noise_level: ``a``.
        noises: the ``K`` step noises ``(K, B, ...)`` (drawn at once from ``generator`` if omitted).
    """
    from .sampling import sample

    if noises is None:
        noises = torch.randn((len(times) - 1, *x.shape), generator=generator, dtype=x.dtype).to(x.device)
    out = sample(field, x, times=times, sde=MarginalSDE.flowgrpo(noise_level, path), noises=noises, return_trajectory=True)
    return SDETrajectory(states=out.states, log_probs=out.log_probs, times=times)
