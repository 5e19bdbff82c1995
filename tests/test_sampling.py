"""The one sampling entry (flowlab.flow.sampling.sample), get_solver's full signature, and the
same-marginal SDE family (flowlab.flow.sde.MarginalSDE): the noise_level <-> eta relation on each
path against closed forms, marginal preservation for both parameterisations, and FlowGRPO's step
kept bit-compatible with its published arithmetic."""
import math

import pytest
import torch

from flowlab.flow import CosinePath, LinearPath, VPPath, get_solver
from flowlab.flow.conventions import t_to_sigma, velocity_to_diffusers
from flowlab.flow.paths import expand_like
from flowlab.flow.sampling import sample
from flowlab.flow.sde import MarginalSDE, diffusion_coefficient, flow_sde_step, gaussian_log_prob, sample_flow_sde
from flowlab.flow.solvers import Dopri5Solver, EulerSolver, MultistepSolver, time_grid

D = torch.float64
M, S = 1.5, 0.5  # data N(M, S^2) in 1-D


def gaussian_velocity_and_score(path):
    """Exact velocity and score of p_t for data N(M, S^2) on ``path`` (``x_t = a x1 + s eps``)."""

    def both(x, t):
        tt = expand_like(t.to(D), x)
        a, s, da, ds = path.alpha(tt), path.sigma(tt), path.d_alpha(tt), path.d_sigma(tt)
        var = a**2 * S**2 + s**2
        e1 = M + a * S**2 * (x.to(D) - a * M) / var
        e0 = s * (x.to(D) - a * M) / var
        return (da * e1 + ds * e0).to(x.dtype), (-(x.to(D) - a * M) / var).to(x.dtype)

    return both


def marginal(path, t):
    tt = torch.tensor([t], dtype=D)
    a, s = float(path.alpha(tt)), float(path.sigma(tt))
    return a * M, math.sqrt(a**2 * S**2 + s**2)


# ----------------------------------------------------------------------------- get_solver
def test_get_solver_takes_every_setting_and_uses_what_applies():
    path = CosinePath()
    for name in ("euler", "midpoint", "heun"):
        assert get_solver(name, path=path, rtol=1e-3, atol=1e-4).name == name
    ms = get_solver("multistep", path=path, rtol=1e-3, atol=1e-4)
    assert isinstance(ms, MultistepSolver) and ms.path is path
    assert isinstance(get_solver("multistep").path, LinearPath)
    dp = get_solver("dopri5", path=path, rtol=1e-3, atol=1e-4)
    assert isinstance(dp, Dopri5Solver) and (dp.rtol, dp.atol) == (1e-3, 1e-4)
    for bad in (0.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="rtol"):
            get_solver("dopri5", rtol=bad)
    with pytest.raises(ValueError, match="unknown solver 'rk4'"):
        get_solver("rk4", path=path)


# ----------------------------------------------------------------------------- sample()
def _field(x, t):
    return torch.sin(3 * x) - t[:, None] * x


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun", "multistep", "dopri5"])
def test_sample_ode_is_the_solver(solver):
    x0 = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=D)
    path = CosinePath()
    grid = time_grid(6, shift=2.0)
    ref = get_solver(solver, path=path, rtol=1e-6, atol=1e-7).solve(_field, x0, grid, return_trajectory=True)
    out = sample(_field, x0, solver=solver, num_steps=6, shift=2.0, path=path, rtol=1e-6, atol=1e-7, return_trajectory=True)
    assert torch.equal(out.x, ref.x) and out.nfe == ref.nfe and out.log_probs is None
    assert torch.equal(out.states, torch.stack(ref.trajectory))
    assert torch.equal(sample(_field, x0, solver=solver, times=grid, path=path, rtol=1e-6, atol=1e-7).x, ref.x)


