"""Config sections of ``recipe: reflow``: flow matching's (``data`` and ``eval`` say how the student is
scored, ``model`` how it is initialised, ``flow`` its time sampler and loss), with Euler at 2 steps as the
default sampler, plus ``reflow:`` (the teacher and its pairs). Light: no torch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ...names import ODE_SOLVER_NAMES
from ...schema import choices
from ..flow_matching.config import SECTIONS as FLOW_MATCHING_SECTIONS
from ..flow_matching.config import FlowEvalConfig, FlowSampleConfig

__all__ = ["ReflowConfig", "ReflowSampleConfig", "ReflowEvalConfig", "SECTIONS"]


@dataclass
class ReflowConfig:
    """``reflow:``: the teacher and the pairs drawn from it (Liu et al., 2022, "reflow").

    ``num_pairs`` noises ``x0 ~ N(0, I)`` and labels ``y ~ U{0..K-1}`` (a class-conditional teacher) are drawn
    from the run's seed, and each is carried to ``x1`` by the teacher's ODE (``teacher_solver`` at
    ``teacher_steps`` steps, classifier-free guidance ``teacher_guidance_scale``).
    """

    teacher: Optional[str] = None  # a FlowPipeline folder (e.g. runs/quickstart/pipeline) or Hub id; required
    num_pairs: int = field(default=10000, metadata={"min": 1})
    teacher_solver: str = field(default="heun", metadata=choices(*ODE_SOLVER_NAMES))
    teacher_steps: int = field(default=16, metadata={"min": 1})
    teacher_guidance_scale: float = 1.0  # 1: plain conditional sampling
    init_from_teacher: bool = True  # the student starts from the teacher's weights (unless model.pretrained names others)
    generation_batch_size: int = field(default=1000, metadata={"min": 1})  # pairs per teacher call


@dataclass
class ReflowSampleConfig(FlowSampleConfig):
    """``sample``: as flow matching's; Euler at 2 steps by default (the few-step sampler a reflowed model is for)."""

    solver: str = field(default="euler", metadata=choices(*ODE_SOLVER_NAMES))
    num_inference_steps: int = field(default=2, metadata={"min": 1})


@dataclass
class ReflowEvalConfig(FlowEvalConfig):
    """``eval``: as flow matching's; Euler at 2 steps by default."""

    solver: str = field(default="euler", metadata=choices(*ODE_SOLVER_NAMES))
    num_inference_steps: int = field(default=2, metadata={"min": 1})


#: The sections of ``recipe: reflow``.
SECTIONS = {**FLOW_MATCHING_SECTIONS, "sample": ReflowSampleConfig, "eval": ReflowEvalConfig, "reflow": ReflowConfig}
