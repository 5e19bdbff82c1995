"""Conservativity diagnostics against closed forms (gradient fields, rotations, mixtures)."""
import math

import pytest
import torch

from flowlab.models import ConservativeVelocity, MLPVelocity
from flowlab.wgf.diagnostics import (
    conservativity_report,
    jacobian,
    jacobian_asymmetry,
    loop_integral,
    noised_points,
    path_dependence,
    planar_curl,
)
from flowlab.flow import LinearPath

torch.set_default_dtype(torch.float32)
E1, E2 = torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([[0.0, 1.0]], dtype=torch.float64)


def gradient_field(x, t):
    """f = grad phi, phi = 0.5 x^T A x + sum cos(x) + t * x_0 x_1 (A symmetric)."""
    d = x.shape[1]
    a = torch.arange(d * d, dtype=x.dtype).reshape(d, d).sin()
    a = a + a.T
    g = x @ a - torch.sin(x)
    g = g.clone()
    g[:, 0] = g[:, 0] + t * x[:, 1]
    g[:, 1] = g[:, 1] + t * x[:, 0]
    return g


def rotation(x, t):
    """(-y, x): J = [[0, -1], [1, 0]], scalar curl 2."""
    return torch.stack([-x[:, 1], x[:, 0]], dim=1)


def mixture(lam):
    """-x + lam * (-y, x): J = [[-1, -lam], [lam, -1]]."""
    return lambda x, t: -x + lam * rotation(x, t)


def test_gradient_field_is_conservative_by_every_measure():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, dtype=torch.float64, generator=g)
    t = torch.rand(32, dtype=torch.float64, generator=g)
    assert jacobian_asymmetry(gradient_field, x, t).max() < 1e-12
    assert jacobian_asymmetry(gradient_field, x, t, num_probes=3, generator=g).max() < 1e-12
    assert planar_curl(gradient_field, x, t, generator=g)[0].max() < 1e-12
    assert loop_integral(gradient_field, x, t, radius=0.7, generator=g)[0].abs().max() < 1e-10
    assert path_dependence(gradient_field, x, t, length=1.0, detour=0.5, generator=g)[0].max() < 1e-10


def test_rotation_has_asymmetry_two_and_known_curl_and_loop():
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.zeros(16, dtype=torch.float64)
    j = jacobian(rotation, x, t)
    assert torch.allclose(j, torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64).expand(16, 2, 2))
    # ||J - J^T||_F = 2 sqrt 2, ||J||_F = sqrt 2
    assert torch.allclose(jacobian_asymmetry(rotation, x, t), torch.full((16,), 2.0, dtype=torch.float64))
    assert torch.allclose(jacobian_asymmetry(rotation, x, t, num_probes=2), torch.full((16,), 2.0, dtype=torch.float64))
    u, w = E1.expand(16, 2), E2.expand(16, 2)
    rel, curl = planar_curl(rotation, x, t, u, w)
    assert torch.allclose(curl, torch.full_like(curl, 2.0)) and torch.allclose(rel, torch.full_like(rel, math.sqrt(2)))
    rel, _ = planar_curl(rotation, x, t)  # any plane of R^2 is R^2: |curl| is the same
    assert torch.allclose(rel, torch.full_like(rel, math.sqrt(2)))
    # circle of radius rho: oint f.dl = curl * area = 2 pi rho^2; centred at the origin f || dl, so normalised = 1
    rho = 0.3
    norm, raw = loop_integral(rotation, x, t, radius=rho, u=u, w=w)
    assert torch.allclose(raw, torch.full_like(raw, 2 * math.pi * rho**2), atol=1e-12)
    norm0, _ = loop_integral(rotation, torch.zeros(1, 2, dtype=torch.float64), 0.0, radius=rho, u=E1, w=E2)
    assert abs(float(norm0) - 1) < 1e-12
    # straight minus detour = curl * enclosed area = 2 * (2 h L / pi), h = detour * L
    L, det = 0.8, 0.5
    rel, diff = path_dependence(rotation, x, t, length=L, detour=det, u=u, w=w)
    assert torch.allclose(diff, torch.full_like(diff, 4 * det * L * L / math.pi), atol=1e-10)
    assert (rel > 1e-3).all()


