"""Tests for flowlab.metrics (Fréchet distance, digits classifier, evaluator) and the
eval/digits.py CLI. The classifier is trained once per session into a temporary cache."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import load_eval_script
from flowlab.data.digits import load_digits_arrays, to_unit_range
from flowlab.metrics import classifier as C
from flowlab.metrics import digits as D
from flowlab.metrics.digits import DigitsEvaluator, fd_from_features, frechet_distance

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- module layout


def test_public_names_importable_from_package_and_old_path():
    import flowlab.metrics as M
    from flowlab.metrics import frechet as Fr

    for name in ("frechet_distance", "fd_from_features", "feature_stats"):
        assert getattr(M, name) is getattr(Fr, name) is getattr(D, name)
    for name in ("DigitsClassifier", "CLASSIFIER_RECIPE", "CLASSIFIER_VERSION", "load_classifier"):
        assert getattr(M, name) is getattr(C, name) is getattr(D, name)
    for name in ("train_classifier", "classifier_path", "default_cache_dir", "classifier_accuracy", "FEATURE_DIM"):
        assert getattr(D, name) is getattr(C, name)
    assert M.DigitsEvaluator is D.DigitsEvaluator and M.prepare_images is D.prepare_images


# --------------------------------------------------------------------------- Fréchet distance


def _closed_form(mu1, s1, mu2, s2):
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(_closed_form(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)


def test_frechet_commuting_closed_form():
    # cov1 = Q diag(s1) Q^T and cov2 = Q diag(s2) Q^T commute: same closed form
    rng = np.random.default_rng(1)
    d = 12
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s1, s2 = rng.uniform(0.05, 2, size=d), rng.uniform(0.05, 2, size=d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    c1, c2 = q @ np.diag(s1) @ q.T, q @ np.diag(s2) @ q.T
    got = frechet_distance(mu1, c1, mu2, c2)
    assert got == pytest.approx(_closed_form(mu1, s1, mu2, s2), rel=1e-8, abs=1e-8)


def test_frechet_scalar_and_singular():
    # 1-d: (m1 - m2)^2 + (sd1 - sd2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(4.0 + 1.0)
    # singular (rank-deficient) covariances still give the closed form
    s1, s2 = np.array([1.0, 0.0, 2.0]), np.array([0.5, 0.0, 0.0])
    got = frechet_distance(np.zeros(3), np.diag(s1), np.ones(3), np.diag(s2))
    assert got == pytest.approx(_closed_form(np.zeros(3), s1, np.ones(3), s2), abs=1e-4)


def test_fd_self_zero_and_symmetric():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(500, 20))
    b = rng.normal(size=(400, 20)) * 1.3 + 0.2
    assert fd_from_features(a, a) == pytest.approx(0.0, abs=1e-8)
    ab, ba = fd_from_features(a, b), fd_from_features(b, a)
    assert ab > 0.5
    assert ab == pytest.approx(ba, rel=1e-8)
    # fewer samples than dimensions: singular covariances, still finite and ~0 for itself
    c = rng.normal(size=(10, 20))
    assert np.isfinite(fd_from_features(c, a))
    assert fd_from_features(c, c) == pytest.approx(0.0, abs=1e-4)
    # torch tensors are accepted
    assert fd_from_features(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(ab, rel=1e-10)


def test_frechet_shape_mismatch():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --------------------------------------------------------------------------- classifier / evaluator


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("flowlab_cache")


@pytest.fixture(scope="session")
def evaluator(cache_dir):
    t0 = time.perf_counter()
    ev = DigitsEvaluator.load(cache_dir)
    ev.load_seconds = time.perf_counter() - t0
    return ev


def test_classifier_trained_and_accurate(evaluator, cache_dir):
    assert evaluator.info["from_cache"] is False
    acc = D.classifier_accuracy(evaluator.model, "test")
    assert acc >= 0.95, acc
    assert evaluator.info["test_accuracy"] == pytest.approx(acc)
    print(f"\nclassifier test accuracy {acc:.4f}, trained in {evaluator.info['train_seconds']:.1f} s")
    path = Path(evaluator.info["path"])
    assert path.is_file() and path.parent.parent == Path(cache_dir)
    assert D.CLASSIFIER_VERSION in path.name
    # atomic write leaves no temporary files behind
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_cache_reload_identical(evaluator, cache_dir):
    ev2 = DigitsEvaluator.load(cache_dir)
    assert ev2.info["from_cache"] is True
    assert ev2.info["test_accuracy"] == pytest.approx(evaluator.info["test_accuracy"])
    x, _ = load_digits_arrays("test")
    assert torch.equal(evaluator.features(x), ev2.features(x))
    for a, b in zip(evaluator.model.state_dict().values(), ev2.model.state_dict().values()):
        assert torch.equal(a, b)


def test_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWLAB_CACHE", str(tmp_path))
    assert D.default_cache_dir() == tmp_path
    assert D.classifier_path().parent == tmp_path / "metrics"


def test_corrupt_cache_is_retrained(tmp_path, evaluator):
    path = D.classifier_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")
    # retraining would be slow; instead check load falls through to training by patching it
    calls = []

    def fake_train(recipe=None, verbose=False):
        calls.append(1)
        return evaluator.model, {"test_accuracy": 1.0, "train_seconds": 0.0}

    orig = C.train_classifier
    C.train_classifier = fake_train
    try:
        model, info = D.load_classifier(tmp_path)
    finally:
        C.train_classifier = orig
    assert calls and info["from_cache"] is False
    model2, info2 = D.load_classifier(tmp_path)
    assert info2["from_cache"] is True


def test_features_shapes_and_ranges(evaluator):
    x, _ = load_digits_arrays("test")
    x = x[:20]
    f = evaluator.features(x)
    assert f.shape == (20, D.FEATURE_DIM) and f.dtype == torch.float32
    xt = torch.from_numpy(x)
    unit = to_unit_range(xt)
    torch.testing.assert_close(evaluator.features(xt[:, 0]), f)  # (N, 8, 8)
    torch.testing.assert_close(evaluator.features(unit, value_range="unit"), f)  # (N, 1, 8, 8) in [0, 1]
    torch.testing.assert_close(evaluator.features(unit.permute(0, 2, 3, 1).numpy(), value_range="unit"), f)  # (N, 8, 8, 1)
    # values are clamped to the range
    torch.testing.assert_close(evaluator.features(xt * 5), evaluator.features((xt * 5).clamp(-1, 1)))
    assert not torch.allclose(evaluator.features(xt * 5), f)
    with pytest.raises(ValueError):
        evaluator.features(x, value_range="pixels")
    with pytest.raises(ValueError):
        evaluator.features(np.zeros((3, 28, 28)))


def test_evaluate_real_test_is_floor(evaluator):
    x, _ = load_digits_arrays("test")
    res = evaluator.evaluate(x)
    for k in ("fd", "floor", "confidence", "class_hist", "num_samples", "floor_num_samples"):
        assert k in res
    assert res["num_samples"] == 360 and res["floor_num_samples"] == 360
    assert res["fd"] == pytest.approx(res["floor"], rel=1e-9)
    assert 0 < res["floor"] < 50
    assert res["confidence"] > 0.9
    hist = np.array(res["class_hist"])
    assert hist.shape == (10,) and hist.sum() == pytest.approx(1.0)
    assert np.abs(hist - 0.1).max() < 0.03
    # through the unit range as well
    res_u = evaluator.evaluate(to_unit_range(torch.from_numpy(x)), value_range="unit")
    assert res_u["fd"] == pytest.approx(res["floor"], rel=1e-9)
    json.dumps(res)  # JSON-serialisable
    print(f"\nfloor (real test 360 vs train) {res['floor']:.4f}, confidence {res['confidence']:.4f}")


def test_evaluate_noise_far_from_floor(evaluator):
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(1000, 1, 8, 8, generator=g)
    res = evaluator.evaluate(noise, value_range="unit")
    assert res["num_samples"] == 1000
    assert res["fd"] > 20 * res["floor"], (res["fd"], res["floor"])
    print(f"\nFD of uniform noise (1000 samples) {res['fd']:.2f} = {res['fd'] / res['floor']:.0f} x floor")


def test_evaluate_degrades_monotonically_with_noise(evaluator):
    x, _ = load_digits_arrays("test")
    g = torch.Generator().manual_seed(1)
    xt = torch.from_numpy(x)
    fds = [evaluator.evaluate(xt + s * torch.randn(xt.shape, generator=g))["fd"] for s in (0.0, 0.2, 0.5)]
    assert fds[0] < fds[1] < fds[2]


def test_evaluate_nonfinite_and_too_few(evaluator):
    x, _ = load_digits_arrays("test")
    x = x[:50].copy()
    x[3, 0, 2, 2] = np.nan
    res = evaluator.evaluate(x)
    assert res["num_nonfinite"] == 1 and np.isfinite(res["fd"])
    with pytest.raises(ValueError):
        evaluator.evaluate(x[:1])


def test_training_deterministic_and_leaves_global_state():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    threads = torch.get_num_threads()
    r = dict(D.CLASSIFIER_RECIPE, epochs=1)
    m1, _ = D.train_classifier(r)
    assert torch.equal(before, torch.get_rng_state())
    assert torch.get_num_threads() == threads
    torch.manual_seed(999)  # a different global seed must not matter
    m2, _ = D.train_classifier(r)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- CLI


def _load_cli():
    return load_eval_script("digits")


def test_cli_real_test_json(evaluator, cache_dir, tmp_path, capsys):
    cli = _load_cli()
    out = tmp_path / "sub" / "real.json"
    res = cli.main(["--real-test", "--cache-dir", str(cache_dir), "--json", str(out)])
    data = json.loads(out.read_text())
    for k in ("fd", "floor", "confidence", "class_hist", "num_samples"):
        assert k in data
    assert data["num_samples"] == 360 and len(data["class_hist"]) == 10
    assert data["fd"] == pytest.approx(data["floor"], rel=1e-9)
    assert data["fd"] == pytest.approx(res["fd"])
    assert "floor" in capsys.readouterr().out


def test_cli_pipeline_sampling_with_fake_pipeline(evaluator):
    """sample_pipeline: batches, one shared generator, images in [0, 1], nfe from the output."""
    cli = _load_cli()
    x, _ = load_digits_arrays("train")
    pool = to_unit_range(torch.from_numpy(x))
    calls = []

    def fake_pipe(batch_size, num_inference_steps, solver, generator, output_type):
        assert output_type == "pt" and isinstance(generator, torch.Generator)
        calls.append(batch_size)
        idx = torch.randint(0, pool.shape[0], (batch_size,), generator=generator)
        return SimpleNamespace(images=pool[idx], nfe=2 * num_inference_steps)

    imgs, nfe = cli.sample_pipeline(fake_pipe, 250, 100, 16, "heun", 0)
    assert calls == [100, 100, 50] and imgs.shape == (250, 1, 8, 8) and nfe == 32
    imgs2, _ = cli.sample_pipeline(fake_pipe, 250, 100, 16, "heun", 0)
    assert torch.equal(imgs, imgs2)
    assert not torch.equal(imgs[:50], imgs[100:150])  # batches differ
    res = evaluator.evaluate(imgs, value_range="unit")
    assert res["fd"] < 3 * res["floor"]
    assert cli._solver_nfe("heun", 16) in (None, 32)


def test_cli_script_subprocess(cache_dir, tmp_path):
    """The script runs as ``python eval/digits.py`` from any folder, importing the installed package
    (here this checkout's ``src/``, as ``pip install -e .`` would make it importable); it never edits sys.path."""
    import subprocess
    import sys

    out = tmp_path / "r.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval" / "digits.py"), "--real-test", "--quiet", "--cache-dir", str(cache_dir), "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["fd"] == pytest.approx(data["floor"], rel=1e-9)


