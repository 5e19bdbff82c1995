"""The conditional flow-matching loss, composed from a path, a time sampler, a coupling,
a parameterisation and a loss weighting.

    L = E_{t, (x0, x1) ~ coupling} [ w(t) * mean_d || f_theta(x_t, t) - target ||^2 ]

with ``target`` = ``dx_t`` (velocity), ``x1`` (data) or ``x0`` (epsilon) by
``prediction_type``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .couplings import Coupling, IndependentCoupling
from .paths import AffinePath, LinearPath, PathSample
from .time_samplers import TimeSampler, UniformTimeSampler, loss_weight

__all__ = ["FlowMatchingLoss", "LossOutput"]


@dataclass
class LossOutput:
    loss: Tensor
    per_sample: Tensor
    sample: PathSample


class FlowMatchingLoss:
    """Conditional flow matching (Lipman et al. 2023; Liu et al. 2023; Tong et al. 2023).

    Args:
        path: the probability path (linear by default).
        time_sampler: distribution of training times (uniform by default).
        coupling: noise/data pairing (independent by default; ``MinibatchOTCoupling`` for OT-CFM).
        prediction_type: what the model outputs: ``velocity``, ``x1`` or ``epsilon``.
        weighting: ``none``, ``sigma_sqrt`` or ``cosmap`` (see :func:`loss_weight`).
    """

    def __init__(
        self,
        path: AffinePath | None = None,
        time_sampler: TimeSampler | None = None,
        coupling: Coupling | None = None,
        prediction_type: str = "velocity",
        weighting: str = "none",
    ):
        if prediction_type not in ("velocity", "x1", "epsilon"):
            raise ValueError(f"prediction_type must be velocity, x1 or epsilon, got {prediction_type!r}")
        self.path = path or LinearPath()
        self.time_sampler = time_sampler or UniformTimeSampler()
        self.coupling = coupling or IndependentCoupling()
        self.prediction_type = prediction_type
        self.weighting = weighting
        loss_weight(torch.zeros(1), weighting)  # validate the name early

    def target(self, s: PathSample) -> Tensor:
        return {"velocity": s.dx_t, "x1": s.x_1, "epsilon": s.x_0}[self.prediction_type]

    def __call__(
        self,
        model_fn: Callable[[Tensor, Tensor], Tensor],
        x_1: Tensor,
        x_0: Tensor | None = None,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
        groups: Tensor | None = None,
    ) -> LossOutput:
        """Loss for data ``x_1`` ``(B, ...)``; noise ``x_0`` and times ``t`` are drawn if not given.

        ``model_fn(x_t, t)`` returns the model's prediction (conditioning already bound). ``groups``
        ``(B,)``: the conditioning of each row (class labels after dropout); the coupling pairs within it.
        """
        if x_0 is None:
            x_0 = torch.randn(x_1.shape, generator=generator, device="cpu" if generator is None else generator.device).to(x_1)
        if t is None:
            t = self.time_sampler.sample(x_1.shape[0], generator).to(x_1.device)
        x_0, x_1 = self.coupling(x_0, x_1) if groups is None else self.coupling(x_0, x_1, groups)
        s = self.path.sample(x_0, x_1, t.to(x_1.dtype))
        pred = model_fn(s.x_t, s.t)
        per_sample = (pred.float() - self.target(s).float()).pow(2).flatten(1).mean(1)
        per_sample = per_sample * loss_weight(s.t.float(), self.weighting)
        return LossOutput(loss=per_sample.mean(), per_sample=per_sample, sample=s)
