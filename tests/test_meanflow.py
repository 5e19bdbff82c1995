"""MeanFlow: the average-velocity identity against the closed form of a Gaussian, the one-jump solver,
the loss (reduces to flow matching at r = t), the model's second time input (off = the old network),
the recipe, and 1- and 2-step sampling through a saved and re-loaded FlowPipeline."""
import json
import math

import pytest
import torch

from conftest import tiny_overrides
from flowlab.flow import FlowMatchingLoss, LinearPath, LogitNormalTimeSampler, MeanFlowLoss, guided_field, meanflow_target, sample, sample_time_pairs
from flowlab.flow.meanflow import meanflow_prediction_and_target
from flowlab.models import MLPVelocity
from flowlab.pipelines import FlowPipeline, FlowScheduler
from flowlab.errors import ConfigError
from flowlab.recipes import Trainer, load_config
from flowlab.train.recipe import get_recipe

MU, S = 1.5, 0.4  # data N(MU, S^2) per dimension; noise N(0, 1); linear path x_t = t x1 + (1 - t) x0


def _sigma(t):
    """Std of the marginal at flowlab time t: sqrt(t^2 S^2 + (1 - t)^2)."""
    return torch.sqrt(t**2 * S**2 + (1 - t) ** 2)


def _v_exact(x, t):
    """Marginal velocity of the Gaussian: mu + sigma_t'/sigma_t (x - t mu)."""
    t = t.reshape(-1, *([1] * (x.ndim - 1)))
    s = _sigma(t)
    ds = (t * S**2 - (1 - t)) / s
    return MU + ds / s * (x - t * MU)


def _flow_map(x, t, r):
    """ODE flow from time t to r: x_r = r mu + sigma_r / sigma_t (x - t mu)."""
    t = t.reshape(-1, *([1] * (x.ndim - 1)))
    r = r.reshape(-1, *([1] * (x.ndim - 1)))
    return r * MU + _sigma(r) / _sigma(t) * (x - t * MU)


def _u_exact(x, t, r):
    """Exact average velocity over [t, r] (r > t): (x_r - x_t) / (r - t)."""
    return (_flow_map(x, t, r) - x) / (r - t).reshape(-1, *([1] * (x.ndim - 1)))


def test_meanflow_identity_matches_closed_form_gaussian():
    g = torch.Generator().manual_seed(0)
    n = 64
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.8
    r = t + 0.05 + torch.rand(n, generator=g, dtype=torch.float64) * (0.95 - t)
    x = _flow_map(torch.randn(n, 3, generator=g, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), t)
    v = _v_exact(x, t)
    u, u_tgt = meanflow_target(_u_exact, x, t, r, v)
    assert torch.allclose(u, _u_exact(x, t, r))
    # the identity u = v - (t - r) du/dt holds exactly for the exact u ...
    assert torch.allclose(u_tgt, u, atol=1e-10, rtol=1e-10)
    # ... and is not trivially satisfied: u differs from v, and the opposite sign of the JVP term is wrong
    assert (u - v).abs().max() > 1e-2
    wrong = v - (u_tgt - v)
    assert (wrong - u).abs().max() > 1e-2


def test_meanflow_solver_is_exact_for_the_exact_average_velocity():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(20000, 2, generator=g, dtype=torch.float64)
    for steps in (1, 2):
        out = sample(_u_exact, x0, solver="meanflow", num_steps=steps)
        assert out.nfe == steps
        assert torch.allclose(out.x, MU + S * x0, atol=1e-10)  # the flow map from noise to data
        assert abs(out.x.mean().item() - MU) < 0.02 and abs(out.x.std().item() - S) < 0.02


def test_time_pairs_are_sorted_with_the_requested_share_of_distinct_pairs():
    pairs = sample_time_pairs(LogitNormalTimeSampler(0.4, 1.0), 20000, 0.25, torch.Generator().manual_seed(0))
    t, r = pairs.unbind(1)
    assert pairs.shape == (20000, 2) and bool((t <= r).all()) and bool((t > 0).all()) and bool((r < 1).all())
    assert abs((r != t).float().mean().item() - 0.25) < 0.015
    assert torch.equal(sample_time_pairs(LogitNormalTimeSampler(), 8, 0.0, torch.Generator().manual_seed(0)).diff(dim=1), torch.zeros(8, 1))


