"""NoProp noise schedules, in flowlab's time direction (``t = 0`` noise, ``t = T`` / ``t = 1`` label).

The forward process is ``q(z_t | y) = N(sqrt(abar_t) u_y, (1 - abar_t) I)`` with ``abar_t``
*increasing* in ``t`` (the reverse of DDPM's indexing), so ``SNR(t) = abar_t / (1 - abar_t)``
increases too and the ELBO weights ``SNR(t) - SNR(t-1)`` (DT) and ``SNR'(t)`` (CT) are positive.

* :class:`DiscreteCosineSchedule` (NoProp-DT): ``abar_t = alpha(t / T)^2`` of the core's
  :class:`~flowlab.flow.CosinePath` (``sin^2(pi t / 2T)``), clamped away from 0 and 1.
* :class:`MonotoneGamma` (NoProp-CT): VDM's learnable monotone ``gamma(t)``, ``SNR = exp(-gamma)``.
* :class:`GammaPath`: the CT schedule as a core :class:`~flowlab.flow.AffinePath`
  (``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``) so the core's converters and ODE
  solvers integrate it.
"""
from __future__ import annotations


import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..flow import AffinePath, CosinePath

__all__ = ["DiscreteCosineSchedule", "MonotoneGamma", "GammaPath", "noisy_label", "gaussian_kl_to_standard"]


def noisy_label(u: Tensor, alpha_bar: Tensor, eps: Tensor) -> Tensor:
    """A draw of ``q(z | y) = N(sqrt(abar) u, (1 - abar) I)``: ``sqrt(abar) u + sqrt(1 - abar) eps``.

    Args:
        u: clean label embeddings ``(B, D)``. alpha_bar: ``(B,)`` or scalar. eps: ``(B, D)`` standard normal.
    """
    ab = torch.as_tensor(alpha_bar, dtype=u.dtype, device=u.device)
    if ab.ndim == 1:
        ab = ab[:, None]
    return ab.sqrt() * u + (1 - ab).sqrt() * eps


def gaussian_kl_to_standard(u: Tensor, alpha_bar: Tensor) -> Tensor:
    """``KL(N(sqrt(abar) u, (1 - abar) I) || N(0, I))`` per row of ``u`` ``(B, D)``; shape ``(B,)``."""
    ab = torch.as_tensor(alpha_bar, dtype=u.dtype, device=u.device)
    d = u.shape[1]
    var = 1 - ab
    return 0.5 * (ab * u.pow(2).sum(1) + d * var - d - d * torch.log(var))


