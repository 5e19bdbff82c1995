"""Config sections of the flow-matching recipe: ``data``, ``model``, ``flow``, ``sample``, ``eval``.

Light on purpose (no torch, no diffusers): :mod:`flowlab.recipes` registers these sections so a
config is validated before the training stack is imported. ``data`` is a tagged union on
``data.name`` and ``model`` on ``model.type``, so each run takes (and its saved ``config.yaml``
lists) only the keys its dataset and network read. The NoProp recipe reuses ``data`` and ``model``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ...names import ODE_SOLVER_NAMES, TOY2D_NAMES
from ...schema import TaggedUnion, choices
from ...train.config import EvalConfig, SampleConfig

__all__ = [
    "DigitsDataConfig", "Toy2DDataConfig", "ImageDataConfig", "DATA_CONFIG",
    "MLPModelConfig", "ConservativeModelConfig", "UNetModelConfig", "DiTModelConfig", "MODEL_CONFIG",
    "FlowConfig", "FlowSampleConfig", "FlowEvalConfig", "SECTIONS",
]



# --------------------------------------------------------------------------- data (tagged on data.name)


@dataclass
class DigitsDataConfig:
    """``data.name: digits``: scikit-learn's embedded 8x8 greyscale digits (1,437 train / 360 test)."""

    name: str = field(default="digits", metadata=choices("digits"))
    split: str = field(default="train", metadata=choices("train", "test"))


@dataclass
class Toy2DDataConfig:
    """``data.name: moons | 8gaussians | checkerboard``: 2-D toy distributions, drawn once from the run's seed."""

    name: str = field(default="moons", metadata=choices(*TOY2D_NAMES))
    num_samples: int = field(default=20000, metadata={"min": 1})


@dataclass(kw_only=True)
class ImageDataConfig:
    """``data.name: imagefolder | hf``: images through Hugging Face ``datasets``, resized to ``resolution``."""

    name: str = field(default="imagefolder", metadata=choices("imagefolder", "hf"))
    path: str  # imagefolder: a local folder; hf: a Hub dataset name or local path
    split: str = "train"
    image_column: str = "image"
    label_column: Optional[str] = None
    resolution: int = field(default=32, metadata={"min": 1})
    channels: int = field(default=3, metadata=choices(1, 3))
    center_crop: bool = True
    random_flip: bool = False
    num_workers: int = field(default=0, metadata={"min": 0})


DATA_CONFIG = TaggedUnion(
    name="data",
    tag="name",
    variants={"digits": DigitsDataConfig, **dict.fromkeys(TOY2D_NAMES, Toy2DDataConfig), "imagefolder": ImageDataConfig, "hf": ImageDataConfig},
    default="digits",
)


# --------------------------------------------------------------------------- model (tagged on model.type)


@dataclass
class _ModelConfig:
    """Keys of every ``model.type``."""

    type: str = "mlp"
    class_conditional: bool = False
    label_dropout: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0})
    pretrained: Optional[str] = None  # a FlowPipeline folder / Hub id to initialise from
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})


@dataclass
class MLPModelConfig(_ModelConfig):
    """``model.type: mlp``: a residual MLP over the flattened sample."""

    type: str = field(default="mlp", metadata=choices("mlp"))
    hidden_dim: int = field(default=256, metadata={"min": 1})
    depth: int = field(default=4, metadata={"min": 1})
    time_embed_dim: int = field(default=128, metadata={"min": 2})
    time_embed_scale: float = field(default=1000.0, metadata={"min": 1e-6})  # features of scale * t (see MLPVelocity)


@dataclass
class ConservativeModelConfig(MLPModelConfig):
    """``model.type: conservative``: ``v = grad_x`` of a scalar MLP of the same shape."""

    type: str = field(default="conservative", metadata=choices("conservative"))


@dataclass
class _AttentionModelConfig(_ModelConfig):
    attention: str = field(default="sdpa", metadata=choices("sdpa", "xformers"))
    attention_head_dim: int = field(default=32, metadata={"min": 1})


@dataclass
class UNetModelConfig(_AttentionModelConfig):
    """``model.type: unet``: diffusers' ``UNet2DModel``."""

    type: str = field(default="unet", metadata=choices("unet"))
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128])
    down_block_types: list[str] = field(default_factory=lambda: ["DownBlock2D", "AttnDownBlock2D"])
    up_block_types: list[str] = field(default_factory=lambda: ["AttnUpBlock2D", "UpBlock2D"])
    layers_per_block: int = field(default=2, metadata={"min": 1})
    norm_num_groups: int = field(default=32, metadata={"min": 1})


@dataclass
class DiTModelConfig(_AttentionModelConfig):
    """``model.type: dit``: diffusers' ``DiTTransformer2DModel``."""

    type: str = field(default="dit", metadata=choices("dit"))
    num_layers: int = field(default=6, metadata={"min": 1})
    num_attention_heads: int = field(default=4, metadata={"min": 1})
    patch_size: int = field(default=2, metadata={"min": 1})


MODEL_CONFIG = TaggedUnion(
    name="model",
    tag="type",
    variants={"mlp": MLPModelConfig, "conservative": ConservativeModelConfig, "unet": UNetModelConfig, "dit": DiTModelConfig},
    default="mlp",
)


# --------------------------------------------------------------------------- flow, sample, eval


@dataclass
class FlowConfig:
    """``flow``: the path, parameterisation, time sampler, weighting and coupling."""

    path: str = field(default="linear", metadata=choices("linear", "cosine", "vp"))
    prediction_type: str = field(default="velocity", metadata=choices("velocity", "x1", "epsilon"))
    time_sampler: str = field(default="uniform", metadata=choices("uniform", "logit_normal", "mode"))
    logit_mean: float = 0.0
    logit_std: float = field(default=1.0, metadata={"min": 1e-6})
    mode_scale: float = 1.29
    shift: float = field(default=1.0, metadata={"min": 1e-6})
    loss_weighting: str = field(default="none", metadata=choices("none", "sigma_sqrt", "cosmap"))
    coupling: str = field(default="independent", metadata=choices("independent", "ot"))


@dataclass
class FlowSampleConfig(SampleConfig):
    """``sample``: the trainer's grid schedule, plus sampling defaults saved with the pipeline."""

    solver: str = field(default="heun", metadata=choices(*ODE_SOLVER_NAMES))
    num_inference_steps: int = field(default=16, metadata={"min": 1})
    shift: float = field(default=1.0, metadata={"min": 1e-6})
    guidance_scale: float = 1.0


@dataclass
class FlowEvalConfig(EvalConfig):
    """``eval``: the trainer's schedule, plus how samples are drawn for evaluation (digits: Fréchet
    distance in a classifier's feature space; 2-D toys: sliced Wasserstein distance)."""

    num_samples: int = field(default=1000, metadata={"min": 2})
    solver: str = field(default="heun", metadata=choices(*ODE_SOLVER_NAMES))
    num_inference_steps: int = field(default=16, metadata={"min": 1})


#: The sections of ``recipe: flow_matching``.
SECTIONS = {"data": DATA_CONFIG, "model": MODEL_CONFIG, "flow": FlowConfig, "sample": FlowSampleConfig, "eval": FlowEvalConfig}
