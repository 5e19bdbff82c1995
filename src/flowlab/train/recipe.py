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
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .config import Config
from .registry import RECIPES, recipe_class, register_recipe

__all__ = ["StepContext", "StepOutput", "Recipe", "DataSectionRecipe", "RECIPES", "register_recipe", "get_recipe"]


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
    """A training method. Subclasses build the data and model and compute the loss of one step
    (``training_step``, or :meth:`training_losses` for a loss in parts)."""

    name: str = "recipe"
    artifact_name: str = "pipeline"  # folder under output_dir that save_final writes

    def __init__(self, config: Config):
        self.config = config

    def prepare(self) -> None:
        """Work to do once before training starts and before accelerate is set up. Construction itself
        stays cheap: tools build recipes from configs just to read their attributes. A run that needs
        another run first says so in :meth:`prerequisites`; the engine never trains one itself."""

    def prerequisites(self) -> list[Config]:
        """Configs of runs that must be trained before this one (e.g. an RL recipe's missing base
        model). The top layer (:func:`flowlab.recipes.train`, the command line) trains them first."""
        return []

    @property
    def num_workers(self) -> int:
        """DataLoader worker processes for :meth:`build_dataset`'s dataset (0: the main process)."""
        return 0

    @abstractmethod
    def build_dataset(self) -> Dataset:
        """The training dataset (items ``{"x": ..., "label": ...}``)."""

    @abstractmethod
    def build_model(self, dataset: Dataset) -> nn.Module:
        """The trainable module (its parameters are optimised, averaged by EMA and checkpointed)."""

    def parameters(self, model: nn.Module):
        """Parameters handed to the optimiser."""
        return [p for p in model.parameters() if p.requires_grad]

    #: ``training_step(model, batch, ctx) -> StepOutput``: the loss of one micro-batch (this process's
    #: part of it). A single-loss recipe defines this; a recipe whose loss comes in parts defines
    #: :meth:`training_losses` instead (one of the two is required).
    training_step: Callable[[nn.Module, dict, StepContext], StepOutput]

    def __new__(cls, *args, **kwargs):
        if cls.training_losses is Recipe.training_losses and not callable(getattr(cls, "training_step", None)):
            raise TypeError(
                f"recipe {cls.__name__} defines neither training_step (one loss per micro-batch) nor "
                "training_losses (a loss in parts); define one of them"
            )
        return super().__new__(cls)

    # Optional hooks for recipes whose loss is a sum of independent local losses (e.g. NoProp's blocks).
    # The defaults keep the ordinary single-loss, data-parallel behaviour.

    #: ``False``: the model is not wrapped for data parallelism (no gradient all-reduce), every process
    #: gets the whole global batch, and each process trains the parameters :meth:`parameter_owners`
    #: gives it; owned parameters, their EMA and owned buffers are broadcast from their owner before
    #: evaluation, checkpoints and the final save.
    data_parallel: bool = True

    def training_losses(self, model: nn.Module, batch: dict, ctx: StepContext) -> Iterable[StepOutput]:
        """Losses of one micro-batch: what the trainer calls. Each part is back-propagated as soon as
        it is produced (before the next one is computed, e.g. by a generator), so only one part's
        activations are alive at a time; gradients of all parts accumulate into one optimiser step.
        Several parts are meant for ``data_parallel = False`` recipes (a DDP-wrapped model expects one
        backward per forward of the wrapper).

        Default: the one loss of ``training_step``, as a one-element tuple (no generator round trip
        for the common single-loss step)."""
        return (self.training_step(model, batch, ctx),)

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

    def card_data(self, repo_id: str) -> dict:
        """Model-card fields of the artefact :meth:`save_final` wrote, for the Hub: ``usage`` (Python code
        that loads and uses it), ``tags``, ``pipeline_tag``, and optionally ``library_name``,
        ``base_model``, ``datasets``, ``license``, ``description`` (see :class:`flowlab.hub.CardData`).
        The trainer calls it after :meth:`save_final` with ``repo_id`` = :data:`flowlab.hub.REPO_ID`
        (a placeholder the push replaces) and saves the result as ``<output_dir>/card.json``; the card
        takes these fields from there only. Every built-in recipe overrides it; default: none."""
        return {}


class DataSectionRecipe(Recipe):
    """A recipe that trains on the dataset named by its ``data`` section (:func:`flowlab.data.build_dataset`)."""

    def build_dataset(self) -> Dataset:
        from ..data import build_dataset

        return build_dataset(self.config.data, self.config.seed)

    @property
    def num_workers(self) -> int:
        return getattr(self.config.data, "num_workers", 0)  # image datasets only; the others are in memory


def get_recipe(config: Config) -> Recipe:
    """The recipe object of ``config`` (its class is imported now, from the registry)."""
    return recipe_class(config.recipe)(config)
