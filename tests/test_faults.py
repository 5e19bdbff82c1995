"""Faults: a training process SIGKILLed mid-run and mid-checkpoint-write, checkpoints damaged on
disk, and a full disk while saving. Every case ends either in an exact resume (the same final
weights and metrics as an uninterrupted run) or in a one-paragraph ``flowlab: error:`` with
exit code 2 and the previous checkpoint and artefact intact.

The kills are deterministic: a small driver (written by the test) runs ``flowlab.cli.train_main``
with one function patched to write a marker file and block at a chosen point; the test waits for
the marker and sends SIGKILL. Nothing here measures time.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, tiny_overrides
from flowlab.cli import train_main
from flowlab.train.checkpoint import find_resume_checkpoint, list_checkpoints, verify_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

# checkpoints every 10 of 40 steps, the newest three kept
EXTRA = ("train.checkpoint_every=10", "train.checkpoints_total_limit=3")
THROUGHPUT = {"samples_per_sec", "steps_per_sec"}  # wall-clock numbers: the only fields allowed to differ


def _args(out, *extra):
    return tiny_overrides(str(out), *EXTRA, *extra)


def _weights(out):
    return load_file(os.path.join(out, "pipeline", "velocity_model", "diffusion_pytorch_model.safetensors"))


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in THROUGHPUT} for line in f]


def _steps(out):
    return [s for s, _ in list_checkpoints(os.path.join(out, "checkpoints"))]


def _leftovers(out):
    return sorted(n for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith("."))


def _assert_same_as_reference(out, ref):
    a, b = _weights(ref), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"final weights differ from the uninterrupted run: {k}"
    assert _metrics(out) == _metrics(ref)  # same steps, same losses, lr and grad norms, bit for bit


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 40-step run (checkpoints 20, 30, 40 kept)."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    assert train_main(_args(out)) == 0
    assert _steps(out) == [20, 30, 40]
    return out


# --------------------------------------------------------------------------- SIGKILL

DRIVER = r'''
import io, os, sys, time
sys.path.insert(0, os.path.join(sys.argv[1], "src"))
mode, marker, stop, args = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]


def block_here():
    """Tell the test where we are, then wait for SIGKILL."""
    part = f"{marker}.{os.getpid()}.part"  # one per process: the ranks of a launch get here together
    with open(part, "w") as f:
        f.write(str(os.getpid()))
    os.replace(part, marker)
    while True:
        time.sleep(3600)


received = []


def wait_for_signal():
    """Tell the test where we are, then wait until the trainer's handler has recorded a signal."""
    part = f"{marker}.{os.getpid()}.part"  # one per process: the ranks of a launch get here together
    with open(part, "w") as f:
        f.write(str(os.getpid()))
    os.replace(part, marker)
    while not received:
        time.sleep(0.01)


if mode == "signal":  # SIGINT/SIGTERM arrives during step `stop` (0-based)
    import flowlab.train.interrupt as interrupt
    from flowlab.recipes.flow_matching.recipe import FlowMatchingRecipe

    real_handle = interrupt.StopSignals._handle

    def _handle(self, signum, frame):
        received.append(signum)
        real_handle(self, signum, frame)

    interrupt.StopSignals._handle = _handle

    real_step = FlowMatchingRecipe.training_step

    def training_step(self, model, batch, ctx):
        if ctx.step == stop and ctx.micro == 0:
            wait_for_signal()
        return real_step(self, model, batch, ctx)

    FlowMatchingRecipe.training_step = training_step
elif mode == "training_step":  # in the middle of training, checkpoints behind us
    from flowlab.recipes.flow_matching.recipe import FlowMatchingRecipe

    real_step = FlowMatchingRecipe.training_step

    def training_step(self, model, batch, ctx):
        if ctx.step == stop:
            block_here()
        return real_step(self, model, batch, ctx)

    FlowMatchingRecipe.training_step = training_step
