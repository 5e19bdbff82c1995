"""A diffusers model family (through its :class:`~flowlab.families.FamilyAdapter`) as an RL policy.

:class:`FamilyPolicy` holds the adapter as a submodule, so the trainer moves the frozen text encoders
and VAE with the network, and delegates everything family-specific to it (prompt encoding, the
velocity in flowlab time, guidance, decoding, LoRA layout). The roles follow :class:`Policy`:

* **LoRA**: the adapter's network carries the peft adapters ``default`` (trained) and ``old``
  (soft-updated rollout policy); the reference is the network with adapters disabled;
* **full fine-tuning**: ``old`` (and ``ref``) are frozen copies of the network, evaluated through the
  same adapter (``adapter.velocity(..., network=copy)``).

Guidance. A guidance-distilled family (FLUX.1-dev) evaluates *every* velocity with its guidance
embedding (the adapter's ``guidance_scale``, which the recipe sets to ``rl.guidance_scale``), so the
trained field is the field the rollouts sample; a family with classifier-free guidance (SD3, SD UNets)
trains the conditional velocity and guides only in :meth:`FamilyPolicy.field`. So ``policy(x, t, cond)``
(``guidance_scale`` left at 1) is always the *trained* field: FLUX.1-dev's at its embedding, not at 1.

Checkpoints hold the network (and its ``old`` / ``ref`` copies) only: the frozen encoders and VAE
are the base pipeline's and are restored from it. A deep copy (the trainer's EMA copy) copies the
network and shares the frozen components, by the adapter's own rule
(:meth:`flowlab.families.FamilyAdapter.__deepcopy__`).

Families: :class:`SD3Policy` (``rl.pipeline: sd3``), :class:`FluxPolicy` (``flux``), and
``FamilyPolicy(UNetAdapter...)`` (``sd_unet``).
"""
from __future__ import annotations

import os
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from ..families.base import JOINT_ATTENTION_LORA_TARGETS, FamilyAdapter
from ..families.flux import FluxAdapter
from ..families.sd3 import SD3Adapter
from ..fileio import atomic_write_json
from ..flow.paths import AffinePath
from .policy import LoraSpec, Policy, add_policy_adapters

__all__ = ["FamilyPolicy", "FluxPolicy", "SD3Policy"]


