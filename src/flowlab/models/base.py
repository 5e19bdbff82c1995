"""Shared pieces of flowlab's velocity networks.

Every network is a diffusers ``ModelMixin`` + ``ConfigMixin`` taking
``forward(x, t, class_labels=None) -> Tensor`` with ``x`` ``(B, *sample_shape)``, flowlab
time ``t`` ``(B,)`` in ``[0, 1]`` (0 = noise) and optional integer labels ``(B,)``. A
class-conditional network has ``num_classes + 1`` label embeddings: index
``num_classes`` is the learned *null* class used for classifier-free guidance.
"""
from __future__ import annotations

import math

import torch
from diffusers import ModelMixin  # noqa: F401  (diffusers' loader looks for it in this namespace)
from diffusers.loaders import PeftAdapterMixin
from torch import Tensor, nn

__all__ = ["sinusoidal_embedding", "sinusoidal_frequencies", "VelocityModelMixin", "set_attention_backend", "ATTENTION_BACKENDS"]

ATTENTION_BACKENDS = ("sdpa", "xformers")


def sinusoidal_frequencies(dim: int, device=None) -> Tensor:
    """The ``dim // 2`` frequencies ``10000^(-k / (dim // 2))`` of :func:`sinusoidal_embedding`, float32."""
    half = dim // 2
    return torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) / half)


def sinusoidal_embedding(t: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    """Transformer-style sinusoidal features of ``scale * t``: ``[cos(a), sin(a)]`` with
    ``a = scale * t * sinusoidal_frequencies(dim)`` (a zero column appended for odd ``dim``); shape ``(B, dim)``."""
    args = scale * t.float()[:, None] * sinusoidal_frequencies(dim, t.device)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return emb if dim % 2 == 0 else torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)


class VelocityModelMixin(PeftAdapterMixin):
    """Helpers shared by velocity networks (mixed into ``ModelMixin`` subclasses).

    Through diffusers' ``PeftAdapterMixin`` every velocity network takes peft LoRA adapters:
    ``add_adapter``, ``set_adapter``, ``disable_adapters``, ``save_lora_adapter`` / ``load_lora_adapter``.
    """

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.config.sample_shape)

    @property
    def num_classes(self) -> int:
        return int(self.config.num_classes)

    @property
    def null_label(self) -> int | None:
        """Index of the null class for classifier-free guidance, or ``None`` if unconditional."""
        return self.num_classes if self.num_classes > 0 else None

    def _labels(self, class_labels: Tensor | None, batch: int, device) -> Tensor | None:
        if self.num_classes == 0:
            if class_labels is not None:
                raise ValueError("this model is unconditional (num_classes=0) but class_labels were given")
            return None
        if class_labels is None:  # unconditional sampling of a conditional model = the null class
            return torch.full((batch,), self.num_classes, device=device, dtype=torch.long)
        class_labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
        if class_labels.shape[0] != batch:
            raise ValueError(f"class_labels has {class_labels.shape[0]} entries for a batch of {batch}")
        if (class_labels < 0).any() or (class_labels > self.num_classes).any():
            raise ValueError(f"class_labels must lie in [0, {self.num_classes}] ({self.num_classes} is the null class)")
        return class_labels

    def _check_input(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"{type(self).__name__} expects inputs of shape (B, {', '.join(map(str, self.sample_shape))}), got {tuple(x.shape)}")


def set_attention_backend(model: nn.Module, backend: str = "sdpa") -> None:
    """Select the attention implementation of a diffusers model.

    ``sdpa`` (default) is PyTorch's scaled-dot-product attention, diffusers' default.
    ``xformers`` needs the optional extra ``flowlab[xformers]`` and a CUDA device.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if backend == "sdpa":
        return
    try:
        import xformers  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "model.attention=xformers needs the xformers package: pip install 'flowlab[xformers]' "
            "(or set model.attention=sdpa, the default)"
        ) from e
    if not torch.cuda.is_available():
        raise RuntimeError("model.attention=xformers needs a CUDA device, and none is available; use model.attention=sdpa")
    if not hasattr(model, "enable_xformers_memory_efficient_attention"):
        raise RuntimeError(f"{type(model).__name__} has no attention layers to switch to xformers")
    model.enable_xformers_memory_efficient_attention()
