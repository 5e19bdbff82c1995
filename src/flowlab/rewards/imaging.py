"""Conversions between reward images (float ``(N, C, H, W)`` in ``[0, 1]``), uint8 arrays,
PIL images and base64 PNG strings (the reward server protocol)."""
from __future__ import annotations

import base64
import binascii
import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["to_uint8", "to_pil", "encode_png_base64", "decode_png_base64"]


def to_uint8(images: Tensor) -> np.ndarray:
    """Float ``(N, C, H, W)`` in ``[0, 1]`` -> uint8 ``(N, H, W, C)`` as ``round(255·x)``
    (clamped; the DDPO convention)."""
    x = (images.detach().to("cpu", torch.float32) * 255).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def to_pil(images: Tensor) -> list[Image.Image]:
    """Float ``(N, C, H, W)`` in ``[0, 1]`` -> PIL images (mode ``L`` for 1 channel, ``RGB`` for 3)."""
    arr = to_uint8(images)
    if arr.shape[-1] == 1:
        return [Image.fromarray(np.ascontiguousarray(a[..., 0])) for a in arr]
    if arr.shape[-1] == 3:
        return [Image.fromarray(a) for a in arr]
    raise ValueError(f"images must have 1 or 3 channels, got {arr.shape[-1]}")


def encode_png_base64(images: Tensor) -> list[str]:
    """Float ``(N, C, H, W)`` in ``[0, 1]`` -> base64 (ASCII) PNG strings, lossless at 8 bits."""
    out = []
    for im in to_pil(images):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def decode_png_base64(strings: Sequence[str]) -> Tensor:
    """Base64 PNG (or any PIL-readable format) strings -> float ``(N, C, H, W)`` in ``[0, 1]``.

    Grey images give ``C = 1``; everything else is converted to RGB (``C = 3``).

    Raises:
        ValueError: if a string is not base64 of a readable image, or the images differ in
            size or channel count (they must stack into one batch).
    """
    arrays = []
    for i, s in enumerate(strings):
        if not isinstance(s, str):
            raise ValueError(f"image {i} is a {type(s).__name__}, expected a base64 string")
        try:
            with Image.open(io.BytesIO(base64.b64decode(s, validate=True))) as im:
                im = im.convert("L") if im.mode in ("L", "1", "I", "I;16", "F") else im.convert("RGB")
                a = np.asarray(im, dtype=np.uint8)
        except (binascii.Error, ValueError, OSError) as e:
            raise ValueError(f"image {i} is not a base64-encoded image: {e}") from e
        arrays.append(a[..., None] if a.ndim == 2 else a)
    if not arrays:
        return torch.zeros(0, 3, 1, 1)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images differ in size or channels: {sorted(shapes)}; send one size per request")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return x.contiguous()
