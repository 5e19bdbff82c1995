"""Training: config schema, recipe protocol, the accelerate trainer and checkpoints."""
from .config import Config, ConfigError, load_config
from .recipe import RECIPES, Recipe, StepContext, StepOutput, get_recipe, register_recipe
from .trainer import Trainer, TrainingError

__all__ = ["Config", "ConfigError", "load_config", "Recipe", "RECIPES", "StepContext", "StepOutput", "get_recipe", "register_recipe", "Trainer", "TrainingError"]
