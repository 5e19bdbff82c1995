"""Online RL fine-tuning of flow models: DiffusionNFT (``recipe: nft``) and FlowGRPO (``recipe: flowgrpo``).

Both recipes run in the shared :class:`~flowlab.train.trainer.Trainer`. Every optimiser step:

1. draws ``train.batch_size`` conditions (class labels or prompts) and repeats each ``rl.group_size``
   times;
2. **rolls out** the policy from noise drawn for the global batch (so any number of processes draws
   the same samples): DiffusionNFT with the *old* policy and any flowlab ODE solver
   (``rl.solver``, DPM-Solver++(2M) ``multistep`` by default); FlowGRPO with the current policy and the
   marginal-preserving SDE of :mod:`flowlab.flow.sde` (``MarginalSDE.flowgrpo``), keeping every step's
   log-probability; both through :func:`flowlab.flow.sampling.sample`;
3. scores the clean samples with the configured rewards (``rl.rewards``, see :mod:`flowlab.rewards`),
   gathers them from every process and computes group advantages with a global std
   (:mod:`flowlab.nft.advantages`); unscored (NaN) samples are dropped and counted;
4. computes the method's loss, one part per chunk of training timesteps (each part is
   back-propagated before the next is built);
5. after the optimiser step, DiffusionNFT soft-updates the old policy:
   ``theta_old <- eta * theta_old + (1 - eta) * theta`` with ``eta = min(rate * max(step - delay, 0), eta_max)``.

The maths of each loss is in :meth:`NFTRecipe.method_losses` and :meth:`FlowGRPORecipe.method_losses`;
conventions: flowlab time (``t = 0`` noise) and velocity ``u = data - noise`` throughout, converted
from / to diffusers' sigma convention only inside :mod:`flowlab.flow.conventions`.
"""
from __future__ import annotations

import itertools
import os
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from accelerate import PartialState
from accelerate.utils import extract_model_from_parallel
from torch import Tensor, nn

from ..flow.conventions import PREDICTION_T_EPS
from ..flow.sampling import sample
from ..flow.sde import MarginalSDE
from ..flow.time_samplers import build_time_sampler
from ..errors import ConfigError
from ..card_data import looks_like_repo_id
from ..train.config import Config, load_config
from ..train.recipe import Recipe, StepContext, StepOutput
from .advantages import group_advantages, optimality_probability
from .losses import grpo_loss, nft_loss
from .config import FlowlabRLConfig, FluxRLConfig, GRPOConfig, NFTConfig, SD3RLConfig, SDUNetRLConfig
from .memory import SavedActivationMeter, static_memory
from .policy import FlowPolicy, LoraSpec, Policy

__all__ = ["NFTConfig", "GRPOConfig", "RLRecipe", "NFTRecipe", "FlowGRPORecipe", "ConditionDataset", "Rollout"]


class ConditionDataset(torch.utils.data.Dataset):
    """The conditions RL draws from: class labels (``None`` = unconditional) or prompts."""

    def __init__(self, conditions: list):
        self.conditions = list(conditions)

    def __len__(self) -> int:
        return len(self.conditions)

    def __getitem__(self, i: int) -> dict:
        return {"index": torch.tensor(i)}

    def get_batch(self, indices: Tensor) -> dict:
        return {"index": torch.as_tensor(indices).long()}


@dataclass
class Rollout:
    """A local rollout batch.

    Attributes:
        x: clean samples ``(N, ...)``.
        cond: model conditioning, batched along dim 0.
        conditions: the ``N`` raw conditions (prompts or class labels).
        metadata: ``N`` dicts handed to the rewards (a prompt set's per-prompt metadata).
        per_sample: method-specific tensors with the samples along dim 0 (e.g. SDE states ``(N, K+1, ...)``).
        shared: method-specific values common to all samples (e.g. the time grid).
        rows: the samples' row indices in this process's full rollout batch ``(N,)`` (a subset when
            several optimiser steps share one rollout batch).
    """

    x: Tensor
    cond: Any
    conditions: list
    metadata: list
    per_sample: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)
    rows: Tensor | None = None

    def __post_init__(self) -> None:
        if self.rows is None:
            self.rows = torch.arange(self.x.shape[0])

    def select(self, idx: Tensor) -> "Rollout":
        """The samples at local positions ``idx`` (1-D int64)."""
        i = idx.tolist()
        return Rollout(
            x=self.x[idx.to(self.x.device)], cond=_index_cond(self.cond, idx), conditions=[self.conditions[k] for k in i],
            metadata=[self.metadata[k] for k in i], per_sample={k: v[idx.to(v.device)] for k, v in self.per_sample.items()},
            shared=self.shared, rows=self.rows[idx],
        )


def _gather(t: Tensor) -> Tensor:
    from accelerate.utils import gather

    from accelerate import PartialState

    return gather(t) if PartialState().num_processes > 1 else t


