"""Reversal models: a GPT-2 autoregressive baseline and the JEPA concept model (with an optional memory).

Both are ``transformers`` ``PreTrainedModel`` s with their own config classes, so
``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` work; each config also carries the
vocabulary, the entities' name tokens and the relation names of the data it was trained on, so a
saved model answers queries by name on its own::

    model = JEPAConceptModel.from_pretrained("runs/reversal_jepa/model")
    model.answer("<f12> <l40>", "<r3>", top_k=5)   # [("<f7> <l9>", 0.93), ...]

Queries are ``(head, relation)``; the answer is ranked over **every known entity**:

* :class:`ReversalGPT2` scores an entity by the log-likelihood of its name tokens after
  ``[bos] head-tokens relation`` (next-token model, loss on the answer tokens only);
* :class:`JEPAConceptModel` encodes each patch (an entity's name, a relation, the mask) into a
  concept vector, runs a causal predictor over ``[c_head, c_relation, c_mask]`` and scores an entity
  by the cosine of the prediction with the entity's concept (nearest-neighbour decoding).

Scores are returned as probabilities renormalised over the known entities.
"""
from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel
from transformers.utils import ModelOutput

try:  # transformers >= 5
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import PretrainedConfig as PreTrainedConfig

from .layers import RMSNorm, TopOneMemory, TransformerBlock

__all__ = ["ReversalGPT2Config", "ReversalGPT2", "JEPAConfig", "JEPAConceptModel", "ReversalOutput", "EntityQueryMixin"]

EntityRef = Union[int, str, Sequence[str]]

# transformers renamed ``past_key_values`` to ``cache`` (5.x); use whichever this version takes
_CACHE_KWARG = "cache" if "cache" in inspect.signature(GPT2LMHeadModel.forward).parameters else "past_key_values"


@dataclass
class ReversalOutput(ModelOutput):
    """``loss`` (scalar) and ``logits`` (JEPA: ``(B, C)`` scores of the candidates; GPT-2: ``(B, S, V)``)."""

    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None