def _full_jvp_loss(model, x1, x0, t, r, labels, p=1.0, c=1e-3):
    """The loss as computed before the row split: one JVP over the whole batch."""
    s = LinearPath().sample(x0, x1, t)
    u, u_tgt = meanflow_target(lambda x, tt, rr: model(x, tt, labels, r=rr), s.x_t, s.t, r, s.dx_t)
    sq = (u - u_tgt).pow(2).flatten(1).mean(1)
    return ((sq.detach() + c).pow(-p) * sq).mean()


@pytest.mark.parametrize("distinct_fraction", [0.0, 0.25, 0.75, 1.0])
def test_jvp_on_distinct_rows_only_gives_the_full_batch_loss_and_gradients(distinct_fraction):
    torch.manual_seed(0)
    model = _randomize(MLPVelocity(sample_shape=(1, 4, 4), hidden_dim=24, depth=2, time_embed_dim=8, num_classes=3, mean_flow=True))
    g = torch.Generator().manual_seed(1)
    n = 40
    x1, x0 = torch.randn(n, 1, 4, 4, generator=g), torch.randn(n, 1, 4, 4, generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    t, r = sample_time_pairs(LogitNormalTimeSampler(0.4, 1.0), n, distinct_fraction, g).unbind(1)
    n_distinct = int((r != t).sum())
    assert (n_distinct == 0) == (distinct_fraction == 0.0) and (n_distinct == n) == (distinct_fraction == 1.0)
    split = MeanFlowLoss()(lambda x, tt, rr, y: model(x, tt, y, r=rr), x1, x_0=x0, t=t, r=r, conditioning=(labels,))
    full = _full_jvp_loss(model, x1, x0, t, r, labels)
    assert torch.allclose(split.loss, full, rtol=1e-5, atol=1e-7), (split.loss.item(), full.item())
    g_split = torch.autograd.grad(split.loss, list(model.parameters()), allow_unused=True)
    g_full = torch.autograd.grad(full, list(model.parameters()), allow_unused=True)
    for a, b in zip(g_split, g_full):
        if a is None or b is None:  # the interval embedding is unused when every r = t
            assert distinct_fraction == 0.0 or (a is None and b is None)
            continue
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()
    # rows keep their batch order: per-sample values match a direct evaluation
    s = LinearPath().sample(x0, x1, t)
    u, u_tgt = meanflow_prediction_and_target(lambda x, tt, rr, y: model(x, tt, y, r=rr), s.x_t, s.t, r, s.dx_t, (labels,))
    u_ref, tgt_ref = meanflow_target(lambda x, tt, rr: model(x, tt, labels, r=rr), s.x_t, s.t, r, s.dx_t)
    assert torch.allclose(u, u_ref, atol=1e-5) and torch.allclose(u_tgt, tgt_ref, rtol=1e-5, atol=1e-6 * tgt_ref.abs().max().item()), (u_tgt - tgt_ref).abs().max()
    assert not u_tgt.requires_grad and u.requires_grad


def test_row_split_passes_none_conditioning_through():
    torch.manual_seed(0)
    model = _randomize(MLPVelocity(sample_shape=(3,), hidden_dim=16, depth=1, time_embed_dim=8, mean_flow=True))
    x1, x0 = torch.randn(10, 3), torch.randn(10, 3)
    t = torch.rand(10) * 0.5
    r = torch.where(torch.arange(10) % 3 == 0, t + 0.3, t)
    seen = []

    def u_fn(x, tt, rr, y):
        seen.append((x.shape[0], y))
        return model(x, tt, y, r=rr)

    out = MeanFlowLoss()(u_fn, x1, x_0=x0, t=t, r=r, conditioning=(None,))
    assert sorted(k for k, _ in seen) == [4, 10] and all(y is None for _, y in seen)  # a JVP of the 4 r != t rows, one forward of all
    assert torch.allclose(out.loss, _full_jvp_loss(model, x1, x0, t, r, None), rtol=1e-5)


@pytest.mark.parametrize("mean_flow", [True, False])
@pytest.mark.parametrize("scale", [1000.0, 1.0])
def test_written_out_mlp_jvp_matches_torch_func_jvp(mean_flow, scale):
    """MLPVelocity.jvp (layer by layer: linear, SiLU, LayerNorm, FiLM, sinusoidal features) against forward-mode AD,
    along random tangents of x, t and (MeanFlow models) r, odd feature size included, with and without labels."""
    torch.manual_seed(0)
    model = _randomize(MLPVelocity(sample_shape=(1, 4, 4), hidden_dim=24, depth=2, time_embed_dim=9, num_classes=3,
                                   mean_flow=mean_flow, time_embed_scale=scale))
    g = torch.Generator().manual_seed(5)
    x, dx = torch.randn(12, 1, 4, 4, generator=g), torch.randn(12, 1, 4, 4, generator=g)
    t, dt = torch.rand(12, generator=g), torch.randn(12, generator=g)
    r, dr = (torch.rand(12, generator=g), torch.randn(12, generator=g)) if mean_flow else (None, None)
    for labels in (torch.randint(0, 4, (12,), generator=g), None):
        if mean_flow:
            ref = torch.func.jvp(lambda a, b, c: model(a, b, labels, r=c), (x, t, r), (dx, dt, dr))
            got = model.jvp(x, t, labels, r, dx, dt, dr)
            # dr = None holds r fixed (MeanFlow's tangent (v, 1, 0))
            fixed = torch.func.jvp(lambda a, b: model(a, b, labels, r=r), (x, t), (dx, dt))
            assert torch.allclose(model.jvp(x, t, labels, r, dx, dt)[1], fixed[1], rtol=1e-4, atol=1e-5 * fixed[1].abs().max().item())
        else:
            ref = torch.func.jvp(lambda a, b: model(a, b, labels), (x, t), (dx, dt))
            got = model.jvp(x, t, labels, None, dx, dt)
        assert torch.allclose(got[0], ref[0], atol=1e-5)
        assert torch.allclose(got[1], ref[1], rtol=1e-4, atol=1e-5 * ref[1].abs().max().item()), (got[1] - ref[1]).abs().max()
        assert not got[0].requires_grad and not got[1].requires_grad


def test_recipe_uses_the_written_out_jvp_only_where_it_is_exact():
    from peft import LoraConfig

    from flowlab.recipes.meanflow.recipe import _exact_jvp_fn

    model = MLPVelocity(sample_shape=(1, 4, 4), hidden_dim=16, depth=1, time_embed_dim=8, num_classes=3, mean_flow=True)
    assert _exact_jvp_fn(model) is not None
    wrapped = torch.nn.Module()
    wrapped.module = model  # the DDP layout: the bare network under .module
    assert _exact_jvp_fn(wrapped) is not None
    sharded = type("FullyShardedDataParallel", (torch.nn.Module,), {})()
    sharded.module = model  # FSDP holds shards outside its forward: always the torch.func fallback
    assert _exact_jvp_fn(sharded) is None
    dropout = MLPVelocity(sample_shape=(1, 4, 4), hidden_dim=16, depth=1, time_embed_dim=8, mean_flow=True, dropout=0.1)
    assert _exact_jvp_fn(dropout.train()) is None and _exact_jvp_fn(dropout.eval()) is not None  # active dropout: fall back
    model.add_adapter(LoraConfig(r=2, target_modules=["inp", "out"]))
    assert not model.supports_exact_jvp() and _exact_jvp_fn(model) is None  # LoRA layers: fall back


@pytest.mark.parametrize("distinct_fraction", [0.25, 1.0])
def test_loss_with_the_written_out_jvp_equals_the_default(distinct_fraction):
    torch.manual_seed(0)
    model = _randomize(MLPVelocity(sample_shape=(1, 4, 4), hidden_dim=16, depth=2, time_embed_dim=8, num_classes=4, mean_flow=True))
    g = torch.Generator().manual_seed(2)
    x1, x0 = torch.randn(40, 1, 4, 4, generator=g), torch.randn(40, 1, 4, 4, generator=g)
    labels = torch.randint(0, 5, (40,), generator=g)
    t, r = sample_time_pairs(LogitNormalTimeSampler(0.4, 1.0), 40, distinct_fraction, g).unbind(1)
    u_fn = lambda x, tt, rr, y: model(x, tt, y, r=rr)  # noqa: E731
    hand = MeanFlowLoss()(u_fn, x1, x_0=x0, t=t, r=r, conditioning=(labels,),
                          jvp_fn=lambda x, tt, rr, dx, y: model.jvp(x, tt, y, rr, dx, torch.ones_like(tt)))
    auto = MeanFlowLoss()(u_fn, x1, x_0=x0, t=t, r=r, conditioning=(labels,))
    assert torch.allclose(hand.loss, auto.loss, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(hand.loss, list(model.parameters())), torch.autograd.grad(auto.loss, list(model.parameters()))):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def _reference_v1_pairs(n, g, ratio, mean_t=-0.6, std_t=1.6, mean_r=-4.0, std_r=1.6):
    """The authors' ``sample_two_timesteps_t_r_v1`` (py-meanflow ``meanflow/models/time_sampler.py``), on their time:
    noise at 1, r <= t."""
    t = torch.sigmoid(torch.randn(n, generator=g) * std_t + mean_t)
    r = torch.sigmoid(torch.randn(n, generator=g) * std_r + mean_r)
    r = torch.where(torch.rand(n, generator=g) < 1 - ratio, t, r)
    return t, torch.minimum(t, r)


def test_separate_r_sampler_is_the_reference_v1_sampler_in_flowlab_time():
    n = 200_000
    pairs = sample_time_pairs(LogitNormalTimeSampler(0.6, 1.6), n, 0.75, torch.Generator().manual_seed(0), LogitNormalTimeSampler(4.0, 1.6))
    t, r = pairs.unbind(1)
    assert bool((t <= r).all())
    t_ref, r_ref = _reference_v1_pairs(n, torch.Generator().manual_seed(1), 0.75)
    q = torch.linspace(0.02, 0.98, 25)
    # flowlab time is 1 - the reference's: same law for (1 - t_ref, 1 - r_ref) as for (t, r)
    assert torch.allclose(torch.quantile(t, q), torch.quantile(1 - t_ref, q), atol=0.01)
    assert torch.allclose(torch.quantile(r, q), torch.quantile(1 - r_ref, q), atol=0.01)
    assert abs((r != t).float().mean().item() - (r_ref != t_ref).float().mean().item()) < 0.01
    gap = r - t
    assert torch.allclose(torch.quantile(gap, q), torch.quantile(t_ref - r_ref, q), atol=0.01)
    # the sign matters: without the conversion r would sit near noise
    assert r.median() > 0.9 and t.median() > 0.6
    # same generator order as the sorted sampler: t is exactly the first draw of the t sampler
    assert torch.equal(t, LogitNormalTimeSampler(0.6, 1.6).sample(n, torch.Generator().manual_seed(0)))


def test_recipe_builds_the_separate_r_sampler(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path / "a", "recipe=meanflow", "meanflow.time_pairs=separate", "meanflow.r_logit_mean=2.0"))
    loss = get_recipe(cfg).mean_flow_loss
    assert isinstance(loss.r_time_sampler, LogitNormalTimeSampler) and (loss.r_time_sampler.mean, loss.r_time_sampler.std) == (2.0, 1.6)
    cfg = load_config(None, tiny_overrides(tmp_path / "b", "recipe=meanflow"))
    assert get_recipe(cfg).mean_flow_loss.r_time_sampler is None
    with pytest.raises(ConfigError, match="meanflow.time_pairs"):
        load_config(None, tiny_overrides(tmp_path / "c", "recipe=meanflow", "meanflow.time_pairs=v1"))


