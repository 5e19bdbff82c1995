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

import math
import os
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor, nn

from ..flow.conventions import PREDICTION_T_EPS
from ..flow.sampling import sample
from ..flow.sde import MarginalSDE
from ..flow.solvers import time_grid
from ..flow.time_samplers import build_time_sampler
from ..errors import ConfigError
from ..card_data import looks_like_repo_id
from ..train.config import Config, load_config
from ..train.recipe import Recipe, StepContext, StepOutput
from .advantages import group_advantages, optimality_probability
from .losses import grpo_loss, nft_loss
from .config import FlowlabRLConfig, FluxRLConfig, GRPOConfig, NFTConfig, SD3RLConfig, SDUNetRLConfig
from .policy import FlowPolicy, LoraSpec, Policy

__all__ = ["NFTConfig", "GRPOConfig", "RLRecipe", "NFTRecipe", "FlowGRPORecipe", "ConditionDataset"]


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
    """A local rollout batch: ``x`` clean samples ``(N, ...)``; ``cond`` model conditioning; ``conditions``
    the raw conditions; ``extra`` method-specific tensors (e.g. SDE states)."""

    x: Tensor
    cond: Any
    conditions: list
    extra: dict


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
        return ConditionDataset(self.rl.conditions())

    def _lora(self, default_targets: list[str]) -> LoraSpec | None:
        rl = self.rl
        if rl.lora_rank == 0:
            return None
        return LoraSpec(rl.lora_rank, rl.lora_alpha or 2.0 * rl.lora_rank, rl.lora_targets or default_targets)

    def build_model(self, dataset) -> nn.Module:
        from ..rewards import AsyncReward, build_rewards

        rl = self.rl
        self.conditions = dataset.conditions
        self.reward = build_rewards(rl.rewards, key="rl.rewards")
        self._async = AsyncReward(self.reward, max_workers=rl.reward_workers) if rl.reward_workers > 0 else None
        self.policy = _POLICY_BUILDERS[type(rl)](self, rl)
        return self.policy

    def _sd3_policy(self, rl: SD3RLConfig) -> Policy:
        """``rl.pipeline: sd3``: LoRA (or full) fine-tuning of an SD3 pipeline's transformer."""
        from .sd3 import SD3Policy

        return SD3Policy.from_pretrained(
            rl.base, lora=self._lora(SD3Policy.default_lora_targets), reference=self.needs_reference,
            resolution=rl.resolution, max_sequence_length=rl.max_sequence_length,
        )

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
        from ..pipelines import FlowPipeline

        try:
            pipe = FlowPipeline.from_pretrained(rl.base)
        except (OSError, ValueError, EnvironmentError) as e:
            raise ConfigError(f"rl.base: cannot load a FlowPipeline from {rl.base}: {e}") from None
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

    def _score(self, policy: Policy, chunks: list[tuple[Tensor, list]]) -> Tensor:
        """Rewards of decoded samples, chunk by chunk (overlapping with the caller when asynchronous)."""
        scores = []
        for x, conds in chunks:
            images = policy.decode(x).cpu()
            prompts = [c if isinstance(c, str) else ("" if c is None else str(c)) for c in conds]
            meta = [{"condition": c} for c in conds]
            scores.append(self._async.submit(images, prompts, meta) if self._async else self.reward(images, prompts, meta))
        return torch.cat([s.result() if hasattr(s, "result") else s for s in scores]).float()

    def _rollout_inputs(self, policy: Policy, batch: dict, ctx: StepContext, steps: int) -> tuple[list, Any, Tensor, Tensor]:
        """This process's conditions (each repeated ``G`` times), their model conditioning, the initial
        noise (drawn for the global batch, then sliced) and the sampler's time grid of ``steps`` steps."""
        G = self.rl.group_size
        conds = [self.conditions[i] for i in batch["index"].tolist() for _ in range(G)]
        shape = policy.sample_shape
        noise = ctx.draw(lambda n, g: torch.randn((n, G, *shape), generator=g)).reshape(-1, *shape)
        grid = time_grid(steps, shift=self.rl.shift, device=ctx.device)
        return conds, policy.encode(conds), noise, grid

    def _chunk_size(self, n: int) -> int:
        """Rows per rollout chunk (``rl.rollout_chunks`` chunks), for sampling and for scoring."""
        return max(1, math.ceil(n / self.rl.rollout_chunks))

    @abstractmethod
    def rollout(self, policy: Policy, batch: dict, ctx: StepContext) -> Rollout:
        """Sample the local rows' ``G`` samples each (noise drawn for the global batch, then sliced)."""

    def _advantages(self, rewards: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor, dict]:
        """Group advantages over the whole global micro-batch (rewards gathered from every process)."""
        G = self.rl.group_size
        n_local = rewards.shape[0]
        rows = torch.arange(ctx.start, ctx.end).repeat_interleave(G)
        all_rewards = _gather(rewards.to(ctx.device)).cpu()
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
        return adv.advantages[sl].to(ctx.device), adv.valid[sl].to(ctx.device), logs

    # ----------------------------------------------------------------- the step
    def training_losses(self, model: nn.Module, batch: dict, ctx: StepContext) -> Iterator[StepOutput]:
        policy = self._policy(model)
        with torch.no_grad():
            ro = self.rollout(policy, batch, ctx)
            rewards = self._score(policy, self._chunks(ro))
        adv, valid, logs = self._advantages(rewards, ctx)
        first = True
        for part in self.method_losses(model, policy, ro, adv, valid, ctx):
            if first:
                part.logs = {**logs, **part.logs}
                first = False
            yield part

    def _chunks(self, ro: Rollout) -> list[tuple[Tensor, list]]:
        n, k = ro.x.shape[0], self._chunk_size(ro.x.shape[0])
        return [(ro.x[i : i + k], ro.conditions[i : i + k]) for i in range(0, n, k)]

    @abstractmethod
    def method_losses(self, model, policy, ro: Rollout, adv: Tensor, valid: Tensor, ctx: StepContext) -> Iterator[StepOutput]:
        """The method's loss on rollouts ``ro`` with advantages ``adv`` (``valid``: scored samples), in
        parts (one per chunk of training timesteps)."""

    # ----------------------------------------------------------------- evaluation and saving
    @torch.no_grad()
    def _eval_samples(self, policy: Policy, n: int, generator: torch.Generator) -> tuple[Tensor, list]:
        rl = self.rl
        conds = [self.conditions[i % len(self.conditions)] for i in range(n)]
        device = next(policy.parameters()).device
        grid = time_grid(rl.eval_steps, shift=rl.shift, device=device)
        out = []
        for i in range(0, n, 256):
            c = conds[i : i + 256]
            noise = torch.randn((len(c), *policy.sample_shape), generator=generator)
            field = self._field(policy, policy.encode(c), "current")
            out.append(sample(field, noise.to(device), solver=rl.eval_solver, times=grid, path=policy.path).x)
        return torch.cat(out), conds

    def sample_images(self, model, num_images, generator):
        x, _ = self._eval_samples(model, num_images, generator)
        return model.decode(x).cpu()

    def evaluate(self, model, generator) -> dict:
        x, conds = self._eval_samples(model, self.rl.eval_samples, generator)
        images = model.decode(x).cpu()
        scores = self._score(model, [(x, conds)])
        finite = scores[torch.isfinite(scores)]
        out = {"reward": float(finite.mean()) if finite.numel() else float("nan")}
        target = self._digits_target()
        if target is not None:
            from ..metrics.digits import DigitsEvaluator
            from .quality import digits_quality

            if self._evaluator is None:  # loaded once: it embeds the whole train split
                self._evaluator = DigitsEvaluator.load()
            out.update(digits_quality(images, target, self._evaluator))
        return out

    def _digits_target(self) -> int | None:
        """The target class of a single digits-classifier reward (for the quality guards), else ``None``."""
        specs = self.rl.rewards
        if isinstance(self.rl, FlowlabRLConfig) and len(specs) == 1 and specs[0].get("name") == "digits_classifier":
            return int(specs[0].get("target", 0))
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

    def rollout(self, policy, batch, ctx) -> Rollout:
        conds, cond, noise, grid = self._rollout_inputs(policy, batch, ctx, self.rl.num_inference_steps)
        xs = []
        k = self._chunk_size(noise.shape[0])
        for i in range(0, noise.shape[0], k):
            c = _slice_cond(cond, i, i + k)
            field = self._field(policy, c, self.rollout_role)
            xs.append(sample(field, noise[i : i + k], solver=self.rl.solver, times=grid, path=policy.path).x)
        return Rollout(x=torch.cat(xs), cond=cond, conditions=conds, extra={"grid": grid})

    def _train_times(self, ro: Rollout, ctx: StepContext) -> Tensor:
        """Training times ``(N, K)``: a random subset of the sampler's grid per sample, or sampled times."""
        nft, G = self.config.nft, self.rl.group_size
        grid = ro.extra["grid"][:-1].float().cpu()  # the sampler's times, without t = 1 (clean data)
        K = max(1, round(nft.timestep_fraction * len(grid)))
        if nft.timesteps == "grid":
            perm = ctx.draw(lambda n, g: torch.argsort(torch.rand((n, G, len(grid)), generator=g), dim=-1)).reshape(-1, len(grid))
            return grid[perm.cpu()[:, :K]].to(ctx.device)
        f = self.config.flow
        sampler = build_time_sampler(f.time_sampler, mean=f.logit_mean, std=f.logit_std, mode_scale=f.mode_scale, shift=f.shift)
        return ctx.draw(lambda n, g: sampler.sample(n * G * K, g).reshape(n, G, K)).reshape(-1, K)

    def method_losses(self, model, policy, ro, adv, valid, ctx):
        nft, rl, G = self.config.nft, self.rl, self.rl.group_size
        r = optimality_probability(adv, rl.adv_clip or 5.0)
        times = self._train_times(ro, ctx)  # (N, K)
        N, K = times.shape
        shape = policy.sample_shape
        eps_all = ctx.draw(lambda n, g: torch.randn((n, G, K, *shape), generator=g)).reshape(N, K, *shape)
        chunk = nft.timestep_chunk or K
        keep = valid.float()
        path = policy.path
        beta = nft.guidance_beta
        for j in range(0, K, chunk):
            kk = min(chunk, K - j)
            t = times[:, j : j + kk].reshape(-1).clamp(0.0, 1.0 - PREDICTION_T_EPS)
            x = ro.x.repeat_interleave(kk, dim=0)
            eps = eps_all[:, j : j + kk].reshape(-1, *shape).to(x.dtype)
            cond = _repeat_cond(ro.cond, kk)
            ps = path.sample(eps, x, t.to(x.dtype))
            u_theta = model(ps.x_t, t, cond)
            with torch.no_grad():
                u_old = policy.velocity(ps.x_t, t, cond, "old")
            rr = r.repeat_interleave(kk)
            per = nft_loss(u_theta, u_old, ps.dx_t, rr, beta, nft.loss, path, ps.x_t, t, x, scale=rl.adv_clip or 5.0)
            logs = {}
            if nft.kl_coef > 0:
                with torch.no_grad():
                    u_ref = policy.velocity(ps.x_t, t, cond, "ref")
                kl = ((u_theta - u_ref) ** 2).flatten(1).mean(1)
                per = per + nft.kl_coef * kl
                logs["kl"] = float(_valid_mean(kl.detach(), keep))
            loss = _valid_mean(per, keep) * kk / K  # parts add up to the mean over samples and timesteps
            if j == 0:
                logs["optimality_mean"] = float(_valid_mean(r, keep))
            yield StepOutput(loss=loss, logs=logs)

    def old_decay(self, step: int) -> float:
        nft = self.config.nft
        return min(nft.old_decay_rate * max(step - nft.old_decay_delay, 0), nft.old_decay_max)

    def on_step_end(self, model, step: int) -> dict:
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

    def rollout(self, policy, batch, ctx) -> Rollout:
        G, K, shape = self.rl.group_size, self.rl.num_inference_steps, policy.sample_shape
        conds, cond, noise, grid = self._rollout_inputs(policy, batch, ctx, K)
        step_noise = ctx.draw(lambda n, g: torch.randn((n, G, K, *shape), generator=g)).reshape(-1, K, *shape).transpose(0, 1)
        field = self._field(policy, cond, self.rollout_role)
        traj = sample(field, noise, times=grid, sde=self._sde(policy), noises=step_noise.to(noise.dtype), return_trajectory=True)
        return Rollout(x=traj.x, cond=cond, conditions=conds, extra={"traj": traj})

    def _sde(self, policy: Policy) -> MarginalSDE:
        """FlowGRPO's SDE (``grpo.noise_level``) on the policy's path."""
        return MarginalSDE.flowgrpo(self.config.grpo.noise_level, policy.path)

    def method_losses(self, model, policy, ro, adv, valid, ctx):
        g, G = self.config.grpo, self.rl.group_size
        traj = ro.extra["traj"]
        K = len(traj.times) - 1
        N = ro.x.shape[0]
        n_train = max(1, round(g.timestep_fraction * K))
        perm = ctx.draw(lambda n, gen: torch.argsort(torch.rand((n, G, K), generator=gen), dim=-1)).reshape(N, K)[:, :n_train].cpu()
        chunk = g.timestep_chunk or n_train
        keep = valid.float()
        t_cap = float(traj.times[1])
        sde = self._sde(policy)
        states = traj.states
        rows = torch.arange(N)
        times = traj.times.to(ro.x.dtype).cpu()
        for j in range(0, n_train, chunk):
            kk = min(chunk, n_train - j)
            k_idx = perm[:, j : j + kk].reshape(-1)  # (N * kk,)
            r_idx = rows.repeat_interleave(kk)
            x_k = states[k_idx, r_idx]
            x_next = states[k_idx + 1, r_idx]
            lp_old = traj.log_probs[k_idx, r_idx]
            t, t_next = times[k_idx].to(ctx.device), times[k_idx + 1].to(ctx.device)
            cond = _repeat_cond(ro.cond, kk)
            u = model(x_k, t, cond, self.rl.guidance_scale)  # the rollouts' field: CFG included
            step = sde.step(x_k, u, t, t_next, t_cap, x_next=x_next)
            per, ratio = grpo_loss(step.log_prob, lp_old, adv.repeat_interleave(kk), g.clip_range)
            logs = {}
            if g.kl_coef > 0:
                with torch.no_grad():
                    u_ref = self._field(policy, cond, "ref")(x_k, t)
                    mean_ref = sde.step(x_k, u_ref, t, t_next, t_cap, x_next=x_next).mean
                std = step.std.reshape(-1, *([1] * (x_k.ndim - 1))).float().clamp_min(1e-8)
                kl = (((step.mean.float() - mean_ref.float()) ** 2) / (2 * std**2)).flatten(1).mean(1)
                per = per + g.kl_coef * kl
                logs["kl"] = float(_valid_mean(kl.detach(), keep))
            loss = _valid_mean(per, keep) * kk / n_train
            if j == 0:
                logs["clip_fraction"] = float(((ratio - 1).abs() > g.clip_range).float().mean())
            yield StepOutput(loss=loss, logs=logs)


def _valid_mean(values: Tensor, keep: Tensor) -> Tensor:
    """Mean over the samples with ``keep = 1`` of per-(sample, timestep) ``values`` ``(N * k,)`` (each
    sample's ``k`` timesteps consecutive): unscored samples (NaN rewards) count for nothing."""
    per_sample = values.view(keep.shape[0], -1).mean(1)
    return (per_sample * keep.to(per_sample.dtype)).sum() / keep.sum().clamp_min(1.0)


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
