"""2-D toy distributions: two moons, eight Gaussians, checkerboard (seeded, in memory)."""
from __future__ import annotations

import math

import numpy as np
import torch

from .base import DataError, InMemoryDataset

__all__ = ["sample_toy2d", "Toy2DDataset", "TOY2D"]

TOY2D = ("moons", "8gaussians", "checkerboard")


def sample_toy2d(name: str, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` points ``(n, 2)`` of a toy distribution, scaled to roughly unit variance per axis."""
    rng = np.random.default_rng(seed)
    if name == "moons":
        from sklearn.datasets import make_moons

        x, _ = make_moons(n, noise=0.05, random_state=seed)
        x = (x - np.array([0.5, 0.25])) / np.array([0.87, 0.5])
    elif name == "8gaussians":
        centers = np.array([(math.cos(a), math.sin(a)) for a in np.arange(8) * math.pi / 4]) * 2.0
        x = centers[rng.integers(0, 8, n)] + 0.1 * rng.standard_normal((n, 2))
        x = x / 1.42
    elif name == "checkerboard":
        x1 = rng.uniform(-2, 2, n)
        x2 = rng.uniform(0, 1, n) + rng.integers(0, 2, n) * 2 - 2 + (np.floor(x1) % 2)
        x = np.stack([x1, x2], 1) / 1.15
    else:
        raise DataError(f"unknown 2-D toy {name!r}; choose one of {TOY2D}")
    return torch.as_tensor(x, dtype=torch.float32)


class Toy2DDataset(InMemoryDataset):
    """``num_samples`` points of a 2-D toy, unlabelled."""

    def __init__(self, name: str, num_samples: int = 20000, seed: int = 0):
        super().__init__(sample_toy2d(name, num_samples, seed), None, 0, kind="vector")