class EntityQueryMixin:
    """Names, ids and ``answer`` shared by the reversal models (reads ``config.vocab``,
    ``config.entity_tokens``, ``config.relation_names``, ``config.relation_tokens``)."""

    def _register_vocab(self, config) -> None:
        ents = config.entity_tokens or [[0]]
        if len({len(e) for e in ents}) != 1:
            raise ValueError("all entity names must have the same number of tokens")
        self._entity_index = None
        self._id_tables: dict = {}

    def _id_table(self, key: str) -> Tensor:
        # built from the config on the parameters' device (not a buffer: nothing to save, and
        # from_pretrained's meta-device initialisation would leave a buffer uninitialised)
        dev = next(self.parameters()).device
        t = self._id_tables.get(key)
        if t is None or t.device != dev:
            src = self.config.entity_tokens if key == "entity" else self.config.relation_tokens
            t = self._id_tables[key] = torch.tensor(src or [0], dtype=torch.long, device=dev)
        return t

    @property
    def entity_token_ids(self) -> Tensor:
        """Name token ids of every entity ``(N, L)``."""
        return self._id_table("entity")

    @property
    def relation_token_ids(self) -> Tensor:
        """Token id of every relation ``(2R,)``."""
        return self._id_table("relation")

    @property
    def num_entities(self) -> int:
        return len(self.config.entity_tokens)

    def entity_name(self, e: int) -> str:
        """The entity's name tokens joined by spaces."""
        return " ".join(self.config.vocab[t] for t in self.config.entity_tokens[e])

    def entity_id(self, entity: EntityRef) -> int:
        """Id of ``entity``: an id (checked), a name ``"<f1> <l2>"`` or its token list."""
        if isinstance(entity, (int, torch.Tensor)) and not isinstance(entity, bool):
            e = int(entity)
            if not 0 <= e < self.num_entities:
                raise ValueError(f"entity id {e} out of range (0 .. {self.num_entities - 1})")
            return e
        name = entity if isinstance(entity, str) else " ".join(entity)
        if self._entity_index is None:
            self._entity_index = {self.entity_name(i): i for i in range(self.num_entities)}
        if name not in self._entity_index:
            raise KeyError(f"unknown entity {name!r} (names look like {self.entity_name(0)!r})")
        return self._entity_index[name]

    def relation_id(self, relation: Union[int, str]) -> int:
        """Id of ``relation``: an id or a name from ``config.relation_names`` (e.g. ``"<r3>"``, ``"<r3^-1>"``)."""
        names = self.config.relation_names
        if isinstance(relation, str):
            if relation not in names:
                raise KeyError(f"unknown relation {relation!r}; known: {', '.join(names)}")
            return names.index(relation)
        r = int(relation)
        if not 0 <= r < len(names):
            raise ValueError(f"relation id {r} out of range (0 .. {len(names) - 1})")
        return r

    def score_entities(self, heads: Tensor, relations: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def rank_entities(self, heads: Tensor, relations: Tensor, batch_size: int = 256) -> Tensor:
        """Log-probabilities over all entities ``(Q, N)`` of the queries ``(heads, relations)`` (``(Q,)`` ids),
        in eval mode, computed ``batch_size`` queries at a time."""
        was_training = self.training
        self.eval()
        dev = self.entity_token_ids.device
        out = [self.score_entities(heads[i : i + batch_size].to(dev), relations[i : i + batch_size].to(dev)).float().cpu()
               for i in range(0, len(heads), batch_size)]
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.num_entities)

    @torch.no_grad()
    def answer(self, head: EntityRef, relation: Union[int, str], top_k: Optional[int] = 10) -> list[tuple[str, float]]:
        """Answer ``(head, relation, ?)``.

        Args:
            head: entity id, name (``"<f12> <l40>"``) or list of name tokens.
            relation: relation id or name (``"<r3>"``; inverses ``"<r3^-1>"``).
            top_k: how many entities to return (``None``: all), best first.

        Returns:
            ``[(entity_name, probability), ...]`` sorted by decreasing probability (over all known entities).
        """
        h = torch.tensor([self.entity_id(head)])
        r = torch.tensor([self.relation_id(relation)])
        probs = self.rank_entities(h, r)[0].exp()
        k = self.num_entities if top_k is None else min(int(top_k), self.num_entities)
        vals, idx = probs.topk(k)
        return [(self.entity_name(int(i)), float(v)) for v, i in zip(vals, idx)]


# --------------------------------------------------------------------------- GPT-2 baseline


class ReversalGPT2Config(GPT2Config):
    """GPT-2 config plus the reversal data's vocabulary and ``position_embeddings`` (``False``: the
    learned positional embeddings are zero and frozen)."""

    model_type = "reversal_gpt2"
    position_embeddings: bool = True
    vocab: Optional[list] = None
    entity_tokens: Optional[list] = None
    relation_names: Optional[list] = None
    relation_tokens: Optional[list] = None


