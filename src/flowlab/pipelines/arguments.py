"""Up-front checks of the arguments of the pipelines' ``__call__``.

Each check raises a ``ValueError`` naming the argument and the value, before any noise is drawn
or any network runs (a bad ``batch_size`` would otherwise die deep in the model, and a
``num_inference_steps`` of 0 would silently fall back to the default).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ..flow.solvers import SOLVERS

__all__ = [
    "OUTPUT_TYPES",
    "check_output_type",
    "check_positive_int",
    "check_solver",
    "check_finite",
    "check_class_labels",
    "check_latents",
]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_output_type(output_type: str, is_image: bool = True) -> None:
    """Reject an unknown ``output_type``, and ``pil`` for vector samples."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
    if output_type == "pil" and not is_image:
        raise ValueError("output_type='pil' needs an image model; this pipeline draws vectors: use 'np' or 'pt'")


def check_positive_int(name: str, value) -> int:
    """``value`` as an ``int >= 1`` (Python or numpy integers; not bools or floats)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_solver(solver: str) -> str:
    """A known solver name."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    return solver


def check_finite(name: str, value, minimum: float | None = None, strict: bool = False) -> float:
    """``value`` as a finite float, ``> minimum`` (``strict``) or ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value!r}")
    return float(value)


def check_class_labels(class_labels, batch_size: int, num_classes: int | None) -> tuple[Tensor | None, int]:
    """``(labels (B,) long, batch size)`` from an int (one label for every sample) or one label per sample.

    A sequence of labels sets the batch size when ``batch_size`` is 1; otherwise its length must
    equal ``batch_size``. ``num_classes``: labels must lie in ``[0, num_classes)`` (``None``: only
    ``>= 0`` is checked; 0: the model is unconditional and takes no labels).
    """
    if class_labels is None:
        return None, batch_size
    if num_classes == 0:
        raise ValueError("class_labels were given, but this pipeline's model is unconditional (num_classes=0)")
    if isinstance(class_labels, numbers.Integral) and not isinstance(class_labels, bool):
        labels = torch.full((batch_size,), int(class_labels), dtype=torch.long)
    elif torch.is_tensor(class_labels) and class_labels.ndim == 0:
        labels = torch.full((batch_size,), _integer_tensor(class_labels).item(), dtype=torch.long)
    else:
        try:
            labels = class_labels if torch.is_tensor(class_labels) else torch.as_tensor(list(class_labels))
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"class_labels must be an int or a sequence of ints, got {class_labels!r}") from None
        if labels.numel() == 0:
            raise ValueError("class_labels is empty; pass one label per sample or a single int")
        labels = _integer_tensor(labels.reshape(-1))
        if batch_size not in (1, len(labels)):
            raise ValueError(f"got {len(labels)} class_labels for batch_size={batch_size}; pass one label per sample or a single int")
        batch_size = len(labels)
    high = "" if num_classes is None else f", {num_classes - 1}"
    if (labels < 0).any() or (num_classes is not None and (labels >= num_classes).any()):
        raise ValueError(f"class_labels must lie in [0{high}], got {labels.tolist()}")
    return labels, batch_size


def _integer_tensor(labels: Tensor) -> Tensor:
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"class_labels must be integers, got {labels.tolist()} ({labels.dtype})")
    return labels.long()


def check_latents(latents: Tensor | None, shape: tuple[int, ...]) -> None:
    """``latents`` (when given) is a floating tensor of exactly ``shape``."""
    if latents is None:
        return
    if not torch.is_tensor(latents) or not latents.is_floating_point():
        raise ValueError(f"latents must be a floating-point tensor of shape {shape}, got {type(latents).__name__}"
                         + (f" of dtype {latents.dtype}" if torch.is_tensor(latents) else ""))
    if tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