elif mode == "save_state":  # inside accelerator.save_state: optimizer.bin half written, no manifest yet
    import torch

    real_save = torch.save

    def save(obj, f, *a, **k):
        name = str(f) if isinstance(f, (str, os.PathLike)) else ""
        if f".tmp-checkpoint-{stop}" in name and name.endswith("optimizer.bin"):
            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            with open(f, "wb") as fh:
                fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                fh.flush()
                os.fsync(fh.fileno())
            block_here()
        return real_save(obj, f, *a, **k)

    torch.save = save
elif mode == "finalize":  # manifest written and synced, the folder not yet renamed
    import flowlab.train.checkpoint as ckpt

    real_replace = ckpt.replace_dir_atomic

    def replace_dir_atomic(tmp, final):
        if os.path.basename(str(final)) == f"checkpoint-{stop}":
            block_here()
        return real_replace(tmp, final)

    ckpt.replace_dir_atomic = replace_dir_atomic
else:
    raise SystemExit(f"unknown mode {mode}")

from flowlab.cli import train_main

sys.exit(train_main(args))
'''


def _run_and_kill(tmp_path, mode, stop, args, launcher=()):
    """Start the driver, wait until it blocks at ``mode``/``stop``, SIGKILL it. Returns its log.

    With ``launcher`` (an ``accelerate launch`` prefix) the process that blocks and is killed is
    the main worker; the launcher then tears down the other worker and exits with an error."""
    driver, marker, log_path = tmp_path / "driver.py", tmp_path / f"at-{mode}", tmp_path / f"{mode}.log"
    driver.write_text(DRIVER)
    env = {**os.environ, **({"ACCELERATE_USE_CPU": "1"} if launcher else {})}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*launcher, *([] if launcher else [sys.executable]), str(driver), ROOT, mode, str(marker), str(stop), *args],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 600  # a safety net for a hung test, not a measurement
            while not marker.exists():
                if proc.poll() is not None:
                    pytest.fail(f"the run ended (rc {proc.returncode}) before reaching {mode} at step {stop}:\n"
                                + log_path.read_text()[-3000:])
                assert time.monotonic() < deadline, "driver never reached the kill point"
                time.sleep(0.05)
            victim = int(marker.read_text())
            if launcher:
                os.kill(victim, signal.SIGKILL)
                assert proc.wait() != 0
            else:
                assert victim == proc.pid
                os.kill(proc.pid, signal.SIGKILL)
                assert proc.wait() == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return log_path.read_text()


@pytest.mark.parametrize(
    "mode,stop,resumed_at,tmp_left",
    [
        # mid-run, while accelerate writes checkpoint-30's files (checkpoints 10 and 20 exist)
        ("save_state", 30, 20, "optimizer.bin"),
        # mid-run, inside a training step (each subprocess costs ~8 s of imports: the two
        # variants below run with `pytest -m slow`)
        pytest.param("training_step", 25, 20, None, marks=pytest.mark.slow),
        # checkpoint-30 complete in .tmp (manifest synced), killed before the rename
        pytest.param("finalize", 30, 20, "manifest.json", marks=pytest.mark.slow),
    ],
)
def test_sigkill_then_resume_is_exact(tmp_path, reference, capsys, mode, stop, resumed_at, tmp_left):
    out = tmp_path / "run"
    args = _args(out)
    _run_and_kill(tmp_path, mode, stop, args)

    # what the kill left: only completed checkpoints count; a half-written one stays a .tmp folder
    assert _steps(out) == [10, 20]
    if tmp_left:
        tmp = out / "checkpoints" / f".tmp-checkpoint-{stop}"
        assert (tmp / tmp_left).is_file()
        if mode == "save_state":
            assert not (tmp / "manifest.json").exists()
    else:
        assert _leftovers(out) == []
    assert not (out / "pipeline").exists()
    path, state = find_resume_checkpoint(out / "checkpoints")
    assert path.name == f"checkpoint-{resumed_at}" and state["step"] == resumed_at

    # resume: no step lost beyond the last checkpoint, and the result is the uninterrupted run's
    capsys.readouterr()
    assert train_main([*args, "train.resume=latest"]) == 0
    log = capsys.readouterr()
    assert f"checkpoint-{resumed_at} at step {resumed_at}" in log.out + log.err
    _assert_same_as_reference(out, reference)
    assert _steps(out) == [20, 30, 40]
    assert _leftovers(out) == []  # the half-written folder was replaced or pruned
    for _, p in list_checkpoints(out / "checkpoints"):
        verify_checkpoint(p)


# --------------------------------------------------------------------------- SIGINT / SIGTERM


@pytest.mark.parametrize(
    "signame,stop,code",
    [
        ("SIGINT", 13, 130),  # after the first log line and checkpoint (step 10)
        ("SIGTERM", 5, 143),  # before anything was logged or saved
    ],
)
def test_signal_saves_a_checkpoint_and_resume_is_exact(tmp_path, reference, capsys, signame, stop, code):
    """Ctrl-C / preemption during step ``stop``: the run finishes that step, saves checkpoint-(stop+1),
    exits with 128 + signal and a one-line message; ``train.resume=latest`` then ends exactly where an
    uninterrupted run does, and metrics.jsonl has no repeated line."""
    out = tmp_path / "run"
    args = _args(out)
    driver, marker, log_path = tmp_path / "driver.py", tmp_path / "at-signal", tmp_path / "signal.log"
    driver.write_text(DRIVER)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(driver), ROOT, "signal", str(marker), str(stop), *args],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600  # a safety net for a hung test, not a measurement
            while not marker.exists():
                if proc.poll() is not None:
                    pytest.fail(f"the run ended (rc {proc.returncode}) before step {stop}:\n" + log_path.read_text()[-3000:])
                assert time.monotonic() < deadline, "driver never reached the signal point"
                time.sleep(0.05)
            assert int(marker.read_text()) == proc.pid
            os.kill(proc.pid, getattr(signal, signame))
            rc = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log_path.read_text()
    assert rc == code, text[-3000:]
    done = stop + 1
    assert f"flowlab: stopped by {signame} after step {done} of 40; saved {out / 'checkpoints' / f'checkpoint-{done}'}" in text
    assert "train.resume=latest" in text and "Traceback" not in text
    assert _steps(out) == [s for s in (10, done) if s <= done] and _leftovers(out) == []
    assert verify_checkpoint(out / "checkpoints" / f"checkpoint-{done}")["step"] == done
    assert not (out / "pipeline").exists()
    logged = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] if (out / "metrics.jsonl").exists() else []
    assert logged == [s for s in (10, 20, 30, 40) if s <= done]

    capsys.readouterr()
    assert train_main([*args, "train.resume=latest"]) == 0
    assert f"checkpoint-{done} at step {done}" in capsys.readouterr().out
    _assert_same_as_reference(out, reference)  # weights bit for bit; metrics lines [10, 20, 30, 40], no repeats
    assert _steps(out) == [20, 30, 40]


def test_resume_latest_without_checkpoint_restarts_metrics(tmp_path, capsys):
    """A run stopped (by SIGKILL) before its first checkpoint: ``train.resume=latest`` starts from step 0,
    and the lines the stopped run logged are not repeated."""
    out = tmp_path / "run"
    args = tiny_overrides(str(out), "train.max_steps=20", "train.checkpoint_every=0")
    assert train_main(args) == 0
    shutil.rmtree(out / "checkpoints")  # as if killed after logging, before any checkpoint
    (out / "checkpoints").mkdir()
    assert train_main([*args, "train.resume=latest"]) == 0
    assert "has no valid checkpoint; starting from step 0" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [10, 20]


# --------------------------------------------------------------------------- damaged checkpoints


def _truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _flip_last_byte(p):
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0xFF
    p.write_bytes(bytes(raw))


DAMAGE = {
    "optimizer_truncated": ("optimizer.bin", _truncate, "optimizer.bin is truncated"),
    "ema_state_flipped": ("custom_checkpoint_1.pkl", _flip_last_byte, "custom_checkpoint_1.pkl is corrupted (checksum mismatch)"),
    "rng_state_deleted": ("random_states_0.pkl", os.remove, "is missing random_states_0.pkl"),
    "manifest_deleted": ("manifest.json", os.remove, "has no manifest.json"),
    "manifest_garbage": ("manifest.json", lambda p: p.write_bytes(b"\x00\xff{not json"), "manifest.json is corrupted"),
    "manifest_emptied": ("manifest.json", lambda p: p.write_text('{"step": 40, "files": {}}'), "is not in its manifest.json"),
    "manifest_wrong_shape": ("manifest.json", lambda p: p.write_text("[1, 2, 3]"), "manifest.json is corrupted"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_named_and_skipped(tmp_path, reference, caplog, capsys, case):
    """(Truncation and a flipped byte of model.safetensors: tests/test_trainer.py.)"""
    name, damage, words = DAMAGE[case]
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    damage(out / "checkpoints" / "checkpoint-40" / name)
    assert train_main(_args(out, "train.resume=latest")) == 0
    warning = [r.getMessage() for r in caplog.records if "checkpoint-40" in r.getMessage()]
    assert warning and words in warning[0], caplog.text
    assert "checkpoint-30 at step 30" in capsys.readouterr().out
    _assert_same_as_reference(out, reference)  # steps 31..40 re-done exactly


def test_damaged_checkpoint_named_explicitly_is_refused(tmp_path, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    bad = out / "checkpoints" / "checkpoint-40"
    _truncate(bad / "model.safetensors")
    assert train_main(_args(out, f"train.resume={bad}")) == 2
    err = capsys.readouterr().err
    assert err.startswith("flowlab: error: train.resume: checkpoint ") and err.count("\n") == 1
    assert str(bad) in err and "model.safetensors is truncated" in err


def test_stale_temporaries_are_pruned(tmp_path, reference):
    """A .tmp- folder from a step that is never saved again (e.g. the run was resumed with other
    settings) does not stay forever."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "checkpoints" / ".tmp-checkpoint-35").mkdir()
    (out / "checkpoints" / ".tmp-checkpoint-35" / "optimizer.bin").write_bytes(b"half")
    assert train_main(_args(out, "train.resume=latest", "train.max_steps=50")) == 0
    assert _leftovers(out) == [] and _steps(out) == [30, 40, 50]


# --------------------------------------------------------------------------- full disk


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(fragment)``: every torch / safetensors file written to a path containing
    ``fragment`` gets a few bytes on disk, then ``OSError(ENOSPC)`` (the shape of a disk that
    fills up mid-file). Covers accelerate's ``save_state`` and diffusers' ``save_pretrained``."""
    import accelerate.utils.other
    import safetensors.torch

    def install(fragment):
        def failing(real):
            def save(obj, f, *a, **k):
                name = str(f) if isinstance(f, (str, os.PathLike)) else ""
                if fragment in name:
                    with open(name, "wb") as fh:
                        fh.write(b"\0" * 64)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
                return real(obj, f, *a, **k)

            return save

        monkeypatch.setattr(torch, "save", failing(torch.save))
        monkeypatch.setattr(safetensors.torch, "save_file", failing(safetensors.torch.save_file))
        monkeypatch.setattr(accelerate.utils.other, "safe_save_file", failing(accelerate.utils.other.safe_save_file))

    return install


def _one_paragraph_error(err):
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("flowlab: error:")]
    assert len(lines) == 1 and "\n\n" not in err.strip(), err
    return lines[0]


def test_full_disk_during_checkpoint(tmp_path, reference, full_disk, monkeypatch, capsys):
    out = tmp_path / "run"
    full_disk(".tmp-checkpoint-30")
    assert train_main(_args(out)) == 2
    msg = _one_paragraph_error(capsys.readouterr().err)
    assert str(out / "checkpoints" / "checkpoint-30") in msg and "No space left on device" in msg
    assert ".tmp-checkpoint-30" in msg  # the file being written is named too
    assert _steps(out) == [10, 20] and _leftovers(out) == []  # partial folder removed, older kept
    assert verify_checkpoint(out / "checkpoints" / "checkpoint-20")["step"] == 20
    monkeypatch.undo()  # space freed
    assert train_main(_args(out, "train.resume=latest")) == 0
    _assert_same_as_reference(out, reference)


def test_full_disk_during_final_save(tmp_path, reference, full_disk, monkeypatch, capsys):
    """The run continues to 50 steps; saving the new pipeline fails: the old pipeline and every
    checkpoint stay intact and loadable, and a later resume saves the pipeline."""
    from flowlab.pipelines import FlowPipeline

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    full_disk(".tmp-pipeline")
    assert train_main(_args(out, "train.resume=latest", "train.max_steps=50")) == 2
    msg = _one_paragraph_error(capsys.readouterr().err)
    assert str(out / "pipeline") in msg and "No space left on device" in msg
    assert not (out / ".tmp-pipeline").exists()
    monkeypatch.undo()
    old = _weights(out)
    assert all(torch.equal(old[k], v) for k, v in _weights(reference).items())  # untouched
    FlowPipeline.from_pretrained(str(out / "pipeline"))  # and loadable
    assert _steps(out) == [30, 40, 50]  # the step-50 checkpoint was written before the final save
    for _, p in list_checkpoints(out / "checkpoints"):
        verify_checkpoint(p)
    assert train_main(_args(out, "train.resume=latest", "train.max_steps=50")) == 0
    new = _weights(out)
    assert any(not torch.equal(new[k], old[k]) for k in new)  # now the 50-step weights


def test_full_disk_while_logging_metrics(tmp_path, monkeypatch, capsys):
    """Any other OSError during a run (here: appending to metrics.jsonl) is a clean error too."""
    from flowlab.train.run_folder import RunFolder

    def no_space(self, record):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.metrics_path))

    monkeypatch.setattr(RunFolder, "append_metrics", no_space)
    out = tmp_path / "run"
    assert train_main(_args(out)) == 2
    msg = _one_paragraph_error(capsys.readouterr().err)
    assert "No space left on device" in msg and str(out / "metrics.jsonl") in msg


def test_unwritable_output_dir_is_a_clean_error(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert train_main(_args(blocker / "run")) == 2  # a parent of output_dir is a file
    msg = _one_paragraph_error(capsys.readouterr().err)
    assert str(blocker) in msg
    assert train_main(_args(blocker)) == 2  # output_dir itself is a file
    msg = _one_paragraph_error(capsys.readouterr().err)
    assert msg.startswith("flowlab: error: output_dir:") and str(blocker) in msg


# --------------------------------------------------------------------------- resuming with another config


@pytest.mark.parametrize(
    "extra,fragments",
    [
        (["model.hidden_dim=64"], ["size mismatch", "model.hidden_dim: 32 in the checkpoint, 64 now"]),
        (["model.class_conditional=true"], ["label_embed", "model.class_conditional: False in the checkpoint, True now"]),
        (["recipe=noprop"], ["recipe='flow_matching'", "recipe='noprop'"]),
    ],
    ids=["wider-model", "conditional-model", "other-recipe"],
)
def test_resume_with_a_config_that_does_not_fit_is_a_clean_error(tmp_path, reference, capsys, extra, fragments):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = {p.name: (p / "manifest.json").read_text() for _, p in list_checkpoints(out / "checkpoints")}
    config_before = (out / "config.yaml").read_text()
    assert train_main(_args(out, "train.resume=latest", *extra)) == 2
    assert (out / "config.yaml").read_text() == config_before  # still describes the checkpoints
    msg = _one_paragraph_error(capsys.readouterr().err)
    assert msg.startswith("flowlab: error: train.resume: ") and "checkpoint-40" in msg
    for frag in fragments:
        assert frag in msg, msg
    assert {p.name: (p / "manifest.json").read_text() for _, p in list_checkpoints(out / "checkpoints")} == before
    assert all(torch.equal(a, b) for a, b in zip(_weights(out).values(), _weights(reference).values()))


@pytest.mark.slow
def test_sigkill_of_a_two_process_run_during_a_checkpoint_write(tmp_path, reference):
    """Two gloo processes; the main one is SIGKILLed while writing checkpoint-30 (the other waits at
    the barrier and is torn down by the launcher). A 2-process resume ends where a 1-process
    uninterrupted run does (up to float round-off between process counts, as in test_distributed)."""
    import json as _json
    import socket

    from conftest import launch_two_cpu_processes

    out = tmp_path / "run"
    args = _args(out)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    log = _run_and_kill(tmp_path, "save_state", 30, args, launcher=launcher)
    assert "2 process(es) [MULTI_CPU]" in log, log[-2000:]
    assert _steps(out) == [10, 20] and (out / "checkpoints" / ".tmp-checkpoint-30").is_dir()
    log = launch_two_cpu_processes(*args, "train.resume=latest")
    assert "checkpoint-20 at step 20" in log
    ref, got = _weights(reference), _weights(out)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4)
    steps = [_json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == [10, 20, 30, 40]
    assert _steps(out) == [20, 30, 40] and _leftovers(out) == []


def test_stop_signals_record_once_and_abort_on_a_repeat():
    """The first signal is recorded (the run saves and stops at the next step); the launcher's SIGTERM
    after a terminal's SIGINT changes nothing; the same signal twice interrupts at once; the previous
    handlers come back."""
    from flowlab.train.interrupt import StopSignals

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopSignals() as s:
        assert s.received == 0
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert s.received == signal.SIGINT
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert s.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.slow
def test_sigterm_to_a_two_process_launch_saves_and_resumes(tmp_path, reference):
    """SIGTERM to ``accelerate launch`` (as a scheduler preempting a job): the launcher forwards it to
    both gloo workers, which agree, save checkpoint-(stop+1) together and exit; a 2-process resume
    ends where the uninterrupted 1-process run does (up to round-off between process counts)."""
    import socket

    from conftest import launch_two_cpu_processes

    out, stop = tmp_path / "run", 13
    args = _args(out)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    driver, marker, log_path = tmp_path / "driver.py", tmp_path / "at-signal", tmp_path / "signal.log"
    driver.write_text(DRIVER)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*launcher, str(driver), ROOT, "signal", str(marker), str(stop), *args], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
        try:
            deadline = time.monotonic() + 600
            while not marker.exists():
                if proc.poll() is not None:
                    pytest.fail(f"the run ended (rc {proc.returncode}) before step {stop}:\n" + log_path.read_text()[-3000:])
                assert time.monotonic() < deadline, "driver never reached the signal point"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=600) != 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log_path.read_text()
    assert "2 process(es) [MULTI_CPU]" in text, text[-3000:]
    assert f"stopped by SIGTERM after step {stop + 1} of 40" in text, text[-3000:]
    assert _steps(out) == [10, stop + 1] and _leftovers(out) == []
    log = launch_two_cpu_processes(*args, "train.resume=latest")
    assert f"checkpoint-{stop + 1} at step {stop + 1}" in log
    ref, got = _weights(reference), _weights(out)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4)
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [10, 20, 30, 40]
