"""Policies for online RL on flow models: the trained generator, its old (rollout) policy and its reference.

A :class:`Policy` is one ``nn.Module`` holding all three, so the shared trainer prepares,
checkpoints and resumes it as a whole (the old policy is part of the state: a resumed run
continues from exactly the same lagged weights). Its ``forward`` is the *current* velocity, the
only one with gradients, so data-parallel wrappers see one forward per backward; the old
policy and the reference are evaluated through :meth:`Policy.velocity` under ``no_grad``.

Two ways to hold the three roles:

* **full fine-tuning**: ``old`` (and ``ref`` when a KL term needs it) are frozen copies;
* **LoRA** (peft, through diffusers' ``PeftAdapterMixin``): the network carries two adapters,
  ``default`` (trained) and ``old`` (soft-updated copy); the reference is the network with its
  adapters disabled, i.e. the base model, for free.

Every velocity is in flowlab's convention (``t = 0`` noise, ``t = 1`` data, ``u = data - noise``).
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..flow.guidance import guided_field
from ..flow.paths import AffinePath
from ..flow.solvers import time_grid

__all__ = ["Policy", "FlowPolicy", "LoraSpec", "ROLES"]

ROLES = ("current", "old", "ref")


class LoraSpec:
    """LoRA settings: rank ``r``, scaling ``alpha``, the target module names (peft ``target_modules``)
    and peft's ``init_lora_weights``: ``"gaussian"`` (``A ~ N(0, 1/r)``, ``B = 0``) as the references
    (NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py`` line 431, flow_grpo ``scripts/train_sd3.py``), or
    ``True`` (peft's Kaiming-uniform ``A``). Either way ``B = 0``: the adapted model starts as the base."""

    def __init__(self, rank: int, alpha: float, target_modules: Sequence[str], init: str | bool = "gaussian"):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank, self.alpha, self.target_modules, self.init = int(rank), float(alpha), list(target_modules), init

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=self.target_modules, init_lora_weights=self.init)


def add_policy_adapters(network: nn.Module, lora: LoraSpec) -> None:
    """Give ``network`` (a diffusers ``PeftAdapterMixin`` model) the adapters ``default`` (trained) and
    ``old`` (a frozen copy of it), with ``default`` active; everything else is frozen."""
    network.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        network.add_adapter(lora.peft_config(), adapter_name="default")
        network.add_adapter(lora.peft_config(), adapter_name="old")
    pairs = adapter_pairs(network)
    if not pairs:
        raise ValueError(f"LoRA target modules {lora.target_modules} matched no layer of {type(network).__name__}")
    with torch.no_grad():
        for cur, old in pairs:
            old.copy_(cur)
    network.set_adapter("default")


