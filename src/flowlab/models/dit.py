"""A Diffusion Transformer velocity network over diffusers' ``DiTTransformer2DModel``."""
from __future__ import annotations

from diffusers import DiTTransformer2DModel, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import Tensor

from .base import VelocityModelMixin

__all__ = ["DiTVelocity"]


class DiTVelocity(ModelMixin, ConfigMixin, VelocityModelMixin):
    """``v_theta(x, t, y)`` from diffusers' DiT (adaLN-Zero blocks conditioned on time and label).

    The DiT always embeds a label: an unconditional model has a single (null) label 0, a
    conditional one ``num_classes + 1`` labels (the last is the null class). Time ``t`` is
    fed as timestep ``1000 t``.

    Args:
        sample_shape: ``[C, H, W]`` with ``H`` divisible by ``patch_size``.
        num_layers, num_attention_heads, attention_head_dim, patch_size: transformer size.
        num_classes: ``0`` for unconditional.
    """

    @register_to_config
    def __init__(
        self,
        sample_shape: tuple[int, int, int] = (3, 32, 32),
        num_layers: int = 6,
        num_attention_heads: int = 4,
        attention_head_dim: int = 32,
        patch_size: int = 2,
        num_classes: int = 0,
        dropout: float = 0.0,
    ):
        super().__init__()
        c, h, w = sample_shape
        if h != w or h % patch_size:
            raise ValueError(f"DiTVelocity needs square images with size divisible by patch_size={patch_size}, got {list(sample_shape)}")
        self.dit = DiTTransformer2DModel(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=c,
            out_channels=c,
            num_layers=num_layers,
            dropout=dropout,
            sample_size=h,
            patch_size=patch_size,
            num_embeds_ada_norm=num_classes + 1,
        )

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        self._check_input(x)
        labels = self._labels(class_labels, x.shape[0], x.device)
        if labels is None:
            labels = x.new_zeros(x.shape[0]).long()
        return self.dit(x, timestep=(1000.0 * t).to(x.dtype), class_labels=labels).sample
