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
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from ..flow.conventions import PREDICTION_T_EPS
from ..flow.sampling import sample
from ..flow.sde import MarginalSDE
from ..flow.solvers import time_grid
from ..flow.time_samplers import build_time_sampler
from ..hub.card_data import flow_pipeline_card_data, looks_like_repo_id
from ..train.config import Config, ConfigError, register_config_section
from ..train.recipe import Recipe, StepContext, StepOutput, register_recipe
from .advantages import group_advantages, optimality_probability
from .losses import grpo_loss, nft_loss
from .policy import FlowPolicy, LoraSpec, Policy

__all__ = ["RLConfig", "NFTConfig", "GRPOConfig", "RLRecipe", "NFTRecipe", "FlowGRPORecipe", "ConditionDataset"]


def _c(*values, **kw):
    return {"choices": values, **kw}


@dataclass
class RLConfig:
    """``rl``: what both RL recipes share (base model, conditions, rollouts, rewards, LoRA, evaluation)."""

    pipeline: str = field(default="flowlab", metadata=_c("flowlab", "sd3", "flux", "sd_unet"))
    base: Optional[str] = "runs/quickstart/pipeline"  # FlowPipeline / SD3 / FLUX / SD(XL) pipeline folder or Hub id
    base_config: Optional[str] = "configs/quickstart.yaml"  # trains the base first if `base` is a missing folder
    class_labels: list[int] = field(default_factory=list)  # flowlab: conditions; [] = unconditional (null class)
    prompts: list[str] = field(default_factory=list)  # sd3/flux/sd_unet: prompts (or rl.prompts_file, one per line)
    prompts_file: Optional[str] = None
    group_size: int = field(default=8, metadata={"min": 2})  # G samples per condition
    rewards: list[dict] = field(default_factory=lambda: [{"name": "digits_classifier", "target": 3}])
    reward_workers: int = field(default=0, metadata={"min": 0})  # > 0: score chunks asynchronously
    rollout_chunks: int = field(default=1, metadata={"min": 1})  # rollouts in chunks (overlap with async rewards)
    solver: str = field(default="multistep", metadata=_c("euler", "midpoint", "heun", "multistep"))
    num_inference_steps: int = field(default=10, metadata={"min": 1})
    shift: float = field(default=1.0, metadata={"min": 1e-6})
    guidance_scale: float = 1.0
    adv_clip: float = field(default=5.0, metadata={"min": 0.0})
    adv_std_floor: float = field(default=0.0, metadata={"min": 0.0})  # floor on the global reward std (0: public code)
    lora_rank: int = field(default=0, metadata={"min": 0})  # 0: full fine-tuning
    lora_alpha: float = field(default=0.0, metadata={"min": 0.0})  # 0: 2 x rank
    lora_targets: list[str] = field(default_factory=list)  # [] = the pipeline's default targets
    eval_samples: int = field(default=256, metadata={"min": 2})
    eval_solver: str = field(default="multistep", metadata=_c("euler", "midpoint", "heun", "multistep"))
    eval_steps: int = field(default=20, metadata={"min": 1})
    # text-to-image only (flux: rl.guidance_scale is FLUX.1-dev's guidance embedding, 1.0 for schnell)
    resolution: int = field(default=512, metadata={"min": 8})
    max_sequence_length: int = field(default=77, metadata={"min": 1})


@dataclass
class NFTConfig:
    """``nft``: DiffusionNFT (defaults of the public code)."""

    guidance_beta: float = field(default=1.0, metadata={"min": 1e-6})  # beta of the implicit policies (NOT kl_coef)
    loss: str = field(default="x0_normalized", metadata=_c("x0_normalized", "velocity"))
    kl_coef: float = field(default=0.0, metadata={"min": 0.0})  # c * ||v_theta - v_ref||^2 (public code: 1e-4)
    timesteps: str = field(default="grid", metadata=_c("grid", "sampled"))  # the sampler's grid, or flow.time_sampler
    timestep_fraction: float = field(default=0.99, metadata={"min": 0.0, "max": 1.0})  # of the grid, per sample
    timestep_chunk: int = field(default=0, metadata={"min": 0})  # timesteps per backward part (0: all at once)
    old_decay_rate: float = field(default=0.001, metadata={"min": 0.0})  # eta = min(rate * (step - delay), max)
    old_decay_max: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    old_decay_delay: int = field(default=0, metadata={"min": 0})


