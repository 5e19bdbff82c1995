"""One accelerate training loop for every recipe.

Responsibilities: process/device set-up (logged at start), deterministic data order and
per-step randomness, gradient accumulation (``no_sync`` on all but the last micro-step),
mixed precision, clipping, EMA, warm-up + LR schedule, non-finite loss handling,
atomic checkpoints with ``accelerator.save_state`` and exact resume, a checkpoint and a clean
stop on SIGINT/SIGTERM (:mod:`~flowlab.train.interrupt`), trackers, periodic samples and
evaluation, and the final artefact. What it delegates: how processes share a step
(:mod:`~flowlab.train.strategy`: data-parallel, parameter-owning, sharded with FSDP2, or gathered
under DeepSpeed ZeRO-3), the run folder and
``metrics.jsonl`` (:mod:`~flowlab.train.run_folder`), the EMA (:mod:`~flowlab.train.ema`) and the
checkpoint files (:mod:`~flowlab.train.checkpoint`).

Each micro-step goes through the recipe's :meth:`~flowlab.train.recipe.Recipe.training_losses`,
one part at a time: forward, backward, free its graph, next part.

``train.batch_size`` is the *global* batch per optimiser step: each of ``P`` processes
gets ``batch_size / (P * grad_accum_steps)`` examples per micro-step, so a run gives the
same result (up to float round-off) on any number of processes.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..card_data import REPO_ID, write_card_data
from ..errors import TrainingError, TrainingInterrupted
from .checkpoint import (
    CHECKPOINT_PREFIX,
    CheckpointError,
    finalize_checkpoint,
    find_resume_checkpoint,
    prune_checkpoints,
    replace_dir_atomic,
    verify_checkpoint,
    write_error_message,
)
from .config import Config, ConfigError, config_to_dict
from .interrupt import StopSignals
from .recipe import Recipe, StepContext
from .run_folder import RunFolder
from .strategy import full_tensor, make_strategy
from .teardown import launched_processes

__all__ = ["Trainer", "TrainingError", "TrainingInterrupted"]

logger = logging.getLogger("flowlab")


def _count(n: int) -> str:
    """A parameter count for the banner: ``3.81M`` from 10,000 on, the exact number below."""
    return f"{n / 1e6:.2f}M" if n >= 10_000 else str(n)


def _mean_over_processes(logs: dict) -> dict[str, float]:
    """A recipe's extra logs, each key's mean over the processes that logged it (a collective: every
    process calls it). Keys may differ between processes (NoProp's block-parallel mode logs each process's
    own blocks); the main process's keys come first."""
    from accelerate.utils import gather_object

    per_process = gather_object([{k: float(v) for k, v in logs.items()}])
    keys = list(dict.fromkeys(k for d in per_process for k in d))
    return {k: sum(d[k] for d in per_process if k in d) / sum(k in d for d in per_process) for k in keys}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class _IndexStream:
    """Deterministic example order: epoch ``e`` is ``randperm(N)`` seeded by ``(seed, e)``.

    ``indices(pos, n)`` returns global examples ``pos .. pos + n`` of the infinite stream.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {epoch: torch.randperm(self.n, generator=g), **{k: v for k, v in self._cache.items() if k >= epoch - 1}}
        return self._cache[epoch]

    def indices(self, pos: int, count: int) -> torch.Tensor:
        out, got = [], 0
        while got < count:
            epoch, off = divmod(pos + got, self.n)
            take = min(count - got, self.n - off)
            out.append(self._perm(epoch)[off : off + take])
            got += take
        return torch.cat(out)


class _LocalBatches(torch.utils.data.Sampler):
    """This process's example indices for every micro-step from ``start_step`` to the end (lazy)."""

    def __init__(self, trainer: "Trainer", start_step: int):
        t = trainer.config.train
        self.stream, self.micro_global, self.micro_local = trainer.stream, trainer.micro_global, trainer.micro_local
        self.rank = trainer.data_rank
        self.first, self.total = start_step * t.grad_accum_steps, t.max_steps * t.grad_accum_steps

    def __len__(self) -> int:
        return max(0, self.total - self.first)

    def __iter__(self):
        for k in range(self.first, self.total):
            idx = self.stream.indices(k * self.micro_global, self.micro_global)
            yield idx[self.rank * self.micro_local : (self.rank + 1) * self.micro_local].tolist()


