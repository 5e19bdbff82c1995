"""How far is a learned field from a true (conservative) score?

A score ``s = grad log p`` is a gradient field: its Jacobian is symmetric, its integral
around any closed loop is 0, and its line integral between two points does not depend on
the path. Each function below measures one of these properties of a field
``f(x, t) -> (B, ...)`` at points ``x`` ``(B, ...)`` and flowlab times ``t`` ``(B,)``, and
returns one value per point; :func:`conservativity_report` bins them by time and adds 95%
confidence intervals.

* :func:`jacobian_asymmetry` ``A = ||J - J^T||_F / ||J||_F`` in ``[0, 2]``: 0 for a gradient
  field, 2 for a pure rotation. Exact (``D`` vector-Jacobian products) for small ``D``,
  otherwise estimated with Gaussian probes ``z``: ``E||(J - J^T) z||^2 = ||J - J^T||_F^2`` and
  ``E||J z||^2 = ||J||_F^2`` (one JVP and one VJP per probe), ``A ~ sqrt(mean num / mean den)``.
* :func:`planar_curl` on a random orthonormal pair ``(u, w)``: ``c = w^T J u - u^T J w`` (the
  scalar curl ``d_x f_y - d_y f_x`` for ``u = e_x, w = e_y``),
  reported relative to the Frobenius norm of the 2x2 sub-Jacobian ``[u w]^T J [u w]``
  (``|c| / ||.||`` lies in ``[0, sqrt 2]``; ``sqrt 2`` for a rotation in that plane).
* :func:`loop_integral` on the circle ``x(theta) = c + rho (u cos theta + w sin theta)``:
  ``I = oint f . dl`` (periodic trapezoid rule) normalised by ``oint |f . dl|`` (in [-1, 1]).
* :func:`path_dependence`: ``int f . dl`` along the straight segment from ``a`` to ``b`` and
  along a genuinely different path with the same ends, the detour
  ``a + s (b - a) + h sin(pi s) w`` (``w`` orthogonal to ``b - a``), by Gauss–Legendre
  quadrature; ``|I_straight - I_detour|`` normalised by the sum of both ``int |f . dl|``.

JVPs are taken with the double-VJP trick (``J z = d/du [(J^T u) . z]``), so fields that
themselves call ``torch.autograd.grad`` (e.g. :class:`~flowlab.models.ConservativeVelocity`)
work too; attention layers are switched to PyTorch's math SDPA kernel for them (fused kernels
have no double backward).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field as dc_field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Field",
    "jacobian",
    "jvp_vjp",
    "jacobian_asymmetry",
    "planar_curl",
    "loop_integral",
    "path_dependence",
    "random_orthonormal_pair",
    "noised_points",
    "summarize",
    "ConservativityReport",
    "conservativity_report",
    "DIAGNOSTICS",
]

Field = Callable[[Tensor, Tensor], Tensor]
DIAGNOSTICS = ("asymmetry", "curl", "loop", "path")
_TINY = 1e-30


def _t(t, x: Tensor) -> Tensor:
    if not torch.is_tensor(t) or t.ndim == 0:
        return torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
    return t.to(x.device, x.dtype)


def _grad(out: Tensor, inp: Tensor, grad_out: Tensor, **kw) -> Tensor:
    (g,) = torch.autograd.grad(out, inp, grad_outputs=grad_out, allow_unused=True, **kw)
    return torch.zeros_like(inp) if g is None else g


def jacobian(field: Field, x: Tensor, t) -> Tensor:
    """Exact Jacobian ``d f / d x`` per sample, shape ``(B, D, D)`` (``D`` = flattened size; ``D`` VJPs)."""
    t = _t(t, x)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = field(x, t).reshape(x.shape[0], -1)
        rows = []
        for d in range(v.shape[1]):
            e = torch.zeros_like(v)
            e[:, d] = 1
            rows.append(_grad(v, x, e, retain_graph=True).reshape(x.shape[0], -1))
    return torch.stack(rows, dim=1).detach()


def jvp_vjp(field: Field, x: Tensor, t, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(f(x), J z, J^T z)`` per sample (shapes of ``x``), with one VJP and one double-VJP."""
    t = _t(t, x)
    # the double VJP differentiates the backward pass: fused attention kernels (PyTorch's flash /
    # memory-efficient SDPA) have no double backward, the math kernel does
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        x = x.detach().requires_grad_(True)
        v = field(x, t)
        jtz = _grad(v, x, z, retain_graph=True)
        u = torch.zeros_like(v, requires_grad=True)
        g = _grad(v, x, u, create_graph=True)  # J^T u, linear in u
        jz = _grad(g, u, z) if g.requires_grad else torch.zeros_like(v)
    return v.detach(), jz.detach(), jtz.detach()


