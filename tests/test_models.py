"""Velocity networks: shapes, save/load round trips, class conditioning, input checks, attention backends."""
import os

import pytest
import torch
from torch import nn

from flowlab.models import MODEL_TYPES, DiTVelocity, MLPVelocity, UNetVelocity, set_attention_backend

IMG = (1, 8, 8)


def _mlp(shape=IMG, num_classes=0):
    return MLPVelocity(sample_shape=shape, hidden_dim=16, depth=2, time_embed_dim=8, num_classes=num_classes)


def _unet(shape=IMG, num_classes=0):
    return UNetVelocity(
        sample_shape=shape,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=4,
        num_classes=num_classes,
    )


def _dit(shape=IMG, num_classes=0):
    return DiTVelocity(sample_shape=shape, num_layers=1, num_attention_heads=2, attention_head_dim=8, patch_size=2, num_classes=num_classes)


# (id, factory, sample_shape)
CASES = [
    ("mlp-img", _mlp, IMG),
    ("mlp-vec", _mlp, (2,)),
    ("unet", _unet, IMG),
    ("dit", _dit, IMG),
]
IDS = [c[0] for c in CASES]
IMAGE_CASES = [c for c in CASES if c[0] != "mlp-vec"]


def _build(factory, shape, num_classes=0, seed=0):
    """A tiny model with all parameters randomised, so no zero-initialised layer hides a dependency."""
    torch.manual_seed(seed)
    model = factory(shape, num_classes).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _inputs(shape, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=g), torch.rand(batch, generator=g)


def test_model_types_registry():
    from flowlab.models import ConservativeVelocity

    assert MODEL_TYPES == {"mlp": MLPVelocity, "unet": UNetVelocity, "dit": DiTVelocity, "conservative": ConservativeVelocity}


@pytest.mark.parametrize("name,factory,shape", CASES, ids=IDS)
def test_output_shape_equals_input_shape(name, factory, shape):
    model = _build(factory, shape)
    x, t = _inputs(shape, batch=3)
    with torch.no_grad():
        v = model(x, t)
    assert v.shape == x.shape
    assert v.dtype == x.dtype
    assert torch.isfinite(v).all()
    assert model.sample_shape == shape
    assert model.num_classes == 0 and model.null_label is None


@pytest.mark.parametrize("name,factory,shape", CASES, ids=IDS)
def test_output_depends_on_time(name, factory, shape):
    model = _build(factory, shape)
    x, _ = _inputs(shape)
    with torch.no_grad():
        v0 = model(x, torch.full((3,), 0.1))
        v1 = model(x, torch.full((3,), 0.9))
    assert not torch.allclose(v0, v1, atol=1e-5)


@pytest.mark.parametrize("name,factory,shape", CASES, ids=IDS)
def test_save_load_round_trip(name, factory, shape, tmp_path):
    model = _build(factory, shape, num_classes=3)
    model.save_pretrained(tmp_path / "m")
    files = os.listdir(tmp_path / "m")
    assert "diffusion_pytorch_model.safetensors" in files
    assert "config.json" in files
    assert not any(f.endswith(".bin") for f in files)
    loaded = type(model).from_pretrained(tmp_path / "m").eval()
    assert type(loaded) is type(model)
    assert loaded.sample_shape == shape
    assert loaded.num_classes == 3
    x, t = _inputs(shape)
    y = torch.tensor([0, 2, 3])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), loaded(x, t, y))
        assert torch.equal(model(x, t), loaded(x, t))


@pytest.mark.parametrize("name,factory,shape", CASES, ids=IDS)
def test_class_conditioning(name, factory, shape):
    model = _build(factory, shape, num_classes=4)
    assert model.num_classes == 4 and model.null_label == 4
    x, t = _inputs(shape, batch=2)
    with torch.no_grad():
        v_a = model(x, t, torch.tensor([0, 0]))
        v_b = model(x, t, torch.tensor([1, 1]))
        v_null = model(x, t, torch.tensor([4, 4]))  # the null label is accepted
        v_none = model(x, t)  # no labels = the null class
        v_mixed = model(x, t, torch.tensor([0, 1]))
    assert v_a.shape == x.shape
    assert not torch.allclose(v_a, v_b, atol=1e-5)
    assert not torch.allclose(v_a, v_null, atol=1e-5)
    assert torch.allclose(v_null, v_none)
    # labels act per sample
    assert torch.allclose(v_mixed[0], v_a[0], atol=1e-5) and torch.allclose(v_mixed[1], v_b[1], atol=1e-5)


