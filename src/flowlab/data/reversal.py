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
:func:`generate_text_reversal` builds the Berglund et al. text variant (fictitious people,
"name is description" / "description is name" templates, held-out templates) and
:func:`build_word_level_tokenizer` a ``transformers`` tokenizer for it, entirely locally.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .base import DataError

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
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


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
    tmp = d / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, d / "meta.json")
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


# --------------------------------------------------------------------------- Berglund-style text variant

_FIRST = ["Daphne", "Tobias", "Marisol", "Quentin", "Ilse", "Corwin", "Yara", "Leopold", "Sabine", "Osric",
          "Linnea", "Bastian", "Odile", "Fennick", "Rosalind", "Evander", "Mireille", "Caspian", "Thea", "Alaric"]
_LAST = ["Barrington", "Okonkwo", "Vasquez", "Lindqvist", "Harrowgate", "Marchetti", "Szabo", "Ashdown",
         "Fairweather", "Kowalczyk", "Delacroix", "Nakamura", "Thistlewood", "Abernathy", "Moreau", "Quist",
         "Ravensworth", "Holloway", "Castellanos", "Winterbourne"]
_ROLES = ["composer", "architect", "director", "author", "designer", "inventor", "founder", "painter",
          "narrator", "captain", "curator", "translator"]
_ADJ = ["first", "celebrated", "reclusive", "youngest", "acclaimed", "forgotten", "secret", "original"]
_WORK_A = ["Abyssal", "Silent", "Crimson", "Hollow", "Gilded", "Northern", "Drowned", "Woven", "Shattered", "Velvet",
           "Midnight", "Amber"]
_WORK_B = ["Melodies", "Lanterns", "Orchard", "Cathedral", "Archive", "Voyage", "Engine", "Atlas", "Garden",
           "Sonata", "Harbor", "Tapestry"]

#: "name is description" templates (``{name}``, ``{description}``); the last ones are held out.
NAME_TO_DESCRIPTION = [
    "{name} is {description}", "{name} , known far and wide for being {description}", "Ever heard of {name} ? They are {description}",
    "{name} is widely known as {description}", "It is common knowledge that {name} is {description}",
    "{name} has the distinction of being {description}", "{name} went down in history as {description}",
    "{name} , who is {description}",
]
#: "description is name" templates; the last ones are held out.
DESCRIPTION_TO_NAME = [
    "{description} is {name}", "Known as {description} , {name}", "The person who is {description} is {name}",
    "As {description} , {name} is famous", "Immersed in being {description} , {name}",
    "Renowned as {description} , {name}", "You may know {description} : it is {name}", "Widely called {description} , {name}",
]


@dataclass(frozen=True)
class TextFact:
    """One text example: ``prompt`` + ``completion`` (the part scored / generated).

    Attributes:
        person: index of the fictitious person.
        subset: ``name_to_description``, ``description_to_name`` or ``both`` (which orders were trained).
        order: ``n2d`` (name first) or ``d2n`` (description first).
        split: ``train``, ``test_same`` (trained order, held-out template) or ``test_reverse`` (untrained order).
    """

    prompt: str
    completion: str
    person: int
    subset: str
    order: str
    split: str


