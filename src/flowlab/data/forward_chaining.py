"""Parametric forward-chaining data: values on a modular ring linked by addition facts.

The protocol follows the arithmetic experiment of Wang & Sun ("Is the Reversal Curse a Binding
Problem?", public code ``data_gen_arithmetic.ipynb``), scaled to a CPU:

* **values** ``0 .. P-1`` of the ring ``Z_P`` (``P`` = ``modulus``, prime) are concepts of their own
  (entity ``<v>``); a few small **addends** ``k`` (``num_addends``) are the relations ``<+k>``;
* **core entities** (``core_multiplicity`` per value, ``<c_i>``) have a known value: the attribute
  fact ``(c, <=>, <v>)`` is trained for every one. The rule facts ``(c1, <+k>, c3)`` with
  ``value(c3) = value(c1) + k mod P`` exist for every pair of core entities of the two values; a
  fraction ``core_fraction`` of them is trained and the rest held out (split ``rule``);
* **problems**: for each branching factor ``b`` in ``branching_factors``, ``problems_per_factor``
  trees of depth ``D`` (``depth``). The root ``<x_j>`` (level 0) has ``b`` children, each child ``b``
  children, down to level ``D - 1`` (bridge entities ``<b{level}_{j}>``; ``D >= 2``); every node at the last
  level is linked to ``leaf_links`` core entities. Every edge is one addition fact: a child's value is
  its parent's ``± k``, and the fact is always written as an *addition*, ``(u, <+k>, w)`` with
  ``value(w) = value(u) + k``, whichever of the two is the parent. Only the core entities' values are
  ever stated; the value of a bridge or root must be **deduced** by chaining facts up from the leaves;
* **dead ends** (``drop_prob``), as in the paper: at every internal node ``round(drop_prob * b)`` of
  its children are *doomed* (all their descendants are cut), and at the last level
  ``round(drop_prob * b)`` of each node's children are *cut*; a cut node loses, with probability
  1/2 each, either the edge to its parent or its links to the core. Every root keeps at least one
  complete path to the core (``round(drop_prob * b) < b`` is checked).

A fact used to deduce a parent's value from its child's is used **forward** when it reads
``child + k = parent`` and **reversed** (a subtraction, ``parent = child - k``) when it reads
``parent + k = child``: subtraction is only available through reversal, never as a fact.

Queries (:class:`ChainQuery`) ask the value of every bridge and root whose value is determined by
the facts: ``(e, <=>, ?)``. ``hops`` is the length of the shortest chain of facts from a core entity
to ``e`` (root = ``D`` hops in a complete tree, a last-level node 1 hop); each query records one
such chain (start core entity and the signed operations), and ``answer = value(start) + sum(ops) mod P``.

The relation ids follow :class:`~flowlab.data.reversal.ReversalData`: ``R = num_addends + 1``
forward relations ``<+k_1> .. <+k_K>, <=>`` and their inverses ``<-k_i>`` and ``<=^-1>`` at
``R + i``. The inverses are never trained (as in the paper: subtraction is not a fact) — they exist so
that the reversal models' relation tables stay the same.
"""
from __future__ import annotations

import json
import os
import random
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .base import DataError
from .reversal import SPECIAL_TOKENS, Fact, ReversalData, read_fact_split, read_jsonl, write_fact_splits, write_jsonl

__all__ = [
    "ForwardChainingSpec",
    "ForwardChainingData",
    "ChainQuery",
    "generate_forward_chaining_data",
    "write_forward_chaining_data",
    "read_forward_chaining_data",
    "is_prime",
]

FACT_SPLITS = ("train", "attr", "rule", "problem")
ENTITY_KINDS = ("value", "core", "bridge", "root")


def is_prime(n: int) -> bool:
    """Whether ``n`` is prime (trial division; ``n`` is a ring size, small)."""
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


