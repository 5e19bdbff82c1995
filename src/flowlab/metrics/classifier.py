"""The small digits classifiers whose features define the digits Fréchet distances.

* The **reference classifier** (:data:`CLASSIFIER_RECIPE`, :class:`DigitsClassifier`): a CNN
  (conv 1->32->64, max-pool, FC to a 128-d penultimate layer, ReLU, 10-way head; the features
  are the 128 pre-activations). Its features define the digits FD ("FID for digits"), and its
  probabilities are the ``digits_classifier`` reward.
* The **judge** (:data:`JUDGE_RECIPE`, :class:`DigitsMLPClassifier`): an independent MLP on the 64
  pixels (64->512, ReLU, 512->64 features, ReLU, 10-way head; the features are the 64
  pre-activations), with a different seed and optimiser settings. It shares no weights and no
  architecture with the reward model, so a sample that fools the reward CNN is not thereby
  close to real digits in the judge's feature space; the reward-hacking check of
  :mod:`flowlab.nft.quality` measures there.

Both are trained deterministically on the TRAIN split of the scikit-learn digits only (seeded,
CPU, one thread, random 1-pixel shifts as augmentation, a few seconds) by the same code
(:func:`train_classifier`). Their weights are cached as safetensors under ``cache_dir`` (default
``$FLOWLAB_CACHE`` or ``~/.cache/flowlab``) in ``metrics/``, keyed by the recipe's ``version``
and a hash of the whole recipe (:func:`recipe_hash`), so any change to a recipe trains (and
caches) a new model.
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from flowlab.data.digits import load_digits_arrays
from flowlab.fileio import atomic_path

__all__ = [
    "FEATURE_DIM",
    "NUM_CLASSES",
    "CLASSIFIER_RECIPE",
    "CLASSIFIER_VERSION",
    "JUDGE_RECIPE",
    "JUDGE_VERSION",
    "DigitsClassifier",
    "DigitsMLPClassifier",
    "recipe_hash",
    "build_classifier",
    "load_judge",
    "train_classifier",
    "classifier_accuracy",
    "default_cache_dir",
    "classifier_path",
    "load_classifier",
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


def recipe_hash(recipe: dict[str, Any]) -> str:
    """The first 12 hex digits of the SHA-256 of ``recipe`` as sorted-key JSON (the cache key)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


CLASSIFIER_VERSION = recipe_hash(CLASSIFIER_RECIPE)

# The independent judge of the reward-hacking check: another architecture (an MLP on the pixels,
# no convolutions), another seed and other optimiser settings than the reward's CNN above.
JUDGE_RECIPE: dict[str, Any] = {
    "version": "digits-mlp-judge-v1",
    "arch": {"type": "mlp", "hidden_dim": 512, "feature_dim": 64, "num_classes": NUM_CLASSES},
    "data": {"split": "train"},
    "augment": {"max_shift": 1, "fill": -1.0},
    "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 1e-4, "schedule": "cosine"},
    "epochs": 60,
    "batch_size": 32,
    "seed": 1,
    "num_threads": 1,
    "features": "fc-preact",
}
JUDGE_VERSION = recipe_hash(JUDGE_RECIPE)


class _FeatureClassifier(nn.Module, ABC):
    """A classifier whose logits are ``head(relu(features(x)))``; subclasses define ``features`` and ``head``."""

    head: nn.Linear

    @abstractmethod
    def features(self, x: Tensor) -> Tensor:
        """Penultimate pre-activations ``(N, feature_dim)`` of images ``(N, 1, 8, 8)`` in ``[-1, 1]``."""

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.features(x)))

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        return f, self.head(F.relu(f))


class DigitsClassifier(_FeatureClassifier):
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


