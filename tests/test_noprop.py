"""NoProp: schedule maths against closed forms, locality of DT training, saved-activation memory,
save/load of NoPropClassifier, tiny training runs through the shared Trainer, config validation."""
import math
import os

import pytest
import torch

from conftest import tiny_overrides
from flowlab.noprop import DiscreteCosineSchedule, GammaPath, MonotoneGamma, NoPropClassifier, gaussian_kl_to_standard, noisy_label
from flowlab.noprop.memory import SavedActivationMeter
from flowlab.errors import ConfigError
from flowlab.recipes import load_config
from flowlab.recipes import get_recipe
from flowlab.train.recipe import StepContext

TINY = ["noprop.hidden_dim=16", "noprop.channels=[4,8]", "noprop.time_embed_dim=8", "noprop.dropout=0.0"]


def _cfg(tmp_path, *extra):
    return load_config(None, tiny_overrides(tmp_path, "recipe=noprop", "train.max_grad_norm=0", *TINY, *extra))


def _setup(tmp_path, *extra, batch=16):
    cfg = _cfg(tmp_path, f"train.batch_size={batch}", *extra)
    recipe = get_recipe(cfg)
    ds = recipe.build_dataset()
    torch.manual_seed(0)
    model = recipe.build_model(ds)
    b = ds.get_batch(torch.arange(batch))
    ctx = StepContext(0, 0, torch.Generator().manual_seed(0), batch, 0, batch, torch.device("cpu"))
    return cfg, recipe, model, b, ctx


# --------------------------------------------------------------------------- schedule maths


def test_dt_schedule_increases_and_weights_are_positive():
    s = DiscreteCosineSchedule(10)
    ab = s.alpha_bar
    assert ab.shape == (11,)
    assert (ab[1:] > ab[:-1]).all(), "abar must increase from noise (t=0) to label (t=T)"
    assert ab[0] < 0.01 and ab[-1] > 0.99
    w = s.weights()
    assert (w > 0).all(), w  # SNR(t) - SNR(t-1) > 0: the ELBO weights are positive in this direction
    torch.testing.assert_close(w.sum(), s.snr[-1] - s.snr[0])
    # the DDPM-direction indexing that one public re-implementation used gives negative weights
    flipped = ab.flip(0)
    assert ((flipped / (1 - flipped)).diff() < 0).all()


def test_dt_inference_coefficients_are_the_forward_posterior():
    """q(z_t | z_{t-1}, u) by Gaussian conditioning of the joint of the forward Markov chain
    (z_{t-1} = sqrt(alpha_{t-1}) z_t + sqrt(1 - alpha_{t-1}) n) equals N(a_t u + b_t z_{t-1}, c_t)."""
    s = DiscreteCosineSchedule(10)
    a, b, c = s.inference_coefficients()
    ab = s.alpha_bar
    for t in range(1, 11):
        ab_t, ab_p = ab[t], ab[t - 1]
        alpha = ab_p / ab_t  # one forward step from z_t to z_{t-1}
        # joint of (z_t, z_{t-1}) given u: means sqrt(ab_t) u, sqrt(ab_p) u; Var z_t = 1 - ab_t,
        # Var z_{t-1} = 1 - ab_p, Cov = sqrt(alpha) (1 - ab_t)
        cov = alpha.sqrt() * (1 - ab_t)
        k = cov / (1 - ab_p)  # regression coefficient of z_t on z_{t-1}
        coef_u = ab_t.sqrt() - k * ab_p.sqrt()
        var = (1 - ab_t) - k * cov
        torch.testing.assert_close(a[t - 1], coef_u)
        torch.testing.assert_close(b[t - 1], k)
        torch.testing.assert_close(c[t - 1], var)
    # and the chain really has marginals N(sqrt(abar) u, 1 - abar): a_t^2... via Monte Carlo on one step
    g = torch.Generator().manual_seed(0)
    u = torch.tensor([[1.5, -0.5]], dtype=torch.float64)
    z_prev = noisy_label(u.expand(200000, 2), ab[4], torch.randn(200000, 2, generator=g, dtype=torch.float64))
    z_t = a[4] * u + b[4] * z_prev + c[4].sqrt() * torch.randn(200000, 2, generator=g, dtype=torch.float64)
    assert torch.allclose(z_t.mean(0), ab[5].sqrt() * u[0], atol=0.01)
    assert torch.allclose(z_t.var(0), (1 - ab[5]).expand(2), atol=0.01)


