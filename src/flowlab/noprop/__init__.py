"""NoProp: classifiers trained block by block as local denoisers (DT, CT, FM) and a back-prop baseline.

``recipe: noprop`` (section ``noprop:``) trains through the shared Trainer; the artefact is a
:class:`NoPropClassifier` (``from_pretrained(dir).predict(images)``).
"""
from .models import EMBEDDINGS, VARIANTS, DenoisingBlock, ImageEncoder, NoPropClassifier
from .schedules import DiscreteCosineSchedule, GammaPath, MonotoneGamma, gaussian_kl_to_standard, noisy_label

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
