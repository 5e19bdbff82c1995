"""An image velocity network over diffusers' ``UNet2DModel``."""
from __future__ import annotations

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import Tensor

from .base import VelocityModelMixin

__all__ = ["UNetVelocity"]


class UNetVelocity(ModelMixin, ConfigMixin, VelocityModelMixin):
    """``v_theta(x, t, y)`` from a diffusers ``UNet2DModel``.

    flowlab time ``t`` in ``[0, 1]`` is fed as the UNet's timestep ``1000 t``; labels use the
    UNet's own class embedding with ``num_classes + 1`` entries (the last is the null class).

    Args:
        sample_shape: ``[C, H, W]``.
        block_out_channels, down_block_types, up_block_types, layers_per_block,
        attention_head_dim, norm_num_groups, dropout: passed to ``UNet2DModel``.
        num_classes: ``0`` for unconditional.
    """

    @register_to_config
    def __init__(
        self,
        sample_shape: tuple[int, int, int] = (3, 32, 32),
        block_out_channels: tuple[int, ...] = (64, 128, 128),
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types: tuple[str, ...] = ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block: int = 2,
        attention_head_dim: int = 32,
        norm_num_groups: int = 32,
        num_classes: int = 0,
        dropout: float = 0.0,
    ):
        super().__init__()
        c, h, w = sample_shape
        if h != w:
            raise ValueError(f"UNetVelocity needs square images, got sample_shape={list(sample_shape)}")
        if not (len(block_out_channels) == len(down_block_types) == len(up_block_types)):
            raise ValueError("block_out_channels, down_block_types and up_block_types must have the same length")
        halvings = len(block_out_channels) - 1  # every down block but the last halves the resolution
        if h % (2**halvings):
            raise ValueError(
                f"{len(block_out_channels)} UNet levels halve the resolution {halvings} times, so the image side "
                f"must be divisible by {2**halvings}; got {h} (use fewer block_out_channels or a larger data.resolution)"
            )
        self.unet = UNet2DModel(
            sample_size=h,
            in_channels=c,
            out_channels=c,
            block_out_channels=tuple(block_out_channels),
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            layers_per_block=layers_per_block,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            dropout=dropout,
            num_class_embeds=num_classes + 1 if num_classes > 0 else None,
        )

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        self._check_input(x)
        labels = self._labels(class_labels, x.shape[0], x.device)
        return self.unet(x, (1000.0 * t).to(x.dtype), class_labels=labels).sample
