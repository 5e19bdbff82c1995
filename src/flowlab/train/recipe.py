"""The recipe protocol: what a training method plugs into the shared :class:`~flowlab.train.trainer.Trainer`.

The trainer owns the loop (accelerate, data order, accumulation, clipping, EMA, LR
schedule, non-finite handling, checkpoints, logging); a recipe says what to train and
how one step's loss is computed. Per-step randomness comes from a :class:`StepContext`
whose generator is seeded from ``(seed, step, micro-step)`` and drawn for the *global*
batch, then sliced: the same data and noise reach each example whatever the number of
processes, and a resumed run draws exactly what an uninterrupted one would.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .config import Config

__all__ = ["StepContext", "StepOutput", "Recipe", "RECIPES", "register_recipe", "get_recipe", "import_builtin_recipes", "BUILTIN_RECIPE_MODULES"]


@dataclass
class StepContext:
    """Randomness and batch geometry of one micro-step.

    Attributes:
        step: optimiser step (0-based). micro: micro-step within gradient accumulation.
        generator: CPU generator seeded by the step, identical on every process and micro-step.
        global_batch: examples in the whole optimiser step, across processes and micro-steps.
        start, end: the rows of that global batch this micro-step on this process trains on.
        device: where tensors should go.
    """

    step: int
    micro: int
    generator: torch.Generator
    global_batch: int
    start: int
    end: int
    device: torch.device

    def local(self, x: Tensor) -> Tensor:
        """This process's rows of a global-batch tensor, moved to the device."""
        return x[self.start : self.end].to(self.device)

    def randn(self, *shape: int) -> Tensor:
        """Standard normal ``(local_batch, *shape)``, drawn for the global batch then sliced."""
        return self.local(torch.randn((self.global_batch, *shape), generator=self.generator))

    def rand(self) -> Tensor:
        """Uniform ``(local_batch,)``, drawn for the global batch then sliced."""
        return self.local(torch.rand(self.global_batch, generator=self.generator))

    def draw(self, fn: Callable[[int, torch.Generator], Tensor]) -> Tensor:
        """``fn(global_batch, generator)`` sliced to this process (e.g. a time sampler)."""
        return self.local(fn(self.global_batch, self.generator))


@dataclass
class StepOutput:
    """A scalar ``loss`` to minimise and extra ``logs`` (floats or 0-d tensors)."""

    loss: Tensor
    logs: dict[str, Any] = field(default_factory=dict)


class Recipe(ABC):
    """A training method. Subclasses build the data and model and compute the loss of one step."""

    name: str = "recipe"
    artifact_name: str = "pipeline"  # folder under output_dir that save_final writes

    def __init__(self, config: Config):
        self.config = config

    def prepare(self) -> None:
        """Work to do once before training starts and before accelerate is set up (e.g. an RL recipe
        training its missing base model). Construction itself stays cheap: tools build recipes from
        configs just to read their attributes."""

    @abstractmethod
    def build_dataset(self) -> Dataset:
        """The training dataset (items ``{"x": ..., "label": ...}``)."""

    @abstractmethod
    def build_model(self, dataset: Dataset) -> nn.Module:
        """The trainable module (its parameters are optimised, averaged by EMA and checkpointed)."""

    def parameters(self, model: nn.Module):
        """Parameters handed to the optimiser."""
        return [p for p in model.parameters() if p.requires_grad]

    @abstractmethod
    def training_step(self, model: nn.Module, batch: dict, ctx: StepContext) -> StepOutput:
        """Loss of one micro-batch (this process's part of it)."""

    # Optional hooks for recipes whose loss is a sum of independent local losses (e.g. NoProp's blocks).
    # The defaults keep the ordinary single-loss, data-parallel behaviour.

    #: ``False``: the model is not wrapped for data parallelism (no gradient all-reduce), every process
    #: gets the whole global batch, and each process trains the parameters :meth:`parameter_owners`
    #: gives it; owned parameters, their EMA and owned buffers are broadcast from their owner before
    #: evaluation, checkpoints and the final save.
    data_parallel: bool = True

    def training_losses(self, model: nn.Module, batch: dict, ctx: StepContext) -> Iterator[StepOutput]:
        """Losses of one micro-batch, each back-propagated by the trainer as soon as it is yielded
        (before the next one is computed), so only one part's activations are alive at a time.
        Gradients of all parts accumulate into one optimiser step. Default: :meth:`training_step`.
        Several parts are meant for ``data_parallel = False`` recipes (a DDP-wrapped model expects one
        backward per forward of the wrapper)."""
        yield self.training_step(model, batch, ctx)

    def parameter_owners(self, model: nn.Module, num_processes: int) -> dict[str, int] | None:
        """For ``data_parallel = False``: the process that trains each named parameter / buffer of the
        unwrapped model (names absent: process 0). ``None``: every process trains everything."""
        return None

    def grad_clip_groups(self, model: nn.Module) -> list[list[nn.Parameter]] | None:
        """Parameter groups clipped separately to ``train.max_grad_norm`` (``None``: one global norm)."""
        return None

    def on_step_end(self, model: nn.Module, step: int) -> dict | None:
        """Called on every process after each successful optimiser step ``step`` (0-based) with the
        unwrapped model, e.g. to soft-update an RL recipe's old policy. Returns extra logs or ``None``."""
        return None

    def sample_images(self, model: nn.Module, num_images: int, generator: torch.Generator) -> Tensor | None:
        """Samples for a grid: images ``(N, C, H, W)`` in [0, 1] or vectors ``(N, D)``; ``None`` to skip."""
        return None

    def evaluate(self, model: nn.Module, generator: torch.Generator) -> dict:
        """Evaluation numbers for ``metrics.jsonl`` (main process, EMA weights)."""
        return {}

    def save_final(self, model: nn.Module, directory: str) -> None:
        """Write the trained artefact (EMA weights) to ``directory``."""


RECIPES: dict[str, type[Recipe]] = {}


def register_recipe(name: str):
    """Class decorator adding a recipe to the registry under ``name`` (the config's ``recipe:``)."""

    def deco(cls):
        cls.name = name
        RECIPES[name] = cls
        return cls

    return deco


# Modules that define built-in recipes (imported on demand: each registers its recipe and any
# config section of its own). A new recipe adds its module here.
BUILTIN_RECIPE_MODULES = [
    "flowlab.train.flow_matching",
    "flowlab.train.meanflow",
    "flowlab.noprop.recipe",
    "flowlab.nft.recipe",
    "flowlab.jepa.recipe",
]


def import_builtin_recipes() -> None:
    import importlib

    for name in BUILTIN_RECIPE_MODULES:
        importlib.import_module(name)


def get_recipe(config: Config) -> Recipe:
    import_builtin_recipes()

    if config.recipe not in RECIPES:
        from .config import ConfigError

        raise ConfigError(f"recipe: unknown recipe {config.recipe!r}; available: {', '.join(sorted(RECIPES))}")
    return RECIPES[config.recipe](config)