@dataclass
class GRPOConfig:
    """``grpo``: FlowGRPO (defaults of the public code)."""

    noise_level: float = field(default=0.7, metadata={"min": 0.0})  # a of the SDE
    clip_range: float = field(default=1e-4, metadata={"min": 0.0})  # PPO ratio clip
    kl_coef: float = field(default=0.04, metadata={"min": 0.0})
    timestep_fraction: float = field(default=1.0, metadata={"min": 0.0, "max": 1.0})
    timestep_chunk: int = field(default=1, metadata={"min": 0})  # SDE steps per backward part (0: all)


register_config_section("rl", RLConfig)
register_config_section("nft", NFTConfig)
register_config_section("grpo", GRPOConfig)


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
        self.rl: RLConfig = config.rl
        self._check_config()
        self.reward = None
        self._async = None
        self.policy: Policy | None = None
        self._evaluator = None  # the digits quality guards' classifier, on first evaluation

    def prepare(self) -> None:
        self._maybe_train_base()

    # ----------------------------------------------------------------- set-up
    def _check_config(self) -> None:
        rl = self.rl
        if not rl.rewards:
            raise ConfigError("rl.rewards: give at least one reward, e.g. [{name: digits_classifier, target: 3}]")
        if rl.pipeline == "flowlab" and (rl.prompts or rl.prompts_file):
            raise ConfigError("rl.prompts: prompts need a text-to-image rl.pipeline (sd3, flux, sd_unet); a flowlab pipeline takes rl.class_labels")
        if rl.pipeline != "flowlab" and not (rl.prompts or rl.prompts_file):
            raise ConfigError(f"rl.prompts: an {rl.pipeline} pipeline needs prompts (rl.prompts or rl.prompts_file)")
        if rl.base is None:
            raise ConfigError("rl.base: the pipeline to fine-tune (a folder or a Hub id)")

    def _maybe_train_base(self) -> None:
        """``rl.base`` names a local folder that does not exist yet: train it with ``rl.base_config``."""
        rl = self.rl
        if rl.pipeline != "flowlab" or os.path.exists(rl.base) or not (rl.base.startswith((".", "/")) or os.sep in rl.base):
            return
        if not rl.base_config:
            raise ConfigError(f"rl.base: {rl.base} does not exist and rl.base_config is not set to train it")
        if not os.path.isfile(rl.base_config):
            raise ConfigError(f"rl.base_config: {rl.base_config} is not a file (needed to train the missing base {rl.base})")
        from ..train.config import load_config
        from ..train.trainer import Trainer

        out = os.path.dirname(os.path.normpath(rl.base))
        base_cfg = load_config(rl.base_config, [f"output_dir={out}"])
        print(f"flowlab: rl.base {rl.base} not found; training it first with {rl.base_config} (output {out})")
        trainer = Trainer(base_cfg)
        trainer.train()
        if not os.path.isdir(rl.base):
            raise ConfigError(f"rl.base: training {rl.base_config} did not produce {rl.base}; point rl.base at its artefact")

    def build_dataset(self):
        rl = self.rl
        if rl.pipeline != "flowlab":
            prompts = list(rl.prompts)
            if rl.prompts_file:
                try:
                    with open(rl.prompts_file, encoding="utf-8") as f:
                        prompts += [line.strip() for line in f if line.strip()]
                except OSError as e:
                    raise ConfigError(f"rl.prompts_file: cannot read {rl.prompts_file}: {e.strerror}") from None
            return ConditionDataset(prompts)
        return ConditionDataset(list(rl.class_labels) or [None])

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
        if rl.pipeline == "sd3":
            from .sd3 import SD3Policy

            self.policy = SD3Policy.from_pretrained(
                rl.base, lora=self._lora(SD3Policy.default_lora_targets), reference=self.needs_reference,
                resolution=rl.resolution, max_sequence_length=rl.max_sequence_length,
            )
            return self.policy
        if rl.pipeline == "flux":
            from ..families.flux import FluxAdapter
            from .family_policy import FluxPolicy

            self.policy = FluxPolicy.from_pretrained(
                rl.base, lora=self._lora(FluxAdapter.default_lora_targets), reference=self.needs_reference,
                resolution=rl.resolution, max_sequence_length=rl.max_sequence_length, guidance_scale=rl.guidance_scale,
            )
            return self.policy
        if rl.pipeline == "sd_unet":
            from ..families.unet import UNetAdapter
            from .family_policy import FamilyPolicy

            adapter = UNetAdapter.from_pretrained(rl.base, key="rl.base", resolution=rl.resolution, guidance_scale=rl.guidance_scale)
            self.policy = FamilyPolicy(adapter, lora=self._lora(UNetAdapter.default_lora_targets), reference=self.needs_reference)
            return self.policy
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
        self.policy = FlowPolicy(net, pipe.scheduler, lora=self._lora(targets), reference=self.needs_reference)
        return self.policy

    @property
    def needs_reference(self) -> bool:
        return False

    # ----------------------------------------------------------------- rollouts and rewards
    def _policy(self, model: nn.Module) -> Policy:
        return model.module if hasattr(model, "module") else model

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

    def rollout(self, policy: Policy, batch: dict, ctx: StepContext) -> Rollout:
        """Sample the local rows' ``G`` samples each (noise drawn for the global batch, then sliced)."""
        raise NotImplementedError

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
    def training_step(self, model, batch, ctx):  # pragma: no cover - the recipes yield parts
        raise RuntimeError("RL recipes train through training_losses")

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

    def method_losses(self, model, policy, ro: Rollout, adv: Tensor, valid: Tensor, ctx: StepContext) -> Iterator[StepOutput]:
        raise NotImplementedError

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
        if self.rl.pipeline == "flowlab" and len(specs) == 1 and specs[0].get("name") == "digits_classifier":
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
        if rl.pipeline == "flowlab":
            data = flow_pipeline_card_data(repo_id, class_labels=f"[{rl.class_labels[0]}] * 16" if rl.class_labels else None)
        else:
            base = rl.base if looks_like_repo_id(rl.base) else "<base model repo id>"
            pipe_cls, net_cls, net_name, family_tag = {
                "sd3": ("StableDiffusion3Pipeline", "SD3Transformer2DModel", "transformer", "stable-diffusion-3"),
                "flux": ("FluxPipeline", "FluxTransformer2DModel", "transformer", "flux"),
                "sd_unet": ("DiffusionPipeline", "UNet2DConditionModel", "unet", "stable-diffusion"),
            }[rl.pipeline]
            if rl.lora_rank > 0:
                usage = (
                    f'from diffusers import {pipe_cls}\npipe = {pipe_cls}.from_pretrained("{base}")\n'
                    f'pipe.load_lora_weights("{repo_id}")'
                )
            else:
                usage = (
                    f"from diffusers import {net_cls}, {pipe_cls}\n"
                    f'{net_name} = {net_cls}.from_pretrained("{repo_id}", subfolder="{net_name}")\n'
                    f'pipe = {pipe_cls}.from_pretrained("{base}", {net_name}={net_name})'
                )
            data = {
                "usage": usage,
                "tags": ["text-to-image", family_tag] + (["lora"] if rl.lora_rank > 0 else []),
                "pipeline_tag": "text-to-image",
            }
        data["tags"] = [*data["tags"], "reinforcement-learning", method.lower()]
        data["description"] = f"Fine-tuned from `{rl.base}` with {method} (flowlab `recipe: {self.name}`) against the reward(s) {rewards}."
        if looks_like_repo_id(rl.base):
            data["base_model"] = rl.base
        return data


@register_recipe("nft")
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


@register_recipe("flowgrpo")
class FlowGRPORecipe(RLRecipe):
    """FlowGRPO: GRPO on the marginal-preserving SDE of the flow (see :mod:`flowlab.flow.sde`).

    Loss per trained SDE step ``k`` (ratio of the step's Gaussian likelihoods under the current
    and the rollout policy)::

        ratio = exp(log p_theta(x_{k+1} | x_k) - log p_old(x_{k+1} | x_k))
        L = E[ max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) ] + kl_coef E[ ||mu_theta - mu_ref||^2 / (2 std_k^2) ]
    """

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
