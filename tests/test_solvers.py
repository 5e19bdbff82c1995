"""ODE solvers on fields with closed-form solutions: convergence order, NFE, trajectories,
time grids, Gaussian sampling against the exact transport map, and inversion."""
import math

import pytest
import torch

from flowlab.flow import (
    SOLVERS,
    CosinePath,
    Dopri5Solver,
    EulerSolver,
    HeunSolver,
    LinearPath,
    MidpointSolver,
    MultistepSolver,
    get_path,
    get_solver,
    shift_t,
    steps_for_nfe,
    time_grid,
)

A, B = 0.7, -0.4


def linear_field(x, t):
    """v(x, t) = (A + 2 B t) x, so x(1) = x(0) exp(A + B). Time-dependent on purpose: a solver that
    evaluates the field at the wrong stage time loses its order."""
    return (A + 2 * B * t)[:, None] * x


X0 = torch.tensor([[1.0, -0.5], [0.3, 2.0]], dtype=torch.float64)
X1_EXACT = X0 * math.exp(A + B)


def gaussian_field(path, mu, s):
    """Exact marginal velocity E[d_alpha x1 + d_sigma x0 | x_t] for data N(mu, s^2 I) on an affine path.

    p_t = N(a mu, V I), V = a^2 s^2 + sigma^2; E[x1 | x] = mu + a s^2 / V (x - a mu),
    E[x0 | x] = sigma / V (x - a mu). On the linear path this is
    v = mu + (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2) (x - t mu), the time derivative of the
    Gaussian interpolation x_t = t mu + sqrt(V_t) z, so the flow map from t = 0 is x_1 = mu + s x_0.
    """

    def field(x, t):
        a, sg, da, ds = path.coefficients(t, x)
        var = a**2 * s**2 + sg**2
        return da * (mu + a * s**2 / var * (x - a * mu)) + ds * (sg / var * (x - a * mu))

    return field


MU = torch.tensor([2.0, -1.0], dtype=torch.float64)
S = 0.8


