"""FlowPipeline + FlowScheduler: save/load in a fresh process, output types, NFE, trajectories,
labels, classifier-free guidance, prediction-type conversion against closed forms, latents."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from PIL import Image
from torch import nn

from flowlab.flow import get_path, get_solver
from flowlab.flow.solvers import time_grid
from flowlab.models import MLPVelocity, UNetVelocity
from flowlab.models.base import VelocityModelMixin
from flowlab.pipelines import FlowPipeline, FlowPipelineOutput, FlowScheduler

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def _randomise(model, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model.eval()


def _mlp(shape=(1, 8, 8), num_classes=0, seed=0):
    torch.manual_seed(seed)
    return _randomise(MLPVelocity(sample_shape=shape, hidden_dim=16, depth=2, time_embed_dim=8, num_classes=num_classes), seed)


def _pipe(model, **sched):
    pipe = FlowPipeline(velocity_model=model, scheduler=FlowScheduler(**sched))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- hand-made models


class TableVelocity(ModelMixin, ConfigMixin, VelocityModelMixin):
    """``v(x, t, y) = scale[y] * x + table[y] + t``: a known velocity per label (label ``num_classes`` = null)."""

    @register_to_config
    def __init__(self, sample_shape=(2,), num_classes=3):
        super().__init__()
        d = int(np.prod(sample_shape))
        g = torch.Generator().manual_seed(0)
        self.table = nn.Parameter(torch.randn(num_classes + 1, d, generator=g, dtype=torch.float64))
        self.scale = nn.Parameter(torch.randn(num_classes + 1, generator=g, dtype=torch.float64) * 0.5)
        self.calls: list = []

    def forward(self, x, t, class_labels=None):
        self._check_input(x)
        labels = self._labels(class_labels, x.shape[0], x.device)
        self.calls.append(None if labels is None else labels.clone())
        b = x.shape[0]
        if labels is None:
            labels = torch.zeros(b, dtype=torch.long)
        v = self.scale[labels].reshape(b, *[1] * (x.ndim - 1)) * x + self.table[labels].reshape(x.shape[0], *x.shape[1:])
        return v + t.reshape(b, *[1] * (x.ndim - 1))


class ExactGaussianPredictor(ModelMixin, ConfigMixin, VelocityModelMixin):
    """The exact posterior predictor for data ``N(mu, s^2 I)`` on ``path``, in ``prediction_type``.

    With ``x_t = a x1 + sigma eps``: ``var = a^2 s^2 + sigma^2``, ``E[x1|x_t] = mu + a s^2 (x_t - a mu) / var``,
    ``E[eps|x_t] = sigma (x_t - a mu) / var`` and the marginal velocity is ``da E[x1] + dsigma E[eps]``.
    """

    @register_to_config
    def __init__(self, sample_shape=(2,), mu=(1.5, -0.5), s=0.5, path="linear", prediction_type="velocity", num_classes=0):
        super().__init__()
        self.mean = nn.Parameter(torch.tensor(mu, dtype=torch.float64))
        self._path = get_path(path)

    def forward(self, x, t, class_labels=None):
        self._check_input(x)
        s, mu = self.config.s, self.mean
        a, sg, da, ds = self._path.coefficients(t, x)
        var = a**2 * s**2 + sg**2
        r = x - a * mu
        x1 = mu + a * s**2 * r / var
        eps = sg * r / var
        return {"velocity": da * x1 + ds * eps, "x1": x1, "epsilon": eps}[self.config.prediction_type]


# --------------------------------------------------------------------------- save / load in a fresh process


_CHILD = r"""
import json, sys
import torch
sys.path.insert(0, {src!r})
from flowlab import FlowPipeline  # the user-facing import, nothing else imported first

res = {{}}
for name, kw in {calls!r}.items():
    pipe = FlowPipeline.from_pretrained({root!r} + "/" + name)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(generator=torch.Generator().manual_seed(123), output_type="pt", **kw)
    res[name] = {{
        "images": out.images.tolist(),
        "nfe": out.nfe,
        "scheduler": {{k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}},
        "model_class": type(pipe.velocity_model).__name__,
        "model_config": {{k: v for k, v in pipe.velocity_model.config.items() if not k.startswith("_")}},
    }}
