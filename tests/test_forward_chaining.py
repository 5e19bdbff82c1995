"""Forward-chaining data (flowlab.data.forward_chaining), the ``chain:`` recipe setting and eval/forward_chaining.py."""
from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch
from conftest import load_eval_script

from flowlab.data.base import DataError
from flowlab.data.forward_chaining import (
    ForwardChainingSpec,
    generate_forward_chaining_data,
    is_prime,
    read_forward_chaining_data,
    write_forward_chaining_data,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(modulus=31, num_addends=2, addend_max=9, core_multiplicity=2, branching_factors=[2, 3, 5],
             problems_per_factor=4, depth=3, seed=3)


@pytest.fixture(scope="module")
def data():
    return generate_forward_chaining_data(ForwardChainingSpec(**SMALL))


def test_is_prime():
    assert [n for n in range(30) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]


def test_every_fact_is_modular_arithmetic(data):
    P, K = data.modulus, data.attribute_relation
    for split in ("train", "attr", "rule", "problem"):
        for f in data.splits[split]:
            if f.relation == K:  # (c, <=>, <v>): a core entity and its value concept
                assert data.kinds[f.head] == "core" and data.kinds[f.tail] == "value"
                assert f.tail == data.values[f.head]
            else:  # (u, <+k>, w): value(w) = value(u) + k mod P
                assert f.relation < K, "subtraction (an inverse relation) is never a fact"
                assert data.values[f.tail] == (data.values[f.head] + data.addends[f.relation]) % P


def test_only_core_values_are_stated_and_held_out_facts_are_never_trained(data):
    train = set(data.splits["train"])
    assert set(data.splits["attr"]) <= train and set(data.splits["problem"]) <= train
    assert not train & set(data.splits["rule"]), "a held-out rule fact is in training"
    K = data.attribute_relation
    stated = {f.head for f in train if f.relation == K}
    assert stated == {e for e, k in enumerate(data.kinds) if k == "core"}
    # no trained fact asks for a bridge's or root's value, nor states any reverse (subtraction) fact
    assert all(f.relation < K or data.kinds[f.head] == "core" for f in train)
    assert all(f.relation <= K for f in train)
    rule_trained = [f for f in train if data.kinds[f.head] == data.kinds[f.tail] == "core"]
    n_rule = len(rule_trained) + len(data.splits["rule"])
    P, m, A = data.modulus, data.spec.core_multiplicity, len(data.addends)
    assert n_rule == P * A * m * m  # every pair of core entities of the two values, once
    assert len(rule_trained) == round(data.spec.core_fraction * n_rule)


def test_queries_answers_are_the_modular_arithmetic_of_their_chains(data):
    P = data.modulus
    assert data.queries, "no queries"
    for q in data.queries:
        assert data.kinds[q.start] == "core" and data.kinds[q.entity] in ("bridge", "root")
        assert len(q.ops) == q.hops and q.reversed_hops == sum(o < 0 for o in q.ops)
        assert all(abs(o) in data.addends for o in q.ops)
        assert q.answer == (data.values[q.start] + sum(q.ops)) % P == data.values[q.entity]


def test_queries_match_an_independent_forward_chaining(data):
    """Deduce values round by round from the core (a fact determines one end from the other) and
    compare the values and the round each entity became known with the generator's queries."""
    P = data.modulus
    known = {e: data.values[e] for e, k in enumerate(data.kinds) if k == "core"}
    rounds = {}
    r = 0
    while True:
        r += 1
        new = {}
        for f in data.splits["problem"]:
            k = data.addends[f.relation]
            if f.head in known and f.tail not in known:
                new[f.tail] = (known[f.head] + k) % P
            if f.tail in known and f.head not in known:
                new[f.head] = (known[f.tail] - k) % P  # the fact used in reverse: a subtraction
        if not new:
            break
        for e, v in new.items():
            rounds[e] = r
        known.update(new)
    by_entity = {q.entity: q for q in data.queries}
    assert set(by_entity) == set(rounds)
    for e, q in by_entity.items():
        assert known[e] == q.answer and rounds[e] == q.hops
    # every root is solvable, through exactly `depth` facts
    roots = [e for e, k in enumerate(data.kinds) if k == "root"]
    assert len(roots) == len(data.spec.branching_factors) * data.spec.problems_per_factor
    assert all(by_entity[e].hops == data.spec.depth and by_entity[e].level == 0 for e in roots)
    assert Counter(by_entity[e].branching_factor for e in roots) == {b: 4 for b in data.spec.branching_factors}
    # some chains need reversed facts and some need none
    assert any(q.reversed_hops > 0 for q in data.queries) and any(q.reversed_hops == 0 for q in data.queries)


def test_tree_shape_and_dead_ends(data):
    """Each root has `b` children; round(drop_prob * b) of them lead nowhere in their subtrees."""
    problem_edges = Counter()
    for f in data.splits["problem"]:
        if "root" in (data.kinds[f.head], data.kinds[f.tail]):
            root = f.head if data.kinds[f.head] == "root" else f.tail
            problem_edges[root] += 1
    spec = data.spec
    for i, e in enumerate(e for e, k in enumerate(data.kinds) if k == "root"):
        assert problem_edges[e] == spec.branching_factors[i // spec.problems_per_factor]


def test_deterministic_and_seeded():
    a = generate_forward_chaining_data(ForwardChainingSpec(**SMALL))
    b = generate_forward_chaining_data(ForwardChainingSpec(**SMALL))
    c = generate_forward_chaining_data(ForwardChainingSpec(**{**SMALL, "seed": 4}))
    assert a.splits == b.splits and a.queries == b.queries and a.values == b.values
    assert a.splits["train"] != c.splits["train"]


def test_write_read_round_trip(data, tmp_path):
    write_forward_chaining_data(data, tmp_path / "d")
    back = read_forward_chaining_data(tmp_path / "d")
    assert back.splits == data.splits and back.queries == data.queries
    assert back.values == data.values and back.kinds == data.kinds and back.addends == data.addends
    assert back.vocab == data.vocab and back.entity_tokens == data.entity_tokens and back.spec == data.spec
    first = json.loads((tmp_path / "d" / "queries.jsonl").read_text().splitlines()[0])
    assert first["answer_name"] == f"<{first['answer']}>"


@pytest.mark.parametrize("key,value,match", [
    ("modulus", 91, "chain.modulus"), ("branching_factors", [1], "chain.branching_factors"),
    ("addend_max", 31, "chain.addend_max"), ("depth", 1, "chain.depth"), ("core_fraction", 0.0, "chain.core_fraction"),
])
def test_bad_sizes_name_the_key(key, value, match):
    with pytest.raises(DataError, match=match):
        generate_forward_chaining_data(ForwardChainingSpec(**{**SMALL, key: value}))


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="meta.json"):
        read_forward_chaining_data(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"kind": "reversal"}))
    with pytest.raises(DataError, match="not a forward-chaining dataset"):
        read_forward_chaining_data(tmp_path)


