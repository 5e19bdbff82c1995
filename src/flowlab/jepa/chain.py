"""Parametric forward-chaining with the reversal recipes: the ``chain:`` config section, the data it
builds and the evaluation of the value queries.

With ``chain.enabled: true`` the reversal recipes (``reversal_ar``, ``reversal_jepa``) train on the
facts of :mod:`flowlab.data.forward_chaining` instead of the reversal protocol; the model sizes still
come from ``reversal:``. Nothing about the value of a bridge or root is ever stated: a model answers
``(e, <=>, ?)`` only if training on the facts that link ``e`` to the core moved ``e``'s representation
to where its value is read out — forward-chaining in parameter space, hop by hop, during training
(as in Wang & Sun's arithmetic experiment; see docs/jepa.md).
"""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.base import DataError
from ..data.forward_chaining import (
    ForwardChainingData,
    ForwardChainingSpec,
    generate_forward_chaining_data,
    read_forward_chaining_data,
)
from ..errors import ConfigError
from ..recipes.chain_config import ChainConfig
from ..train.config import Config
from .metrics import gold_ranks

__all__ = ["ChainConfig", "build_chain_data", "concept_regression_loss", "evaluate_forward_chaining", "chain_query_counts"]


def build_chain_data(config: Config) -> ForwardChainingData:
    """The run's forward-chaining dataset: read from ``chain.data_dir`` or generated from ``chain.*``."""
    c = config.chain
    if c.data_dir is not None:
        if not os.path.isdir(c.data_dir):
            raise ConfigError(f"chain.data_dir: {c.data_dir!r} is not a folder")
        return read_forward_chaining_data(c.data_dir)
    spec = ForwardChainingSpec(
        modulus=c.modulus, num_addends=c.num_addends, addend_max=c.addend_max, core_multiplicity=c.core_multiplicity,
        core_fraction=c.core_fraction, branching_factors=list(c.branching_factors),
        problems_per_factor=c.problems_per_factor, depth=c.depth, drop_prob=c.drop_prob, leaf_links=c.leaf_links,
        seed=config.seed if c.data_seed is None else c.data_seed,
    )
    try:
        return generate_forward_chaining_data(spec)
    except DataError as e:
        raise ConfigError(str(e)) from None


