"""The trainer: exact resume, atomic checkpoints, non-finite losses, output-dir safety, artefacts."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from flowlab.errors import ConfigError, TrainingError
from flowlab.recipes import Trainer, load_config
from flowlab.train.checkpoint import find_resume_checkpoint, list_checkpoints
from flowlab.recipes.flow_matching.recipe import FlowMatchingRecipe


def _train(out, *extra, recipe_cls=FlowMatchingRecipe):
    cfg = load_config(None, tiny_overrides(out, *extra))
    return Trainer(cfg, recipe_cls(cfg)).train()


def _weights(out):
    return load_file(os.path.join(out, "pipeline", "velocity_model", "diffusion_pytorch_model.safetensors"))


class _CrashAt25(FlowMatchingRecipe):
    def training_step(self, model, batch, ctx):
        if ctx.step == 25:
            raise RuntimeError("simulated crash")
        return super().training_step(model, batch, ctx)


def test_run_writes_artefacts_and_respects_total_limit(tmp_path):
    out = str(tmp_path / "run")
    _train(out, "train.checkpoint_every=10", "train.checkpoints_total_limit=2", "sample.every=20")
    assert [s for s, _ in list_checkpoints(os.path.join(out, "checkpoints"))] == [30, 40]
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["step_0000020.png", "step_0000040.png"]
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in recs] == [10, 20, 30, 40]
    assert {"loss", "lr", "samples_per_sec", "grad_norm"} <= set(recs[0])
    assert os.path.isfile(os.path.join(out, "pipeline", "model_index.json"))
    assert not any(n.startswith(".tmp") for n in os.listdir(out) + os.listdir(os.path.join(out, "checkpoints")))


def test_resume_after_crash_is_exact(tmp_path):
    ref, crashed = str(tmp_path / "ref"), str(tmp_path / "crashed")
    _train(ref)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(crashed, recipe_cls=_CrashAt25)
    assert [s for s, _ in list_checkpoints(os.path.join(crashed, "checkpoints"))] == [20]
    _train(crashed, "train.resume=latest")
    a, b = _weights(ref), _weights(crashed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(line)["step"] for line in open(os.path.join(crashed, "metrics.jsonl"))]
    assert steps == [10, 20, 30, 40]  # the crashed run's lines were trimmed to the checkpoint


def test_corrupted_checkpoint_falls_back_to_previous(tmp_path, caplog):
    out = str(tmp_path / "run")
    _train(out, "train.checkpoint_every=10", "train.checkpoints_total_limit=3")
    ckpts = list_checkpoints(os.path.join(out, "checkpoints"))
    newest = ckpts[-1][1]
    weights = newest / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated on disk
    path, state = find_resume_checkpoint(os.path.join(out, "checkpoints"))
    assert path == ckpts[-2][1] and state["step"] == ckpts[-2][0]
    assert "checkpoint-40" in caplog.text and "truncated" in caplog.text
    # a flipped byte of the same size is caught by the checksum
    ckpt30 = ckpts[-2][1] / "model.safetensors"
    raw = bytearray(ckpt30.read_bytes())
    raw[-1] ^= 0xFF
    ckpt30.write_bytes(bytes(raw))
    path, _ = find_resume_checkpoint(os.path.join(out, "checkpoints"))
    assert path == ckpts[-3][1]


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    import flowlab.train.trainer as trainer_mod

    out = str(tmp_path / "run")
    real = trainer_mod.finalize_checkpoint

    def dying_finalize(tmp, final, state):
        if state["step"] == 40:
            raise KeyboardInterrupt("killed while writing checkpoint-40")
        return real(tmp, final, state)

    monkeypatch.setattr(trainer_mod, "finalize_checkpoint", dying_finalize)
    with pytest.raises(KeyboardInterrupt):
        _train(out)
    path, state = find_resume_checkpoint(os.path.join(out, "checkpoints"))
    assert state["step"] == 20 and path.name == "checkpoint-20"
    monkeypatch.setattr(trainer_mod, "finalize_checkpoint", real)
    _train(out, "train.resume=latest")  # the leftover temporary folder does not get in the way
    assert [s for s, _ in list_checkpoints(os.path.join(out, "checkpoints"))] == [20, 40]


def test_output_dir_with_a_run_is_not_overwritten(tmp_path):
    out = str(tmp_path / "run")
    _train(out, "train.max_steps=10", "train.checkpoint_every=0")
    with pytest.raises(ConfigError, match="already holds a run"):
        _train(out, "train.max_steps=10")
    _train(out, "train.max_steps=10", "train.overwrite=true")


class _NaNRecipe(FlowMatchingRecipe):
    def training_step(self, model, batch, ctx):
        out = super().training_step(model, batch, ctx)
        if ctx.step in (3, 4) or ctx.step >= 30:
            out.loss = out.loss * float("nan")
        return out


def test_nonfinite_losses_skip_then_abort(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(TrainingError, match="non-finite losses in a row"):
        _train(out, "train.max_nonfinite_steps=5", "train.checkpoint_every=0", recipe_cls=_NaNRecipe)
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    skipped = [r["step"] for r in recs if r.get("nonfinite_loss")]
    assert skipped[:2] == [3, 4] and len(skipped) == 2 + 5
    finite = [r for r in recs if "loss" in r]
    assert finite and all(torch.isfinite(torch.tensor(r["loss"])) for r in finite)


def test_batch_not_divisible_by_accumulation(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path / "x", "train.batch_size=30", "train.grad_accum_steps=4"))
    with pytest.raises(ConfigError, match="train.batch_size"):
        Trainer(cfg)


def test_grad_accumulation_matches_full_batch(tmp_path):
    """2 micro-batches of 16 give the same update as one batch of 32 (same examples, same noise)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _train(a, "train.max_steps=5", "train.checkpoint_every=0")
    _train(b, "train.max_steps=5", "train.checkpoint_every=0", "train.grad_accum_steps=2")
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_bf16_autocast_and_tensorboard_logs(tmp_path):
    out = tmp_path / "run"
    _train(str(out), "train.max_steps=10", "train.checkpoint_every=0", "train.mixed_precision=bf16", "train.report_to=tensorboard")
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs if "loss" in r)
    events = [f for _, _, fs in os.walk(out / "logs") for f in fs if f.startswith("events.out.tfevents")]
    assert events, "tensorboard wrote no event file"
    w = _weights(str(out))
    assert all(v.dtype == torch.float32 for v in w.values())  # weights stay fp32 under autocast