@dataclass
class ForwardChainingSpec:
    """Sizes of a forward-chaining dataset (the ``chain:`` config keys of the same names).

    Attributes:
        modulus: ring size ``P`` (prime; the paper uses 10007).
        num_addends: distinct addends ``k`` (relations ``<+k>``; the paper uses 2, drawn from 10..49).
        addend_max: addends are drawn from ``1 .. addend_max`` (``< modulus``).
        core_multiplicity: core entities per value (the paper: 10).
        core_fraction: fraction of the rule facts ``(c1, <+k>, c3)`` that is trained (the paper: 0.3).
        branching_factors: children per node of the problem trees, one set of trees per value.
        problems_per_factor: trees (roots) per branching factor (the paper: 20).
        depth: hops from the core to a root: bridge levels ``1 .. depth-1`` below the root (the paper: 3).
        drop_prob: fraction of doomed / cut children per node (the paper: 0.6).
        leaf_links: facts linking each last-level node to core entities (the paper: 6).
        seed: generator seed.
    """

    modulus: int = 97
    num_addends: int = 2
    addend_max: int = 20
    core_multiplicity: int = 3
    core_fraction: float = 0.3
    branching_factors: list[int] = field(default_factory=lambda: [2, 4, 6, 8])
    problems_per_factor: int = 20
    depth: int = 3
    drop_prob: float = 0.6
    leaf_links: int = 6
    seed: int = 0

    def validate(self, prefix: str = "chain") -> None:
        """Raise :class:`DataError` naming the offending ``<prefix>.<key>``."""
        if not is_prime(self.modulus):
            raise DataError(f"{prefix}.modulus: must be a prime (every addend then generates the ring), got {self.modulus}")
        if not 1 <= self.addend_max < self.modulus:
            raise DataError(f"{prefix}.addend_max: must be between 1 and modulus - 1 ({self.modulus - 1}), got {self.addend_max}")
        if not 1 <= self.num_addends <= self.addend_max:
            raise DataError(f"{prefix}.num_addends: must be between 1 and addend_max ({self.addend_max}), got {self.num_addends}")
        if self.core_multiplicity < 1:
            raise DataError(f"{prefix}.core_multiplicity: must be >= 1, got {self.core_multiplicity}")
        if not 0.0 < self.core_fraction <= 1.0:
            raise DataError(f"{prefix}.core_fraction: must be in (0, 1], got {self.core_fraction}")
        if not self.branching_factors:
            raise DataError(f"{prefix}.branching_factors: must list at least one branching factor")
        if len(set(self.branching_factors)) != len(self.branching_factors):
            raise DataError(f"{prefix}.branching_factors: repeated values in {self.branching_factors}")
        if not 0.0 <= self.drop_prob < 1.0:
            raise DataError(f"{prefix}.drop_prob: must be in [0, 1), got {self.drop_prob}")
        for b in self.branching_factors:
            if b < 1 or round(self.drop_prob * b) >= b:
                raise DataError(
                    f"{prefix}.branching_factors: {b} leaves no live child with drop_prob={self.drop_prob} "
                    f"(round(drop_prob * b) must be < b)"
                )
        if self.problems_per_factor < 1:
            raise DataError(f"{prefix}.problems_per_factor: must be >= 1, got {self.problems_per_factor}")
        if self.depth < 2:
            raise DataError(f"{prefix}.depth: must be >= 2 (a root and one level of bridges), got {self.depth}")
        if self.leaf_links < 1:
            raise DataError(f"{prefix}.leaf_links: must be >= 1, got {self.leaf_links}")


@dataclass(frozen=True)
class ChainQuery:
    """One question ``(entity, <=>, ?)`` whose answer needs a chain of facts.

    Attributes:
        entity: the bridge or root entity asked about.
        answer: the entity id of its value concept ``<v>`` (value ids are ``0 .. P-1``, so ``answer = v``).
        hops: length of the shortest chain of facts from a core entity to ``entity``.
        reversed_hops: facts of the recorded chain used in reverse (subtractions).
        level: 0 for a root, ``1 .. depth-1`` for bridges.
        branching_factor: of the tree it belongs to.
        problem: index of its tree (root) among all trees.
        start: the core entity the recorded chain starts from.
        ops: the signed addends of the chain, ``answer = value(start) + sum(ops) mod P``.
    """

    entity: int
    answer: int
    hops: int
    reversed_hops: int
    level: int
    branching_factor: int
    problem: int
    start: int
    ops: tuple[int, ...]