print("RESULT" + json.dumps(res))
"""


def test_save_load_round_trip_in_fresh_process(tmp_path):
    torch.manual_seed(0)
    unet = _randomise(
        UNetVelocity(
            sample_shape=(1, 8, 8),
            block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            attention_head_dim=8,
            norm_num_groups=4,
        ),
        std=0.05,
    )
    pipes = {
        "mlp_cond": (
            _pipe(_mlp(num_classes=10), path="cosine", prediction_type="x1", solver="midpoint", num_inference_steps=5, shift=3.0, guidance_scale=2.0),
            {"class_labels": [3, 1, 4, 1]},
        ),
        "unet": (_pipe(unet, solver="euler", num_inference_steps=3), {"batch_size": 2}),
        "vector": (_pipe(_mlp((2,)), path="vp", prediction_type="epsilon", solver="multistep", num_inference_steps=4), {"batch_size": 6}),
    }
    expected = {}
    for name, (pipe, kw) in pipes.items():
        pipe.save_pretrained(tmp_path / name)
        files = {os.path.relpath(os.path.join(d, f), tmp_path / name) for d, _, fs in os.walk(tmp_path / name) for f in fs}
        assert files == {
            "model_index.json",
            "scheduler/scheduler_config.json",
            "velocity_model/config.json",
            "velocity_model/diffusion_pytorch_model.safetensors",
        }
        index = json.loads((tmp_path / name / "model_index.json").read_text())
        assert index["_class_name"] == "FlowPipeline"
        assert index["scheduler"] == ["flowlab.pipelines.scheduling_flow", "FlowScheduler"]
        expected[name] = pipe(generator=_gen(123), output_type="pt", **kw)

    code = _CHILD.format(src=SRC, root=str(tmp_path), calls={k: v[1] for k, v in pipes.items()})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    got = json.loads(line[len("RESULT") :])

    for name, (pipe, _) in pipes.items():
        child = got[name]
        assert child["model_class"] == type(pipe.velocity_model).__name__
        assert child["nfe"] == expected[name].nfe
        assert torch.equal(torch.tensor(child["images"], dtype=expected[name].images.dtype), expected[name].images), name
        for key in ("solver", "num_inference_steps", "shift", "path", "prediction_type", "guidance_scale"):
            assert child["scheduler"][key] == pipe.scheduler.config[key], (name, key)
    want = {"path": "cosine", "prediction_type": "x1", "solver": "midpoint", "num_inference_steps": 5, "shift": 3.0, "guidance_scale": 2.0}
    assert {k: got["mlp_cond"]["scheduler"][k] for k in want} == want
    assert got["mlp_cond"]["nfe"] == 10  # the saved default solver/steps were used: midpoint x 5
    assert got["mlp_cond"]["model_config"]["num_classes"] == 10
    assert list(got["vector"]["model_config"]["sample_shape"]) == [2]
    assert np.asarray(got["mlp_cond"]["images"]).shape == (4, 1, 8, 8)


def test_scheduler_config_round_trip(tmp_path):
    sched = FlowScheduler(path="vp", prediction_type="epsilon", solver="multistep", num_inference_steps=7, shift=2.5, guidance_scale=4.0, vp_beta_min=0.2, vp_beta_max=10.0)
    sched.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "scheduler_config.json")
    loaded = FlowScheduler.from_pretrained(tmp_path)
    for key in ("path", "prediction_type", "solver", "num_inference_steps", "shift", "guidance_scale", "vp_beta_min", "vp_beta_max"):
        assert loaded.config[key] == sched.config[key]
    assert loaded.path.beta_min == 0.2 and loaded.path.beta_max == 10.0
    assert len(loaded) == 7
    assert torch.equal(loaded.set_timesteps(), time_grid(7, shift=2.5))
    assert loaded.make_solver().name == "multistep"


@pytest.mark.parametrize("kw,match", [({"solver": "rk4"}, "unknown solver"), ({"path": "foo"}, "unknown path")])
def test_scheduler_rejects_bad_names(kw, match):
    with pytest.raises(ValueError, match=match):
        FlowScheduler(**kw)


def test_scheduler_defaults_drive_sampling():
    """solver / steps / shift come from the scheduler when not given to __call__."""
    pipe = _pipe(_mlp((2,)), solver="midpoint", num_inference_steps=5, shift=3.0)
    out = pipe(batch_size=2, output_type="pt", return_trajectory=True, generator=_gen())
    assert out.nfe == 10 and len(out.trajectory) == 6
    assert torch.equal(pipe.scheduler.timesteps, time_grid(5, shift=3.0))
    out = pipe(batch_size=2, output_type="pt", solver="euler", num_inference_steps=4, shift=1.0, generator=_gen())
    assert out.nfe == 4
    assert torch.equal(pipe.scheduler.timesteps, time_grid(4))


# --------------------------------------------------------------------------- output types


def test_image_output_types_agree():
    pipe = _pipe(_mlp((1, 8, 8)), solver="euler", num_inference_steps=3)
    pt = pipe(batch_size=3, generator=_gen(1), output_type="pt").images
    np_ = pipe(batch_size=3, generator=_gen(1), output_type="np").images
    pil = pipe(batch_size=3, generator=_gen(1), output_type="pil").images
    latent = pipe(batch_size=3, generator=_gen(1), output_type="latent").images
    assert isinstance(pt, torch.Tensor) and pt.shape == (3, 1, 8, 8)
    assert isinstance(np_, np.ndarray) and np_.shape == (3, 8, 8, 1) and np_.dtype == np.float32
    assert 0.0 <= np_.min() and np_.max() <= 1.0
    assert 0.0 <= pt.min() and pt.max() <= 1.0
    # the untrained model drives samples outside [-1, 1]: the clamp is really exercised
    assert (latent.abs() > 1).any()
    assert torch.allclose(pt, ((latent + 1) / 2).clamp(0, 1))
    np.testing.assert_allclose(np_, pt.permute(0, 2, 3, 1).numpy())
    assert isinstance(pil, list) and len(pil) == 3
    for img, arr in zip(pil, np_):
        assert isinstance(img, Image.Image) and img.size == (8, 8) and img.mode == "L"
        np.testing.assert_array_equal(np.asarray(img), (arr[..., 0] * 255).round().astype(np.uint8))


def test_rgb_pil_output():
    pipe = _pipe(_mlp((3, 8, 8)), solver="euler", num_inference_steps=2)
    pil = pipe(batch_size=2, generator=_gen(), output_type="pil").images
    assert [(im.size, im.mode) for im in pil] == [((8, 8), "RGB")] * 2
    np_ = pipe(batch_size=2, generator=_gen(), output_type="np").images
    assert np_.shape == (2, 8, 8, 3)


def test_return_dict_false_and_bad_output_type():
    pipe = _pipe(_mlp((1, 8, 8)), solver="euler", num_inference_steps=2)
    out = pipe(batch_size=2, generator=_gen(), output_type="pt", return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="output_type"):
        pipe(batch_size=2, output_type="tensor")


def test_vector_output_types():
    model = _mlp((2,))
    pipe = _pipe(model, solver="euler", num_inference_steps=4)
    pt = pipe(batch_size=5, generator=_gen(2), output_type="pt").images
    np_ = pipe(batch_size=5, generator=_gen(2), output_type="np").images
    assert isinstance(pt, torch.Tensor) and pt.shape == (5, 2)
    assert isinstance(np_, np.ndarray) and np_.shape == (5, 2)
    np.testing.assert_allclose(np_, pt.numpy())
    # vectors are raw samples, not rescaled or clamped: compare with a hand-written Euler loop
    x = torch.randn(5, 2, generator=_gen(2))
    ts = torch.linspace(0, 1, 5)
    with torch.no_grad():
        for t0, t1 in zip(ts[:-1], ts[1:]):
            x = x + (t1 - t0) * model(x, t0.expand(5))
    assert torch.allclose(pt, x, atol=1e-5)
    assert (pt.abs() > 1).any() or (pt < 0).any()
    with pytest.raises(ValueError, match="pil"):
        pipe(batch_size=2, output_type="pil")


# --------------------------------------------------------------------------- NFE, trajectories, latents


@pytest.mark.parametrize("solver,per_step", [("euler", 1), ("heun", 2), ("midpoint", 2), ("multistep", 1)])
@pytest.mark.parametrize("steps", [1, 3, 6])
def test_nfe_equals_steps_times_nfe_per_step(solver, per_step, steps):
    model = TableVelocity()
    pipe = _pipe(model)
    out = pipe(batch_size=2, num_inference_steps=steps, solver=solver, generator=_gen(), output_type="pt")
    assert out.nfe == steps * per_step
    assert len(model.calls) == out.nfe  # the reported number is the number of network calls


def test_nfe_with_guidance_counts_one_batched_call_per_evaluation():
    model = TableVelocity()
    pipe = _pipe(model)
    out = pipe(class_labels=[0, 2], guidance_scale=3.0, num_inference_steps=4, solver="heun", generator=_gen(), output_type="pt")
    assert out.nfe == 8 and len(model.calls) == 8
    assert model.calls[0].tolist() == [0, 2, 3, 3]  # conditional and null branches in one batch


@pytest.mark.parametrize("solver", ["euler", "heun", "multistep"])
def test_return_trajectory(solver):
    pipe = _pipe(_mlp((1, 8, 8)))
    latents = torch.randn(2, 1, 8, 8, generator=_gen(5))
    out = pipe(batch_size=2, latents=latents, num_inference_steps=4, solver=solver, output_type="latent", return_trajectory=True)
    assert len(out.trajectory) == 5
    assert all(s.shape == (2, 1, 8, 8) for s in out.trajectory)
    assert torch.equal(out.trajectory[0], latents)  # starts from the noise (t = 0) ...
    assert torch.allclose(out.trajectory[-1], out.images)  # ... and ends at the sample (t = 1)
    assert pipe(batch_size=2, latents=latents, num_inference_steps=4, solver=solver, output_type="pt").trajectory is None


def test_latents_are_used_and_generator_is_reproducible():
    pipe = _pipe(_mlp((2,)), solver="heun", num_inference_steps=3)
    a = pipe(batch_size=4, generator=_gen(7), output_type="pt").images
    b = pipe(batch_size=4, generator=_gen(7), output_type="pt").images
    c = pipe(batch_size=4, generator=_gen(8), output_type="pt").images
    d = pipe(batch_size=4, latents=torch.randn(4, 2, generator=_gen(7)), output_type="pt").images
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.allclose(a, d)


@pytest.mark.parametrize("shape", [(3, 2), (4, 3), (4,), (4, 1, 2)])
def test_latents_of_wrong_shape_raise(shape):
    pipe = _pipe(_mlp((2,)))
    with pytest.raises(ValueError, match=r"latents must have shape \(4, 2\)"):
        pipe(batch_size=4, latents=torch.randn(*shape), output_type="pt")


def test_image_latents_of_wrong_shape_raise():
    pipe = _pipe(_mlp((1, 8, 8)))
    with pytest.raises(ValueError, match=r"latents must have shape \(2, 1, 8, 8\)"):
        pipe(batch_size=2, latents=torch.randn(2, 8, 8, 1), output_type="pt")


# --------------------------------------------------------------------------- class labels and guidance


def test_class_labels_int_list_tensor():
    model = TableVelocity()
    pipe = _pipe(model, solver="euler", num_inference_steps=1)
    out = pipe(batch_size=3, class_labels=2, generator=_gen(), output_type="pt")
    assert out.images.shape == (3, 2) and model.calls[-1].tolist() == [2, 2, 2]
    out = pipe(class_labels=[0, 1, 2, 1, 0], generator=_gen(), output_type="pt")  # the list sets the batch size
    assert out.images.shape == (5, 2) and model.calls[-1].tolist() == [0, 1, 2, 1, 0]
    out = pipe(batch_size=2, class_labels=torch.tensor([2, 0]), generator=_gen(), output_type="pt")
    assert out.images.shape == (2, 2) and model.calls[-1].tolist() == [2, 0]
    for scalar in (np.int64(1), torch.tensor(1)):  # numpy and 0-d tensor ints act like int
        out = pipe(batch_size=3, class_labels=scalar, generator=_gen(), output_type="pt")
        assert out.images.shape == (3, 2) and model.calls[-1].tolist() == [1, 1, 1]
    out = pipe(class_labels=np.array([2, 1]), generator=_gen(), output_type="pt")
    assert model.calls[-1].tolist() == [2, 1]
    out = pipe(batch_size=4, generator=_gen(), output_type="pt")  # no labels -> the model's null class
    assert out.images.shape == (4, 2) and model.calls[-1].tolist() == [3, 3, 3, 3]
    # labels really reach the sample: same noise, different label, different result
    z = torch.randn(2, 2, generator=_gen(9), dtype=torch.float64)
    assert not torch.allclose(pipe(latents=z, class_labels=[0, 0], output_type="pt").images, pipe(latents=z, class_labels=[1, 1], output_type="pt").images)


def test_class_label_errors():
    pipe = _pipe(TableVelocity(num_classes=3))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        pipe(class_labels=3, batch_size=2, output_type="pt")  # the null class is not a user label
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        pipe(class_labels=[0, -1], output_type="pt")
    with pytest.raises(ValueError, match="batch_size=3"):
        pipe(class_labels=[0, 1], batch_size=3, output_type="pt")
    with pytest.raises(ValueError, match="unconditional"):
        _pipe(_mlp((2,)))(class_labels=0, output_type="pt")


@pytest.mark.parametrize("w", [0.0, 2.5])
def test_guidance_scale_without_labels_raises(w):
    pipe = _pipe(TableVelocity())
    with pytest.raises(ValueError, match="guidance_scale != 1 needs class_labels"):
        pipe(batch_size=2, guidance_scale=w, output_type="pt")
    with pytest.raises(ValueError, match="guidance_scale != 1 needs class_labels"):
        _pipe(TableVelocity(), guidance_scale=w)(batch_size=2, output_type="pt")  # the scheduler's default too


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0, -0.5])
def test_guided_velocity_is_v_null_plus_w_times_difference(w):
    model = TableVelocity(sample_shape=(2,), num_classes=3)
    pipe = _pipe(model)
    labels = torch.tensor([0, 2, 1])
    field = pipe.velocity_field(labels, w)
    x = torch.randn(3, 2, generator=_gen(3), dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    with torch.no_grad():
        v_cond = model(x, t, labels)
        v_null = model(x, t, torch.full((3,), 3))
        assert torch.allclose(field(x, t), v_null + w * (v_cond - v_null))


@pytest.mark.parametrize("w", [0.0, 2.0, 4.0])
def test_guided_sampling_closed_form(w):
    """A velocity constant in x and t per label: Euler lands exactly at z + v_null + w (v_cond - v_null)."""

    class ConstVelocity(TableVelocity):
        def forward(self, x, t, class_labels=None):
            labels = self._labels(class_labels, x.shape[0], x.device)
            return self.table[labels].reshape(x.shape)

    model = ConstVelocity(sample_shape=(2,), num_classes=3)
    pipe = _pipe(model, solver="euler", num_inference_steps=5)
    z = torch.randn(4, 2, generator=_gen(4), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0])
    out = pipe(latents=z, class_labels=labels, guidance_scale=w, output_type="pt").images
    table = model.table.detach()
    want = z + table[3] + w * (table[labels] - table[3])
    assert torch.allclose(out, want, atol=1e-12)


def test_guided_sampling_matches_manual_heun():
    model = TableVelocity(sample_shape=(2,), num_classes=3)
    pipe = _pipe(model, solver="heun", num_inference_steps=3)
    z = torch.randn(2, 2, generator=_gen(6), dtype=torch.float64)
    labels = torch.tensor([2, 0])
    w = 2.5
    out = pipe(latents=z, class_labels=labels, guidance_scale=w, output_type="pt").images

    def f(x, t):
        tt = torch.full((2,), float(t), dtype=torch.float64)
        vn = model(x, tt, torch.full((2,), 3))
        return vn + w * (model(x, tt, labels) - vn)

    x, ts = z.clone(), torch.linspace(0, 1, 4, dtype=torch.float64)
    with torch.no_grad():
        for t0, t1 in zip(ts[:-1], ts[1:]):
            k1 = f(x, t0)
            k2 = f(x + (t1 - t0) * k1, t1)
            x = x + (t1 - t0) * (k1 + k2) / 2
    assert torch.allclose(out, x, atol=1e-10)


# --------------------------------------------------------------------------- prediction types against closed forms


MU, S = (1.5, -0.5), 0.5


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_exact_velocity_maps_noise_to_data(path):
    """For data N(mu, s^2 I) the exact flow maps noise z (t = 0) to mu + s z (t = 1): checks time direction."""
    pipe = _pipe(ExactGaussianPredictor(mu=MU, s=S, path=path), path=path, solver="heun", num_inference_steps=40)
    z = torch.randn(500, 2, generator=_gen(0), dtype=torch.float64)
    out = pipe(batch_size=len(z), latents=z, output_type="pt").images
    want = torch.tensor(MU, dtype=torch.float64) + S * z
    assert torch.allclose(out, want, atol=2e-3)
    assert torch.allclose(out.mean(0), torch.tensor(MU, dtype=torch.float64), atol=0.1)


@pytest.mark.parametrize("path", ["linear", "cosine", "vp"])
@pytest.mark.parametrize("pred", ["x1", "epsilon"])
def test_prediction_types_give_the_velocity_field_inside_the_interval(pred, path):
    """Away from the endpoints the scheduler's conversion of an exact x1/eps predictor is the exact velocity."""
    z = torch.randn(16, 2, generator=_gen(2), dtype=torch.float64)
    fields = {
        kind: _pipe(ExactGaussianPredictor(mu=MU, s=S, path=path, prediction_type=kind), path=path, prediction_type=kind).velocity_field()
        for kind in ("velocity", pred)
    }
    for t in (0.01, 0.3, 0.7, 0.99):
        tt = torch.full((16,), t, dtype=torch.float64)
        with torch.no_grad():
            assert torch.allclose(fields[pred](z, tt), fields["velocity"](z, tt), atol=1e-9, rtol=1e-9), t


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint", "multistep"])
@pytest.mark.parametrize("path", ["linear", "cosine", "vp"])
@pytest.mark.parametrize("pred", ["x1", "epsilon"])
def test_prediction_types_sample_like_velocity(pred, path, solver):
    """An exact x1- or eps-predictor sampled through the scheduler's conversion gives the velocity model's samples
    (up to the small bias of reading x1/eps models at t in [1e-3, 1 - 1e-3])."""
    z = torch.randn(64, 2, generator=_gen(1), dtype=torch.float64)
    samples = {}
    for kind in ("velocity", pred):
        model = ExactGaussianPredictor(mu=MU, s=S, path=path, prediction_type=kind)
        pipe = _pipe(model, path=path, prediction_type=kind, solver=solver, num_inference_steps=8)
        samples[kind] = pipe(batch_size=len(z), latents=z, output_type="pt").images
    assert torch.isfinite(samples[pred]).all()
    # VP's sigma_t ~ sqrt(1 - t): its velocity changes fast next to t = 1, where heun evaluates
    tol = 0.05 if (path == "vp" and solver == "heun") else 5e-3
    err = (samples[pred] - samples["velocity"]).abs().max()
    assert err < tol, err


