"""``python train.py``: clear one-paragraph errors with exit code 2, a tiny real run, refusal to
overwrite, resume of a finished run, --help."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from flowlab.cli import train_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")


def _run(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.path.join(ROOT, "src")}
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def _assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    err = [ln for ln in lines if ln.startswith("flowlab: error:")]
    assert len(err) == 1, proc.stderr
    assert "\n\n" not in proc.stderr.strip()  # one paragraph
    for frag in fragments:
        assert frag in err[0], (frag, err[0])
    return err[0]


def test_typo_in_a_key_exits_2_with_a_suggestion():
    run_dir = os.path.join(ROOT, "runs", "quickstart")
    existed = os.path.exists(run_dir)
    proc = _run("--config", QUICKSTART, "train.max_stpes=5")
    _assert_clean_error(proc, "'train.max_stpes'", "did you mean 'train.max_steps'")
    assert existed or not os.path.exists(run_dir)  # rejected before anything was written


def test_help():
    proc = _run("--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--config" in proc.stdout and "key=value" in proc.stdout and "train.max_steps" in proc.stdout
    assert proc.stderr.strip() == ""


# --------------------------------------------------------------------------- in-process error paths (fast)


@pytest.mark.parametrize(
    "argv,fragments",
    [
        (["train.max_steps=abc"], ["train.max_steps", "integer"]),
        (["model.label_dropout=2"], ["model.label_dropout", "<= 1"]),
        (["flow.path=foo"], ["flow.path", "'foo'"]),
        (["--config", "does/not/exist.yaml"], ["does/not/exist.yaml", "does not exist"]),
        (["data.name=imagefolder"], ["data.path", "required"]),
        (["train.max_steps"], ["key=value"]),
    ],
)
def test_config_errors_exit_2_in_process(argv, fragments, capsys):
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("flowlab: error: ") and err.count("\n") == 1
    for frag in fragments:
        assert frag in err


def test_data_error_exits_2(tmp_path, capsys):
    """A data problem found after validation (an empty image folder) is also a clean exit 2."""
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = train_main(tiny_overrides(str(tmp_path / "run"), "data.name=imagefolder", f"data.path={empty}", "data.resolution=8"))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "flowlab: error: no image files found" in err and str(empty) in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- a tiny real run through the CLI


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "run")
    args = tiny_overrides(out, "train.max_steps=10", "train.log_every=5", "train.checkpoint_every=5", "model.class_conditional=true")
    proc = _run(*args)
    return out, args, proc


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _weights(out):
    return load_file(os.path.join(out, "pipeline", "velocity_model", "diffusion_pytorch_model.safetensors"))


def test_tiny_run_succeeds_and_writes_artefacts(finished_run):
    out, _, proc = finished_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["step_0000010.png"]  # sample.every=0: final grid only
    from PIL import Image

    grid = Image.open(os.path.join(out, "samples", "step_0000010.png"))
    assert grid.size[0] >= 8 and grid.size[1] >= 8
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["checkpoint-10", "checkpoint-5"]
    assert [r["step"] for r in _metrics(out)] == [5, 10]
    assert all(r["loss"] > 0 and r["loss"] == r["loss"] for r in _metrics(out))
    assert os.path.isfile(os.path.join(out, "config.yaml"))
    # the pipeline is a loadable FlowPipeline of the configured model
    from flowlab.pipelines import FlowPipeline

    pipe = FlowPipeline.from_pretrained(os.path.join(out, "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.velocity_model).__name__ == "MLPVelocity"
    assert pipe.velocity_model.config.hidden_dim == 32 and pipe.velocity_model.num_classes == 10
    assert pipe.scheduler.config.num_inference_steps == 2
    imgs = pipe(class_labels=[1, 2, 3], generator=torch.Generator().manual_seed(0), output_type="np").images
    assert imgs.shape == (3, 8, 8, 1)


def test_rerun_into_the_same_dir_is_refused(finished_run):
    out, args, proc = finished_run
    assert proc.returncode == 0
    before = _metrics(out)
    again = _run(*args)
    _assert_clean_error(again, "already holds a run", "train.resume=latest", "train.overwrite=true")
    assert _metrics(out) == before  # nothing touched


def test_resume_latest_of_a_finished_run_trains_nothing(finished_run):
    out, args, proc = finished_run
    assert proc.returncode == 0
    before_metrics, before_weights = _metrics(out), _weights(out)
    ckpt_state = os.path.join(out, "checkpoints", "checkpoint-10", "trainer_state.json")
    before_state = open(ckpt_state).read()
    res = _run(*args, "train.resume=latest")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout + res.stderr and "at step 10" in res.stdout + res.stderr
    assert _metrics(out) == before_metrics  # no training step was logged
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["checkpoint-10", "checkpoint-5"]
    assert open(ckpt_state).read() == before_state
    after = _weights(out)
    assert after.keys() == before_weights.keys()
    assert all(torch.equal(after[k], before_weights[k]) for k in after)


def test_saved_config_of_a_run_reloads_and_lists_only_its_keys(finished_run):
    """The run's config.yaml loads back with load_config; an MLP-on-digits run lists no UNet/DiT or image keys."""
    import yaml

    from flowlab.recipes import config_to_dict, load_config

    out, _, proc = finished_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = os.path.join(out, "config.yaml")
    with open(path) as f:
        saved = yaml.safe_load(f)
    assert set(saved["data"]) == {"name", "split"}
    assert "block_out_channels" not in saved["model"] and "num_layers" not in saved["model"] and saved["model"]["hidden_dim"] == 32
    cfg = load_config(path)
    assert config_to_dict(cfg) == saved


def test_hub_push_without_a_token_fails_before_training(tmp_path, monkeypatch, capsys):
    """hub.push=true with neither HF_TOKEN nor a cached login is refused at start-up, naming hub.push."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    out = tmp_path / "run"
    rc = train_main(tiny_overrides(str(out), "hub.push=true", "hub.repo_id=me/digits"))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("flowlab: error: hub.push:") and "HF_TOKEN" in err and "hf auth login" in err
    assert not out.exists()  # nothing trained
