"""Per-sample losses of DiffusionNFT and FlowGRPO (pure functions of tensors; the recipes feed them).

Shapes: velocities and states ``(N, ...)``, per-sample quantities ``(N,)``. flowlab convention:
``t = 0`` noise, ``t = 1`` data, velocity ``u = data - noise``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..flow.parameterization import to_x1
from ..flow.paths import AffinePath

__all__ = ["implicit_policies", "nft_loss", "grpo_loss"]


def _mean_sq(a: Tensor) -> Tensor:
    return (a**2).flatten(1).mean(1)


def implicit_policies(u_theta: Tensor, u_old: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """DiffusionNFT's implicit positive and negative velocities:
    ``u+ = (1 - beta) u_old + beta u_theta`` and ``u- = (1 + beta) u_old - beta u_theta``."""
    return (1 - beta) * u_old + beta * u_theta, (1 + beta) * u_old - beta * u_theta


def nft_loss(
    u_theta: Tensor, u_old: Tensor, target: Tensor, r: Tensor, beta: float, kind: str = "velocity",
    path: AffinePath | None = None, x_t: Tensor | None = None, t: Tensor | None = None, x_data: Tensor | None = None,
    scale: float = 5.0,
) -> Tensor:
    """DiffusionNFT loss per sample ``(N,)``.

    Args:
        u_theta: the current policy's velocity (with gradients). u_old: the old policy's (no gradients).
        target: the forward-process velocity at ``x_t`` (``x_data - noise`` on the linear path).
        r: optimality probabilities in ``[0, 1]``.
        beta: guidance strength of the implicit policies.
        kind: ``velocity`` (the paper: ``r ||u+ - u||^2 + (1 - r) ||u- - u||^2``, means over dimensions) or
            ``x0_normalized`` (the public code: data predictions ``x+-`` of ``u+-`` on ``path`` at ``(x_t, t)``,
            each squared error divided by its own detached mean absolute error ``w+-`` (>= 1e-5), times
            ``scale / beta``).
    """
    u_pos, u_neg = implicit_policies(u_theta, u_old, beta)
    rr = r.to(u_theta.dtype)
    if kind == "velocity":
        return rr * _mean_sq(u_pos - target) + (1 - rr) * _mean_sq(u_neg - target)
    if kind != "x0_normalized":
        raise ValueError(f"unknown NFT loss {kind!r}; choose velocity or x0_normalized")
    if path is None or x_t is None or t is None or x_data is None:
        raise ValueError("the x0_normalized loss needs path, x_t, t and x_data")
    x_pos = to_x1(path, u_pos, x_t, t.to(x_t.dtype), "velocity")
    x_neg = to_x1(path, u_neg, x_t, t.to(x_t.dtype), "velocity")
    with torch.no_grad():
        w_pos = (x_pos.double() - x_data.double()).abs().flatten(1).mean(1).clamp_min(1e-5).to(x_t.dtype)
        w_neg = (x_neg.double() - x_data.double()).abs().flatten(1).mean(1).clamp_min(1e-5).to(x_t.dtype)
    pos = _mean_sq(x_pos - x_data) / w_pos
    neg = _mean_sq(x_neg - x_data) / w_neg
    return scale * (rr * pos + (1 - rr) * neg) / beta


def grpo_loss(log_prob: Tensor, log_prob_old: Tensor, advantages: Tensor, clip_range: float) -> tuple[Tensor, Tensor]:
    """FlowGRPO's clipped surrogate per sample ``(N,)``: ``max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))``
    with ``ratio = exp(log_prob - log_prob_old)``. Returns ``(loss, ratio)``."""
    ratio = torch.exp(log_prob - log_prob_old.to(log_prob.dtype))
    a = advantages.to(ratio.dtype)
    return torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_range, 1 + clip_range)), ratio
