"""The run folder of a training run: what the trainer writes next to its checkpoints.

Layout of ``output_dir``::

    config.yaml          the validated config of the run (written once the run is known to fit it)
    metrics.jsonl        one JSON record per line, each with its optimiser ``step``
    samples/step_*.png   sample grids
    checkpoints/         see :mod:`flowlab.train.checkpoint`
    logs/                tracker output (tensorboard, ...)
    <artifact>/          the final artefact (``Recipe.artifact_name``)

Only the main process writes; every method is a no-op elsewhere, so callers need no
``is_main_process`` checks. ``metrics.jsonl`` reads as one run: a resume drops records written
after the checkpoint it continues from (:meth:`RunFolder.trim_metrics`).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import ConfigError
from ..fileio import atomic_write_text
from .checkpoint import list_checkpoints
from .config import Config, config_to_dict
from .images import save_sample_grid

__all__ = ["RunFolder"]

#: Entries of a run folder removed by ``train.overwrite=true`` (the recipe's artefact folder too).
RUN_ENTRIES = ("checkpoints", "samples", "logs", "pipeline", "metrics.jsonl")


class RunFolder:
    """``output_dir`` of one run, written by the main process only.

    Args:
        root: the run folder (``config.output_dir``).
        is_main_process: whether this process writes.
        artifact_name: the recipe's final artefact folder (removed with the run on overwrite).
    """

    def __init__(self, root: str | os.PathLike, is_main_process: bool, artifact_name: str = "pipeline"):
        self.root = Path(root)
        self.is_main_process = is_main_process
        self.artifact_name = artifact_name
        self.checkpoints = self.root / "checkpoints"
        self.metrics_path = self.root / "metrics.jsonl"

    # ------------------------------------------------------------------ set-up
    def holds_run(self) -> bool:
        """Whether the folder already holds a run (a completed checkpoint or ``metrics.jsonl``)."""
        return bool(list_checkpoints(self.checkpoints)) or self.metrics_path.exists()

    def check_start(self, resume: str | None, overwrite: bool) -> None:
        """Refuse to mix a new run into an old one; with ``overwrite`` remove the old run (main process).

        Raises:
            ConfigError: ``output_dir`` holds a run and neither ``resume`` nor ``overwrite`` is set.
        """
        if resume is not None or not self.holds_run():
            return
        if not overwrite:
            raise ConfigError(
                f"output_dir: {self.root} already holds a run (checkpoints or metrics.jsonl). "
                "Continue it with train.resume=latest, start afresh with train.overwrite=true, "
                "or choose another output_dir."
            )
        if self.is_main_process:
            for name in dict.fromkeys((*RUN_ENTRIES, self.artifact_name)):
                p = self.root / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()

    def create(self) -> None:
        """Make the folder and its ``samples/`` and ``checkpoints/`` (main process)."""
        if self.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "samples").mkdir(exist_ok=True)
            self.checkpoints.mkdir(exist_ok=True)

    def write_config(self, config: Config) -> None:
        """``config.yaml``: the run's validated config, every default filled in."""
        if self.is_main_process:
            import yaml

            with open(self.root / "config.yaml", "w") as f:
                yaml.safe_dump(config_to_dict(config), f, sort_keys=False)

    # ------------------------------------------------------------------ metrics
    def append_metrics(self, record: dict) -> None:
        """Append one record (a dict with ``step``) to ``metrics.jsonl``."""
        if self.is_main_process:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def trim_metrics(self, step: int) -> None:
        """Drop records logged after ``step`` optimiser steps (by an interrupted run), so the file reads
        as one run. Log and evaluation records carry the steps done (``step`` is kept); a skipped-step
        record (``nonfinite_loss``) carries its 0-based step (``step`` itself is after the checkpoint,
        so it goes). A line cut by a kill is dropped too."""
        if not self.is_main_process or not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            s = rec.get("step", 0)
            if s < step or (s == step and not rec.get("nonfinite_loss")):
                keep.append(line)
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in keep))

    def last_eval(self) -> dict:
        """The newest ``metrics.jsonl`` record holding ``eval/*`` numbers (``{}`` if none, or off the
        main process)."""
        last: dict = {}
        if self.is_main_process and self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                rec = json.loads(line)
                if any(k.startswith("eval/") for k in rec):
                    last = rec
        return last

    # ------------------------------------------------------------------ samples
    def save_samples(self, samples: torch.Tensor, step: int) -> Path:
        """Save a sample grid (images ``(N, C, H, W)`` in [0, 1], or 2-D vectors ``(N, 2)``) as
        ``samples/step_<step>.png``; returns its path."""
        path = self.root / "samples" / f"step_{step:07d}.png"
        if self.is_main_process:
            save_sample_grid(samples, path)
        return path