def test_loss_reduces_to_flow_matching_when_r_equals_t():
    torch.manual_seed(0)
    model = _randomize(MLPVelocity(sample_shape=(2,), hidden_dim=16, depth=1, time_embed_dim=8, mean_flow=True))
    x1, x0, t = torch.randn(32, 2), torch.randn(32, 2), torch.rand(32)
    mf = MeanFlowLoss(adaptive_p=0.0)(lambda x, tt, rr: model(x, tt, r=rr), x1, x_0=x0, t=t, r=t)
    fm = FlowMatchingLoss()(lambda x, tt: model(x, tt), x1, x_0=x0, t=t)
    assert torch.allclose(mf.loss, fm.loss, rtol=1e-6)
    # gradients flow through u only (the target is detached): same gradient as flow matching at r = t
    g_mf = torch.autograd.grad(mf.loss, list(model.parameters()), allow_unused=True)
    g_fm = torch.autograd.grad(fm.loss, list(model.parameters()), allow_unused=True)
    for a, b in zip(g_mf, g_fm):
        assert (a is None and b is None) or (a is not None and b is not None and torch.allclose(a, b, atol=1e-6)) or (
            b is None and a is not None and torch.count_nonzero(a) == 0
        )


def test_adaptive_weight_and_bad_settings():
    model = lambda x, t, r: torch.zeros_like(x)  # noqa: E731  error = target = x1 - x0 at r = t
    x1, x0, t = torch.ones(4, 3), torch.zeros(4, 3), torch.full((4,), 0.3)
    out = MeanFlowLoss(adaptive_p=1.0, adaptive_c=1.0)(model, x1, x_0=x0, t=t, r=t)
    assert torch.allclose(out.per_sample, torch.full((4,), 1.0 / (1.0 + 1.0)))
    assert torch.allclose(out.squared_error, torch.ones(4))  # the unweighted error, logged by the recipe
    with pytest.raises(ValueError, match="t <= r"):
        MeanFlowLoss()(model, x1, x_0=x0, t=t, r=t - 0.1)
    with pytest.raises(ValueError, match="distinct_fraction"):
        MeanFlowLoss(distinct_fraction=1.5)
    with pytest.raises(ValueError, match="both t and r"):
        MeanFlowLoss()(model, x1, t=t)


