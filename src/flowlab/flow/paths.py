"""Affine probability paths ``x_t = alpha_t * x1 + sigma_t * x0``.

flowlab's time convention: ``t = 0`` is pure noise (``x_0 ~ N(0, I)``) and ``t = 1`` is
data (``x_1 ~ p_data``). Every path here satisfies ``alpha_0 = 0, sigma_0 = 1`` and
``alpha_1 = 1, sigma_1 = 0``. The conditional velocity is
``dx_t/dt = d_alpha_t * x1 + d_sigma_t * x0``.

For the diffusers/SD3/FLUX convention (``sigma = 1 - t``, noise at ``sigma = 1``, target
``eps - x0``) see :mod:`flowlab.flow.conventions`.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PathSample", "AffinePath", "LinearPath", "CosinePath", "VPPath", "PATHS", "get_path"]


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample time ``t`` of shape ``(B,)`` to broadcast against ``x`` ``(B, ...)``."""
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1))).to(x.dtype)


@dataclass
class PathSample:
    """A point on a probability path.

    Attributes:
        x_0: noise, shape ``(B, ...)``.
        x_1: data, shape ``(B, ...)``.
        t: times, shape ``(B,)``.
        x_t: ``alpha_t * x_1 + sigma_t * x_0``, shape ``(B, ...)``.
        dx_t: conditional velocity ``d_alpha_t * x_1 + d_sigma_t * x_0``, shape ``(B, ...)``.
    """

    x_0: Tensor
    x_1: Tensor
    t: Tensor
    x_t: Tensor
    dx_t: Tensor


class AffinePath(ABC):
    """Gaussian affine path ``x_t = alpha_t x1 + sigma_t x0`` with ``x0 ~ N(0, I)``."""

    name: str = "affine"

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Data coefficient ``alpha_t``."""

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """Noise coefficient ``sigma_t``."""

    @abstractmethod
    def d_alpha(self, t: Tensor) -> Tensor:
        """Time derivative ``d alpha_t / dt``."""

    @abstractmethod
    def d_sigma(self, t: Tensor) -> Tensor:
        """Time derivative ``d sigma_t / dt``."""

    def coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(alpha_t, sigma_t, d_alpha_t, d_sigma_t)``, each reshaped to broadcast with ``like``."""
        t = expand_like(t, like)
        return self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t)

    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> PathSample:
        """Sample ``x_t`` and the conditional velocity for noise ``x_0``, data ``x_1`` and times ``t`` ``(B,)``."""
        a, s, da, ds = self.coefficients(t, x_1)
        return PathSample(x_0=x_0, x_1=x_1, t=t, x_t=a * x_1 + s * x_0, dx_t=da * x_1 + ds * x_0)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"{type(self).__name__}()"


class LinearPath(AffinePath):
    """Rectified flow / CondOT: ``alpha_t = t``, ``sigma_t = 1 - t``; velocity ``x1 - x0``."""

    name = "linear"

    def alpha(self, t):
        return t

    def sigma(self, t):
        return 1 - t

    def d_alpha(self, t):
        return torch.ones_like(t)

    def d_sigma(self, t):
        return -torch.ones_like(t)


class CosinePath(AffinePath):
    """Trigonometric path: ``alpha_t = sin(pi t / 2)``, ``sigma_t = cos(pi t / 2)`` (variance preserving)."""

    name = "cosine"

    def alpha(self, t):
        return torch.sin(0.5 * math.pi * t)

    def sigma(self, t):
        # sin(pi (1 - t) / 2), not cos(pi t / 2): exactly 0 at t = 1 (cos(pi / 2) is 6e-17 in
        # float64 and -4e-8 in float32, which gives a finite, huge log-SNR at the data end)
        return torch.sin(0.5 * math.pi * (1 - t))

    def d_alpha(self, t):
        return 0.5 * math.pi * torch.sin(0.5 * math.pi * (1 - t))

    def d_sigma(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


class VPPath(AffinePath):
    """Variance-preserving path of DDPM/score SDEs with a linear beta schedule.

    With ``s = 1 - t`` (diffusion time) and ``B(s) = beta_min s + (beta_max - beta_min) s^2 / 2``,
    ``alpha_t = exp(-B(s) / 2)`` and ``sigma_t = sqrt(1 - alpha_t^2)``. ``alpha_0`` is
    ``exp(-(beta_min + beta_max) / 4)`` (about 6.7e-3 for the defaults), not exactly 0:
    the usual VP truncation.
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min = beta_min
        self.beta_max = beta_max

    def _B(self, s):
        return self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s**2

    def _beta(self, s):
        return self.beta_min + (self.beta_max - self.beta_min) * s

    def alpha(self, t):
        return torch.exp(-0.5 * self._B(1 - t))

    def sigma(self, t):
        return torch.sqrt((-torch.expm1(-self._B(1 - t))).clamp_min(0))

    def d_alpha(self, t):
        # d/dt exp(-B(1-t)/2) = exp(-B/2) * beta(1-t) / 2
        return 0.5 * self._beta(1 - t) * self.alpha(t)

    def d_sigma(self, t):
        a = self.alpha(t)
        s = self.sigma(t)
        # sigma^2 = 1 - alpha^2  =>  d sigma = -alpha d_alpha / sigma
        return -a * self.d_alpha(t) / s.clamp_min(1e-12)

    def __repr__(self) -> str:  # pragma: no cover
        return f"VPPath(beta_min={self.beta_min}, beta_max={self.beta_max})"


PATHS = {"linear": LinearPath, "cosine": CosinePath, "vp": VPPath}


def get_path(name: str, **kwargs) -> AffinePath:
    """Build a path by name (``linear``, ``cosine``, ``vp``)."""
    if name not in PATHS:
        raise ValueError(f"unknown path {name!r}; choose one of {sorted(PATHS)}")
    return PATHS[name](**kwargs)
