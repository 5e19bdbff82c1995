"""Couplings between noise ``x0`` and data ``x1`` within a minibatch.

``IndependentCoupling`` keeps the pairs as drawn. ``MinibatchOTCoupling`` re-pairs the
noise to the data by an exact assignment minimising the total squared Euclidean cost
(OT-CFM, Tong et al. 2023; Pooladian et al. 2023). The data order is kept and the noise
is permuted, so labels and other per-example conditioning stay attached to ``x1``.

For a conditional model, pass the conditioning each row is trained with as ``groups``: noise is then
re-paired only among rows of the same group. The model learns ``p(x | c)`` from the noise it sees with
``c``; pairing across classes would hand each class the noise nearest its images, so the per-class noise
would no longer be standard normal and sampling from ``N(0, I)`` would miss (conditional OT-CFM pairs
within a condition for the same reason).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = ["Coupling", "IndependentCoupling", "MinibatchOTCoupling", "build_coupling"]


class Coupling(ABC):
    @abstractmethod
    def __call__(self, x_0: Tensor, x_1: Tensor, groups: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return the coupled ``(x_0, x_1)``; ``x_1`` keeps its order. Rows are re-paired only within
        equal values of ``groups`` ``(B,)`` (e.g. class labels after dropout) when it is given."""


class IndependentCoupling(Coupling):
    """The product coupling ``p0 x p1``: pairs are left as drawn."""

    def __call__(self, x_0, x_1, groups=None):
        return x_0, x_1


class MinibatchOTCoupling(Coupling):
    """Exact minibatch optimal transport (squared Euclidean cost, Hungarian algorithm)."""

    def permutation(self, x_0: Tensor, x_1: Tensor) -> Tensor:
        """Index ``perm`` such that ``x_0[perm][i]`` is paired with ``x_1[i]``."""
        cost = torch.cdist(x_1.flatten(1).double(), x_0.flatten(1).double()) ** 2
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        perm = torch.empty(len(rows), dtype=torch.long)
        perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
        return perm.to(x_0.device)

    def __call__(self, x_0, x_1, groups=None):
        if x_0.shape[0] != x_1.shape[0]:
            raise ValueError(f"OT coupling needs equal batch sizes, got {x_0.shape[0]} and {x_1.shape[0]}")
        if groups is None:
            return x_0[self.permutation(x_0, x_1)], x_1
        if groups.shape != (x_1.shape[0],):
            raise ValueError(f"OT coupling: groups must have shape ({x_1.shape[0]},), got {tuple(groups.shape)}")
        perm = torch.arange(x_0.shape[0], device=x_0.device)
        for g in torch.unique(groups):
            rows = (groups == g).nonzero().flatten()
            if len(rows) > 1:
                perm[rows] = rows[self.permutation(x_0[rows], x_1[rows])]
        return x_0[perm], x_1


def build_coupling(name: str = "independent") -> Coupling:
    if name == "independent":
        return IndependentCoupling()
    if name in ("ot", "minibatch_ot"):
        return MinibatchOTCoupling()
    raise ValueError(f"unknown coupling {name!r}; choose independent or ot")
