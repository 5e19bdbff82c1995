"""The digits evaluator: a Fréchet distance in the feature space of a small digits classifier
(an "FID for digits", :mod:`flowlab.metrics.classifier` and :mod:`flowlab.metrics.frechet`), plus
classifier confidence and the histogram of predicted classes of 8x8 scikit-learn digits samples.
The classifier and Fréchet-distance names are re-exported here for their old import path.

``DigitsEvaluator.evaluate(images)`` returns

* ``fd``: Fréchet distance between Gaussians fitted to the classifier features of ``images``
  and of the real TRAIN split (1,437 images);
* ``floor``: the same distance for the real TEST split (360 images) against TRAIN — the
  real-vs-real floor that sets the scale (``floor_num_samples`` = 360);
* ``confidence``: mean max softmax probability of the classifier on ``images``;
* ``class_hist``: fractions of ``images`` predicted as each digit 0..9;
* ``num_samples`` and ``num_nonfinite`` (samples that contained NaN/inf, which are zeroed).

Small-sample bias: the Fréchet distance estimated from ``n`` samples is biased upwards,
roughly by ``O(d / n)`` (mean and covariance estimation noise never cancels), so the floor on
360 test images is *not* zero and an FD computed on 1,000 generated samples is not directly
comparable with one computed on 360 or 10,000. Compare FDs only at equal sample counts; to
compare against the floor on an equal footing, evaluate 360 samples (or average several
360-sample evaluations).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowlab.data.digits import load_digits_arrays
from flowlab.fileio import atomic_path

from .classifier import (
    CLASSIFIER_RECIPE,
    CLASSIFIER_VERSION,
    FEATURE_DIM,
    JUDGE_RECIPE,
    JUDGE_VERSION,
    NUM_CLASSES,
    DigitsClassifier,
    DigitsMLPClassifier,
    build_classifier,
    classifier_accuracy,
    classifier_path,
    default_cache_dir,
    load_classifier,
    load_judge,
    recipe_hash,
    train_classifier,
)
from .frechet import fd_from_features, feature_stats, frechet_distance

__all__ = [
    "DigitsEvaluator",
    "prepare_images",
    # re-exported from .classifier and .frechet
    "DigitsClassifier",
    "DigitsMLPClassifier",
    "CLASSIFIER_RECIPE",
    "CLASSIFIER_VERSION",
    "JUDGE_RECIPE",
    "JUDGE_VERSION",
    "FEATURE_DIM",
    "NUM_CLASSES",
    "default_cache_dir",
    "classifier_path",
    "classifier_accuracy",
    "train_classifier",
    "load_classifier",
    "load_judge",
    "build_classifier",
    "recipe_hash",
    "feature_stats",
    "frechet_distance",
    "fd_from_features",
]


def prepare_images(images: np.ndarray | Tensor, value_range: str = "model") -> tuple[Tensor, int]:
    """Bring images to model space: float32 ``(N, 1, 8, 8)`` in ``[-1, 1]`` on CPU.

    Accepts tensors or arrays shaped ``(N, 8, 8)``, ``(N, 1, 8, 8)``, ``(N, 8, 8, 1)`` (and 3
    channels, averaged to grey). ``value_range`` is ``"model"`` (``[-1, 1]``) or ``"unit"``
    (``[0, 1]``); values are clamped to that range. Non-finite values are replaced by the
    middle of the range (mid-grey); the number of samples that had any is returned alongside.
    """
    if value_range not in ("model", "unit"):
        raise ValueError(f"value_range must be 'model' or 'unit', got {value_range!r}")
    x = images if isinstance(images, Tensor) else torch.as_tensor(np.asarray(images))
    x = x.detach().to("cpu", torch.float32)
    if x.ndim == 3 and x.shape[1:] == (8, 8):
        x = x[:, None]
    elif x.ndim == 4 and x.shape[2:] == (8, 8) and x.shape[1] in (1, 3):
        pass
    elif x.ndim == 4 and x.shape[1:3] == (8, 8) and x.shape[3] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"expected images (N, 8, 8), (N, 1, 8, 8) or (N, 8, 8, 1); got {tuple(x.shape)}")
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    finite = torch.isfinite(x)
    num_nonfinite = int((~finite).flatten(1).any(1).sum())
    lo, hi = (-1.0, 1.0) if value_range == "model" else (0.0, 1.0)
    if num_nonfinite:
        x = torch.where(finite, x, torch.full_like(x, (lo + hi) / 2))
    x = x.clamp(lo, hi)
    if value_range == "unit":
        x = x * 2 - 1
    return x.contiguous(), num_nonfinite


class DigitsEvaluator:
    """Fréchet distance / confidence / class histogram of digits samples (see module docs).

    Build with :meth:`load`. The train-split feature statistics are computed at load; the
    real-vs-real ``floor`` (TEST vs TRAIN) is computed on first use and cached.

    Note the small-sample bias of FD: compare FDs at equal sample counts. The floor uses the
    360 TEST images (``floor_num_samples`` in the result).
    """

    batch_size = 1024

    def __init__(self, model: torch.nn.Module, info: dict[str, Any] | None = None):
        self.model = model.eval().to("cpu", torch.float32)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.info = dict(info or {})
        x_tr, _ = load_digits_arrays("train")
        # every image goes through prepare_images, so real data given to evaluate() takes
        # bit-for-bit the same path (fd of the real test split == floor exactly)
        self.train_features = self._features(prepare_images(x_tr)[0])[0].numpy()
        self.train_mu, self.train_cov = feature_stats(self.train_features)
        self._floor: float | None = None
        self._floor_num_samples: int | None = None

    @classmethod
    def load(
        cls, cache_dir: str | os.PathLike | None = None, verbose: bool = False, recipe: dict[str, Any] | None = None
    ) -> "DigitsEvaluator":
        """The evaluator of the classifier of ``recipe`` (default :data:`CLASSIFIER_RECIPE`, the reward's
        CNN; :data:`JUDGE_RECIPE` for the independent judge), loaded from the cache or trained."""
        model, info = load_classifier(cache_dir, verbose=verbose, recipe=recipe)
        return cls(model, info)

    @torch.no_grad()
    def _features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats, probs = [], []
        for i in range(0, x.shape[0], self.batch_size):
            f, logits = self.model.features_and_logits(x[i : i + self.batch_size])
            feats.append(f)
            probs.append(logits.softmax(dim=1))
        if not feats:
            return torch.zeros(0, self.model.head.in_features), torch.zeros(0, self.model.head.out_features)
        return torch.cat(feats), torch.cat(probs)

    def features(self, images: np.ndarray | Tensor, value_range: str = "model") -> Tensor:
        """Penultimate classifier features ``(N, D)`` (pre-activation, float32, CPU; D = 128 for the reward CNN, 64 for the judge)."""
        x, _ = prepare_images(images, value_range)
        return self._features(x)[0]

    def predict_proba(self, images: np.ndarray | Tensor, value_range: str = "model") -> Tensor:
        x, _ = prepare_images(images, value_range)
        return self._features(x)[1]

    @property
    def floor(self) -> float:
        """FD of the real TEST split (360 images) against the real TRAIN split."""
        if self._floor is None:
            x_te, _ = load_digits_arrays("test")
            f_te = self._features(prepare_images(x_te)[0])[0].numpy()
            self._floor = frechet_distance(*feature_stats(f_te), self.train_mu, self.train_cov)
            self._floor_num_samples = int(x_te.shape[0])
        return self._floor

    def fd_to_train(self, features: np.ndarray | Tensor) -> float:
        return frechet_distance(*feature_stats(features), self.train_mu, self.train_cov)

    def evaluate(self, images: np.ndarray | Tensor, value_range: str = "model") -> dict[str, Any]:
        """Metrics of ``images`` (see the module docstring for the keys)."""
        x, num_nonfinite = prepare_images(images, value_range)
        n = int(x.shape[0])
        if n < 2:
            raise ValueError(f"need at least 2 images to fit a Gaussian, got {n}")
        f, p = self._features(x)
        hist = torch.bincount(p.argmax(dim=1), minlength=NUM_CLASSES).double() / n
        floor = self.floor
        return {
            "fd": self.fd_to_train(f.numpy()),
            "floor": floor,
            "floor_num_samples": self._floor_num_samples,
            "confidence": float(p.max(dim=1).values.double().mean()),
            "class_hist": [float(v) for v in hist],
            "num_samples": n,
            "num_nonfinite": num_nonfinite,
            "reference": "digits-train",
            "reference_num_samples": int(self.train_features.shape[0]),
        }
