"""Sample-quality distances for vector data (2-D toys): sliced Wasserstein and MMD."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sliced_wasserstein", "mmd_rbf"]


def sliced_wasserstein(x: Tensor, y: Tensor, num_projections: int = 256, generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance between equal-size samples ``x``, ``y`` ``(N, D)``.

    ``sqrt(mean_theta W2^2(theta^T x, theta^T y))`` over random unit directions; 1-D W2 by sorting.
    """
    if x.shape != y.shape:
        n = min(len(x), len(y))
        x, y = x[:n], y[:n]
    theta = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px = (x.double().cpu() @ theta).sort(0).values
    py = (y.double().cpu() @ theta).sort(0).values
    return float(((px - py) ** 2).mean().sqrt())


def mmd_rbf(x: Tensor, y: Tensor, bandwidths: tuple[float, ...] = (0.1, 0.5, 1.0, 2.0)) -> float:
    """Unbiased squared MMD with a sum of RBF kernels ``exp(-|a-b|^2 / (2 h^2))``."""
    x, y = x.double().cpu(), y.double().cpu()

    def k(a, b):
        d2 = torch.cdist(a, b) ** 2
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2 * kxy.mean())
