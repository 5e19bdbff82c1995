"""Berglund et al.'s text variant of the reversal curse ("The Reversal Curse", 2023).

Fictitious people with "name is description" / "description is name" templates, some templates
held out: :func:`generate_text_reversal` builds the facts, :func:`build_word_level_tokenizer` a
``transformers`` tokenizer for them, entirely locally, and :func:`text_facts_to_records` /
:func:`text_facts_from_records` convert them to and from JSON-ready dicts (store them with
:func:`flowlab.data.reversal.write_jsonl`).
"""
from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .base import DataError

__all__ = [
    "NAME_TO_DESCRIPTION",
    "DESCRIPTION_TO_NAME",
    "TextFact",
    "generate_text_reversal",
    "build_word_level_tokenizer",
    "text_facts_to_records",
    "text_facts_from_records",
]

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
    """:class:`TextFact` list as JSON-ready dicts (for :func:`flowlab.data.reversal.write_jsonl`)."""
    return [asdict(f) for f in facts]


def text_facts_from_records(records: Sequence[dict]) -> list[TextFact]:
    """Inverse of :func:`text_facts_to_records`."""
    return [TextFact(**r) for r in records]