def test_config_error_names_the_key(tmp_path):
    from flowlab.recipes import Trainer, load_config
    from flowlab.train.config import ConfigError

    cfg = load_config(os.path.join(ROOT, "configs", "chain_jepa.yaml"), [f"output_dir={tmp_path}", "chain.modulus=12"])
    with pytest.raises(ConfigError, match="chain.modulus"):
        Trainer(cfg).train()


TINY = ["chain.modulus=11", "chain.addend_max=3", "chain.core_multiplicity=2", "chain.core_fraction=0.5",
        "chain.branching_factors=[2,3]", "chain.problems_per_factor=2", "reversal.hidden_size=32", "reversal.num_heads=2",
        "reversal.num_layers=1", "train.batch_size=64", "train.log_every=1000", "train.checkpoint_every=1000",
        "train.warmup_steps=10", "train.report_to=none", "eval.enabled=false"]


def _eval_script():
    return load_eval_script("forward_chaining")


def test_tiny_end_to_end_both_models_and_eval_json(tmp_path):
    """Train both models a few steps on a tiny ring through the Trainer, reload them, evaluate with the
    eval script and check its JSON layout; the JEPA has learned the stated core values."""
    from flowlab.jepa.chain import evaluate_forward_chaining
    from flowlab.jepa.recipe import load_reversal_model
    from flowlab.recipes import Trainer, load_config

    torch.manual_seed(0)
    runs = {}
    for key, config, extra in (("ar", "chain_ar.yaml", ["train.max_steps=30"]),
                               ("jepa_memory", "chain_jepa.yaml", ["train.max_steps=300", "reversal.hidden_size=64"])):
        out = tmp_path / key
        cfg = load_config(os.path.join(ROOT, "configs", config), [f"output_dir={out}", *TINY, *extra])
        Trainer(cfg).train()
        runs[key] = str(out)
    jepa = load_reversal_model(os.path.join(runs["jepa_memory"], "model"))
    data = read_forward_chaining_data(os.path.join(runs["jepa_memory"], "model", "data"))
    assert data.modulus == 11 and data.spec.branching_factors == [2, 3]
    metrics = evaluate_forward_chaining(jepa, data)
    assert metrics["attr"] >= 0.9, metrics  # the trained core values are learned
    # the saved model answers by name through the public API: a core entity's value
    core = next(e for e, k in enumerate(data.kinds) if k == "core")
    name, _ = jepa.answer(data.entity_name(core), "<=>", top_k=1)[0]
    assert name == f"<{data.values[core]}>"

    mod = _eval_script()
    out_json = tmp_path / "chain.json"
    assert mod.main(["--runs", runs["ar"], runs["jepa_memory"], "--json", str(out_json)]) == 0
    res = json.loads(out_json.read_text())
    assert set(res) == {"protocol", "paper", "models", "total_seconds"}
    assert res["paper"]["o3-mini_solved_of_20"] == {"10": 17, "20": 4, "30": 0, "40": 0}
    assert res["protocol"]["modulus"] == 11 and res["protocol"]["roots"] == 4
    assert set(res["models"]) == {"ar", "jepa_memory"}
    for r in res["models"].values():
        assert set(r["by_branching_factor"]) == {"2", "3"}
        assert set(r["facts"]) == {"attr", "problem", "rule"}
        for v in r["by_branching_factor"].values():
            assert v["roots_total"] == 2 and 0 <= v["roots_solved"] <= 2 and 0.0 <= v["roots"] <= 1.0
        assert set(r["by_hops"]) >= {"1", "2", "3"}
        assert sum(h["count"] for h in r["by_hops"].values()) == res["protocol"]["queries"]
        assert 0.0 <= r["queries"] <= 1.0 and r["parameters"] > 0
    assert res["models"]["jepa_memory"]["facts"]["attr"] == pytest.approx(metrics["attr"])


