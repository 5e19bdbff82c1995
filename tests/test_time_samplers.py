"""Training-time samplers: each sampler's density integrates to 1 and matches its samples;
SD3 loss weightings against their formulas; invalid names/parameters raise.
"""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from flowlab.flow import (
    LOSS_WEIGHTINGS,
    LogitNormalTimeSampler,
    ModeTimeSampler,
    ShiftedTimeSampler,
    UniformTimeSampler,
    build_time_sampler,
    loss_weight,
)

N_SAMPLES = 200_000
N_BINS = 50

SAMPLERS = {
    "uniform": lambda: UniformTimeSampler(),
    "logit_normal(0,1)": lambda: LogitNormalTimeSampler(0.0, 1.0),
    "logit_normal(-0.5,1.5)": lambda: LogitNormalTimeSampler(-0.5, 1.5),
    "logit_normal(1,0.5)": lambda: LogitNormalTimeSampler(1.0, 0.5),
    "mode(1.29)": lambda: ModeTimeSampler(1.29),
    "mode(-0.5)": lambda: ModeTimeSampler(-0.5),
    "shifted(uniform,3)": lambda: ShiftedTimeSampler(UniformTimeSampler(), 3.0),
    "shifted(logit_normal,3)": lambda: ShiftedTimeSampler(LogitNormalTimeSampler(0.0, 1.0), 3.0),
}


def _density_np(sampler, t):
    return sampler.density(torch.as_tensor(np.asarray(t, dtype=np.float64))).numpy()


def _bin_probabilities(sampler, edges, order=20):
    """Integral of the density over each bin by Gauss-Legendre quadrature (one vectorised density call)."""
    nodes, weights = np.polynomial.legendre.leggauss(order)
    lo, hi = edges[:-1, None], edges[1:, None]
    pts = 0.5 * (hi - lo) * nodes[None] + 0.5 * (hi + lo)
    dens = _density_np(sampler, pts.ravel()).reshape(pts.shape)
    return (0.5 * (hi - lo) * weights[None] * dens).sum(1)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_density_integrates_to_one(name):
    """The density integrates to 1 over (0, 1) (adaptive quadrature)."""
    sampler = SAMPLERS[name]()
    total, _ = integrate.quad(lambda t: float(_density_np(sampler, [t])[0]), 0.0, 1.0, limit=200)
    assert total == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samples_match_density(name):
    """200k samples: every histogram bin's frequency lies within 5 standard errors of the bin probability
    integrated from the density, and a KS test against the integrated CDF does not reject."""
    sampler = SAMPLERS[name]()
    t = sampler.sample(N_SAMPLES, generator=torch.Generator().manual_seed(0))
    assert t.shape == (N_SAMPLES,) and t.dtype == torch.float32
    t = t.double().numpy()
    assert np.all((t >= 0) & (t <= 1))

    edges = np.linspace(0.0, 1.0, N_BINS + 1)
    p = _bin_probabilities(sampler, edges)
    freq = np.histogram(t, bins=edges)[0] / N_SAMPLES
    z = (freq - p) / np.sqrt(p * (1 - p) / N_SAMPLES + 1e-300)
    assert np.max(np.abs(z)) < 5.0, f"worst bin z-score {np.max(np.abs(z)):.2f}"

    fine = np.linspace(0.0, 1.0, 4001)
    cdf_knots = np.concatenate([[0.0], np.cumsum(_bin_probabilities(sampler, fine, order=8))])
    res = stats.kstest(t, lambda q: np.interp(q, fine, cdf_knots))
    assert res.pvalue > 1e-3, f"KS statistic {res.statistic:.4g}, p={res.pvalue:.2g}"


def test_logit_normal_sd3_convention():
    """SD3's logit-normal(m, s) on sigma = 1 - t is LogitNormalTimeSampler(mean=-m, std=s) in flowlab time."""
    m, s = 0.7, 1.2
    sigma = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    logit = torch.log(sigma / (1 - sigma))
    sd3_density = torch.exp(-((logit - m) ** 2) / (2 * s**2)) / (s * math.sqrt(2 * math.pi) * sigma * (1 - sigma))
    torch.testing.assert_close(LogitNormalTimeSampler(-m, s).density(1 - sigma), sd3_density)


