"""NoProp: classifiers trained block by block as local denoisers (DT, CT, FM) and a back-prop baseline.

``recipe: noprop`` (section ``noprop:``) trains through the shared Trainer; the artefact is a
:class:`NoPropClassifier` (``from_pretrained(dir).predict(images)``).
"""
from __future__ import annotations

import importlib

# Names are imported on first use, so that the light ``config`` module of this package (read when a
# config is validated) does not import torch.
_LAZY = {
    "EMBEDDINGS": "models",
    "VARIANTS": "models",
    "DenoisingBlock": "models",
    "ImageEncoder": "models",
    "NoPropClassifier": "models",
    "DiscreteCosineSchedule": "schedules",
    "GammaPath": "schedules",
    "MonotoneGamma": "schedules",
    "gaussian_kl_to_standard": "schedules",
    "noisy_label": "schedules",
}

__all__ = [
    "NoPropClassifier",
    "DenoisingBlock",
    "ImageEncoder",
    "DiscreteCosineSchedule",
    "MonotoneGamma",
    "GammaPath",
    "noisy_label",
    "gaussian_kl_to_standard",
    "VARIANTS",
    "EMBEDDINGS",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
