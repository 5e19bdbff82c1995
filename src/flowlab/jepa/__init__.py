"""JEPA reversal models: the GPT-2 baseline, the JEPA concept model (and its memory variant), metrics."""
from .layers import RMSNorm, TopOneMemory, TransformerBlock
from .metrics import ranking_metrics
from .models import EntityQueryMixin, JEPAConceptModel, JEPAConfig, ReversalGPT2, ReversalGPT2Config, ReversalOutput

__all__ = [
    "JEPAConceptModel",
    "JEPAConfig",
    "ReversalGPT2",
    "ReversalGPT2Config",
    "ReversalOutput",
    "EntityQueryMixin",
    "RMSNorm",
    "TopOneMemory",
    "TransformerBlock",
    "ranking_metrics",
]
