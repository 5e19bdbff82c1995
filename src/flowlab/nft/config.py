"""Config sections of the RL recipes: ``rl`` (shared), ``nft`` (DiffusionNFT) and ``grpo`` (FlowGRPO).

Light on purpose (no torch): :mod:`flowlab.recipes` registers these sections so a config is
validated before the training stack is imported. ``recipe: nft`` reads ``rl``, ``nft`` and
``flow`` (the time sampler of ``nft.timesteps: sampled``); ``recipe: flowgrpo`` reads ``rl`` and ``grpo``. ``rl`` is a tagged union on ``rl.pipeline``: each
kind of policy has its own settings, and validates them itself (a flowlab pipeline takes
``rl.class_labels``, the text-to-image pipelines ``sd3``, ``flux`` and ``sd_unet`` ``rl.prompts``), so no
key is accepted and then ignored.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Optional

from ..errors import ConfigError, DataError
from ..schema import TaggedUnion, choices

if TYPE_CHECKING:
    from ..data.prompts import PromptSet

#: The forms of :mod:`flowlab.data.prompts` (``PROMPT_FORMATS``; not imported here: this module stays torch-free).
PROMPT_FORMATS = ("auto", "txt", "jsonl", "hf")

__all__ = ["FlowlabRLConfig", "SD3RLConfig", "FluxRLConfig", "SDUNetRLConfig", "RL_CONFIG", "NFTConfig", "GRPOConfig", "RL_SOLVERS"]

#: ODE solvers for rollouts and evaluation (fixed-step: the RL losses need the sampler's grid).
RL_SOLVERS = ("euler", "midpoint", "heun", "multistep")


@dataclass(kw_only=True)
class _RLConfig:
    """Keys of every ``rl.pipeline``: base model, rollouts, rewards, LoRA, evaluation."""

    pipeline: str
    base: Optional[str] = None  # the pipeline to fine-tune: a folder or a Hub id
    group_size: int = field(default=8, metadata={"min": 2})  # G samples per condition
    rewards: list[dict] = field(default_factory=lambda: [{"name": "digits_classifier", "target": 3}])
    reward_workers: int = field(default=0, metadata={"min": 0})  # > 0: score chunks asynchronously
    reward_combine: str = field(default="zscore", metadata=choices("zscore", "sum"))  # several rewards: global z-scores, or the reference's weighted raw sum
    micro_batch: int = field(default=0, metadata={"min": 0})  # samples per forward/backward part and per rollout chunk, per process (0: all)
    steps_per_rollout: int = field(default=1, metadata={"min": 1})  # optimiser steps per rollout batch (reference: gradient_step_per_epoch)
    gradient_checkpointing: bool = False  # recompute the trained network's activations in the backward pass
    solver: str = field(default="multistep", metadata=choices(*RL_SOLVERS))
    num_inference_steps: int = field(default=10, metadata={"min": 1})
    shift: float = field(default=1.0, metadata={"min": 1e-6})
    guidance_scale: float = 1.0
    adv_clip: float = field(default=5.0, metadata={"min": 0.0})
    adv_std_floor: float = field(default=0.0, metadata={"min": 0.0})  # floor on the global reward std (0: public code)
    lora_rank: int = field(default=0, metadata={"min": 0})  # 0: full fine-tuning
    lora_alpha: float = field(default=0.0, metadata={"min": 0.0})  # 0: 2 x rank
    lora_targets: list[str] = field(default_factory=list)  # [] = the pipeline's default targets
    eval_samples: int = field(default=256, metadata={"min": 2})
    eval_solver: str = field(default="multistep", metadata=choices(*RL_SOLVERS))
    eval_steps: int = field(default=20, metadata={"min": 1})
    eval_guidance_scale: float = 1.0  # CFG of evaluation samples (1: none)

    def check(self, config) -> None:
        """Checks across keys (called when the config is validated; raises :class:`ConfigError`)."""
        if not self.rewards:
            raise ConfigError("rl.rewards: give at least one reward, e.g. [{name: digits_classifier, target: 3}]")
        if self.base is None:
            raise ConfigError("rl.base: the pipeline to fine-tune (a folder or a Hub id)")

    def conditions(self) -> list:
        """The conditions rollouts draw from (``None``: unconditional)."""
        raise NotImplementedError

    def prompt_sets(self) -> tuple[PromptSet, PromptSet | None]:
        """The training conditions with their reward metadata, and the held-out evaluation set (or
        ``None``: evaluation draws from the training conditions)."""
        from ..data.prompts import PromptSet

        conds = self.conditions()
        return PromptSet(conds, [{"condition": c} for c in conds], source="rl.class_labels"), None

    def missing_base_config(self) -> Optional[str]:
        """The config that trains ``rl.base`` when it is a local folder that does not exist yet, else ``None``."""
        return None


@dataclass(kw_only=True)
class FlowlabRLConfig(_RLConfig):
    """``rl.pipeline: flowlab``: a flowlab ``FlowPipeline``, conditioned on class labels (or none)."""

    pipeline: str = field(default="flowlab", metadata=choices("flowlab"))
    base: Optional[str] = "runs/quickstart/pipeline"
    base_config: Optional[str] = "configs/quickstart.yaml"  # trains the base first if `base` is a missing folder
    class_labels: list[int] = field(default_factory=list)  # [] = unconditional (the null class)

    def conditions(self) -> list:
        return list(self.class_labels) or [None]

    def missing_base_config(self) -> Optional[str]:
        from ..card_data import looks_like_repo_id

        base = self.base
        if base is None or os.path.exists(base) or looks_like_repo_id(base):
            return None  # present, or a Hub id (``owner/name``)
        if not self.base_config:
            raise ConfigError(f"rl.base: {base} does not exist and rl.base_config is not set to train it")
        if os.path.basename(os.path.normpath(base)) != "pipeline":
            raise ConfigError(
                f"rl.base: {base} does not exist; a base trained from rl.base_config is saved as <its output_dir>/pipeline, "
                f"so name that folder (e.g. {os.path.join(os.path.dirname(os.path.normpath(base)), 'pipeline')})"
            )
        if not os.path.isfile(self.base_config):
            raise ConfigError(f"rl.base_config: {self.base_config} is not a file (needed to train the missing base {base})")
        return self.base_config

    def card_data(self, repo_id: str) -> dict:
        from ..card_data import flow_pipeline_card_data

        return flow_pipeline_card_data(repo_id, class_labels=f"[{self.class_labels[0]}] * 16" if self.class_labels else None)


@dataclass(kw_only=True)
class _PromptRLConfig(_RLConfig):
    """Keys of a diffusers text-to-image ``rl.pipeline``, conditioned on prompts.

    Prompts come from ``rl.prompts`` (a list) and/or ``rl.prompts_file``, in any form of
    :mod:`flowlab.data.prompts` (``.txt``; ``.jsonl`` whose other fields are per-prompt reward
    metadata; a Hugging Face dataset by Hub name or folder, with ``prompts_split`` / ``prompts_column``).
    The held-out evaluation set (``rl.eval_prompts`` / ``rl.eval_prompts_file``, same forms) is
    scored every ``eval.every`` steps; without one, evaluation draws from the training prompts.

    Subclasses name the family's diffusers classes (for the model card): ``pipeline_class``, the
    denoiser's ``network_class`` and its subfolder ``network_name``, and a Hub ``family_tag``.
    """

    prompts: list[str] = field(default_factory=list)
    prompts_file: Optional[str] = None  # .txt / .jsonl / a dataset (see flowlab.data.prompts)
    prompts_format: str = field(default="auto", metadata=choices(*PROMPT_FORMATS))
    prompts_split: str = "train"
    prompts_column: str = "prompt"
    eval_prompts: list[str] = field(default_factory=list)
    eval_prompts_file: Optional[str] = None
    eval_prompts_format: str = field(default="auto", metadata=choices(*PROMPT_FORMATS))
    eval_prompts_split: str = "test"
    eval_prompts_column: Optional[str] = None  # default: prompts_column
    eval_max_prompts: int = field(default=0, metadata={"min": 0})  # the first N held-out prompts (0: all)
    resolution: int = field(default=512, metadata={"min": 8})

    pipeline_class: ClassVar[str]
    network_class: ClassVar[str]
    network_name: ClassVar[str] = "transformer"
    family_tag: ClassVar[str]

    def check(self, config) -> None:
        super().check(config)
        if not (self.prompts or self.prompts_file):
            raise ConfigError(f"rl.prompts: an {self.pipeline} pipeline needs prompts (rl.prompts or rl.prompts_file)")

    def card_data(self, repo_id: str) -> dict:
        """Model-card fields: a LoRA loads into the base pipeline; a full fine-tune replaces its denoiser."""
        from ..card_data import looks_like_repo_id

        base = self.base if looks_like_repo_id(self.base) else "<base model repo id>"
        pipe, net, name = self.pipeline_class, self.network_class, self.network_name
        if self.lora_rank > 0:
            usage = f'from diffusers import {pipe}\npipe = {pipe}.from_pretrained("{base}")\npipe.load_lora_weights("{repo_id}")'
        else:
            usage = (
                f"from diffusers import {net}, {pipe}\n"
                f'{name} = {net}.from_pretrained("{repo_id}", subfolder="{name}")\n'
                f'pipe = {pipe}.from_pretrained("{base}", {name}={name})'
            )
        tags = ["text-to-image", self.family_tag] + (["lora"] if self.lora_rank > 0 else [])
        return {"usage": usage, "tags": tags, "pipeline_tag": "text-to-image"}

    def conditions(self) -> list:
        return self.prompt_sets()[0].prompts

    def prompt_sets(self) -> tuple[PromptSet, PromptSet | None]:
        """``rl.prompts`` + ``rl.prompts_file``, and ``rl.eval_prompts`` + ``rl.eval_prompts_file`` (or ``None``).

        Raises:
            ConfigError: naming the key whose file or dataset cannot be read.
        """
        train = _join(self.prompts, "rl.prompts_file", self.prompts_file, self.prompts_format, self.prompts_split, self.prompts_column)
        if not (self.eval_prompts or self.eval_prompts_file):
            return train, None
        column = self.eval_prompts_column or self.prompts_column
        held_out = _join(self.eval_prompts, "rl.eval_prompts_file", self.eval_prompts_file, self.eval_prompts_format, self.eval_prompts_split, column)
        if self.eval_max_prompts and len(held_out) > self.eval_max_prompts:
            k = self.eval_max_prompts
            held_out = type(held_out)(held_out.prompts[:k], held_out.metadata[:k], held_out.source)
        return train, held_out


def _join(listed: list[str], key: str, path: Optional[str], format: str, split: str, column: str) -> PromptSet:
    """Prompts listed in the config (no metadata) followed by those of ``path`` (any form of
    :func:`flowlab.data.prompts.load_prompts`)."""
    from ..data.prompts import PromptSet, load_prompts

    prompts, metadata = list(listed), [{} for _ in listed]
    if path:
        try:
            loaded = load_prompts(path, format, split, column)
        except DataError as e:
            raise ConfigError(f"{key}: {e}") from None
        prompts += loaded.prompts
        metadata += loaded.metadata
    return PromptSet(prompts, metadata, source=path or key.replace("_file", ""))


@dataclass(kw_only=True)
class SD3RLConfig(_PromptRLConfig):
    """``rl.pipeline: sd3``: a diffusers Stable Diffusion 3 pipeline, conditioned on prompts."""

    pipeline: str = field(default="sd3", metadata=choices("sd3"))
    max_sequence_length: int = field(default=77, metadata={"min": 1})  # T5 tokens
    cache_prompt_embeddings: bool = False  # encode the fixed prompt sets once, then free the text encoders

    pipeline_class: ClassVar[str] = "StableDiffusion3Pipeline"
    network_class: ClassVar[str] = "SD3Transformer2DModel"
    family_tag: ClassVar[str] = "stable-diffusion-3"


@dataclass(kw_only=True)
class FluxRLConfig(_PromptRLConfig):
    """``rl.pipeline: flux``: FLUX.1 dev / schnell (:class:`flowlab.families.FluxAdapter`). ``rl.guidance_scale``
    is FLUX.1-dev's guidance *embedding* (every velocity, rollouts and training); 1.0 for schnell."""

    pipeline: str = field(default="flux", metadata=choices("flux"))
    max_sequence_length: int = field(default=512, metadata={"min": 1})  # T5 tokens (schnell: at most 256)

    pipeline_class: ClassVar[str] = "FluxPipeline"
    network_class: ClassVar[str] = "FluxTransformer2DModel"
    family_tag: ClassVar[str] = "flux"


