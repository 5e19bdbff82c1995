"""flowlab: flow matching on diffusers + accelerate.

Time convention everywhere in flowlab: ``t = 0`` is noise, ``t = 1`` is data.

The top-level names are imported lazily, so ``import flowlab.flow`` or ``flowlab.data``
does not pay for importing diffusers.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "FlowPipeline": "flowlab.pipelines.flow_pipeline",
    "FlowPipelineOutput": "flowlab.pipelines.flow_pipeline",
    "FlowScheduler": "flowlab.pipelines.scheduling_flow",
    "MLPVelocity": "flowlab.models.mlp",
    "UNetVelocity": "flowlab.models.unet",
    "DiTVelocity": "flowlab.models.dit",
    "Trainer": "flowlab.recipes",  # the engine's Trainer; importing flowlab.recipes registers the built-in recipes
    "load_config": "flowlab.recipes",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flowlab' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