def test_cli_end_to_end_with_untrained_pipeline(evaluator, cache_dir, tmp_path):
    """A real (tiny, untrained) FlowPipeline saved and reloaded by the CLI."""
    try:
        from flowlab import FlowPipeline
        from flowlab.models import UNetVelocity
        from flowlab.pipelines.scheduling_flow import FlowScheduler

        torch.manual_seed(0)
        model = UNetVelocity(
            sample_shape=(1, 8, 8), block_out_channels=(16, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
        )
        FlowPipeline(velocity_model=model, scheduler=FlowScheduler()).save_pretrained(str(tmp_path / "pipe"))
    except Exception as e:  # the pipeline package is not ready: nothing to test against
        pytest.skip(f"cannot build a FlowPipeline: {e!r}")
    cli = _load_cli()
    out = tmp_path / "pipe.json"
    res = cli.main([
        "--pipeline", str(tmp_path / "pipe"), "--num-samples", "40", "--batch-size", "16", "--steps", "2",
        "--solver", "heun", "--seed", "0", "--cache-dir", str(cache_dir), "--json", str(out), "--quiet",
    ])
    data = json.loads(out.read_text())
    assert data["num_samples"] == 40 and data["solver"] == "heun" and data["steps"] == 2
    assert data["nfe"] == 4
    assert data["fd"] > 20 * data["floor"]  # untrained model: far from the digits
    assert data["fd"] == pytest.approx(res["fd"])
