"""Converters between velocity, x1, epsilon and score predictions on every affine path.

Ground truth: for x_t = a x1 + s x0 (x0 = eps ~ N(0, I)), the conditional quantities are
velocity = da x1 + ds x0, x1, epsilon = x0 and (conditional) score = -x0 / s.
"""
import itertools

import pytest
import torch

from flowlab.flow import PREDICTION_TYPES, convert, get_path, to_epsilon, to_score, to_velocity, to_x1

PATH_NAMES = ["linear", "cosine", "vp"]
PAIRS = list(itertools.product(PREDICTION_TYPES, PREDICTION_TYPES))


def _setup(path, seed=0, batch=16, dim=3):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    x1 = torch.randn(batch, dim, generator=g, dtype=torch.float64) * 1.5 - 0.5
    t = torch.linspace(0.05, 0.95, batch, dtype=torch.float64)
    a, s, da, ds = path.coefficients(t, x0)
    truth = {"velocity": da * x1 + ds * x0, "x1": x1, "epsilon": x0, "score": -x0 / s}
    return a * x1 + s * x0, t, truth


@pytest.mark.parametrize("src,dst", PAIRS)
@pytest.mark.parametrize("name", PATH_NAMES)
def test_convert_ground_truth(name, src, dst):
    """Converting the true `src` quantity gives the true `dst` quantity (closed form from x0, x1)."""
    path = get_path(name)
    x_t, t, truth = _setup(path)
    out = convert(path, truth[src], x_t, t, src, dst)
    torch.testing.assert_close(out, truth[dst], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("src,dst", [p for p in PAIRS if p[0] != p[1]])
@pytest.mark.parametrize("name", PATH_NAMES)
def test_round_trip(name, src, dst):
    """src -> dst -> src is the identity for an arbitrary (not ground-truth) prediction at interior t."""
    path = get_path(name)
    x_t, t, _ = _setup(path, seed=1)
    pred = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    back = convert(path, convert(path, pred, x_t, t, src, dst), x_t, t, dst, src)
    torch.testing.assert_close(back, pred, rtol=1e-9, atol=1e-9)


def test_shorthands():
    """to_velocity / to_x1 / to_epsilon / to_score agree with convert."""
    path = get_path("cosine")
    x_t, t, truth = _setup(path, seed=3)
    v = truth["velocity"]
    torch.testing.assert_close(to_velocity(path, truth["x1"], x_t, t, "x1"), v)
    torch.testing.assert_close(to_x1(path, v, x_t, t, "velocity"), truth["x1"])
    torch.testing.assert_close(to_epsilon(path, v, x_t, t, "velocity"), truth["epsilon"])
    torch.testing.assert_close(to_score(path, v, x_t, t, "velocity"), truth["score"])


def test_linear_path_velocity_score_identity():
    """Linear path: v = (x_t + (1 - t) score) / t and v = (x1_hat - x_t) / (1 - t) (textbook identities)."""
    path = get_path("linear")
    x_t, t, _ = _setup(path, seed=4)
    score = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    tt = t[:, None]
    v = to_velocity(path, score, x_t, t, "score")
    torch.testing.assert_close(v, (x_t + (1 - tt) * score) / tt)
    x1_hat = to_x1(path, score, x_t, t, "score")
    torch.testing.assert_close(v, (x1_hat - x_t) / (1 - tt))


@pytest.mark.parametrize("name", PATH_NAMES)
def test_gaussian_posterior_mean_to_score(name):
    """Gaussian data N(mu, s^2 I): the exact E[x1 | x_t] converted to a score equals the closed-form
    score of p_t = N(alpha mu, (alpha^2 s^2 + sigma^2) I), and converting that score back gives E[x1 | x_t]."""
    path = get_path(name)
    g = torch.Generator().manual_seed(6)
    mu, s_data = torch.tensor([1.5, -2.0, 0.5], dtype=torch.float64), 0.7
    t = torch.linspace(0.05, 0.95, 32, dtype=torch.float64)
    x_t = torch.randn(32, 3, generator=g, dtype=torch.float64) * 1.3
    a, s, _, _ = path.coefficients(t, x_t)
    var_t = a**2 * s_data**2 + s**2
    posterior_mean = mu + a * s_data**2 / var_t * (x_t - a * mu)
    score_closed = -(x_t - a * mu) / var_t
    torch.testing.assert_close(to_score(path, posterior_mean, x_t, t, "x1"), score_closed, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(to_x1(path, score_closed, x_t, t, "score"), posterior_mean, rtol=1e-9, atol=1e-9)
    # and the score really is grad log N(x; a mu, var_t I)
    x = x_t.clone().requires_grad_(True)
    log_p = (-0.5 * (x - a * mu) ** 2 / var_t).sum()
    (grad,) = torch.autograd.grad(log_p, x)
    torch.testing.assert_close(grad, score_closed)


def test_gaussian_marginal_velocity_linear_path():
    """Linear path, Gaussian data: velocity from E[x1 | x_t] is d/dt of the Gaussian interpolation,
    v = mu + (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2) (x - t mu)."""
    path = get_path("linear")
    mu, s_data = torch.tensor([2.0, -1.0], dtype=torch.float64), 0.5
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    x_t = torch.randn(19, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    tt = t[:, None]
    var_t = tt**2 * s_data**2 + (1 - tt) ** 2
    x1_hat = mu + tt * s_data**2 / var_t * (x_t - tt * mu)
    v_closed = mu + (tt * s_data**2 - (1 - tt)) / var_t * (x_t - tt * mu)
    torch.testing.assert_close(to_velocity(path, x1_hat, x_t, t, "x1"), v_closed, rtol=1e-10, atol=1e-10)


def test_invalid_prediction_type():
    """Unknown parameterisation names raise ValueError, also when src == dst."""
    path = get_path("linear")
    x_t, t, truth = _setup(path)
    for src, dst in [("noise", "velocity"), ("velocity", "noise"), ("noise", "noise")]:
        with pytest.raises(ValueError):
            convert(path, truth["velocity"], x_t, t, src, dst)