class _SlightlyWrong(ExactGaussianPredictor):
    """The exact predictor plus a smooth error of size 1e-3, as any trained network has."""

    def forward(self, x, t, class_labels=None):
        return super().forward(x, t) + 1e-3 * torch.sin(7 * x + 3 * t.reshape(-1, 1))


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint", "multistep"])
@pytest.mark.parametrize("path", ["linear", "cosine", "vp"])
@pytest.mark.parametrize("pred", ["velocity", "x1", "epsilon"])
def test_small_model_error_stays_small_for_every_prediction_type(pred, path, solver):
    """Regression: x1 models read at t = 1 (sigma = 0, e.g. heun's last stage) and eps models read at t = 0
    (alpha = 0, every solver's first stage) turned a 1e-3 model error into sample errors of 10 to 1e12."""
    z = torch.randn(256, 2, generator=_gen(1), dtype=torch.float64)
    ref = _pipe(ExactGaussianPredictor(mu=MU, s=S, path=path), path=path, solver=solver, num_inference_steps=16)
    noisy = _pipe(_SlightlyWrong(mu=MU, s=S, path=path, prediction_type=pred), path=path, prediction_type=pred, solver=solver, num_inference_steps=16)
    a = ref(batch_size=256, latents=z, output_type="pt").images
    b = noisy(batch_size=256, latents=z, output_type="pt").images
    err = (a - b).abs().max()
    assert err < 0.06, err


