"""An MLP velocity network for vectors (2-D toys) and small flattened images (8x8 digits)."""
from __future__ import annotations

import math

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import Tensor, nn

from .base import VelocityModelMixin, sinusoidal_embedding, sinusoidal_frequencies

__all__ = ["MLPVelocity"]


def _linear_jvp(layer: nn.Linear, h: Tensor, dh: Tensor) -> tuple[Tensor, Tensor]:
    """``layer(h)`` and its tangent ``W dh`` (the bias has none)."""
    return layer(h), nn.functional.linear(dh, layer.weight)


def _silu_jvp(z: Tensor, dz: Tensor) -> tuple[Tensor, Tensor]:
    """``silu(z)`` and its tangent ``sigmoid(z) (1 + z (1 - sigmoid(z))) dz``."""
    s = torch.sigmoid(z)
    return z * s, dz * s * (1 + z * (1 - s))


def _layer_norm_jvp(norm: nn.LayerNorm, h: Tensor, dh: Tensor) -> tuple[Tensor, Tensor]:
    """``norm(h)`` over the last dimension and its tangent ``gamma (dh - mean(dh) - n mean(dh n)) / sigma``."""
    mu = h.mean(-1, keepdim=True)
    inv = torch.rsqrt(h.var(-1, unbiased=False, keepdim=True) + norm.eps)
    n = (h - mu) * inv
    dn = (dh - dh.mean(-1, keepdim=True) - n * (dh * n).mean(-1, keepdim=True)) * inv
    if norm.weight is not None:
        n, dn = n * norm.weight, dn * norm.weight
    if norm.bias is not None:
        n = n + norm.bias
    return n, dn


def _sinusoidal_jvp(t: Tensor, dt: Tensor, dim: int, scale: float) -> tuple[Tensor, Tensor]:
    """:func:`sinusoidal_embedding` of ``t`` and its tangent along ``dt`` (``d cos a = -sin a da``, ``d sin a = cos a da``)."""
    emb = sinusoidal_embedding(t, dim, scale)
    half = dim // 2
    da = scale * dt.float()[:, None] * sinusoidal_frequencies(dim, t.device)[None]
    cos, sin = emb[:, :half], emb[:, half : 2 * half]
    demb = torch.cat([-sin * da, cos * da], dim=1)
    return emb, demb if dim % 2 == 0 else torch.cat([demb, torch.zeros_like(demb[:, :1])], dim=1)