def _tiny_jepa_and_problem_facts(tmp_path, n: int = 8):
    """An untrained JEPA + memory built by the recipe from the tiny chain config, and the heads, relations and
    tails ``(n,)`` of its first ``n`` problem facts."""
    from flowlab.jepa.recipe import ReversalJEPARecipe
    from flowlab.recipes import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "chain_jepa.yaml"), [f"output_dir={tmp_path}", *TINY])
    recipe = ReversalJEPARecipe(cfg)
    torch.manual_seed(0)
    model = recipe.build_model(recipe.build_dataset())
    f = recipe.data.facts_tensor("problem")[:n]
    return model, (f[:, 0], f[:, 1], f[:, 2])


def test_concept_regression_loss_is_one_minus_cosine_and_reaches_the_tail_concept(tmp_path):
    """The regression term equals mean(1 - cos(P(c_h, c_r), c_t)) and, with no stop-gradient, moves the
    tail's memory slot as well as the predictor."""
    from flowlab.jepa.chain import concept_regression_loss

    model, (h, r, t) = _tiny_jepa_and_problem_facts(tmp_path)
    loss = concept_regression_loss(model, h, r, t)
    p = model.predict(model.entity_concepts(h), model.relation_concepts(r))
    c = model.entity_concepts(t)
    expected = (1 - (p * c).sum(-1) / (p.norm(dim=-1) * c.norm(dim=-1))).mean()
    assert torch.allclose(loss, expected, atol=1e-6) and 0.0 <= float(loss) <= 2.0
    loss.backward()
    slot_grad = model.memory.values.grad  # slot e holds entity e's concept
    only_tails = [int(e) for e in t.unique() if e not in set(h.tolist())]
    assert only_tails and all(slot_grad[e].abs().sum() > 0 for e in only_tails)
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in model.predictor.parameters())


def test_concept_regression_without_predictor_grad_moves_only_concepts(tmp_path):
    """``predictor_grad=False``: the same value, no gradient into the predictor or its output norm, but the
    tail's and the head's memory slots still get one; requires_grad is restored afterwards."""
    from flowlab.jepa.chain import concept_regression_loss

    model, (h, r, t) = _tiny_jepa_and_problem_facts(tmp_path)
    with_grad = concept_regression_loss(model, h, r, t)
    loss = concept_regression_loss(model, h, r, t, predictor_grad=False)
    assert torch.allclose(loss, with_grad)
    loss.backward()
    frozen = [*model.predictor.parameters(), *model.output_norm.parameters()]
    assert all(p.grad is None for p in frozen) and all(p.requires_grad for p in frozen)
    slot_grad = model.memory.values.grad
    assert all(slot_grad[int(e)].abs().sum() > 0 for e in t.unique())
    assert all(slot_grad[int(e)].abs().sum() > 0 for e in h.unique())


def test_eval_summary_is_mean_and_sample_std_over_seeds():
    """``summarize`` over single-seed results: per-seed values kept, mean and sample standard deviation."""
    mod = _eval_script()

    def result(seed, solved, hop1):
        return {"protocol": {"seed": seed}, "models": {"jepa_memory": {
            "by_branching_factor": {"2": {"roots_solved": solved, "roots_total": 10}},
            "by_hops": {"1": {"accuracy": hop1}}, "queries": hop1, "facts": {"attr": 1.0},
            "train_cpu_seconds": 100.0 + seed}}}

    s = mod.summarize([result(0, 1, 0.5), result(1, 2, 0.7), result(2, 6, 0.9)])["jepa_memory"]
    assert s["roots_solved"]["2"]["values"] == [1, 2, 6] and s["roots_solved"]["2"]["mean"] == pytest.approx(3.0)
    assert s["roots_solved"]["2"]["std"] == pytest.approx(((4 + 1 + 9) / 2) ** 0.5)
    assert s["by_hops"]["1"]["mean"] == pytest.approx(0.7) and s["by_hops"]["1"]["std"] == pytest.approx(0.2)
    assert s["roots_total"] == {"2": 10} and s["train_cpu_seconds"]["mean"] == pytest.approx(101.0)
