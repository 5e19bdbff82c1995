"""Sample-quality metrics. ``flowlab.metrics.digits``: Fréchet distance, confidence and class
histogram of 8x8 digits samples in the feature space of a small cached digits classifier."""
from .digits import (
    CLASSIFIER_RECIPE,
    CLASSIFIER_VERSION,
    DigitsClassifier,
    DigitsEvaluator,
    fd_from_features,
    feature_stats,
    frechet_distance,
    prepare_images,
)

__all__ = [
    "CLASSIFIER_RECIPE",
    "CLASSIFIER_VERSION",
    "DigitsClassifier",
    "DigitsEvaluator",
    "fd_from_features",
    "feature_stats",
    "frechet_distance",
    "prepare_images",
]
