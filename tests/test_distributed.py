"""Two gloo processes on the CPU give the same training result as one process at the same global batch."""
import json
import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import ROOT, tiny_overrides


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env=None):
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def test_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["train.max_steps=20", "train.checkpoint_every=10"]
    _run([sys.executable, "train.py", *tiny_overrides(one, *extra)])
    log = _run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
         "train.py", *tiny_overrides(two, *extra)],
        env={"ACCELERATE_USE_CPU": "1"},
    )
    assert "2 process(es) [MULTI_CPU]" in log, log[-2000:]  # two processes really ran
    assert log.count("flowlab: recipe=") == 1  # only the main process logs
    w1 = load_file(one / "pipeline" / "velocity_model" / "diffusion_pytorch_model.safetensors")
    w2 = load_file(two / "pipeline" / "velocity_model" / "diffusion_pytorch_model.safetensors")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-4)
    l1 = [json.loads(x)["loss"] for x in open(one / "metrics.jsonl")]
    l2 = [json.loads(x)["loss"] for x in open(two / "metrics.jsonl")]
    assert len(l1) == len(l2) == 2  # one writer
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l2), atol=1e-5, rtol=1e-4)
    assert sorted(os.listdir(two / "checkpoints")) == ["checkpoint-10", "checkpoint-20"]
