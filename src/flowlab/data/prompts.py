"""Prompt data sets for text-to-image RL: prompts plus per-prompt metadata for the rewards.

Three forms, for a training set and for a held-out evaluation set alike:

* ``txt``: a text file, one prompt per line (surrounding white space stripped, blank lines
  skipped); the metadata of each prompt is ``{}``. The PickScore, OCR and DrawBench prompt
  sets of the references are in this form (``dataset/<name>/{train,test}.txt``).
* ``jsonl``: one JSON object per line; ``column`` (default ``prompt``) is the prompt and every
  *other* field is that prompt's metadata, handed to the rewards: GenEval's ``tag``,
  ``include``, ``exclude`` (``dataset/geneval/{train,test}_metadata.jsonl``), an OCR target
  ``text``, ... (the prompt itself is kept in the metadata too, as GenEval's server reads it).
* ``hf``: a Hugging Face dataset, by Hub name or as a folder (``save_to_disk`` output or a
  folder ``datasets.load_dataset`` reads), with a ``split`` and a ``column``; the other
  columns are the metadata.

``format: auto`` picks ``txt`` for ``*.txt``, ``jsonl`` for ``*.jsonl``/``*.json`` files and
``hf`` otherwise. Bad input raises :class:`~flowlab.errors.DataError` naming the file and line
(or the dataset, split and column).

:class:`PromptSampler` draws the prompts of each optimiser step's global batch
deterministically from ``(seed, step)``, like the trainer's
:class:`~flowlab.train.recipe.StepContext` (generator seeded ``seed · 1000003 + step``): every
process computes the same draw and takes its own slice, and a resumed run draws what an
uninterrupted one would have. As the reference's ``DistributedKRepeatSampler``
(``scripts/train_nft_sd3.py`` lines 118-152 in NVlabs/DiffusionNFT), the prompts of one step
are distinct (a random permutation's first ``n``); each is then repeated ``group_size`` times
by the recipe.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from .base import DataError

__all__ = ["PROMPT_FORMATS", "PromptSet", "PromptDataConfig", "PromptSampler", "load_prompts", "resolve_prompt_format"]

PROMPT_FORMATS = ("auto", "txt", "jsonl", "hf")


@dataclass
class PromptSet:
    """Prompts and their metadata.

    Attributes:
        prompts: ``N`` strings.
        metadata: ``N`` dicts (``{}`` when a prompt has none), handed to the rewards as is.
        source: where they came from, for messages and logs.
    """

    prompts: list[str]
    metadata: list[dict[str, Any]]
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.metadata):
            raise DataError(f"{self.source or 'prompt set'}: {len(self.prompts)} prompts but {len(self.metadata)} metadata entries")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> tuple[str, dict[str, Any]]:
        return self.prompts[i], self.metadata[i]

    def select(self, indices: Tensor | list[int]) -> tuple[list[str], list[dict[str, Any]]]:
        """The prompts and metadata (copies of the dicts) at ``indices``."""
        idx = indices.tolist() if isinstance(indices, Tensor) else list(indices)
        return [self.prompts[i] for i in idx], [dict(self.metadata[i]) for i in idx]


def resolve_prompt_format(path: str, format: str = "auto") -> str:
    """The concrete format (``txt``, ``jsonl`` or ``hf``) of ``path`` under ``format``.

    Raises:
        DataError: an unknown format, or a file format whose file does not exist.
    """
    if format not in PROMPT_FORMATS:
        raise DataError(f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, got {format!r}")
    if format == "auto":
        ext = os.path.splitext(path)[1].lower()
        format = "txt" if ext == ".txt" else "jsonl" if ext in (".jsonl", ".json") else "hf"
    if format in ("txt", "jsonl") and not os.path.isfile(os.path.expanduser(path)):
        raise DataError(f"prompt file {path!r} does not exist" + (" (it is a folder: use format hf)" if os.path.isdir(path) else ""))
    return format


def _read_lines(path: str) -> list[str]:
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"prompt file {path!r} is not UTF-8 text: {e}") from None
    except OSError as e:
        raise DataError(f"cannot read prompt file {path!r}: {e.strerror or e}") from None


def _load_txt(path: str) -> PromptSet:
    prompts = [line.strip() for line in _read_lines(path)]
    prompts = [p for p in prompts if p]
    return PromptSet(prompts, [{} for _ in prompts], path)


def _prompt_of(value: Any, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {column!r} is a {type(value).__name__}, expected a string prompt")
    if not value.strip():
        raise DataError(f"{where}: {column!r} is an empty prompt")
    return value.strip()


def _load_jsonl(path: str, column: str) -> PromptSet:
    prompts, metadata = [], []
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object with a {column!r} field, got {type(row).__name__}")
        if column not in row:
            raise DataError(f"{where}: no {column!r} field (fields: {sorted(row)}); set the prompt column")
        prompts.append(_prompt_of(row[column], where, column))
        metadata.append(row)
    return PromptSet(prompts, metadata, path)


def _load_hf(path: str, split: str, column: str) -> PromptSet:
    from .images import ImageDataset  # its loader resolves saved folders, load_dataset folders and Hub names

    ds, _ = ImageDataset._load(os.path.expanduser(path) if os.path.exists(os.path.expanduser(path)) else path, split, "hf", None)
    where = f"split {split!r} of {path!r}"
    if column not in ds.column_names:
        raise DataError(f"prompt column {column!r} not found in {where}; available columns: {list(ds.column_names)}")
    prompts, metadata = [], []
    for i, row in enumerate(ds):
        prompts.append(_prompt_of(row[column], f"{where}, row {i}", column))
        metadata.append(dict(row))
    return PromptSet(prompts, metadata, f"{path}[{split}]")


def load_prompts(path: str, format: str = "auto", split: str = "train", column: str = "prompt") -> PromptSet:
    """Load a prompt set (see the module docstring for the forms).

    Args:
        path: a ``.txt``/``.jsonl`` file, a dataset folder, or a Hub dataset name.
        format: ``auto``, ``txt``, ``jsonl`` or ``hf``.
        split: the split of an ``hf`` dataset.
        column: the prompt field of ``jsonl`` rows and ``hf`` columns.

    Returns:
        The :class:`PromptSet`.

    Raises:
        DataError: a missing or unreadable file, a bad line (its file and line number), a
            missing column or split, an empty or non-string prompt, or no prompts at all.
    """
    if not isinstance(path, str) or not path:
        raise DataError(f"prompt path must be a non-empty string, got {path!r}")
    fmt = resolve_prompt_format(path, format)
    if fmt == "txt":
        out = _load_txt(path)
    elif fmt == "jsonl":
        out = _load_jsonl(path, column)
    else:
        out = _load_hf(path, split, column)
    if len(out) == 0:
        raise DataError(f"prompt set {out.source!r} holds no prompts")
    return out


@dataclass
class PromptDataConfig:
    """Where the prompts of an RL run come from: a training set and an optional held-out
    evaluation set, each a ``txt``/``jsonl`` file or a Hugging Face dataset.

    Example (YAML)::

        prompts:
          path: dataset/geneval/train_metadata.jsonl
          eval_path: dataset/geneval/test_metadata.jsonl
          eval_max_prompts: 512
    """

    path: str = ""  # training prompts
    format: str = field(default="auto", metadata={"choices": PROMPT_FORMATS})
    split: str = "train"  # hf: the training split
    column: str = "prompt"  # jsonl/hf: the prompt field
    eval_path: Optional[str] = None  # held-out prompts (same forms); None: no held-out set
    eval_format: str = field(default="auto", metadata={"choices": PROMPT_FORMATS})
    eval_split: str = "test"
    eval_column: Optional[str] = None  # default: column
    eval_max_prompts: int = field(default=0, metadata={"min": 0})  # evaluate the first N held-out prompts (0: all)

    def load_train(self) -> PromptSet:
        """The training prompts.

        Raises:
            DataError: naming ``prompts.path`` when it is empty, or the file/line at fault.
        """
        if not self.path:
            raise DataError("prompts.path: empty; give a .txt or .jsonl prompt file or a dataset")
        return load_prompts(self.path, self.format, self.split, self.column)

    def load_eval(self) -> PromptSet | None:
        """The held-out prompts (the first ``eval_max_prompts`` of them when positive), or ``None``."""
        if not self.eval_path:
            return None
        out = load_prompts(self.eval_path, self.eval_format, self.eval_split, self.eval_column or self.column)
        if self.eval_max_prompts and len(out) > self.eval_max_prompts:
            k = self.eval_max_prompts
            out = PromptSet(out.prompts[:k], out.metadata[:k], out.source)
        return out


class PromptSampler:
    """Deterministic per-step draw of the distinct prompts of one optimiser step's global batch.

    Args:
        num_prompts: size ``M`` of the prompt set.
        prompts_per_step: distinct prompts ``n`` per optimiser step (global, over all processes).
        seed: the run's seed.

    Raises:
        DataError: ``n`` larger than ``M`` (a step's prompts are distinct) or not positive.
    """

    def __init__(self, num_prompts: int, prompts_per_step: int, seed: int = 0):
        if prompts_per_step < 1:
            raise DataError(f"prompts per step must be >= 1, got {prompts_per_step}")
        if num_prompts < prompts_per_step:
            raise DataError(
                f"the prompt set has {num_prompts} prompts but each step draws {prompts_per_step} distinct ones; "
                "use more prompts or fewer per step"
            )
        self.num_prompts = num_prompts
        self.prompts_per_step = prompts_per_step
        self.seed = seed

    def generator(self, step: int) -> torch.Generator:
        """The CPU generator of ``step``, seeded ``seed · 1000003 + step`` as the trainer's StepContext."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step)

    def indices(self, step: int) -> Tensor:
        """Prompt indices ``(n,)`` (int64, distinct) of ``step``: the first ``n`` of a random
        permutation of ``0..M-1`` drawn from :meth:`generator`."""
        return torch.randperm(self.num_prompts, generator=self.generator(step))[: self.prompts_per_step]

    def draw(self, prompts: PromptSet, step: int, repeat: int = 1) -> tuple[list[str], list[dict[str, Any]]]:
        """The prompts and metadata of ``step``'s global batch, each repeated ``repeat`` (the group
        size) times in a row: ``n · repeat`` entries, metadata dicts copied per entry.

        Raises:
            DataError: if ``prompts`` is not the size this sampler was built for.
        """
        if len(prompts) != self.num_prompts:
            raise DataError(f"the sampler was built for {self.num_prompts} prompts but {prompts.source!r} has {len(prompts)}")
        idx = [i for i in self.indices(step).tolist() for _ in range(repeat)]
        return prompts.select(idx)

    def local(self, step: int, rank: int, world_size: int) -> Tensor:
        """This process's share of :meth:`indices` (contiguous, in rank order).

        Raises:
            DataError: if ``n`` is not divisible by ``world_size``.
        """
        if self.prompts_per_step % world_size:
            raise DataError(f"{self.prompts_per_step} prompts per step do not split over {world_size} processes")
        k = self.prompts_per_step // world_size
        return self.indices(step)[rank * k : (rank + 1) * k]
