"""flowlab <-> diffusers conventions, checked against diffusers' FlowMatchEulerDiscreteScheduler.

flowlab: t = 0 noise, t = 1 data, velocity x1 - x0. diffusers: sigma = 1 - t, target eps - x0,
timestep = sigma * num_train_timesteps.
"""
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowlab.flow import (
    EulerSolver,
    LinearPath,
    diffusers_to_velocity,
    shift_sigma,
    shift_t,
    sigma_to_t,
    t_to_sigma,
    t_to_timestep,
    time_grid,
    timestep_to_t,
    velocity_to_diffusers,
)

SHIFT = 3.0


def _sd3_shift(sigma, s):
    """SD3 (Esser et al. 2024, eq. 23) resolution shift, written out independently."""
    return s * sigma / (1 + (s - 1) * sigma)


def test_time_sigma_round_trip():
    """t <-> sigma = 1 - t, both ways, endpoints swapped."""
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(t_to_sigma(t), 1 - t)
    torch.testing.assert_close(sigma_to_t(t_to_sigma(t)), t)
    torch.testing.assert_close(t_to_sigma(sigma_to_t(t)), t)
    assert t_to_sigma(0.0) == 1.0 and t_to_sigma(1.0) == 0.0


def test_velocity_diffusers_sign_flip():
    """flowlab velocity x1 - x0 is minus diffusers' target eps - x0; the conversion round-trips."""
    g = torch.Generator().manual_seed(0)
    x_data, eps = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    v = x_data - eps  # flowlab: x0 = eps (noise), x1 = data
    torch.testing.assert_close(velocity_to_diffusers(v), eps - x_data)
    torch.testing.assert_close(diffusers_to_velocity(eps - x_data), v)
    torch.testing.assert_close(diffusers_to_velocity(velocity_to_diffusers(v)), v)


def test_timestep_round_trip():
    """timestep = (1 - t) * N and back, for the default and a custom N."""
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(t_to_timestep(t), (1 - t) * 1000)
    torch.testing.assert_close(timestep_to_t(t_to_timestep(t)), t)
    torch.testing.assert_close(timestep_to_t(t_to_timestep(t, 500), 500), t)
    assert t_to_timestep(0.0) == 1000 and t_to_timestep(1.0) == 0


def test_shift_formulas():
    """shift_sigma is SD3's shift; shift_t = 1 - shift_sigma(1 - t); endpoints fixed; s > 1 moves t towards noise;
    shifting by s then 1/s is the identity (the shift multiplies the odds sigma / (1 - sigma) by s)."""
    sigma = torch.linspace(0, 1, 21, dtype=torch.float64)
    for s in (0.5, 1.0, SHIFT):
        torch.testing.assert_close(shift_sigma(sigma, s), _sd3_shift(sigma, s))
        torch.testing.assert_close(shift_t(1 - sigma, s), 1 - _sd3_shift(sigma, s))
        torch.testing.assert_close(shift_t(shift_t(sigma, s), 1 / s), sigma)
    inner = sigma[1:-1]
    torch.testing.assert_close(shift_sigma(inner, SHIFT) / (1 - shift_sigma(inner, SHIFT)), SHIFT * inner / (1 - inner))
    assert torch.all(shift_t(inner, SHIFT) < inner)
    assert shift_t(torch.tensor(0.0), SHIFT) == 0 and shift_t(torch.tensor(1.0), SHIFT) == 1


def test_shift_matches_scheduler_training_sigmas():
    """diffusers' training sigmas (before set_timesteps) are shift_sigma of (1000..1) / 1000."""
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    base = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    torch.testing.assert_close(sched.sigmas.double(), shift_sigma(base, SHIFT), rtol=0, atol=1e-6)
    torch.testing.assert_close(sched.timesteps.double(), t_to_timestep(shift_t(1 - base, SHIFT)), rtol=0, atol=1e-3)


