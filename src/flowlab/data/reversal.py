"""Synthetic reversal-curse data: entities, relations with inverses, and facts split by direction.

The protocol follows Wang & Sun ("Is the Reversal Curse a Binding Problem?", public code):

* entities are split into **group A** and **group B**; there are ``R`` relations ``r_i``, each with
  an inverse ``r_i^-1`` (relation ids ``0 .. R-1`` are the forward relations, ``R + i`` is the
  inverse of ``i``);
* facts pair entities of the same group: ``facts_per_entity`` random perfect matchings of the group,
  matching ``m`` using relations ``m, m + F, m + 2F, ...`` (``F = facts_per_entity``), so every
  query ``(head, relation)`` has exactly one answer in both directions;
* group A puts both ``(h, r, t)`` and ``(t, r^-1, h)`` in training (this teaches that relations
  invert); group B puts one direction (chosen 50/50 per fact) in training and holds the other out;
* entity names are one token each (``names="single"``) or two tokens ``<f_i> <l_j>`` whose first and
  last tokens are each shared by ``names_share`` entities (``names="multi"``, the entangled case).

Splits (lists of :class:`Fact`): ``train`` (everything trained on), ``seen`` (group A's training
facts), ``forward`` (group B's trained direction, also in ``train``) and ``reverse`` (group B's
held-out direction, never in ``train``).

:func:`write_reversal_data` / :func:`read_reversal_data` store a dataset as JSONL files in a folder.
The Berglund et al. text variant lives in :mod:`flowlab.data.reversal_text`; its public names are
re-exported here.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..fileio import atomic_open, atomic_write_json

from .base import DataError
from .reversal_text import (
    DESCRIPTION_TO_NAME,
    NAME_TO_DESCRIPTION,
    TextFact,
    build_word_level_tokenizer,
    generate_text_reversal,
    text_facts_from_records,
    text_facts_to_records,
)

__all__ = [
    "Fact",
    "ReversalSpec",
    "ReversalData",
    "ReversalFactDataset",
    "generate_reversal_data",
    "write_reversal_data",
    "read_reversal_data",
    "SPECIAL_TOKENS",
    "TextFact",
    "generate_text_reversal",
    "write_jsonl",
    "read_jsonl",
    "write_fact_splits",
    "read_fact_split",
    "build_word_level_tokenizer",
    "text_facts_to_records",
    "text_facts_from_records",
]

#: Special tokens at the start of every reversal vocabulary (ids 0, 1, 2).
SPECIAL_TOKENS = ("<pad>", "<mask>", "<bos>")

SPLITS = ("train", "seen", "forward", "reverse")


@dataclass(frozen=True)
class Fact:
    """One fact ``(head, relation, tail)``: entity ids and a relation id (``R + i`` is ``r_i^-1``)."""

    head: int
    relation: int
    tail: int


@dataclass
class ReversalSpec:
    """Sizes of a synthetic reversal dataset (the ``reversal:`` config keys of the same names).

    Attributes:
        num_entities_a: entities in group A (both directions trained); must be even.
        num_entities_b: entities in group B (one direction trained, the other held out); must be even.
        num_relations: forward relations ``R`` (each also has an inverse).
        facts_per_entity: facts each entity takes part in (``<= num_relations``).
        names: ``"single"`` (one token per entity) or ``"multi"`` (two shared tokens per entity).
        names_share: entities sharing each first / each last name token (``multi`` only).
        seed: generator seed.
    """

    num_entities_a: int = 2000
    num_entities_b: int = 1000
    num_relations: int = 6
    facts_per_entity: int = 1
    names: str = "multi"
    names_share: int = 10
    seed: int = 0

    def validate(self, prefix: str = "reversal") -> None:
        """Raise :class:`DataError` naming the offending ``<prefix>.<key>``."""
        for key in ("num_entities_a", "num_entities_b"):
            v = getattr(self, key)
            if v < 2 or v % 2:
                raise DataError(f"{prefix}.{key}: must be an even number >= 2 (entities are paired into facts), got {v}")
        if self.num_relations < 1:
            raise DataError(f"{prefix}.num_relations: must be >= 1, got {self.num_relations}")
        if not 1 <= self.facts_per_entity <= self.num_relations:
            raise DataError(
                f"{prefix}.facts_per_entity: must be between 1 and reversal.num_relations ({self.num_relations}), "
                f"got {self.facts_per_entity}"
            )
        if self.names not in ("single", "multi"):
            raise DataError(f"{prefix}.names: must be 'single' or 'multi', got {self.names!r}")
        if self.names == "multi":
            n = self.num_entities_a + self.num_entities_b
            if self.names_share < 2:
                raise DataError(f"{prefix}.names_share: must be >= 2 for multi-token names, got {self.names_share}")
            if n % self.names_share or n // self.names_share < self.names_share:
                raise DataError(
                    f"{prefix}.names_share: the {n} entities (num_entities_a + num_entities_b) must be a multiple of "
                    f"names_share ({self.names_share}) and at least names_share**2 ({self.names_share ** 2})"
                )


@dataclass
class ReversalData:
    """A generated (or read) reversal dataset.

    Attributes:
        spec: the sizes it was generated with.
        vocab: token strings; ids ``0, 1, 2`` are :data:`SPECIAL_TOKENS`.
        entity_tokens: token ids of each entity's name, ``entity_tokens[e]`` (all names have the same length).
        entity_group: ``"A"`` or ``"B"`` per entity.
        relation_names: ``2R`` names; ``relation_names[R + i]`` is the inverse of ``relation_names[i]``.
        splits: ``train``, ``seen``, ``forward``, ``reverse`` lists of :class:`Fact`.
    """

    spec: ReversalSpec
    vocab: list[str]
    entity_tokens: list[list[int]]
    entity_group: list[str]
    relation_names: list[str]
    splits: dict[str, list[Fact]] = field(default_factory=dict)

    @property
    def relation_tokens(self) -> list[int]:
        """The token id of each relation (every relation name is one vocabulary token)."""
        index = {t: i for i, t in enumerate(self.vocab)}
        return [index[r] for r in self.relation_names]

    @property
    def num_entities(self) -> int:
        return len(self.entity_tokens)

    @property
    def num_relations(self) -> int:
        """Forward relations ``R`` (there are ``2R`` relation ids)."""
        return len(self.relation_names) // 2

    @property
    def name_length(self) -> int:
        return len(self.entity_tokens[0])

    def entity_name(self, e: int) -> str:
        """``"<f3> <l17>"``: the entity's tokens joined by spaces."""
        return " ".join(self.vocab[t] for t in self.entity_tokens[e])

    def inverse(self, relation: int) -> int:
        """The id of ``relation``'s inverse."""
        R = self.num_relations
        return relation + R if relation < R else relation - R

    def facts_tensor(self, split: str) -> Tensor:
        """``(N, 3)`` long tensor of ``(head, relation, tail)`` rows of ``split``."""
        if split not in self.splits:
            raise DataError(f"unknown split {split!r}; available: {', '.join(self.splits)}")
        facts = self.splits[split]
        return torch.tensor([[f.head, f.relation, f.tail] for f in facts], dtype=torch.long).reshape(-1, 3)