@pytest.mark.parametrize("name,factory,shape", CASES, ids=IDS)
@pytest.mark.parametrize("bad", [-1, 5, 100])
def test_out_of_range_labels_raise(name, factory, shape, bad):
    model = _build(factory, shape, num_classes=4)
    x, t = _inputs(shape, batch=2)
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 4\]"):
        model(x, t, torch.tensor([0, bad]))


@pytest.mark.parametrize("name,factory,shape", CASES, ids=IDS)
def test_label_count_must_match_batch(name, factory, shape):
    model = _build(factory, shape, num_classes=4)
    x, t = _inputs(shape, batch=3)
    with pytest.raises(ValueError, match="2 entries for a batch of 3"):
        model(x, t, torch.tensor([0, 1]))


@pytest.mark.parametrize("name,factory,shape", CASES, ids=IDS)
def test_labels_for_unconditional_model_raise(name, factory, shape):
    model = _build(factory, shape)
    x, t = _inputs(shape, batch=2)
    with pytest.raises(ValueError, match="unconditional"):
        model(x, t, torch.tensor([0, 0]))


@pytest.mark.parametrize("name,factory,shape", CASES, ids=IDS)
def test_wrong_input_shape_raises_naming_expected_shape(name, factory, shape):
    model = _build(factory, shape)
    expected = "(B, " + ", ".join(map(str, shape)) + ")"
    bad_shape = (3,) if shape == (2,) else (1, 16, 16)
    x = torch.randn(2, *bad_shape)
    with pytest.raises(ValueError) as e:
        model(x, torch.rand(2))
    assert expected in str(e.value)
    assert type(model).__name__ in str(e.value)
    assert str(tuple(x.shape)) in str(e.value)


def test_mlp_accepts_scalar_time():
    model = _build(_mlp, (2,))
    x, _ = _inputs((2,), batch=4)
    with torch.no_grad():
        a = model(x, torch.tensor(0.3))
        b = model(x, torch.full((4,), 0.3))
    assert torch.allclose(a, b)


@pytest.mark.parametrize("factory", [_unet, _dit])
def test_non_square_images_rejected(factory):
    with pytest.raises(ValueError, match="square"):
        factory((1, 8, 6))


# ---------------------------------------------------------------- attention backends


@pytest.mark.parametrize("factory", [_unet, _dit, _mlp], ids=["unet", "dit", "mlp"])
def test_xformers_on_cpu_raises_runtime_error(factory):
    model = _build(factory, IMG)
    with pytest.raises(RuntimeError, match="xformers"):
        set_attention_backend(model, "xformers")


def test_xformers_error_when_installed_but_no_cuda(monkeypatch):
    """With xformers importable but no CUDA device, the error still names xformers (and sdpa as the fix)."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="xformers") as e:
        set_attention_backend(_unet(), "xformers")
    assert "sdpa" in str(e.value)


def test_xformers_error_when_not_installed(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "xformers", None)  # makes `import xformers` raise ImportError
    with pytest.raises(RuntimeError, match="xformers") as e:
        set_attention_backend(_unet(), "xformers")
    assert "pip install" in str(e.value)


@pytest.mark.parametrize("name,factory,shape", CASES, ids=IDS)
def test_sdpa_is_a_no_op(name, factory, shape):
    model = _build(factory, shape)
    x, t = _inputs(shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        v0 = model(x, t)
    assert set_attention_backend(model, "sdpa") is None
    set_attention_backend(model)  # the default is sdpa
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(x, t), v0)


@pytest.mark.parametrize("backend", ["flash", "XFORMERS", "", "math"])
def test_unknown_backend_raises_value_error(backend):
    with pytest.raises(ValueError, match="model.attention must be one of"):
        set_attention_backend(nn.Linear(2, 2), backend)
