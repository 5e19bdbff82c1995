"""NoProp-DT block parallelism: 2 gloo CPU processes, each training its own blocks (no gradient
all-reduce), give exactly the model of one process training all blocks."""
import json
import sys

import torch
from safetensors.torch import load_file

from conftest import launch_two_cpu_processes, run_checked, tiny_overrides

EXTRA = ["recipe=noprop", "noprop.num_blocks=4", "noprop.hidden_dim=16", "noprop.channels=[4,8]", "noprop.dropout=0.0",
         "train.max_grad_norm=0", "train.max_steps=6", "train.checkpoint_every=0", "train.log_every=3", "eval.enabled=false"]


def test_two_processes_train_disjoint_blocks_and_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_checked([sys.executable, "train.py", *tiny_overrides(one, *EXTRA)])
    log = launch_two_cpu_processes(*tiny_overrides(two, *EXTRA))
    assert "2 process(es) [MULTI_CPU]" in log, log[-2000:]  # two processes really ran
    # every process sees the whole batch (it splits blocks, not data)
    assert "global batch 32 = 32 x 1 accum on every process, parameters split across processes" in log, log[-2000:]
    w1 = load_file(one / "classifier" / "diffusion_pytorch_model.safetensors")
    w2 = load_file(two / "classifier" / "diffusion_pytorch_model.safetensors")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-4, msg=k)
    # each block's loss is logged by the process that trains it; the log holds every block's, as one process's does
    rows1 = [json.loads(x) for x in open(one / "metrics.jsonl") if '"loss"' in x]
    rows2 = [json.loads(x) for x in open(two / "metrics.jsonl") if '"loss"' in x]
    keys = ["block_0", "block_1", "block_2", "block_3", "ce", "kl"]
    assert len(rows1) == len(rows2) == 2 and all(set(keys) <= set(r) for r in rows1 + rows2), (rows1, rows2)
    for r1, r2 in zip(rows1, rows2):
        torch.testing.assert_close(torch.tensor([r2[k] for k in keys]), torch.tensor([r1[k] for k in keys]), atol=1e-5, rtol=1e-4)
    # and blocks 2, 3 (trained by process 1 only) really were trained: they moved from their initialisation
    from flowlab.recipes import load_config
    from flowlab.recipes import get_recipe

    cfg = load_config(None, tiny_overrides(tmp_path / "x", *EXTRA))
    r = get_recipe(cfg)
    torch.manual_seed(cfg.seed)
    init = r.build_model(r.build_dataset()).state_dict()
    for b in (0, 3):
        key = f"blocks.{b}.trunk.2.weight"
        assert not torch.allclose(init[key], w2[key]), key


def test_two_process_block_parallel_run_resumes_exactly(tmp_path):
    """Each process keeps the optimiser state of its own blocks; a 2-process checkpoint must hold every
    process's part, so that a resumed 2-process run equals an uninterrupted one."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    ckpt = ["train.checkpoint_every=3"]
    launch_two_cpu_processes(*tiny_overrides(full, *EXTRA, *ckpt))
    launch_two_cpu_processes(*tiny_overrides(cut, *EXTRA, *ckpt, "train.max_steps=3"))
    launch_two_cpu_processes(*tiny_overrides(cut, *EXTRA, *ckpt, "train.resume=latest"))
    w1 = load_file(full / "classifier" / "diffusion_pytorch_model.safetensors")
    w2 = load_file(cut / "classifier" / "diffusion_pytorch_model.safetensors")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=0, rtol=0, msg=k)
