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
trained field is the field the rollouts sample; a family with classifier-free guidance (SD UNets)
trains the conditional velocity and guides only in :meth:`FamilyPolicy.field`. So ``policy(x, t, cond)``
(``guidance_scale`` left at 1) is always the *trained* field: FLUX.1-dev's at its embedding, not at 1.

Checkpoints hold the network (and its ``old`` / ``ref`` copies) only: the frozen encoders and VAE
are the base pipeline's and are restored from it.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..flow.paths import AffinePath
from .policy import LoraSpec, Policy, add_policy_adapters

__all__ = ["FamilyPolicy", "FluxPolicy"]


class FamilyPolicy(Policy):
    """RL policy over a family adapter (see the module docstring).

    Args:
        adapter: a :class:`~flowlab.families.FamilyAdapter` (its network is trained in place).
        lora: LoRA settings, or ``None`` for full fine-tuning.
        reference: keep a frozen copy of the base network for a KL term (full fine-tuning only).
    """

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

    @property
    def default_lora_targets(self) -> list[str]:
        return list(self.adapter.default_lora_targets)

    def __deepcopy__(self, memo: dict) -> "FamilyPolicy":
        """Copies (e.g. the trainer's EMA copy) share the frozen text encoders and VAE: they never change."""
        return self._deepcopy_sharing(memo, list(self.adapter.frozen_modules().values()))

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

    def decode(self, x: Tensor, batch_size: int = 16) -> Tensor:
        return self.adapter.decode(x, batch_size)

    def save(self, directory: str) -> None:
        """The LoRA in the family's diffusers layout (``load_lora_weights(directory)``), or the fully
        fine-tuned network in ``directory/<transformer|unet>``; plus ``flowlab_family.json`` (settings)."""
        os.makedirs(directory, exist_ok=True)
        adapter = self.adapter
        info: dict[str, Any] = {"family": type(adapter).__name__, "pipeline": adapter.pipeline_class.__name__,
                                "resolution": adapter.resolution, "guidance_scale": adapter.guidance_default}
        if self.lora is not None:
            adapter.save_lora(directory, adapter_name="default")
            info["lora"] = {"rank": self.lora.rank, "alpha": self.lora.alpha, "target_modules": self.lora.target_modules}
        else:
            adapter.save_network(directory)
        with open(os.path.join(directory, "flowlab_family.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)


class FluxPolicy(FamilyPolicy):
    """FLUX.1 (dev / schnell) as an RL policy (``rl.pipeline: flux``), over :class:`~flowlab.families.FluxAdapter`."""

    @classmethod
    def from_pretrained(
        cls,
        base: str,
        lora: LoraSpec | None = None,
        reference: bool = False,
        resolution: int = 512,
        max_sequence_length: int = 512,
        guidance_scale: float = 3.5,
        dtype: torch.dtype | str | None = None,
    ) -> "FluxPolicy":
        """Load ``base`` (a ``FluxPipeline`` folder or Hub id).

        Raises:
            ConfigError: naming ``rl.base`` when the pipeline cannot be loaded.
        """
        from ..families.flux import FluxAdapter

        adapter = FluxAdapter.from_pretrained(base, key="rl.base", dtype=dtype, resolution=resolution,
                                              max_sequence_length=max_sequence_length, guidance_scale=guidance_scale)
        return cls(adapter, lora=lora, reference=reference)


def _frozen_prefixes(module: FamilyPolicy, prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}adapter.{name}." for name in module.adapter.frozen_names)


def _drop_frozen_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """``state_dict`` hook: leave the frozen text encoders and VAE out of the policy's state."""
    drop = _frozen_prefixes(module, prefix)
    for key in [k for k in state_dict if k.startswith(drop)]:
        del state_dict[key]


def _fill_frozen_state(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook: frozen weights absent from a checkpoint keep their current values."""
    for name, sub in module.adapter.frozen_modules().items():
        for key, value in sub.state_dict(keep_vars=True).items():
            state_dict.setdefault(f"{prefix}adapter.{name}.{key}", value.detach())
