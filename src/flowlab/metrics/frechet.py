"""Fréchet (2-Wasserstein) distance between Gaussians fitted to feature sets.

For ``N(mu1, cov1)`` and ``N(mu2, cov2)``:
``FD = |mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^{1/2})``.

Small-sample bias: the distance estimated from ``n`` samples is biased upwards, roughly by
``O(d / n)`` (mean and covariance estimation noise never cancels), so compare FDs only at equal
sample counts.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
from torch import Tensor

__all__ = ["feature_stats", "frechet_distance", "fd_from_features"]


def feature_stats(f: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(d,)`` and covariance ``(d, d)`` (unbiased, float64) of features ``(n, d)``."""
    f = f.detach().cpu().numpy() if isinstance(f, Tensor) else np.asarray(f)
    f = f.astype(np.float64, copy=False).reshape(f.shape[0], -1)
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {f.shape[0]}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1, cov1, mu2, cov2, eps: float = 1e-6) -> float:
    """Fréchet (2-Wasserstein squared) distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``:

    ``|mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^{1/2})``, in float64.

    The matrix square root uses ``scipy.linalg.sqrtm``; if it is not finite, has a
    non-negligible imaginary part, or scipy reports the product singular and the root does
    not square back to it (near-singular covariances, e.g. fewer samples than feature
    dimensions), ``eps`` is added to both diagonals and it is recomputed (this perturbs the
    result by about ``sqrt(eps * var)`` per degenerate direction). The real part is taken
    and the result clipped at 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, cov {cov1.shape} / {cov2.shape}")
    diff = mu1 - mu2

    def _sqrt_tr(a: np.ndarray, b: np.ndarray) -> tuple[float, bool]:
        prod = a @ b
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            s = scipy.linalg.sqrtm(prod)
        if isinstance(s, tuple):  # very old scipy with disp=False semantics
            s = s[0]
        s = np.asarray(s)
        if not np.isfinite(s).all():
            return float("nan"), False
        if np.iscomplexobj(s):
            scale = max(1.0, float(np.abs(s.real).max()))
            if float(np.abs(s.imag).max()) > 1e-3 * scale:
                return float(np.trace(s).real), False
            s = s.real
        if any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught):
            # scipy flags singular products, but the root is often still accurate (e.g.
            # zero-variance directions): accept it if it squares back to the product
            resid = np.linalg.norm(s @ s - prod) / max(np.linalg.norm(prod), 1e-300)
            if not resid < 1e-6:
                return float(np.trace(s)), False
        return float(np.trace(s)), True

    tr_covmean, ok = _sqrt_tr(cov1, cov2)
    if not ok:
        off = eps * np.eye(cov1.shape[0])
        tr_covmean, ok = _sqrt_tr(cov1 + off, cov2 + off)
        if not ok and not np.isfinite(tr_covmean):
            raise FloatingPointError("matrix square root failed even with eps on the diagonal")
    fd = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean)
    return max(fd, 0.0)


def fd_from_features(f1: np.ndarray | Tensor, f2: np.ndarray | Tensor, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(n1, d)`` and ``(n2, d)``."""
    return frechet_distance(*feature_stats(f1), *feature_stats(f2), eps=eps)


