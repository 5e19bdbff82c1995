"""Config section ``chain`` of the reversal recipes: forward-chaining data (:mod:`flowlab.data.forward_chaining`).

Light, like :mod:`.reversal_config`, so a config is validated before the training stack is imported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["ChainConfig"]


@dataclass
class ChainConfig:
    """``chain:``: the forward-chaining data (:class:`~flowlab.data.forward_chaining.ForwardChainingSpec`)."""

    enabled: bool = False  # train the reversal recipes on forward-chaining facts instead of reversal facts
    data_dir: Optional[str] = None  # read the files written by write_forward_chaining_data instead of generating
    modulus: int = field(default=97, metadata={"min": 2})  # prime ring size P (the paper: 10007)
    num_addends: int = field(default=2, metadata={"min": 1})  # relations <+k>
    addend_max: int = field(default=20, metadata={"min": 1})  # addends drawn from 1 .. addend_max
    core_multiplicity: int = field(default=3, metadata={"min": 1})  # core entities per value (the paper: 10)
    core_fraction: float = field(default=0.3, metadata={"min": 0.0, "max": 1.0})  # rule facts trained (the paper: 0.3)
    branching_factors: list[int] = field(default_factory=lambda: [2, 4, 6, 8])
    problems_per_factor: int = field(default=20, metadata={"min": 1})  # roots per branching factor (the paper: 20)
    depth: int = field(default=3, metadata={"min": 2})  # hops from the core to a root (the paper: 3)
    drop_prob: float = field(default=0.6, metadata={"min": 0.0, "max": 1.0})  # dead-end children (the paper: 0.6)
    leaf_links: int = field(default=6, metadata={"min": 1})  # facts from each last-level node to the core
    data_seed: Optional[int] = field(default=None, metadata={"min": 0})  # None: the run's seed
    eval_max_queries: Optional[int] = field(default=None, metadata={"min": 1})  # periodic eval: first N per split
    # reversal_jepa: weight of the JEPA regression term 1 - cos(prediction, tail concept) added to the
    # contrastive loss; it pulls a deduced concept onto its prediction instead of merely closest to it
    regression_weight: float = field(default=0.0, metadata={"min": 0.0})
    # reversal_jepa: whether the regression term also trains the predictor; false: it only places the concepts
    # where the predictor sends them (the predictor then learns from the contrastive loss alone; docs/jepa.md)
    regression_predictor_grad: bool = True
