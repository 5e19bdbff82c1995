"""JPEG (in)compressibility rewards (DDPO), no weights.

The image is quantised to uint8 (``round(255·x)``), encoded by PIL as JPEG at quality 95,
and its size in kilobytes (1 kB = 1000 bytes) is the score: ``jpeg_incompressibility``
rewards large files (detail, noise), ``jpeg_compressibility`` rewards small ones (flat,
smooth images) with the negative size. Grey images are encoded as single-channel JPEGs.
"""
from __future__ import annotations

import io

import torch
from torch import Tensor

from flowlab.rewards.base import OptionError, RewardFunction, register_reward
from flowlab.rewards.imaging import to_pil

__all__ = ["JpegIncompressibility", "JpegCompressibility", "jpeg_size_kb"]


def jpeg_size_kb(images: Tensor, quality: int = 95) -> Tensor:
    """JPEG sizes in kB of float ``(N, C, H, W)`` images in ``[0, 1]``; NaN where PIL fails.

    Returns:
        float32 ``(N,)``.
    """
    sizes = []
    for im in to_pil(images):
        buf = io.BytesIO()
        try:
            im.save(buf, format="JPEG", quality=quality)
            sizes.append(buf.tell() / 1000.0)
        except (OSError, ValueError):
            sizes.append(float("nan"))
    return torch.tensor(sizes, dtype=torch.float32)


class _JpegReward(RewardFunction):
    """``sign`` × JPEG size in kB.

    Args:
        quality: PIL JPEG quality, 1..95 (DDPO uses 95).
    """

    sign = 1.0

    def __init__(self, *, quality: int = 95):
        super().__init__()
        if not 1 <= quality <= 95:
            raise OptionError("quality", f"must be in 1..95 (PIL's useful range), got {quality}")
        self.quality = quality

    def score(self, images, prompts, metadata):
        return self.sign * jpeg_size_kb(images, self.quality)


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(_JpegReward):
    """JPEG size in kB at quality 95 (larger = more detail). Scale: ~0.7 kB for a flat
    64×64 RGB image, ~5 kB for 64×64 uniform noise, ~300 kB for 512×512 noise.

    Args:
        quality: PIL JPEG quality, 1..95.
    """

    sign = 1.0


@register_reward("jpeg_compressibility")
class JpegCompressibility(_JpegReward):
    """Negative JPEG size in kB at quality 95 (closer to 0 = more compressible).

    Args:
        quality: PIL JPEG quality, 1..95.
    """

    sign = -1.0