@dataclass
class ForwardChainingData(ReversalData):
    """A generated (or read) forward-chaining dataset; a :class:`ReversalData` whose entities are
    value concepts, core entities, bridges and roots.

    Attributes (beyond :class:`ReversalData`'s; ``entity_group`` holds each entity's kind):
        addends: the addends ``k``; relation ``i < K`` is ``<+addends[i]>``, relation ``K`` is ``<=>``.
        values: the true value of every entity (for a value concept, itself), ``values[e]``.
        problem_of: the tree of each bridge / root, ``-1`` for value concepts and core entities.
        queries: the :class:`ChainQuery` of every bridge and root whose value the facts determine.

    Splits: ``train`` (everything trained on: ``attr`` + trained rule facts + ``problem``), ``attr``
    (``(c, <=>, <v>)`` of every core entity), ``rule`` (held-out rule facts between core entities) and
    ``problem`` (the facts of the trees, all trained).
    """

    addends: list[int] = field(default_factory=list)
    values: list[int] = field(default_factory=list)
    problem_of: list[int] = field(default_factory=list)
    queries: list[ChainQuery] = field(default_factory=list)

    @property
    def modulus(self) -> int:
        return self.spec.modulus

    @property
    def attribute_relation(self) -> int:
        """Relation id of ``<=>`` (value-of)."""
        return len(self.addends)

    @property
    def kinds(self) -> list[str]:
        """``value``, ``core``, ``bridge`` or ``root`` per entity."""
        return self.entity_group

    def value_entity(self, v: int) -> int:
        """Entity id of the value concept ``<v>`` (the value itself)."""
        return v % self.modulus

    def queries_tensor(self) -> Tensor:
        """``(Q, 3)`` rows ``(entity, <=>, answer)`` of every query."""
        a = self.attribute_relation
        return torch.tensor([[q.entity, a, q.answer] for q in self.queries], dtype=torch.long).reshape(-1, 3)


# --------------------------------------------------------------------------- generation


class _Builder:
    """Accumulates entities and facts while the trees are grown."""

    def __init__(self, spec: ForwardChainingSpec, rng: random.Random):
        self.spec, self.rng, self.P = spec, rng, spec.modulus
        self.addends = sorted(rng.sample(range(1, spec.addend_max + 1), spec.num_addends))
        self.names: list[str] = [f"<{v}>" for v in range(self.P)]
        self.kinds: list[str] = ["value"] * self.P
        self.values: list[int] = list(range(self.P))
        self.problem_of: list[int] = [-1] * self.P
        m = spec.core_multiplicity
        self.core_of_value = [[self.P + k * self.P + v for k in range(m)] for v in range(self.P)]
        for k in range(m):
            for v in range(self.P):
                self.names.append(f"<c{k * self.P + v}>")
                self.kinds.append("core")
                self.values.append(v)
                self.problem_of.append(-1)
        self.levels: list[int] = [-1] * (self.P * (m + 1))
        self.problem_facts: list[Fact] = []
        self.bridge_count = 0

    def _entity(self, name: str, kind: str, value: int, problem: int, level: int = -1) -> int:
        self.levels.append(level)
        self.names.append(name)
        self.kinds.append(kind)
        self.values.append(value % self.P)
        self.problem_of.append(problem)
        return len(self.names) - 1

    def fact(self, a: int, b: int, addend_index: int, sign: int) -> None:
        """The addition fact between ``a`` and ``b`` where ``value(b) = value(a) + sign * k``."""
        self.problem_facts.append(Fact(a, addend_index, b) if sign > 0 else Fact(b, addend_index, a))

    def random_step(self) -> tuple[int, int]:
        """``(addend index, sign)``: which addend and whether it is added (+1) or subtracted (-1)."""
        return self.rng.randrange(len(self.addends)), 1 if self.rng.random() < 0.5 else -1

    def grow(self, root: int, problem: int, b: int) -> None:
        """Grow the tree under ``root`` (level 0) with branching factor ``b`` (module docstring)."""
        spec, rng = self.spec, self.rng
        n_drop = round(spec.drop_prob * b)
        # (node, level, doomed): doomed nodes have every last-level descendant cut
        frontier = [(root, 0, False)]
        while frontier:
            node, level, doomed = frontier.pop(0)
            dropped = set(rng.sample(range(b), n_drop))
            for c in range(b):
                i, sign = self.random_step()
                child_value = self.values[node] + sign * self.addends[i]
                child = self._entity(f"<b{level + 1}_{self.bridge_count}>", "bridge", child_value, problem, level + 1)
                self.bridge_count += 1
                if level + 1 < spec.depth - 1:
                    self.fact(node, child, i, sign)
                    frontier.append((child, level + 1, doomed or c in dropped))
                    continue
                cut = doomed or c in dropped
                drop_edge = cut and rng.random() < 0.5
                if not drop_edge:
                    self.fact(node, child, i, sign)
                if cut and not drop_edge:
                    continue  # cut forward: no links to the core, a dead end
                for _ in range(spec.leaf_links):
                    i, sign = self.random_step()
                    core = rng.choice(self.core_of_value[(self.values[child] + sign * self.addends[i]) % self.P])
                    self.fact(child, core, i, sign)


