"""Classifier-free guidance on a velocity model.

A class-conditional model reserves label ``num_classes`` as the learned *null* class
(trained by label dropout). The guided field is
``v_null + w (v_cond - v_null)``; ``w = 1`` is the conditional field, ``w = 0`` the
unconditional one. Both branches run in one batched call.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .solvers import Field

__all__ = ["ModelFn", "guided_field", "combine_guidance"]

ModelFn = Callable[..., Tensor]  # (x, t, labels, *times) -> v


def combine_guidance(v_cond: Tensor, v_uncond: Tensor, guidance_scale: float, detach_unconditional: bool = False) -> Tensor:
    """The guided velocity ``v_uncond + w (v_cond - v_uncond)`` (shapes of ``v_cond``).

    ``detach_unconditional`` stops gradients through ``v_uncond`` (FlowGRPO's training forward:
    ``noise_pred_uncond.detach()``, flow_grpo ``scripts/train_sd3.py`` ``compute_log_prob``), so
    only the conditional branch is trained; the value is unchanged.
    """
    if detach_unconditional:
        v_uncond = v_uncond.detach()
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def guided_field(
    model_fn: ModelFn, class_labels: Tensor | None = None, guidance_scale: float = 1.0, null_label: int | None = None,
    detach_unconditional: bool = False,
) -> Field:
    """Turn ``model_fn(x, t, labels) -> v`` into a field ``(x, t) -> v`` with CFG.

    Extra time arguments pass through: ``field(x, t, r)`` calls ``model_fn(x, t, labels, r)`` (MeanFlow's
    average velocity ``u(x, t, r)``, guided the same way: ``u_null + w (u_cond - u_null)``).

    Args:
        model_fn: velocity model taking labels (or ``None`` for unconditional models).
        class_labels: ``(B,)`` integer labels, or ``None``.
        guidance_scale: CFG weight ``w``; 1 disables the unconditional branch.
        null_label: index of the null class (required when ``guidance_scale != 1``).
        detach_unconditional: no gradient through the null branch (see :func:`combine_guidance`).
    """
    if class_labels is None or guidance_scale == 1.0:
        return lambda x, t, *times: model_fn(x, t, class_labels, *times)
    if null_label is None:
        raise ValueError("guidance_scale != 1 needs a class-conditional model with a null class")
    null = torch.full_like(class_labels, null_label)
    labels2 = torch.cat([class_labels, null])

    def field(x: Tensor, t: Tensor, *times: Tensor) -> Tensor:
        v_cond, v_null = model_fn(torch.cat([x, x]), torch.cat([t, t]), labels2, *(torch.cat([s, s]) for s in times)).chunk(2)
        return combine_guidance(v_cond, v_null, guidance_scale, detach_unconditional)

    return field
