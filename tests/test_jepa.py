"""JEPA reversal models: ranking metrics against hand-computed cases, the GPT-2 baseline's scoring
against brute force, the JEPA loss and memory, save/load round trips, ``answer()``, training through
``train.py`` with exact resume, and two CPU processes matching one."""
import json
import math
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import launch_two_cpu_processes, load_eval_script, run_checked
from flowlab.data.reversal import ReversalSpec, generate_reversal_data
from flowlab.jepa import JEPAConceptModel, JEPAConfig, ReversalGPT2, ReversalGPT2Config, ranking_metrics
from flowlab.jepa.metrics import gold_ranks
from flowlab.jepa.recipe import build_reversal_data, evaluate_reversal, load_reversal_model
from flowlab.errors import ConfigError
from flowlab.recipes import load_config

SMALL = dict(num_entities_a=60, num_entities_b=40, num_relations=3, names_share=5)
TINY_RUN = ["reversal.num_entities_a=60", "reversal.num_entities_b=40", "reversal.num_relations=3", "reversal.names_share=5",
            "reversal.hidden_size=16", "reversal.num_heads=2", "reversal.num_layers=1", "reversal.encoder_layers=1",
            "reversal.predictor_layers=1", "reversal.mlp_ratio=2", "reversal.eval_max_queries=20", "train.batch_size=16",
            "train.warmup_steps=1", "train.log_every=2", "train.report_to=none", "eval.every=0"]


def _data(**kw):
    return generate_reversal_data(ReversalSpec(**{**SMALL, **kw}))


def _vocab(d):
    return dict(vocab=d.vocab, entity_tokens=d.entity_tokens, relation_names=d.relation_names, relation_tokens=d.relation_tokens)


def _gpt2(d, **kw):
    torch.manual_seed(0)
    cfg = ReversalGPT2Config(vocab_size=len(d.vocab), n_embd=16, n_layer=2, n_head=2, n_positions=2 * d.name_length + 2,
                             bos_token_id=2, eos_token_id=None, pad_token_id=0, loss_type="ForCausalLM", **kw, **_vocab(d))
    return ReversalGPT2(cfg)


def _jepa(d, memory=False, **kw):
    torch.manual_seed(0)
    return JEPAConceptModel(JEPAConfig(vocab_size=len(d.vocab), hidden_size=16, num_heads=2, encoder_layers=1,
                                       predictor_layers=1, memory=memory, **kw, **_vocab(d)))


# --------------------------------------------------------------------------- metrics


def test_ranking_metrics_hand_computed():
    scores = torch.tensor([[0.9, 0.1, 0.0, 0.5],   # gold 0: rank 1
                           [0.2, 0.8, 0.3, 0.1],   # gold 2: rank 2 (0.8 above)
                           [0.4, 0.3, 0.2, 0.1],   # gold 3: rank 4
                           [0.5, 0.5, 0.1, 0.0]])  # gold 1: tied with entity 0 -> rank 2 (ties count against gold)
    gold = torch.tensor([0, 2, 3, 1])
    assert gold_ranks(scores, gold).tolist() == [1, 2, 4, 2]
    m = ranking_metrics(scores, gold)
    assert m["accuracy"] == pytest.approx(0.25)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 2) / 4)
    constant = ranking_metrics(torch.zeros(3, 5), torch.tensor([0, 1, 2]))  # no free wins from ties
    assert constant["accuracy"] == 0.0 and constant["mrr"] == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="scores must be"):
        ranking_metrics(torch.zeros(3), torch.zeros(3))


# --------------------------------------------------------------------------- GPT-2 baseline


def test_gpt2_scores_match_brute_force_and_loss_is_on_the_answer_only():
    d = _data()
    m = _gpt2(d).eval()
    f = d.facts_tensor("train")[:3]
    scores = m.rank_entities(f[:, 0], f[:, 1])
    N = d.num_entities
    prefix, _ = m.fact_inputs(f[:, 0], f[:, 1])
    full = torch.cat([prefix.repeat_interleave(N, 0), m.entity_token_ids.repeat(3, 1)], 1)  # every entity after every query
    with torch.no_grad():
        lp = m(input_ids=full).logits.log_softmax(-1)
    P = prefix.shape[1]
    brute = sum(lp[:, P - 1 + k].gather(1, full[:, P + k : P + k + 1])[:, 0] for k in range(d.name_length))
    torch.testing.assert_close(scores, brute.view(3, N).log_softmax(-1), atol=1e-5, rtol=1e-5)
    # labels: -100 everywhere but the tail's tokens; the loss is the mean CE of those tokens
    ids, labels = m.fact_inputs(f[:, 0], f[:, 1], f[:, 2])
    assert (labels[:, : P] == -100).all() and torch.equal(labels[:, P:], m.entity_token_ids[f[:, 2]])
    with torch.no_grad():
        loss = m.fact_loss(f[:, 0], f[:, 1], f[:, 2]).loss
        lp = m(input_ids=ids).logits.log_softmax(-1)
    manual = -torch.stack([lp[:, P - 1 + k].gather(1, ids[:, P + k, None])[:, 0] for k in range(d.name_length)]).mean()
    torch.testing.assert_close(loss, manual)