class _ResBlock(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mod = nn.Linear(dim, 2 * dim)  # FiLM from the conditioning embedding
        self.net = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        scale, shift = self.mod(c).chunk(2, dim=1)
        return h + self.net(self.norm(h) * (1 + scale) + shift)

    def jvp(self, h: Tensor, dh: Tensor, c: Tensor, dc: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`forward` and its tangent along ``(dh, dc)`` (no dropout: the caller checks)."""
        mod, dmod = _linear_jvp(self.mod, c, dc)
        (scale, shift), (dscale, dshift) = mod.chunk(2, dim=1), dmod.chunk(2, dim=1)
        n, dn = _layer_norm_jvp(self.norm, h, dh)
        z, dz = n * (1 + scale) + shift, dn * (1 + scale) + n * dscale + dshift
        a, da = _silu_jvp(*_linear_jvp(self.net[0], z, dz))
        o, do = _linear_jvp(self.net[3], a, da)
        return h + o, dh + do


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
        time_embed_scale: the sinusoidal features are those of ``time_embed_scale * t`` (and of
            ``time_embed_scale * (r - t)``). ``1000`` (the default, and what older saved configs load as)
            spreads ``t in [0, 1]`` over a diffusion-style ``[0, 1000]``; MeanFlow's target differentiates
            the network in ``t``, and a large scale makes that derivative large and rough (each feature's
            slope is ``scale * frequency``), so ``configs/meanflow_digits.yaml`` uses a small one, as the
            authors' code does (raw ``t`` in its positional embedding).
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
        time_embed_scale: float = 1000.0,
    ):
        super().__init__()
        if not time_embed_scale > 0:
            raise ValueError(f"time_embed_scale must be > 0, got {time_embed_scale!r}")
        d_in = int(math.prod(sample_shape))
        self.time_embed_dim = time_embed_dim
        self.time_embed_scale = float(time_embed_scale)
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
        c = self.cond(sinusoidal_embedding(t, self.time_embed_dim, self.time_embed_scale).to(x.dtype))
        if self.interval_embed is not None:
            r = t if r is None else (r.reshape(-1).expand(b) if r.numel() == 1 else r)
            c = c + self.interval_embed(sinusoidal_embedding(r - t, self.time_embed_dim, self.time_embed_scale).to(x.dtype))
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

    def supports_exact_jvp(self) -> bool:
        """Whether :meth:`jvp` applies: plain ``nn.Linear`` / ``nn.LayerNorm`` layers (no LoRA or other
        wrapped layers) and no active dropout."""
        plain = all(type(mod) in (nn.Linear, nn.LayerNorm, nn.Embedding, nn.SiLU, nn.Dropout, nn.Sequential, nn.ModuleList, _ResBlock)
                    for mod in self.modules() if mod is not self)
        return plain and not (self.training and self.config.dropout > 0)

    @torch.no_grad()
    def jvp(
        self, x: Tensor, t: Tensor, class_labels: Tensor | None, r: Tensor | None, dx: Tensor, dt: Tensor, dr: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``forward(x, t, class_labels, r)`` and its directional derivative along ``(dx, dt, dr)``, written out
        layer by layer (no autograd graph, no forward-mode AD: about 2 forwards' work, where ``torch.func.jvp``
        costs about 4 on this network).

        MeanFlow's target needs the total derivative ``du/dt = v . d_x u + d_t u`` with ``r`` fixed: ``dx = v``,
        ``dt = 1``, ``dr = 0`` (``None``). Equal to ``torch.func.jvp`` of :meth:`forward` up to round-off
        (tested); only for models where :meth:`supports_exact_jvp` holds.
        """
        self._check_input(x)
        b = x.shape[0]
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t
        dt = dt.reshape(-1).expand(b) if dt.numel() == 1 else dt
        e, de = _sinusoidal_jvp(t, dt, self.time_embed_dim, self.time_embed_scale)
        c, dc = _linear_jvp(self.cond[2], *_silu_jvp(*_linear_jvp(self.cond[0], e.to(x.dtype), de.to(x.dtype))))
        if self.interval_embed is not None:
            r = t if r is None else (r.reshape(-1).expand(b) if r.numel() == 1 else r)
            d_gap = -dt if dr is None else (dr.reshape(-1).expand(b) if dr.numel() == 1 else dr) - dt
            e, de = _sinusoidal_jvp(r - t, d_gap, self.time_embed_dim, self.time_embed_scale)
            ci, dci = _linear_jvp(self.interval_embed[2], *_silu_jvp(*_linear_jvp(self.interval_embed[0], e.to(x.dtype), de.to(x.dtype))))
            c, dc = c + ci, dc + dci
        elif r is not None:
            raise ValueError(f"{type(self).__name__} has one time input (mean_flow=False) but a second time r was given")
        labels = self._labels(class_labels, b, x.device)
        if labels is not None:
            c = c + self.label_embed(labels)
        c, dc = _silu_jvp(c, dc)
        h, dh = _linear_jvp(self.inp, x.reshape(b, -1), dx.reshape(b, -1).to(x.dtype))
        for blk in self.blocks:
            h, dh = blk.jvp(h, dh, c, dc)
        h, dh = _layer_norm_jvp(self.out_norm, h, dh)
        u, du = _linear_jvp(self.out, h, dh)
        return u.reshape(x.shape), du.reshape(x.shape)

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, r: Tensor | None = None) -> Tensor:
        """Velocity ``(B, *sample_shape)`` at flowlab times ``t`` ``(B,)``; with ``mean_flow``, the average
        velocity over ``[t, r]`` (``r`` ``(B,)``, default ``t``)."""
        return self.out(self.hidden(x, t, class_labels, r)).reshape(x.shape)
