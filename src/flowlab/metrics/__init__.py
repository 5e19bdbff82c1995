"""Sample-quality metrics: the digits classifier (:mod:`.classifier`), the Fréchet distance
(:mod:`.frechet`) and the digits evaluator built on both (:mod:`.digits`: FD, confidence and
class histogram of 8x8 digits samples)."""
from .classifier import CLASSIFIER_RECIPE, CLASSIFIER_VERSION, DigitsClassifier, load_classifier
from .digits import DigitsEvaluator, prepare_images
from .frechet import fd_from_features, feature_stats, frechet_distance

__all__ = [
    "CLASSIFIER_RECIPE",
    "CLASSIFIER_VERSION",
    "DigitsClassifier",
    "DigitsEvaluator",
    "fd_from_features",
    "feature_stats",
    "frechet_distance",
    "load_classifier",
    "prepare_images",
]