def _randomize(model):
    """Random weights everywhere (the MLP starts its residual blocks at zero, where the time inputs have no effect)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def test_model_second_time_input_is_optional_and_off_by_default():
    torch.manual_seed(0)
    old = MLPVelocity(sample_shape=(1, 8, 8), hidden_dim=16, depth=2, time_embed_dim=8, num_classes=3)
    torch.manual_seed(0)
    new = MLPVelocity(sample_shape=(1, 8, 8), hidden_dim=16, depth=2, time_embed_dim=8, num_classes=3, mean_flow=True)
    old_sd, new_sd = old.state_dict(), new.state_dict()
    assert set(new_sd) - set(old_sd) == {k for k in new_sd if k.startswith("interval_embed.")} != set()
    for k in old_sd:  # the one-time network's weights are drawn first, identically
        assert torch.equal(old_sd[k], new_sd[k]), k
    x, t = torch.randn(5, 1, 8, 8), torch.rand(5)
    _randomize(new)
    assert torch.equal(new(x, t), new(x, t, r=t))  # r = None reads r = t: the instantaneous velocity
    assert not torch.allclose(new(x, t, r=torch.ones(5)), new(x, t))
    with pytest.raises(ValueError, match="second time r"):
        old(x, t, r=t)


def test_old_checkpoints_load_as_one_time_models(tmp_path):
    model = _randomize(MLPVelocity(sample_shape=(2,), hidden_dim=16, depth=1, time_embed_dim=8))
    model.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("mean_flow")  # a checkpoint written before the flag existed
    cfg_path.write_text(json.dumps(cfg))
    loaded = MLPVelocity.from_pretrained(tmp_path)
    assert loaded.config.mean_flow is False and loaded.interval_embed is None
    x, t = torch.randn(3, 2), torch.rand(3)
    assert torch.equal(loaded(x, t), model(x, t))


def _pipeline(num_classes=0):
    torch.manual_seed(0)
    model = _randomize(MLPVelocity(sample_shape=(2,), hidden_dim=16, depth=1, time_embed_dim=8, num_classes=num_classes, mean_flow=True))
    pipe = FlowPipeline(velocity_model=model, scheduler=FlowScheduler(solver="meanflow", num_inference_steps=2, mean_flow=True))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_one_and_two_step_sampling_round_trips(tmp_path):
    pipe = _pipeline()
    pipe.save_pretrained(tmp_path)
    loaded = FlowPipeline.from_pretrained(str(tmp_path))
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler.config.mean_flow is True and loaded.velocity_model.config.mean_flow is True
    x0 = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    u = loaded.velocity_model
    with torch.no_grad():
        one = x0 + u(x0, torch.zeros(6), r=torch.ones(6))
        x_half = x0 + 0.5 * u(x0, torch.zeros(6), r=torch.full((6,), 0.5))
        two = x_half + 0.5 * u(x_half, torch.full((6,), 0.5), r=torch.ones(6))
    out1 = loaded(latents=x0, num_inference_steps=1, solver="meanflow", output_type="pt")
    out2 = loaded(latents=x0, output_type="pt")  # the scheduler's defaults: meanflow, 2 steps
    assert (out1.nfe, out2.nfe) == (1, 2)
    assert torch.allclose(out1.images, one, atol=1e-6) and torch.allclose(out2.images, two, atol=1e-6)
    assert not torch.allclose(one, two, atol=1e-3)  # the model depends on both times: 1 and 2 steps differ
    assert torch.allclose(pipe(latents=x0, num_inference_steps=1, output_type="pt").images, out1.images)
    # read at r = t the model is a velocity model: the ODE solvers work on it too
    assert loaded(latents=x0, num_inference_steps=4, solver="euler", output_type="pt").nfe == 4


def test_meanflow_solver_with_guidance_passes_the_end_time():
    pipe = _pipeline(num_classes=3)
    x0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0])
    u = pipe.velocity_model
    with torch.no_grad():
        z, o = torch.zeros(4), torch.ones(4)
        cond, null = u(x0, z, labels, r=o), u(x0, z, torch.full((4,), 3), r=o)
        expected = x0 + null + 2.0 * (cond - null)
    out = pipe(latents=x0, class_labels=labels, guidance_scale=2.0, num_inference_steps=1, output_type="pt")
    assert torch.allclose(out.images, expected, atol=1e-6)
    field = guided_field(lambda x, t, lab, *times: torch.stack([t, *times], 1).sum(1, keepdim=True) * torch.ones_like(x), labels, 2.0, 3)
    assert torch.allclose(field(x0, torch.full((4,), 0.25), torch.full((4,), 0.5)), torch.full((4, 2), 0.75))


def test_plain_models_refuse_the_meanflow_solver():
    model = MLPVelocity(sample_shape=(2,), hidden_dim=8, depth=1, time_embed_dim=4)
    pipe = FlowPipeline(velocity_model=model, scheduler=FlowScheduler(solver="euler"))
    with pytest.raises(ValueError, match="'meanflow' needs a MeanFlow"):
        pipe(batch_size=2, solver="meanflow", output_type="pt")
    with pytest.raises(ValueError, match="needs a MeanFlow"):
        FlowScheduler(solver="meanflow")
    with pytest.raises(ValueError, match="prediction_type"):
        FlowScheduler(prediction_type="x1", mean_flow=True)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="sample.solver"):  # flow matching's models are not MeanFlow models
        load_config(None, tiny_overrides(tmp_path / "a", "sample.solver=meanflow"))
    cfg = load_config(None, tiny_overrides(tmp_path / "b", "recipe=meanflow", "flow.prediction_type=x1"))
    with pytest.raises(ConfigError, match="flow.prediction_type"):
        get_recipe(cfg)
    with pytest.raises(ConfigError, match="meanflow.distinct_fraction"):
        load_config(None, tiny_overrides(tmp_path / "c", "recipe=meanflow", "meanflow.distinct_fraction=2"))
    cfg = load_config(None, tiny_overrides(tmp_path / "d", "recipe=meanflow", "model.type=unet"))
    recipe = get_recipe(cfg)
    with pytest.raises(ConfigError, match="model.type"):
        recipe.build_model(recipe.build_dataset())


def test_recipe_trains_and_saves_a_two_step_pipeline(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(out, "recipe=meanflow", "model.class_conditional=true", "sample.solver=meanflow", "train.max_steps=20"))
    Trainer(cfg).train()
    logged = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert logged and all(math.isfinite(r["mean_flow_mse"]) and r["mean_flow_mse"] > 0 for r in logged)
    pipe = FlowPipeline.from_pretrained(str(out / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.mean_flow is True and pipe.scheduler.config.solver == "meanflow"
    for steps in (1, 2):
        res = pipe(batch_size=10, class_labels=list(range(10)), num_inference_steps=steps, output_type="pt",
                   generator=torch.Generator().manual_seed(0))
        assert res.nfe == steps and res.images.shape == (10, 1, 8, 8) and bool(torch.isfinite(res.images).all())


class _GaussianAverageVelocity(torch.nn.Module):
    """The exact average velocity of N(mu, s^2) data (the closed form above) with learnable ``mu`` and ``log s``."""

    def __init__(self):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))
        self.log_s = torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))

    def forward(self, x, t, r):
        mu, s = self.mu, self.log_s.exp()
        t_, r_ = t.reshape(-1, 1), r.reshape(-1, 1)
        sig_t, sig_r = torch.sqrt(t_**2 * s**2 + (1 - t_) ** 2), torch.sqrt(r_**2 * s**2 + (1 - r_) ** 2)
        x_t0 = x - t_ * mu
        dsig_t = (t_ * s**2 - (1 - t_)) / sig_t
        jump = r_ * mu + sig_r / sig_t * x_t0 - x  # x_r - x_t
        # (x_r - x_t) / (r - t), and its limit, the velocity, at r = t
        close = (r_ - t_).abs() < 1e-6
        return torch.where(close, mu + dsig_t / sig_t * x_t0, jump / torch.where(close, torch.ones_like(r_), r_ - t_))


@pytest.mark.parametrize("distinct_fraction", [1.0, 0.25])
def test_meanflow_loss_recovers_the_gaussian_it_is_trained_on(distinct_fraction):
    """Trained on N(MU, S^2) samples with the conditional velocity x1 - x0, the loss's stationary point is the
    exact average velocity: a model holding the closed form recovers MU and S (with a flipped sign of the
    JVP term, or no stop-gradient, it would not)."""
    torch.manual_seed(0)
    model = _GaussianAverageVelocity()
    loss_fn = MeanFlowLoss(distinct_fraction=distinct_fraction)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        x1 = MU + S * torch.randn(1024, 1, generator=g, dtype=torch.float64)
        loss = loss_fn(model, x1, generator=g).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(model.mu.item() - MU) < 0.05 and abs(model.log_s.exp().item() - S) < 0.05, (model.mu.item(), model.log_s.exp().item())
    x0 = torch.randn(20000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        one = sample(model, x0, solver="meanflow", num_steps=1).x
    assert abs(one.mean().item() - MU) < 0.05 and abs(one.std().item() - S) < 0.05


def test_meanflow_two_processes_match_one(tmp_path):
    """DDP: the graph-free target pass (written-out JVP on the bare network) and the one forward through the
    wrapper give the one-process result at the same global batch."""
    import sys

    from safetensors.torch import load_file

    from conftest import launch_two_cpu_processes, run_checked

    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["recipe=meanflow", "model.class_conditional=true", "sample.solver=meanflow", "train.max_steps=10",
             "train.checkpoint_every=10", "meanflow.distinct_fraction=0.5", "model.time_embed_scale=1"]
    run_checked([sys.executable, "train.py", *tiny_overrides(one, *extra)])
    log = launch_two_cpu_processes(*tiny_overrides(two, *extra))
    assert "2 process(es) [MULTI_CPU]" in log, log[-2000:]
    w1 = load_file(one / "pipeline" / "velocity_model" / "diffusion_pytorch_model.safetensors")
    w2 = load_file(two / "pipeline" / "velocity_model" / "diffusion_pytorch_model.safetensors")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-4)
    # the loss and the recipe's own log (mean_flow_mse: each process's rows, averaged over the processes)
    # are the one-process values
    for key in ("loss", "mean_flow_mse"):
        l1 = [json.loads(x)[key] for x in open(one / "metrics.jsonl") if '"loss"' in x]
        l2 = [json.loads(x)[key] for x in open(two / "metrics.jsonl") if '"loss"' in x]
        assert len(l1) == len(l2) == 1
        torch.testing.assert_close(torch.tensor(l1), torch.tensor(l2), atol=1e-5, rtol=1e-4, msg=key)


def test_training_time_guidance_replaces_the_velocity_by_the_guided_one():
    """v_g = omega v + kappa u(x,t,t|y) + (1 - omega - kappa) u(x,t,t|null) on rows with a real label, v on dropped rows;
    the model's velocity at r = t comes from the forward already made, at r != t from a fresh u(x, t, t | y)."""
    from flowlab.flow import MeanFlowGuidance

    null = 3
    calls = []

    def u_fn(x, t, r, y):  # u = label + 10 (r - t): a different value at r != t than at r = t
        calls.append(x.shape[0])
        return (y.float() + 10 * (r - t))[:, None].expand_as(x).clone()

    x, v = torch.zeros(6, 2), torch.arange(12.0).reshape(6, 2)
    t = torch.full((6,), 0.3)
    r = torch.tensor([0.3, 0.3, 0.8, 0.8, 0.3, 0.9])
    y = torch.tensor([0, 1, 2, 1, null, null])
    u = u_fn(x, t, r, y)
    calls.clear()
    g = MeanFlowGuidance(omega=1.5, kappa=0.25, null_label=null)
    assert g.scale == 2.0 and g.active and not MeanFlowGuidance(1.0, 0.0, null).active
    out = g.velocity(u_fn, x, t, r, v, (y,), u)
    assert calls == [4, 2]  # the null-class forward of the 4 kept rows, u(x, t, t | y) of the 2 kept rows with r != t
    expect = 1.5 * v[:4] + 0.25 * y[:4, None].float() + (1 - 1.5 - 0.25) * null
    assert torch.allclose(out[:4], expect) and torch.equal(out[4:], v[4:])
    with pytest.raises(ValueError, match="kappa"):
        MeanFlowGuidance(1.0, 1.0, null)
    with pytest.raises(ValueError, match="class labels"):
        g.velocity(u_fn, x, t, r, v, (None,), u)


