"""The flow-matching loss (targets, hand-computed MSE, weighting) and classifier-free guidance."""
import pytest
import torch

from flowlab.flow import (
    FlowMatchingLoss,
    LinearPath,
    MinibatchOTCoupling,
    UniformTimeSampler,
    get_path,
    guided_field,
    loss_weight,
)

PATH_NAMES = ["linear", "cosine", "vp"]


def _data(seed=0, shape=(6, 3)):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.linspace(0.1, 0.9, shape[0], dtype=torch.float64)
    return x0, x1, t


def _oracle(path, x0, x1, kind):
    """A 'model' that returns the exact conditional target for the (x0, x1) pairs it was built with;
    it uses only its inputs (x_t, t) plus those pairs, so a wrong x_t or t shows up as a non-zero loss."""

    def model(x_t, t):
        a, s, da, ds = path.coefficients(t, x_t)
        assert torch.allclose(x_t, a * x1 + s * x0)
        return {"velocity": da * x1 + ds * x0, "x1": x1, "epsilon": x0}[kind]

    return model


@pytest.mark.parametrize("kind", ["velocity", "x1", "epsilon"])
@pytest.mark.parametrize("name", PATH_NAMES)
def test_exact_target_gives_zero_loss(name, kind):
    """A model returning the exact conditional target has zero loss, for every path and prediction type."""
    path = get_path(name)
    x0, x1, t = _data()
    out = FlowMatchingLoss(path=path, prediction_type=kind)(_oracle(path, x0, x1, kind), x1, x_0=x0, t=t)
    assert out.loss.item() < 1e-12 and out.per_sample.shape == (6,)


def test_wrong_target_gives_positive_loss():
    """On the cosine path the velocity target is not x1 - x0, so the rectified-flow target is penalised."""
    x0, x1, t = _data()
    out = FlowMatchingLoss(path=get_path("cosine"))(lambda x_t, tt: x1 - x0, x1, x_0=x0, t=t)
    assert out.loss.item() > 0.1


def test_loss_equals_hand_computed_mse():
    """Linear path, velocity target: loss = mean_b mean_d (f(x_t, t) - (x1 - x0))^2 with x_t = t x1 + (1 - t) x0."""
    x0, x1, t = _data(seed=1, shape=(5, 2, 3))

    def model(x, tt):
        return 0.5 * x + tt[:, None, None]

    out = FlowMatchingLoss()(model, x1, x_0=x0, t=t)
    tb = t[:, None, None]
    x_t = tb * x1 + (1 - tb) * x0
    per_sample = ((0.5 * x_t + tb - (x1 - x0)) ** 2).mean(dim=(1, 2))
    torch.testing.assert_close(out.per_sample.double(), per_sample, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.loss.double(), per_sample.mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.sample.x_t, x_t)