# --------------------------------------------------------------------------- generation


def _names(spec: ReversalSpec, rng: random.Random) -> tuple[list[str], list[list[str]]]:
    """Entity name tokens: one ``<e_k>`` each, or ``<f_i> <l_j>`` with every first / last token shared by
    ``names_share`` entities (first ``i`` is paired with lasts ``i, i+1, ..., i+s-1`` mod ``n/s``)."""
    n = spec.num_entities_a + spec.num_entities_b
    if spec.names == "single":
        tokens = [f"<e{k}>" for k in range(n)]
        names = [[t] for t in tokens]
    else:
        s = spec.names_share
        k = n // s
        tokens = [f"<f{i}>" for i in range(k)] + [f"<l{j}>" for j in range(k)]
        names = [[f"<f{i}>", f"<l{(i + j) % k}>"] for i in range(k) for j in range(s)]
    rng.shuffle(names)  # which entity (and so which group) gets which name is random
    return tokens, names


def generate_reversal_data(spec: ReversalSpec) -> ReversalData:
    """Generate the synthetic protocol (see the module docstring); deterministic in ``spec``.

    Args:
        spec: sizes and seed.

    Returns:
        A :class:`ReversalData` with ``train``, ``seen``, ``forward`` and ``reverse`` splits.
    """
    spec.validate()
    rng = random.Random(spec.seed)
    name_vocab, names = _names(spec, rng)
    R, F = spec.num_relations, spec.facts_per_entity
    relation_names = [f"<r{i}>" for i in range(R)] + [f"<r{i}^-1>" for i in range(R)]
    vocab = [*SPECIAL_TOKENS, *relation_names, *name_vocab]
    index = {t: i for i, t in enumerate(vocab)}
    entity_tokens = [[index[t] for t in name] for name in names]
    n_a = spec.num_entities_a
    groups = ["A"] * n_a + ["B"] * spec.num_entities_b
    splits: dict[str, list[Fact]] = {s: [] for s in SPLITS}
    for group, ids in (("A", list(range(n_a))), ("B", list(range(n_a, len(groups))))):
        for m in range(F):
            order = ids[:]
            rng.shuffle(order)
            rels = list(range(m, R, F))
            for k in range(0, len(order), 2):
                h, t, r = order[k], order[k + 1], rng.choice(rels)
                fwd, bwd = Fact(h, r, t), Fact(t, r + R, h)
                if group == "A":
                    splits["seen"] += [fwd, bwd]
                else:
                    trained, held = (fwd, bwd) if rng.random() < 0.5 else (bwd, fwd)
                    splits["forward"].append(trained)
                    splits["reverse"].append(held)
    splits["train"] = splits["seen"] + splits["forward"]
    rng.shuffle(splits["train"])
    return ReversalData(
        spec=spec,
        vocab=vocab,
        entity_tokens=entity_tokens,
        entity_group=groups,
        relation_names=relation_names,
        splits=splits,
    )