def test_guided_loss_uses_the_guided_velocity_in_target_and_tangent():
    """The loss with guidance equals the reference single-pass loss computed with v_g in place of v."""
    from flowlab.flow import MeanFlowGuidance

    torch.manual_seed(0)
    model = _randomize(MLPVelocity(sample_shape=(1, 4, 4), hidden_dim=16, depth=2, time_embed_dim=8, num_classes=3, mean_flow=True))
    g = torch.Generator().manual_seed(4)
    x1, x0 = torch.randn(30, 1, 4, 4, generator=g), torch.randn(30, 1, 4, 4, generator=g)
    labels = torch.randint(0, 4, (30,), generator=g)  # 3 = the null class
    t, r = sample_time_pairs(LogitNormalTimeSampler(0.4, 1.0), 30, 0.5, g).unbind(1)
    guidance = MeanFlowGuidance(omega=1.2, kappa=0.3, null_label=3)
    u_fn = lambda x, tt, rr, y: model(x, tt, y, r=rr)  # noqa: E731
    out = MeanFlowLoss(guidance=guidance)(u_fn, x1, x_0=x0, t=t, r=r, conditioning=(labels,))
    s = LinearPath().sample(x0, x1, t)
    with torch.no_grad():
        v_g = guidance.velocity(u_fn, s.x_t, s.t, r, s.dx_t, (labels,), model(s.x_t, s.t, labels, r=r))
    u, u_tgt = meanflow_target(lambda x, tt, rr: model(x, tt, labels, r=rr), s.x_t, s.t, r, v_g)
    sq = (u - u_tgt).pow(2).flatten(1).mean(1)
    ref = ((sq.detach() + 1e-3).pow(-1) * sq).mean()
    assert torch.allclose(out.loss, ref, rtol=1e-5) and torch.allclose(out.squared_error, sq.detach(), rtol=1e-4)
    plain = MeanFlowLoss()(u_fn, x1, x_0=x0, t=t, r=r, conditioning=(labels,))
    assert not torch.allclose(out.squared_error, plain.squared_error, rtol=1e-2)  # guidance changed the target


def test_guidance_config_errors_name_the_key(tmp_path):
    for extra, key in ((["model.class_conditional=false"], "meanflow.guidance_omega"), (["model.label_dropout=0"], "model.label_dropout")):
        cfg = load_config(None, tiny_overrides(tmp_path, "recipe=meanflow", "model.class_conditional=true", "sample.solver=meanflow",
                                               "meanflow.guidance_omega=1.5", *extra))
        with pytest.raises(ConfigError, match=key):
            get_recipe(cfg)