def test_noisy_label_uses_sqrt_alpha_bar():
    u = torch.tensor([[2.0, -1.0, 0.5]])
    ab = torch.tensor([0.25])
    assert torch.allclose(noisy_label(u, ab, torch.zeros_like(u)), 0.5 * u)  # mean sqrt(abar) u, not abar u
    eps = torch.ones_like(u)
    assert torch.allclose(noisy_label(torch.zeros_like(u), ab, eps), math.sqrt(0.75) * eps)
    g = torch.Generator().manual_seed(0)
    z = noisy_label(u.expand(100000, 3), torch.tensor(0.36), torch.randn(100000, 3, generator=g))
    assert torch.allclose(z.mean(0), 0.6 * u[0], atol=0.01) and torch.allclose(z.var(0), torch.full((3,), 0.64), atol=0.01)


def test_gaussian_kl_closed_form():
    u = torch.randn(5, 4, dtype=torch.float64)
    ab = torch.tensor(0.3, dtype=torch.float64)
    p = torch.distributions.Normal(ab.sqrt() * u, (1 - ab).sqrt())
    q = torch.distributions.Normal(torch.zeros_like(u), torch.ones_like(u))
    torch.testing.assert_close(gaussian_kl_to_standard(u, ab), torch.distributions.kl_divergence(p, q).sum(1))


def test_ct_schedule_is_monotone_with_fixed_ends_and_path_derivatives():
    torch.manual_seed(0)
    gamma = MonotoneGamma(6.0, -6.0)
    t = torch.linspace(0, 1, 101)
    g = gamma(t)
    torch.testing.assert_close(g[[0, -1]], torch.tensor([6.0, -6.0]), atol=1e-5, rtol=0)
    assert (g.diff() < 0).all(), "gamma decreases, so SNR = exp(-gamma) increases towards the label"
    _, dg = gamma.with_derivative(t)
    assert (-dg * torch.exp(-g) > 0).all()  # SNR' > 0: positive loss weights
    path = GammaPath(gamma)
    tt = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    h = 1e-4
    a, s, da, ds = (f(tt.float()).double() for f in (path.alpha, path.sigma, path.d_alpha, path.d_sigma))
    torch.testing.assert_close(a**2 + s**2, torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0)
    fd_a = (path.alpha((tt + h).float()).double() - path.alpha((tt - h).float()).double()) / (2 * h)
    fd_s = (path.sigma((tt + h).float()).double() - path.sigma((tt - h).float()).double()) / (2 * h)
    torch.testing.assert_close(da, fd_a, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ds, fd_s, atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------- locality


def _block_of(name):
    return int(name.split(".")[1]) if name.startswith("blocks.") else None


@pytest.mark.parametrize("embedding", ["one_hot", "learned"])
def test_dt_training_block_t_touches_only_block_t(tmp_path, embedding):
    """Each yielded part of a DT step: gradients land in exactly one unit, and no other block's forward runs."""
    cfg, recipe, model, batch, ctx = _setup(tmp_path, "noprop.num_blocks=4", f"noprop.embedding={embedding}")
    calls = []
    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda m, inp, out, i=i: calls.append(i))
    parts = recipe.training_losses(model, batch, ctx)
    units = []
    for t, part in enumerate(parts):
        model.zero_grad(set_to_none=True)
        calls.clear()
        part.loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        touched = {_block_of(n) for n in with_grad}
        assert len(touched) == 1, (t, touched)
        unit = touched.pop()
        if t < 4:
            assert unit == t, (t, unit)
            assert all(n.startswith(f"blocks.{t}.") for n in with_grad)
        else:  # the head / embedding unit: no block at all
            assert unit is None
            assert not any(n.startswith("blocks.") for n in with_grad)
        units.append(unit)
    assert units == [0, 1, 2, 3, None]
    # forward calls, recorded part by part
    model.zero_grad(set_to_none=True)
    seen = []
    for part in recipe.training_losses(model, batch, ctx):
        seen.append(list(calls))
        calls.clear()
    assert seen == [[0], [1], [2], [3], []], seen