def _chains(data: ForwardChainingData, levels: list[int]) -> list[ChainQuery]:
    """Breadth-first search from the core over the problem facts: the shortest chain to every node
    (``levels``: each entity's level in its tree)."""
    P, addends = data.modulus, data.addends
    adjacency: dict[int, list[tuple[int, int]]] = {}
    for f in data.splits["problem"]:
        k = addends[f.relation]
        adjacency.setdefault(f.head, []).append((f.tail, -k))  # head = tail - k: reversed use
        adjacency.setdefault(f.tail, []).append((f.head, +k))  # tail = head + k: forward use
    parent: dict[int, tuple[int, int]] = {}
    dist: dict[int, int] = {}
    queue = deque()
    for e, kind in enumerate(data.kinds):
        if kind == "core" and e in adjacency:
            dist[e] = 0
            queue.append(e)
    while queue:
        u = queue.popleft()
        for w, _ in adjacency.get(u, ()):
            if w in dist or data.kinds[w] == "core":
                continue
            # the fact read from u to w: value(w) = value(u) + op
            op = next(o for x, o in adjacency[w] if x == u)
            dist[w] = dist[u] + 1
            parent[w] = (u, op)
            queue.append(w)
    queries = []
    for e in sorted(dist):
        if data.kinds[e] == "core":
            continue
        ops, node = [], e
        while node in parent:
            node, op = parent[node]
            ops.append(op)
        ops.reverse()  # from the core entity outwards
        root_index = data.problem_of[e]
        queries.append(ChainQuery(
            entity=e, answer=data.values[e], hops=dist[e], reversed_hops=sum(o < 0 for o in ops), level=levels[e],
            branching_factor=data.spec.branching_factors[root_index // data.spec.problems_per_factor],
            problem=root_index, start=node, ops=tuple(ops),
        ))
        assert (data.values[node] + sum(ops)) % P == data.values[e], "chain does not reproduce the value"
    return queries


def generate_forward_chaining_data(spec: ForwardChainingSpec) -> ForwardChainingData:
    """Generate the forward-chaining protocol (module docstring); deterministic in ``spec``.

    Returns:
        A :class:`ForwardChainingData` with ``train``, ``attr``, ``rule`` and ``problem`` splits and the queries.
    """
    spec.validate()
    rng = random.Random(spec.seed)
    b = _Builder(spec, rng)
    P, K = spec.modulus, spec.num_addends
    # the rule facts between core entities, a fraction of them trained
    rule = [Fact(c1, i, c3) for v in range(P) for i, k in enumerate(b.addends)
            for c1 in b.core_of_value[v] for c3 in b.core_of_value[(v + k) % P]]
    rng.shuffle(rule)
    n_rule = max(1, round(spec.core_fraction * len(rule)))
    # the problem trees, roots with values drawn at random
    problem = 0
    for bf in spec.branching_factors:
        for _ in range(spec.problems_per_factor):
            root = b._entity(f"<x{problem}>", "root", rng.randrange(P), problem, 0)
            b.grow(root, problem, bf)
            problem += 1
    relation_names = [f"<+{k}>" for k in b.addends] + ["<=>"] + [f"<-{k}>" for k in b.addends] + ["<=^-1>"]
    vocab = [*SPECIAL_TOKENS, *relation_names, *b.names]
    offset = len(SPECIAL_TOKENS) + len(relation_names)
    attr = [Fact(c, K, b.values[c]) for v in range(P) for c in b.core_of_value[v]]
    train = attr + rule[:n_rule] + b.problem_facts
    rng.shuffle(train)
    data = ForwardChainingData(
        spec=spec, vocab=vocab, entity_tokens=[[offset + e] for e in range(len(b.names))], entity_group=b.kinds,
        relation_names=relation_names,
        splits={"train": train, "attr": attr, "rule": rule[n_rule:], "problem": b.problem_facts},
        addends=b.addends, values=b.values, problem_of=b.problem_of,
    )
    data.queries = _chains(data, b.levels)
    return data


# --------------------------------------------------------------------------- JSONL files


def write_forward_chaining_data(data: ForwardChainingData, directory: str | os.PathLike) -> Path:
    """Write ``data`` to ``directory``: ``meta.json`` (spec, vocab, relations, addends),
    ``entities.jsonl`` (``{"id", "name", "kind", "value", "problem"}``), one ``<split>.jsonl`` per fact
    split (``{"head", "relation", "tail"}`` with the relation's name, plus readable names) and
    ``queries.jsonl`` (the :class:`ChainQuery` fields plus ``entity_name`` / ``answer_name``)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta = {"kind": "forward_chaining", "spec": asdict(data.spec), "vocab": data.vocab,
            "relation_names": data.relation_names, "addends": data.addends}
    tmp = d / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, d / "meta.json")
    write_jsonl(d / "entities.jsonl", (
        {"id": e, "name": data.entity_name(e), "kind": data.kinds[e], "value": data.values[e], "problem": data.problem_of[e]}
        for e in range(data.num_entities)
    ))
    write_fact_splits(data, d)
    write_jsonl(d / "queries.jsonl", (
        {**asdict(q), "ops": list(q.ops), "entity_name": data.entity_name(q.entity), "answer_name": data.entity_name(q.answer)}
        for q in data.queries
    ))
    return d


def read_forward_chaining_data(directory: str | os.PathLike) -> ForwardChainingData:
    """Read a dataset written by :func:`write_forward_chaining_data` (:class:`DataError` naming the file at fault)."""
    d = Path(directory)
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: not found (write one with flowlab.data.forward_chaining.write_forward_chaining_data)")
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") != "forward_chaining":
        raise DataError(f"{meta_path}: not a forward-chaining dataset (kind {meta.get('kind')!r})")
    vocab = meta["vocab"]
    index = {t: i for i, t in enumerate(vocab)}
    entity_tokens, kinds, values, problem_of = [], [], [], []
    for i, rec in enumerate(read_jsonl(d / "entities.jsonl")):
        if rec["id"] != i:
            raise DataError(f"{d / 'entities.jsonl'}: entity ids must be 0..N-1 in order; line {i + 1} has id {rec['id']}")
        if rec["kind"] not in ENTITY_KINDS:
            raise DataError(f"{d / 'entities.jsonl'}: line {i + 1} has unknown kind {rec['kind']!r}")
        if rec["name"] not in index:
            raise DataError(f"{d / 'entities.jsonl'}: line {i + 1} uses token {rec['name']!r} not in meta.json's vocab")
        entity_tokens.append([index[rec["name"]]])
        kinds.append(rec["kind"])
        values.append(int(rec["value"]))
        problem_of.append(int(rec["problem"]))
    splits = {split: read_fact_split(d / f"{split}.jsonl", meta["relation_names"]) for split in FACT_SPLITS}
    fields = ChainQuery.__dataclass_fields__
    queries = [ChainQuery(**{k: (tuple(v) if k == "ops" else v) for k, v in rec.items() if k in fields})
               for rec in read_jsonl(d / "queries.jsonl")]
    spec = ForwardChainingSpec(**meta["spec"])
    return ForwardChainingData(
        spec=spec, vocab=vocab, entity_tokens=entity_tokens, entity_group=kinds, relation_names=meta["relation_names"],
        splits=splits, addends=list(meta["addends"]), values=values, problem_of=problem_of, queries=queries,
    )