@pytest.mark.parametrize("n", [1, 4, 10, 28])
def test_scheduler_default_grid(n):
    """diffusers' default set_timesteps(N) grid, expressed with flowlab's time_grid.

    The scheduler spaces N sigmas linearly from sigma_max = 1 to sigma_min = shift_sigma(1/1000)
    (the smallest *training* sigma, already shifted), shifts them *again*, and appends a final
    sigma = 0. In flowlab time:

        sigmas[:N] = 1 - time_grid(N - 1, shift, t_end=1 - shift_sigma(1/1000)),  sigmas[N] = 0

    with the same index order (increasing t <-> decreasing sigma, no flip). So the default SD3
    grid is *not* flowlab's time_grid(N, shift): its last model evaluation is near sigma ~ 0.009,
    followed by one step straight to sigma = 0.
    """
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    sched.set_timesteps(n)
    assert sched.sigmas.shape == (n + 1,) and sched.sigmas[-1].item() == 0.0
    t_end = 1 - shift_sigma(1 / 1000, SHIFT)
    t = time_grid(n - 1, shift=SHIFT, t_end=t_end) if n > 1 else torch.zeros(1, dtype=torch.float64)
    torch.testing.assert_close(sched.sigmas[:-1].double(), 1 - t, rtol=0, atol=1e-6)
    torch.testing.assert_close(sched.timesteps.double(), t_to_timestep(t), rtol=0, atol=1e-3)


@pytest.mark.parametrize("n", [1, 4, 10, 28])
def test_scheduler_uniform_sigmas_equal_flowlab_grid(n):
    """With explicit sigmas linspace(1, 1/N, N) (what FLUX pipelines pass), the scheduler's sigmas are
    exactly 1 - time_grid(N, shift), final sigma 0 included, and its timesteps are t_to_timestep of the grid."""
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n))
    grid = time_grid(n, shift=SHIFT)
    torch.testing.assert_close(sched.sigmas.double(), 1 - grid, rtol=0, atol=1e-6)
    torch.testing.assert_close(sched.timesteps.double(), t_to_timestep(grid[:-1]), rtol=0, atol=1e-3)
    assert sched.sigmas[-1].item() == 0.0 and grid[-1].item() == 1.0


def _field(x, t):
    """A nonlinear, time-dependent test velocity (flowlab convention)."""
    return torch.sin(x) * (1 + t[:, None]) - 0.5 * x


def test_scheduler_step_equals_flowlab_euler_step():
    """One scheduler.step with model_output = velocity_to_diffusers(v) is a flowlab Euler step
    from t = 1 - sigma_i to t = 1 - sigma_{i+1} with velocity v."""
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    sched.set_timesteps(8)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    i = 3
    sched.set_begin_index(i)
    timestep = sched.timesteps[i]
    t, t_next = float(sigma_to_t(sched.sigmas[i])), float(sigma_to_t(sched.sigmas[i + 1]))
    assert float(timestep_to_t(timestep)) == pytest.approx(t, abs=1e-6)
    v = _field(x, torch.full((5,), t))
    out = sched.step(velocity_to_diffusers(v), timestep, x).prev_sample
    ref = EulerSolver().step(lambda x_, t_: v, x, t, t_next, i, 8)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, x + (t_next - t) * v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [4, 12])
def test_scheduler_loop_equals_flowlab_euler_solve(n):
    """A full diffusers sampling loop (timestep -> t for the model, velocity -> diffusers target for the
    scheduler) equals EulerSolver on the grid t = 1 - scheduler.sigmas."""
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    sched.set_timesteps(n)
    x0 = torch.randn(6, 2, generator=torch.Generator().manual_seed(2))
    x = x0
    for timestep in sched.timesteps:
        t = timestep_to_t(timestep).expand(x.shape[0])
        x = sched.step(velocity_to_diffusers(_field(x, t)), timestep, x).prev_sample
    ref = EulerSolver().solve(_field, x0, sigma_to_t(sched.sigmas))
    assert ref.nfe == n
    torch.testing.assert_close(x, ref.x, rtol=1e-5, atol=1e-5)


def test_scale_noise_matches_linear_path():
    """diffusers' forward process scale_noise(x, timestep, eps) = (1 - sigma) x + sigma eps is the
    flowlab linear path at t = timestep_to_t(timestep) with x1 = x, x0 = eps."""
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(3)
    x, eps = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    timestep = sched.timesteps[[2, 5, 7]]
    noisy = sched.scale_noise(x, timestep, eps)
    ref = LinearPath().sample(eps, x, timestep_to_t(timestep)).x_t
    torch.testing.assert_close(noisy, ref, rtol=1e-6, atol=1e-6)