class FamilyPolicy(Policy):
    """RL policy over a family adapter (see the module docstring).

    Args:
        adapter: a :class:`~flowlab.families.FamilyAdapter` (its network is trained in place).
        lora: LoRA settings, or ``None`` for full fine-tuning.
        reference: keep a frozen copy of the base network for a KL term (full fine-tuning only).
    """

    #: the family's adapter class (what :meth:`from_pretrained` loads); set by the per-family subclasses
    adapter_class: ClassVar[type[FamilyAdapter] | None] = None
    #: the settings file :meth:`save` writes next to the weights
    settings_file: ClassVar[str] = "flowlab_family.json"
    #: checkpoint key prefixes: ``{prefix in this module: prefix in the state dict}`` (a family whose policy
    #: predates the adapters keeps its checkpoint layout)
    state_prefixes: ClassVar[dict[str, str]] = {}

    def __init__(self, adapter: nn.Module, lora: LoraSpec | None = None, reference: bool = False):
        super().__init__()
        self.lora = lora
        self.adapter = adapter
        network = adapter.network
        self._register_state_dict_hook(_drop_frozen_state)
        self._register_load_state_dict_pre_hook(_fill_frozen_state, with_module=True)
        if lora is not None:
            add_policy_adapters(network, lora)
            for name, p in network.named_parameters():  # adapters train (and soft-update) in float32
                if "lora_" in name:
                    p.data = p.data.float()
        else:
            network.float().requires_grad_(True)
            self._keep_frozen_copies(network, reference)

    @classmethod
    def from_pretrained(
        cls, base: str, lora: LoraSpec | None = None, reference: bool = False, dtype: torch.dtype | str | None = None, **kwargs: Any
    ) -> "FamilyPolicy":
        """Load ``base`` (a pipeline folder or Hub id of the family) as a policy; ``kwargs`` go to the
        adapter's ``from_pretrained`` (``resolution``, ``max_sequence_length``, ``guidance_scale``, ...).
        ``dtype=None`` follows accelerate's mixed precision (bf16/fp16 frozen weights when training in
        mixed precision, float32 otherwise); trained weights (LoRA adapters, or the whole network) are float32.

        Raises:
            ConfigError: naming ``rl.base`` when the pipeline cannot be loaded.
        """
        if cls.adapter_class is None:
            raise TypeError(f"{cls.__name__} has no adapter_class; build FamilyPolicy(adapter) or use a family's policy (SD3Policy, FluxPolicy)")
        return cls(cls.adapter_class.from_pretrained(base, key="rl.base", dtype=dtype, **kwargs), lora=lora, reference=reference)

    @property
    def default_lora_targets(self) -> list[str]:
        return list(self.adapter.default_lora_targets)

    # ----------------------------------------------------------------- policy contract
    @property
    def network(self) -> nn.Module:
        return self.adapter.network

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.adapter.sample_shape)

    @property
    def path(self) -> AffinePath:
        return self.adapter.path

    @property
    def training_guidance(self) -> float:
        """The guidance every plain velocity uses: the embedding of a guidance-distilled family, else 1 (none)."""
        return self.adapter.guidance_default if self.adapter.guidance_embedded else 1.0

    def time_grid(self, num_steps: int, shift: float = 1.0, device=None) -> Tensor:
        """The family's sampling grid (:meth:`~flowlab.families.FamilyAdapter.time_grid`)."""
        return self.adapter.time_grid(num_steps, shift=shift, device=device)

    def _velocity(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], role: str) -> Tensor:
        with self._role(role) as net:
            return self.adapter.velocity(x, t, cond, self.training_guidance, network=net)

    def field(self, cond: dict[str, Tensor], role: str = "current", guidance_scale: float = 1.0, detach_unconditional: bool = False):
        """Sampling field of ``role``: classifier-free guidance (SD UNets) or the guidance embedding
        (FLUX.1-dev) at ``guidance_scale``; the plain velocity when that is the training guidance.
        ``detach_unconditional``: no gradient through CFG's unconditional branch (FlowGRPO's training forward)."""
        if guidance_scale == self.training_guidance:
            return super().field(cond, role)

        def guided(x: Tensor, t: Tensor) -> Tensor:
            with self._role(role) as net:
                return self.adapter.velocity(x, t, cond, guidance_scale, network=net, detach_unconditional=detach_unconditional)

        return guided

    def encode(self, conditions: Sequence[str]) -> dict[str, Tensor]:
        return self.adapter.encode(conditions)

    def cache_prompt_embeddings(self, prompts: Sequence[str], offload: bool = True, batch_size: int = 64) -> int:
        """``rl.cache_prompt_embeddings``: :meth:`~flowlab.families.FamilyAdapter.cache_prompt_embeddings`."""
        return self.adapter.cache_prompt_embeddings(prompts, offload=offload, batch_size=batch_size)

    def pipeline(self):
        """The family's diffusers pipeline around the policy's components (the same objects, not copies)."""
        return self.adapter.pipeline()

    def decode(self, x: Tensor, batch_size: int = 16) -> Tensor:
        return self.adapter.decode(x, batch_size)

    def save(self, directory: str) -> None:
        """The LoRA in the family's diffusers layout (``load_lora_weights(directory)``), or the fully
        fine-tuned network in ``directory/<transformer|unet>``; plus :attr:`settings_file` (the adapter's
        :meth:`~flowlab.families.FamilyAdapter.settings`, its family and pipeline, the LoRA settings)."""
        os.makedirs(directory, exist_ok=True)
        adapter = self.adapter
        info: dict[str, Any] = {"family": type(adapter).__name__, "pipeline": adapter.pipeline_class.__name__, **adapter.settings()}
        if self.lora is not None:
            adapter.save_lora(directory, adapter_name="default")
            info["lora"] = {"rank": self.lora.rank, "alpha": self.lora.alpha, "target_modules": self.lora.target_modules}
        else:
            adapter.save_network(directory)
        atomic_write_json(os.path.join(directory, self.settings_file), info)


