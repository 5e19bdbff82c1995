"""Synthetic reversal data: protocol invariants (held-out facts never trained, group A both directions,
shared-token names, unique answers), JSONL round trip, validation, and the Berglund-style text variant."""
from collections import Counter

import pytest

from flowlab.data import DataError
from flowlab.data import reversal, reversal_text
from flowlab.data.reversal import (
    Fact,
    ReversalSpec,
    generate_reversal_data,
    read_jsonl,
    read_reversal_data,
    write_jsonl,
    write_reversal_data,
)
from flowlab.data.reversal_text import (
    build_word_level_tokenizer,
    generate_text_reversal,
    text_facts_from_records,
    text_facts_to_records,
)

SMALL = dict(num_entities_a=120, num_entities_b=80, num_relations=4, names_share=5)


def _queries(facts):
    return {(f.head, f.relation) for f in facts}


@pytest.mark.parametrize("facts_per_entity", [1, 2])
def test_split_sizes_and_held_out_reverse_never_trained(facts_per_entity):
    d = generate_reversal_data(ReversalSpec(**SMALL, facts_per_entity=facts_per_entity))
    F = facts_per_entity
    s = d.splits
    assert len(s["seen"]) == 120 * F  # 60 pairs per matching, both directions
    assert len(s["forward"]) == len(s["reverse"]) == 40 * F
    assert Counter(s["train"]) == Counter(s["seen"] + s["forward"])
    train = set(s["train"])
    for f in s["reverse"]:
        assert f not in train
        assert (f.head, f.relation) not in _queries(s["train"])  # the question itself is never trained
        # ... but the same fact in the other direction is
        assert Fact(f.tail, d.inverse(f.relation), f.head) in set(s["forward"])
    assert not set(s["reverse"]) & set(s["seen"])


def test_group_a_has_both_directions_and_groups_do_not_mix():
    d = generate_reversal_data(ReversalSpec(**SMALL, facts_per_entity=2))
    seen = set(d.splits["seen"])
    for f in seen:
        assert Fact(f.tail, d.inverse(f.relation), f.head) in seen
        assert d.entity_group[f.head] == d.entity_group[f.tail] == "A"
    for split in ("forward", "reverse"):
        for f in d.splits[split]:
            assert d.entity_group[f.head] == d.entity_group[f.tail] == "B"
    # group B: each fact trained in one direction only, and both orientations occur
    fwd = d.splits["forward"]
    assert all(Fact(f.tail, d.inverse(f.relation), f.head) not in set(fwd) for f in fwd)
    R = d.num_relations
    assert 0 < sum(f.relation < R for f in fwd) < len(fwd)


def test_every_query_has_one_answer_and_every_entity_its_facts():
    d = generate_reversal_data(ReversalSpec(**SMALL, facts_per_entity=3))
    everything = d.splits["seen"] + d.splits["forward"] + d.splits["reverse"]
    answers = {}
    for f in everything:
        assert answers.setdefault((f.head, f.relation), f.tail) == f.tail
    # every entity is the head of exactly facts_per_entity queries (counting both directions)
    heads = Counter(f.head for f in everything)
    assert set(heads.values()) == {3} and len(heads) == d.num_entities


def test_multi_token_names_share_tokens():
    d = generate_reversal_data(ReversalSpec(**SMALL, names="multi"))
    names = [tuple(e) for e in d.entity_tokens]
    assert len(set(names)) == d.num_entities  # unique names
    assert {len(n) for n in names} == {2}
    firsts, lasts = Counter(n[0] for n in names), Counter(n[1] for n in names)
    assert set(firsts.values()) == {5} and set(lasts.values()) == {5}  # each shared by names_share entities
    assert not set(firsts) & set(lasts)
    assert all(d.vocab[t].startswith("<f") for t in firsts) and all(d.vocab[t].startswith("<l") for t in lasts)
    # tokens are shared across groups A and B (the entangled case)
    groups_of = {}
    for e, n in enumerate(names):
        groups_of.setdefault(n[0], set()).add(d.entity_group[e])
    assert any(g == {"A", "B"} for g in groups_of.values())
    # relations and entities never share tokens
    assert not {t for n in names for t in n} & set(d.relation_tokens)


def test_single_token_names():
    d = generate_reversal_data(ReversalSpec(**SMALL, names="single"))
    assert {len(e) for e in d.entity_tokens} == {1}
    assert len({e[0] for e in d.entity_tokens}) == d.num_entities
    assert len(d.vocab) == 3 + 2 * 4 + d.num_entities


def test_seeded_and_deterministic():
    a = generate_reversal_data(ReversalSpec(**SMALL, seed=1))
    b = generate_reversal_data(ReversalSpec(**SMALL, seed=1))
    c = generate_reversal_data(ReversalSpec(**SMALL, seed=2))
    assert a.splits == b.splits and a.entity_tokens == b.entity_tokens
    assert a.splits["train"] != c.splits["train"]