def _resume_mismatch(path: Path, state: dict, config: Config, error: Exception) -> str:
    """One paragraph for a checkpoint whose model or optimizer does not fit the current config."""
    first = " ".join(str(error).split())[:300]
    saved = _flatten(state.get("config") or {})
    now = _flatten(config_to_dict(config))
    skip = ("train.resume", "train.overwrite", "output_dir")
    diff = [f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in sorted(set(saved) | set(now))
            if saved and not k.startswith(skip) and saved.get(k) != now.get(k)]
    hint = f" Settings that differ: {'; '.join(diff[:6])}." if diff else ""
    return (
        f"train.resume: {path} does not fit this config ({first}).{hint} Resume with the config the run was "
        "started with, or start afresh with train.overwrite=true or another output_dir."
    )


def _check_sharded_setup(acc: Accelerator, t, micro_local: int) -> None:
    """FSDP / DeepSpeed launches (configs/accelerate/): set what they need, refuse what would train wrongly.

    - DeepSpeed steps its engine inside every ``accelerator.backward`` unless accumulation goes
      through ``accelerator.accumulate`` (flowlab's loop uses ``no_sync`` micro-steps), so only
      ``train.grad_accum_steps=1`` is correct. The per-device micro-batch is given to DeepSpeed here
      (flowlab does not ``prepare`` a DataLoader it could read it from). ZeRO-3 partitions the
      parameters: :class:`~flowlab.train.strategy.DeepSpeedZero3` gathers them for the EMA and saves.
    - FSDP needs nothing here: :class:`~flowlab.train.strategy.Sharded` keeps the EMA on the shards and
      gathers the whole model for evaluation and the final save.
    """
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED:
        plugin = acc.state.deepspeed_plugin
        ds = plugin.deepspeed_config
        stage = int(ds.get("zero_optimization", {}).get("stage", plugin.zero_stage or 0))
        if stage > 3:
            raise ConfigError(f"DeepSpeed zero_stage: {stage} is not a ZeRO stage (0-3)")
        gas = ds.get("gradient_accumulation_steps", 1)
        if t.grad_accum_steps != 1 or gas not in (1, "auto"):
            raise ConfigError(
                f"train.grad_accum_steps: must be 1 under DeepSpeed (got {t.grad_accum_steps}, DeepSpeed "
                f"gradient_accumulation_steps={gas}): the engine steps after every backward. Use more processes "
                "or a larger per-device batch for a larger global batch."
            )
        ds["gradient_accumulation_steps"] = 1
        ds["train_micro_batch_size_per_gpu"] = micro_local
        ds["train_batch_size"] = micro_local * acc.num_processes


def _cache_lomo_probe() -> None:
    """Answer accelerate's ``is_lomo_available()`` from a cache for the rest of the process.

    ``AcceleratedOptimizer.step`` calls it twice per optimiser step, and each call is an uncached
    ``importlib.util.find_spec("lomo_optim")``: a file-system search of ``sys.path`` (~0.18 ms here).
    Whether a package is importable does not change while a run trains, so caching the answer
    changes nothing but the time. Installed once, on accelerate's optimizer module only.
    """
    import functools

    import accelerate.optimizer

    probe = accelerate.optimizer.is_lomo_available
    if not hasattr(probe, "cache_info"):
        accelerate.optimizer.is_lomo_available = functools.cache(probe)