class DiscreteCosineSchedule:
    """``abar_0 < abar_1 < ... < abar_T`` for NoProp-DT with ``T`` blocks.

    ``abar_t = clamp(sin^2(pi t / (2T)), eps, 1 - eps)`` (the core's cosine path squared).
    Block ``t`` (1-based) denoises ``z_{t-1}``; its loss weight is ``SNR(t) - SNR(t-1) > 0``.

    Args:
        num_blocks: ``T``.
        eps: clamp keeping ``SNR`` finite at both ends.
    """

    def __init__(self, num_blocks: int, eps: float = 1e-3):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.T = num_blocks
        s = torch.arange(num_blocks + 1, dtype=torch.float64) / num_blocks
        self.alpha_bar = CosinePath().alpha(s).pow(2).clamp(eps, 1 - eps)  # (T + 1,)

    @property
    def snr(self) -> Tensor:
        """``SNR(t) = abar_t / (1 - abar_t)`` for ``t = 0 .. T``."""
        return self.alpha_bar / (1 - self.alpha_bar)

    def weights(self) -> Tensor:
        """``SNR(t) - SNR(t - 1)`` for ``t = 1 .. T`` (all positive); shape ``(T,)``."""
        s = self.snr
        return s[1:] - s[:-1]

    def alpha(self) -> Tensor:
        """One-step factors ``alpha_{t-1} = abar_{t-1} / abar_t`` for ``t = 1 .. T`` (``q(z_{t-1} | z_t)`` keeps
        ``sqrt(alpha_{t-1})`` of the signal); shape ``(T,)``."""
        return self.alpha_bar[:-1] / self.alpha_bar[1:]

    def inference_coefficients(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(a_t, b_t, c_t)`` for ``t = 1 .. T`` of the DT recursion ``z_t = a_t u_hat + b_t z_{t-1} + sqrt(c_t) eps``:

            a_t = sqrt(abar_t) (1 - alpha_{t-1}) / (1 - abar_{t-1})
            b_t = sqrt(alpha_{t-1}) (1 - abar_t) / (1 - abar_{t-1})
            c_t = (1 - abar_t) (1 - alpha_{t-1}) / (1 - abar_{t-1})

        i.e. the mean and variance of the forward process's posterior ``q(z_t | z_{t-1}, u)`` with ``u = u_hat``.
        """
        ab, ab_prev, a_prev = self.alpha_bar[1:], self.alpha_bar[:-1], self.alpha()
        a = ab.sqrt() * (1 - a_prev) / (1 - ab_prev)
        b = a_prev.sqrt() * (1 - ab) / (1 - ab_prev)
        c = (1 - ab) * (1 - a_prev) / (1 - ab_prev)
        return a, b, c


class _PositiveLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, F.softplus(self.weight), self.bias)


class MonotoneGamma(nn.Module):
    """VDM's learnable monotone schedule ``gamma(t)`` on ``[0, 1]`` with fixed ends.

    ``g(t) = l1(t) + l3(sigmoid(l2(l1(t))))`` with positive weights is increasing; it is
    rescaled so that ``gamma(0) = gamma_0`` and ``gamma(1) = gamma_1``. With ``gamma_0 > gamma_1``
    ``SNR(t) = exp(-gamma(t))`` increases from noise (``t = 0``) to the label (``t = 1``).
    """

    def __init__(self, gamma_0: float = 6.0, gamma_1: float = -6.0, hidden: int = 64):
        super().__init__()
        self.gamma_0, self.gamma_1 = float(gamma_0), float(gamma_1)
        self.l1 = _PositiveLinear(1, 1)
        self.l2 = _PositiveLinear(1, hidden)
        self.l3 = _PositiveLinear(hidden, 1)

    def _g(self, t: Tensor) -> Tensor:
        h = self.l1(t[:, None])
        return (h + self.l3(torch.sigmoid(self.l2(h)) - 0.5))[:, 0]

    def forward(self, t: Tensor) -> Tensor:
        """``gamma(t)`` for ``t`` ``(B,)``; shape ``(B,)``."""
        ends = self._g(torch.tensor([0.0, 1.0], device=t.device, dtype=t.dtype))
        frac = (self._g(t) - ends[0]) / (ends[1] - ends[0])
        return self.gamma_0 + (self.gamma_1 - self.gamma_0) * frac

    def with_derivative(self, t: Tensor, create_graph: bool = True) -> tuple[Tensor, Tensor]:
        """``(gamma(t), dgamma/dt)`` (the derivative through autograd, kept differentiable if ``create_graph``)."""
        with torch.enable_grad():
            tt = t.detach().clone().requires_grad_(True)
            g = self(tt)
            (dg,) = torch.autograd.grad(g.sum(), tt, create_graph=create_graph)
        return g, dg

    def alpha_bar(self, t: Tensor) -> Tensor:
        """``abar(t) = sigmoid(-gamma(t)) = SNR / (1 + SNR)``."""
        return torch.sigmoid(-self(t))


class GammaPath(AffinePath):
    """The CT forward process as a core affine path: ``alpha_t = sqrt(sigmoid(-gamma))``, ``sigma_t = sqrt(sigmoid(gamma))``."""

    name = "noprop_gamma"

    def __init__(self, gamma: MonotoneGamma):
        self.gamma = gamma

    def _g(self, t):
        shape = t.shape
        g, dg = self.gamma.with_derivative(t.reshape(-1).float(), create_graph=False)
        return g.detach().reshape(shape).to(t.dtype), dg.detach().reshape(shape).to(t.dtype)

    def alpha(self, t):
        return torch.sigmoid(-self._g(t)[0]).sqrt()

    def sigma(self, t):
        return torch.sigmoid(self._g(t)[0]).sqrt()

    def d_alpha(self, t):
        g, dg = self._g(t)
        ab = torch.sigmoid(-g)
        return -0.5 * dg * ab.sqrt() * (1 - ab)

    def d_sigma(self, t):
        g, dg = self._g(t)
        ab = torch.sigmoid(-g)
        return 0.5 * dg * (1 - ab).sqrt() * ab
