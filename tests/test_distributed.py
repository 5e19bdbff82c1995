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


def test_a_chain_of_runs_shares_one_process_group(tmp_path):
    """An RL run whose base model is missing trains the base first, in the same two processes: the process
    group outlives the first run (it is destroyed once, when the chain has ended), and each process exits 0."""
    base_yaml = tmp_path / "base.yaml"
    base_yaml.write_text(
        "recipe: flow_matching\n"
        "data: {name: digits}\n"
        "model: {type: mlp, hidden_dim: 32, depth: 2, time_embed_dim: 16}\n"
        "train: {batch_size: 32, max_steps: 10, warmup_steps: 2, report_to: none}\n"
        "sample: {every: 0, num_images: 4, num_inference_steps: 2}\n"
        "eval: {enabled: false}\n"
    )
    runs = tmp_path / "runs"
    log = launch_two_cpu_processes(
        "--config", "configs/nft_digits.yaml", f"output_dir={runs / 'nft'}", f"rl.base={runs / 'base' / 'pipeline'}",
        f"rl.base_config={base_yaml}", "train.max_steps=2", "train.report_to=none", "eval.enabled=false", "sample.every=0",
    )
    assert log.count("flowlab: nft needs") == 1, log[-2000:]  # logged once per launch
    assert log.count("2 process(es) [MULTI_CPU]") == 2  # both runs really ran on two processes
    for run in ("base", "nft"):
        assert (runs / run / "pipeline" / "model_index.json").is_file(), run
    assert [json.loads(x)["step"] for x in open(runs / "nft" / "metrics.jsonl") if "loss" in json.loads(x)][-1] == 2