def test_fp16_on_cpu_is_refused_clearly(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path / "x", "train.mixed_precision=fp16"))
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        Trainer(cfg)


def test_resume_between_log_steps_logs_the_same_numbers(tmp_path):
    """A checkpoint taken in the middle of a log window (checkpoint_every not a multiple of log_every):
    the resumed run's metrics.jsonl equals the uninterrupted run's (throughput aside)."""
    import json

    from flowlab.cli import train_main

    from conftest import tiny_overrides

    def run(out, *extra):
        assert train_main(tiny_overrides(out, "train.max_steps=12", "train.log_every=4", "train.checkpoint_every=6", *extra)) == 0

    def records(out):
        keep = ("step", "loss", "lr", "grad_norm", "skipped_steps")
        return [{k: r[k] for k in keep if k in r} for r in map(json.loads, open(out / "metrics.jsonl"))]

    import shutil

    run(tmp_path / "full")
    # as if killed just after checkpoint-6: the later checkpoint and the final pipeline never got written
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "checkpoint-12")
    shutil.rmtree(tmp_path / "cut" / "pipeline")
    run(tmp_path / "cut", "train.resume=latest")
    assert [r["step"] for r in records(tmp_path / "full")] == [4, 8, 12]
    assert records(tmp_path / "full") == records(tmp_path / "cut")