def test_prediction_type_mismatch_changes_samples():
    """The scheduler's prediction_type is really applied (reading an x1 model as velocity differs)."""
    model = ExactGaussianPredictor(mu=MU, s=S, prediction_type="x1")
    z = torch.randn(16, 2, generator=_gen(1), dtype=torch.float64)
    right = _pipe(model, prediction_type="x1", solver="heun", num_inference_steps=8)(batch_size=16, latents=z, output_type="pt").images
    wrong = _pipe(model, prediction_type="velocity", solver="heun", num_inference_steps=8)(batch_size=16, latents=z, output_type="pt").images
    assert not torch.allclose(right, wrong, atol=1e-2)


def test_output_dataclass():
    out = _pipe(_mlp((2,)), solver="euler", num_inference_steps=2)(batch_size=1, output_type="pt")
    assert isinstance(out, FlowPipelineOutput) and out.nfe == 2 and out.trajectory is None


def test_dopri5_runs_through_the_pipeline_with_a_progress_bar():
    """The adaptive solver has no step count: the pipeline's NFE bar must cope (it raised before)."""
    import torch

    from flowlab import FlowPipeline, FlowScheduler, MLPVelocity

    pipe = FlowPipeline(velocity_model=MLPVelocity(sample_shape=(2,), hidden_dim=16, depth=1), scheduler=FlowScheduler())
    out = pipe(batch_size=3, solver="dopri5", output_type="pt", generator=torch.Generator().manual_seed(0))
    ref = pipe(batch_size=3, solver="dopri5", output_type="pt", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (3, 2) and out.nfe > 6
    torch.testing.assert_close(out.images, ref.images)


# --------------------------------------------------------------------------- one sampling entry, argument checks, loading


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun", "multistep", "dopri5"])
@pytest.mark.parametrize("pred,path", [("velocity", "linear"), ("x1", "cosine"), ("epsilon", "vp")])
def test_pipeline_samples_are_the_solver_level_result_to_the_bit(solver, pred, path):
    """Regression: FlowPipeline(...) returns exactly what the named solver gives on the pipeline's
    (guided) velocity field and time grid: same bits, same NFE, same trajectory."""
    pipe = _pipe(_mlp(num_classes=4), path=path, prediction_type=pred, rtol=1e-4, atol=1e-4)
    labels = torch.tensor([0, 3, 1])
    latents = torch.randn(3, 1, 8, 8, generator=_gen(5))
    out = pipe(num_inference_steps=6, solver=solver, shift=2.0, class_labels=labels, guidance_scale=1.5, latents=latents,
               output_type="latent", return_trajectory=True)
    field = pipe.velocity_field(labels, 1.5)
    ref = get_solver(solver, path=get_path(path), rtol=1e-4, atol=1e-4).solve(field, latents, time_grid(6, shift=2.0), return_trajectory=True)
    assert torch.equal(out.images, ref.x) and out.nfe == ref.nfe
    assert all(torch.equal(a, b) for a, b in zip(out.trajectory, ref.trajectory)) and len(out.trajectory) == len(ref.trajectory)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"num_inference_steps": 0}, "num_inference_steps must be an integer >= 1, got 0"),
        ({"num_inference_steps": 2.5}, "num_inference_steps must be an integer >= 1, got 2.5"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"batch_size": -2}, "batch_size must be an integer >= 1, got -2"),
        ({"solver": "rk4"}, "solver must be one of .* got 'rk4'"),
        ({"shift": 0.0}, "shift must be > 0.0, got 0.0"),
        ({"shift": float("inf")}, "shift must be a finite number, got inf"),
        ({"guidance_scale": float("nan"), "class_labels": 1}, "guidance_scale must be a finite number, got nan"),
        ({"class_labels": []}, "class_labels is empty"),
        ({"class_labels": [0.5, 1.0]}, "class_labels must be integers"),
        ({"class_labels": [1, 7]}, r"class_labels must lie in \[0, 3\], got \[1, 7\]"),
        ({"class_labels": [1, 2], "batch_size": 3}, "got 2 class_labels for batch_size=3"),
        ({"class_labels": "abc"}, "class_labels must be"),
        ({"output_type": "jpg"}, "output_type must be"),
        ({"latents": torch.zeros(2, 1, 8, 7)}, r"latents must have shape \(2, 1, 8, 8\), got \(2, 1, 8, 7\)"),
        ({"latents": torch.zeros(2, 1, 8, 8, dtype=torch.long)}, "latents must be a floating-point tensor"),
    ],
)
def test_call_arguments_are_checked_up_front(kw, match):
    model = _mlp(num_classes=4)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    pipe = _pipe(model)
    with pytest.raises(ValueError, match=match):
        pipe(**kw)
    assert not calls  # nothing ran before the error


