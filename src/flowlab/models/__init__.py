"""Velocity networks (diffusers ``ModelMixin`` + ``ConfigMixin``) and their builder."""
from .base import ATTENTION_BACKENDS, set_attention_backend, sinusoidal_embedding
from .conservative import ConservativeVelocity
from .dit import DiTVelocity
from .mlp import MLPVelocity
from .unet import UNetVelocity

MODEL_TYPES = {"mlp": MLPVelocity, "unet": UNetVelocity, "dit": DiTVelocity, "conservative": ConservativeVelocity}

__all__ = ["MLPVelocity", "ConservativeVelocity", "UNetVelocity", "DiTVelocity", "MODEL_TYPES", "set_attention_backend", "sinusoidal_embedding", "ATTENTION_BACKENDS"]