class _FrozenConditioning(FlowMatchingRecipe):
    """Trains everything but the time/label conditioning MLP (frozen parameters, like an RL recipe's old/ref copies)."""

    def build_model(self, dataset):
        model = super().build_model(dataset)
        for name, p in model.named_parameters():
            if name.startswith("cond."):
                p.requires_grad_(False)
        return model


def test_banner_counts_trainable_and_frozen_parameters_separately(tmp_path, capsys):
    cfg = load_config(None, tiny_overrides(tmp_path / "run", "train.max_steps=2", "train.checkpoint_every=0"))
    trainer = Trainer(cfg, _FrozenConditioning(cfg))
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == 512 + 32 + 1024 + 32 and trainable > 10_000
    assert f"MLPVelocity {trainable / 1e6:.2f}M trainable + {frozen} frozen params" in capsys.readouterr().out
    # EMA follows the trained parameters only; the saved model keeps the frozen ones as they are
    assert len(trainer.ema.shadow_params) == sum(p.requires_grad for p in model.parameters())


def test_banner_without_frozen_parameters(tmp_path, capsys):
    _train(str(tmp_path / "run"), "train.max_steps=2", "train.checkpoint_every=0", "model.hidden_dim=64")
    out = capsys.readouterr().out
    assert " trainable params |" in out and "frozen params" not in out


def test_recipe_needs_training_step_or_training_losses():
    """One path: the trainer calls training_losses, whose default is training_step's one loss."""
    from flowlab.train.recipe import Recipe, StepOutput

    class Neither(Recipe):
        build_dataset = build_model = lambda *a: None

    with pytest.raises(TypeError, match="Neither defines neither training_step .* nor training_losses"):
        Neither(load_config(None, []))

    class OneLoss(Neither):
        def training_step(self, model, batch, ctx):
            return StepOutput(loss=torch.tensor(2.0))

    parts = list(OneLoss(load_config(None, [])).training_losses(None, {}, None))
    assert [float(p.loss) for p in parts] == [2.0]


def test_rl_recipe_and_policy_bases_are_abstract():
    from flowlab.nft.policy import Policy
    from flowlab.nft.recipe import RLRecipe

    assert RLRecipe.__abstractmethods__ == {"rollout", "method_losses"}
    with pytest.raises(TypeError, match="abstract"):
        Policy()
    assert {"_velocity", "encode", "decode", "save", "network", "path", "sample_shape"} <= Policy.__abstractmethods__


def test_trim_metrics_keeps_what_a_checkpoint_covers(tmp_path):
    """Records up to the checkpoint's step stay; a skipped-step record carries its 0-based step, so the
    one with the checkpoint's own step was written after it and goes; a line cut by a kill goes."""
    from flowlab.train.run_folder import RunFolder

    run = RunFolder(tmp_path, is_main_process=True)
    lines = [{"step": 5, "nonfinite_loss": True}, {"step": 10, "loss": 1.0}, {"step": 10, "eval/fd": 3.0},
             {"step": 10, "nonfinite_loss": True}, {"step": 20, "loss": 0.5}]
    run.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 2')
    run.trim_metrics(10)
    assert [json.loads(line) for line in run.metrics_path.read_text().splitlines()] == lines[:3]


def test_accelerate_lomo_probe_is_cached_with_the_same_answer(tmp_path):
    """AcceleratedOptimizer.step asks is_lomo_available() twice per step; the trainer caches it."""
    import accelerate.optimizer
    from accelerate.utils import is_lomo_available

    Trainer(load_config(None, tiny_overrides(tmp_path / "x")))
    probe = accelerate.optimizer.is_lomo_available
    assert probe.cache_info is not None and probe() == is_lomo_available()
    Trainer(load_config(None, tiny_overrides(tmp_path / "y")))  # a second trainer does not wrap it twice
    assert accelerate.optimizer.is_lomo_available is probe
