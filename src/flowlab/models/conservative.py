"""A conservative velocity network: ``v(x, t) = grad_x phi(x, t)`` for a scalar network ``phi``.

Its Jacobian ``d v / d x`` is the Hessian of ``phi``, symmetric by construction, so the
field has no curl, zero loop integrals and path-independent line integrals — the
properties of a true score (up to the ``(alpha'/alpha) x`` term, itself a gradient). It is
trained like any velocity model (``model.type: conservative``); each forward pass costs one
extra backward pass through ``phi`` (and training differentiates through it, a double
backward).
"""
from __future__ import annotations

import torch
from diffusers import ModelMixin  # noqa: F401  (diffusers' loader looks for it in this namespace)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import Tensor, nn

from .mlp import MLPVelocity

__all__ = ["ConservativeVelocity"]


class ConservativeVelocity(MLPVelocity):
    """``v_theta(x, t, y) = grad_x phi_theta(x, t, y)`` with ``phi`` a residual MLP (as :class:`MLPVelocity`) to a scalar.

    The gradient is taken inside ``forward`` with grad mode switched on, so the model also
    works under ``torch.no_grad()`` (sampling); the graph through the gradient is kept
    (``create_graph``) whenever the caller has grad mode on (training, likelihoods,
    diagnostics), and dropped otherwise.

    Args: as :class:`~flowlab.models.MLPVelocity` (``sample_shape``, ``hidden_dim``, ``depth``,
        ``time_embed_dim``, ``num_classes``, ``dropout``, ``time_embed_scale``).
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
        time_embed_scale: float = 1000.0,
    ):
        super().__init__(sample_shape, hidden_dim, depth, time_embed_dim, num_classes, dropout, time_embed_scale=time_embed_scale)
        # the same trunk as MLPVelocity, projected to a scalar; no output biases: they shift phi
        # by a constant, get no gradient through grad_x phi, and would be "unused parameters" under DDP
        self.out_norm = nn.LayerNorm(hidden_dim, bias=False)
        self.out = nn.Linear(hidden_dim, 1, bias=False)

    def supports_exact_jvp(self) -> bool:
        """``False``: the velocity is a gradient, so :meth:`MLPVelocity.jvp` (the trunk's own derivative) does not
        apply; use ``torch.func.jvp`` of :meth:`forward`."""
        return False

    def jvp(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__}.jvp: the velocity is grad_x of a potential; use torch.func.jvp of forward instead")

    def potential(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """The scalar ``phi(x, t, y)`` per sample, shape ``(B,)``."""
        return self.out(self.hidden(x, t, class_labels)).reshape(x.shape[0])

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            x_in = x if x.requires_grad else x.detach().requires_grad_(True)
            phi = self.potential(x_in, t, class_labels)
            (v,) = torch.autograd.grad(phi.sum(), x_in, create_graph=keep_graph)
        return v