@contextmanager
def _without_parameter_grads(*modules: nn.Module) -> Iterator[None]:
    """Within the block, autograd records no gradient for the parameters of ``modules`` (their inputs still
    get one); ``requires_grad`` is restored afterwards."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def concept_regression_loss(model, heads: Tensor, relations: Tensor, tails: Tensor, predictor_grad: bool = True) -> Tensor:
    """JEPA regression term ``mean_b (1 - cos(P(c_h, c_r), c_t))`` of a :class:`~flowlab.jepa.JEPAConceptModel`
    on facts ``(B,)`` ids. The gradient always reaches the concepts: the tail's (pulled onto the prediction) and
    the head's and relation's (through the predictor's input).

    The contrastive loss only asks a tail's concept to be the *closest* candidate to the prediction, so a
    concept deduced from facts (a bridge's) ends near, not at, the concepts of its value, and every further
    hop and the ``<=>`` read-out start from off the trained points; the regression term removes that gap.

    Args:
        predictor_grad: whether the term also trains the predictor (and its output norm). With ``False``
            the predictor P is a fixed map for this term, so the term only *places concepts* where P sends
            them. With ``True`` it also drags P(c_h, c_r) towards c_t: for a fact whose tail is pinned by no
            other fact (a dead-end leaf under a deduced node) P learns to send the node to the leaf's
            arbitrary concept, off the values' concepts, and the node's further deductions go wrong
            (docs/jepa.md, "Why deeper hops are weak").
    """
    frozen = _without_parameter_grads(model.predictor, model.output_norm) if not predictor_grad else nullcontext()
    with frozen:
        pred = model.predict(model.entity_concepts(heads), model.relation_concepts(relations))
    return (1.0 - F.cosine_similarity(pred, model.entity_concepts(tails), dim=-1)).mean()


def _gold_ranks_and_top(model, facts: Tensor, batch_size: int, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Rank of each gold tail among all entities and the top-ranked entity, ``(Q,)`` each, for ``(Q, 3)``
    facts; ``chunk`` queries at a time, so ``(chunk, N)`` scores are alive at once (N can be ~10^5)."""
    ranks, top = [], []
    for i in range(0, len(facts), chunk):
        f = facts[i:i + chunk]
        scores = model.rank_entities(f[:, 0], f[:, 1], batch_size=batch_size)
        ranks.append(gold_ranks(scores, f[:, 2].to(scores.device)).cpu())
        top.append(scores.argmax(1).cpu())
    return torch.cat(ranks), torch.cat(top)


def _fact_accuracy(model, data: ForwardChainingData, split: str, max_queries: Optional[int], batch_size: int) -> float:
    """Value-level accuracy on the facts of ``split``: the top-ranked entity has the tail's value and is a
    value concept exactly when the tail is one. (A query ``(c, <+k>)`` has many right tails — every core
    entity, bridge or root of value ``value(c) + k`` — and a model that has the arithmetic right cannot
    tell them apart.)"""
    f = data.facts_tensor(split)[:max_queries]
    if len(f) == 0:
        return float("nan")
    _, pred = _gold_ranks_and_top(model, f, batch_size)
    is_value = torch.tensor([k == "value" for k in data.kinds])
    values = torch.tensor(data.values)
    gold = f[:, 2]
    return float(((values[pred] == values[gold]) & (is_value[pred] == is_value[gold])).double().mean())


def evaluate_forward_chaining(model, data: ForwardChainingData, max_queries: Optional[int] = None,
                              batch_size: int = 256) -> dict[str, float]:
    """Accuracy of a reversal model on the forward-chaining data.

    The value queries ``(e, <=>, ?)`` rank the gold value concept among *all* entities (ties against
    it, :func:`~flowlab.jepa.metrics.gold_ranks`): accuracy ``P(rank = 1)``, MRR ``mean(1 / rank)``.

    Args:
        model: a :class:`~flowlab.jepa.JEPAConceptModel` or :class:`~flowlab.jepa.ReversalGPT2`.
        data: the dataset it was trained on.
        max_queries: the first N facts of each fact split (the value queries are always all evaluated).

    Returns:
        Flat ``{name: fraction}``: ``attr`` (trained core values), ``problem`` (trained problem facts),
        ``rule`` (held-out rule facts), ``queries`` / ``queries_mrr`` (every value query), ``roots``
        (the roots: the paper's problems), ``hops_<h>`` (queries ``h`` hops from the core),
        ``roots_bf<b>`` and ``queries_bf<b>`` per branching factor ``b``.
    """
    out = {split: _fact_accuracy(model, data, split, max_queries, batch_size) for split in ("attr", "problem", "rule")}
    ranks, _ = _gold_ranks_and_top(model, data.queries_tensor(), batch_size)
    ranks = ranks.double()
    out["queries"], out["queries_mrr"] = float((ranks == 1).double().mean()), float((1.0 / ranks).mean())
    correct = ranks == 1  # one value concept per value: the exact entity

    def acc(mask: list[bool]) -> float:
        t = torch.tensor(mask, dtype=torch.bool)
        return float(correct[t].double().mean()) if t.any() else float("nan")

    roots = [qq.level == 0 for qq in data.queries]
    out["roots"] = acc(roots)
    for h in sorted({qq.hops for qq in data.queries}):
        out[f"hops_{h}"] = acc([qq.hops == h for qq in data.queries])
    for b in data.spec.branching_factors:
        out[f"roots_bf{b}"] = acc([qq.level == 0 and qq.branching_factor == b for qq in data.queries])
        out[f"queries_bf{b}"] = acc([qq.branching_factor == b for qq in data.queries])
    return out


def chain_query_counts(data: ForwardChainingData) -> dict[str, int]:
    """How many queries each ``evaluate_forward_chaining`` entry averages over (same keys; fact splits
    count their facts)."""
    qs = data.queries
    out = {s: len(data.splits[s]) for s in ("attr", "problem", "rule")}
    out["queries"] = out["queries_mrr"] = len(qs)
    out["roots"] = sum(q.level == 0 for q in qs)
    for h in sorted({q.hops for q in qs}):
        out[f"hops_{h}"] = sum(q.hops == h for q in qs)
    for b in data.spec.branching_factors:
        out[f"roots_bf{b}"] = sum(q.level == 0 and q.branching_factor == b for q in qs)
        out[f"queries_bf{b}"] = sum(q.branching_factor == b for q in qs)
    return out
