"""JEPA concepts bound to (entity, role) (``binding="relation"``): keys and patches, the claim that a fact and its
reverse then share concepts no other fact uses (no cycles with several facts per entity), the memory's
direct read against its top-1 search, loss and scores against brute force, save/load and training."""
import math

import pytest
import torch
from torch.nn import functional as F

from flowlab.data.reversal import ReversalSpec, generate_reversal_data
from flowlab.jepa import JEPAConceptModel, JEPAConfig
from flowlab.jepa.recipe import evaluate_reversal, load_reversal_model
from flowlab.train import ConfigError, load_config

SMALL = dict(num_entities_a=60, num_entities_b=40, num_relations=3, names_share=5)


def _data(**kw):
    return generate_reversal_data(ReversalSpec(**{**SMALL, **kw}))


def _jepa(d, memory=False, binding="relation", **kw):
    torch.manual_seed(0)
    return JEPAConceptModel(JEPAConfig(
        vocab_size=len(d.vocab), hidden_size=16, num_heads=2, encoder_layers=1, predictor_layers=1, memory=memory,
        binding=binding, max_patch_len=3, vocab=d.vocab, entity_tokens=d.entity_tokens, relation_names=d.relation_names,
        relation_tokens=d.relation_tokens, **kw))


def _components(pairs):
    """Connected components (as vertex sets) of the undirected graph with edges ``pairs``."""
    parent: dict = {}

    def find(a):
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs:
        parent[find(a)] = find(b)
    comps: dict = {}
    for v in list(parent):
        comps.setdefault(find(v), set()).add(v)
    return list(comps.values())


def test_keys_patches_and_inverse():
    d = _data(facts_per_entity=2)
    m = _jepa(d)
    two_r = len(d.relation_names)
    assert m.num_entity_keys == d.num_entities * two_r
    e, r = torch.tensor([0, 7, 99]), torch.tensor([0, 5, 3])
    keys = m.entity_keys(e, r)
    assert keys.tolist() == [0 * two_r + 0, 7 * two_r + 5, 99 * two_r + 3]
    toks, lengths = m._key_patches(keys)
    for k, (ent, rel) in enumerate(zip(e.tolist(), r.tolist())):  # the name's tokens, then the role's relation token
        assert toks[k].tolist() == [*d.entity_tokens[ent], d.relation_tokens[rel]]
    assert lengths.tolist() == [d.name_length + 1] * 3
    rels = torch.arange(two_r)
    assert m.inverse_relation(rels).tolist() == [d.inverse(i) for i in range(two_r)]
    assert torch.equal(m.inverse_relation(m.inverse_relation(rels)), rels)
    plain = _jepa(d, binding="entity")
    assert torch.equal(plain.entity_keys(e, r), e) and plain.num_entity_keys == d.num_entities


@pytest.mark.parametrize("facts_per_entity", [1, 2, 3])
def test_a_fact_and_its_reverse_share_concepts_no_other_fact_uses(facts_per_entity):
    """Why the binding removes the cycles: with entity concepts and several facts per entity the facts chain entities
    into cycles (one map per relation must return to the start around each); with (entity, role) concepts every
    component of the concept graph is one fact and its reverse, as with one fact per entity."""
    d = _data(facts_per_entity=facts_per_entity)
    m = _jepa(d)
    facts = torch.cat([d.facts_tensor("train"), d.facts_tensor("reverse")])
    h, r, t = facts.unbind(1)
    bound = list(zip(m.entity_keys(h, r).tolist(), m.entity_keys(t, m.inverse_relation(r)).tolist()))
    comps = _components(bound)
    assert all(len(c) == 2 for c in comps) and len(comps) == len(facts) // 2
    # each component is the fact and its reverse: (h, r) -> (t, r^-1) and (t, r^-1) -> (h, r)
    assert len(set(bound)) == len(facts) and all((b, a) in set(bound) for a, b in bound)
    entity_comps = _components(zip(h.tolist(), t.tolist()))
    edges = len({frozenset(p) for p in zip(h.tolist(), t.tolist())})
    cycles = edges - sum(len(c) - 1 for c in entity_comps)  # independent cycles of the entity graph
    assert (cycles == 0) == (facts_per_entity == 1)