@pytest.mark.parametrize("kind,target", [("x1", lambda x0, x1: x1), ("epsilon", lambda x0, x1: x0)])
def test_loss_hand_computed_other_targets(kind, target):
    """x1 and epsilon prediction regress on x1 and x0 respectively."""
    x0, x1, t = _data(seed=2)
    out = FlowMatchingLoss(prediction_type=kind)(lambda x, tt: torch.zeros_like(x), x1, x_0=x0, t=t)
    torch.testing.assert_close(out.per_sample.double(), (target(x0, x1) ** 2).mean(1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("weighting", ["sigma_sqrt", "cosmap"])
def test_weighting_multiplies_per_sample_losses(weighting):
    """Weighted per-sample losses are the unweighted ones times loss_weight(t)."""
    x0, x1, t = _data(seed=3)

    def model(x, tt):
        return torch.sin(x)

    plain = FlowMatchingLoss()(model, x1, x_0=x0, t=t)
    weighted = FlowMatchingLoss(weighting=weighting)(model, x1, x_0=x0, t=t)
    w = loss_weight(t.float(), weighting)
    assert not torch.allclose(w, torch.ones_like(w))
    torch.testing.assert_close(weighted.per_sample, plain.per_sample * w)
    torch.testing.assert_close(weighted.loss, (plain.per_sample * w).mean())


def test_sampled_noise_and_times_are_seeded_and_coupled():
    """Without x0 / t the loss draws them from the generator (reproducible); with OT coupling x1 keeps its
    order and x0 is a permutation of the drawn noise."""
    x1 = torch.randn(8, 2, generator=torch.Generator().manual_seed(4))
    loss = FlowMatchingLoss(time_sampler=UniformTimeSampler(), coupling=MinibatchOTCoupling())

    def model(x, tt):
        return x

    a = loss(model, x1, generator=torch.Generator().manual_seed(5))
    b = loss(model, x1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.sample.t, b.sample.t)
    assert torch.equal(a.sample.x_1, x1)
    g = torch.Generator().manual_seed(5)
    drawn = torch.randn(x1.shape, generator=g)
    rows = lambda x: sorted(map(tuple, x.tolist()))  # noqa: E731
    assert rows(a.sample.x_0) == rows(drawn)
    assert torch.all((a.sample.t >= 0) & (a.sample.t <= 1))


def test_loss_rejects_bad_config():
    """Unsupported prediction types and weightings fail at construction."""
    with pytest.raises(ValueError):
        FlowMatchingLoss(prediction_type="score")
    with pytest.raises(ValueError):
        FlowMatchingLoss(weighting="snr")


# --------------------------------------------------------------------------- guidance

NULL = 3


class CountingModel:
    """A label-conditional velocity model v(x, t, y) = sin(x) (y + 1) + t y; records each call's batch size."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, labels):
        self.calls.append(x.shape[0])
        y = labels.to(x.dtype)[:, None]
        return torch.sin(x) * (y + 1) + t[:, None] * y


def _inputs():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 2, generator=g, dtype=torch.float64)
    t = torch.rand(4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1])
    return x, t, labels


@pytest.mark.parametrize("w", [0.0, 2.5, 7.0])
def test_guided_field_formula(w):
    """guided = v_null + w (v_cond - v_null), with v_cond and v_null from separate calls; one batched call."""
    x, t, labels = _inputs()
    model = CountingModel()
    field = guided_field(model, labels, guidance_scale=w, null_label=NULL)
    v = field(x, t)
    assert model.calls == [8]
    v_cond = model(x, t, labels)
    v_null = model(x, t, torch.full_like(labels, NULL))
    torch.testing.assert_close(v, v_null + w * (v_cond - v_null))


def test_guidance_scale_one_is_conditional():
    """w = 1 is exactly the conditional model, evaluated once without a null branch."""
    x, t, labels = _inputs()
    model = CountingModel()
    v = guided_field(model, labels, guidance_scale=1.0, null_label=NULL)(x, t)
    assert model.calls == [4]
    torch.testing.assert_close(v, model(x, t, labels))


def test_guidance_unconditional_and_errors():
    """No labels: the model is called with labels=None; w != 1 without a null label raises."""
    x, t, labels = _inputs()
    seen = []
    field = guided_field(lambda x_, t_, y: seen.append(y) or x_ * 2, None, guidance_scale=4.0)
    torch.testing.assert_close(field(x, t), 2 * x)
    assert seen == [None]
    with pytest.raises(ValueError):
        guided_field(CountingModel(), labels, guidance_scale=2.0)


def test_guided_field_with_linear_path_target():
    """Sanity on a solvable case: if both branches return exact linear-path velocities towards different
    targets, the guided field is the velocity towards the extrapolated target null + w (cond - null)."""
    x0, x1_cond, t = _data(seed=7)
    x1_null = torch.zeros_like(x1_cond)
    path = LinearPath()
    x_t = path.sample(x0, x1_cond, t).x_t

    def model(x, tt, labels):
        """Velocity (x1 - x) / (1 - t) towards the label's target; called on the 2B guided batch."""
        is_null = (labels == NULL)[:, None]
        target = torch.where(is_null, x1_null.repeat(2, 1), x1_cond.repeat(2, 1))
        return (target - x) / (1 - tt[:, None])

    w = 3.0
    v = guided_field(model, torch.zeros(6, dtype=torch.long), guidance_scale=w, null_label=NULL)(x_t, t)
    target = x1_null + w * (x1_cond - x1_null)
    torch.testing.assert_close(v, (target - x_t) / (1 - t[:, None]))
