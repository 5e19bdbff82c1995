"""Building blocks of the JEPA concept model: RMS norm, a pre-norm transformer block, the top-1 memory."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["RMSNorm", "TransformerBlock", "TopOneMemory"]


class RMSNorm(nn.Module):
    """``x / rms(x) * g`` over the last dimension (``g`` learned when ``affine``)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return y * self.weight if self.weight is not None else y


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + Attn(norm(x))`` then ``x + MLP(norm(x))``; causal self-attention by SDPA.

    Args:
        dim: model width ``d``. num_heads: attention heads (``d`` divisible by it). mlp_ratio: MLP width / ``d``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        """``(B, S, d) -> (B, S, d)``; position ``i`` attends to positions ``<= i``."""
        B, S, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, S, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(a.transpose(1, 2).reshape(B, S, D))
        return x + self.mlp(self.norm2(x))


class TopOneMemory(nn.Module):
    """Key-value memory read by its single best key: ``value[argmax_k cos(q, key_k)]``.

    One slot per concept; the keys are frozen (a buffer, set with :meth:`set_keys`), the values learned.
    No gradient reaches the query (the read is a hard ``argmax``), so each concept owns its value
    alone: representations are disentangled by construction.

    Args:
        num_slots: ``K``. key_dim: query / key width. value_dim: value width.
    """

    def __init__(self, num_slots: int, key_dim: int, value_dim: int):
        super().__init__()
        self.register_buffer("keys", torch.zeros(num_slots, key_dim))
        self.values = nn.Parameter(torch.randn(num_slots, value_dim) * value_dim ** -0.5)

    @torch.no_grad()
    def set_keys(self, keys: Tensor) -> None:
        """Freeze ``keys`` ``(K, key_dim)`` as the slot keys."""
        self.keys.copy_(keys)

    def lookup(self, query: Tensor) -> Tensor:
        """Slot index ``(B,)`` of each query ``(B, key_dim)`` (cosine similarity, exact ties to the lowest index)."""
        return (F.normalize(query, dim=-1) @ F.normalize(self.keys, dim=-1).t()).argmax(-1)

    def forward(self, query: Tensor) -> Tensor:
        """``(B, key_dim) -> (B, value_dim)``: the value of the best-matching slot."""
        return self.values[self.lookup(query)]