def test_num_inference_steps_none_uses_the_scheduler_default_and_one_step_works():
    pipe = _pipe(_mlp(), solver="euler", num_inference_steps=5)
    assert pipe(output_type="pt").nfe == 5
    assert pipe(num_inference_steps=1, output_type="pt").nfe == 1


def test_wgf_pipeline_checks_its_arguments_up_front():
    from diffusers import DDPMScheduler, UNet2DModel

    from flowlab.wgf import WGFPipeline

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    pipe = WGFPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100))
    for kw, match in [
        ({"num_inference_steps": 0}, "num_inference_steps must be an integer >= 1, got 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"eta": -1.0}, "eta must be >= 0.0, got -1.0"),
        ({"eta": 1.0, "solver": "heun"}, "solver must be 'euler'"),
        ({"solver": "rk4"}, "solver must be one of"),
        ({"shift": -1.0}, "shift must be > 0.0"),
        ({"prediction_type": "noise"}, "prediction_type must be one of"),
        ({"timestep_input": "int"}, "timestep_input must be"),
        ({"output_type": "jpg"}, "output_type must be"),
        ({"class_labels": [-1]}, r"class_labels must lie in \[0\], got \[-1\]"),
        ({"latents": torch.zeros(2, 1, 4, 4)}, r"latents must have shape \(2, 1, 8, 8\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            pipe(**kw)


def test_from_pretrained_names_a_missing_folder_and_a_run_folder(tmp_path, monkeypatch):
    from flowlab.wgf import WGFPipeline, load_probability_flow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "runs" / "quickstart"
    _pipe(_mlp()).save_pretrained(run / "pipeline")
    (run / "config.yaml").write_text("recipe: flow_matching\n")
    (tmp_path / "empty").mkdir()
    for loader in (FlowPipeline.from_pretrained, WGFPipeline.from_pretrained, load_probability_flow):
        for missing in ("runs/quickstrt", "runs/quickstart/pipline", "./nothing", str(tmp_path / "nothing"), "a//b"):
            with pytest.raises(FileNotFoundError, match=f"no such folder: '{missing}'"):
                loader(missing)
        for folder in ("runs/quickstart", str(run)):
            with pytest.raises(FileNotFoundError, match=f"training run folder.*load '{folder}/pipeline'"):
                loader(folder)
        with pytest.raises(FileNotFoundError, match="holds no model_index.json"):
            loader("empty")
    assert FlowPipeline.from_pretrained("runs/quickstart/pipeline").velocity_model.sample_shape == (1, 8, 8)


def test_a_hub_repo_id_still_goes_to_the_hub(tmp_path, monkeypatch):
    """``owner/name`` with no local ``owner`` folder is a Hub id: offline, huggingface_hub's own error comes back."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from flowlab.pipelines.loading import is_local_reference

    assert not is_local_reference("someone/some-model")
    assert is_local_reference("./some-model") and is_local_reference("a/b/c") and is_local_reference("bad name")
    (tmp_path / "someone").mkdir()
    assert is_local_reference("someone/some-model")


@pytest.mark.parametrize("key", ["model.pretrained", "rl.base", "reflow.teacher"])
def test_load_flow_pipeline_names_the_key_and_the_problem(tmp_path, key):
    """The one loader behind model.pretrained, rl.base and reflow.teacher: a pipeline loads; each failure is a
    ConfigError naming the key, the reference and what is wrong there."""
    from flowlab.errors import ConfigError
    from flowlab.pipelines.loading import load_flow_pipeline

    good = tmp_path / "run" / "pipeline"
    FlowPipeline(MLPVelocity(sample_shape=(2,), hidden_dim=8, depth=1, time_embed_dim=4), FlowScheduler()).save_pretrained(good)
    assert isinstance(load_flow_pipeline(str(good), key), FlowPipeline)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model_index.json").write_text("{}")
    cases = [
        (tmp_path / "nowhere", r"train it first"),  # a missing local folder: the hint to train it
        (tmp_path / "junk", r"lacks the key '_class_name'"),
        (tmp_path / "run", r"training run folder.*pipeline"),  # the run folder, not its pipeline
    ]
    for ref, problem in cases:
        with pytest.raises(ConfigError, match=rf"^{key}: cannot load a FlowPipeline from '{ref}'.*{problem}"):
            load_flow_pipeline(str(ref), key)
