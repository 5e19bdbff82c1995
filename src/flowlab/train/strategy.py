"""How the processes of a run share one optimiser step: by data or by parameters.

* :class:`DataParallel` (every recipe with ``Recipe.data_parallel = True``): the model is wrapped by
  accelerate (DDP, DeepSpeed), each process trains on its slice of every micro-batch and gradients are
  all-reduced. The loss logged is the mean over processes.
* :class:`ParameterOwning` (``Recipe.data_parallel = False``, e.g. NoProp-DT): the model is not wrapped
  (no gradient all-reduce); every process sees the whole micro-batch and trains the parameters
  :meth:`Recipe.parameter_owners` gives it. Owned parameters, their EMA and owned buffers are
  broadcast from their owner before evaluation, checkpoints and the final save; each process keeps
  its own optimiser state in a checkpoint. The per-process losses cover disjoint parameters, so the
  loss logged is their sum.

With one process both give the same loop; they differ only in whether accelerate wraps the model
(and so in the checkpoint's layout, which each keeps stable).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from ..errors import ConfigError
from .recipe import Recipe

__all__ = ["TrainingStrategy", "DataParallel", "ParameterOwning", "make_strategy"]


class TrainingStrategy(ABC):
    """What differs between data-parallel and parameter-owning training (see the module docstring).

    Args:
        accelerator: the run's accelerator.
    """

    #: whether each process trains on its own slice of the micro-batch
    splits_batch: bool = True
    #: how per-process mean losses combine into the logged loss (``accelerator.reduce`` reduction)
    loss_reduction: str = "mean"

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator

    @property
    def num_shards(self) -> int:
        """Slices each micro-batch is cut into (one per process, or one for all)."""
        return self.accelerator.num_processes if self.splits_batch else 1

    @property
    def data_rank(self) -> int:
        """Which slice of each micro-batch this process trains on."""
        return self.accelerator.process_index if self.splits_batch else 0

    def describe_batch(self, batch_size: int, micro_local: int, accum_steps: int) -> str:
        """The start-up banner's account of the global batch."""
        return f"global batch {batch_size} = {self.accelerator.num_processes} x {micro_local} x {accum_steps} accum"

    @abstractmethod
    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, recipe: Recipe) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Move/wrap ``model`` and ``optimizer`` for training; returns them as the loop uses them."""

    def checkpointed_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules accelerate does not save by itself (registered for checkpointing after the EMA)."""
        return []

    @abstractmethod
    def part_is_finite(self, loss: Tensor) -> bool:
        """Whether a loss part may be back-propagated (as every process that must agree decides)."""

    def step_is_finite(self, finite: bool) -> bool:
        """Whether the optimiser step goes ahead, given this process's verdict on its parts."""
        return finite

    def sync_owned(self, model: nn.Module, ema_shadows: list[Tensor], ema_mask: list[bool]) -> None:
        """Make every process hold the whole trained model and EMA (before evaluation, saves)."""

    def save_optimizer_state(self, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        """Save optimiser state accelerate's ``save_state`` leaves out (into the checkpoint ``folder``)."""

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        """Load what :meth:`save_optimizer_state` saved (after ``load_state``)."""


class DataParallel(TrainingStrategy):
    """Each process trains on its slice of every micro-batch; accelerate all-reduces the gradients."""

    def prepare(self, model, optimizer, recipe):
        return self.accelerator.prepare(model, optimizer)

    def part_is_finite(self, loss: Tensor) -> bool:
        # every process must take the same decision, or the gradient all-reduce would hang
        ok = torch.isfinite(loss.detach()).float()
        if self.accelerator.num_processes > 1:
            ok = self.accelerator.reduce(ok, reduction="mean")
        return ok.item() == 1.0


class ParameterOwning(TrainingStrategy):
    """Every process sees the whole batch and trains the parameters it owns (``Recipe.parameter_owners``)."""

    splits_batch = False
    loss_reduction = "sum"

    def __init__(self, accelerator: Accelerator):
        super().__init__(accelerator)
        self.owners: dict[str, int] | None = None

    def describe_batch(self, batch_size: int, micro_local: int, accum_steps: int) -> str:
        if self.accelerator.num_processes == 1:
            return super().describe_batch(batch_size, micro_local, accum_steps)
        return f"global batch {batch_size} = {micro_local} x {accum_steps} accum on every process, parameters split across processes"

    def prepare(self, model, optimizer, recipe):
        acc = self.accelerator
        model = model.to(acc.device)  # not wrapped for data parallelism: no gradient all-reduce
        if acc.num_processes > 1:
            self.owners = recipe.parameter_owners(model, acc.num_processes)
        return model, acc.prepare(optimizer)

    def checkpointed_modules(self, model):
        return [model]

    def part_is_finite(self, loss: Tensor) -> bool:
        return bool(torch.isfinite(loss.detach()))  # parts differ per process: agreed once per step

    def step_is_finite(self, finite: bool) -> bool:
        acc = self.accelerator
        if acc.num_processes == 1:
            return finite
        return acc.reduce(torch.tensor(float(finite), device=acc.device), reduction="mean").item() == 1.0

    def sync_owned(self, model, ema_shadows, ema_mask):
        """Broadcast each parameter, its EMA and each buffer from the process that trains it."""
        if self.owners is None:
            return
        import torch.distributed as dist

        shadows = iter(ema_shadows)
        for (name, p), tracked in zip(model.named_parameters(), ema_mask):
            src = self.owners.get(name, 0)
            dist.broadcast(p.data, src=src)
            if tracked:
                dist.broadcast(next(shadows).data, src=src)
        for name, b in model.named_buffers():
            dist.broadcast(b.data, src=self.owners.get(name, 0))

    def _optimizer_file(self, folder: Path) -> Path:
        return Path(folder) / f"optimizer_rank{self.accelerator.process_index}.bin"

    def save_optimizer_state(self, optimizer, folder):
        # each process's optimiser holds the state of its own parameters only, and accelerate saves
        # process 0's: keep every process's part
        if self.owners is not None:
            torch.save(optimizer.state_dict(), self._optimizer_file(folder))

    def load_optimizer_state(self, optimizer, folder):
        if self.owners is None:
            return
        part = self._optimizer_file(folder)
        acc = self.accelerator
        if not part.is_file():
            raise ConfigError(
                f"train.resume: {folder} holds no optimiser state for process {acc.process_index} ({part.name}); "
                f"it was written by a run with another number of processes than {acc.num_processes}"
            )
        optimizer.load_state_dict(torch.load(part, map_location="cpu", weights_only=True))  # moved to the parameters by load_state_dict


def make_strategy(recipe: Recipe, accelerator: Accelerator) -> TrainingStrategy:
    """The strategy ``recipe`` asks for (``Recipe.data_parallel``)."""
    return DataParallel(accelerator) if recipe.data_parallel else ParameterOwning(accelerator)