def _repeat(x: Tensor, t: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return x.repeat(k, *([1] * (x.ndim - 1))), t.repeat(k)


def jacobian_asymmetry(field: Field, x: Tensor, t, num_probes: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """``||J - J^T||_F / ||J||_F`` per sample ``(B,)``: exact if ``num_probes`` is ``None``, else a probe estimate."""
    t = _t(t, x)
    b = x.shape[0]
    if num_probes is None:
        j = jacobian(field, x, t)
        num = (j - j.transpose(1, 2)).pow(2).sum((1, 2))
        den = j.pow(2).sum((1, 2))
    else:
        xr, tr = _repeat(x, t, num_probes)
        z = torch.randn(xr.shape, generator=generator, dtype=x.dtype).to(x.device)
        _, jz, jtz = jvp_vjp(field, xr, tr, z)
        num = (jz - jtz).reshape(num_probes, b, -1).pow(2).sum(-1).mean(0)
        den = jz.reshape(num_probes, b, -1).pow(2).sum(-1).mean(0)
    return (num / den.clamp_min(_TINY)).sqrt()


def random_orthonormal_pair(shape: tuple[int, ...], generator: torch.Generator | None = None, dtype=torch.float32, device=None) -> tuple[Tensor, Tensor]:
    """Per-sample orthonormal ``(u, w)`` of ``shape`` ``(B, ...)``, uniformly oriented (Gram–Schmidt)."""
    b = shape[0]
    a = torch.randn(b, 2, int(np.prod(shape[1:])), generator=generator, dtype=torch.float64)
    u = a[:, 0] / a[:, 0].norm(dim=1, keepdim=True)
    w = a[:, 1] - (a[:, 1] * u).sum(1, keepdim=True) * u
    w = w / w.norm(dim=1, keepdim=True)
    return u.reshape(shape).to(device=device, dtype=dtype), w.reshape(shape).to(device=device, dtype=dtype)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).flatten(1).sum(1)


def planar_curl(field: Field, x: Tensor, t, u: Tensor | None = None, w: Tensor | None = None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``(relative |curl|, signed curl)`` per sample on the plane ``(u, w)`` (random if not given).

    ``curl = w^T J u - u^T J w`` (``d_x f_y - d_y f_x`` for ``u = e_x``, ``w = e_y``); relative to ``||[u w]^T J [u w]||_F``.
    """
    t = _t(t, x)
    if u is None or w is None:
        u, w = random_orthonormal_pair(tuple(x.shape), generator, x.dtype, x.device)
    xr, tr = _repeat(x, t, 2)
    _, jz, _ = jvp_vjp(field, xr, tr, torch.cat([u, w]))
    ju, jw = jz.chunk(2)
    uju, wju, ujw, wjw = _dot(u, ju), _dot(w, ju), _dot(u, jw), _dot(w, jw)
    curl = wju - ujw
    norm = (uju**2 + wju**2 + ujw**2 + wjw**2).sqrt()
    return curl.abs() / norm.clamp_min(_TINY), curl


def loop_integral(
    field: Field, x: Tensor, t, radius: float = 0.25, num_nodes: int = 64, u: Tensor | None = None, w: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``(oint f.dl / oint |f.dl|, oint f.dl)`` per sample on the circle of ``radius`` around ``x`` in plane ``(u, w)``."""
    t = _t(t, x)
    if u is None or w is None:
        u, w = random_orthonormal_pair(tuple(x.shape), generator, x.dtype, x.device)
    b, k = x.shape[0], num_nodes
    theta = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    shp = (k, 1, *([1] * (x.ndim - 1)))
    c, s = theta.cos().reshape(shp).to(x), theta.sin().reshape(shp).to(x)
    pts = x[None] + radius * (c * u[None] + s * w[None])  # (K, B, ...)
    dl = radius * (-s * u[None] + c * w[None]) * (2 * math.pi / k)
    with torch.no_grad():
        v = field(pts.reshape(k * b, *x.shape[1:]), t.repeat(k)).reshape(pts.shape)
    sdl = (v * dl).flatten(2).sum(2)  # (K, B)
    total = sdl.sum(0)
    return total / sdl.abs().sum(0).clamp_min(_TINY), total


def path_dependence(
    field: Field, x: Tensor, t, length: float = 0.5, detour: float = 0.5, num_nodes: int = 32,
    u: Tensor | None = None, w: Tensor | None = None, generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``(|I_s - I_d| / (int|f.dl|_s + int|f.dl|_d), I_s - I_d)`` per sample.

    The ends are ``a = x - (length/2) u`` and ``b = x + (length/2) u``; the straight path is
    ``a + s (b - a)``, the detour ``a + s (b - a) + detour * length * sin(pi s) w``, ``s`` in [0, 1].
    For a gradient field ``f = grad phi`` both integrals equal ``phi(b) - phi(a)``.
    """
    t = _t(t, x)
    if u is None or w is None:
        u, w = random_orthonormal_pair(tuple(x.shape), generator, x.dtype, x.device)
    b, k = x.shape[0], num_nodes
    nodes, weights = np.polynomial.legendre.leggauss(k)
    s = torch.as_tensor((nodes + 1) / 2).to(x)
    wq = torch.as_tensor(weights / 2).to(x)
    shp = (k, 1, *([1] * (x.ndim - 1)))
    s_, wq_ = s.reshape(shp), wq.reshape(k, 1)
    a_pt, delta, h = x - 0.5 * length * u, length * u, detour * length
    straight = a_pt[None] + s_ * delta[None]
    bent = straight + h * torch.sin(math.pi * s_) * w[None]
    d_straight = delta[None].expand_as(straight)
    d_bent = d_straight + h * math.pi * torch.cos(math.pi * s_) * w[None]
    with torch.no_grad():
        pts = torch.cat([straight, bent]).reshape(2 * k * b, *x.shape[1:])
        v = field(pts, t.repeat(2 * k)).reshape(2 * k, *x.shape)
    f_s = (v[:k] * d_straight).flatten(2).sum(2) * wq_
    f_d = (v[k:] * d_bent).flatten(2).sum(2) * wq_
    diff = f_s.sum(0) - f_d.sum(0)
    return diff.abs() / (f_s.abs().sum(0) + f_d.abs().sum(0)).clamp_min(_TINY), diff


# --------------------------------------------------------------------------- reports


def summarize(values: Tensor) -> dict:
    """Mean, standard error and normal 95% interval of per-point values."""
    v = values.detach().double().cpu()
    v = v[torch.isfinite(v)]
    n = int(v.numel())
    mean = float(v.mean()) if n else float("nan")
    se = float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": mean, "stderr": se, "ci_low": mean - 1.96 * se, "ci_high": mean + 1.96 * se, "n": n}


def noised_points(path, x1: Tensor) -> Callable[[Tensor, torch.Generator | None], Tensor]:
    """A sampler ``(t (B,), generator) -> x_t = alpha_t x1 + sigma_t eps`` with ``x1`` drawn from the pool ``x1``."""

    def sample(t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        idx = torch.randint(0, x1.shape[0], (t.shape[0],), generator=generator)
        data = x1[idx]
        eps = torch.randn(data.shape, generator=generator, dtype=data.dtype).to(data.device)
        return path.sample(eps, data, t.to(data.device, data.dtype)).x_t

    return sample


@dataclass
class ConservativityReport:
    """Per-time-bin statistics of each diagnostic.

    ``bins``: one dict per bin: ``t_low``, ``t_high`` and, for each of ``asymmetry``, ``curl``,
    ``loop``, ``path``, the output of :func:`summarize` (mean, stderr, 95% CI, n).
    """

    bins: list[dict] = dc_field(default_factory=list)
    settings: dict = dc_field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"bins": self.bins, "settings": self.settings}

    def table(self) -> str:
        """A fixed-width text table: ``mean [95% CI]`` of each diagnostic per bin."""
        head = f"{'t bin':^12} | " + " | ".join(f"{n:^25}" for n in DIAGNOSTICS)
        lines = [head, "-" * len(head)]
        for bn in self.bins:
            cells = []
            for n in DIAGNOSTICS:
                d = bn.get(n)
                cells.append(f"{d['mean']:.3g} [{d['ci_low']:.3g}, {d['ci_high']:.3g}]" if d else "-")
            lines.append(f"[{bn['t_low']:.2f}, {bn['t_high']:.2f}] | " + " | ".join(f"{c:^25}" for c in cells))
        return "\n".join(lines)


def conservativity_report(
    field: Field,
    sample_points: Callable[[Tensor, torch.Generator | None], Tensor],
    num_bins: int = 5,
    t_range: tuple[float, float] = (0.05, 0.95),
    num_points: int = 64,
    num_probes: int | None = None,
    exact_max_dim: int = 64,
    radius: float = 0.25,
    length: float = 0.5,
    num_nodes: int = 32,
    diagnostics: tuple[str, ...] = DIAGNOSTICS,
    generator: torch.Generator | None = None,
) -> ConservativityReport:
    """Every diagnostic of ``field`` in ``num_bins`` equal time bins over ``t_range``.

    In each bin ``num_points`` times are drawn uniformly, and points ``x = sample_points(t)``
    (e.g. :func:`noised_points` of data or of model samples); each point gets one random
    plane/circle/segment. The Jacobian asymmetry is exact when the flattened dimension is at
    most ``exact_max_dim`` and ``num_probes`` is ``None``, else estimated with ``num_probes``
    (default 4) Gaussian probes. Confidence intervals are normal 95% intervals over points
    (they include the probe noise; the O(1/num_probes) bias of the probe ratio is not in them).
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    edges = torch.linspace(t_range[0], t_range[1], num_bins + 1, dtype=torch.float64)
    report = ConservativityReport(settings=dict(num_bins=num_bins, t_range=list(t_range), num_points=num_points, radius=radius, length=length, num_nodes=num_nodes))
    for i in range(num_bins):
        lo, hi = float(edges[i]), float(edges[i + 1])
        t = lo + (hi - lo) * torch.rand(num_points, generator=gen, dtype=torch.float64)
        x = sample_points(t, gen)
        t = t.to(x.device, x.dtype)
        dim = int(np.prod(x.shape[1:]))
        probes = num_probes if (num_probes is not None or dim > exact_max_dim) else None
        if probes is None and dim > exact_max_dim:
            probes = 4
        row: dict = {"t_low": lo, "t_high": hi}
        if "asymmetry" in diagnostics:
            row["asymmetry"] = summarize(jacobian_asymmetry(field, x, t, num_probes=probes, generator=gen))
            row["asymmetry"]["method"] = "exact" if probes is None else f"{probes} probes"
        if "curl" in diagnostics:
            row["curl"] = summarize(planar_curl(field, x, t, generator=gen)[0])
        if "loop" in diagnostics:
            row["loop"] = summarize(loop_integral(field, x, t, radius=radius, num_nodes=2 * num_nodes, generator=gen)[0].abs())
        if "path" in diagnostics:
            row["path"] = summarize(path_dependence(field, x, t, length=length, num_nodes=num_nodes, generator=gen)[0])
        report.bins.append(row)
    return report