@pytest.mark.parametrize("binding", ["entity", "relation"])
def test_memory_direct_read_is_the_top_one_read(binding):
    d = _data(facts_per_entity=2)
    m = _jepa(d, memory=True, binding=binding)
    toks, lengths = m._slot_patches()
    assert torch.equal(m.memory.lookup(m._mean_embedding(toks, lengths)), torch.arange(len(toks)))  # one slot each
    keys = torch.randint(0, m.num_entity_keys, (50,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m.key_concepts(keys), m.encode_patches(*m._key_patches(keys)))


@pytest.mark.parametrize("memory", [False, True])
def test_loss_and_scores_match_brute_force(memory):
    d = _data(facts_per_entity=2)
    m = _jepa(d, memory=memory).eval()
    f = d.facts_tensor("train")[:12]
    h, r, t = f.unbind(1)
    out = m(h, r, t)
    two_r = len(d.relation_names)
    hk, tk = h * two_r + r, t * two_r + (r + two_r // 2) % two_r
    cand = sorted(set(hk.tolist()) | set(tk.tolist()))
    rels = sorted(set(r.tolist()))
    c_cand = torch.stack([m.encode_patches(*m._key_patches(torch.tensor([k])))[0] for k in cand])
    c_rel = m.relation_concepts(torch.tensor(rels))
    pred = m.predict(torch.stack([c_cand[cand.index(k)] for k in hk.tolist()]), c_rel[[rels.index(x) for x in r.tolist()]])
    logits = F.normalize(pred, dim=-1) @ F.normalize(torch.cat([c_cand, c_rel]), dim=-1).t() / m.config.temperature
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, torch.tensor([cand.index(k) for k in tk.tolist()])))
    # scores: every entity in the answer's role r^-1, softmax over entities
    q = d.facts_tensor("reverse")[:6]
    scores = m.rank_entities(q[:, 0], q[:, 1])
    for i, (hh, rr) in enumerate(q[:, :2].tolist()):
        inv = (rr + two_r // 2) % two_r
        p = m.predict(m.key_concepts(torch.tensor([hh * two_r + rr])), m.relation_concepts(torch.tensor([rr])))
        c_all = m.key_concepts(torch.arange(d.num_entities) * two_r + inv)
        ref = (F.normalize(p, dim=-1) @ F.normalize(c_all, dim=-1).t() / m.config.temperature).log_softmax(-1)[0]
        torch.testing.assert_close(scores[i], ref)


@pytest.mark.parametrize("memory", [False, True])
def test_save_load_and_answer(tmp_path, memory):
    d = _data(facts_per_entity=2)
    m = _jepa(d, memory=memory).eval()
    m.save_pretrained(tmp_path / "m")
    loaded = load_reversal_model(tmp_path / "m")
    assert loaded.config.binding == "relation"
    f = d.facts_tensor("reverse")
    torch.testing.assert_close(loaded.rank_entities(f[:, 0], f[:, 1]), m.rank_entities(f[:, 0], f[:, 1]))
    ranked = loaded.answer(d.entity_name(int(f[0, 0])), d.relation_names[int(f[0, 1])], top_k=None)
    assert len(ranked) == d.num_entities and math.isclose(sum(p for _, p in ranked), 1.0, rel_tol=1e-4)


def test_a_trained_bound_jepa_answers_its_facts_with_several_facts_per_entity():
    d = _data(facts_per_entity=2)
    m = _jepa(d, memory=True)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    train = d.facts_tensor("train")
    for _ in range(150):
        out = m(train[:, 0], train[:, 1], train[:, 2], negatives=torch.arange(m.num_entity_keys))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    res = evaluate_reversal(m, d)
    assert res["seen"] > 0.9 and res["forward"] > 0.9, res


def test_bad_binding_is_named():
    d = _data()
    with pytest.raises(ValueError, match="binding"):
        _jepa(d, binding="fact")
    with pytest.raises(ConfigError, match="reversal.binding"):
        load_config(None, ["recipe=reversal_jepa", "reversal.binding=fact"])


def test_benchmark_facts_per_entity_setting(tmp_path):
    """``eval/reversal.py --facts-per-entity F``: F facts, F times the steps, (entity, role) concepts for the JEPA models
    only; a real (tiny) training run through it reads back the facts per entity from the saved data."""
    import os

    from conftest import load_eval_script

    bench = load_eval_script("reversal")
    assert bench.facts_overrides("ar", 4, 1000) == ["reversal.facts_per_entity=4", "train.max_steps=4000"]
    assert bench.facts_overrides("jepa_memory", 2, 1000) == [
        "reversal.facts_per_entity=2", "train.max_steps=2000", "reversal.binding=relation"]
    tiny = ["reversal.num_entities_a=60", "reversal.num_entities_b=40", "reversal.num_relations=3", "reversal.names_share=5",
            "reversal.hidden_size=16", "reversal.num_heads=2", "reversal.predictor_layers=1", "train.batch_size=16",
            "train.warmup_steps=1", "train.max_steps=3", "train.checkpoint_every=0"]
    runs = bench.train_all(str(tmp_path), tiny, ["jepa_memory"], facts_per_entity=2)
    from flowlab.data.reversal import read_reversal_data

    run_dir = runs["jepa_memory"][0]
    model = load_reversal_model(os.path.join(run_dir, "model"))
    assert model.config.binding == "relation"
    assert read_reversal_data(os.path.join(run_dir, "model", "data")).spec.facts_per_entity == 2
    with pytest.raises(SystemExit):
        bench.main(["--runs", run_dir, "--facts-per-entity", "2"])
