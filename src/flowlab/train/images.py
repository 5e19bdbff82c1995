"""Sample grids as PNG (no torchvision needed): image grids, and 2-D scatter renders for vector data."""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image

from ..fileio import atomic_path

__all__ = ["make_grid", "scatter_image", "save_sample_grid"]


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1, upscale: int = 4) -> np.ndarray:
    """``(N, C, H, W)`` in [0, 1] -> uint8 ``(H', W', C)`` grid, nearest-upscaled by ``upscale``."""
    x = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = x.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    grid = torch.ones(c, ncol * (h + padding) + padding, nrow * (w + padding) + padding)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, padding + r * (h + padding) : padding + r * (h + padding) + h, padding + col * (w + padding) : padding + col * (w + padding) + w] = x[i]
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    if upscale > 1:
        arr = arr.repeat(upscale, 0).repeat(upscale, 1)
    return arr


def scatter_image(points: torch.Tensor, size: int = 256, lim: float = 3.0) -> np.ndarray:
    """Render 2-D points ``(N, 2)`` as a grey density image on ``[-lim, lim]^2``."""
    p = points.detach().float().cpu().numpy()[:, :2]
    hist, _, _ = np.histogram2d(p[:, 1], p[:, 0], bins=size, range=[[-lim, lim], [-lim, lim]])
    hist = np.flipud(hist)
    img = 255 - (255 * np.clip(hist / max(np.percentile(hist[hist > 0], 95) if (hist > 0).any() else 1, 1), 0, 1))
    return img.astype(np.uint8)[..., None]


def save_sample_grid(samples: torch.Tensor, path: str | os.PathLike) -> None:
    """Save images ``(N, C, H, W)`` in [0, 1] as a grid, or 2-D vectors ``(N, 2)`` as a scatter render."""
    arr = make_grid(samples) if samples.ndim == 4 else scatter_image(samples)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
