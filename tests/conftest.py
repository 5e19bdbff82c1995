import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The test models are tiny: one intra-op thread is faster than two fighting over a shared
# 2-core machine (and subprocesses inherit the setting).
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def tiny_overrides(output_dir, *extra):
    """A digits run small enough for tests: tiny MLP, few steps, no trackers.

    Keys a run would refuse are left out: the MLP sizes when ``extra`` picks another ``model.type`` or the
    run reads no ``model`` section,
    and the flow-matching sampler settings for another ``recipe`` (``extra`` still wins over the rest).
    """
    chosen = dict(item.split("=", 1) for item in extra if "=" in item)
    recipe = chosen.get("recipe", "flow_matching")
    flow = recipe in ("flow_matching", "meanflow")
    reads_model = flow or chosen.get("noprop.backbone") == "model"  # NoProp's paper blocks ignore `model`
    mlp = reads_model and chosen.get("model.type", "mlp") in ("mlp", "conservative")
    return [
        f"output_dir={output_dir}",
        "data.name=digits",
        *(["model.type=mlp", "model.hidden_dim=32", "model.depth=2", "model.time_embed_dim=16"] if mlp else []),
        "train.batch_size=32",
        "train.max_steps=40",
        "train.warmup_steps=5",
        "train.lr=1e-3",
        "train.log_every=10",
        "train.checkpoint_every=20",
        "train.report_to=none",
        "sample.every=0",
        "sample.num_images=4",
        *(["sample.num_inference_steps=2"] if flow else []),
        "eval.enabled=false",
        *extra,
    ]


@pytest.fixture(scope="session", autouse=True)
def _flowlab_cache(tmp_path_factory):
    os.environ.setdefault("FLOWLAB_CACHE", str(tmp_path_factory.mktemp("flowlab_cache")))


def load_eval_script(name):
    """``eval/<name>.py`` imported as a module (the eval scripts are standalone files, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"flowlab_eval_{name}", os.path.join(ROOT, "eval", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tagged_processes(tag):
    """Pids of the processes whose environment holds ``tag`` (``NAME=value``): everything a command started,
    whatever session it moved to (torch's launcher puts each worker in a session of its own) and whoever
    its parent is now."""
    entry, found = tag.encode(), []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if entry in f.read().split(b"\0"):
                        found.append(int(name))
            except OSError:  # gone, or not ours to read
                pass
    return found


def _signal_all(tag, sig):
    for pid in _tagged_processes(tag):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def run_checked(cmd, env=None, timeout=300):
    """Run ``cmd`` in the repository root; fail the test with its output if it fails or runs past
    ``timeout`` seconds. Returns its output (stdout and stderr, interleaved).

    Every process the command starts carries a tag in its environment, and every tagged process still
    alive when it ends is killed, so a launcher's worker can never outlive the test. On a timeout each
    Python process first prints where its threads are (``faulthandler`` on SIGABRT), and the failure
    shows it.
    """
    import signal
    import subprocess
    import tempfile
    import time
    import uuid

    name, value = "FLOWLAB_TEST_RUN", uuid.uuid4().hex
    tag = f"{name}={value}"
    timed_out = False
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {}), name: value})
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _signal_all(tag, signal.SIGABRT)
            time.sleep(3)  # time for every process to write its threads' stacks
        finally:
            _signal_all(tag, signal.SIGKILL)
            proc.kill()
            proc.wait()
        out.seek(0)
        log = out.read()
    assert not timed_out, f"{cmd[:6]}... ran past {timeout} s; where each process was:\n{log[-12000:]}"
    assert proc.returncode == 0, log[-6000:]
    return log


def launch_two_cpu_processes(*train_args, script="train.py", timeout=300):
    """``script`` (``train.py``) under ``accelerate launch`` as two gloo processes on the CPU (the form that
    works without MPI), on a free port, through :func:`run_checked`. Returns the combined log."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return run_checked(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), script, *train_args],
        env={"ACCELERATE_USE_CPU": "1"}, timeout=timeout,
    )