# --------------------------------------------------------------------------- JSONL files


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Write ``records`` one JSON object per line (atomically: a temporary file, then rename)."""
    with atomic_open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file (blank lines skipped); :class:`DataError` naming the file and line if it is malformed."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {i} is not valid JSON ({e})") from None
    return out


def write_reversal_data(data: ReversalData, directory: str | os.PathLike) -> Path:
    """Write ``data`` to ``directory``: ``meta.json`` (spec, vocab, relations), ``entities.jsonl``
    (``{"id", "group", "name"}``) and one ``<split>.jsonl`` per split (``{"head", "relation", "tail"}``
    with entity ids and the relation *name*, plus readable ``head_name`` / ``tail_name``)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta = {"spec": asdict(data.spec), "vocab": data.vocab, "relation_names": data.relation_names}
    atomic_write_json(d / "meta.json", meta, indent=1)
    write_jsonl(d / "entities.jsonl", (
        {"id": e, "group": data.entity_group[e], "name": data.entity_name(e)} for e in range(data.num_entities)
    ))
    write_fact_splits(data, d)
    return d


def write_fact_splits(data: ReversalData, directory: Path) -> None:
    """One ``<split>.jsonl`` per split of ``data``: ``{"head", "relation", "tail"}`` (entity ids, the relation's
    name) plus readable ``head_name`` / ``tail_name``."""
    for split, facts in data.splits.items():
        write_jsonl(directory / f"{split}.jsonl", (
            {"head": f.head, "relation": data.relation_names[f.relation], "tail": f.tail,
             "head_name": data.entity_name(f.head), "tail_name": data.entity_name(f.tail)}
            for f in facts
        ))


def read_fact_split(path: Path, relation_names: Sequence[str]) -> list[Fact]:
    """The facts of one ``<split>.jsonl`` written by :func:`write_fact_splits` (:class:`DataError` naming the
    file and line of a missing file or an unknown relation)."""
    if not path.is_file():
        raise DataError(f"{path}: not found")
    rel_index = {r: i for i, r in enumerate(relation_names)}
    facts = []
    for i, rec in enumerate(read_jsonl(path), 1):
        if rec["relation"] not in rel_index:
            raise DataError(f"{path}: line {i} has unknown relation {rec['relation']!r}")
        facts.append(Fact(int(rec["head"]), rel_index[rec["relation"]], int(rec["tail"])))
    return facts


def read_reversal_data(directory: str | os.PathLike) -> ReversalData:
    """Read a dataset written by :func:`write_reversal_data` (:class:`DataError` naming the file at fault)."""
    d = Path(directory)
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: not found (write one with flowlab.data.reversal.write_reversal_data)")
    meta = json.loads(meta_path.read_text())
    vocab = meta["vocab"]
    index = {t: i for i, t in enumerate(vocab)}
    relation_names = meta["relation_names"]
    entities = read_jsonl(d / "entities.jsonl")
    entity_tokens, groups = [], []
    for i, rec in enumerate(entities):
        if rec["id"] != i:
            raise DataError(f"{d / 'entities.jsonl'}: entity ids must be 0..N-1 in order; line {i + 1} has id {rec['id']}")
        try:
            entity_tokens.append([index[t] for t in rec["name"].split()])
        except KeyError as e:
            raise DataError(f"{d / 'entities.jsonl'}: line {i + 1} uses token {e.args[0]!r} not in meta.json's vocab") from None
        groups.append(rec["group"])
    splits = {split: read_fact_split(d / f"{split}.jsonl", relation_names) for split in SPLITS}
    return ReversalData(
        spec=ReversalSpec(**meta["spec"]),
        vocab=vocab,
        entity_tokens=entity_tokens,
        entity_group=groups,
        relation_names=relation_names,
        splits=splits,
    )


class ReversalFactDataset(Dataset):
    """Facts of one split as a map-style dataset of ``{"head", "relation", "tail"}`` (long scalars).

    ``get_batch(indices)`` returns ``(B,)`` long tensors per key (the trainer's in-memory fast path).
    """

    def __init__(self, data: ReversalData, split: str = "train"):
        self.data = data
        self.split = split
        self.facts = data.facts_tensor(split)
        if len(self.facts) == 0:
            raise DataError(f"the reversal split {split!r} is empty")

    def __len__(self) -> int:
        return len(self.facts)

    def __getitem__(self, i: int) -> dict:
        h, r, t = self.facts[i]
        return {"head": h, "relation": r, "tail": t}

    def get_batch(self, indices: Tensor) -> dict:
        f = self.facts[indices]
        return {"head": f[:, 0], "relation": f[:, 1], "tail": f[:, 2]}