class RLRecipe(Recipe):
    """Shared machinery of the RL recipes (rollouts, rewards, advantages, evaluation, saving)."""

    artifact_name = "pipeline"

    def __init__(self, config: Config):
        super().__init__(config)
        self.rl: FlowlabRLConfig | SD3RLConfig = config.rl  # checked by its own settings class (flowlab.nft.config)
        self.reward = None
        self._async = None
        self.policy: Policy | None = None
        self._evaluator = None  # the digits quality guards' classifier, on first evaluation
        self._rollouts: dict[int, tuple] = {}  # micro-step -> the rollout batch shared by rl.steps_per_rollout steps
        self._first_step_done = False

    # ----------------------------------------------------------------- set-up
    def prerequisites(self) -> list[Config]:
        """The run that trains ``rl.base`` when it names a local folder that does not exist yet
        (with ``rl.base_config``, writing to the folder above ``rl.base``)."""
        base_config = self.rl.missing_base_config()
        if base_config is None:
            return []
        return [load_config(base_config, [f"output_dir={os.path.dirname(os.path.normpath(self.rl.base))}"])]

    def prepare(self) -> None:
        if self.rl.missing_base_config() is not None:
            raise ConfigError(
                f"rl.base: {self.rl.base} does not exist; train it first with rl.base_config={self.rl.base_config} "
                "(the command line and flowlab.recipes.train do this for you)"
            )

    def build_dataset(self):
        self.train_set, self.eval_set = self.rl.prompt_sets()
        return ConditionDataset(self.train_set.prompts)

    def _lora(self, default_targets: list[str]) -> LoraSpec | None:
        rl = self.rl
        if rl.lora_rank == 0:
            return None
        return LoraSpec(rl.lora_rank, rl.lora_alpha or 2.0 * rl.lora_rank, rl.lora_targets or default_targets)

    def build_model(self, dataset) -> nn.Module:
        from ..rewards import AsyncReward, build_rewards
        from ..rewards.combined import CombinedReward

        rl = self.rl
        self.conditions = dataset.conditions
        self.reward = build_rewards(rl.rewards, key="rl.rewards", combine=rl.reward_combine)
        # several rewards: each chunk yields raw component scores (N, K); they are combined once over
        # the gathered global batch (CombinedReward.combine_global), so groups are scored alike
        self._combined = isinstance(self.reward, CombinedReward)
        self._score_fn = self.reward.raw_scores if self._combined else self.reward
        self._async = AsyncReward(self._score_fn, max_workers=rl.reward_workers) if rl.reward_workers > 0 else None
        self.policy = _POLICY_BUILDERS[type(rl)](self, rl)
        if rl.gradient_checkpointing:
            self.policy.enable_gradient_checkpointing()
        self._log_memory_layout()
        return self.policy

    # ----------------------------------------------------------------- memory layout
    def images_per_part(self) -> tuple[int, int]:
        """``(images per backward part, images per rollout chunk)`` per process: ``rl.micro_batch``
        samples (all local samples when 0) times the timesteps of a part, doubled by CFG."""
        rl, t = self.rl, self.config.train
        P = PartialState().num_processes
        local = max(1, t.batch_size * rl.group_size // (P * t.grad_accum_steps) // rl.steps_per_rollout)
        mb = min(rl.micro_batch or local, local)
        cfg = 2 if rl.guidance_scale != 1.0 else 1
        return mb * self.timesteps_per_part() * (cfg if self.trains_with_guidance else 1), mb * cfg

    trains_with_guidance = False  # does the training forward run the CFG field (FlowGRPO)?

    def timesteps_per_part(self) -> int:
        """Training timesteps per backward part."""
        return 1

    def _log_memory_layout(self) -> None:
        """Log (and keep for the first step's metrics) images per part and the static memory estimate."""
        per_part, per_chunk = self.images_per_part()
        mem = static_memory(self.policy)
        self._memory_logs = {
            "memory/images_per_backward_part": per_part, "memory/images_per_rollout_chunk": per_chunk,
            "memory/weights_gb": mem.weights / 2**30, "memory/optimizer_state_gb": mem.optimizer_state / 2**30,
            "memory/gradients_gb": mem.gradients / 2**30,
        }
        PartialState().print(
            f"flowlab rl: {per_part} images per backward part, {per_chunk} per rollout chunk (per process); "
            f"weights {mem.weights / 2**30:.3f} GB, optimiser state {mem.optimizer_state / 2**30:.3f} GB, "
            f"gradients {mem.gradients / 2**30:.3f} GB; activations are measured on the first part"
        )

    def _sd3_policy(self, rl: SD3RLConfig) -> Policy:
        """``rl.pipeline: sd3``: LoRA (or full) fine-tuning of an SD3 pipeline's transformer, through
        :class:`~flowlab.families.SD3Adapter` (CFG in rollouts)."""
        from .family_policy import SD3Policy

        return SD3Policy.from_pretrained(
            rl.base, lora=self._lora(SD3Policy.default_lora_targets), reference=self.needs_reference,
            resolution=rl.resolution, max_sequence_length=rl.max_sequence_length, guidance_scale=rl.guidance_scale,
        )

    def _cache_prompt_embeddings(self, policy: Policy) -> None:
        """``rl.cache_prompt_embeddings``: encode the training and held-out prompts once (on the
        device, at the first step), then move the text encoders off it."""
        if not getattr(self.rl, "cache_prompt_embeddings", False):
            return
        prompts = list(self.train_set.prompts) + (list(self.eval_set.prompts) if self.eval_set is not None else [])
        size = policy.cache_prompt_embeddings(prompts)
        self._memory_logs["memory/prompt_cache_gb"] = size / 2**30
        PartialState().print(f"flowlab rl: cached the embeddings of {len(set(prompts))} prompts ({size / 2**30:.3f} GB, CPU); text encoders moved to the CPU")

    def _flux_policy(self, rl: FluxRLConfig) -> Policy:
        """``rl.pipeline: flux``: FLUX.1 through :class:`~flowlab.families.FluxAdapter` (guidance embedding ``rl.guidance_scale``)."""
        from ..families.flux import FluxAdapter
        from .family_policy import FluxPolicy

        return FluxPolicy.from_pretrained(
            rl.base, lora=self._lora(FluxAdapter.default_lora_targets), reference=self.needs_reference,
            resolution=rl.resolution, max_sequence_length=rl.max_sequence_length, guidance_scale=rl.guidance_scale,
        )

    def _sd_unet_policy(self, rl: SDUNetRLConfig) -> Policy:
        """``rl.pipeline: sd_unet``: an SD1.5/2.1/SDXL UNet through :class:`~flowlab.families.UNetAdapter` (CFG in rollouts)."""
        from ..families.unet import UNetAdapter
        from .family_policy import FamilyPolicy

        adapter = UNetAdapter.from_pretrained(rl.base, key="rl.base", resolution=rl.resolution, guidance_scale=rl.guidance_scale)
        return FamilyPolicy(adapter, lora=self._lora(UNetAdapter.default_lora_targets), reference=self.needs_reference)

    def _flowlab_policy(self, rl: FlowlabRLConfig) -> Policy:
        """``rl.pipeline: flowlab``: a FlowPipeline's velocity model; ``rl.class_labels`` must be its classes."""
        from ..pipelines.loading import load_flow_pipeline

        pipe = load_flow_pipeline(rl.base, "rl.base")
        net = pipe.velocity_model
        targets = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]  # every linear layer, by full name
        if net.num_classes == 0 and rl.class_labels:
            raise ConfigError(f"rl.class_labels: the base model {rl.base} is unconditional; leave rl.class_labels empty")
        for c in rl.class_labels:
            if not 0 <= c < max(net.num_classes, 1):
                raise ConfigError(f"rl.class_labels: {c} is not a class of the base model (0..{net.num_classes - 1})")
        return FlowPolicy(net, pipe.scheduler, lora=self._lora(targets), reference=self.needs_reference)

    @property
    def needs_reference(self) -> bool:
        return False

    # ----------------------------------------------------------------- rollouts and rewards
    def _policy(self, model: nn.Module) -> Policy:
        return extract_model_from_parallel(model)

    def _field(self, policy: Policy, cond, role: str):
        return policy.field(cond, role, self.rl.guidance_scale)

    def _score(self, policy: Policy, chunks: list[tuple[Tensor, list, list]]) -> Tensor:
        """Scores of decoded samples, chunk by chunk (overlapping with the caller when asynchronous):
        ``(N,)``, or the raw component scores ``(N, K)`` of several rewards (combined later, over the
        global batch). Each sample's metadata (its prompt set entry) goes to the rewards."""
        scores = []
        for x, conds, meta in chunks:
            images = policy.decode(x).cpu()
            prompts = [c if isinstance(c, str) else ("" if c is None else str(c)) for c in conds]
            scores.append(self._async.submit(images, prompts, meta) if self._async else self._score_fn(images, prompts, meta))
        return torch.cat([s.result() if hasattr(s, "result") else s for s in scores]).float()

    def _combine(self, scores: Tensor) -> tuple[Tensor, dict]:
        """One reward per sample from :meth:`_score`'s output of a whole (global) batch, and the mean of
        each component (several rewards: ``CombinedReward.combine_global``, ``rl.reward_combine``)."""
        if not self._combined:
            return scores, {}
        means = {}
        for k, name in enumerate(self.reward.names):
            col = scores[:, k]
            col = col[torch.isfinite(col)]
            means[f"reward/{name}"] = float(col.mean()) if col.numel() else float("nan")
        return self.reward.combine_global(scores), means

    def _rollout_inputs(self, policy: Policy, batch: dict, ctx: StepContext, steps: int) -> tuple[list, Any, Tensor, Tensor]:
        """This process's conditions (each repeated ``G`` times), their model conditioning, the initial
        noise (drawn for the global batch, then sliced) and the sampler's time grid of ``steps`` steps."""
        G = self.rl.group_size
        index = batch["index"].tolist()
        conds = [self.train_set.prompts[i] for i in index for _ in range(G)]
        meta = [dict(self.train_set.metadata[i]) for i in index for _ in range(G)]
        shape = policy.sample_shape
        noise = ctx.draw(lambda n, g: torch.randn((n, G, *shape), generator=g)).reshape(-1, *shape)
        grid = policy.time_grid(steps, shift=self.rl.shift, device=ctx.device)
        return conds, meta, policy.encode(conds), noise, grid

    def _chunk_size(self, n: int) -> int:
        """Samples per rollout chunk, per reward batch and per backward part: ``rl.micro_batch`` (all ``n`` when 0)."""
        return max(1, min(self.rl.micro_batch or n, n))

    @abstractmethod
    def rollout(self, policy: Policy, batch: dict, ctx: StepContext) -> Rollout:
        """Sample the local rows' ``G`` samples each (noise drawn for the global batch, then sliced)."""

    def _advantages(self, scores: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor, dict]:
        """Group advantages over the whole global micro-batch (scores gathered from every process; several
        rewards are combined on the gathered matrix, so their statistics cover the global batch)."""
        G = self.rl.group_size
        n_local = scores.shape[0]
        rows = torch.arange(ctx.start, ctx.end).repeat_interleave(G)
        all_rewards, component_means = self._combine(_gather(scores.to(ctx.device)).cpu())
        all_rows = _gather(rows.to(ctx.device)).cpu()
        adv = group_advantages(all_rewards, all_rows, clip=self.rl.adv_clip, std_floor=self.rl.adv_std_floor)
        from accelerate import PartialState

        rank = PartialState().process_index if PartialState().num_processes > 1 else 0
        sl = slice(rank * n_local, (rank + 1) * n_local)
        finite = all_rewards[torch.isfinite(all_rewards)]
        logs = {
            "reward_mean": float(finite.mean()) if finite.numel() else float("nan"),
            "reward_std": float(finite.std(unbiased=False)) if finite.numel() > 1 else 0.0,
            "reward_nonfinite": adv.num_nonfinite,
            "zero_variance_groups": adv.num_zero_variance_groups,
        }
        info = getattr(self.reward, "info", None) or {}
        for k, v in info.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                logs[f"reward/{k}"] = float(v)
        logs.update(component_means)
        return adv.advantages[sl].to(ctx.device), adv.valid[sl].to(ctx.device), logs

    # ----------------------------------------------------------------- the step
    def training_losses(self, model: nn.Module, batch: dict, ctx: StepContext) -> Iterator[StepOutput]:
        """Rollouts, rewards and advantages, then the method's loss in parts.

        With ``rl.steps_per_rollout = M > 1`` (the reference's ``gradient_step_per_epoch``), the
        rollout batch of step ``s`` (``s % M == 0``) is shuffled and split into ``M`` parts, and steps
        ``s .. s + M - 1`` each train on one part: from the second on, the policy has moved since the
        rollouts, which is where FlowGRPO's ratio clip acts. Those steps' data batches are not used. A
        run resumed inside such a cycle rolls out afresh.
        """
        policy = self._policy(model)
        if not self._first_step_done:
            self._cache_prompt_embeddings(policy)
        M = self.rl.steps_per_rollout
        phase = ctx.step % M
        cached = self._rollouts.get(ctx.micro)
        if cached is None or cached[0] != ctx.step - phase:
            with torch.no_grad():
                ro = self.rollout(policy, batch, ctx)
                scores = self._score(policy, self._chunks(ro))
            adv, valid, logs = self._advantages(scores, ctx)
            order = torch.randperm(ro.x.shape[0], generator=ctx.generator) if M > 1 else torch.arange(ro.x.shape[0])
            cached = (ctx.step, ro, adv, valid, logs, order)
            self._rollouts = {ctx.micro: cached, **{k: v for k, v in self._rollouts.items() if v[0] == ctx.step}} if M > 1 else {}
        _, ro, adv, valid, logs, order = cached
        if M > 1:
            idx = order.tensor_split(M)[phase]
            ro, adv, valid = ro.select(idx), adv[idx.to(adv.device)], valid[idx.to(valid.device)]
        parts = iter(self.method_losses(model, policy, ro, adv, valid, ctx))
        if not self._first_step_done:  # measure the saved activations of the first part
            with SavedActivationMeter() as meter:
                first = next(parts, None)
            self._first_step_done = True
            self._memory_logs["memory/activations_per_part_gb"] = meter.bytes / 2**30
            PartialState().print(f"flowlab rl: activations saved by one backward part: {meter.bytes / 2**30:.3f} GB")
            logs = {**logs, **self._memory_logs}
            parts = itertools.chain([first] if first is not None else [], parts)
        head = True
        for part in parts:
            if head:
                part.logs = {**logs, **part.logs}
                head = False
            yield part

    def _chunks(self, ro: Rollout) -> list[tuple[Tensor, list, list]]:
        n, k = ro.x.shape[0], self._chunk_size(ro.x.shape[0])
        return [(ro.x[i : i + k], ro.conditions[i : i + k], ro.metadata[i : i + k]) for i in range(0, n, k)]

    @abstractmethod
    def method_losses(self, model, policy, ro: Rollout, adv: Tensor, valid: Tensor, ctx: StepContext) -> Iterator[StepOutput]:
        """The method's loss on rollouts ``ro`` with advantages ``adv`` (``valid``: scored samples), in
        parts (one per chunk of training timesteps)."""

    # ----------------------------------------------------------------- evaluation and saving
    def _eval_conditions(self, n: int | None) -> tuple[list, list]:
        """``n`` evaluation conditions and their metadata: the held-out set (all of it when ``n`` is
        ``None``), else the training conditions in turn (``rl.eval_samples`` of them)."""
        source = self.eval_set if self.eval_set is not None else self.train_set
        if n is None:
            n = len(self.eval_set) if self.eval_set is not None else self.rl.eval_samples
        idx = [i % len(source) for i in range(n)]
        return [source.prompts[i] for i in idx], [dict(source.metadata[i]) for i in idx]

    @torch.no_grad()
    def _eval_samples(self, policy: Policy, conds: list, generator: torch.Generator) -> Tensor:
        """Samples of ``conds`` with the evaluation solver and steps (``rl.eval_solver``,
        ``rl.eval_steps``) and ``rl.eval_guidance_scale`` (1: no CFG), in chunks of ``rl.micro_batch``."""
        rl = self.rl
        device = next(policy.parameters()).device
        grid = policy.time_grid(rl.eval_steps, shift=rl.shift, device=device)
        k = self._chunk_size(len(conds)) if rl.micro_batch else 256
        out = []
        for i in range(0, len(conds), k):
            c = conds[i : i + k]
            noise = torch.randn((len(c), *policy.sample_shape), generator=generator)
            field = policy.field(policy.encode(c), "current", rl.eval_guidance_scale)
            out.append(sample(field, noise.to(device), solver=rl.eval_solver, times=grid, path=policy.path).x)
        return torch.cat(out)

    def sample_images(self, model, num_images, generator):
        conds, _ = self._eval_conditions(num_images)
        return model.decode(self._eval_samples(model, conds, generator)).cpu()

    def evaluate(self, model, generator) -> dict:
        """Every configured reward (each component's mean, and their combination) on the held-out
        prompts (or the training conditions), one sample each, without CFG unless ``rl.eval_guidance_scale``."""
        conds, meta = self._eval_conditions(None)
        x = self._eval_samples(model, conds, generator)
        images = model.decode(x).cpu()
        scores, out = self._combine(self._score(model, [(x, conds, meta)]))
        finite = scores[torch.isfinite(scores)]
        out = {"reward": float(finite.mean()) if finite.numel() else float("nan"), **out}
        target = self._digits_target()
        if target is not None:
            from ..metrics.digits import DigitsEvaluator
            from .quality import digits_quality

            if self._evaluator is None:  # loaded once: it embeds the whole train split
                self._evaluator = DigitsEvaluator.load()
            out.update(digits_quality(images, target, self._evaluator))
        return out

    def _digits_target(self) -> int | None:
        """The fixed target class of a single digits-classifier reward (for the quality guards), else ``None``
        (also for ``target: prompted``, whose class varies per sample: ``eval/bench_nft_cond.py`` measures it per class)."""
        specs = self.rl.rewards
        if isinstance(self.rl, FlowlabRLConfig) and len(specs) == 1 and specs[0].get("name") == "digits_classifier":
            target = specs[0].get("target", 0)
            return target if isinstance(target, int) else None
        return None

    def save_final(self, model, directory: str) -> None:
        model.save(directory)

    def card_data(self, repo_id: str) -> dict:
        """Model-card fields for ``flowlab push`` (see :meth:`Recipe.card_data`): a :class:`FlowPipeline`
        for ``rl.pipeline: flowlab``; for ``sd3`` the LoRA (``load_lora_weights``) or the fine-tuned
        transformer, loaded into the base pipeline."""
        rl = self.rl
        method = {"nft": "DiffusionNFT", "flowgrpo": "FlowGRPO"}.get(self.name, self.name)
        rewards = ", ".join(f"`{spec.get('name', '?')}`" for spec in rl.rewards)
        data = rl.card_data(repo_id)
        data["tags"] = [*data.get("tags", []), "reinforcement-learning", method.lower()]
        data["description"] = f"Fine-tuned from `{rl.base}` with {method} (flowlab `recipe: {self.name}`) against the reward(s) {rewards}."
        if looks_like_repo_id(rl.base):
            data["base_model"] = rl.base
        return data