def test_locality_check_can_fail(tmp_path):
    """The same checks flag the back-prop baseline: one loss reaches every block and runs every forward."""
    cfg, recipe, model, batch, ctx = _setup(tmp_path, "noprop.num_blocks=3", "noprop.variant=backprop")
    calls = []
    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda m, inp, out, i=i: calls.append(i))
    (part,) = list(recipe.training_losses(model, batch, ctx))
    part.loss.backward()
    touched = {_block_of(n) for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched == {0, 1, 2, None}
    assert calls == [0, 1, 2]


def test_block_input_does_not_depend_on_other_blocks(tmp_path):
    """Perturbing every other block's weights leaves block t's loss unchanged (no activation crosses blocks)."""
    cfg, recipe, model, batch, ctx = _setup(tmp_path, "noprop.num_blocks=3")
    model.eval()
    eps = torch.randn(16, model.embed_dim)
    before = recipe.block_loss(model, 1, batch["x"], batch["label"], eps)
    with torch.no_grad():
        for i in (0, 2):
            for p in model.blocks[i].parameters():
                p.add_(torch.randn_like(p))
        model.head.weight.add_(1.0)
    after = recipe.block_loss(model, 1, batch["x"], batch["label"], eps)
    torch.testing.assert_close(before, after)


# --------------------------------------------------------------------------- memory


def _peak(recipe, model, batch, ctx):
    with SavedActivationMeter(model, batch["x"], batch["label"]) as meter:
        for part in recipe.training_losses(model, batch, ctx):
            part.loss.backward()
            del part
    return meter.peak_bytes, meter.count


def test_dt_peak_saved_activations_are_one_blocks(tmp_path):
    T = 6
    cfg, recipe, model, batch, ctx = _setup(tmp_path, f"noprop.num_blocks={T}", batch=32)
    dt_peak, n_dt = _peak(recipe, model, batch, ctx)
    # one block's saved activations alone
    with SavedActivationMeter(model, batch["x"], batch["label"]) as one:
        loss = recipe.block_loss(model, 2, batch["x"], batch["label"], torch.randn(32, model.embed_dim))
        loss.backward()
    assert dt_peak == one.peak_bytes > 0  # the whole DT step never holds more than one block
    # back-prop through the same stack holds all T blocks at once
    cfg_bp, recipe_bp, model_bp, _, _ = _setup(tmp_path / "bp", f"noprop.num_blocks={T}", "noprop.variant=backprop", batch=32)
    bp_peak, n_bp = _peak(recipe_bp, model_bp, batch, ctx)
    assert n_dt > 0 and n_bp > 0
    assert dt_peak * T <= bp_peak, (dt_peak, bp_peak)


def test_fused_block_error_matches_autograd():
    torch.manual_seed(0)
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 1, 2])
    from flowlab.noprop.models import _MixtureSquaredError

    ref = (logits.softmax(-1) @ w - w[y]).pow(2).sum(1)
    got = _MixtureSquaredError.apply(logits, w, y)
    torch.testing.assert_close(got, ref)
    assert torch.autograd.gradcheck(lambda l: _MixtureSquaredError.apply(l, w, y), (logits,))


def test_meter_counts_exactly_and_frees():
    lin = torch.nn.Linear(3, 5)
    x = torch.randn(7, 3, requires_grad=True)
    with SavedActivationMeter(lin) as m:
        y = torch.relu(lin(x))  # saves x (input of the linear) and relu's output; the weight is excluded
        peak_before = m.live
        y.sum().backward()
        del y
    assert peak_before == 7 * 3 * 4 + 7 * 5 * 4
    assert m.peak_bytes == peak_before and m.live == 0


# --------------------------------------------------------------------------- model API


@pytest.mark.parametrize("variant", ["dt", "backprop"])
def test_fixed_recursion_variants_refuse_ode_options(variant):
    """DT / back-prop have no ODE to integrate: steps= and solver= are refused by name, not ignored."""
    torch.manual_seed(0)
    model = NoPropClassifier(variant=variant, num_blocks=3, hidden_dim=16, channels=(4, 8), time_embed_dim=8, dropout=0.0).eval()
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    with pytest.raises(ValueError, match=rf"steps=5: the NoProp variant '{variant}' .*'ct' and 'fm' variants only"):
        model.predict(x, steps=5)
    with pytest.raises(ValueError, match=rf"solver='heun': the NoProp variant '{variant}'"):
        model.predict_proba(x, solver="heun")
    with pytest.raises(ValueError, match=r"steps=2, solver='euler'"):
        model.class_logits(x, steps=2, solver="euler")
    assert model.predict(x).shape == (4,)  # without them it classifies as before


def test_ode_variants_use_steps_and_solver():
    """CT / FM take steps= and solver=, and they change the integration (so they are not ignored either)."""
    torch.manual_seed(0)
    model = NoPropClassifier(variant="fm", hidden_dim=16, channels=(4, 8), time_embed_dim=8, embedding="learned",
                             inference_steps=3, dropout=0.0).eval()
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    base = model.class_logits(x)
    torch.testing.assert_close(model.class_logits(x, steps=3, solver=model.config.solver), base)
    assert not torch.allclose(model.class_logits(x, steps=1), base)
    other = "midpoint" if model.config.solver != "midpoint" else "euler"
    assert not torch.allclose(model.class_logits(x, solver=other), base)


