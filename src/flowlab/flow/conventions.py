"""The one place where flowlab's time convention meets diffusers'.

flowlab: ``t = 0`` noise, ``t = 1`` data, ``x_t = t x1 + (1 - t) x0``, velocity target ``x1 - x0``.

diffusers (FlowMatchEulerDiscreteScheduler, SD3, FLUX): ``sigma = 1 - t``, noise at
``sigma = 1``, ``x_sigma = (1 - sigma) x + sigma eps``, model target ``eps - x`` (the
opposite sign of flowlab's velocity), timesteps ``sigma * num_train_timesteps``.

Every adapter to a diffusers model or scheduler goes through these functions.
"""
from __future__ import annotations

from torch import Tensor

__all__ = [
    "t_to_sigma",
    "sigma_to_t",
    "velocity_to_diffusers",
    "diffusers_to_velocity",
    "t_to_timestep",
    "timestep_to_t",
    "shift_sigma",
    "shift_t",
    "PREDICTION_T_EPS",
]

#: x1 / epsilon / score predictions carry no velocity where ``sigma_t = 0`` (``t = 1``) or
#: ``alpha_t = 0`` (``t = 0``): the conversion divides by ``sigma_t`` / ``alpha_t`` (clamped at
#: 1e-6), so a model error ``delta`` there becomes a velocity error of ``delta * 1e6``. Such
#: models are read at ``t`` clamped to ``[PREDICTION_T_EPS, 1 - PREDICTION_T_EPS]`` (a bias of
#: order 1e-3), and RL trains at ``t <= 1 - PREDICTION_T_EPS``. Velocity models are read as is.
PREDICTION_T_EPS = 1e-3


def t_to_sigma(t):
    """flowlab time ``t`` -> diffusers ``sigma = 1 - t``."""
    return 1 - t


def sigma_to_t(sigma):
    """diffusers ``sigma`` -> flowlab time ``t = 1 - sigma``."""
    return 1 - sigma


def velocity_to_diffusers(v: Tensor) -> Tensor:
    """flowlab velocity ``x1 - x0`` -> diffusers flow target ``eps - x0`` (a sign flip)."""
    return -v


def diffusers_to_velocity(u: Tensor) -> Tensor:
    """diffusers flow-model output ``eps - x0`` -> flowlab velocity ``x1 - x0``."""
    return -u


def t_to_timestep(t, num_train_timesteps: int = 1000):
    """flowlab ``t`` -> the ``timestep`` value diffusers flow models take (``sigma * N``)."""
    return t_to_sigma(t) * num_train_timesteps


def timestep_to_t(timestep, num_train_timesteps: int = 1000):
    """diffusers flow ``timestep`` (``sigma * N``) -> flowlab ``t``."""
    return sigma_to_t(timestep / num_train_timesteps)


def shift_sigma(sigma, shift: float):
    """SD3 resolution shift on sigma: ``sigma' = s sigma / (1 + (s - 1) sigma)``."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def shift_t(t, shift: float):
    """SD3 shift expressed in flowlab time: ``t' = 1 - shift_sigma(1 - t)``.

    ``shift > 1`` moves time towards noise (more steps/samples at high noise).
    """
    return sigma_to_t(shift_sigma(t_to_sigma(t), shift))