class NFTRecipe(RLRecipe):
    """DiffusionNFT: negative-aware fine-tuning on the forward process (see the module docstring).

    Loss (flowlab convention; ``u`` the forward-process target velocity at ``x_t``)::

        u+ = (1 - beta) u_old + beta u_theta,    u- = (1 + beta) u_old - beta u_theta
        velocity:       L = E[ r ||u+ - u||^2 + (1 - r) ||u- - u||^2 ]
        x0_normalized:  x+- = x_t + (1 - t) u+-  (the data predictions, linear path),
                        w+- = mean|x+- - x| (no grad, >= 1e-5),
                        L = c E[ (r ||x+ - x||^2 / w+ + (1 - r) ||x- - x||^2 / w-) / beta ]   (c = adv clip, 5)
        + kl_coef * ||u_theta - u_ref||^2
    """

    name = "nft"
    rollout_role = "old"

    @property
    def needs_reference(self) -> bool:
        return self.config.nft.kl_coef > 0

    def timesteps_per_part(self) -> int:
        K = self.train_timesteps(self.rl.num_inference_steps)
        return min(self.config.nft.timestep_chunk or K, K)

    def train_timesteps(self, num_steps: int) -> int:
        """Training timesteps per sample: ``int(num_steps * nft.timestep_fraction)`` of the sampler's grid,
        at least 1 (the reference's ``num_train_timesteps``, ``scripts/train_nft_sd3.py`` line 569: 9 of 10)."""
        return max(1, int(num_steps * self.config.nft.timestep_fraction))

    def rollout(self, policy, batch, ctx) -> Rollout:
        conds, meta, cond, noise, grid = self._rollout_inputs(policy, batch, ctx, self.rl.num_inference_steps)
        xs = []
        k = self._chunk_size(noise.shape[0])
        for i in range(0, noise.shape[0], k):
            c = _slice_cond(cond, i, i + k)
            field = self._field(policy, c, self.rollout_role)
            xs.append(sample(field, noise[i : i + k], solver=self.rl.solver, times=grid, path=policy.path).x)
        return Rollout(x=torch.cat(xs), cond=cond, conditions=conds, metadata=meta, shared={"grid": grid})

    def _train_times(self, ro: Rollout, ctx: StepContext) -> Tensor:
        """Training times ``(N, K)`` of the rollout's samples: a random ``K`` of the sampler's grid per
        sample (without ``t = 1``), or ``K`` sampled times (``nft.timesteps: sampled``)."""
        nft, G = self.config.nft, self.rl.group_size
        grid = ro.shared["grid"][:-1].float().cpu()  # the sampler's times, without t = 1 (clean data)
        K = self.train_timesteps(len(grid))
        if nft.timesteps == "grid":
            perm = ctx.draw(lambda n, g: torch.argsort(torch.rand((n, G, len(grid)), generator=g), dim=-1)).reshape(-1, len(grid))
            return grid[perm.cpu()[ro.rows, :K]].to(ctx.device)
        f = self.config.flow
        sampler = build_time_sampler(f.time_sampler, mean=f.logit_mean, std=f.logit_std, mode_scale=f.mode_scale, shift=f.shift)
        return ctx.draw(lambda n, g: sampler.sample(n * G * K, g).reshape(n, G, K)).reshape(-1, K)[ro.rows.to(ctx.device)]

    def method_losses(self, model, policy, ro, adv, valid, ctx):
        """NFT loss in parts of ``rl.micro_batch`` samples x ``nft.timestep_chunk`` timesteps; the parts
        add up to the mean over scored samples and their ``K`` training timesteps."""
        nft, rl, G = self.config.nft, self.rl, self.rl.group_size
        r = optimality_probability(adv, rl.adv_clip or 5.0)
        times = self._train_times(ro, ctx)  # (N, K)
        N, K = times.shape
        shape = policy.sample_shape
        eps_all = ctx.draw(lambda n, g: torch.randn((n, G, K, *shape), generator=g)).reshape(-1, K, *shape)[ro.rows.to(ctx.device)]
        chunk = nft.timestep_chunk or K
        keep = valid.float()
        total = keep.sum().clamp_min(1.0)
        path = policy.path
        beta = nft.guidance_beta
        mb = self._chunk_size(N)
        for i in range(0, N, mb):
            rows = slice(i, i + mb)
            cond_i = _slice_cond(ro.cond, i, i + mb)
            for j in range(0, K, chunk):
                kk = min(chunk, K - j)
                t = times[rows, j : j + kk].reshape(-1).clamp(0.0, 1.0 - PREDICTION_T_EPS)
                x = ro.x[rows].repeat_interleave(kk, dim=0)
                eps = eps_all[rows, j : j + kk].reshape(-1, *shape).to(x.dtype)
                cond = _repeat_cond(cond_i, kk)
                ps = path.sample(eps, x, t.to(x.dtype))
                u_theta = model(ps.x_t, t, cond)
                with torch.no_grad():
                    u_old = policy.velocity(ps.x_t, t, cond, "old")
                rr = r[rows].repeat_interleave(kk)
                per = nft_loss(u_theta, u_old, ps.dx_t, rr, beta, nft.loss, path, ps.x_t, t, x, scale=rl.adv_clip or 5.0)
                logs = {}
                if nft.kl_coef > 0:
                    with torch.no_grad():
                        u_ref = policy.velocity(ps.x_t, t, cond, "ref")
                    kl = ((u_theta - u_ref) ** 2).flatten(1).mean(1)
                    per = per + nft.kl_coef * kl
                    logs["kl"] = float(_part_sum(kl.detach(), keep[rows], total))
                loss = _part_sum(per, keep[rows], total) * kk / K  # parts add up to the mean over samples and timesteps
                if i == 0 and j == 0:
                    logs["optimality_mean"] = float(_part_sum(r, keep, total))
                yield StepOutput(loss=loss, logs=logs)

    def old_decay(self, step: int) -> float:
        nft = self.config.nft
        return min(nft.old_decay_rate * max(step - nft.old_decay_delay, 0), nft.old_decay_max)

    def on_step_end(self, model, step: int) -> dict:
        """Soft-update the old policy after the last optimiser step of each rollout batch (every
        ``rl.steps_per_rollout`` steps; the reference updates it once per epoch, line 1035)."""
        if (step + 1) % self.rl.steps_per_rollout:
            return {}
        eta = self.old_decay(step)
        model.update_old(eta)
        return {"old_decay": eta}


