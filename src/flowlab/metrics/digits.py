"""Sample-quality metrics for the 8x8 scikit-learn digits: a Fréchet distance in the feature
space of a small digits classifier (an "FID for digits"), plus classifier confidence and the
histogram of predicted classes.

The classifier is a small CNN (conv 1->32->64, max-pool, FC to a 128-d penultimate layer,
ReLU, 10-way head; the features are the 128 pre-activations) trained deterministically on the TRAIN split only (seeded, CPU, random 1-pixel
shifts as augmentation, a few seconds). Its weights are cached as safetensors under
``cache_dir`` (default ``$FLOWLAB_CACHE`` or ``~/.cache/flowlab``) in ``metrics/``, keyed by a
hash of the training recipe, so any change to the recipe trains (and caches) a new model.

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

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn
import torch.nn.functional as F

from flowlab.data.digits import load_digits_arrays
from flowlab.fileio import atomic_path

__all__ = [
    "DigitsClassifier",
    "DigitsEvaluator",
    "CLASSIFIER_RECIPE",
    "CLASSIFIER_VERSION",
    "default_cache_dir",
    "classifier_path",
    "train_classifier",
    "load_classifier",
    "prepare_images",
    "feature_stats",
    "frechet_distance",
    "fd_from_features",
]

FEATURE_DIM = 128
NUM_CLASSES = 10

# Everything that determines the trained weights. Bump ``version`` when the code changes
# in a way the recipe does not capture (architecture, augmentation implementation, ...).
CLASSIFIER_RECIPE: dict[str, Any] = {
    "version": "digits-cnn-v1",
    "arch": {"channels": [32, 64], "feature_dim": FEATURE_DIM, "num_classes": NUM_CLASSES},
    "data": {"split": "train"},
    "augment": {"max_shift": 1, "fill": -1.0},
    "optim": {"name": "adam", "lr": 2e-3, "weight_decay": 0.0, "schedule": "cosine"},
    "epochs": 20,
    "batch_size": 64,
    "seed": 0,
    "num_threads": 1,  # CPU results depend on the thread count; 1 thread is also fastest here
    "features": "fc-preact",
}
CLASSIFIER_VERSION = hashlib.sha256(json.dumps(CLASSIFIER_RECIPE, sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- classifier


class DigitsClassifier(nn.Module):
    """``(N, 1, 8, 8)`` in ``[-1, 1]`` -> logits ``(N, 10)``.

    ``features`` is the 128-d penultimate layer *before* its ReLU: post-ReLU, about half of
    the units are zero on every digit, which makes the feature covariance singular; the
    pre-activations have full rank and are closer to Gaussian."""

    def __init__(self, channels: tuple[int, int] = (32, 64), feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (N, c2, 4, 4)
        return self.fc(h.flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.features(x)))

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        return f, self.head(F.relu(f))


def _random_shift(x: Tensor, max_shift: int, fill: float, generator: torch.Generator) -> Tensor:
    """Shift every image by an independent integer offset in ``[-max_shift, max_shift]^2``,
    filling the uncovered border with ``fill`` (the background value)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    s = max_shift
    padded = F.pad(x, (s, s, s, s), value=fill)
    dy = torch.randint(0, 2 * s + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * s + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (b, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (b, 1, w)
    return padded[torch.arange(b)[:, None, None], 0, rows, cols][:, None]


def train_classifier(recipe: dict[str, Any] | None = None, verbose: bool = False) -> tuple[DigitsClassifier, dict[str, Any]]:
    """Train the digits classifier on the TRAIN split, deterministically on CPU.

    Returns the model (eval mode) and an info dict with ``test_accuracy`` and
    ``train_seconds``. The global torch RNG state and thread count are left untouched.
    """
    r = CLASSIFIER_RECIPE if recipe is None else recipe
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(int(r.get("num_threads", 1)))
    try:
        return _train(r, verbose)
    finally:
        torch.set_num_threads(prev_threads)


def _train(r: dict[str, Any], verbose: bool) -> tuple[DigitsClassifier, dict[str, Any]]:
    t0 = time.perf_counter()
    x_np, y_np = load_digits_arrays(r["data"]["split"])
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    n = x.shape[0]
    gen = torch.Generator().manual_seed(int(r["seed"]))
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(int(r["seed"]))
        model = DigitsClassifier(tuple(r["arch"]["channels"]), r["arch"]["feature_dim"], r["arch"]["num_classes"])
    opt = torch.optim.Adam(model.parameters(), lr=r["optim"]["lr"], weight_decay=r["optim"]["weight_decay"])
    bs, epochs = int(r["batch_size"]), int(r["epochs"])
    steps_per_epoch = (n + bs - 1) // bs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            xb = _random_shift(x[idx], r["augment"]["max_shift"], r["augment"]["fill"], gen)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * idx.numel()
        if verbose:
            print(f"[digits classifier] epoch {epoch + 1}/{epochs} loss {total / n:.4f}")
    model.eval()
    train_seconds = time.perf_counter() - t0
    info = {"test_accuracy": classifier_accuracy(model, "test"), "train_seconds": train_seconds}
    return model, info


@torch.no_grad()
def classifier_accuracy(model: DigitsClassifier, split: str = "test") -> float:
    x, y = load_digits_arrays(split)
    pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def default_cache_dir() -> Path:
    """``$FLOWLAB_CACHE`` if set, else ``~/.cache/flowlab``."""
    env = os.environ.get("FLOWLAB_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/flowlab").expanduser()


def classifier_path(cache_dir: str | os.PathLike | None = None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "metrics" / f"digits_classifier-{CLASSIFIER_RECIPE['version']}-{CLASSIFIER_VERSION}.safetensors"


def load_classifier(cache_dir: str | os.PathLike | None = None, verbose: bool = False) -> tuple[DigitsClassifier, dict[str, Any]]:
    """Load the cached classifier, or train and cache it. The info dict holds ``path``,
    ``from_cache``, ``test_accuracy`` and ``train_seconds`` (of the run that trained it)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = classifier_path(cache_dir)
    r = CLASSIFIER_RECIPE
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            model = DigitsClassifier(tuple(r["arch"]["channels"]), r["arch"]["feature_dim"], r["arch"]["num_classes"])
            model.load_state_dict(load_file(str(path)))
            model.eval()
            info = {
                "path": str(path),
                "from_cache": True,
                "test_accuracy": float(meta.get("test_accuracy", "nan")),
                "train_seconds": float(meta.get("train_seconds", "nan")),
            }
            return model, info
        except Exception as e:  # corrupt / incompatible file: retrain and overwrite
            if verbose:
                print(f"[digits classifier] could not read {path} ({e}); retraining")
    model, info = train_classifier(r, verbose=verbose)
    metadata = {
        "recipe": json.dumps(r, sort_keys=True),
        "version": CLASSIFIER_VERSION,
        "test_accuracy": repr(info["test_accuracy"]),
        "train_seconds": repr(info["train_seconds"]),
        "torch": torch.__version__,
    }
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:  # a concurrent writer of the same file just replaces it with identical content
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp), metadata=metadata)
    # hand back a fresh model built from the saved weights, exactly as a later (cached) call would: the
    # freshly trained module can differ from it in the last bits of its outputs, and a run that trains the
    # classifier must score exactly like its resumed continuation that loads it
    fresh = DigitsClassifier(tuple(r["arch"]["channels"]), r["arch"]["feature_dim"], r["arch"]["num_classes"])
    fresh.load_state_dict(load_file(str(path)))
    fresh.eval()
    return fresh, {"path": str(path), "from_cache": False, **info}


# --------------------------------------------------------------------------- Fréchet distance


def feature_stats(f: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(d,)`` and covariance ``(d, d)`` (unbiased, float64) of features ``(n, d)``."""
    f = f.detach().cpu().numpy() if isinstance(f, Tensor) else np.asarray(f)
    f = f.astype(np.float64, copy=False).reshape(f.shape[0], -1)
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {f.shape[0]}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1, cov1, mu2, cov2, eps: float = 1e-6) -> float:
    """Fréchet (2-Wasserstein squared) distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``:

    ``|mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^{1/2})``, in float64.

    The matrix square root uses ``scipy.linalg.sqrtm``; if it is not finite, has a
    non-negligible imaginary part, or scipy reports the product singular and the root does
    not square back to it (near-singular covariances, e.g. fewer samples than feature
    dimensions), ``eps`` is added to both diagonals and it is recomputed (this perturbs the
    result by about ``sqrt(eps * var)`` per degenerate direction). The real part is taken
    and the result clipped at 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, cov {cov1.shape} / {cov2.shape}")
    diff = mu1 - mu2

    def _sqrt_tr(a: np.ndarray, b: np.ndarray) -> tuple[float, bool]:
        prod = a @ b
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            s = scipy.linalg.sqrtm(prod)
        if isinstance(s, tuple):  # very old scipy with disp=False semantics
            s = s[0]
        s = np.asarray(s)
        if not np.isfinite(s).all():
            return float("nan"), False
        if np.iscomplexobj(s):
            scale = max(1.0, float(np.abs(s.real).max()))
            if float(np.abs(s.imag).max()) > 1e-3 * scale:
                return float(np.trace(s).real), False
            s = s.real
        if any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught):
            # scipy flags singular products, but the root is often still accurate (e.g.
            # zero-variance directions): accept it if it squares back to the product
            resid = np.linalg.norm(s @ s - prod) / max(np.linalg.norm(prod), 1e-300)
            if not resid < 1e-6:
                return float(np.trace(s)), False
        return float(np.trace(s)), True

    tr_covmean, ok = _sqrt_tr(cov1, cov2)
    if not ok:
        off = eps * np.eye(cov1.shape[0])
        tr_covmean, ok = _sqrt_tr(cov1 + off, cov2 + off)
        if not ok and not np.isfinite(tr_covmean):
            raise FloatingPointError("matrix square root failed even with eps on the diagonal")
    fd = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean)
    return max(fd, 0.0)


def fd_from_features(f1: np.ndarray | Tensor, f2: np.ndarray | Tensor, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(n1, d)`` and ``(n2, d)``."""
    return frechet_distance(*feature_stats(f1), *feature_stats(f2), eps=eps)


# --------------------------------------------------------------------------- evaluator


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

    def __init__(self, model: DigitsClassifier, info: dict[str, Any] | None = None):
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
    def load(cls, cache_dir: str | os.PathLike | None = None, verbose: bool = False) -> "DigitsEvaluator":
        model, info = load_classifier(cache_dir, verbose=verbose)
        return cls(model, info)

    @torch.no_grad()
    def _features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats, probs = [], []
        for i in range(0, x.shape[0], self.batch_size):
            f, logits = self.model.features_and_logits(x[i : i + self.batch_size])
            feats.append(f)
            probs.append(logits.softmax(dim=1))
        if not feats:
            return torch.zeros(0, FEATURE_DIM), torch.zeros(0, NUM_CLASSES)
        return torch.cat(feats), torch.cat(probs)

    def features(self, images: np.ndarray | Tensor, value_range: str = "model") -> Tensor:
        """Penultimate classifier features ``(N, 128)`` (pre-activation, float32, CPU)."""
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