def test_gpt2_without_positional_embeddings_keeps_them_zero():
    d = _data()
    m = _gpt2(d, position_embeddings=False)
    assert not m.transformer.wpe.weight.requires_grad and m.transformer.wpe.weight.abs().sum() == 0
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    f = d.facts_tensor("train")[:8]
    m.fact_loss(f[:, 0], f[:, 1], f[:, 2]).loss.backward()
    opt.step()
    assert m.transformer.wpe.weight.abs().sum() == 0
    assert _gpt2(d).transformer.wpe.weight.abs().sum() > 0  # the default keeps them


# --------------------------------------------------------------------------- JEPA


def test_jepa_loss_is_cross_entropy_over_batch_concepts():
    d = _data()
    m = _jepa(d, temperature=0.5)
    f = d.facts_tensor("train")[:6]
    h, r, t = f[:, 0], f[:, 1], f[:, 2]
    out = m(h, r, t)
    cand = torch.unique(torch.cat([h, t]))
    rels = torch.unique(r)
    assert out.logits.shape == (6, len(cand) + len(rels))
    c = m.entity_concepts(cand)
    pred = m.predict(m.entity_concepts(h), m.relation_concepts(r))
    allc = torch.cat([c, m.relation_concepts(rels)])
    logits = torch.nn.functional.cosine_similarity(pred[:, None], allc[None], dim=-1) / 0.5
    target = torch.tensor([(cand == x).nonzero().item() for x in t])
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, target), atol=1e-5, rtol=1e-5)
    # further negatives only add candidates
    more = m(h, r, t, negatives=torch.arange(d.num_entities))
    assert more.logits.shape[1] == d.num_entities + len(rels) and more.loss > out.loss - 1e-6


def test_memory_reads_one_slot_per_concept_and_trains_only_values():
    d = _data()
    m = _jepa(d, memory=True)
    toks, lengths = m._slot_patches()
    slots = m.memory.lookup(m._mean_embedding(toks, lengths))
    assert torch.equal(slots, torch.arange(len(toks)))  # every entity, relation and the mask has its own slot
    assert not m.token_embed.weight.requires_grad
    f = d.facts_tensor("train")[:8]
    m(f[:, 0], f[:, 1], f[:, 2]).loss.backward()
    g = m.memory.values.grad
    used = torch.unique(torch.cat([f[:, 0], f[:, 2]]))
    assert (g[used].abs().sum(1) > 0).all()
    unused = torch.ones(d.num_entities, dtype=torch.bool)
    unused[used] = False
    assert (g[: d.num_entities][unused] == 0).all()  # disentangled: other entities' concepts untouched
    torch.testing.assert_close(m.entity_concepts(torch.tensor([3])), m.concept_norm(m.memory.values[3:4]))


@pytest.mark.parametrize("kind", ["ar", "jepa", "jepa_memory"])
def test_save_load_round_trip_gives_identical_answers(tmp_path, kind):
    d = _data()
    m = _gpt2(d) if kind == "ar" else _jepa(d, memory=kind == "jepa_memory")
    m.eval()
    f = d.facts_tensor("reverse")
    m.save_pretrained(tmp_path / "m")
    loaded = load_reversal_model(tmp_path / "m")
    assert type(loaded) is type(m)
    torch.testing.assert_close(loaded.rank_entities(f[:, 0], f[:, 1]), m.rank_entities(f[:, 0], f[:, 1]))
    name = d.entity_name(int(f[0, 0]))
    assert loaded.answer(name, d.relation_names[int(f[0, 1])], top_k=5) == m.answer(name, d.relation_names[int(f[0, 1])], top_k=5)
    assert evaluate_reversal(loaded, d) == evaluate_reversal(m, d)
    from transformers import AutoModel  # registered on import of flowlab.jepa: a pushed model loads by Auto class

    auto = AutoModel.from_pretrained(tmp_path / "m")
    assert type(auto) is type(m) and auto.answer(name, 0, top_k=3) == m.answer(name, 0, top_k=3)