class ReversalGPT2(EntityQueryMixin, GPT2LMHeadModel):
    """Autoregressive baseline: ``GPT2LMHeadModel`` (random init) on ``[bos] head relation tail``.

    The loss is next-token cross-entropy on the tail's tokens only; an entity's score for a query
    is ``sum_k log p(tail_k | bos, head, relation, tail_<k)``.
    """

    config_class = ReversalGPT2Config

    def __init__(self, config: ReversalGPT2Config):
        super().__init__(config)
        # transformers picks the loss from the class name, and "ReversalGPT2" names none (it warned and fell
        # back to the causal-LM loss on every run): say which one it is
        self.loss_type = "ForCausalLM"
        # the LM head is tied to the token embedding (one tensor under two names): state dicts list it once, under
        # the embedding's name, as safetensors stores it (accelerate's checkpoints otherwise drop the alias and warn
        # on every save), and loading accepts state dicts with or without the alias
        self.register_state_dict_post_hook(_drop_tied_aliases)
        self.register_load_state_dict_pre_hook(_restore_tied_aliases)
        self._register_vocab(config)
        if not config.position_embeddings:
            with torch.no_grad():
                self.transformer.wpe.weight.zero_()
            self.transformer.wpe.weight.requires_grad_(False)

    def fact_inputs(self, heads: Tensor, relations: Tensor, tails: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Token ids ``(B, 2 + L [+ L])`` of ``[bos] head relation [tail]`` and labels (``-100`` except the tail)."""
        B = heads.shape[0]
        bos = torch.full((B, 1), self.config.bos_token_id, dtype=torch.long, device=heads.device)
        parts = [bos, self.entity_token_ids[heads], self.relation_token_ids[relations][:, None]]
        if tails is None:
            return torch.cat(parts, 1), None
        tail_tok = self.entity_token_ids[tails]
        ids = torch.cat([*parts, tail_tok], 1)
        labels = torch.full_like(ids, -100)
        labels[:, -tail_tok.shape[1] :] = tail_tok
        return ids, labels

    def fact_loss(self, heads: Tensor, relations: Tensor, tails: Tensor) -> ReversalOutput:
        """Mean cross-entropy of the tail tokens given ``[bos] head relation`` (``(B,)`` ids in)."""
        ids, labels = self.fact_inputs(heads, relations, tails)
        out = self(input_ids=ids, labels=labels)
        return ReversalOutput(loss=out.loss, logits=out.logits)

    def score_entities(self, heads: Tensor, relations: Tensor) -> Tensor:
        """Log-probabilities ``(Q, N)`` of every entity's name after ``[bos] head relation``, renormalised over entities.

        ``log p(name) = sum_k log p(name_k | prefix, name_<k)``: one pass over the prefixes (keeping the
        key/value cache), then, for each further name position, one single-token step per distinct
        name prefix, reusing the cache.
        """
        prefix, _ = self.fact_inputs(heads, relations)
        ents = self.entity_token_ids  # (N, L)
        Q, (N, L) = prefix.shape[0], ents.shape
        out = self(input_ids=prefix, use_cache=L > 1)
        logp = out.logits[:, -1].log_softmax(-1)[:, ents[:, 0]]  # (Q, N)
        for k in range(1, L):
            uniq, inv = torch.unique(ents[:, :k], dim=0, return_inverse=True)  # distinct name prefixes (U, k)
            U = uniq.shape[0]
            if k == 1:
                cache = getattr(out, _CACHE_KWARG)  # the output field has the same name as the argument
                cache.batch_repeat_interleave(U)  # (Q * U) rows: query q, name prefix u
                step = uniq[:, 0].repeat(Q)[:, None]
                lp = self(input_ids=step, use_cache=False, **{_CACHE_KWARG: cache}).logits[:, -1]
            else:  # longer names: recompute prefix + name prefix (no cache)
                ids = torch.cat([prefix[:, None].expand(Q, U, -1), uniq[None].expand(Q, U, k)], 2).reshape(Q * U, -1)
                lp = self(input_ids=ids).logits[:, -1]
            lp = lp.log_softmax(-1).view(Q, U, -1)
            logp = logp + lp[:, inv, ents[:, k]]
        return logp.log_softmax(-1)


def _tied_aliases(model: "ReversalGPT2") -> list[tuple[str, str]]:
    """``(alias, target)`` names of the parameters tied right now (``lm_head.weight`` -> ``transformer.wte.weight``)."""
    keys = getattr(model, "_tied_weights_keys", None) or {}
    pairs = keys.items() if isinstance(keys, dict) else []
    return [(a, t) for a, t in pairs if model.get_parameter(a) is model.get_parameter(t)]


def _drop_tied_aliases(model: "ReversalGPT2", state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for alias, target in _tied_aliases(model):
        if prefix + target in state_dict:
            state_dict.pop(prefix + alias, None)


def _restore_tied_aliases(model: "ReversalGPT2", state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                          missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    for alias, target in _tied_aliases(model):
        if prefix + alias not in state_dict and prefix + target in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + target]


# --------------------------------------------------------------------------- JEPA concept model


class JEPAConfig(PreTrainedConfig):
    """Config of :class:`JEPAConceptModel`.

    Attributes:
        vocab_size: token vocabulary size. hidden_size: concept width ``d``. num_heads: attention heads.
        encoder_layers: transformer layers run within each patch (not used by the memory encoder).
        predictor_layers: causal layers over the concept sequence. mlp_ratio: MLP width / ``d``.
        max_patch_len: tokens per patch at most (positional embeddings inside a patch).
        memory: encode entities by mean-pooling + a top-1 key-value memory (one frozen key per concept).
        binding: what an entity concept is bound to. ``"entity"``: one concept per entity, the same in every
            fact. ``"relation"``: one concept per (entity, role) pair -- the entity as the head of relation
            ``rho`` is the patch ``[name tokens, rho]``, and the answer to ``(h, r, ?)`` is the entity in role
            ``r^-1`` -- so the fact ``(h, r, t)`` and its reverse ``(t, r^-1, h)`` share two concepts that no other
            fact uses (several facts per entity no longer chain concepts into cycles; see docs/jepa.md).
        temperature: contrastive temperature ``tau`` (logits are ``cos / tau``).
        mask_token_id: token of the mask patch.
        vocab, entity_tokens, relation_names, relation_tokens: the data's vocabulary (for ``answer``).
    """

    model_type = "reversal_jepa"
    vocab_size: int = 16
    hidden_size: int = 128
    num_heads: int = 4
    encoder_layers: int = 2
    predictor_layers: int = 2
    mlp_ratio: int = 4
    max_patch_len: int = 3
    memory: bool = False
    binding: str = "entity"
    temperature: float = 0.1
    dropout: float = 0.0
    mask_token_id: int = 1
    initializer_range: float = 0.02
    vocab: Optional[list] = None
    entity_tokens: Optional[list] = None
    relation_names: Optional[list] = None
    relation_tokens: Optional[list] = None


class JEPAConceptModel(EntityQueryMixin, PreTrainedModel):
    """JEPA-style concept model (Wang & Sun): concept encoder, causal concept predictor, contrastive loss.

    * **Encoder** (``memory=False``): token + within-patch position embeddings, ``encoder_layers`` causal
      layers run inside each patch; the patch's concept is the (RMS-normalised) hidden state at its last
      token. (``memory=True``): the mean of the patch's token embeddings queries a :class:`TopOneMemory`
      with one frozen key per concept (every entity, relation and the mask), keys initialised from
      those mean embeddings; the concept is the slot's learned value, RMS-normalised.
    * **Predictor**: ``predictor_layers`` causal layers over ``[c_head, c_relation, c_mask]`` without
      positional embeddings; the output at the mask patch, RMS-normalised, is the predicted concept.
    * **Loss**: cross-entropy over ``cos(prediction, c) / tau`` for the candidate concepts ``c`` (in-batch:
      every entity and relation patch of the batch), the tail's concept being the target; targets come
      from the same encoder, with gradients.
    * **Decoding**: nearest neighbour (cosine) among the concepts of all known entities.

    The concepts of all entities (:meth:`all_entity_concepts`) are cached between queries in eval mode
    without autograd, and recomputed whenever the weights change.
    * **Binding** (``binding="relation"``): concepts are indexed by *entity keys* ``e * 2R + rho`` (the entity
      ``e`` in the role of relation ``rho``'s head, patch ``[name tokens, rho]``) instead of by entity ids; a
      query ``(h, r)`` reads the key of ``(h, r)`` and is answered among the keys ``(e, r^-1)``.
    """

    config_class = JEPAConfig
    base_model_prefix = "jepa"
    main_input_name = "heads"

    def __init__(self, config: JEPAConfig):
        super().__init__(config)
        d = config.hidden_size
        self._register_vocab(config)
        if config.binding not in ("entity", "relation"):
            raise ValueError(f"binding: must be 'entity' or 'relation', got {config.binding!r}")
        self.token_embed = nn.Embedding(config.vocab_size, d)
        if config.memory:
            n_slots = self.num_entity_keys + len(config.relation_tokens or [0]) + 1
            self.memory = TopOneMemory(n_slots, d, d)
            self.token_embed.weight.requires_grad_(False)  # the keys are frozen copies of mean embeddings
        else:
            self.patch_pos = nn.Embedding(config.max_patch_len, d)
            self.encoder = nn.ModuleList(TransformerBlock(d, config.num_heads, config.mlp_ratio, config.dropout)
                                         for _ in range(config.encoder_layers))
        self.concept_norm = RMSNorm(d)
        self.predictor = nn.ModuleList(TransformerBlock(d, config.num_heads, config.mlp_ratio, config.dropout)
                                       for _ in range(config.predictor_layers))
        self.output_norm = RMSNorm(d)
        self.post_init()
        if config.memory:
            self.memory.set_keys(self._memory_keys())
        self._entity_concepts_cache: Optional[tuple[list[Tensor], Tensor]] = None  # (weights, concepts)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0 if module is self.token_embed else std)
        elif isinstance(module, RMSNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
        elif isinstance(module, TopOneMemory):
            nn.init.normal_(module.values, std=1.0)

    # ------------------------------------------------------------------ entity keys (binding)
    @property
    def num_entity_keys(self) -> int:
        """Entity concepts the model holds: ``N`` (``binding="entity"``) or ``N * 2R`` (``"relation"``)."""
        if self.config.binding == "entity":
            return self.num_entities
        return self.num_entities * len(self.config.relation_tokens or [0])

    def inverse_relation(self, relations: Tensor) -> Tensor:
        """Ids of the inverse relations: ``r <-> r + R`` (the data's convention, :mod:`flowlab.data.reversal`)."""
        two_r = len(self.config.relation_tokens or [0])
        return (relations + two_r // 2) % two_r

    def entity_keys(self, entities: Tensor, roles: Tensor) -> Tensor:
        """Concept keys ``(n,)`` of entities ``(n,)`` as heads of relations ``roles`` (``(n,)`` relation ids):
        the entity id itself (``binding="entity"``) or ``entity * 2R + role`` (``"relation"``)."""
        if self.config.binding == "entity":
            return entities
        return entities * len(self.config.relation_tokens) + roles

    def _key_patches(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Token ids ``(n, L')`` and lengths ``(n,)`` of entity keys: the name, plus the role's relation token."""
        if self.config.binding == "entity":
            toks = self.entity_token_ids[keys]
        else:
            two_r = len(self.config.relation_tokens)
            toks = torch.cat([self.entity_token_ids[keys // two_r], self.relation_token_ids[keys % two_r][:, None]], 1)
        return toks, torch.full((len(toks),), toks.shape[1], dtype=torch.long, device=toks.device)

    # ------------------------------------------------------------------ patches
    def _slot_patches(self) -> tuple[Tensor, Tensor]:
        """Token ids ``(K, L')`` and lengths ``(K,)`` of every concept slot: entity keys, relations, mask."""
        ents, lengths_e = self._key_patches(torch.arange(self.num_entity_keys, device=self.entity_token_ids.device))
        N, L = ents.shape
        K = N + self.relation_token_ids.numel() + 1
        toks = torch.zeros(K, L, dtype=torch.long, device=ents.device)
        toks[:N] = ents
        toks[N:-1, 0] = self.relation_token_ids
        toks[-1, 0] = self.config.mask_token_id
        lengths = torch.ones(K, dtype=torch.long, device=ents.device)
        lengths[:N] = lengths_e
        return toks, lengths

    def _mean_embedding(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        valid = (torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None]).float()
        return (self.token_embed(tokens) * valid[..., None]).sum(1) / lengths[:, None].float()

    @torch.no_grad()
    def _memory_keys(self) -> Tensor:
        toks, lengths = self._slot_patches()
        return self._mean_embedding(toks, lengths)

    def encode_patches(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Concept vectors ``(P, d)`` of ``P`` patches given as token ids ``(P, L)`` (right-padded) and lengths ``(P,)``."""
        if self.config.memory:
            c = self.memory(self._mean_embedding(tokens, lengths))
        else:
            L = tokens.shape[1]
            if L > self.config.max_patch_len:
                raise ValueError(f"patches of {L} tokens exceed max_patch_len={self.config.max_patch_len}")
            h = self.token_embed(tokens) + self.patch_pos.weight[:L]
            for block in self.encoder:
                h = block(h)  # causal: right padding never reaches a patch's last real token
            c = h[torch.arange(len(tokens), device=tokens.device), lengths - 1]
        return self.concept_norm(c)

    def entity_concepts(self, entities: Optional[Tensor] = None, roles: Optional[Tensor] = None) -> Tensor:
        """Concepts ``(n, d)`` of ``entities`` (ids ``(n,)``; ``None``: all entities).

        With ``binding="relation"`` every entity concept is bound to a role: ``roles`` gives the relation id of
        each (``(n,)``, or one id for all); without it the entity ids are read as entity keys (:meth:`entity_keys`).
        """
        if entities is None:
            entities = torch.arange(self.num_entities, device=self.entity_token_ids.device)
        keys = entities
        if self.config.binding == "relation" and roles is not None:
            keys = self.entity_keys(entities, torch.as_tensor(roles, device=entities.device).expand_as(entities))
        return self.key_concepts(keys)

    def key_concepts(self, keys: Tensor) -> Tensor:
        """Concepts ``(n, d)`` of entity keys ``(n,)`` (:meth:`entity_keys`).

        With the memory, key ``k``'s patch *is* slot ``k``'s frozen key, so its top-1 read is slot ``k``: the value is
        read by index instead of by a similarity search over every slot (the same result, without the ``(n, K)``
        similarity matrix that dominates a training step once there are ``N * 2R`` slots).
        """
        if self.config.memory:
            return self.concept_norm(self.memory.values[keys])
        return self.encode_patches(*self._key_patches(keys))

    def all_entity_concepts(self) -> Tensor:
        """Concepts ``(N, d)`` of every known entity.

        In eval mode with autograd off (queries: :meth:`answer`, :meth:`rank_entities`) the result is cached with
        a copy of the weights it was computed from (every parameter and buffer) and reused while the weights are
        equal to that copy, so a query costs one predictor pass, one ``(1, N)`` similarity and a comparison of
        the weights instead of re-encoding all ``N`` entities. Comparing values rather than version counters also
        catches writes that bypass them (``p.data.copy_``, as EMA weight swaps do). In training mode or with
        autograd on, the concepts are always recomputed (and carry gradients).
        """
        if self.training or torch.is_grad_enabled():
            return self.entity_concepts()
        weights = [t.detach() for t in itertools.chain(self.parameters(), self.buffers())]
        cache = self._entity_concepts_cache
        if cache is None or not _equal_tensors(cache[0], weights):
            cache = self._entity_concepts_cache = ([w.clone() for w in weights], self.entity_concepts())
        return cache[1]

    def relation_concepts(self, relations: Tensor) -> Tensor:
        """Concepts ``(n, d)`` of relation ids ``(n,)``."""
        toks = self.relation_token_ids[relations][:, None]
        return self.encode_patches(toks, torch.ones(len(toks), dtype=torch.long, device=toks.device))

    def mask_concept(self) -> Tensor:
        """Concept ``(1, d)`` of the mask patch."""
        tok = torch.full((1, 1), self.config.mask_token_id, dtype=torch.long, device=self.entity_token_ids.device)
        return self.encode_patches(tok, torch.ones(1, dtype=torch.long, device=tok.device))

    def predict(self, head_concepts: Tensor, relation_concepts: Tensor) -> Tensor:
        """Predicted tail concepts ``(B, d)`` from ``(B, d)`` head and relation concepts."""
        B = head_concepts.shape[0]
        x = torch.stack([head_concepts, relation_concepts, self.mask_concept().expand(B, -1)], 1)  # (B, 3, d)
        for block in self.predictor:
            x = block(x)
        return self.output_norm(x[:, -1])

    def similarity(self, predicted: Tensor, concepts: Tensor) -> Tensor:
        """Logits ``(B, C) = cos(predicted_b, concepts_c) / tau``."""
        return F.normalize(predicted, dim=-1) @ F.normalize(concepts, dim=-1).t() / self.config.temperature

    # ------------------------------------------------------------------ training and scoring
    def forward(self, heads: Tensor, relations: Tensor, tails: Tensor, negatives: Optional[Tensor] = None,
                negative_relations: Optional[Tensor] = None) -> ReversalOutput:
        """Contrastive loss of facts ``(heads, relations, tails)`` (``(B,)`` ids).

        The candidates are the concepts of the unique entity keys (:meth:`entity_keys`: the entity ids unless
        ``binding="relation"``) of the heads (in role ``relations``), the tails (in role ``relations^-1``) and
        ``negatives``, and of the unique relations among ``relations`` and ``negative_relations``; the target
        of row ``b`` is the concept of ``tails[b]``'s key.

        Args:
            negatives: further entity keys ``(n,)`` (e.g. the other processes' batches, or all keys).
            negative_relations: further relation ids.

        Returns:
            ``loss`` (mean cross-entropy) and ``logits`` ``(B, C)`` over the sorted unique candidates.
        """
        head_keys = self.entity_keys(heads, relations)
        tail_keys = self.entity_keys(tails, self.inverse_relation(relations))
        extra = [] if negatives is None else [negatives.reshape(-1)]
        cand = torch.unique(torch.cat([head_keys, tail_keys, *extra]))  # sorted
        extra_r = [] if negative_relations is None else [negative_relations.reshape(-1)]
        rels = torch.unique(torch.cat([relations, *extra_r]))
        cand_c, rel_c = self.key_concepts(cand), self.relation_concepts(rels)
        pred = self.predict(cand_c[torch.searchsorted(cand, head_keys.contiguous())],
                            rel_c[torch.searchsorted(rels, relations.contiguous())])
        logits = self.similarity(pred, torch.cat([cand_c, rel_c]))
        return ReversalOutput(loss=F.cross_entropy(logits.float(), torch.searchsorted(cand, tail_keys.contiguous())), logits=logits)

    def score_entities(self, heads: Tensor, relations: Tensor) -> Tensor:
        """Log-softmax over all entities ``(Q, N)`` of ``cos(prediction, c_e) / tau``, ``c_e`` the concept of
        entity ``e`` in the answer's role ``relation^-1`` (every entity has one role with ``binding="entity"``,
        whose concepts are cached between queries: :meth:`all_entity_concepts`)."""
        pred = self.predict(self.entity_concepts(heads, relations), self.relation_concepts(relations))
        if self.config.binding == "entity":
            return self.similarity(pred, self.all_entity_concepts()).float().log_softmax(-1)
        roles = self.inverse_relation(relations)
        scores = torch.empty(len(heads), self.num_entities, device=pred.device)
        for role in torch.unique(roles):  # the answer's role: every entity's concept in it, once per role
            rows = roles == role
            scores[rows] = self.similarity(pred[rows], self.entity_concepts(None, role)).float()
        return scores.log_softmax(-1)


def _equal_tensors(a: Sequence[Tensor], b: Sequence[Tensor]) -> bool:
    """Same length, and pairwise the same shape, dtype, device and values."""
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and x.device == y.device and torch.equal(x, y) for x, y in zip(a, b)
    )


def _register_auto_classes() -> None:
    """Let ``AutoConfig`` / ``AutoModel`` (and ``AutoModelForCausalLM`` for the baseline) load saved reversal
    models once ``flowlab.jepa`` is imported (e.g. ``AutoModel.from_pretrained(path)`` of a pushed model)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    for config_cls, model_cls, autos in ((JEPAConfig, JEPAConceptModel, (AutoModel,)),
                                         (ReversalGPT2Config, ReversalGPT2, (AutoModel, AutoModelForCausalLM))):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        for auto in autos:
            auto.register(config_cls, model_cls, exist_ok=True)


_register_auto_classes()
