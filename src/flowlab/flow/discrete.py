"""Discrete diffusers schedules in flowlab time: the affine path of a DDPM/DDIM beta schedule
(``alphas_cumprod``) and the conversion of diffusers' ``v_prediction`` to epsilon.

diffusers' discrete schedules define ``abar_k = prod_{i<=k} (1 - beta_i)`` at integer
timesteps ``k = 0 .. N-1`` (noise grows with ``k``); the clean data sit at "timestep -1"
with ``abar = 1`` (DDIM's ``set_alpha_to_one``). flowlab time runs the other way
(``t = 0`` noise, ``t = 1`` data). The map used here is

    u(t) = (1 - t) * N - 1          (a continuous diffusers timestep, u(1) = -1, u(0) = N-1)

and ``log abar`` is interpolated **linearly in u** between the knots
``[(-1, 0), (0, log abar_0), ..., (N-1, log abar_{N-1})]``. This is the exact continuous
VP process whose ``beta(u) = -d log abar / du`` is piecewise constant and equal to
``-log(1 - beta_k)`` on ``[k-1, k]``: it reproduces ``abar`` at every integer timestep, so one
DDIM step between two timesteps is one exact step of this path. Then

    alpha_t = sqrt(abar(u(t))),   sigma_t = sqrt(1 - abar(u(t))),
    d alpha_t / dt = alpha_t * (d log abar / dt) / 2,   d sigma_t / dt = -alpha_t * d alpha_t / sigma_t.

(Interpolating log-SNR instead is not possible at ``u = -1``, where it is infinite; linear
interpolation of ``abar`` itself gives a path whose log-SNR bends between knots.)
``alpha_0 = sqrt(abar_{N-1})`` is small but not 0: the usual VP truncation.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .paths import AffinePath

__all__ = ["DiscreteSchedulePath", "DIFFUSERS_PREDICTION_TYPES", "diffusers_v_to_epsilon", "t_to_diffusers_timestep",
           "diffusers_timestep_to_t"]

#: diffusers ``prediction_type`` -> what the model predicts, in flowlab's names
DIFFUSERS_PREDICTION_TYPES = {"epsilon": "epsilon", "sample": "x1", "v_prediction": "v_prediction", "score": "score"}


def t_to_diffusers_timestep(t, num_train_timesteps: int):
    """flowlab ``t`` -> continuous diffusers DDPM timestep ``u = (1 - t) N - 1`` (data at -1)."""
    return (1 - t) * num_train_timesteps - 1


def diffusers_timestep_to_t(timestep, num_train_timesteps: int):
    """Continuous diffusers DDPM timestep ``u`` -> flowlab ``t = 1 - (u + 1) / N``."""
    return 1 - (timestep + 1) / num_train_timesteps


class DiscreteSchedulePath(AffinePath):
    """Variance-preserving path from a diffusers ``alphas_cumprod`` table (see module docstring).

    Args:
        alphas_cumprod: ``(N,)`` tensor ``abar_k`` for timesteps ``k = 0 .. N-1`` (decreasing).
    """

    name = "diffusers"

    def __init__(self, alphas_cumprod: Tensor):
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).reshape(-1)
        if abar.numel() < 2 or not bool(((abar > 0) & (abar <= 1)).all()):
            raise ValueError("alphas_cumprod must hold at least 2 values in (0, 1]")
        self.num_train_timesteps = int(abar.numel())
        # knots at u = -1, 0, ..., N-1
        self.log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), abar.log()])

    @classmethod
    def from_scheduler(cls, scheduler) -> "DiscreteSchedulePath":
        """From a diffusers ``DDPMScheduler``/``DDIMScheduler`` (anything with ``alphas_cumprod``)."""
        return cls(scheduler.alphas_cumprod)

    def timestep(self, t: Tensor) -> Tensor:
        """Continuous diffusers timestep ``u(t)`` in ``[-1, N-1]``."""
        return t_to_diffusers_timestep(t, self.num_train_timesteps)

    def _log_abar(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(log abar(u(t)), d log abar / dt)``, in ``t``'s dtype."""
        table = self.log_abar.to(t.device)
        u = self.timestep(t.to(torch.float64)).clamp(-1, self.num_train_timesteps - 1)
        pos = u + 1  # index into the knot table
        i0 = pos.floor().clamp(0, self.num_train_timesteps - 1).long()
        frac = pos - i0
        slope = table[i0 + 1] - table[i0]  # per unit of u
        val = table[i0] + frac * slope
        return val.to(t.dtype), (-self.num_train_timesteps * slope).to(t.dtype)  # du/dt = -N

    def alpha(self, t):
        return torch.exp(0.5 * self._log_abar(t)[0])

    def sigma(self, t):
        return torch.sqrt((-torch.expm1(self._log_abar(t)[0])).clamp_min(0))

    def d_alpha(self, t):
        la, dla = self._log_abar(t)
        return 0.5 * torch.exp(0.5 * la) * dla

    def d_sigma(self, t):
        a, s = self.alpha(t), self.sigma(t)
        return -a * self.d_alpha(t) / s.clamp_min(1e-12)

    def __repr__(self) -> str:  # pragma: no cover
        return f"DiscreteSchedulePath(num_train_timesteps={self.num_train_timesteps}, abar_end={math.exp(float(self.log_abar[-1])):.3g})"


def diffusers_v_to_epsilon(path: AffinePath, v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """diffusers' ``v_prediction`` target ``v = alpha eps - sigma x1`` -> ``eps``.

    With ``x_t = alpha x1 + sigma eps``: ``eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2)``
    (``alpha^2 + sigma^2 = 1`` on variance-preserving paths).

    Args:
        path: the affine path the model was trained on (e.g. :class:`DiscreteSchedulePath`).
        v: the model's ``v_prediction`` ``(B, ...)``.
        x_t: the input point ``(B, ...)``.
        t: flowlab times ``(B,)``.
    """
    a, s, _, _ = path.coefficients(t, x_t)
    return (s * x_t + a * v) / (a * a + s * s)