@pytest.mark.parametrize("scale", [1.29, -0.5])
def test_mode_sampler_matches_sd3_formula(scale):
    """With the same uniforms, t = 1 - sigma where SD3 mode sampling gives
    sigma = 1 - u - scale (cos^2(pi u / 2) - 1 + u)."""
    u_gen, t_gen = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    u = torch.rand(1000, generator=u_gen)
    sigma = 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    t = ModeTimeSampler(scale).sample(1000, generator=t_gen)
    torch.testing.assert_close(t, 1 - sigma, rtol=0, atol=1e-6)


def test_mode_sampler_symmetric_density():
    """The mode density is symmetric under t <-> 1 - t and flat for scale = 0."""
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    for scale in (1.29, -0.5):
        d = ModeTimeSampler(scale).density(t)
        torch.testing.assert_close(d, d.flip(0), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ModeTimeSampler(0.0).density(t), torch.ones_like(t))


def test_shifted_sampler_is_shift_of_base():
    """ShiftedTimeSampler applies shift_t to the base samples drawn from the same generator."""
    base = LogitNormalTimeSampler(0.3, 0.8)
    a = ShiftedTimeSampler(base, 3.0).sample(100, generator=torch.Generator().manual_seed(5))
    b = base.sample(100, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, 1 - 3 * (1 - b) / (1 + 2 * (1 - b)))


def test_sampling_is_seeded():
    """The same seed gives the same samples."""
    s = build_time_sampler("logit_normal", mean=0.2, std=1.1, shift=2.0)
    a = s.sample(10, generator=torch.Generator().manual_seed(9))
    b = s.sample(10, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_build_time_sampler():
    """Config names map to the right classes; shift != 1 wraps the base sampler."""
    assert isinstance(build_time_sampler("uniform"), UniformTimeSampler)
    ln = build_time_sampler("logit_normal", mean=0.5, std=2.0)
    assert isinstance(ln, LogitNormalTimeSampler) and (ln.mean, ln.std) == (0.5, 2.0)
    mode = build_time_sampler("mode", mode_scale=0.3)
    assert isinstance(mode, ModeTimeSampler) and mode.scale == 0.3
    shifted = build_time_sampler("mode", shift=3.0)
    assert isinstance(shifted, ShiftedTimeSampler) and isinstance(shifted.base, ModeTimeSampler) and shifted.shift == 3.0


def test_loss_weights():
    """none = 1; sigma_sqrt = sigma^-2 clamped at max_weight; cosmap = 2 / (pi (1 - 2 sigma + 2 sigma^2)),
    which is a probability density over sigma (integrates to 1)."""
    t = torch.linspace(0.0, 0.99, 100, dtype=torch.float64)
    sigma = 1 - t
    assert LOSS_WEIGHTINGS == ("none", "sigma_sqrt", "cosmap")
    torch.testing.assert_close(loss_weight(t, "none"), torch.ones_like(t))
    torch.testing.assert_close(loss_weight(t, "sigma_sqrt"), 1 / sigma**2)
    torch.testing.assert_close(loss_weight(t, "cosmap"), 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2)))
    assert loss_weight(torch.tensor([0.5]), "cosmap").item() == pytest.approx(4 / math.pi)
    # clamp at the data end (sigma -> 0)
    w = loss_weight(torch.tensor([1.0, 0.999], dtype=torch.float64), "sigma_sqrt", max_weight=100.0)
    assert w.tolist() == [100.0, 100.0]
    total, _ = integrate.quad(lambda s: float(loss_weight(torch.tensor([1 - s]), "cosmap")), 0, 1)
    assert total == pytest.approx(1.0, abs=1e-6)


def test_invalid_names_and_params():
    """Unknown sampler/weighting names and out-of-range parameters raise ValueError."""
    with pytest.raises(ValueError):
        build_time_sampler("beta")
    with pytest.raises(ValueError):
        LogitNormalTimeSampler(0.0, 0.0)
    with pytest.raises(ValueError):
        LogitNormalTimeSampler(0.0, -1.0)
    with pytest.raises(ValueError):
        ModeTimeSampler(1.0 + 2.0 / (math.pi - 2.0))  # g no longer monotone
    with pytest.raises(ValueError):
        ModeTimeSampler(-1.5)
    with pytest.raises(ValueError):
        ShiftedTimeSampler(UniformTimeSampler(), 0.0)
    with pytest.raises(ValueError):
        build_time_sampler("uniform", shift=-2.0)
    with pytest.raises(ValueError):
        loss_weight(torch.rand(3), "min_snr")
