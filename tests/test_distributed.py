"""Two gloo processes on the CPU give the same training result as one process at the same global batch."""
import json
import os
import sys

import torch
from safetensors.torch import load_file

from conftest import launch_two_cpu_processes, run_checked, tiny_overrides


def test_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["train.max_steps=20", "train.checkpoint_every=10"]
    run_checked([sys.executable, "train.py", *tiny_overrides(one, *extra)])
    log = launch_two_cpu_processes(*tiny_overrides(two, *extra))
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