def test_answer_ranks_all_entities():
    d = _data()
    m = _jepa(d).eval()
    h, r = 5, 1
    ranked = m.answer(h, r, top_k=None)
    assert len(ranked) == d.num_entities and len({n for n, _ in ranked}) == d.num_entities
    probs = [p for _, p in ranked]
    assert probs == sorted(probs, reverse=True) and math.isclose(sum(probs), 1.0, rel_tol=1e-4)
    scores = m.rank_entities(torch.tensor([h]), torch.tensor([r]))[0]
    assert ranked[0][0] == d.entity_name(int(scores.argmax()))
    # names and ids are interchangeable; top_k truncates
    assert m.answer(d.entity_name(h), d.relation_names[r], top_k=3) == ranked[:3]
    assert m.answer(d.entity_name(h).split(), r, top_k=1) == ranked[:1]
    with pytest.raises(KeyError, match="unknown entity"):
        m.answer("<f0> <f0>", r)
    with pytest.raises(KeyError, match="unknown relation"):
        m.answer(h, "<r99>")
    with pytest.raises(ValueError, match="out of range"):
        m.answer(d.num_entities, r)


def test_entity_concepts_cache_is_reused_and_invalidated_by_parameter_updates():
    """answer() reuses the entity concepts between queries, and any weight change recomputes them."""
    d = _data()
    m = _jepa(d).eval()
    fresh = lambda: m.entity_concepts().detach()  # noqa: E731  (uncached, with autograd on)
    h, r = 5, 1
    first = m.answer(h, r, top_k=None)
    with torch.no_grad():
        cached = m.all_entity_concepts()
        assert m.all_entity_concepts() is cached  # a cache hit: same tensor, no recomputation
    assert torch.equal(cached, fresh())
    assert m.answer(h, r, top_k=None) == first

    # an optimiser step (in-place update of the parameters) invalidates it
    m.train()
    train = d.facts_tensor("train")
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m(train[:, 0], train[:, 1], train[:, 2]).loss.backward()
    opt.step()
    m.eval()
    with torch.no_grad():
        after_step = m.all_entity_concepts()
    assert after_step is not cached and not torch.equal(after_step, cached)
    assert torch.equal(after_step, fresh())
    assert m.answer(h, r, top_k=None) != first

    # in eval mode, without any train()/eval() call: no_grad in-place updates and load_state_dict
    with torch.no_grad():
        m.answer(h, r)
        m.token_embed.weight.mul_(0.5)
        assert torch.equal(m.all_entity_concepts(), fresh())
        m.load_state_dict(_jepa(d).state_dict())
        assert torch.equal(m.all_entity_concepts(), fresh())
    assert m.answer(h, r, top_k=None) == first  # the original weights are back: the original answers

    # writes that bypass the version counter (p.data, as EMA weight swaps do) are caught too
    with torch.no_grad():
        m.all_entity_concepts()
    m.token_embed.weight.data.mul_(2.0)
    with torch.no_grad():
        assert torch.equal(m.all_entity_concepts(), fresh())
    # so is an EMA copy kept in eval mode whose weights are swapped in through .data (the trainer's evaluation)
    ema = _jepa(d).eval()
    before = ema.answer(h, r, top_k=None)
    for dst, src in zip(ema.parameters(), m.parameters()):
        dst.data.copy_(src.data)
    assert ema.answer(h, r, top_k=None) == m.answer(h, r, top_k=None) != before
    # in training mode the concepts are never cached and carry gradients
    m.train()
    assert m.all_entity_concepts().requires_grad


def test_a_trained_jepa_answers_its_facts():
    """Behaviour, not just shapes: a few hundred steps on 100 entities learn the trained facts."""
    d = _data()
    m = _jepa(d, temperature=0.1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    train = d.facts_tensor("train")
    for _ in range(150):
        out = m(train[:, 0], train[:, 1], train[:, 2], negatives=torch.arange(d.num_entities))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    res = evaluate_reversal(m, d)
    assert res["seen"] > 0.9 and res["forward"] > 0.9, res
    f = d.splits["forward"][0]
    assert m.answer(f.head, f.relation, top_k=1)[0][0] == d.entity_name(f.tail)


# --------------------------------------------------------------------------- config and the trainer


def test_reversal_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="reversal.num_entities_a"):
        build_reversal_data(load_config(None, ["recipe=reversal_jepa", "reversal.num_entities_a=7"]))
    with pytest.raises(ConfigError, match="reversal.negatives"):
        load_config(None, ["recipe=reversal_jepa", "reversal.negatives=some"])
    with pytest.raises(ConfigError, match="reversal.data_dir"):
        build_reversal_data(load_config(None, ["recipe=reversal_ar", f"reversal.data_dir={tmp_path / 'none'}"]))
    from flowlab.recipes import get_recipe

    cfg = load_config(None, ["recipe=reversal_ar", "reversal.hidden_size=30", "reversal.num_heads=4", *TINY_RUN[:4]])
    recipe = get_recipe(cfg)
    with pytest.raises(ConfigError, match="reversal.hidden_size"):
        recipe.build_model(recipe.build_dataset())


