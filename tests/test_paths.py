"""Affine probability paths: boundary values, coefficient derivatives and PathSample.

flowlab convention: ``t = 0`` is noise, ``t = 1`` is data, ``x_t = alpha_t x1 + sigma_t x0``.
"""
import math

import pytest
import torch

from flowlab.flow import CosinePath, LinearPath, PathSample, VPPath, get_path

PATH_NAMES = ["linear", "cosine", "vp"]
# interior times; the VP path's d_sigma blows up like 1 / sqrt(1 - t) at t = 1
T_INTERIOR = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_boundary_values_exact(name, dtype):
    """alpha_0 = 0, sigma_0 = 1, alpha_1 = 1, sigma_1 = 0 hold *exactly* (also in float32)."""
    path = get_path(name)
    t = torch.tensor([0.0, 1.0], dtype=dtype)
    assert path.alpha(t).tolist() == [0.0, 1.0]
    assert path.sigma(t).tolist() == [1.0, 0.0]


def test_boundary_values_vp():
    """VP: alpha_0 = exp(-(beta_min + beta_max) / 4) is small but not 0; sigma_0 = sqrt(1 - alpha_0^2); data end exact."""
    path = VPPath(beta_min=0.1, beta_max=20.0)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    a, s = path.alpha(t), path.sigma(t)
    a0 = math.exp(-(0.1 + 20.0) / 4)
    assert a[0].item() == pytest.approx(a0, rel=1e-12)
    assert 0 < a[0].item() < 1e-2
    assert s[0].item() == pytest.approx(math.sqrt(1 - a0**2), rel=1e-12)
    assert abs(s[0].item() - 1) < 1e-4
    assert a[1].item() == 1.0 and s[1].item() == 0.0


@pytest.mark.parametrize("name", ["cosine", "vp"])
def test_variance_preserving(name):
    """The cosine and VP paths satisfy alpha_t^2 + sigma_t^2 = 1 on the whole interval."""
    path = get_path(name)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(path.alpha(t) ** 2 + path.sigma(t) ** 2, torch.ones_like(t), rtol=0, atol=1e-12)


def test_closed_forms():
    """Spot values of each schedule against its textbook formula."""
    t = torch.tensor([0.3], dtype=torch.float64)
    assert LinearPath().alpha(t).item() == pytest.approx(0.3)
    assert LinearPath().sigma(t).item() == pytest.approx(0.7)
    assert CosinePath().alpha(t).item() == pytest.approx(math.sin(0.15 * math.pi))
    assert CosinePath().sigma(t).item() == pytest.approx(math.cos(0.15 * math.pi))
    vp = VPPath(beta_min=0.1, beta_max=20.0)
    s = 0.7  # diffusion time 1 - t
    log_alpha = -0.5 * (0.1 * s + 0.5 * (20.0 - 0.1) * s**2)
    assert vp.alpha(t).item() == pytest.approx(math.exp(log_alpha), rel=1e-12)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_derivatives_match_autograd(name):
    """d_alpha / d_sigma equal the autograd time derivatives of alpha / sigma."""
    path = get_path(name)
    t = T_INTERIOR.clone().requires_grad_(True)
    (g_alpha,) = torch.autograd.grad(path.alpha(t).sum(), t)
    (g_sigma,) = torch.autograd.grad(path.sigma(t).sum(), t)
    with torch.no_grad():
        torch.testing.assert_close(path.d_alpha(T_INTERIOR), g_alpha, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(path.d_sigma(T_INTERIOR), g_sigma, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_derivatives_match_finite_differences(name):
    """d_alpha / d_sigma equal central finite differences of alpha / sigma (independent of autograd)."""
    path = get_path(name)
    t, h = T_INTERIOR, 1e-6
    fd_alpha = (path.alpha(t + h) - path.alpha(t - h)) / (2 * h)
    fd_sigma = (path.sigma(t + h) - path.sigma(t - h)) / (2 * h)
    torch.testing.assert_close(path.d_alpha(t), fd_alpha, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(path.d_sigma(t), fd_sigma, rtol=1e-6, atol=1e-8)


def _batch(seed=0, shape=(5, 3, 4)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    x1 = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    t = torch.rand(shape[0], generator=g, dtype=torch.float64) * 0.9 + 0.05
    return x0, x1, t


@pytest.mark.parametrize("name", PATH_NAMES)
def test_path_sample_formula(name):
    """PathSample.x_t = alpha_t x1 + sigma_t x0 and dx_t = d_alpha_t x1 + d_sigma_t x0, per sample."""
    path = get_path(name)
    x0, x1, t = _batch()
    s = path.sample(x0, x1, t)
    assert isinstance(s, PathSample)
    assert s.x_t.shape == x0.shape and s.dx_t.shape == x0.shape
    for i in range(x0.shape[0]):  # scalar coefficients, one sample at a time
        ti = t[i : i + 1]
        a, sg, da, ds = path.alpha(ti), path.sigma(ti), path.d_alpha(ti), path.d_sigma(ti)
        torch.testing.assert_close(s.x_t[i], a * x1[i] + sg * x0[i])
        torch.testing.assert_close(s.dx_t[i], da * x1[i] + ds * x0[i])
    assert s.x_0 is x0 and s.x_1 is x1 and s.t is t


@pytest.mark.parametrize("name", PATH_NAMES)
def test_dx_t_is_time_derivative_of_x_t(name):
    """For fixed (x0, x1), dx_t equals d/dt x_t computed by forward-mode autograd."""
    path = get_path(name)
    x0, x1, t = _batch(seed=1)
    # x_t[i] depends on t[i] only, so the JVP with a tangent of ones is the per-sample derivative
    _, jvp = torch.autograd.functional.jvp(lambda tt: path.sample(x0, x1, tt).x_t, t, torch.ones_like(t))
    torch.testing.assert_close(path.sample(x0, x1, t).dx_t, jvp, rtol=1e-10, atol=1e-10)


def test_linear_path_velocity_is_x1_minus_x0():
    """The linear (rectified-flow) conditional velocity is x1 - x0, independent of t."""
    x0, x1, t = _batch(seed=2)
    torch.testing.assert_close(LinearPath().sample(x0, x1, t).dx_t, x1 - x0)


def test_scalar_time_broadcasts():
    """A 0-d time is broadcast over the batch."""
    x0, x1, _ = _batch(seed=3)
    s = CosinePath().sample(x0, x1, torch.tensor(0.25, dtype=torch.float64))
    a, sg = math.sin(0.125 * math.pi), math.cos(0.125 * math.pi)
    torch.testing.assert_close(s.x_t, a * x1 + sg * x0)


def test_get_path():
    """get_path forwards keyword arguments and rejects unknown names."""
    vp = get_path("vp", beta_min=0.5, beta_max=10.0)
    assert (vp.beta_min, vp.beta_max) == (0.5, 10.0)
    with pytest.raises(ValueError):
        get_path("ddpm")
