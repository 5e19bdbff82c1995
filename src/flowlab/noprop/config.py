"""Config section ``noprop`` of ``recipe: noprop`` (light: no torch; see docs/noprop.md).

``recipe: noprop`` reads ``data`` (the images to classify), ``model`` (only with
``noprop.backbone: model``) and ``noprop``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..errors import ConfigError
from ..names import ODE_SOLVER_NAMES
from ..schema import choices

__all__ = ["NoPropConfig", "VARIANTS", "EMBEDDINGS", "BACKBONE_MODEL_TYPES"]

#: NoProp variants: discrete time, continuous time, flow matching, and the back-prop baseline.
VARIANTS = ("dt", "ct", "fm", "backprop")
#: Label embeddings.
EMBEDDINGS = ("one_hot", "learned", "prototype")
#: ``model.type`` values usable as an image backbone (``noprop.backbone: model``).
BACKBONE_MODEL_TYPES = ("mlp", "unet", "dit")


@dataclass
class NoPropConfig:
    """``noprop:``: NoProp classifiers (see docs/noprop.md)."""

    variant: str = field(default="dt", metadata=choices(*VARIANTS))
    num_blocks: int = field(default=10, metadata={"min": 1})  # T (dt, backprop)
    eta: Optional[float] = field(default=None, metadata={"min": 0.0})  # None: 0.1 (dt), 1.0 (ct)
    embedding: str = field(default="one_hot", metadata=choices(*EMBEDDINGS))
    embed_dim: int = field(default=20, metadata={"min": 1})  # learned embeddings only
    backbone: str = field(default="paper", metadata=choices("paper", "model"))  # model: the `model:` section
    hidden_dim: int = field(default=256, metadata={"min": 1})
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    dropout: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0})
    time_embed_dim: int = field(default=64, metadata={"min": 2})  # ct, fm
    gamma_0: float = 3.0  # ct: SNR(0) = exp(-gamma_0) (digits: +-6 trains poorly, see docs/noprop.md)
    gamma_1: float = -3.0  # ct: SNR(1) = exp(-gamma_1)
    schedule_eps: float = field(default=1e-3, metadata={"min": 1e-8, "max": 0.1})  # dt schedule clamp
    solver: str = field(default="euler", metadata=choices(*ODE_SOLVER_NAMES))  # ct, fm inference
    inference_steps: int = field(default=20, metadata={"min": 1})
    # dt: posterior-noise scale at inference (1: the paper's sampled chain; 0: the posterior-mean chain, as back-prop's)
    inference_noise: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    eval_steps: list[int] = field(default_factory=list)  # ct, fm: also report accuracy at these step counts
    eval_split: str = "test"  # held-out split for `evaluate`
    eval_max_examples: int = field(default=10000, metadata={"min": 1})
    fm_endpoint_ce: Optional[float] = field(default=None, metadata={"min": 0.0})  # None: 1.0 for learned embeddings, else 0

    def ignored_sections(self, config) -> dict[str, str]:
        """``noprop.backbone: paper`` builds the paper's own blocks: the ``model`` section is not read."""
        return {"model": "noprop.backbone=paper builds the paper's own blocks; set noprop.backbone=model to use it"} if self.backbone == "paper" else {}

    def check(self, config) -> None:
        """``model.*`` is read only with ``noprop.backbone: model``, and must then be an image backbone."""
        if self.backbone == "model" and config.model.type not in BACKBONE_MODEL_TYPES:
            raise ConfigError(f"model.type: noprop.backbone=model uses an image backbone ({', '.join(BACKBONE_MODEL_TYPES)}), got {config.model.type!r}")