@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_mixture_gradient_plus_rotation_matches_hand_computation(lam):
    f = mixture(lam)
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.zeros(8, dtype=torch.float64)
    # J - J^T = [[0, -2 lam], [2 lam, 0]], ||J||^2 = 2 + 2 lam^2
    assert torch.allclose(jacobian_asymmetry(f, x, t), torch.full((8,), 2 * lam / math.sqrt(1 + lam**2), dtype=torch.float64))
    rel, curl = planar_curl(f, x, t, E1.expand(8, 2), E2.expand(8, 2))
    assert torch.allclose(curl, torch.full_like(curl, 2 * lam))
    assert torch.allclose(rel, torch.full_like(rel, 2 * lam / math.sqrt(2 + 2 * lam**2)))
    # circle around c = (1, 0): f.dl/dtheta = rho (sin th + lam cos th + lam rho) = rho (A sin(th + phi) + B)
    rho = 0.5
    A, B = math.sqrt(1 + lam**2), lam * rho
    raw_expected = 2 * math.pi * lam * rho**2
    abs_expected = rho * (4 * math.sqrt(A * A - B * B) + 4 * B * math.asin(B / A))
    norm, raw = loop_integral(f, torch.tensor([[1.0, 0.0]], dtype=torch.float64), 0.0, radius=rho, num_nodes=4000, u=E1, w=E2)
    assert abs(float(raw) - raw_expected) < 1e-9
    assert abs(float(norm) - raw_expected / abs_expected) < 1e-5


def test_probe_estimate_agrees_with_exact_in_higher_dimension():
    d = 6
    rot = torch.zeros(d, d, dtype=torch.float64)
    rot[0, 1], rot[1, 0] = -1.0, 1.0
    m = torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    jmat = (m + m.T) / 4 + 0.7 * rot  # J of the linear field x -> J x

    def f(x, t):
        return x @ jmat.T

    x = torch.randn(4, d, dtype=torch.float64)
    exact = float((2 * 0.7 * rot).norm() / jmat.norm())
    assert torch.allclose(jacobian_asymmetry(f, x, 0.0), torch.full((4,), exact, dtype=torch.float64))
    est = jacobian_asymmetry(f, x.repeat(500, 1), 0.0, num_probes=4, generator=torch.Generator().manual_seed(4))
    assert abs(float(est.mean()) - exact) < 0.03


def test_report_bins_and_confidence_intervals():
    pool = torch.randn(256, 2, dtype=torch.float64)
    pts = noised_points(LinearPath(), pool)
    rep = conservativity_report(gradient_field, pts, num_bins=3, num_points=16)
    assert len(rep.bins) == 3 and rep.bins[0]["t_low"] == pytest.approx(0.05) and rep.bins[-1]["t_high"] == pytest.approx(0.95)
    for b in rep.bins:
        for k in ("asymmetry", "curl", "loop", "path"):
            assert b[k]["mean"] < 1e-9 and b[k]["ci_low"] <= b[k]["mean"] <= b[k]["ci_high"] and b[k]["n"] == 16
    rep = conservativity_report(mixture(1.0), pts, num_bins=2, num_points=16)
    for b in rep.bins:
        assert b["asymmetry"]["mean"] == pytest.approx(math.sqrt(2)) and b["asymmetry"]["stderr"] < 1e-12
        assert b["curl"]["mean"] == pytest.approx(1.0)
    assert "asymmetry" in rep.table() and len(rep.table().splitlines()) == 4


def test_conservative_model_is_conservative_and_free_model_is_not():
    torch.manual_seed(0)
    for shape in [(2,), (1, 4, 4)]:
        cons = ConservativeVelocity(sample_shape=shape, hidden_dim=32, depth=2, time_embed_dim=16).double()
        free = MLPVelocity(sample_shape=shape, hidden_dim=32, depth=2, time_embed_dim=16).double()
        for p in free.parameters():  # the MLP starts as a near-linear map; perturb it off the identity init
            p.data += 0.1 * torch.randn_like(p)
        for p in cons.parameters():
            p.data += 0.1 * torch.randn_like(p)
        x = torch.randn(8, *shape, dtype=torch.float64)
        t = torch.rand(8, dtype=torch.float64)
        f_c = lambda x, t: cons(x, t)  # noqa: E731
        f_f = lambda x, t: free(x, t)  # noqa: E731
        assert jacobian_asymmetry(f_c, x, t).max() < 1e-10
        assert jacobian_asymmetry(f_c, x, t, num_probes=2).max() < 1e-10
        assert planar_curl(f_c, x, t)[0].max() < 1e-10
        assert loop_integral(f_c, x, t, radius=0.2)[0].abs().max() < 1e-6
        assert jacobian_asymmetry(f_f, x, t).mean() > 0.05
        # v is the gradient of the potential
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(cons.potential(xg, t).sum(), xg)
        with torch.no_grad():
            assert torch.allclose(cons(x, t), g)