def _weights(run):
    return load_file(run / "model" / "model.safetensors")


def _interrupted_copy(full, part, step):
    """``part``: an output dir holding only ``full``'s checkpoint at ``step`` (a run killed right after it)."""
    import shutil

    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / f"checkpoint-{step}", part / "checkpoints" / f"checkpoint-{step}")
    shutil.copy(full / "config.yaml", part / "config.yaml")


def _assert_same_run(full, part, step):
    w1, w2 = _weights(full), _weights(part)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], msg=k)
    l1 = [json.loads(x) for x in open(full / "metrics.jsonl")]
    l2 = [json.loads(x) for x in open(part / "metrics.jsonl")]
    after = [r for r in l1 if r["step"] > step]
    assert len(l2) == len(after) > 0
    for r1, r2 in zip(after, l2):
        assert r1.keys() == r2.keys()
        for k in r1:
            if k not in ("samples_per_sec", "steps_per_sec"):
                assert r1[k] == pytest.approx(r2[k], rel=1e-5, abs=1e-6), k


def test_cli_training_resumes_exactly(tmp_path):
    """A JEPA + memory run through ``train.py`` resumed from a mid-run checkpoint ends exactly where the
    uninterrupted run does (weights and logged numbers); its artefact answers by name on its own."""
    from flowlab.recipes import Trainer

    args = [*TINY_RUN, "train.checkpoint_every=3", "train.log_every=3", "train.max_steps=6", "eval.every=3"]
    full, part = tmp_path / "full", tmp_path / "part"
    Trainer(load_config("configs/reversal_jepa_memory.yaml", [*args, f"output_dir={full}"])).train()
    _interrupted_copy(full, part, 3)
    log = run_checked([sys.executable, "train.py", "--config", "configs/reversal_jepa_memory.yaml", *args,
                       f"output_dir={part}", "train.resume=latest"])
    assert "resumed from" in log and "checkpoint-3" in log
    _assert_same_run(full, part, 3)
    final = [json.loads(x) for x in open(full / "metrics.jsonl")][-1]
    assert {"eval/seen", "eval/forward", "eval/reverse", "eval/seen_mrr", "eval/forward_mrr", "eval/reverse_mrr"} <= set(final)
    # the artefact is self-contained: the model answers by name from the data saved with it
    from flowlab.data.reversal import read_reversal_data

    model = load_reversal_model(part / "model")
    assert model.config.memory
    data = read_reversal_data(part / "model" / "data")
    f = data.splits["reverse"][0]
    assert len(model.answer(data.entity_name(f.head), data.relation_names[f.relation], top_k=4)) == 4
    assert evaluate_reversal(model, data, 20)["reverse"] == pytest.approx(final["eval/reverse"])
    # eval/reversal.py --runs reads the run back and writes the benchmark's JSON
    bench = load_eval_script("reversal")
    assert bench.main(["--runs", str(part), "--max-queries", "20", "--json", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert list(res) == ["jepa_memory"]
    assert set(res["jepa_memory"]) == {"seen", "forward", "reverse", "seen_mrr", "forward_mrr", "reverse_mrr"}
    assert res["jepa_memory"]["reverse"] == pytest.approx(final["eval/reverse"])


def test_gpt2_tied_head_is_listed_once_and_loads_either_way():
    """The tied LM head is one tensor: state dicts list it once (no shared tensors for accelerate's safetensors
    checkpoints to drop), and both forms of state dict load back into a model whose head is still tied."""
    from accelerate.utils.other import clean_state_dict_for_safetensors

    d = _data()
    m = _gpt2(d)
    assert m.lm_head.weight is m.transformer.wte.weight
    sd = m.state_dict()
    assert "lm_head.weight" not in sd and "transformer.wte.weight" in sd
    assert set(clean_state_dict_for_safetensors(dict(sd))) == set(sd)  # nothing shared left to remove
    with_alias = {**sd, "lm_head.weight": sd["transformer.wte.weight"]}
    for state in (sd, with_alias):
        m2 = _gpt2(d)
        with torch.no_grad():
            m2.transformer.wte.weight.zero_()
        m2.load_state_dict(state)  # strict
        assert m2.lm_head.weight is m2.transformer.wte.weight
        assert torch.equal(m2.lm_head.weight, m.lm_head.weight)
    # untied models keep both names
    untied = _gpt2(d, tie_word_embeddings=False)
    assert {"lm_head.weight", "transformer.wte.weight"} <= set(untied.state_dict())
    assert m.loss_type == "ForCausalLM"


def test_reversal_ar_run_prints_no_transformers_warnings(tmp_path):
    """``train.py`` on reversal_ar (train, checkpoint, save, reload) logs neither transformers' unrecognised
    ``loss_type`` nor accelerate's "Removed shared tensor"."""
    log = run_checked([sys.executable, "train.py", "--config", "configs/reversal_ar.yaml", *TINY_RUN,
                       "train.max_steps=2", "train.checkpoint_every=2", f"output_dir={tmp_path / 'run'}"])
    assert "saved" in log
    assert "loss_type" not in log and "shared tensor" not in log, log[-2000:]
    model = load_reversal_model(tmp_path / "run" / "model")
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("config", ["reversal_ar", "reversal_jepa"])
def test_resume_is_exact(tmp_path, config):
    from flowlab.recipes import Trainer

    args = [*TINY_RUN, "train.checkpoint_every=2", "train.max_steps=4"]
    full, part = tmp_path / "full", tmp_path / "part"
    Trainer(load_config(f"configs/{config}.yaml", [*args, f"output_dir={full}"])).train()
    _interrupted_copy(full, part, 2)
    Trainer(load_config(f"configs/{config}.yaml", [*args, f"output_dir={part}", "train.resume=latest"])).train()
    _assert_same_run(full, part, 2)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """In-batch negatives are the global batch's (ids gathered across processes): 2 processes = 1."""
    args = ["--config", "configs/reversal_jepa.yaml", *TINY_RUN, "train.max_steps=4", "train.checkpoint_every=0",
            "train.max_grad_norm=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_checked([sys.executable, "train.py", *args, f"output_dir={one}"])
    log = launch_two_cpu_processes(*args, f"output_dir={two}")
    assert "2 process(es) [MULTI_CPU]" in log, log[-2000:]
    w1, w2 = _weights(one), _weights(two)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-4, msg=k)
    l1 = [json.loads(x)["loss"] for x in open(one / "metrics.jsonl") if "loss" in json.loads(x)]
    l2 = [json.loads(x)["loss"] for x in open(two / "metrics.jsonl") if "loss" in json.loads(x)]
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l2), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("memory", [False, True])
def test_concept_parameters_get_their_own_learning_rate(memory):
    from flowlab.recipes import get_recipe

    cfg = load_config(None, ["recipe=reversal_jepa", *TINY_RUN, f"reversal.memory={str(memory).lower()}", "train.lr=2e-3",
                             "reversal.concept_lr_scale=10"])
    recipe = get_recipe(cfg)
    model = recipe.build_model(recipe.build_dataset())
    rest, concept = recipe.parameters(model)
    expected = model.memory.values if memory else model.token_embed.weight
    assert len(concept["params"]) == 1 and concept["params"][0] is expected and concept["lr"] == pytest.approx(2e-2)
    assert "lr" not in rest and all(p is not expected for p in rest["params"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(rest["params"]) + 1 == len(trainable)
    opt = torch.optim.AdamW(recipe.parameters(model), lr=2e-3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-3, 2e-2])
    cfg1 = load_config(None, ["recipe=reversal_jepa", *TINY_RUN, f"reversal.memory={str(memory).lower()}"])
    assert len(get_recipe(cfg1).parameters(model)) == len(trainable)  # scale 1: one plain list


@pytest.mark.parametrize("config, cls", [("reversal_jepa", "JEPAConceptModel"), ("reversal_ar", "ReversalGPT2")])
def test_card_data_names_the_flowlab_class(config, cls):
    from flowlab.recipes import load_config
    from flowlab.recipes import get_recipe

    card = get_recipe(load_config(f"configs/{config}.yaml")).card_data("me/rev")
    assert f"from flowlab.jepa import {cls}" in card["usage"] and f'{cls}.from_pretrained("me/rev")' in card["usage"]
