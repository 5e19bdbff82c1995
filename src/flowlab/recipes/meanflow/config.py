"""Config sections of ``recipe: meanflow``: flow matching's, with ``solver: meanflow`` allowed (and the
default) for sampling and evaluation, plus ``meanflow:`` (the loss). Light: no torch."""
from __future__ import annotations

from dataclasses import dataclass, field

from ...names import SOLVER_NAMES
from ...schema import choices
from ..flow_matching.config import SECTIONS as FLOW_MATCHING_SECTIONS
from ..flow_matching.config import FlowEvalConfig, FlowSampleConfig

__all__ = ["MeanFlowConfig", "MeanFlowSampleConfig", "MeanFlowEvalConfig", "SECTIONS"]


@dataclass
class MeanFlowConfig:
    """``meanflow:``: MeanFlow's loss (Geng et al., 2025; see :class:`~flowlab.flow.MeanFlowLoss`)."""

    distinct_fraction: float = field(default=0.25, metadata={"min": 0.0, "max": 1.0})  # share of pairs with r != t
    adaptive_p: float = field(default=1.0, metadata={"min": 0.0})  # adaptive weight 1 / (err^2 + c)^p; 0: plain MSE
    adaptive_c: float = field(default=1e-3, metadata={"min": 1e-12})
    # time pairs: "sorted" = two draws of flow.time_sampler, sorted; "separate" = t from flow.time_sampler and r
    # from r_time_sampler, then r = max(t, r) (the authors' code's tr_sampler v1; see flowlab.flow.sample_time_pairs)
    time_pairs: str = field(default="sorted", metadata=choices("sorted", "separate"))
    r_time_sampler: str = field(default="logit_normal", metadata=choices("uniform", "logit_normal"))  # with "separate"
    r_logit_mean: float = 4.0  # flowlab time; the authors' CIFAR-10 logit-normal(-4.0, 1.6) on their time
    r_logit_std: float = field(default=1.6, metadata={"min": 1e-6})
    # classifier-free guidance built into training (class-conditional models; MeanFlow Sec. 4.2, flowlab.flow.MeanFlowGuidance):
    # v_g = omega v + kappa u(x, t, t | y) + (1 - omega - kappa) u(x, t, t | null); learnt scale omega / (1 - kappa);
    # omega = 1, kappa = 0: none
    guidance_omega: float = field(default=1.0, metadata={"min": 1e-6})
    guidance_kappa: float = field(default=0.0, metadata={"min": 0.0, "max": 0.999})


@dataclass
class MeanFlowSampleConfig(FlowSampleConfig):
    """``sample``: as flow matching's, with the one-jump-per-step ``meanflow`` solver (the default) allowed."""

    solver: str = field(default="meanflow", metadata=choices(*SOLVER_NAMES))
    num_inference_steps: int = field(default=2, metadata={"min": 1})


@dataclass
class MeanFlowEvalConfig(FlowEvalConfig):
    """``eval``: as flow matching's, with the ``meanflow`` solver (the default) allowed."""

    solver: str = field(default="meanflow", metadata=choices(*SOLVER_NAMES))
    num_inference_steps: int = field(default=2, metadata={"min": 1})


#: The sections of ``recipe: meanflow``.
SECTIONS = {**FLOW_MATCHING_SECTIONS, "sample": MeanFlowSampleConfig, "eval": MeanFlowEvalConfig, "meanflow": MeanFlowConfig}