def test_sample_rejects_bad_arguments():
    x0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="exactly one of num_steps and times"):
        sample(_field, x0)
    with pytest.raises(ValueError, match="exactly one of num_steps and times"):
        sample(_field, x0, num_steps=3, times=time_grid(3))
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1, got 0"):
        sample(_field, x0, num_steps=0)
    sde = MarginalSDE.from_eta(LinearPath(), 1.0)
    with pytest.raises(ValueError, match="Euler–Maruyama: pass solver='euler', not 'heun'"):
        sample(_field, x0, num_steps=3, solver="heun", sde=sde)
    with pytest.raises(ValueError, match=r"noises must have shape \(3, 2, 3\)"):
        sample(_field, x0, num_steps=3, sde=sde, noises=torch.zeros(2, 2, 3))
    with pytest.raises(ValueError, match="return_trajectory=True"):
        sample(_field, x0, num_steps=3).states
    with pytest.raises(ValueError, match="exactly one of eta and noise_level"):
        MarginalSDE(LinearPath())
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        MarginalSDE(LinearPath(), eta=-0.1)
    with pytest.raises(ValueError, match="t_cap"):
        MarginalSDE.flowgrpo(0.7).diffusion(torch.tensor([0.5]))


# ----------------------------------------------------------------------------- the SDE family
T = torch.linspace(0.02, 0.98, 49, dtype=D)