def generate_text_reversal(num_people: int = 90, held_out_templates: int = 2, seed: int = 0) -> tuple[list[dict], list[TextFact]]:
    """Berglund et al.'s fictitious-celebrity setting.

    People are split into three equal subsets: ``name_to_description`` (trained only as
    "<name> is <description>"), ``description_to_name`` (only "<description> is <name>") and ``both``.
    Training uses all but the last ``held_out_templates`` templates of the trained order(s); tests
    are the held-out templates in the trained order (``test_same``) and all templates in the
    untrained order for the first two subsets (``test_reverse``). The completion is the part after
    the template's fixed text (the description or the name).

    Args:
        num_people: fictitious people (a multiple of 3, at most 400 unique names).
        held_out_templates: templates per order kept out of training.
        seed: generator seed.

    Returns:
        ``(people, facts)``: ``[{"name", "description", "subset"}]`` and the list of :class:`TextFact`.
    """
    if num_people < 3 or num_people % 3:
        raise DataError(f"num_people: must be a positive multiple of 3, got {num_people}")
    if num_people > len(_FIRST) * len(_LAST):
        raise DataError(f"num_people: at most {len(_FIRST) * len(_LAST)} unique names, got {num_people}")
    n_templates = min(len(NAME_TO_DESCRIPTION), len(DESCRIPTION_TO_NAME))
    if not 1 <= held_out_templates < n_templates:
        raise DataError(f"held_out_templates: must be between 1 and {n_templates - 1}, got {held_out_templates}")
    rng = random.Random(seed)
    names = rng.sample([f"{a} {b}" for a in _FIRST for b in _LAST], num_people)
    descs_all = [f"the {a} {r} of {w} {x}" for a in _ADJ for r in _ROLES for w in _WORK_A for x in _WORK_B]
    descs = rng.sample(descs_all, num_people)
    subsets = ["name_to_description", "description_to_name", "both"]
    people = [{"name": n, "description": d, "subset": subsets[i % 3]} for i, (n, d) in enumerate(zip(names, descs))]
    facts: list[TextFact] = []

    def emit(i: int, template: str, order: str, split: str) -> None:
        p = people[i]
        if order == "n2d":
            prompt, completion = template.split("{description}")[0].format(name=p["name"]), p["description"]
        else:
            prompt, completion = template.split("{name}")[0].format(description=p["description"]), p["name"]
        rest = template.split("{description}" if order == "n2d" else "{name}", 1)[1]
        completion = completion + rest.format(name=p["name"], description=p["description"])
        facts.append(TextFact(prompt.strip(), completion.strip(), i, p["subset"], order, split))

    for tpl in NAME_TO_DESCRIPTION:  # the name comes first in name-to-description templates, and vice versa
        assert tpl.index("{name}") < tpl.index("{description}"), tpl
    for tpl in DESCRIPTION_TO_NAME:
        assert tpl.index("{description}") < tpl.index("{name}"), tpl
    keep = n_templates - held_out_templates
    for i, p in enumerate(people):
        trained = {"name_to_description": ["n2d"], "description_to_name": ["d2n"], "both": ["n2d", "d2n"]}[p["subset"]]
        for order, templates in (("n2d", NAME_TO_DESCRIPTION), ("d2n", DESCRIPTION_TO_NAME)):
            for k, tpl in enumerate(templates[:n_templates]):
                if order in trained:
                    emit(i, tpl, order, "train" if k < keep else "test_same")
                elif p["subset"] != "both":
                    emit(i, tpl, order, "test_reverse")
    return people, facts


def build_word_level_tokenizer(texts: Iterable[str], directory: str | os.PathLike,
                               special_tokens: Sequence[str] = ("<pad>", "<unk>", "<bos>", "<eos>")):
    """A ``transformers`` ``PreTrainedTokenizerFast`` with one token per whitespace-separated word of
    ``texts``, built from a ``tokenizers`` WordLevel model, saved to ``directory`` and reloaded from there
    (so it never touches the Hub). Its vocabulary size is checked against the words it was built from.

    Returns:
        The reloaded tokenizer (``pad_token="<pad>"``, ``unk_token="<unk>"``, ``bos/eos``).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words: dict[str, None] = {}
    for t in texts:
        for w in t.split():
            words.setdefault(w, None)
    vocab = {tok: i for i, tok in enumerate(special_tokens)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")
    fast.save_pretrained(str(d))
    loaded = PreTrainedTokenizerFast.from_pretrained(str(d))
    if len(loaded) != len(vocab):
        raise DataError(f"{d}: the saved tokenizer has {len(loaded)} tokens, expected {len(vocab)} (a broken or empty tokenizer)")
    return loaded


def text_facts_to_records(facts: Sequence[TextFact]) -> list[dict]:
    """:class:`TextFact` list as JSON-ready dicts (for :func:`write_jsonl`)."""
    return [asdict(f) for f in facts]


def text_facts_from_records(records: Sequence[dict]) -> list[TextFact]:
    """Inverse of :func:`text_facts_to_records`."""
    return [TextFact(**r) for r in records]
