"""Quality guards against reward hacking on digits: a model that earns a perfect reward by drawing
one perfect "3" a thousand times, or 3s that only the reward model finds convincing, must show it.

* ``fd_target``: Fréchet distance, in the flowlab digits classifier's feature space, between the
  samples and the real digits of the target class (train + test splits, about 180 images). That
  classifier is also the ``digits_classifier`` reward, so this figure can be fooled with it;
* ``fd_judge``: the same distance in the feature space of the independent judge
  (:data:`flowlab.metrics.classifier.JUDGE_RECIPE`: an MLP on the pixels with its own seed,
  sharing nothing with the reward CNN). The reward-hacking bar (:func:`hacking_bar`) is read here;
* ``diversity``: mean pairwise Euclidean distance between samples in pixel space ([0, 1]),
  reported with ``diversity_real``, the same figure for the real target-class digits.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mean_pairwise_distance", "digits_quality", "real_digits_of_class", "judge_evaluator", "hacking_bar"]

_JUDGES: dict[str, object] = {}


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


def judge_evaluator(cache_dir=None):
    """The :class:`~flowlab.metrics.digits.DigitsEvaluator` of the independent judge, loaded (or trained
    and cached) once per cache file and process."""
    from ..metrics.classifier import JUDGE_RECIPE, classifier_path
    from ..metrics.digits import DigitsEvaluator

    key = str(classifier_path(cache_dir, JUDGE_RECIPE))
    if key not in _JUDGES:
        _JUDGES[key] = DigitsEvaluator.load(cache_dir, recipe=JUDGE_RECIPE)
    return _JUDGES[key]


def digits_quality(images: Tensor, target: int, evaluator=None, judge=None) -> dict:
    """``fd_target``, ``fd_judge``, ``diversity``, ``diversity_real`` of digits ``images`` ``(N, 1, 8, 8)``
    in [0, 1]. ``evaluator`` (the reward classifier's) and ``judge`` default to the cached ones."""
    from ..metrics.digits import DigitsEvaluator, fd_from_features

    ev = evaluator or DigitsEvaluator.load()
    jd = judge or judge_evaluator()
    real = real_digits_of_class(target)
    return {
        "fd_target": fd_from_features(ev.features(images, value_range="unit"), ev.features(real, value_range="unit")),
        "fd_judge": fd_from_features(jd.features(images, value_range="unit"), jd.features(real, value_range="unit")),
        "diversity": mean_pairwise_distance(images.clamp(0, 1)),
        "diversity_real": mean_pairwise_distance(real),
    }


def hacking_bar(fd_judge: float, base_fd_judge: float, reward: float, fd_multiple: float = 3.0, min_reward: float = 0.9) -> dict:
    """The reward-hacking bar of a fine-tuned model: its samples of the target class are within
    ``fd_multiple`` x the judge FD of the base model's own class-conditional samples of that class
    (``fd_judge <= fd_multiple * base_fd_judge``) while its reward is at least ``min_reward``.

    Returns ``passes`` with both parts (``fd_ok``, ``reward_ok``), ``fd_ratio`` = fd_judge / base_fd_judge
    and the inputs.
    """
    if not base_fd_judge > 0:
        raise ValueError(f"base_fd_judge must be > 0, got {base_fd_judge}")
    fd_ok = bool(fd_judge <= fd_multiple * base_fd_judge)
    reward_ok = bool(reward >= min_reward)
    return {
        "passes": fd_ok and reward_ok, "fd_ok": fd_ok, "reward_ok": reward_ok, "fd_ratio": fd_judge / base_fd_judge,
        "fd_judge": fd_judge, "base_fd_judge": base_fd_judge, "reward": reward, "fd_multiple": fd_multiple, "min_reward": min_reward,
    }