def test_linear_path_noise_level_is_sqrt2_eta():
    """Linear path: g^2 = 2 (1 - t) / t, so FlowGRPO's eps = a sqrt((1 - t)/t) is eta = a / sqrt(2) at every t;
    with matched settings the two parameterisations have the same diffusion, drift and Gaussian step."""
    path = LinearPath()
    torch.testing.assert_close(diffusion_coefficient(path, T, T), 2 * (1 - T) / T, rtol=1e-13, atol=0)
    a = 0.7
    grpo, wgf = MarginalSDE.flowgrpo(a, path), MarginalSDE.from_eta(path, a / math.sqrt(2))
    torch.testing.assert_close(grpo.diffusion(T, t_cap=0.1), wgf.diffusion(T), rtol=1e-13, atol=0)
    torch.testing.assert_close(grpo.diffusion(T, t_cap=0.1), a * torch.sqrt((1 - T) / T), rtol=1e-13, atol=0)
    # drift = v + (eps^2 / 2) score with the exact velocity and score of a Gaussian target
    both = gaussian_velocity_and_score(path)
    x = torch.randn(T.shape[0], 1, generator=torch.Generator().manual_seed(0), dtype=D) * 2
    v, score = both(x, T)
    exact = v + 0.5 * (a**2 * (1 - T) / T)[:, None] * score
    torch.testing.assert_close(grpo.drift(x, v, T, t_cap=0.1), exact, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(wgf.drift(x, v, T), exact, rtol=1e-10, atol=1e-12)
    # one step: same mean and std
    t_next = T + 0.01
    for f, g in zip(grpo.transition(T, t_next, 0.1), wgf.transition(T, t_next)):
        torch.testing.assert_close(f, g, rtol=1e-12, atol=1e-15)
    # eta = 0 / noise_level = 0: an Euler step of the ODE
    c_x, c_v, std = MarginalSDE.from_eta(path, 0.0).transition(T, t_next)
    assert torch.equal(c_x, torch.ones_like(T)) and torch.equal(std, torch.zeros_like(T))
    torch.testing.assert_close(c_v, t_next - T, rtol=1e-12, atol=0)


def test_cosine_path_relation_depends_on_time():
    """Cosine path: g^2 = pi cot(pi t / 2), so FlowGRPO's noise level a is eta(t)^2 = a^2 (1 - t) tan(pi t/2) / (pi t)."""
    path = CosinePath()
    torch.testing.assert_close(diffusion_coefficient(path, T, T), math.pi / torch.tan(0.5 * math.pi * T), rtol=1e-12, atol=1e-12)
    a = 0.7
    grpo = MarginalSDE.flowgrpo(a, path)
    eta_t = torch.sqrt(a**2 * (1 - T) * torch.tan(0.5 * math.pi * T) / (math.pi * T))
    torch.testing.assert_close(grpo.diffusion(T, t_cap=0.1), eta_t * torch.sqrt(diffusion_coefficient(path, T, T)), rtol=1e-12, atol=0)
    assert abs(float(eta_t[0]) ** 2 - a**2 / 2) < 0.01 and abs(float(eta_t[-1]) ** 2 - 2 * a**2 / math.pi**2) < 0.01
    # at each t, the eta-family member with eta = eta(t) is the same SDE
    x = torch.randn(T.shape[0], 1, generator=torch.Generator().manual_seed(1), dtype=D)
    v, _ = gaussian_velocity_and_score(path)(x, T)
    for i in (0, 24, 48):
        wgf = MarginalSDE.from_eta(path, float(eta_t[i]))
        ti = T[i : i + 1]
        torch.testing.assert_close(grpo.drift(x[i : i + 1], v[i : i + 1], ti, t_cap=0.1), wgf.drift(x[i : i + 1], v[i : i + 1], ti), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", [LinearPath(), CosinePath(), VPPath()], ids=["linear", "cosine", "vp"])
def test_both_parameterisations_keep_the_marginals(path):
    """Euler-Maruyama with the exact velocity of a Gaussian target: for eta = 0.8 and for FlowGRPO's
    noise_level = 0.7 the state at mid-grid has the path's marginal and the end is N(M, S^2)."""
    v_only = lambda x, t: gaussian_velocity_and_score(path)(x, t)[0]  # noqa: E731
    n, K = 20000, 400
    times = time_grid(K)
    t0 = torch.zeros(1, dtype=D)
    m0, s0 = float(path.alpha(t0)) * M, math.sqrt(float(path.alpha(t0)) ** 2 * S**2 + float(path.sigma(t0)) ** 2)
    x0 = m0 + s0 * torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=D)
    for sde in (MarginalSDE.from_eta(path, 0.8), MarginalSDE.flowgrpo(0.7, path)):
        out = sample(v_only, x0, times=times, sde=sde, generator=torch.Generator().manual_seed(1), return_trajectory=True)
        assert out.nfe == K and out.log_probs.shape == (K, n)
        mid_m, mid_s = marginal(path, float(times[K // 2]))
        mid = out.trajectory[K // 2]
        assert abs(mid.mean().item() - mid_m) < 0.03 and abs(mid.std().item() - mid_s) < 0.03, (sde, mid.mean(), mid.std())
        assert abs(out.x.mean().item() - M) < 0.03 and abs(out.x.std().item() - S) < 0.03, (sde, out.x.mean(), out.x.std())
        # the noise actually moves samples: the SDE differs from the ODE sample by O(1)
        ode = sample(v_only, x0, times=times, solver="euler").x
        assert (out.x - ode).abs().mean() > 0.05


def test_eta_family_last_step_is_its_mean_and_flowgrpo_is_not():
    path = LinearPath()
    x0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=D)
    noises = torch.randn(5, 4, 2, generator=torch.Generator().manual_seed(1), dtype=D)
    wgf = sample(_field, x0, num_steps=5, sde=MarginalSDE.from_eta(path, 1.0), noises=noises, return_trajectory=True)
    last = MarginalSDE.from_eta(path, 1.0).step(wgf.trajectory[-2], _field(wgf.trajectory[-2], torch.full((4,), 0.8, dtype=D)), 0.8, 1.0)
    assert torch.equal(wgf.x, last.mean) and torch.equal(wgf.log_probs[-1], torch.zeros(4, dtype=D))
    grpo = sample(_field, x0, num_steps=5, sde=MarginalSDE.flowgrpo(0.7, path), noises=noises)
    assert torch.isfinite(grpo.log_probs).all() and (grpo.log_probs[-1] != 0).all()


# ----------------------------------------------------------------------------- FlowGRPO bit-compatibility
def _published_flowgrpo_step(x, u, t, t_next, a, t_cap, x_next):
    """FlowGRPO's step exactly as flowlab wrote it before the family (diffusers sigma, float64 coefficients)."""
    B = x.shape[0]
    t = torch.as_tensor(t, dtype=D).expand(B)
    t_next = torch.as_tensor(t_next, dtype=D).expand(B)
    sigma, sigma_next = t_to_sigma(t), t_to_sigma(t_next)
    d = sigma_next - sigma
    denom = torch.where(sigma >= 1.0, torch.as_tensor(t_to_sigma(t_cap), dtype=D), sigma)
    s = a * torch.sqrt(sigma / (1.0 - denom))
    v = velocity_to_diffusers(u)
    c_x = expand_like((1 + s**2 * d / (2 * sigma)).to(x.dtype), x)
    c_v = expand_like(((1 + s**2 * (1 - sigma) / (2 * sigma)) * d).to(x.dtype), x)
    mean = x * c_x + v * c_v
    std = (s * torch.sqrt(-d)).to(x.dtype)
    return mean, std, gaussian_log_prob(x_next, mean, std)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [10, 40])
def test_flowgrpo_step_is_bit_compatible_in_float32(shift, steps):
    """float32 (what RL trains in): mean, std and log-probability identical to the bit, at every grid
    step, with float and per-sample tensor times; float64 within one rounding."""
    grid = time_grid(steps, shift=shift)
    g = torch.Generator().manual_seed(steps)
    for dtype in (torch.float32, torch.float64):
        n = 32
        x = torch.randn(steps * n, 2, 4, generator=g).to(dtype)
        u = torch.randn(steps * n, 2, 4, generator=g).to(dtype)
        x_next = torch.randn(steps * n, 2, 4, generator=g).to(dtype)
        t = grid[:-1].repeat_interleave(n)
        t_next = grid[1:].repeat_interleave(n)
        for tt, tn in ((t, t_next), (t.to(dtype), t_next.to(dtype))):
            new = flow_sde_step(x, u, tt, tn, 0.7, float(grid[1]), x_next=x_next)
            old = _published_flowgrpo_step(x, u, tt, tn, 0.7, float(grid[1]), x_next)
            if dtype == torch.float32:
                assert torch.equal(new.mean, old[0]) and torch.equal(new.std, old[1]) and torch.equal(new.log_prob, old[2])
            else:
                torch.testing.assert_close(new.mean, old[0], rtol=1e-14, atol=1e-15)
                assert torch.equal(new.std, old[1])
                torch.testing.assert_close(new.log_prob, old[2], rtol=1e-12, atol=1e-12)


def test_flowgrpo_sampler_is_the_family_through_sample():
    grid = time_grid(10, shift=3.0)
    x0 = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    noises = torch.randn(10, 8, 3, generator=torch.Generator().manual_seed(1))
    traj = sample_flow_sde(_field, x0, grid, 0.7, noises=noises)
    out = sample(_field, x0, times=grid, sde=MarginalSDE.flowgrpo(0.7), noises=noises, return_trajectory=True)
    assert torch.equal(traj.states, out.states) and torch.equal(traj.log_probs, out.log_probs) and torch.equal(traj.x, out.x)
    # replaying each stored transition gives back its log-probability (training recomputes them)
    for k in range(10):
        t = torch.full((8,), float(grid[k]))
        step = flow_sde_step(traj.states[k], _field(traj.states[k], t), float(grid[k]), float(grid[k + 1]), 0.7, float(grid[1]), x_next=traj.states[k + 1])
        assert torch.equal(step.log_prob, traj.log_probs[k])
    # noise_level 0 is the Euler ODE sample
    ode = EulerSolver().solve(_field, x0, grid).x
    torch.testing.assert_close(sample(_field, x0, times=grid, sde=MarginalSDE.flowgrpo(0.0), noises=noises).x, ode, rtol=1e-5, atol=1e-6)