class FluxPolicy(FamilyPolicy):
    """FLUX.1 (dev / schnell) as an RL policy (``rl.pipeline: flux``), over :class:`~flowlab.families.FluxAdapter`;
    :meth:`from_pretrained` takes ``resolution`` (512), ``max_sequence_length`` (512) and ``guidance_scale`` (3.5)."""

    adapter_class = FluxAdapter


def _adapter_component(name: str) -> property:
    return property(lambda self: getattr(self.adapter, name), doc=f"The adapter's ``{name}``.")


class SD3Policy(FamilyPolicy):
    """Stable Diffusion 3 / 3.5 as an RL policy (``rl.pipeline: sd3``), over :class:`~flowlab.families.SD3Adapter`.

    :meth:`from_pretrained` takes ``resolution`` (512), ``max_sequence_length`` (77), ``negative_prompt``
    and pipeline components (``text_encoder_3=None, tokenizer_3=None`` drops T5). Rollouts guide with
    CFG at ``rl.guidance_scale``; training uses the conditional velocity (FlowGRPO's training forward
    guides, with the unconditional branch detached).

    Kept from the policy that predates the adapters: the components as attributes (``policy.transformer``,
    ``policy.vae``, ...), checkpoints keyed ``transformer.* / old.* / ref.*`` and ``flowlab_sd3.json``
    (what ``eval/t2i.py`` reads).
    """

    adapter_class = SD3Adapter
    default_lora_targets = JOINT_ATTENTION_LORA_TARGETS
    settings_file = "flowlab_sd3.json"
    state_prefixes = {"adapter.transformer.": "transformer."}

    transformer = _adapter_component("transformer")
    vae = _adapter_component("vae")
    text_encoder = _adapter_component("text_encoder")
    text_encoder_2 = _adapter_component("text_encoder_2")
    text_encoder_3 = _adapter_component("text_encoder_3")
    scheduler = _adapter_component("scheduler")


def _drop_frozen_state(module: FamilyPolicy, state_dict: dict, prefix: str, local_metadata) -> None:
    """``state_dict`` hook: leave the frozen text encoders and VAE out of the policy's state, and key the
    rest by :attr:`FamilyPolicy.state_prefixes` (in place, order kept)."""
    drop = tuple(f"{prefix}adapter.{name}." for name in module.adapter.frozen_names)
    items = [(_renamed(k, prefix, module.state_prefixes), v) for k, v in state_dict.items() if not k.startswith(drop)]
    state_dict.clear()
    state_dict.update(items)


def _fill_frozen_state(module: FamilyPolicy, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook: keys back from :attr:`FamilyPolicy.state_prefixes`; frozen weights absent
    from a checkpoint keep their current values."""
    back = {saved: internal for internal, saved in module.state_prefixes.items()}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        renamed = _renamed(key, prefix, back)
        if renamed != key:
            state_dict[renamed] = state_dict.pop(key)
    for name, sub in module.adapter.frozen_modules().items():
        for key, value in sub.state_dict(keep_vars=True).items():
            state_dict.setdefault(f"{prefix}adapter.{name}.{key}", value.detach())


def _renamed(key: str, prefix: str, prefixes: dict[str, str]) -> str:
    """``key`` with its first matching ``prefix + old`` replaced by ``prefix + new`` (``prefixes``: old -> new)."""
    for old, new in prefixes.items():
        if key.startswith(prefix + old):
            return prefix + new + key[len(prefix) + len(old):]
    return key
