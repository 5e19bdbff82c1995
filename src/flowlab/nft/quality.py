"""Quality guards against reward hacking on digits: a model that earns a perfect reward by drawing
one perfect "3" a thousand times must show it.

* ``fd_target``: Fréchet distance, in the flowlab digits classifier's feature space, between the
  samples and the real digits of the target class (train + test splits, about 180 images);
* ``diversity``: mean pairwise Euclidean distance between samples in pixel space ([0, 1]),
  reported with ``diversity_real``, the same figure for the real target-class digits.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mean_pairwise_distance", "digits_quality", "real_digits_of_class"]


def mean_pairwise_distance(x: Tensor) -> float:
    """Mean Euclidean distance over distinct pairs of the rows of ``x`` ``(N, ...)``, ``N >= 2``."""
    f = x.detach().double().flatten(1)
    n = f.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 samples for a pairwise distance, got {n}")
    d = torch.cdist(f, f)
    return float(d.sum() / (n * (n - 1)))


def real_digits_of_class(target: int) -> Tensor:
    """The real digits of class ``target`` (train and test splits), ``(M, 1, 8, 8)`` in [0, 1]."""
    from ..data.digits import load_digits_arrays

    x, y = load_digits_arrays("all")
    return ((torch.as_tensor(x[y == target]) + 1) / 2).float()


def digits_quality(images: Tensor, target: int, evaluator=None) -> dict:
    """``fd_target``, ``diversity``, ``diversity_real`` of digits ``images`` ``(N, 1, 8, 8)`` in [0, 1]."""
    from ..metrics.digits import DigitsEvaluator, fd_from_features

    ev = evaluator or DigitsEvaluator.load()
    real = real_digits_of_class(target)
    f_fake = ev.features(images, value_range="unit")
    f_real = ev.features(real, value_range="unit")
    return {
        "fd_target": fd_from_features(f_fake, f_real),
        "diversity": mean_pairwise_distance(images.clamp(0, 1)),
        "diversity_real": mean_pairwise_distance(real),
    }
