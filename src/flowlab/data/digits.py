"""scikit-learn's handwritten digits: 1,797 real 8x8 grey images shipped inside scikit-learn.

Pixels (0..16) are mapped to ``[-1, 1]`` as ``x / 8 - 1``. The train/test split is fixed
(stratified, 20% test, ``random_state=0``): 1,437 train and 360 test images.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import DataError, InMemoryDataset

__all__ = ["load_digits_arrays", "DigitsDataset", "to_unit_range", "from_unit_range"]

TEST_FRACTION = 0.2
SPLIT_SEED = 0


def load_digits_arrays(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 1, 8, 8)`` float32 in ``[-1, 1]`` and labels ``(N,)`` for ``train``, ``test`` or ``all``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    y = d.target.astype(np.int64)
    if split == "all":
        return x, y
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y)
    if split == "train":
        return x_tr, y_tr
    if split == "test":
        return x_te, y_te
    raise DataError(f"data.split for digits must be train, test or all, got {split!r}")


class DigitsDataset(InMemoryDataset):
    """The embedded digits as an in-memory image dataset ``(N, 1, 8, 8)`` with 10 classes."""

    def __init__(self, split: str = "train"):
        x, y = load_digits_arrays(split)
        super().__init__(torch.from_numpy(x), torch.from_numpy(y), num_classes=10, kind="image")


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Model space ``[-1, 1]`` -> image space ``[0, 1]`` (clamped)."""
    return ((x + 1) / 2).clamp(0, 1)


def from_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Image space ``[0, 1]`` -> model space ``[-1, 1]``."""
    return x * 2 - 1