def _noise(n=4000, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _err(solver, field, x0, exact, n):
    return (solver.solve(field, x0, time_grid(n)).x - exact).abs().max().item()


# --------------------------------------------------------------------------- time grid


def test_time_grid_endpoints_and_spacing():
    """N + 1 points from 0 to 1, uniform, float64; custom endpoints (also decreasing)."""
    g = time_grid(10)
    assert g.shape == (11,) and g.dtype == torch.float64
    assert g[0].item() == 0.0 and g[-1].item() == 1.0
    torch.testing.assert_close(g.diff(), torch.full((10,), 0.1, dtype=torch.float64))
    r = time_grid(4, t_start=1.0, t_end=0.0)
    torch.testing.assert_close(r, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        time_grid(0)


def test_time_grid_shift():
    """shift is applied to the uniform grid with shift_t; endpoints stay; shift > 1 takes smaller steps near noise."""
    g = time_grid(8, shift=3.0)
    torch.testing.assert_close(g, shift_t(torch.linspace(0, 1, 9, dtype=torch.float64), 3.0))
    assert g[0].item() == 0.0 and g[-1].item() == 1.0
    assert torch.all(g.diff() > 0)
    assert g[1].item() < 1 / 8 and g.diff()[0] < g.diff()[-1]


# --------------------------------------------------------------------------- accuracy and order


def test_euler_first_order():
    """Euler: halving the step halves the error."""
    e32, e64 = (_err(EulerSolver(), linear_field, X0, X1_EXACT, n) for n in (32, 64))
    assert 1.8 < e32 / e64 < 2.2


@pytest.mark.parametrize("solver_cls", [MidpointSolver, HeunSolver])
def test_second_order_solvers(solver_cls):
    """Midpoint and Heun: halving the step divides the error by ~4."""
    e32, e64 = (_err(solver_cls(), linear_field, X0, X1_EXACT, n) for n in (32, 64))
    assert 3.5 < e32 / e64 < 4.5
    assert e64 < 1e-4


def test_dopri5_accuracy():
    """Adaptive dopri5 (rtol = atol = 1e-5) reaches 1e-5 and reports the NFE it used."""
    out = Dopri5Solver().solve(linear_field, X0, time_grid(1))
    torch.testing.assert_close(out.x, X1_EXACT, rtol=0, atol=1e-5)
    assert out.nfe > 6


# --------------------------------------------------------------------------- bookkeeping


@pytest.mark.parametrize("name,per_step", [("euler", 1), ("midpoint", 2), ("heun", 2), ("multistep", 1)])
def test_nfe_and_trajectory(name, per_step):
    """NFE is exact (euler / multistep: N, midpoint / heun: 2N); the trajectory has N + 1 states from x0 to x."""
    calls = []

    def field(x, t):
        calls.append(t.shape)
        assert t.shape == (x.shape[0],)
        return linear_field(x, t)

    n = 7
    out = get_solver(name).solve(field, X0, time_grid(n), return_trajectory=True)
    assert out.nfe == per_step * n == len(calls) == SOLVERS[name].nfe_per_step * n
    assert len(out.trajectory) == n + 1 and out.trajectory[0] is X0
    assert torch.equal(out.trajectory[-1], out.x)
    assert get_solver(name).solve(linear_field, X0, time_grid(n)).trajectory is None
    assert steps_for_nfe(name, per_step * n) == n


def test_dopri5_trajectory_at_requested_times():
    """dopri5 returns states at the requested grid times when asked for a trajectory."""
    grid = time_grid(4)
    out = Dopri5Solver().solve(linear_field, X0, grid, return_trajectory=True)
    assert len(out.trajectory) == 5
    for tk, xk in zip(grid.tolist(), out.trajectory):
        torch.testing.assert_close(xk, X0 * math.exp(A * tk + B * tk**2), rtol=1e-5, atol=1e-5)


def test_solver_registry_errors():
    """Unknown solvers and NFE budgets that do not fit raise ValueError."""
    with pytest.raises(ValueError):
        get_solver("rk4")
    with pytest.raises(ValueError):
        steps_for_nfe("heun", 7)
    with pytest.raises(ValueError):
        steps_for_nfe("dopri5", 60)


# --------------------------------------------------------------------------- Gaussian data


@pytest.mark.parametrize(
    "name,steps,tol", [("euler", 200, 0.03), ("midpoint", 16, 1e-3), ("heun", 16, 2e-3), ("multistep", 32, 0.02), ("dopri5", 1, 1e-4)]
)
def test_gaussian_sampling_matches_data(name, steps, tol):
    """Sampling N(mu, s^2 I) with the exact linear-path field from x0 ~ N(0, I): each sample lands on the exact
    transport map mu + s x0, and the sample mean / std match mu and s (up to the Monte-Carlo error of x0)."""
    x0 = _noise()
    path = LinearPath()
    x = get_solver(name, path=path).solve(gaussian_field(path, MU, S), x0, time_grid(steps)).x
    exact = MU + S * x0
    assert (x - exact).abs().max().item() < tol
    torch.testing.assert_close(x.mean(0), exact.mean(0), rtol=0, atol=tol)
    torch.testing.assert_close(x.std(0), exact.std(0), rtol=0, atol=tol)
    mc = 4 * S / math.sqrt(x0.shape[0])  # 4 standard errors of the mean of the x0 sample
    torch.testing.assert_close(x.mean(0), MU, rtol=0, atol=tol + mc)
    torch.testing.assert_close(x.std(0), torch.full((2,), S, dtype=torch.float64), rtol=0, atol=tol + mc)


def test_multistep_beats_euler_at_8_steps():
    """Linear path, 8 NFE each: DPM-Solver++(2M) is far closer to the exact transport map than Euler
    (>= 10x in the worst sample and in the std)."""
    path = LinearPath()
    x0 = _noise(seed=1)
    field, exact = gaussian_field(path, MU, S), MU + S * x0
    x_euler = EulerSolver().solve(field, x0, time_grid(8)).x
    x_ms = MultistepSolver(path).solve(field, x0, time_grid(8)).x
    err_euler, err_ms = (x_euler - exact).abs().max().item(), (x_ms - exact).abs().max().item()
    assert err_ms < 0.05 and err_euler > 10 * err_ms
    std_err = lambda x: (x.std(0) - exact.std(0)).abs().max().item()  # noqa: E731
    assert std_err(x_ms) < 0.01 and std_err(x_euler) > 10 * std_err(x_ms)


def test_multistep_beats_euler_cosine_path():
    """Cosine path, 16 NFE each: multistep (built on the cosine path's log-SNR) is >= 10x closer than Euler.
    (At 8 uniform steps the first-order final step onto sigma = 0 dominates and the two are comparable.)"""
    path = CosinePath()
    x0 = _noise(seed=1)
    field, exact = gaussian_field(path, MU, S), MU + S * x0
    err_euler = (EulerSolver().solve(field, x0, time_grid(16)).x - exact).abs().max().item()
    err_ms = (MultistepSolver(path).solve(field, x0, time_grid(16)).x - exact).abs().max().item()
    assert err_ms < 0.01 and err_euler > 10 * err_ms


def _dpm_solver_pp_2m_reference(path, field, x, times):
    """DPM-Solver++(2M) written out from Lu et al. (2022), Alg. 2, in data prediction with
    lambda = log(alpha / sigma): first order (DDIM) on the first step, after a point with alpha = 0,
    and on the last step; x1_hat from the velocity by x1 = (ds x - s v) / (a ds - s da)."""
    tt = lambda t: torch.tensor([t], dtype=torch.float64)  # noqa: E731
    coef = lambda t: (path.alpha(tt(t)).item(), path.sigma(tt(t)).item())  # noqa: E731
    lam = lambda t: math.log(coef(t)[0] / coef(t)[1])  # noqa: E731
    ts, n, prev = times.tolist(), len(times) - 1, None
    for i in range(n):
        (a_s, s_s), (a_t, s_t) = coef(ts[i]), coef(ts[i + 1])
        tb = torch.full((x.shape[0],), ts[i], dtype=x.dtype)
        a, s, da, ds = path.coefficients(tb, x)
        x1 = (ds * x - s * field(x, tb)) / (a * ds - s * da)
        if i == 0 or i == n - 1 or coef(ts[i - 1])[0] == 0:
            x_next = x1 if s_t == 0 else s_t / s_s * x + a_t * (1 - a_s * s_t / (s_s * a_t)) * x1
        else:
            h, h_prev = lam(ts[i + 1]) - lam(ts[i]), lam(ts[i]) - lam(ts[i - 1])
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x1 - 1 / (2 * r) * prev
            x_next = s_t / s_s * x - a_t * math.expm1(-h) * d
        x, prev = x_next, x1
    return x


@pytest.mark.parametrize("path_name", ["linear", "cosine", "vp"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_multistep_matches_reference_dpm_solver(path_name, shift):
    """MultistepSolver equals an independent transcription of DPM-Solver++(2M) on every path."""
    path = get_path(path_name)
    x0 = _noise(200, seed=5)
    grid = time_grid(12, shift=shift)
    out = MultistepSolver(path).solve(gaussian_field(path, MU, S), x0, grid).x
    ref = _dpm_solver_pp_2m_reference(path, gaussian_field(path, MU, S), x0, grid)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_multistep_convergence_gaussian():
    """DPM-Solver++(2M) error on the Gaussian problem falls faster than first order (>= 6x per 4x steps at
    16 -> 64 steps)."""
    path = LinearPath()
    x0 = _noise(2000, seed=2)
    field, exact = gaussian_field(path, MU, S), MU + S * x0
    e16, e64 = (_err(MultistepSolver(path), field, x0, exact, n) for n in (16, 64))
    assert e16 / e64 > 6 and e64 < 5e-3


def test_multistep_vp_path():
    """On the VP path (alpha_0 > 0), multistep transports p_0 = N(alpha_0 mu, V_0 I) to the data:
    x_1 = mu + s (x_0 - alpha_0 mu) / sqrt(V_0)."""
    path = get_path("vp")
    x0 = _noise(2000, seed=3)
    t0 = torch.zeros(1, dtype=torch.float64)
    a0, s0 = path.alpha(t0), path.sigma(t0)
    exact = MU + S * (x0 - a0 * MU) / torch.sqrt(a0**2 * S**2 + s0**2)
    x = MultistepSolver(path).solve(gaussian_field(path, MU, S), x0, time_grid(64)).x
    assert (x - exact).abs().max().item() < 0.01


def test_multistep_rejects_backward():
    """The multistep solver samples only (increasing t)."""
    with pytest.raises(ValueError):
        MultistepSolver().solve(linear_field, X0, time_grid(4).flip(0))


@pytest.mark.parametrize("name", ["heun", "midpoint", "dopri5"])
def test_backward_integration_inverts_forward(name):
    """Integrating forward (noise -> data) then backward on the reversed grid recovers x0 to ~1e-4."""
    path = LinearPath()
    field = gaussian_field(path, MU, S)
    x0 = _noise(500, seed=4)
    solver = get_solver(name)
    grid = time_grid(100)
    x1 = solver.solve(field, x0, grid).x
    back = solver.solve(field, x1, grid.flip(0)).x
    torch.testing.assert_close(back, x0, rtol=0, atol=1e-4)
    # and backward from the exact data point lands on the exact latent
    torch.testing.assert_close(solver.solve(field, MU + S * x0, grid.flip(0)).x, x0, rtol=0, atol=1e-3)