class Trainer:
    """Train ``recipe`` as configured by ``config``.

    Args:
        config: the validated run configuration.
        recipe: the training method (built from ``config.recipe`` if omitted).
        accelerator: an existing ``Accelerator`` (one is created from the config otherwise).
    """

    def __init__(self, config: Config, recipe: Recipe | None = None, accelerator: Accelerator | None = None):
        from .recipe import get_recipe

        self.config = config
        self.recipe = recipe or get_recipe(config)
        self.recipe.prepare()
        self.output_dir = Path(config.output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"
        t = config.train
        if accelerator is None:
            if t.mixed_precision == "fp16" and not torch.cuda.is_available():
                raise ConfigError("train.mixed_precision: fp16 needs a CUDA device; use bf16 or no on CPU")
            log_with = None if t.report_to == "none" else t.report_to
            # accelerate keeps one AcceleratorState per process; a second Trainer in the same
            # Python session (a notebook, a sweep) may ask for another mixed precision. Reset the
            # accelerator-level state but keep the process group (PartialState).
            AcceleratorState._reset_state(reset_partial_state=False)
            accelerator = Accelerator(
                mixed_precision=t.mixed_precision,
                **({"dynamo_backend": "inductor"} if t.compile else {}),  # train.compile: accelerate's prepare() runs torch.compile
                log_with=log_with,
                project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
            )
        self.accelerator = accelerator
        _cache_lomo_probe()
        P = accelerator.num_processes
        world = launched_processes()
        if world > 1 and P == 1:
            raise ConfigError(
                f"the launcher started {world} processes (WORLD_SIZE={world}) but accelerate set each one up as a "
                "single process, so they would train separately and overwrite each other's output. On a CPU-only "
                "machine launch with: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N train.py ..."
            )
        self.strategy = make_strategy(self.recipe, accelerator, t.fsdp, t.fsdp_min_num_params)
        self.run = RunFolder(self.output_dir, accelerator.is_main_process, self.recipe.artifact_name)
        shards = self.strategy.num_shards
        if t.batch_size % (shards * t.grad_accum_steps):
            raise ConfigError(
                f"train.batch_size: the global batch {t.batch_size} must be divisible by processes ({P}) x "
                f"train.grad_accum_steps ({t.grad_accum_steps})"
            )
        self.micro_global = t.batch_size // t.grad_accum_steps
        self.micro_local = self.micro_global // shards
        self.data_rank = self.strategy.data_rank
        self._resumed_window: list[float] | None = None
        self._config_pending = False
        _check_sharded_setup(accelerator, t, self.micro_local)

    # ------------------------------------------------------------------ set-up
    def _prepare_output_dir(self) -> None:
        t, acc = self.config.train, self.accelerator
        has_run = self.run.holds_run()
        self.run.check_start(t.resume, t.overwrite)
        acc.wait_for_everyone()
        self.run.create()
        # resuming a run: keep its config.yaml until the checkpoint has loaded under this config
        self._config_pending = has_run and t.resume is not None
        if not self._config_pending:
            self.run.write_config(self.config)
        acc.wait_for_everyone()

    def _write_pending_config(self) -> None:
        if self._config_pending:
            self.run.write_config(self.config)
            self._config_pending = False

    def _build(self) -> None:
        cfg, t, acc = self.config, self.config.train, self.accelerator
        set_seed(cfg.seed)
        self.dataset = self.recipe.build_dataset()
        if len(self.dataset) == 0:
            raise ConfigError(f"data: the training dataset of recipe {cfg.recipe!r} is empty")
        model = self.recipe.build_model(self.dataset)
        params = self.recipe.parameters(model)
        optimizer = torch.optim.AdamW(
            params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay
        )
        # The LR schedule is stepped once per optimiser step by us (not prepared: accelerate would
        # step it once per process, which assumes a per-device batch).
        self.lr_scheduler = get_scheduler(
            t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps
        )
        self.model, self.optimizer = self.strategy.prepare(model, optimizer, self.recipe)
        # Unwrapped once: the wrapping does not change during training, and accelerate's unwrap_model
        # walks every submodule and probes the file system for DeepSpeed on each call (~0.3 ms).
        self._unwrapped = acc.unwrap_model(self.model)
        # EMA over the trained parameters only (frozen ones, e.g. a LoRA base or an RL recipe's
        # old-policy copy, would only cost memory); `_ema_mask` says which of the unwrapped model's
        # parameters the shadow list follows.
        self._ema_mask = [p.requires_grad for p in self._unwrapped.parameters()]
        self.ema = self.strategy.build_ema(self._ema_params(self.model), t.ema_decay)
        self.ema.to(acc.device)
        acc.register_for_checkpointing(self.lr_scheduler, *self.strategy.checkpointed_objects(self.model, self.ema))
        self._clip_groups = self.recipe.grad_clip_groups(self._unwrapped)
        self._ema_copy = None
        self._gathered: dict | None = None  # the whole EMA model's state on the main process, when sharded
        self.stream = _IndexStream(len(self.dataset), cfg.seed)
        self.in_memory = hasattr(self.dataset, "get_batch")

    def _ema_params(self, model: torch.nn.Module, tracked: bool = True) -> list[torch.nn.Parameter]:
        """The parameters of ``model`` (wrapped or not, or a copy) that the EMA follows (``tracked=False``:
        the others)."""
        module = self._unwrapped if model is self.model else self.accelerator.unwrap_model(model)
        params = list(module.parameters())
        return [p for p, keep in zip(params, self._ema_mask) if keep == tracked]

    def _sync_owned(self, gather: bool = False) -> None:
        """Every process holds the whole trained model and EMA (parameter-owning training broadcasts them);
        with ``gather``, when the model is held in shards, the main process also gets the whole EMA
        model's state for :meth:`ema_model` (a collective call)."""
        model = self._unwrapped
        self.strategy.sync_owned(model, self.ema.shadow_params, self._ema_mask)
        if gather:
            self._gathered = self.strategy.gather_ema_state(model, self.ema.shadow_params, self._ema_mask)

    def ema_model(self) -> torch.nn.Module:
        """A copy of the unwrapped model holding the EMA weights (for sampling, evaluation, saving).

        When the model is sharded, the copy is a plain model built by the recipe (outside the global
        RNG stream) and loaded with the state :meth:`_sync_owned` gathered; call it after that, on the
        main process."""
        if self.strategy.holds_shards:
            if not self._gathered:
                raise TrainingError(
                    "ema_model: the model is held in shards; its whole EMA state is gathered on the main process "
                    "only, by _sync_owned(gather=True) on every process"
                )
            if self._ema_copy is None:
                with torch.random.fork_rng(devices=[]):
                    self._ema_copy = self.recipe.build_model(self.dataset).to(self.accelerator.device)
                self._ema_copy.requires_grad_(False)
            self._ema_copy.load_state_dict(self._gathered)
            self._ema_copy.eval()
            return self._ema_copy
        if self._ema_copy is None:
            # the plain module, without train.compile's wrapper: a deep copy of that would hold the compiled call
            self._ema_copy = copy.deepcopy(self.accelerator.unwrap_model(self.model, keep_torch_compile=False))
            self._ema_copy.requires_grad_(False)
        self.ema.copy_to(self._ema_params(self._ema_copy))
        # parameters outside the EMA (e.g. an old-policy copy) follow the model
        for dst, src in zip(self._ema_params(self._ema_copy, False), self._ema_params(self.model, False)):
            dst.data.copy_(src.data)
        self._ema_copy.eval()
        return self._ema_copy

    def _log_startup(self) -> None:
        acc, t = self.accelerator, self.config.train
        model = acc.unwrap_model(self.model, keep_torch_compile=False)
        count = self.strategy.count_parameters
        trainable = sum(count(p) for p in model.parameters() if p.requires_grad)
        frozen = sum(count(p) for p in model.parameters() if not p.requires_grad)
        # frozen copies (an RL recipe's old policy and reference, a LoRA base) are not what is trained
        params = f"{_count(trainable)} trainable" + (f" + {_count(frozen)} frozen" if frozen else "") + " params"
        acc.print(
            f"flowlab: recipe={self.config.recipe} | {acc.num_processes} process(es) "
            f"[{acc.distributed_type.value}] on {acc.device} | mixed precision {acc.mixed_precision} | "
            f"{self.strategy.describe_batch(t.batch_size, self.micro_local, t.grad_accum_steps)} | "
            f"{len(self.dataset)} examples | {type(model).__name__} {params} | output {self.output_dir}"
        )

    # ------------------------------------------------------------------ data
    def _batch(self, step: int, micro: int):
        pos = (step * self.config.train.grad_accum_steps + micro) * self.micro_global
        idx = self.stream.indices(pos, self.micro_global)
        rank = self.data_rank
        local = idx[rank * self.micro_local : (rank + 1) * self.micro_local]
        if self.in_memory:
            batch = self.dataset.get_batch(local)
        else:
            batch = torch.utils.data.default_collate([self.dataset[int(i)] for i in local])
        return {k: v.to(self.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _batches(self, start_step: int):
        """Yield ``(step, micro, batch)`` from ``start_step`` on; uses worker processes when asked."""
        t = self.config.train
        workers = self.recipe.num_workers
        if self.in_memory or workers == 0:
            step = start_step
            while True:
                for micro in range(t.grad_accum_steps):
                    yield step, micro, self._batch(step, micro)
                step += 1
        loader = DataLoader(self.dataset, batch_sampler=_LocalBatches(self, start_step), num_workers=workers)
        for k, batch in enumerate(loader, start=start_step * t.grad_accum_steps):
            step, micro = divmod(k, t.grad_accum_steps)
            yield step, micro, {kk: v.to(self.accelerator.device) if torch.is_tensor(v) else v for kk, v in batch.items()}

    def _context(self, step: int, micro: int) -> StepContext:
        """Randomness for the whole optimiser step's global batch, sliced to (micro-step, process):
        row ``j`` of the step's batch gets the same data and noise under any process count or
        accumulation."""
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        start = micro * self.micro_global + self.data_rank * self.micro_local
        return StepContext(step, micro, g, self.config.train.batch_size, start, start + self.micro_local, self.accelerator.device)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int, log_window: torch.Tensor | None = None) -> Path:
        """Save an atomic checkpoint of ``step`` (a collective call: every process calls it).

        Args:
            step: optimiser steps done.
            log_window: ``(4,)`` float64, this process's log window in progress (loss sum, steps,
                skipped steps, last grad norm), so that a resumed run logs the numbers an
                uninterrupted one would even between two log steps. ``None``: an empty window.
        """
        acc = self.accelerator
        self._sync_owned()
        final = self.ckpt_dir / f"{CHECKPOINT_PREFIX}{step}"
        tmp = self.ckpt_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))
            self.strategy.save_extra_state(tmp, self.model, self.optimizer, self.ema)
            window = log_window if log_window is not None else torch.zeros(4, dtype=torch.float64)
            windows = acc.gather(window.to(acc.device, torch.float64)[None]).cpu().tolist()
            acc.wait_for_everyone()
            if acc.is_main_process:
                finalize_checkpoint(
                    tmp, final, {"step": step, "recipe": self.config.recipe, "seed": self.config.seed,
                                 "config": config_to_dict(self.config), "log_window": windows}
                )
                prune_checkpoints(self.ckpt_dir, self.config.train.checkpoints_total_limit)
        except OSError as e:  # e.g. a full disk: drop the partial folder, keep the older checkpoints
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(write_error_message(e, final)) from None
        acc.wait_for_everyone()
        return final

    def _resume(self) -> int:
        t, acc = self.config.train, self.accelerator
        if t.resume is None:
            return 0
        if t.resume == "latest":
            found = find_resume_checkpoint(self.ckpt_dir)
            if found is None:
                acc.print(f"flowlab: train.resume=latest but {self.ckpt_dir} has no valid checkpoint; starting from step 0")
                self._write_pending_config()
                self.run.trim_metrics(0)  # what a run stopped before its first checkpoint logged is re-done
                return 0
            path, state = found
        else:
            path = Path(t.resume)
            try:
                state = verify_checkpoint(path)
            except CheckpointError as e:
                raise ConfigError(f"train.resume: {e}") from None
        if state.get("recipe", self.config.recipe) != self.config.recipe:
            raise ConfigError(f"train.resume: {path} was written by recipe={state['recipe']!r}, this config has recipe={self.config.recipe!r}")
        try:
            acc.load_state(str(path))
        except (RuntimeError, ValueError, KeyError) as e:  # shapes / parameter groups of another model
            raise ConfigError(_resume_mismatch(path, state, self.config, e)) from None
        self.strategy.load_extra_state(Path(path), self.model, self.optimizer, self.ema)
        self._write_pending_config()
        windows = state.get("log_window")
        if isinstance(windows, list) and len(windows) == acc.num_processes:
            self._resumed_window = [float(v) for v in windows[acc.process_index]]
        step = int(state["step"])
        acc.print(f"flowlab: resumed from {path} at step {step}")
        self.run.trim_metrics(step)
        return step

    # ------------------------------------------------------------------ logging
    def _sample_and_eval(self, step: int, sample: bool, evaluate: bool) -> dict:
        acc, cfg = self.accelerator, self.config
        out: dict = {}
        if sample or evaluate:
            self._sync_owned(gather=True)
        if acc.is_main_process and (sample or evaluate):
            model = self.ema_model()
            if sample:
                g = torch.Generator().manual_seed(cfg.seed)
                imgs = self.recipe.sample_images(model, cfg.sample.num_images, g)
                if imgs is not None:
                    self.run.save_samples(imgs, step)
            if evaluate and cfg.eval.enabled:
                g = torch.Generator().manual_seed(cfg.seed + 1)
                out = {f"eval/{k}": v for k, v in self.recipe.evaluate(model, g).items()}
                if out:
                    self.run.append_metrics({"step": step, **out})
                    scalars = {k: v for k, v in out.items() if isinstance(v, (int, float))}
                    if scalars:
                        acc.log(scalars, step=step)
                    acc.print("flowlab: step %d eval %s" % (step, ", ".join(f"{k[5:]}={v:.4g}" for k, v in scalars.items())))
        acc.wait_for_everyone()
        self._gathered = None  # a sharded model's gathered state: one whole model of CPU memory, freed
        return out

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Run training to ``train.max_steps``; returns the final evaluation numbers.

        The process group of a multi-process launch is left up for a run that may follow in the same
        process; :func:`flowlab.recipes.train` (and so ``train.py``) destroys it once the last run has
        ended. A script that calls ``Trainer.train`` itself under ``accelerate launch`` ends with
        :func:`flowlab.train.teardown.end_distributed`.

        Raises:
            TrainingInterrupted: on SIGINT or SIGTERM, after a checkpoint of the last whole step was
                saved (``train.resume=latest`` continues exactly from it).
        """
        cfg, t, acc = self.config, self.config.train, self.accelerator
        self._prepare_output_dir()
        self._build()
        self._log_startup()
        with StopSignals() as signals:
            step = self._resume()
            if acc.is_main_process and t.report_to != "none":
                acc.init_trackers("flowlab", config=_flatten(config_to_dict(cfg)))
            self._loop(step, signals)
        final = self._finish()
        self._end_trackers()
        return final

    def _end_trackers(self) -> None:
        """Close the experiment trackers. The process group stays up: another run may follow in this
        process (:func:`flowlab.recipes.train` trains a run's prerequisites first), and
        :func:`flowlab.train.teardown.end_distributed` ends it once, at the end."""
        for tracker in self.accelerator.trackers:
            tracker.finish()

    def _loop(self, step: int, signals: StopSignals) -> None:
        """Optimiser steps from ``step`` to ``train.max_steps``, with logging, samples, evaluation and
        checkpoints; stops at a step boundary once any process has received SIGINT/SIGTERM."""
        cfg, t, acc = self.config, self.config.train, self.accelerator
        model, optimizer, strategy = self.model, self.optimizer, self.strategy
        model.train()
        ema_params = self._ema_params(model)  # the same Parameter objects for the whole run
        # accelerate's autocast builds its context from the global state on every call; without
        # mixed precision it is a null context
        autocast = acc.autocast if acc.native_amp else contextlib.nullcontext
        nonfinite_run, window_loss, window_n, window_skipped = 0, torch.zeros((), device=acc.device), 0, 0
        grad_norm = torch.zeros((), device=acc.device)
        if self._resumed_window is not None:  # the log window the checkpoint was taken in
            loss_sum, n, skipped, norm = self._resumed_window
            window_loss.fill_(loss_sum)
            window_n, window_skipped = int(n), int(skipped)
            grad_norm = torch.tensor(norm, device=acc.device)
        window_start, window_steps = time.perf_counter(), 0
        extra_logs: dict = {}
        bar = tqdm(total=t.max_steps, initial=step, desc="training", disable=not acc.is_local_main_process, dynamic_ncols=True)
        batches = self._batches(step)
        while step < t.max_steps:
            finite = True
            step_loss = torch.zeros((), device=acc.device)
            for micro in range(t.grad_accum_steps):
                _, _, batch = next(batches)
                ctx = self._context(step, micro)
                last = micro == t.grad_accum_steps - 1
                sync = contextlib.nullcontext if last else (lambda: acc.no_sync(model))
                # Recipe.training_losses, one part at a time: forward (under no_sync and autocast),
                # backward, free its graph, then the next part. A single-loss recipe's one part is
                # computed by the call itself.
                with sync(), autocast():
                    parts = iter(self.recipe.training_losses(model, batch, ctx))
                part_index = 0
                while True:
                    with sync(), autocast():
                        out = next(parts, None)
                    if out is None:
                        break
                    if not strategy.part_is_finite(out.loss):
                        finite = False
                        break
                    loss = out.loss if t.grad_accum_steps == 1 else out.loss / t.grad_accum_steps
                    with sync():
                        acc.backward(loss)
                    step_loss += loss.detach()
                    extra_logs = {**(extra_logs if part_index else {}), **out.logs}  # all parts' logs
                    part_index += 1
                if not finite:
                    break
            if strategy.step_is_finite(finite):
                if t.max_grad_norm > 0 and self._clip_groups is not None:
                    acc.unscale_gradients()
                    norms = [full_tensor(torch.nn.utils.clip_grad_norm_(g, t.max_grad_norm)) for g in self._clip_groups if g]
                    grad_norm = torch.stack(norms).pow(2).sum().sqrt() if norms else grad_norm
                elif t.max_grad_norm > 0:
                    norm = acc.clip_grad_norm_(model.parameters(), t.max_grad_norm)  # None under DeepSpeed before its first step
                    grad_norm = grad_norm if norm is None else full_tensor(norm)  # a DTensor when sharded
                optimizer.step()
                self.lr_scheduler.step()
                strategy.ema_step(self.ema, ema_params)
                step_logs = self.recipe.on_step_end(self._unwrapped, step)
                if step_logs:
                    extra_logs = {**extra_logs, **step_logs}
                nonfinite_run = 0
                window_loss += step_loss
                window_n += 1
            else:
                nonfinite_run += 1
                window_skipped += 1
                acc.print(f"flowlab: non-finite loss at step {step}; step skipped ({nonfinite_run} in a row)")
                self.run.append_metrics({"step": step, "nonfinite_loss": True})
                if nonfinite_run >= t.max_nonfinite_steps:
                    raise TrainingError(
                        f"{nonfinite_run} non-finite losses in a row (train.max_nonfinite_steps={t.max_nonfinite_steps}); "
                        "lower train.lr, enable clipping (train.max_grad_norm) or check the data for NaN/inf"
                    )
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_steps += 1
            bar.update(1)

            if step % t.log_every == 0 or step == t.max_steps:
                elapsed = time.perf_counter() - window_start
                # parameter-owning training: each process's loss covers its own parameters, so they add up
                mean_loss = acc.reduce(window_loss / max(window_n, 1), reduction=strategy.loss_reduction).item()
                record = {
                    "step": step,
                    "loss": mean_loss,
                    "lr": self.lr_scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "samples_per_sec": window_steps * t.batch_size / max(elapsed, 1e-9),
                    "steps_per_sec": window_steps / max(elapsed, 1e-9),
                    "skipped_steps": window_skipped,
                }
                record.update(_mean_over_processes(extra_logs) if acc.num_processes > 1 else {k: float(v) for k, v in extra_logs.items()})
                self.run.append_metrics(record)
                acc.log({k: v for k, v in record.items() if k != "step"}, step=step)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}")
                window_loss.zero_()
                window_n = window_skipped = window_steps = 0
                window_start = time.perf_counter()

            done = step == t.max_steps
            sample_now = done or (cfg.sample.every > 0 and step % cfg.sample.every == 0)
            eval_now = done or (cfg.eval.every > 0 and step % cfg.eval.every == 0)
            if sample_now or eval_now:
                self._sample_and_eval(step, sample_now, eval_now)
            checkpoint_now = done or (t.checkpoint_every > 0 and step % t.checkpoint_every == 0)
            stop = 0 if done else signals.agreed(acc)
            if checkpoint_now or stop:
                window = torch.tensor([float(window_loss), window_n, window_skipped, float(grad_norm)], dtype=torch.float64)
                saved = self.save_checkpoint(step, window)
            if stop:
                bar.close()
                self._end_trackers()
                name = signal.Signals(stop).name
                raise TrainingInterrupted(
                    f"stopped by {name} after step {step} of {t.max_steps}; saved {saved}. "
                    "Continue with train.resume=latest.", stop, step,
                )
            if sample_now or eval_now or done:
                window_start = time.perf_counter()  # keep throughput a measure of training alone
        bar.close()

    def _finish(self) -> dict:
        acc = self.accelerator
        self._sync_owned(gather=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            final_dir = self.output_dir / self.recipe.artifact_name
            tmp = self.output_dir / f".tmp-{self.recipe.artifact_name}"
            if tmp.exists():
                shutil.rmtree(tmp)
            try:
                self.recipe.save_final(self.ema_model(), str(tmp))
                saved = tmp.exists()
                if saved:
                    replace_dir_atomic(tmp, final_dir)
            except OSError as e:  # e.g. a full disk: the previous final_dir (if any) was not touched
                shutil.rmtree(tmp, ignore_errors=True)
                raise CheckpointError(write_error_message(e, final_dir)) from None
            if saved:
                write_card_data(self.output_dir, self.recipe.card_data(REPO_ID), recipe=self.recipe.name, artifact=self.recipe.artifact_name)
                acc.print(f"flowlab: saved {final_dir}")
        acc.wait_for_everyone()
        return self.run.last_eval()