class FlowGRPORecipe(RLRecipe):
    """FlowGRPO: GRPO on the marginal-preserving SDE of the flow (see :mod:`flowlab.flow.sde`).

    Loss per trained SDE step ``k`` (ratio of the step's Gaussian likelihoods under the current
    and the rollout policy)::

        ratio = exp(log p_theta(x_{k+1} | x_k) - log p_old(x_{k+1} | x_k))
        L = E[ max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) ] + kl_coef E[ ||mu_theta - mu_ref||^2 / (2 std_k^2) ]
    """

    name = "flowgrpo"
    rollout_role = "current"

    @property
    def needs_reference(self) -> bool:
        return self.config.grpo.kl_coef > 0

    trains_with_guidance = True

    def timesteps_per_part(self) -> int:
        K = self.train_timesteps(self.rl.num_inference_steps)
        return min(self.config.grpo.timestep_chunk or K, K)

    def train_timesteps(self, num_steps: int) -> int:
        """Trained SDE steps: the first ``int(num_steps * grpo.timestep_fraction)`` (at least 1), in order,
        as flow_grpo ``scripts/train_sd3.py`` (line 345, and ``train_timesteps = range(num_train_timesteps)``)."""
        return max(1, int(num_steps * self.config.grpo.timestep_fraction))

    def rollout(self, policy, batch, ctx) -> Rollout:
        G, K, shape = self.rl.group_size, self.rl.num_inference_steps, policy.sample_shape
        conds, meta, cond, noise, grid = self._rollout_inputs(policy, batch, ctx, K)
        step_noise = ctx.draw(lambda n, g: torch.randn((n, G, K, *shape), generator=g)).reshape(-1, K, *shape).to(noise.dtype)
        xs, states, log_probs = [], [], []
        k = self._chunk_size(noise.shape[0])
        for i in range(0, noise.shape[0], k):
            field = self._field(policy, _slice_cond(cond, i, i + k), self.rollout_role)
            traj = sample(field, noise[i : i + k], times=grid, sde=self._sde(policy), noises=step_noise[i : i + k].transpose(0, 1),
                          return_trajectory=True)
            xs.append(traj.x)
            states.append(traj.states.transpose(0, 1))  # (n, K + 1, ...)
            log_probs.append(traj.log_probs.transpose(0, 1))  # (n, K)
        return Rollout(
            x=torch.cat(xs), cond=cond, conditions=conds, metadata=meta,
            per_sample={"states": torch.cat(states), "log_probs": torch.cat(log_probs)}, shared={"times": traj.times},
        )

    def _sde(self, policy: Policy) -> MarginalSDE:
        """FlowGRPO's SDE (``grpo.noise_level``) on the policy's path."""
        return MarginalSDE.flowgrpo(self.config.grpo.noise_level, policy.path)

    def method_losses(self, model, policy, ro, adv, valid, ctx):
        """FlowGRPO loss in parts of ``rl.micro_batch`` samples x ``grpo.timestep_chunk`` SDE steps.
        Samples with zero advantage are left out of the mean, as the reference filters them
        (flow_grpo ``scripts/train_sd3.py`` lines 796-817)."""
        g = self.config.grpo
        times = ro.shared["times"].to(ro.x.dtype).cpu()
        K = len(times) - 1
        N = ro.x.shape[0]
        n_train = self.train_timesteps(K)
        chunk = g.timestep_chunk or n_train
        keep = (valid & (adv != 0)).float()
        total = keep.sum().clamp_min(1.0)
        t_cap = float(times[1])
        sde = self._sde(policy)
        states, log_probs = ro.per_sample["states"], ro.per_sample["log_probs"]
        mb = self._chunk_size(N)
        for i in range(0, N, mb):
            n = min(mb, N - i)
            cond_i = _slice_cond(ro.cond, i, i + n)
            for j in range(0, n_train, chunk):
                kk = min(chunk, n_train - j)
                k_idx = torch.arange(j, j + kk).repeat(n)  # (n * kk,): each sample's kk steps in a row
                r_idx = torch.arange(i, i + n).repeat_interleave(kk)
                x_k = states[r_idx, k_idx]
                x_next = states[r_idx, k_idx + 1]
                lp_old = log_probs[r_idx, k_idx]
                t, t_next = times[k_idx].to(ctx.device), times[k_idx + 1].to(ctx.device)
                cond = _repeat_cond(cond_i, kk)
                u = model(x_k, t, cond, self.rl.guidance_scale)  # the rollouts' field: CFG, unconditional branch detached
                step = sde.step(x_k, u, t, t_next, t_cap, x_next=x_next)
                per, ratio = grpo_loss(step.log_prob, lp_old, adv[i : i + n].repeat_interleave(kk), g.clip_range)
                logs = {}
                if g.kl_coef > 0:
                    with torch.no_grad():
                        u_ref = self._field(policy, cond, "ref")(x_k, t)
                        mean_ref = sde.step(x_k, u_ref, t, t_next, t_cap, x_next=x_next).mean
                    std = step.std.reshape(-1, *([1] * (x_k.ndim - 1))).float().clamp_min(1e-8)
                    kl = (((step.mean.float() - mean_ref.float()) ** 2) / (2 * std**2)).flatten(1).mean(1)
                    per = per + g.kl_coef * kl
                    logs["kl"] = float(_part_sum(kl.detach(), keep[i : i + n], total))
                loss = _part_sum(per, keep[i : i + n], total) * kk / n_train
                if i == 0 and j == 0:
                    logs["clip_fraction"] = float(((ratio - 1).abs() > g.clip_range).float().mean())
                yield StepOutput(loss=loss, logs=logs)


