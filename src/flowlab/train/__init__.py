"""Training: config schema, recipe protocol, the accelerate trainer and checkpoints.

The config schema and recipe protocol are light; the trainer (accelerate, diffusers) is imported
on first use, so ``from flowlab.train.config import ConfigError`` stays cheap.
"""
from .config import Config, ConfigError, load_config
from .recipe import RECIPES, Recipe, StepContext, StepOutput, get_recipe, register_recipe

__all__ = ["Config", "ConfigError", "load_config", "Recipe", "RECIPES", "StepContext", "StepOutput", "get_recipe", "register_recipe", "Trainer", "TrainingError"]


def __getattr__(name: str):
    if name in ("Trainer", "TrainingError"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
