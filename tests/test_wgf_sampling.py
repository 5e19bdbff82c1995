"""Sampling diffusion models as probability-flow ODEs: Gaussian and Gaussian-mixture data with
the exact epsilon / x0 / v / score of every p_t, for diffusers' beta schedules, and agreement
with diffusers' own scheduler arithmetic."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from flowlab.flow import get_solver, gaussian_log_density
from flowlab.flow.solvers import MultistepSolver
from flowlab.wgf import DiscreteSchedulePath, ProbabilityFlow, diffusion_coefficient

SCHEDULES = {
    "linear": dict(beta_schedule="linear"),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
}
KINDS = ("epsilon", "sample", "v_prediction", "score")
D = torch.float64
MU = torch.tensor([1.0, -0.5], dtype=D)
CHOL = torch.tensor([[0.8, 0.0], [0.3, 0.5]], dtype=D)
SIGMA = CHOL @ CHOL.T


def scheduler(name, cls=DDPMScheduler, **kw):
    return cls(num_train_timesteps=1000, clip_sample=False, **SCHEDULES[name], **kw)


def gaussian_model(path, kind):
    """The exact diffusers-style prediction for data N(MU, SIGMA): input (x, continuous timestep u)."""

    def model(x, u):
        t = 1 - (u.to(D) + 1) / path.num_train_timesteps
        a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]
        cov = a[:, :, None] ** 2 * SIGMA + s[:, :, None] ** 2 * torch.eye(2, dtype=D)
        score = -torch.linalg.solve(cov, (x - a * MU)[..., None])[..., 0]
        eps = -s * score
        x0 = MU + a * (SIGMA @ (-score)[..., None])[..., 0]  # E[x0 | x_t] = mu + a Sigma C^-1 (x - a mu)
        return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0, "score": score}[kind]

    return model


def exact_prior(path, n, seed):
    """Samples of the exact p_0 = N(a0 mu, a0^2 Sigma + s0^2 I) and its log-density (the path is truncated: a0 > 0)."""
    t0 = torch.zeros(1, dtype=D)
    a0, s0 = float(path.alpha(t0)), float(path.sigma(t0))
    dist = torch.distributions.MultivariateNormal(a0 * MU, a0**2 * SIGMA + s0**2 * torch.eye(2, dtype=D))
    torch.manual_seed(seed)
    return dist.sample((n,)), dist


def check_moments(x, n_sigma=4.5):
    n = x.shape[0]
    se_mean = SIGMA.diagonal().sqrt() / math.sqrt(n)
    assert ((x.mean(0) - MU).abs() < n_sigma * se_mean).all(), (x.mean(0), MU)
    cov = torch.cov(x.T)
    se_cov = torch.sqrt((SIGMA**2 + torch.outer(SIGMA.diagonal(), SIGMA.diagonal())) / n)
    assert ((cov - SIGMA).abs() < n_sigma * se_cov).all(), (cov, SIGMA)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("kind", KINDS)
def test_gaussian_pf_ode_moments_and_likelihood(schedule, kind):
    sch = scheduler(schedule, prediction_type=kind if kind != "score" else "epsilon")
    path = DiscreteSchedulePath.from_scheduler(sch)
    flow = ProbabilityFlow.from_diffusers(gaussian_model(path, kind), sch, prediction_type=kind)
    x0, prior = exact_prior(path, 3000, seed=0)
    check_moments(flow.sample(x0, 24, "heun").x)
    # log-likelihood of the field = closed-form log N(x; mu, Sigma), once the exact p_0 replaces N(0, I)
    x1 = MU + torch.randn(6, 2, dtype=D, generator=torch.Generator().manual_seed(1)) @ CHOL.T
    out = flow.log_likelihood(x1, solver="dopri5", estimator="exact")
    logp = out.log_prob - gaussian_log_density(out.x_0) + prior.log_prob(out.x_0)
    ref = torch.distributions.MultivariateNormal(MU, SIGMA).log_prob(x1)
    assert torch.allclose(logp, ref, atol=5e-3), (logp - ref)


@pytest.mark.parametrize("solver,steps", [("euler", 64), ("midpoint", 16), ("multistep", 32), ("dopri5", 1)])
def test_every_solver_samples_the_gaussian(solver, steps):
    sch = scheduler("linear")
    path = DiscreteSchedulePath.from_scheduler(sch)
    flow = ProbabilityFlow.from_diffusers(gaussian_model(path, "epsilon"), sch)
    x0, _ = exact_prior(path, 3000, seed=2)
    check_moments(flow.sample(x0, steps, solver).x)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_stochastic_family_keeps_the_marginals(eta):
    sch = scheduler("linear")
    path = DiscreteSchedulePath.from_scheduler(sch)
    flow = ProbabilityFlow.from_diffusers(gaussian_model(path, "v_prediction"), sch, prediction_type="v_prediction")
    x0, _ = exact_prior(path, 3000, seed=3)
    out = flow.sample(x0, 200, "euler", eta=eta, generator=torch.Generator().manual_seed(0))
    check_moments(out.x)
    assert out.nfe == 200
    with pytest.raises(ValueError, match="Euler"):
        flow.sample(x0, 10, "heun", eta=eta)


def mixture_model(path, weights, means, stds):
    """Exact score of p_t for an isotropic 1-D... 2-D Gaussian mixture sum_k w_k N(m_k, s_k^2 I)."""

    def score(x, u):
        t = 1 - (u.to(D) + 1) / path.num_train_timesteps
        a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]
        var = a**2 * stds[None] ** 2 + s**2  # (B, K)
        diff = x[:, None, :] - a[:, :, None] * means[None]  # (B, K, 2)
        logw = weights.log()[None] - diff.pow(2).sum(-1) / (2 * var) - var.log()
        r = torch.softmax(logw, dim=1)
        return (r[..., None] * (-diff / var[..., None])).sum(1)

    return score


def test_gaussian_mixture_pf_ode_moments_and_likelihood():
    weights = torch.tensor([0.3, 0.7], dtype=D)
    means = torch.tensor([[-1.5, 0.0], [1.0, 1.0]], dtype=D)
    stds = torch.tensor([0.3, 0.5], dtype=D)
    sch = scheduler("linear")
    path = DiscreteSchedulePath.from_scheduler(sch)
    flow = ProbabilityFlow.from_diffusers(mixture_model(path, weights, means, stds), sch, prediction_type="score")
    a0, s0 = float(path.alpha(torch.zeros(1, dtype=D))), float(path.sigma(torch.zeros(1, dtype=D)))
    comps = torch.distributions.Independent(torch.distributions.Normal(a0 * means, (a0**2 * stds[:, None] ** 2 + s0**2).sqrt().expand(2, 2)), 1)
    prior = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(weights), comps)
    torch.manual_seed(0)
    x = flow.sample(prior.sample((4000,)), 32, "heun").x
    mean = (weights[:, None] * means).sum(0)
    second = (weights[:, None, None] * (stds[:, None, None] ** 2 * torch.eye(2, dtype=D) + means[:, :, None] * means[:, None, :])).sum(0)
    cov = second - torch.outer(mean, mean)
    assert ((x.mean(0) - mean).abs() < 4.5 * cov.diagonal().sqrt() / math.sqrt(4000)).all()
    assert (torch.cov(x.T) - cov).abs().max() < 0.08
    # fraction of samples near each mode = its weight
    near = ((x[:, None] - means[None]).norm(dim=-1)).argmin(1)
    assert abs(float((near == 1).double().mean()) - 0.7) < 0.03
    data = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(weights), torch.distributions.Independent(torch.distributions.Normal(means, stds[:, None].expand(2, 2)), 1)
    )
    x1 = data.sample((6,))
    out = flow.log_likelihood(x1)
    logp = out.log_prob - gaussian_log_density(out.x_0) + prior.log_prob(out.x_0)
    assert torch.allclose(logp, data.log_prob(x1), atol=5e-3), (logp - data.log_prob(x1))


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_x0_and_eps_agree_with_ddpm_scheduler_arithmetic(kind):
    sch = scheduler("linear", prediction_type=kind)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, dtype=torch.float32, generator=g)
    pred = torch.randn(4, 3, dtype=torch.float32, generator=g)
    flow = ProbabilityFlow.from_diffusers(lambda x, u: pred.to(x.dtype), sch)
    for k in (0, 17, 500, 999):
        t = torch.full((4,), 1 - (k + 1) / 1000, dtype=D)
        ref = sch.step(pred, k, x, generator=torch.Generator().manual_seed(0)).pred_original_sample
        assert torch.allclose(flow.x1(x.double(), t).float(), ref, atol=2e-5, rtol=1e-4), k
        abar = sch.alphas_cumprod[k].double()
        eps = flow.epsilon(x.double(), t)
        assert torch.allclose(eps, (x.double() - abar.sqrt() * ref.double()) / (1 - abar).sqrt(), atol=1e-3)
        assert torch.allclose(flow.score(x.double(), t), -eps / (1 - abar).sqrt(), atol=1e-6)


def test_velocity_matches_wgf_formula():
    """v = (a'/a) x + (a' s^2 / a - s' s) score (reference: wgf.md), coefficients by finite differences of abar."""
    sch = scheduler("linear")
    path = DiscreteSchedulePath.from_scheduler(sch)
    g = torch.Generator().manual_seed(6)
    x, eps = torch.randn(5, 2, dtype=D, generator=g), torch.randn(5, 2, dtype=D, generator=g)
    flow = ProbabilityFlow.from_diffusers(lambda x, u: eps, sch)
    t = torch.full((5,), 0.4003, dtype=D)
    h = 1e-7
    a = lambda t: path.alpha(t)  # noqa: E731
    s = lambda t: path.sigma(t)  # noqa: E731
    da, ds = (a(t + h) - a(t - h)) / (2 * h), (s(t + h) - s(t - h)) / (2 * h)
    score = -eps / s(t)[:, None]
    ref = (da / a(t))[:, None] * x + (da * s(t) ** 2 / a(t) - ds * s(t))[:, None] * score
    assert torch.allclose(flow.velocity(x, t), ref, rtol=1e-5)
    # and g^2 / 2 is that score coefficient
    assert torch.allclose(0.5 * diffusion_coefficient(path, t, x)[:, 0], da * s(t) ** 2 / a(t) - ds * s(t), rtol=1e-5)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_one_multistep_step_is_one_ddim_step(schedule):
    """DDIMScheduler.step(eta=0) between two timesteps == flowlab's first-order multistep step on the same
    grid (both are the exponential integrator of the PF-ODE), and as DDIM's step shrinks it agrees with one
    Euler step of the flowlab velocity to second order (it integrates the same ODE)."""
    path = DiscreteSchedulePath.from_scheduler(scheduler(schedule))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 2, generator=g)
    w = torch.randn(2, 2, generator=g) * 0.3

    def model(x, u):  # any smooth eps model of (x, timestep)
        return torch.tanh(x @ w.to(x.dtype)) + 1e-3 * u[:, None]

    gaps = []
    for n_inf in (10, 100, 1000):
        sch = scheduler(schedule, cls=DDIMScheduler, set_alpha_to_one=True)
        sch.set_timesteps(n_inf)
        flow = ProbabilityFlow.from_diffusers(model, sch)
        field = lambda xx, tt: flow.velocity(xx, tt)  # noqa: E731
        ks = [int(v) for v in sch.timesteps[:2]] + [int(sch.timesteps[len(sch.timesteps) // 2]), int(sch.timesteps[-1])]
        for k in ks:
            prev = k - 1000 // n_inf
            ref = sch.step(model(x, torch.full((4,), float(k))), k, x, eta=0.0).prev_sample.double()
            t, t_next = 1 - (k + 1) / 1000, 1 - (prev + 1) / 1000
            ours = MultistepSolver(path).step(field, x.double(), t, t_next, 0, 1)
            assert torch.allclose(ours, ref, atol=2e-5), (n_inf, k, (ours - ref).abs().max())
        k = int(sch.timesteps[len(sch.timesteps) // 2])
        t, t_next = 1 - (k + 1) / 1000, 1 - (k - 1000 // n_inf + 1) / 1000
        ref = sch.step(model(x, torch.full((4,), float(k))), k, x, eta=0.0).prev_sample.double()
        euler = get_solver("euler").solve(field, x.double(), torch.tensor([t, t_next], dtype=D)).x
        gaps.append(float((euler - ref).abs().max() / (ref - x.double()).abs().max()))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < gaps[0] / 20, gaps


def test_schedule_path_reproduces_alphas_cumprod():
    sch = scheduler("squaredcos_cap_v2")
    path = DiscreteSchedulePath.from_scheduler(sch)
    k = torch.tensor([0, 1, 10, 500, 998, 999])
    t = 1 - (k.double() + 1) / 1000
    abar = sch.alphas_cumprod[k].double()
    assert torch.allclose(path.alpha(t) ** 2, abar, rtol=1e-6)
    assert torch.allclose(path.sigma(t) ** 2, 1 - abar, rtol=1e-5, atol=1e-12)
    one = torch.ones(1, dtype=D)
    assert float(path.alpha(one)) == 1.0 and float(path.sigma(one)) == 0.0
    # derivatives: finite differences inside a segment
    tt = torch.tensor([0.3337, 0.9012], dtype=D)
    h = 1e-8
    assert torch.allclose(path.d_alpha(tt), (path.alpha(tt + h) - path.alpha(tt - h)) / (2 * h), rtol=1e-5)
    assert torch.allclose(path.d_sigma(tt), (path.sigma(tt + h) - path.sigma(tt - h)) / (2 * h), rtol=1e-5)


def test_hutchinson_likelihood_is_unbiased_for_the_exact_field():
    sch = scheduler("linear")
    path = DiscreteSchedulePath.from_scheduler(sch)
    flow = ProbabilityFlow.from_diffusers(gaussian_model(path, "epsilon"), sch)
    _, prior = exact_prior(path, 1, seed=0)
    x1 = (MU + torch.tensor([0.3, -0.4], dtype=D)).expand(400, 2)
    out = flow.log_likelihood(x1, solver="heun", num_steps=24, estimator="hutchinson", generator=torch.Generator().manual_seed(0))
    logp = out.log_prob - gaussian_log_density(out.x_0) + prior.log_prob(out.x_0)
    ref = float(torch.distributions.MultivariateNormal(MU, SIGMA).log_prob(x1[:1]))
    assert logp.std() > 1e-3  # the probes differ
    assert abs(float(logp.mean()) - ref) < 4 * float(logp.std()) / 20 + 5e-3