def adapter_pairs(network: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """``(default, old)`` LoRA parameter pairs of ``network``, matched by name."""
    params = dict(network.named_parameters())
    pairs = []
    for name, p in params.items():
        if ".default." in name and "lora_" in name:
            twin = params.get(name.replace(".default.", ".old."))
            if twin is not None:
                pairs.append((p, twin))
    return pairs


class Policy(nn.Module, ABC):
    """Base class of RL policies over a flow model (see the module docstring).

    An abstract class: a subclass that leaves one of these out cannot be instantiated. Subclasses implement :meth:`_velocity` (one role's velocity ``(B, ...)`` at flowlab times ``t`` ``(B,)``),
    :meth:`encode` (conditions of a batch of prompts/labels), :meth:`decode` (samples -> images in [0, 1]
    for rewards), :attr:`sample_shape`, :attr:`path` and :meth:`save`.
    """

    lora: LoraSpec | None = None

    # ----------------------------------------------------------------- roles
    def forward(self, x: Tensor, t: Tensor, cond: Any, guidance_scale: float = 1.0) -> Tensor:
        """The current policy's velocity (with gradients); ``guidance_scale != 1``: its guided field
        (:meth:`field`), e.g. FlowGRPO's step likelihoods of rollouts sampled with CFG, with the
        unconditional branch detached as the reference's training forward does."""
        if guidance_scale != 1.0:
            return self.field(cond, "current", guidance_scale, detach_unconditional=True)(x, t)
        return self._velocity(x, t, cond, "current")

    def time_grid(self, num_steps: int, shift: float = 1.0, device=None) -> Tensor:
        """The sampler's ``num_steps + 1`` flowlab times from ``0`` (noise) to ``1`` (data), float64:
        uniform then SD3-shifted (:func:`flowlab.flow.solvers.time_grid`). Policies of a diffusers
        family override this with their scheduler's own grid."""
        return time_grid(num_steps, shift=shift, device=device)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the trained network's activations in the backward pass (diffusers models).

        Raises:
            ConfigError: naming ``rl.gradient_checkpointing`` when the network does not support it.
        """
        net = self.network
        if not getattr(net, "_supports_gradient_checkpointing", False) or not hasattr(net, "enable_gradient_checkpointing"):
            raise ConfigError(f"rl.gradient_checkpointing: {type(net).__name__} does not support gradient checkpointing")
        net.enable_gradient_checkpointing()

    def velocity(self, x: Tensor, t: Tensor, cond: Any, role: str = "current") -> Tensor:
        """The velocity of ``role`` (``current``, ``old`` or ``ref``)."""
        if role not in ROLES:
            raise ValueError(f"unknown policy role {role!r}; choose one of {ROLES}")
        return self._velocity(x, t, cond, role)

    @abstractmethod
    def _velocity(self, x: Tensor, t: Tensor, cond: Any, role: str) -> Tensor: ...

    def field(self, cond: Any, role: str = "current", guidance_scale: float = 1.0, detach_unconditional: bool = False):
        """The sampling field ``(x, t) -> u`` of ``role`` for conditioning ``cond`` (batched like ``x``).
        Policies that support classifier-free guidance override this for ``guidance_scale != 1``
        (``detach_unconditional``: no gradient through the unconditional branch)."""
        if guidance_scale != 1.0:
            raise ValueError(f"{type(self).__name__} does not support guidance_scale={guidance_scale}; use 1.0")
        return lambda x, t: self.velocity(x, t, cond, role)

    @property
    @abstractmethod
    def network(self) -> nn.Module:
        """The trained network (carrying the LoRA adapters, if any)."""

    @property
    @abstractmethod
    def sample_shape(self) -> tuple[int, ...]: ...

    @property
    @abstractmethod
    def path(self) -> AffinePath: ...

    @abstractmethod
    def encode(self, conditions: list) -> Any:
        """Model conditioning for a list of conditions (class labels or prompts), batched."""

    @abstractmethod
    def decode(self, x: Tensor) -> Tensor:
        """Samples ``(B, *sample_shape)`` -> images ``(B, C, H, W)`` in [0, 1] (what rewards score)."""

    @abstractmethod
    def save(self, directory: str) -> None:
        """Write the fine-tuned artefact (a pipeline, and the LoRA adapter if there is one)."""

    # ----------------------------------------------------------------- role switching
    @contextlib.contextmanager
    def _role(self, role: str):
        """The module that computes ``role``: the network itself for ``current``; under full fine-tuning
        the frozen copy (:meth:`role_module`); with LoRA the network with its ``old`` adapter active
        (``old``) or its adapters disabled (``ref``), restored to the trained ``default`` adapter after."""
        net = self.network
        if role == "current":
            yield net
            return
        if self.lora is None:
            yield self.role_module(role)
            return
        if role == "old":
            net.set_adapter("old")
        else:  # ref: the base model
            net.disable_adapters()
        try:
            yield net
        finally:
            if role == "ref":
                net.enable_adapters()
            net.set_adapter("default")  # also marks the old adapter trainable again: undo that
            for _, old in adapter_pairs(net):
                old.requires_grad_(False)

    def _keep_frozen_copies(self, network: nn.Module, reference: bool) -> None:
        """Full fine-tuning: frozen copies of ``network`` as the old policy (and the reference)."""
        self.old = copy.deepcopy(network).requires_grad_(False)
        if reference:
            self.ref = copy.deepcopy(network).requires_grad_(False)

    def role_module(self, role: str) -> nn.Module | None:
        """Full fine-tuning: the frozen copy computing ``old`` / ``ref`` (``None`` for LoRA or ``current``)."""
        if self.lora is not None or role == "current":
            return None
        mod = getattr(self, role, None)
        if mod is None:
            raise ValueError(f"this policy keeps no {role!r} copy of its network (a KL term needs reference=True)")
        return mod

    @torch.no_grad()
    def update_old(self, decay: float) -> None:
        """Soft update ``theta_old <- decay * theta_old + (1 - decay) * theta`` (``decay = 0`` copies)."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"old-policy decay must lie in [0, 1], got {decay}")
        if self.lora is not None:
            pairs = adapter_pairs(self.network)
        else:
            old = self.role_module("old")
            pairs = list(zip(self.network.parameters(), old.parameters()))
        for cur, old in pairs:
            old.lerp_(cur.detach().to(old.dtype), 1.0 - decay)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


class FlowPolicy(Policy):
    """A flowlab velocity network (from a :class:`~flowlab.pipelines.FlowPipeline`) as an RL policy.

    Conditions are class labels (``None`` -> the null class, i.e. unconditional sampling of a
    class-conditional model). ``decode`` maps the model's [-1, 1] images to [0, 1].

    Args:
        network: the pipeline's ``velocity_model`` (trained in place).
        scheduler: the pipeline's ``FlowScheduler`` (path and prediction type).
        lora: LoRA settings, or ``None`` for full fine-tuning.
        reference: keep a frozen copy of the base model for a KL term (full fine-tuning only;
            with LoRA the reference is the adapter-free network).
    """

    def __init__(self, network: nn.Module, scheduler, lora: LoraSpec | None = None, reference: bool = False):
        super().__init__()
        self.scheduler = scheduler
        self.lora = lora
        self.current = network
        if lora is not None:
            add_policy_adapters(network, lora)
        else:
            network.requires_grad_(True)
            self._keep_frozen_copies(network, reference)

    @property
    def network(self) -> nn.Module:
        return self.current

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.current.sample_shape)

    @property
    def path(self) -> AffinePath:
        return self.scheduler.path

    def _velocity(self, x, t, cond, role):
        with self._role(role) as net:
            return self.scheduler.model_velocity(net, x, t, cond)  # the pipeline's reading of the model

    def field(self, cond, role="current", guidance_scale=1.0, detach_unconditional=False):
        if guidance_scale == 1.0:
            return super().field(cond, role)
        if self.current.num_classes == 0:
            raise ValueError("guidance_scale != 1 needs a class-conditional base model")
        return guided_field(
            lambda x, t, c: self.velocity(x, t, c, role), cond, guidance_scale, self.current.null_label, detach_unconditional
        )

    def encode(self, conditions: list) -> Tensor | None:
        net = self.current
        if net.num_classes == 0:
            if any(c is not None for c in conditions):
                raise ValueError("the base model is unconditional; conditions must be None")
            return None
        labels = [net.null_label if c is None else int(c) for c in conditions]
        return torch.tensor(labels, dtype=torch.long, device=next(net.parameters()).device)

    def decode(self, x: Tensor) -> Tensor:
        return ((x.float() + 1) / 2).clamp(0, 1)

    def merged_network(self) -> nn.Module:
        """A plain copy of the current network (LoRA merged into the weights)."""
        net = copy.deepcopy(self.current)
        if self.lora is not None:
            net.delete_adapters("old")
            net.set_adapter("default")
            net.fuse_lora(adapter_names=["default"])
            net.unload_lora()
        return net.requires_grad_(False)

    def save(self, directory: str) -> None:
        from ..pipelines import FlowPipeline

        pipe = FlowPipeline(velocity_model=self.merged_network(), scheduler=self.scheduler)
        pipe.save_pretrained(directory)
        if self.lora is not None:
            self.current.save_lora_adapter(f"{directory}/lora", adapter_name="default")