@pytest.mark.parametrize("variant", ["dt", "ct", "fm", "backprop"])
def test_classifier_save_load_round_trip(tmp_path, variant):
    torch.manual_seed(0)
    emb = "prototype" if variant == "ct" else ("learned" if variant == "fm" else "one_hot")
    model = NoPropClassifier(variant=variant, num_blocks=3, hidden_dim=16, channels=(4, 8), time_embed_dim=8, embedding=emb,
                             inference_steps=3, dropout=0.0)
    model.eval()
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").exists()
    loaded = NoPropClassifier.from_pretrained(tmp_path / "m")
    pred = loaded.predict(x)
    assert pred.shape == (6,) and pred.dtype == torch.long
    assert torch.equal(pred, model.predict(x))
    proba = loaded.predict_proba(x)
    assert proba.shape == (6, 10)
    torch.testing.assert_close(proba.sum(1), torch.ones(6))
    torch.testing.assert_close(proba, model.predict_proba(x))
    assert torch.equal(proba.argmax(1), pred)


def test_flowlab_backbone_option(tmp_path):
    cfg, recipe, model, batch, ctx = _setup(tmp_path, "noprop.num_blocks=2", "noprop.backbone=model")
    assert type(model.blocks[0].image.features).__name__ == "MLPVelocity"
    parts = list(recipe.training_losses(model, batch, ctx))
    assert len(parts) == 3 and all(torch.isfinite(p.loss) for p in parts)
    model.save_pretrained(tmp_path / "m")
    assert NoPropClassifier.from_pretrained(tmp_path / "m").predict(batch["x"]).shape == (16,)


# --------------------------------------------------------------------------- through the Trainer


@pytest.mark.parametrize("variant", ["dt", "ct", "fm", "backprop"])
def test_tiny_training_through_the_trainer(tmp_path, variant):
    from flowlab.recipes import Trainer

    cfg = _cfg(tmp_path, f"noprop.variant={variant}", "noprop.num_blocks=3", "train.max_steps=6", "train.checkpoint_every=3",
               "eval.enabled=true", "noprop.inference_steps=2", "noprop.eval_steps=[1]", "noprop.eval_max_examples=40")
    final = Trainer(cfg).train()
    assert 0.0 <= final["eval/accuracy"] <= 1.0
    if variant in ("ct", "fm"):
        assert "eval/accuracy_1_steps" in final
    out = tmp_path / "classifier"
    model = NoPropClassifier.from_pretrained(out)
    assert model.config.variant == variant
    from flowlab.data import load_digits_arrays

    x, _ = load_digits_arrays("test")
    assert model.predict(torch.from_numpy(x[:5])).shape == (5,)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-3", "checkpoint-6"]
    if variant == "dt":  # every block's local loss and the head's are logged
        import json

        rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
        assert {"block_0", "block_1", "block_2", "ce", "kl"} <= set(rec)


def test_dt_resume_is_exact(tmp_path):
    from flowlab.recipes import Trainer
    from safetensors.torch import load_file

    import shutil

    full = _cfg(tmp_path / "a", "noprop.num_blocks=2", "train.max_steps=6", "train.checkpoint_every=3")
    Trainer(full).train()
    # as if killed right after checkpoint-3 (a real mid-run checkpoint: LR schedule and all)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "checkpoint-6")
    shutil.rmtree(tmp_path / "b" / "classifier")
    resumed = _cfg(tmp_path / "b", "noprop.num_blocks=2", "train.max_steps=6", "train.checkpoint_every=3", "train.resume=latest")
    Trainer(resumed).train()
    w1 = load_file(tmp_path / "a" / "classifier" / "diffusion_pytorch_model.safetensors")
    w2 = load_file(tmp_path / "b" / "classifier" / "diffusion_pytorch_model.safetensors")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k])


# --------------------------------------------------------------------------- config


def test_noprop_section_validates():
    cfg = load_config(None, ["recipe=noprop", "noprop.variant=ct", "noprop.eval_steps=[1,5]"])
    assert cfg.noprop.variant == "ct" and cfg.noprop.eval_steps == [1, 5]
    with pytest.raises(ConfigError, match="noprop.variant"):
        load_config(None, ["recipe=noprop", "noprop.variant=xx"])
    with pytest.raises(ConfigError, match="noprop.embedding"):
        load_config(None, ["recipe=noprop", "noprop.embedding=random"])
    with pytest.raises(ConfigError, match="did you mean 'noprop.num_blocks'"):
        load_config(None, ["recipe=noprop", "noprop.num_block=3"])
    with pytest.raises(ConfigError, match="noprop.solver"):
        load_config(None, ["recipe=noprop", "noprop.solver=rk4"])


def test_noprop_needs_labels(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, "recipe=noprop", "data.name=moons"))
    recipe = get_recipe(cfg)
    with pytest.raises(ConfigError, match="noprop"):
        recipe.build_model(recipe.build_dataset())
