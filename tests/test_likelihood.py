"""Log-likelihoods by the instantaneous change of variables, against Gaussian closed forms."""
import math

import pytest
import torch
from torch import nn

from flowlab.flow import divergence, gaussian_log_density, log_likelihood

MU = torch.tensor([1.5, -0.5], dtype=torch.float64)
S = 0.6


def isotropic_gaussian_field(x, t):
    """Exact linear-path velocity for data N(MU, S^2 I):
    v = mu + (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2) (x - t mu)."""
    t = t[:, None]
    var = t**2 * S**2 + (1 - t) ** 2
    return MU + (t * S**2 - (1 - t)) / var * (x - t * MU)


def log_normal_iso(x):
    """log N(x; MU, S^2 I) per sample."""
    d = x.shape[1]
    return -0.5 * ((x - MU) ** 2).sum(1) / S**2 - d * math.log(S) - 0.5 * d * math.log(2 * math.pi)


# A full-covariance Gaussian: its Jacobian has off-diagonal entries, so Hutchinson's estimate is noisy
# (for an isotropic Gaussian the Jacobian is c(t) I and a Rademacher probe gives the exact trace).
COV = torch.tensor([[1.0, 0.8], [0.8, 0.9]], dtype=torch.float64)


def full_cov_gaussian_field(x, t):
    """Linear path, data N(MU, COV): v = mu + (t C - (1 - t) I) (t^2 C + (1 - t)^2 I)^-1 (x - t mu)."""
    eye = torch.eye(2, dtype=x.dtype)
    tt = t[:, None, None]
    var = tt**2 * COV + (1 - tt) ** 2 * eye
    gain = (tt * COV - (1 - tt) * eye) @ torch.linalg.inv(var)
    return MU + (gain @ (x - t[:, None] * MU)[..., None])[..., 0]


def log_normal_full(x):
    return torch.distributions.MultivariateNormal(MU, COV).log_prob(x)


def _points(n=8, seed=0):
    return MU + S * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5


def test_gaussian_log_density():
    """log N(x; 0, I) per sample, for flat and image-shaped inputs."""
    x = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_density(x), ref)


def test_divergence_exact_and_hutchinson():
    """Exact divergence of a linear map Ax is tr(A); Hutchinson with probe e gives e^T A e."""
    a = torch.tensor([[1.0, 2.0, 0.5], [-1.0, 3.0, 0.0], [0.2, 0.1, -2.0]], dtype=torch.float64)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_(True)
    v = x @ a.T
    torch.testing.assert_close(divergence(v, x), torch.full((5,), 2.0, dtype=torch.float64))
    e = torch.tensor([[1.0, -1.0, 1.0]] * 5, dtype=torch.float64)
    torch.testing.assert_close(divergence(v, x, probe=e), torch.full((5,), float(e[0] @ a @ e[0]), dtype=torch.float64))


def test_exact_likelihood_dopri5():
    """dopri5 + exact divergence reproduces log N(x; mu, s^2 I) to 1e-3 and maps x to the latent (x - mu) / s."""
    x = _points()
    out = log_likelihood(isotropic_gaussian_field, x, solver="dopri5", estimator="exact")
    torch.testing.assert_close(out.log_prob, log_normal_iso(x), rtol=0, atol=1e-3)
    torch.testing.assert_close(out.x_0, (x - MU) / S, rtol=0, atol=1e-4)
    assert out.nfe > 0 and out.log_prob.shape == (8,)
    assert not out.log_prob.requires_grad


@pytest.mark.parametrize("solver", ["heun", "midpoint"])
def test_exact_likelihood_fixed_step(solver):
    """Second-order fixed-step solvers (64 steps) also reproduce the closed form to 1e-3; NFE = 2 x 64."""
    x = _points(seed=1)
    out = log_likelihood(isotropic_gaussian_field, x, solver=solver, num_steps=64)
    torch.testing.assert_close(out.log_prob, log_normal_iso(x), rtol=0, atol=1e-3)
    assert out.nfe == 128


def test_exact_likelihood_full_covariance():
    """Exact estimator on a correlated Gaussian: log N(x; mu, C) to 1e-3."""
    x = _points(seed=2)
    out = log_likelihood(full_cov_gaussian_field, x, solver="dopri5")
    torch.testing.assert_close(out.log_prob, log_normal_full(x), rtol=0, atol=1e-3)


def test_hutchinson_unbiased():
    """Hutchinson on 2 points each repeated 1000 times (one Rademacher probe per row): the estimates vary,
    and their mean is within 4 standard errors of the exact log-density."""
    reps = 1000
    x = _points(2, seed=3).repeat_interleave(reps, 0)
    g = torch.Generator().manual_seed(4)
    out = log_likelihood(full_cov_gaussian_field, x, solver="heun", num_steps=32, estimator="hutchinson", generator=g)
    est = out.log_prob.view(2, reps)
    exact = log_normal_full(x.view(2, reps, 2)[:, 0])
    std = est.std(1)
    assert torch.all(std > 1e-2), "Hutchinson estimates should be noisy for a non-diagonal Jacobian"
    assert torch.all((est.mean(1) - exact).abs() < 4 * std / math.sqrt(reps) + 2e-3)


def test_hutchinson_is_seeded():
    """The Hutchinson probe comes from the generator: same seed, same estimate."""
    x = _points(4, seed=5)
    a, b = (
        log_likelihood(full_cov_gaussian_field, x, "heun", 8, "hutchinson", torch.Generator().manual_seed(0)).log_prob
        for _ in range(2)
    )
    assert torch.equal(a, b)


class TinyField(nn.Module):
    """A small MLP velocity field v(x, t) for gradient checks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], 1))


def test_differentiable_gradients_match_finite_differences():
    """differentiable=True: gradients reach x and every parameter, and equal central finite differences
    of the (non-differentiable) log-likelihood."""
    field = TinyField()
    x = _points(3, seed=6).requires_grad_(True)
    kw = dict(solver="heun", num_steps=8)
    out = log_likelihood(field, x, differentiable=True, **kw)
    out.log_prob.sum().backward()
    assert x.grad is not None and torch.all(torch.isfinite(x.grad)) and x.grad.abs().sum() > 0
    for p in field.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0

    def objective():
        with torch.no_grad():
            return log_likelihood(field, x.detach(), **kw).log_prob.sum().item()

    eps = 1e-6
    w = field.net[0].weight
    with torch.no_grad():
        w[1, 2] += eps
        up = objective()
        w[1, 2] -= 2 * eps
        down = objective()
        w[1, 2] += eps
    assert w.grad[1, 2].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)


def test_differentiable_gradient_wrt_x_closed_form():
    """For the exact Gaussian field, d log p / dx through the solver equals -(x - mu) / s^2."""
    x = _points(4, seed=7).requires_grad_(True)
    out = log_likelihood(isotropic_gaussian_field, x, solver="dopri5", differentiable=True)
    out.log_prob.sum().backward()
    torch.testing.assert_close(x.grad, -(x.detach() - MU) / S**2, rtol=0, atol=1e-3)


def test_invalid_arguments():
    """Unknown estimators and the sampling-only multistep solver are rejected."""
    x = _points(2)
    with pytest.raises(ValueError):
        log_likelihood(isotropic_gaussian_field, x, estimator="skilling")
    with pytest.raises(ValueError):
        log_likelihood(isotropic_gaussian_field, x, solver="multistep")
