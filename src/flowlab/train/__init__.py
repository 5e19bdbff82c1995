"""The training engine: config core, recipe registry and protocol, the accelerate trainer, checkpoints.

The engine knows no recipe: the built-in ones are registered by :mod:`flowlab.recipes` (the top
layer); use ``flowlab.load_config`` / ``flowlab.Trainer`` (or import :mod:`flowlab.recipes`) to have
them. Names are imported on first use, so ``from flowlab.train.config import load_config`` does not
import torch, and a config error is reported before the training stack is loaded.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "Config": "config",
    "ConfigError": "config",
    "load_config": "config",
    "RECIPES": "registry",
    "RecipeSpec": "registry",
    "register_recipe": "registry",
    "Recipe": "recipe",
    "StepContext": "recipe",
    "StepOutput": "recipe",
    "get_recipe": "recipe",
    "Trainer": "trainer",
    "TrainingError": "trainer",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