@dataclass(kw_only=True)
class SDUNetRLConfig(_PromptRLConfig):
    """``rl.pipeline: sd_unet``: SD1.5 / SD2.1 / SDXL (:class:`flowlab.families.UNetAdapter`); training uses
    the conditional velocity, ``rl.guidance_scale`` is classifier-free guidance in the rollouts."""

    pipeline: str = field(default="sd_unet", metadata=choices("sd_unet"))

    pipeline_class: ClassVar[str] = "DiffusionPipeline"
    network_class: ClassVar[str] = "UNet2DConditionModel"
    network_name: ClassVar[str] = "unet"
    family_tag: ClassVar[str] = "stable-diffusion"


RL_CONFIG = TaggedUnion(
    name="rl", tag="pipeline", default="flowlab",
    variants={"flowlab": FlowlabRLConfig, "sd3": SD3RLConfig, "flux": FluxRLConfig, "sd_unet": SDUNetRLConfig},
)


@dataclass
class NFTConfig:
    """``nft``: DiffusionNFT (defaults of the public code)."""

    guidance_beta: float = field(default=1.0, metadata={"min": 1e-6})  # beta of the implicit policies (NOT kl_coef)
    loss: str = field(default="x0_normalized", metadata=choices("x0_normalized", "velocity"))
    kl_coef: float = field(default=0.0, metadata={"min": 0.0})  # c * ||v_theta - v_ref||^2 (public code: 1e-4)
    timesteps: str = field(default="grid", metadata=choices("grid", "sampled"))  # the sampler's grid, or flow.time_sampler
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

