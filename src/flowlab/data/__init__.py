"""Datasets: embedded scikit-learn digits, 2-D toys, images through Hugging Face ``datasets``, and
prompt sets (text, JSONL or ``datasets``) for text-to-image RL."""
from __future__ import annotations

from .base import DataError, InMemoryDataset
from .digits import DigitsDataset, from_unit_range, load_digits_arrays, to_unit_range
from .toy2d import TOY2D, Toy2DDataset, sample_toy2d
from .prompts import PromptDataConfig, PromptSampler, PromptSet, load_prompts

__all__ = [
    "DataError",
    "InMemoryDataset",
    "DigitsDataset",
    "Toy2DDataset",
    "sample_toy2d",
    "load_digits_arrays",
    "to_unit_range",
    "from_unit_range",
    "build_dataset",
    "TOY2D",
    "PromptSet",
    "PromptDataConfig",
    "PromptSampler",
    "load_prompts",
]


def build_dataset(data_cfg, seed: int = 0):
    """Build the dataset named by a ``DataConfig`` (``data.name``)."""
    name = data_cfg.name
    if name == "digits":
        return DigitsDataset(data_cfg.split)
    if name in TOY2D:
        return Toy2DDataset(name, data_cfg.num_samples, seed)
    if name in ("imagefolder", "hf"):
        from .images import ImageDataset

        return ImageDataset(
            data_cfg.path,
            split=data_cfg.split,
            image_column=data_cfg.image_column,
            label_column=data_cfg.label_column,
            resolution=data_cfg.resolution,
            channels=data_cfg.channels,
            center_crop=data_cfg.center_crop,
            random_flip=data_cfg.random_flip,
            source=name,
        )
    raise DataError(f"data.name: unknown dataset {name!r}")
