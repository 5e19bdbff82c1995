"""PNG plots of conservativity diagnostics (matplotlib, the optional extra ``flowlab[plots]``)."""
from __future__ import annotations

import torch

from .diagnostics import DIAGNOSTICS, ConservativityReport, planar_curl

__all__ = ["plot_report", "plot_quiver_curl"]

_LABELS = {
    "asymmetry": "Jacobian asymmetry ||J-J^T||/||J||",
    "curl": "relative planar curl",
    "loop": "|normalised loop integral|",
    "path": "path dependence",
}


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("plots need matplotlib: pip install 'flowlab[plots]' (or matplotlib)") from e
    return plt


def plot_report(reports: dict[str, ConservativityReport], path: str, title: str = "") -> None:
    """One panel per diagnostic: mean and 95% CI against the bin centre ``t``, one line per report."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(DIAGNOSTICS), figsize=(4 * len(DIAGNOSTICS), 3.4))
    for name, rep in reports.items():
        t = [(b["t_low"] + b["t_high"]) / 2 for b in rep.bins]
        for ax, diag in zip(axes, DIAGNOSTICS):
            if diag not in rep.bins[0]:
                continue
            m = [b[diag]["mean"] for b in rep.bins]
            lo = [b[diag]["ci_low"] for b in rep.bins]
            hi = [b[diag]["ci_high"] for b in rep.bins]
            ax.plot(t, m, marker="o", label=name)
            ax.fill_between(t, lo, hi, alpha=0.25)
    for ax, diag in zip(axes, DIAGNOSTICS):
        ax.set_xlabel("t (0 = noise, 1 = data)")
        ax.set_title(_LABELS[diag], fontsize=9)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def plot_quiver_curl(field, path: str, times=(0.25, 0.5, 0.75, 0.95), extent: float = 3.0, n: int = 21, title: str = "") -> None:
    """2-D fields: arrows of ``field(x, t)`` on an ``n x n`` grid over ``[-extent, extent]^2``, coloured by
    the scalar curl ``d_x f_y - d_y f_x`` (from the Jacobian), one panel per time."""
    plt = _plt()
    g = torch.linspace(-extent, extent, n)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    e1 = torch.tensor([[1.0, 0.0]]).expand_as(pts)
    e2 = torch.tensor([[0.0, 1.0]]).expand_as(pts)
    fig, axes = plt.subplots(1, len(times), figsize=(4 * len(times), 3.8))
    axes = [axes] if len(times) == 1 else axes
    for ax, t in zip(axes, times):
        tt = torch.full((pts.shape[0],), float(t))
        v = field(pts, tt).float()
        _, curl = planar_curl(field, pts, tt, e1, e2)
        curl = curl.float()
        lim = float(curl.abs().max()) or 1.0
        unit = (v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()
        mesh = ax.pcolormesh(xx.numpy(), yy.numpy(), curl.reshape(n, n).numpy(), cmap="coolwarm", vmin=-lim, vmax=lim, shading="auto")
        ax.quiver(pts[:, 0].numpy(), pts[:, 1].numpy(), unit[:, 0], unit[:, 1], color="k", scale=n * 1.2, width=0.004)
        fig.colorbar(mesh, ax=ax, fraction=0.046, pad=0.04, label="curl")
        ax.set_title(f"t = {t:g}", fontsize=9)
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title + " (unit arrows; colour: curl d_x f_y - d_y f_x)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
