"""How the processes of a run share one optimiser step: by data, by parameters, or by shards.

* :class:`DataParallel` (every recipe with ``Recipe.data_parallel = True``): the model is wrapped by
  accelerate (DDP, DeepSpeed), each process trains on its slice of every micro-batch and gradients are
  all-reduced. The loss logged is the mean over processes.
* :class:`ParameterOwning` (``Recipe.data_parallel = False``, e.g. NoProp-DT): the model is not wrapped
  (no gradient all-reduce); every process sees the whole micro-batch and trains the parameters
  :meth:`Recipe.parameter_owners` gives it. Owned parameters, their EMA and owned buffers are
  broadcast from their owner before evaluation, checkpoints and the final save; each process keeps
  its own optimiser state in a checkpoint. The per-process losses cover disjoint parameters, so the
  loss logged is their sum.

* :class:`Sharded` (a data-parallel recipe under accelerate's FSDP, ``configs/accelerate/fsdp.yaml``, or
  with ``train.fsdp=true``): as data-parallel, but every parameter, its gradient, its Adam moments and
  its EMA are split across the processes with torch FSDP2 (each holds ``1/P`` of dimension 0 of every
  sharded parameter, a ``DTensor``). See :class:`Sharded` for what is gathered when.

With one process the first two give the same loop; they differ only in whether accelerate wraps the model
(and so in the checkpoint's layout, which each keeps stable).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from ..errors import ConfigError, TrainingError
from .recipe import Recipe

__all__ = ["TrainingStrategy", "DataParallel", "ParameterOwning", "Sharded", "DeepSpeedZero3", "make_strategy", "full_tensor"]


def full_tensor(t: Tensor) -> Tensor:
    """``t`` itself, or the whole tensor a ``DTensor`` is a shard of (a collective call for a ``DTensor``:
    every process of its mesh must make it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class TrainingStrategy(ABC):
    """What differs between data-parallel and parameter-owning training (see the module docstring).

    Args:
        accelerator: the run's accelerator.
    """

    #: whether each process trains on its own slice of the micro-batch
    splits_batch: bool = True
    #: how per-process mean losses combine into the logged loss (``accelerator.reduce`` reduction)
    loss_reduction: str = "mean"
    #: whether processes hold parts of parameters (the whole model exists only when gathered)
    holds_shards: bool = False

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

    def build_ema(self, parameters: list[nn.Parameter], decay: float):
        """The EMA of ``parameters`` (the trained ones, as the loop holds them)."""
        from .ema import InPlaceEMA

        return InPlaceEMA(parameters, decay=decay)

    def ema_step(self, ema, parameters: list[nn.Parameter]) -> None:
        """One EMA update after an optimiser step (a collective call where parameters must be gathered)."""
        ema.step(parameters)

    def count_parameters(self, parameter: nn.Parameter) -> int:
        """The number of elements of ``parameter`` in the whole model (not of this process's part)."""
        return parameter.numel()

    def checkpointed_objects(self, model: nn.Module, ema) -> list:
        """Objects with ``state_dict``/``load_state_dict`` that ``accelerator.save_state`` saves as custom
        states (pickled by the main process) after the LR scheduler: the EMA, and whatever else
        accelerate does not save by itself."""
        return [ema]

    @abstractmethod
    def part_is_finite(self, loss: Tensor) -> bool:
        """Whether a loss part may be back-propagated (as every process that must agree decides)."""

    def step_is_finite(self, finite: bool) -> bool:
        """Whether the optimiser step goes ahead, given this process's verdict on its parts."""
        return finite

    def sync_owned(self, model: nn.Module, ema_shadows: list[Tensor], ema_mask: list[bool]) -> None:
        """Make every process hold the whole trained model and EMA (before evaluation, saves)."""

    def gather_ema_state(self, model: nn.Module, ema_shadows: list[Tensor], ema_mask: list[bool]) -> dict[str, Tensor] | None:
        """A collective call: the whole model's state dict with the EMA weights in place of the tracked
        parameters, on the main process, when the model is held in shards; ``None`` when every process
        holds the whole model (the EMA model is then a copy of it)."""
        return None

    def save_extra_state(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema) -> None:
        """A collective call: save into the checkpoint ``folder`` what accelerate's ``save_state`` leaves out."""

    def load_extra_state(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema) -> None:
        """A collective call: load what :meth:`save_extra_state` saved (after ``load_state``)."""


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

    def checkpointed_objects(self, model, ema):
        return [ema, model]

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

    def save_extra_state(self, folder, model, optimizer, ema):
        # each process's optimiser holds the state of its own parameters only, and accelerate saves
        # process 0's: keep every process's part
        if self.owners is not None:
            torch.save(optimizer.state_dict(), self._optimizer_file(folder))

    def load_extra_state(self, folder, model, optimizer, ema):
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


def _fix_fsdp_root(model: nn.Module) -> None:
    """Make ``model`` the root of its FSDP2 units now rather than at its first forward.

    FSDP2 takes as root the first unit that runs forward, and refuses a root forward afterwards if a
    unit inside it ran first. RL policies call units inside the model directly (the old-policy copy,
    the network during rollouts) before the model's own forward, so the root is fixed here, with the
    lazy initialisation FSDP2 would run at the root's first forward (a private torch API:
    ``FSDPModule._get_fsdp_state()._lazy_init()``).
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        raise TrainingError(f"FSDP: the prepared model ({type(model).__name__}) is not an FSDP2 module; its root was not sharded")
    model._get_fsdp_state()._lazy_init()


class Sharded(DataParallel):
    """Data-parallel training with every parameter sharded by torch FSDP2 (``fully_shard``).

    Each process trains on its slice of every micro-batch, as with :class:`DataParallel`; FSDP2
    all-gathers each unit's parameters for its forward and backward and reduce-scatters (averages)
    the gradients, so a step equals the DDP step up to float round-off. Between steps a process
    holds ``1/P`` of dimension 0 of every sharded parameter (a ``DTensor``), of its gradient and of
    its Adam moments.

    * **Sharding**: under accelerate's FSDP (``configs/accelerate/fsdp.yaml``, ``fsdp_version: 2``)
      ``accelerator.prepare`` shards the model with accelerate's plugin (its auto-wrap policy, mixed
      precision policy, CPU offload). Where accelerate does not set FSDP up (it does so on accelerator
      devices only; a CPU/gloo launch with ``train.fsdp=true``), ``fully_shard`` is applied here: to
      every submodule with a forward of its own holding at least ``train.fsdp_min_num_params``
      parameters not yet in a unit (bottom up), then to the root.
    * **EMA on the shards**: the shadow parameters are ``DTensor`` clones of the shards, updated by the
      same fused in-place lerp; no process ever holds a whole EMA between saves.
    * **Checkpoints**: the model and optimiser go through accelerate's FSDP state functions
      (``save_fsdp_model``/``save_fsdp_optimizer``, which ``accelerator.save_state`` calls under an
      accelerate FSDP launch and this class calls otherwise), in the plugin's state-dict type
      (``SHARDED_STATE_DICT``: a ``torch.distributed.checkpoint`` folder written by all processes).
      The EMA shards are saved with ``torch.distributed.checkpoint`` in ``ema_fsdp/`` and its
      counters in ``ema_state.json``. Resume with the same process count is exact (tested);
      resuming on another count (DCP reshards) is untested.
    * **Evaluation, samples and the final artefact**: the whole model with the EMA weights is gathered
      to the main process's CPU (one parameter at a time through every process), loaded into a plain
      copy of the model built by the recipe, and used as a copy of the model is in data-parallel
      runs. Cost: one whole model on the main process (CPU state dict + the copy on its device) while
      sampling/saving, plus one whole parameter at a time on every process during the gather.

    Args:
        accelerator: the run's accelerator (``DistributedType.FSDP``, or a multi-process launch).
        min_num_params: size threshold of the auto-wrap applied when accelerate does not shard.
    """

    holds_shards = True

    def __init__(self, accelerator: Accelerator, min_num_params: int = 1_000_000):
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        super().__init__(accelerator)
        self.by_accelerate = accelerator.distributed_type == DistributedType.FSDP
        if self.by_accelerate:
            plugin = accelerator.state.fsdp_plugin
            if getattr(plugin, "fsdp_version", 1) != 2:
                raise ConfigError(
                    f"fsdp_config.fsdp_version: flowlab shards with FSDP2; set fsdp_version: 2 in the accelerate config "
                    f"(got {getattr(plugin, 'fsdp_version', 1)}), as configs/accelerate/fsdp.yaml does"
                )
        else:
            if accelerator.num_processes < 2:
                raise ConfigError(
                    "train.fsdp: sharding needs at least 2 processes (got 1); launch with accelerate launch "
                    "--config_file configs/accelerate/fsdp.yaml on GPUs, or ACCELERATE_USE_CPU=1 accelerate launch "
                    "--multi_gpu --num_processes 2 on a CPU"
                )
            plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
        self.plugin = plugin
        self.min_num_params = min_num_params

    def describe_batch(self, batch_size: int, micro_local: int, accum_steps: int) -> str:
        by = "accelerate" if self.by_accelerate else "fully_shard"
        return super().describe_batch(batch_size, micro_local, accum_steps) + f", parameters sharded (FSDP2 by {by})"

    def prepare(self, model, optimizer, recipe):
        if self.by_accelerate:
            model, optimizer = self.accelerator.prepare(model, optimizer)
        else:
            model, optimizer = self._fully_shard(model, optimizer, recipe)
        _fix_fsdp_root(self.accelerator.unwrap_model(model))
        return model, optimizer

    def _fully_shard(self, model, optimizer, recipe):
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        model = model.to(self.accelerator.device)
        names = {p: n for n, p in model.named_parameters()}
        for module in reversed(list(model.modules())[1:]):  # children before their parents
            if type(module).forward is nn.Module.forward:  # a container (ModuleDict, ModuleList) runs no forward of its own
                continue
            loose = sum(p.numel() for p in module.parameters() if not isinstance(p, DTensor))
            if loose and loose >= self.min_num_params:
                fully_shard(module)
        fully_shard(model)
        sharded = dict(model.named_parameters())
        for group in optimizer.param_groups:  # fully_shard replaced the parameters: point the optimiser at the shards
            try:
                group["params"] = [sharded[names[p]] for p in group["params"]]
            except KeyError:
                raise ConfigError(f"train.fsdp: recipe {recipe.name!r} optimises a tensor that is not a parameter of its model; it cannot be sharded") from None
        # not accelerator.prepare(optimizer): accelerate would pickle the sharded Adam state from the
        # main process alone; save_extra_state saves every process's shard
        return model, optimizer

    def checkpointed_objects(self, model, ema):
        return []  # the EMA is saved in shards by save_extra_state

    @staticmethod
    def _ema_tensors(ema) -> dict[str, Tensor]:
        return {str(i): s for i, s in enumerate(ema.shadow_params)}

    def save_extra_state(self, folder, model, optimizer, ema):
        import torch.distributed.checkpoint as dcp
        from accelerate.utils.fsdp_utils import save_fsdp_model, save_fsdp_optimizer

        from ..fileio import atomic_write_json

        acc, folder = self.accelerator, Path(folder)
        if not self.by_accelerate:  # what accelerator.save_state does under an accelerate FSDP launch
            save_fsdp_model(self.plugin, acc, model, str(folder))
            save_fsdp_optimizer(self.plugin, acc, optimizer, model, str(folder))
        dcp.save({"ema": self._ema_tensors(ema)}, checkpoint_id=str(folder / "ema_fsdp"))
        if acc.is_main_process:
            atomic_write_json(folder / "ema_state.json", {k: v for k, v in ema.state_dict().items() if k != "shadow_params"})

    def load_extra_state(self, folder, model, optimizer, ema):
        import json

        import torch.distributed.checkpoint as dcp
        from accelerate.utils.fsdp_utils import load_fsdp_model, load_fsdp_optimizer

        folder = Path(folder)
        if not (folder / "ema_fsdp").is_dir() or not (folder / "ema_state.json").is_file():
            raise ConfigError(f"train.resume: {folder} holds no sharded EMA (ema_fsdp/, ema_state.json); it was not written by a sharded (FSDP) run")
        if not self.by_accelerate:
            load_fsdp_model(self.plugin, self.accelerator, model, str(folder))
            load_fsdp_optimizer(self.plugin, self.accelerator, optimizer, model, str(folder))
        dcp.load({"ema": self._ema_tensors(ema)}, checkpoint_id=str(folder / "ema_fsdp"))  # in place, into the shards
        counters = json.loads((folder / "ema_state.json").read_text())
        ema.load_state_dict({**counters, "shadow_params": ema.shadow_params})

    def gather_ema_state(self, model, ema_shadows, ema_mask):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        main = self.accelerator.is_main_process
        # the whole state dict, on the main process's CPU only
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        tracked = [name for (name, _), keep in zip(model.named_parameters(), ema_mask) if keep]
        for name, shadow in zip(tracked, ema_shadows):
            whole = full_tensor(shadow)  # collective: one parameter at a time on every process
            if main:
                state[name] = whole.detach().cpu()
            del whole
        return state if main else {}


class DeepSpeedZero3(DataParallel):
    """Data-parallel training under DeepSpeed ZeRO-3 (``configs/accelerate/deepspeed_zero3.yaml``): the
    DeepSpeed engine partitions parameters, gradients and optimiser state; flowlab gathers what it needs
    whole with ``deepspeed.zero.GatheredParameters``.

    * **EMA, gathered**: the shadow parameters are whole fp32 copies of the trained parameters on every
      process. Each EMA update all-gathers the trained parameters (one all-gather of the trained
      parameters per optimiser step). Memory: ``4 x (trained parameters)`` bytes per process, plus the
      transient gathered parameters: negligible for LoRA, the size of the model for a full fine-tune
      (where FSDP's EMA on the shards, ``configs/accelerate/fsdp.yaml``, costs ``1/P`` of it). The EMA is
      checkpointed by accelerate as a custom state (whole tensors, the same on every process).
    * **Evaluation, samples and the final artefact**: every parameter is gathered in turn (one at a time)
      and the main process keeps a CPU copy, the EMA replacing the trained ones; the trainer loads that
      into a plain model built by the recipe and saves it in diffusers layout.
    * **Checkpoints**: accelerate's ``save_state`` (DeepSpeed's own partitioned checkpoint).
    """

    holds_shards = True

    def build_ema(self, parameters, decay):
        import deepspeed

        with deepspeed.zero.GatheredParameters(parameters):  # the shadows are clones of the whole parameters
            return super().build_ema(parameters, decay)

    def ema_step(self, ema, parameters):
        import deepspeed

        with deepspeed.zero.GatheredParameters(parameters):
            ema.step(parameters)

    def count_parameters(self, parameter):
        return int(getattr(parameter, "ds_numel", parameter.numel()))

    def gather_ema_state(self, model, ema_shadows, ema_mask):
        import deepspeed

        main = self.accelerator.is_main_process
        ema_of = {id(p): s for p, s in zip((p for p, keep in zip(model.parameters(), ema_mask) if keep), ema_shadows)}
        state: dict[str, Tensor] = {}
        for name, t in model.state_dict(keep_vars=True).items():  # tied weights appear under each name
            if id(t) in ema_of:
                whole = ema_of[id(t)]
            elif hasattr(t, "ds_id"):  # a partitioned parameter: gathered on every process, one at a time
                with deepspeed.zero.GatheredParameters([t]):
                    if main:
                        state[name] = t.detach().cpu().clone()
                continue
            else:
                whole = t
            if main:
                state[name] = whole.detach().cpu().clone()
        return state if main else {}


def _zero_stage(accelerator: Accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", plugin.zero_stage or 0))


def make_strategy(recipe: Recipe, accelerator: Accelerator, fsdp: bool = False, fsdp_min_num_params: int = 1_000_000) -> TrainingStrategy:
    """The strategy ``recipe`` asks for (``Recipe.data_parallel``): sharded under an accelerate FSDP
    launch or with ``fsdp`` (``train.fsdp``), gathering under DeepSpeed ZeRO-3."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED and _zero_stage(accelerator) == 3:
        if not recipe.data_parallel:
            raise ConfigError(f"DeepSpeed ZeRO-3: recipe {recipe.name!r} trains different parameters on each process (data_parallel = False); launch it with DDP")
        return DeepSpeedZero3(accelerator)
    if fsdp or accelerator.distributed_type == DistributedType.FSDP:
        if not recipe.data_parallel:
            raise ConfigError(
                f"train.fsdp: recipe {recipe.name!r} trains different parameters on each process (data_parallel = False), "
                "which sharding cannot express; launch it without FSDP (configs/accelerate/ddp_gpu.yaml)"
            )
        return Sharded(accelerator, fsdp_min_num_params)
    return DataParallel(accelerator) if recipe.data_parallel else ParameterOwning(accelerator)
