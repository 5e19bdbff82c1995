"""Exponential moving average of trained parameters, updated in place.

diffusers' :class:`~diffusers.training_utils.EMAModel` (``foreach=True``) computes
``s -= (1 - d) * (s - p)`` through a temporary copy of every parameter (``_foreach_sub``), about
a tenth of a small model's CPU step. :class:`InPlaceEMA` does the same update as one fused
in-place ``torch._foreach_lerp_(s, p, 1 - d)``, i.e. ``s + (1 - d)(p - s)``, which is equal up to
float round-off. Everything else, the decay schedule (:meth:`EMAModel.get_decay`: ``(1 + n) / (10 + n)``
or, with ``use_ema_warmup``, ``1 - (1 + n / inv_gamma)^-power``, capped at ``decay``, floored at
``min_decay``, ``n = max(0, step - update_after_step - 1)``), ``copy_to``, ``to`` and the
``state_dict`` format, is diffusers', so checkpoints written with either class load into the other.
"""
from __future__ import annotations

from typing import Iterable

import torch
from diffusers.training_utils import EMAModel

__all__ = ["InPlaceEMA"]


class InPlaceEMA(EMAModel):
    """:class:`EMAModel` whose :meth:`step` updates the shadow parameters in place (see the module docstring).

    Args: as :class:`EMAModel` (``foreach`` is implied).
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], **kwargs):
        kwargs.pop("foreach", None)
        super().__init__(parameters, foreach=True, **kwargs)

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """One EMA update: ``s <- s + (1 - d_k)(p - s)`` for parameters that require grad, ``s <- p``
        for the others, with ``d_k = get_decay(k)`` at optimisation step ``k`` (1-based).

        Args:
            parameters: the followed parameters, in the order the EMA was built with.
        """
        parameters = list(parameters)
        if len(parameters) != len(self.shadow_params):
            raise ValueError(f"EMA step: got {len(parameters)} parameters, the EMA follows {len(self.shadow_params)}")
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        trained = [(s, p) for s, p in zip(self.shadow_params, parameters) if p.requires_grad]
        frozen = [(s, p) for s, p in zip(self.shadow_params, parameters) if not p.requires_grad]
        if frozen:
            torch._foreach_copy_([s for s, _ in frozen], [p for _, p in frozen])
        if trained:
            torch._foreach_lerp_([s for s, _ in trained], [p for _, p in trained], 1.0 - decay)
