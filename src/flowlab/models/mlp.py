"""An MLP velocity network for vectors (2-D toys) and small flattened images (8x8 digits)."""
from __future__ import annotations

import math

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import Tensor, nn

from .base import VelocityModelMixin, sinusoidal_embedding

__all__ = ["MLPVelocity"]


class _ResBlock(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mod = nn.Linear(dim, 2 * dim)  # FiLM from the conditioning embedding
        self.net = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        scale, shift = self.mod(c).chunk(2, dim=1)
        return h + self.net(self.norm(h) * (1 + scale) + shift)


class MLPVelocity(ModelMixin, ConfigMixin, VelocityModelMixin):
    """Residual MLP ``v_theta(x, t, y)`` on flattened inputs.

    Args:
        sample_shape: shape of one sample, e.g. ``[2]`` or ``[1, 8, 8]``; inputs are flattened.
        hidden_dim: width of the residual stream.
        depth: number of residual blocks (each FiLM-conditioned on time and label).
        time_embed_dim: size of the sinusoidal time features.
        num_classes: ``0`` for unconditional; otherwise ``num_classes + 1`` label embeddings
            (the last is the null class for classifier-free guidance).
        dropout: dropout inside the blocks.
        mean_flow: add a second time input (MeanFlow's average velocity ``u(x, t, r)``, see
            :mod:`flowlab.flow.meanflow`): the interval ``r - t`` gets its own sinusoidal embedding
            and MLP, added to the time/label conditioning. ``forward(x, t, labels, r=None)`` with
            ``r = None`` reads ``r = t`` (the instantaneous velocity). ``False`` (the default, and
            what older saved configs load as) builds exactly the one-time network.
    """

    @register_to_config
    def __init__(
        self,
        sample_shape: tuple[int, ...] = (2,),
        hidden_dim: int = 256,
        depth: int = 4,
        time_embed_dim: int = 128,
        num_classes: int = 0,
        dropout: float = 0.0,
        mean_flow: bool = False,
    ):
        super().__init__()
        d_in = int(math.prod(sample_shape))
        self.time_embed_dim = time_embed_dim
        self.inp = nn.Linear(d_in, hidden_dim)
        self.cond = nn.Sequential(nn.Linear(time_embed_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
        self.label_embed = nn.Embedding(num_classes + 1, hidden_dim) if num_classes > 0 else None
        self.blocks = nn.ModuleList(_ResBlock(hidden_dim, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden_dim)
        self.out = nn.Linear(hidden_dim, d_in)
        for blk in self.blocks:  # start each block as the identity
            nn.init.zeros_(blk.net[-1].weight)
            nn.init.zeros_(blk.net[-1].bias)
        # created last: the one-time network draws the same initial weights as with mean_flow=False
        self.interval_embed = (
            nn.Sequential(nn.Linear(time_embed_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim)) if mean_flow else None
        )

    def hidden(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, r: Tensor | None = None) -> Tensor:
        """The normalised residual stream ``(B, hidden_dim)`` before the output projection."""
        self._check_input(x)
        b = x.shape[0]
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t
        c = self.cond(sinusoidal_embedding(t, self.time_embed_dim).to(x.dtype))
        if self.interval_embed is not None:
            r = t if r is None else (r.reshape(-1).expand(b) if r.numel() == 1 else r)
            c = c + self.interval_embed(sinusoidal_embedding(r - t, self.time_embed_dim).to(x.dtype))
        elif r is not None:
            raise ValueError(f"{type(self).__name__} has one time input (mean_flow=False) but a second time r was given")
        labels = self._labels(class_labels, b, x.device)
        if labels is not None:
            c = c + self.label_embed(labels)
        c = nn.functional.silu(c)
        h = self.inp(x.reshape(b, -1))
        for blk in self.blocks:
            h = blk(h, c)
        return self.out_norm(h)

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, r: Tensor | None = None) -> Tensor:
        """Velocity ``(B, *sample_shape)`` at flowlab times ``t`` ``(B,)``; with ``mean_flow``, the average
        velocity over ``[t, r]`` (``r`` ``(B,)``, default ``t``)."""
        return self.out(self.hidden(x, t, class_labels, r)).reshape(x.shape)