class DigitsMLPClassifier(_FeatureClassifier):
    """``(N, 1, 8, 8)`` in ``[-1, 1]`` -> logits ``(N, 10)`` through an MLP on the 64 pixels.

    ``features`` are the ``feature_dim`` pre-activations of the second layer (as for
    :class:`DigitsClassifier`, pre-ReLU so that their covariance has full rank)."""

    def __init__(self, hidden_dim: int = 256, feature_dim: int = 64, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def build_classifier(recipe: dict[str, Any]) -> DigitsClassifier | DigitsMLPClassifier:
    """The untrained model of ``recipe["arch"]``: ``type`` ``cnn`` (the default, :class:`DigitsClassifier`)
    or ``mlp`` (:class:`DigitsMLPClassifier`)."""
    a = recipe["arch"]
    kind = a.get("type", "cnn")
    if kind == "cnn":
        return DigitsClassifier(tuple(a["channels"]), a["feature_dim"], a["num_classes"])
    if kind == "mlp":
        return DigitsMLPClassifier(a["hidden_dim"], a["feature_dim"], a["num_classes"])
    raise ValueError(f"classifier recipe arch.type must be 'cnn' or 'mlp', got {kind!r}")


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


def train_classifier(recipe: dict[str, Any] | None = None, verbose: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Train the digits classifier of ``recipe`` (default :data:`CLASSIFIER_RECIPE`) on the TRAIN
    split, deterministically on CPU.

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


def _train(r: dict[str, Any], verbose: bool) -> tuple[nn.Module, dict[str, Any]]:
    t0 = time.perf_counter()
    x_np, y_np = load_digits_arrays(r["data"]["split"])
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    n = x.shape[0]
    gen = torch.Generator().manual_seed(int(r["seed"]))
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(int(r["seed"]))
        model = build_classifier(r)
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
def classifier_accuracy(model: nn.Module, split: str = "test") -> float:
    x, y = load_digits_arrays(split)
    pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def default_cache_dir() -> Path:
    """``$FLOWLAB_CACHE`` if set, else ``~/.cache/flowlab``."""
    env = os.environ.get("FLOWLAB_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/flowlab").expanduser()


def classifier_path(cache_dir: str | os.PathLike | None = None, recipe: dict[str, Any] | None = None) -> Path:
    """The cache file of ``recipe`` (default :data:`CLASSIFIER_RECIPE`): ``<cache>/metrics/digits_classifier-<version>-<hash>.safetensors``."""
    r = CLASSIFIER_RECIPE if recipe is None else recipe
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "metrics" / f"digits_classifier-{r['version']}-{recipe_hash(r)}.safetensors"


def load_classifier(
    cache_dir: str | os.PathLike | None = None, verbose: bool = False, recipe: dict[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Load the cached classifier of ``recipe`` (default :data:`CLASSIFIER_RECIPE`, the reward's CNN),
    or train and cache it. The info dict holds ``path``, ``from_cache``, ``test_accuracy`` and
    ``train_seconds`` (of the run that trained it)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    r = CLASSIFIER_RECIPE if recipe is None else recipe
    path = classifier_path(cache_dir, r)
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            model = build_classifier(r)
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
        "version": recipe_hash(r),
        "test_accuracy": repr(info["test_accuracy"]),
        "train_seconds": repr(info["train_seconds"]),
        "torch": torch.__version__,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # a concurrent writer of the same file just replaces it with identical content
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp), metadata=metadata)
    # hand back a fresh model built from the saved weights, exactly as a later (cached) call would: the
    # freshly trained module can differ from it in the last bits of its outputs, and a run that trains the
    # classifier must score exactly like its resumed continuation that loads it
    fresh = build_classifier(r)
    fresh.load_state_dict(load_file(str(path)))
    fresh.eval()
    return fresh, {"path": str(path), "from_cache": False, **info}


def load_judge(cache_dir: str | os.PathLike | None = None, verbose: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The independent judge (:data:`JUDGE_RECIPE`), cached like the reward classifier; see :func:`load_classifier`."""
    return load_classifier(cache_dir, verbose=verbose, recipe=JUDGE_RECIPE)
