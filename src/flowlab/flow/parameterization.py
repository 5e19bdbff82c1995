"""Converters between velocity, x1 (data), epsilon (noise) and score predictions.

On an affine Gaussian path ``x_t = a x1 + s eps`` (``eps = x0 ~ N(0, I)``) with
``v = da x1 + ds eps``, the four quantities are affine in each other given ``x_t``:

    x1    = (ds x_t - s v) / D,        D = a ds - s da
    eps   = (a v - da x_t) / D
    v     = da x1 + ds eps
    score = -E[eps | x_t] / s          (the score of p_t, for a Gaussian source)

so a model trained in one parameterisation can be read in any other. Points where the
map is singular (``s = 0`` for eps/score, ``a = 0`` for x1 from eps) are clamped.
"""
from __future__ import annotations

from typing import Literal

from torch import Tensor

from .paths import AffinePath

__all__ = ["PREDICTION_TYPES", "convert", "to_velocity", "to_x1", "to_epsilon", "to_score"]

PredictionType = Literal["velocity", "x1", "epsilon", "score"]
PREDICTION_TYPES = ("velocity", "x1", "epsilon", "score")
_EPS = 1e-6


def _x1_eps(path: AffinePath, pred: Tensor, x_t: Tensor, t: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """Return ``(x1_hat, eps_hat)`` for a prediction of ``kind``."""
    a, s, da, ds = path.coefficients(t, x_t)
    if kind == "velocity":
        det = a * ds - s * da
        return (ds * x_t - s * pred) / det, (a * pred - da * x_t) / det
    if kind == "x1":
        return pred, (x_t - a * pred) / s.clamp_min(_EPS)
    if kind == "epsilon":
        return (x_t - s * pred) / a.clamp_min(_EPS), pred
    if kind == "score":
        eps = -s * pred
        return (x_t - s * eps) / a.clamp_min(_EPS), eps
    raise ValueError(f"unknown prediction type {kind!r}; choose one of {PREDICTION_TYPES}")


def convert(path: AffinePath, pred: Tensor, x_t: Tensor, t: Tensor, src: str, dst: str) -> Tensor:
    """Convert a model output ``pred`` from parameterisation ``src`` to ``dst``.

    Args:
        path: the affine path the model was trained on.
        pred: model output, shape ``(B, ...)``.
        x_t: the input point, shape ``(B, ...)``.
        t: flowlab times (0 = noise, 1 = data), shape ``(B,)``.
        src, dst: one of ``velocity``, ``x1``, ``epsilon``, ``score``.
    """
    if src == dst:
        if src not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {src!r}; choose one of {PREDICTION_TYPES}")
        return pred
    x1, eps = _x1_eps(path, pred, x_t, t, src)
    a, s, da, ds = path.coefficients(t, x_t)
    if dst == "velocity":
        return da * x1 + ds * eps
    if dst == "x1":
        return x1
    if dst == "epsilon":
        return eps
    if dst == "score":
        return -eps / s.clamp_min(_EPS)
    raise ValueError(f"unknown prediction type {dst!r}; choose one of {PREDICTION_TYPES}")


def to_velocity(path, pred, x_t, t, src):
    """Shorthand for ``convert(path, pred, x_t, t, src, "velocity")``."""
    return convert(path, pred, x_t, t, src, "velocity")


def to_x1(path, pred, x_t, t, src):
    """Shorthand for ``convert(path, pred, x_t, t, src, "x1")``."""
    return convert(path, pred, x_t, t, src, "x1")


def to_epsilon(path, pred, x_t, t, src):
    """Shorthand for ``convert(path, pred, x_t, t, src, "epsilon")``."""
    return convert(path, pred, x_t, t, src, "epsilon")


def to_score(path, pred, x_t, t, src):
    """Shorthand for ``convert(path, pred, x_t, t, src, "score")``."""
    return convert(path, pred, x_t, t, src, "score")
