"""Training-time distributions over flowlab time ``t`` (0 = noise, 1 = data) and loss weights.

Each sampler has ``sample(n, generator, device)`` and the exact ``density(t)`` it samples
from, so the two can be tested against each other.

SD3 (Esser et al., 2024) defines its samplers on ``sigma = 1 - t``. ``LogitNormalTimeSampler``
here is parameterised in flowlab time: SD3's ``logit-normal(m, s)`` on sigma equals
``LogitNormalTimeSampler(mean=-m, std=s)``. The mode sampler is symmetric under ``t <-> 1 - t``
and is the same in both conventions. ``ShiftedTimeSampler`` applies SD3's resolution shift
``sigma' = s sigma / (1 + (s - 1) sigma)``.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from .conventions import shift_t

__all__ = [
    "TimeSampler",
    "UniformTimeSampler",
    "LogitNormalTimeSampler",
    "ModeTimeSampler",
    "ShiftedTimeSampler",
    "build_time_sampler",
    "loss_weight",
    "LOSS_WEIGHTINGS",
]


class TimeSampler(ABC):
    """A distribution over ``t`` in ``(0, 1)``."""

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Draw ``n`` times, shape ``(n,)``, float32."""

    @abstractmethod
    def density(self, t: Tensor) -> Tensor:
        """Probability density at ``t`` (same shape as ``t``)."""


def _uniform(n, generator, device):
    u = torch.rand(n, generator=generator, device=generator.device if generator is not None else "cpu")
    return u.to(device) if device is not None else u


def _normal(n, generator, device):
    z = torch.randn(n, generator=generator, device=generator.device if generator is not None else "cpu")
    return z.to(device) if device is not None else z


class UniformTimeSampler(TimeSampler):
    """``t ~ U(0, 1)``."""

    def sample(self, n, generator=None, device=None):
        return _uniform(n, generator, device)

    def density(self, t):
        return ((t >= 0) & (t <= 1)).to(t.dtype)


class LogitNormalTimeSampler(TimeSampler):
    """``t = sigmoid(m + s z)``, ``z ~ N(0, 1)``; density
    ``p(t) = exp(-(logit t - m)^2 / (2 s^2)) / (s sqrt(2 pi) t (1 - t))``."""

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        if std <= 0:
            raise ValueError(f"LogitNormalTimeSampler std must be > 0, got {std}")
        self.mean, self.std = mean, std

    def sample(self, n, generator=None, device=None):
        return torch.sigmoid(self.mean + self.std * _normal(n, generator, device))

    def density(self, t):
        logit = torch.log(t) - torch.log1p(-t)
        return torch.exp(-0.5 * ((logit - self.mean) / self.std) ** 2) / (
            self.std * math.sqrt(2 * math.pi) * t * (1 - t)
        )


class ModeTimeSampler(TimeSampler):
    """SD3's mode sampling with heavy tails: ``t = g(u) = (1 + s) u - s sin^2(pi u / 2)``, ``u ~ U(0, 1)``.

    ``scale`` must lie in ``[-1, 2 / (pi - 2)]`` for ``g`` to be monotone; ``scale = 0`` is uniform,
    positive scales favour mid times, negative scales favour the ends.
    """

    def __init__(self, scale: float = 1.29):
        if not (-1.0 <= scale <= 2.0 / (math.pi - 2.0)):
            raise ValueError(f"ModeTimeSampler scale must be in [-1, {2 / (math.pi - 2):.4f}], got {scale}")
        self.scale = scale

    def _g(self, u):
        return (1 + self.scale) * u - self.scale * torch.sin(0.5 * math.pi * u) ** 2

    def _dg(self, u):
        return 1 + self.scale - self.scale * 0.5 * math.pi * torch.sin(math.pi * u)

    def sample(self, n, generator=None, device=None):
        return self._g(_uniform(n, generator, device))

    def density(self, t):
        lo, hi = torch.zeros_like(t), torch.ones_like(t)
        for _ in range(60):  # bisection for u = g^{-1}(t); g is monotone
            mid = 0.5 * (lo + hi)
            below = self._g(mid) < t
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return 1.0 / self._dg(0.5 * (lo + hi))


class ShiftedTimeSampler(TimeSampler):
    """Apply SD3's shift to another sampler: ``t' = 1 - s sigma / (1 + (s - 1) sigma)``, ``sigma = 1 - t``.

    Density by change of variables: ``p'(t') = p(t) * s / (s - (s - 1) sigma')^2``.
    """

    def __init__(self, base: TimeSampler, shift: float):
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.base, self.shift = base, shift

    def sample(self, n, generator=None, device=None):
        return shift_t(self.base.sample(n, generator, device), self.shift)

    def density(self, t):
        s = self.shift
        sigma_p = 1 - t
        sigma = sigma_p / (s - (s - 1) * sigma_p)
        return self.base.density(1 - sigma) * s / (s - (s - 1) * sigma_p) ** 2


def build_time_sampler(
    name: str = "uniform", *, mean: float = 0.0, std: float = 1.0, mode_scale: float = 1.29, shift: float = 1.0
) -> TimeSampler:
    """Build a sampler from config values (``flow.time_sampler``, ``flow.logit_mean``, ...)."""
    if name == "uniform":
        sampler: TimeSampler = UniformTimeSampler()
    elif name == "logit_normal":
        sampler = LogitNormalTimeSampler(mean, std)
    elif name == "mode":
        sampler = ModeTimeSampler(mode_scale)
    else:
        raise ValueError(f"unknown time sampler {name!r}; choose uniform, logit_normal or mode")
    return sampler if shift == 1.0 else ShiftedTimeSampler(sampler, shift)


LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def loss_weight(t: Tensor, scheme: str = "none", max_weight: float = 1e4) -> Tensor:
    """Per-sample loss weights of SD3 (defined on ``sigma = 1 - t``).

    ``none``: 1. ``sigma_sqrt``: ``sigma^-2`` (clamped at ``max_weight``). ``cosmap``:
    ``2 / (pi (1 - 2 sigma + 2 sigma^2))``.
    """
    sigma = 1 - t
    if scheme == "none":
        return torch.ones_like(t)
    if scheme == "sigma_sqrt":
        return (sigma**-2.0).clamp(max=max_weight)
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    raise ValueError(f"unknown loss weighting {scheme!r}; choose one of {LOSS_WEIGHTINGS}")
