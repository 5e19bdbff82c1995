"""Dataset conventions: items are ``{"x": Tensor, "label": int}`` (label ``-1`` when unlabelled).

Images are ``(C, H, W)`` float tensors in ``[-1, 1]``; vectors are ``(D,)``. In-memory
datasets also offer ``get_batch(indices)`` so the trainer can skip per-item collation.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["InMemoryDataset", "DataError"]


from ..errors import DataError


class InMemoryDataset(Dataset):
    """Tensors held in memory: ``x`` ``(N, ...)`` and optional integer ``labels`` ``(N,)``.

    Args:
        x: samples.
        labels: class labels or ``None``.
        num_classes: number of classes (``0`` if unlabelled).
        kind: ``image`` (``x`` is ``(N, C, H, W)`` in ``[-1, 1]``) or ``vector``.
    """

    def __init__(self, x: Tensor, labels: Tensor | None = None, num_classes: int = 0, kind: str = "vector"):
        if len(x) == 0:
            raise DataError("the dataset is empty")
        if labels is not None and len(labels) != len(x):
            raise DataError(f"{len(x)} samples but {len(labels)} labels")
        self.x, self.labels, self.num_classes, self.kind = x, labels, num_classes, kind

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "label": int(self.labels[i]) if self.labels is not None else -1}

    def get_batch(self, indices: Tensor) -> dict:
        labels = self.labels[indices] if self.labels is not None else torch.full((len(indices),), -1, dtype=torch.long)
        return {"x": self.x[indices], "label": labels}