def _part_sum(values: Tensor, keep: Tensor, total: Tensor) -> Tensor:
    """A part's share of the mean over kept samples: ``sum_i keep_i mean_k values[i, k] / total`` for
    per-(sample, timestep) ``values`` ``(n * k,)`` (each sample's ``k`` timesteps consecutive) and
    ``total`` the number of kept samples of the whole batch, so the parts add up to the batch mean;
    unscored samples (NaN rewards) count for nothing."""
    per_sample = values.view(keep.shape[0], -1).mean(1)
    return (per_sample * keep.to(per_sample.dtype)).sum() / total.to(per_sample.dtype)


def _index_cond(cond, idx: Tensor):
    """Each sample's conditioning at positions ``idx`` (tensors or dicts of tensors)."""
    if cond is None:
        return None
    if torch.is_tensor(cond):
        return cond[idx.to(cond.device)]
    if isinstance(cond, dict):
        return {key: _index_cond(v, idx) for key, v in cond.items()}
    raise TypeError(f"cannot index conditioning of type {type(cond).__name__}")


def _repeat_cond(cond, k: int):
    """Repeat each sample's conditioning ``k`` times (interleaved), tensors or dicts of tensors."""
    if cond is None or k == 1:
        return cond
    if torch.is_tensor(cond):
        return cond.repeat_interleave(k, dim=0)
    if isinstance(cond, dict):
        return {key: _repeat_cond(v, k) for key, v in cond.items()}
    raise TypeError(f"cannot repeat conditioning of type {type(cond).__name__}")


def _slice_cond(cond, i: int, j: int):
    if cond is None:
        return None
    if torch.is_tensor(cond):
        return cond[i:j]
    if isinstance(cond, dict):
        return {key: _slice_cond(v, i, j) for key, v in cond.items()}
    raise TypeError(f"cannot slice conditioning of type {type(cond).__name__}")


#: How each kind of ``rl`` settings builds its policy.
_POLICY_BUILDERS = {
    FlowlabRLConfig: RLRecipe._flowlab_policy, SD3RLConfig: RLRecipe._sd3_policy,
    FluxRLConfig: RLRecipe._flux_policy, SDUNetRLConfig: RLRecipe._sd_unet_policy,
}