def test_jsonl_round_trip(tmp_path):
    d = generate_reversal_data(ReversalSpec(**SMALL, facts_per_entity=2))
    write_reversal_data(d, tmp_path / "data")
    back = read_reversal_data(tmp_path / "data")
    assert back.splits == d.splits
    assert back.entity_tokens == d.entity_tokens and back.vocab == d.vocab
    assert back.entity_group == d.entity_group and back.relation_names == d.relation_names and back.spec == d.spec
    rec = read_jsonl(tmp_path / "data" / "reverse.jsonl")[0]
    f = d.splits["reverse"][0]
    assert rec == {"head": f.head, "relation": d.relation_names[f.relation], "tail": f.tail,
                   "head_name": d.entity_name(f.head), "tail_name": d.entity_name(f.tail)}
    (tmp_path / "data" / "train.jsonl").write_text('{"head": 1, "relation": "<r9>", "tail": 2}\n')
    with pytest.raises(DataError, match="train.jsonl: line 1 has unknown relation"):
        read_reversal_data(tmp_path / "data")
    (tmp_path / "data" / "train.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="train.jsonl: line 1 is not valid JSON"):
        read_reversal_data(tmp_path / "data")
    with pytest.raises(DataError, match="meta.json"):
        read_reversal_data(tmp_path / "nowhere")


@pytest.mark.parametrize("bad, key", [
    (dict(num_entities_a=7), "reversal.num_entities_a"),
    (dict(num_entities_b=0), "reversal.num_entities_b"),
    (dict(facts_per_entity=5), "reversal.facts_per_entity"),
    (dict(names_share=7), "reversal.names_share"),
    (dict(names="triple"), "reversal.names"),
])
def test_validation_names_the_key(bad, key):
    with pytest.raises(DataError, match=key):
        generate_reversal_data(ReversalSpec(**{**SMALL, **bad}))


# --------------------------------------------------------------------------- text variant


def test_text_variant_names_importable_from_old_path():
    for name in reversal_text.__all__:
        assert getattr(reversal, name) is getattr(reversal_text, name)


def test_text_variant_splits_and_held_out_templates():
    people, facts = generate_text_reversal(num_people=30, held_out_templates=2, seed=0)
    assert len(people) == 30 and len({p["name"] for p in people}) == 30
    train = [f for f in facts if f.split == "train"]
    pairs = {(f.prompt, f.completion) for f in train}
    assert all((f.prompt, f.completion) not in pairs for f in facts if f.split != "train")
    for f in facts:
        p = people[f.person]
        if f.split == "test_reverse":
            assert p["subset"] != "both"
            assert f.order == ("d2n" if p["subset"] == "name_to_description" else "n2d")
        if f.order == "n2d":  # the name is in the prompt and the description in the completion
            assert p["name"] in f.prompt and f.completion.startswith(p["description"])
        else:
            assert p["description"] in f.prompt and f.completion.startswith(p["name"])
    # a name_to_description person is never trained description-first, and vice versa
    for f in train:
        subset = people[f.person]["subset"]
        assert not (subset == "name_to_description" and f.order == "d2n")
        assert not (subset == "description_to_name" and f.order == "n2d")
    # held-out templates: the trained-order test prompts use templates never seen in training
    train_templates = {f.prompt.replace(people[f.person]["name"], "{name}").replace(people[f.person]["description"], "{d}")
                       for f in train}
    for f in facts:
        if f.split == "test_same":
            t = f.prompt.replace(people[f.person]["name"], "{name}").replace(people[f.person]["description"], "{d}")
            assert t not in train_templates
    assert Counter(f.split for f in facts) == {"train": 20 * 6 + 10 * 12, "test_same": 20 * 2 + 10 * 4, "test_reverse": 20 * 8}
    assert text_facts_from_records(text_facts_to_records(facts)) == facts
    with pytest.raises(DataError, match="num_people"):
        generate_text_reversal(num_people=31)


def test_word_level_tokenizer_built_locally(tmp_path):
    _, facts = generate_text_reversal(num_people=12, seed=1)
    texts = [f"{f.prompt} {f.completion}" for f in facts]
    tok = build_word_level_tokenizer(texts, tmp_path / "tok")
    words = {w for t in texts for w in t.split()}
    assert len(tok) == len(words) + 4  # every word plus <pad> <unk> <bos> <eos>: not an empty Hub stand-in
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    ids = tok(texts[0])["input_ids"]
    assert len(ids) == len(texts[0].split()) and tok.unk_token_id not in ids
    assert tok.decode(ids) == texts[0]
    assert tok("zzz-unknown")["input_ids"] == [tok.unk_token_id]
    write_jsonl(tmp_path / "facts.jsonl", text_facts_to_records(facts))
    assert text_facts_from_records(read_jsonl(tmp_path / "facts.jsonl")) == facts
