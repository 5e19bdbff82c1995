"""Config section ``reversal`` of the reversal recipes (``reversal_ar``, ``reversal_jepa`` in :mod:`flowlab.jepa.recipe`).

It lives here, not in :mod:`flowlab.jepa`, because importing that package registers its models with
transformers' Auto classes (documented behaviour), which imports torch and transformers; this
module is light so a config is validated before the training stack is imported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..schema import choices

__all__ = ["ReversalConfig"]


@dataclass
class ReversalConfig:
    """``reversal:``: data sizes, model sizes and evaluation of the reversal recipes (see docs/jepa.md)."""

    # data (flowlab.data.reversal)
    data_dir: Optional[str] = None  # read the splits written by write_reversal_data instead of generating
    num_entities_a: int = field(default=2000, metadata={"min": 2})  # both directions trained
    num_entities_b: int = field(default=1000, metadata={"min": 2})  # one direction trained, the other held out
    num_relations: int = field(default=6, metadata={"min": 1})
    facts_per_entity: int = field(default=1, metadata={"min": 1})
    names: str = field(default="multi", metadata=choices("single", "multi"))
    names_share: int = field(default=10, metadata={"min": 2})  # entities per shared first / last token
    data_seed: Optional[int] = field(default=None, metadata={"min": 0})  # None: the run's seed
    # model
    hidden_size: int = field(default=128, metadata={"min": 8})
    num_heads: int = field(default=4, metadata={"min": 1})
    mlp_ratio: int = field(default=4, metadata={"min": 1})
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    num_layers: int = field(default=4, metadata={"min": 1})  # reversal_ar
    position_embeddings: bool = True  # reversal_ar: False removes GPT-2's positional embeddings
    encoder_layers: int = field(default=2, metadata={"min": 1})  # reversal_jepa (ignored with memory)
    predictor_layers: int = field(default=2, metadata={"min": 1})  # reversal_jepa
    memory: bool = False  # reversal_jepa: mean-pool + top-1 key-value memory encoder
    # reversal_jepa: "entity" (one concept per entity) or "relation" (one per entity and role: several facts per
    # entity then stop chaining concepts into cycles that one map per relation cannot fit; docs/jepa.md)
    binding: str = field(default="entity", metadata=choices("entity", "relation"))
    temperature: float = field(default=0.1, metadata={"min": 1e-4})  # reversal_jepa: logits = cos / temperature
    negatives: str = field(default="batch", metadata=choices("batch", "all"))  # reversal_jepa: in-batch or all entities
    # reversal_jepa: learning-rate multiplier of the parameters that hold the concepts (the memory's values, or
    # the token embeddings without memory): concepts must move faster than the predictor memorises (docs/jepa.md)
    concept_lr_scale: float = field(default=1.0, metadata={"min": 0.0})
    # evaluation
    eval_max_queries: int = field(default=1000, metadata={"min": 1})  # per split, for the periodic eval
