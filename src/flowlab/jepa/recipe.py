"""Reversal recipes for the shared Trainer: ``recipe: reversal_ar`` (GPT-2 baseline) and
``recipe: reversal_jepa`` (JEPA concept model; ``reversal.memory: true`` for the memory variant).

Both read the ``reversal:`` config section, generate (or read) the synthetic facts of
:mod:`flowlab.data.reversal`, train on the ``train`` split and evaluate accuracy / MRR over all
entities on ``seen`` (group A, trained), ``forward`` (group B, trained direction) and
``reverse`` (group B, held-out direction). The artefact ``<output_dir>/model`` holds the model
(``save_pretrained``) and, under ``model/data``, the dataset it was trained on (JSONL).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor

from ..data.base import DataError
from ..data.reversal import (
    ReversalData,
    ReversalFactDataset,
    ReversalSpec,
    generate_reversal_data,
    read_reversal_data,
    write_reversal_data,
)
from ..errors import ConfigError
from ..train.config import Config
from ..train.recipe import Recipe, StepContext, StepOutput
from ..data.forward_chaining import ForwardChainingData, write_forward_chaining_data
from .chain import build_chain_data, concept_regression_loss, evaluate_forward_chaining
from .metrics import ranking_metrics
from .models import JEPAConceptModel, JEPAConfig, ReversalGPT2, ReversalGPT2Config

__all__ = [
    "ReversalARRecipe",
    "ReversalJEPARecipe",
    "build_reversal_data",
    "evaluate_reversal",
    "load_reversal_model",
    "EVAL_SPLITS",
]

EVAL_SPLITS = ("seen", "forward", "reverse")


def build_reversal_data(config: Config) -> ReversalData:
    """The run's dataset: read from ``reversal.data_dir`` or generated from the ``reversal.*`` sizes
    (the forward-chaining data of ``chain:`` when ``chain.enabled``)."""
    if config.chain.enabled:
        return build_chain_data(config)
    r = config.reversal
    if r.data_dir is not None:
        if not os.path.isdir(r.data_dir):
            raise ConfigError(f"reversal.data_dir: {r.data_dir!r} is not a folder")
        return read_reversal_data(r.data_dir)
    spec = ReversalSpec(
        num_entities_a=r.num_entities_a, num_entities_b=r.num_entities_b, num_relations=r.num_relations,
        facts_per_entity=r.facts_per_entity, names=r.names, names_share=r.names_share,
        seed=config.seed if r.data_seed is None else r.data_seed,
    )
    try:
        return generate_reversal_data(spec)
    except DataError as e:
        raise ConfigError(str(e)) from None


def _vocab_kwargs(data: ReversalData) -> dict:
    return dict(vocab=list(data.vocab), entity_tokens=[list(e) for e in data.entity_tokens],
                relation_names=list(data.relation_names), relation_tokens=list(data.relation_tokens))


def evaluate_reversal(model, data: ReversalData, max_queries: Optional[int] = None, batch_size: int = 256) -> dict:
    """Accuracy and MRR over all entities on ``seen``, ``forward`` and ``reverse``.

    Returns:
        ``{"seen": acc, "seen_mrr": mrr, "forward": ..., "forward_mrr": ..., "reverse": ..., "reverse_mrr": ...}``
        (fractions; the first ``max_queries`` facts of each split when given).
    """
    out = {}
    for split in EVAL_SPLITS:
        f = data.facts_tensor(split)
        if max_queries is not None:
            f = f[:max_queries]
        m = ranking_metrics(model.rank_entities(f[:, 0], f[:, 1], batch_size=batch_size), f[:, 2])
        out[split], out[f"{split}_mrr"] = m["accuracy"], m["mrr"]
    return out


def load_reversal_model(path: Union[str, os.PathLike]):
    """A saved :class:`ReversalGPT2` or :class:`JEPAConceptModel` (picked by ``config.json``'s ``model_type``)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg}: not found (expected a model saved by a reversal recipe)")
    kind = json.loads(cfg.read_text()).get("model_type")
    classes = {ReversalGPT2Config.model_type: ReversalGPT2, JEPAConfig.model_type: JEPAConceptModel}
    if kind not in classes:
        raise ValueError(f"{cfg}: model_type {kind!r} is not a reversal model ({', '.join(classes)})")
    return classes[kind].from_pretrained(str(path))


class _ReversalRecipe(Recipe):
    artifact_name = "model"

    def build_dataset(self):
        self.data = build_reversal_data(self.config)
        return ReversalFactDataset(self.data, "train")

    @staticmethod
    def _check_heads(r) -> None:
        if r.hidden_size % r.num_heads:
            raise ConfigError(f"reversal.hidden_size: {r.hidden_size} must be divisible by reversal.num_heads ({r.num_heads})")

    @staticmethod
    def _unwrap(model):
        return extract_model_from_parallel(model)

    def evaluate(self, model, generator) -> dict:
        if isinstance(self.data, ForwardChainingData):
            return evaluate_forward_chaining(self._unwrap(model), self.data, self.config.chain.eval_max_queries)
        return evaluate_reversal(self._unwrap(model), self.data, self.config.reversal.eval_max_queries)

    def save_final(self, model, directory: str) -> None:
        self._unwrap(model).save_pretrained(directory)
        if isinstance(self.data, ForwardChainingData):
            write_forward_chaining_data(self.data, Path(directory) / "data")
        else:
            write_reversal_data(self.data, Path(directory) / "data")

    #: the model class ``card_data`` names in its usage snippet, and the card's Hub task
    model_class = "JEPAConceptModel"
    pipeline_tag = "question-answering"

    def card_data(self, repo_id: str) -> dict:
        """Model-card fields for ``flowlab push``: the flowlab class to load with (importing
        ``flowlab.jepa`` also registers the models with transformers' Auto classes)."""
        return {
            "tags": ["reversal-curse", "transformers"],
            "pipeline_tag": self.pipeline_tag,
            "usage": (
                f"from flowlab.jepa import {self.model_class}\n"
                f'model = {self.model_class}.from_pretrained("{repo_id}")\n'
                "model.answer(model.entity_name(0), model.config.relation_names[0], top_k=5)"
            ),
        }


class ReversalARRecipe(_ReversalRecipe):
    """GPT-2 baseline (``recipe: reversal_ar``): next-token loss on the tail's tokens."""

    name = "reversal_ar"

    model_class = "ReversalGPT2"
    pipeline_tag = "text-generation"

    def build_model(self, dataset) -> ReversalGPT2:
        r, data = self.config.reversal, dataset.data
        self._check_heads(r)
        cfg = ReversalGPT2Config(
            vocab_size=len(data.vocab), n_embd=r.hidden_size, n_layer=r.num_layers, n_head=r.num_heads,
            n_inner=r.mlp_ratio * r.hidden_size, n_positions=2 * data.name_length + 2,
            resid_pdrop=r.dropout, embd_pdrop=r.dropout, attn_pdrop=r.dropout,
            bos_token_id=data.vocab.index("<bos>"), eos_token_id=None, pad_token_id=data.vocab.index("<pad>"),
            position_embeddings=r.position_embeddings, loss_type="ForCausalLM", **_vocab_kwargs(data),
        )
        return ReversalGPT2(cfg)

    def training_step(self, model, batch: dict, ctx: StepContext) -> StepOutput:
        ids, labels = self._unwrap(model).fact_inputs(batch["head"], batch["relation"], batch["tail"])
        loss = model(input_ids=ids, labels=labels).loss  # through the (DDP) wrapper
        return StepOutput(loss=loss)


def _gather(x: Tensor) -> Tensor:
    """All processes' ``x`` concatenated in rank order (``x`` itself in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class ReversalJEPARecipe(_ReversalRecipe):
    """JEPA concept model (``recipe: reversal_jepa``; ``reversal.memory`` for the memory variant).

    In-batch negatives are the *global* batch's entities and relations (ids gathered from every
    process), so the loss does not depend on the number of processes.
    """

    name = "reversal_jepa"

    def build_model(self, dataset) -> JEPAConceptModel:
        r, data = self.config.reversal, dataset.data
        self._check_heads(r)
        cfg = JEPAConfig(
            vocab_size=len(data.vocab), hidden_size=r.hidden_size, num_heads=r.num_heads, encoder_layers=r.encoder_layers,
            predictor_layers=r.predictor_layers, mlp_ratio=r.mlp_ratio,
            max_patch_len=max(3, data.name_length + (r.binding == "relation")),  # a bound name carries its role
            memory=r.memory, binding=r.binding, temperature=r.temperature, dropout=r.dropout, mask_token_id=data.vocab.index("<mask>"),
            **_vocab_kwargs(data),
        )
        return JEPAConceptModel(cfg)

    @staticmethod
    def concept_parameter_names(model: JEPAConceptModel) -> set[str]:
        """The parameters that hold the concepts: the memory's values, or the token embeddings."""
        return {"memory.values"} if model.config.memory else {"token_embed.weight"}

    def parameters(self, model):
        """Two optimiser groups: the concept parameters at ``train.lr * reversal.concept_lr_scale``, the rest at ``train.lr``."""
        scale = self.config.reversal.concept_lr_scale
        names = self.concept_parameter_names(model)
        concept = [p for n, p in model.named_parameters() if n in names and p.requires_grad]
        rest = [p for n, p in model.named_parameters() if n not in names and p.requires_grad]
        if scale == 1.0:
            return concept + rest
        return [{"params": rest}, {"params": concept, "lr": self.config.train.lr * scale}]

    def training_step(self, model, batch: dict, ctx: StepContext) -> StepOutput:
        h, r, t = batch["head"], batch["relation"], batch["tail"]
        inner = self._unwrap(model)
        head_keys, tail_keys = inner.entity_keys(h, r), inner.entity_keys(t, inner.inverse_relation(r))
        if self.config.reversal.negatives == "all":
            neg = torch.arange(inner.num_entity_keys, device=h.device)
            neg_r = torch.arange(inner.relation_token_ids.numel(), device=h.device)
        else:
            neg, neg_r = _gather(torch.cat([head_keys, tail_keys])), _gather(r)
        out = model(h, r, t, negatives=neg, negative_relations=neg_r)
        cand = torch.unique(torch.cat([head_keys, tail_keys, neg]))
        acc = (out.logits.argmax(-1) == torch.searchsorted(cand, tail_keys.contiguous())).float().mean()
        weight = self.config.chain.regression_weight if self.config.chain.enabled else 0.0
        if weight == 0.0:
            return StepOutput(loss=out.loss, logs={"train_accuracy": acc.detach()})
        regression = concept_regression_loss(self._unwrap(model), h, r, t, self.config.chain.regression_predictor_grad)
        return StepOutput(loss=out.loss + weight * regression,
                          logs={"train_accuracy": acc.detach(), "concept_regression": regression.detach()})
