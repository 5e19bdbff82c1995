"""eval/gpu_sd35.py: the SD3.5-Medium config, the NFT step it times, and its --tiny run on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_eval_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "eval" / "gpu_sd35.py"


@pytest.fixture(scope="module")
def mod():
    return load_eval_script("gpu_sd35")


def test_sd35_medium_config_is_the_released_one(mod):
    """Inner width 24 x 64 = 1536 = caption projection; 384^2 = 147456 positions (diffusers' SD3.5-M signature)."""
    c = mod.SD35_MEDIUM
    assert c["num_layers"] == 24 and c["num_attention_heads"] * c["attention_head_dim"] == c["caption_projection_dim"] == 1536
    assert c["pos_embed_max_size"] ** 2 == 147456 and c["dual_attention_layers"] == tuple(range(13))
    assert (c["joint_attention_dim"], c["pooled_projection_dim"], c["qk_norm"]) == (4096, 2048, "rms_norm")


def test_nft_step_trains_only_the_default_adapter_and_checkpointing_keeps_gradients(mod):
    torch.manual_seed(0)
    tr = mod.build_transformer(mod.TINY, torch.device("cpu"), torch.float32, rank=4, alpha=8.0)
    for n, p in tr.named_parameters():  # peft starts B at zero; make the adapters differ from the base
        if "lora_B" in n and ".default." in n:
            p.data.normal_(0, 0.1)
    inputs = mod.make_inputs(mod.TINY, 2, 64, 8, 2, torch.device("cpu"), seed=1)
    trained = {n: p for n, p in tr.named_parameters() if ".default." in n and "lora_" in n}
    before = {n: p.detach().clone() for n, p in tr.named_parameters()}

    grads = {}
    for ckpt in (False, True):
        tr.enable_gradient_checkpointing() if ckpt else tr.disable_gradient_checkpointing()
        tr.train()
        opt = torch.optim.SGD(list(trained.values()), lr=0.0)  # no update: compare the gradients
        loss = mod.nft_step(tr, opt, inputs, timesteps=2, beta=1.0, kl_coef=1e-4, autocast=False)
        assert torch.isfinite(torch.tensor(loss))
        grads[ckpt] = {n: p.grad.clone() for n, p in trained.items()}
        assert all(p.grad is None for n, p in tr.named_parameters() if n not in trained)
    assert any(g.abs().sum() > 0 for g in grads[False].values())
    for n in trained:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-4, atol=1e-7)

    opt = torch.optim.AdamW(list(trained.values()), lr=1e-2)
    mod.nft_step(tr, opt, inputs, timesteps=1, beta=1.0, kl_coef=1e-4, autocast=False)
    for n, p in tr.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (n in trained), n  # the default adapter moves; the old adapter and the base do not


def test_tiny_run_writes_json_and_markdown(tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--micro-batches", "2", "--repeats", "1",
                        "--json", str(out), "--markdown", str(md)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["settings"]["size"] == "tiny" and res["settings"]["resolution"] == 64
    assert [(x["micro_batch"], x["gradient_checkpointing"], x["status"]) for x in res["results"]] == [(2, False, "ok"), (2, True, "ok")]
    for x in res["results"]:
        assert x["seconds_per_step"] > 0 and x["images_per_second"] == pytest.approx(2 / x["seconds_per_step"])
        assert x["peak_memory_gib"] is None  # no CUDA: not measured, and said so
    assert res["trainable_parameters"] > 0 and res["parameters"] > res["trainable_parameters"]
    table = md.read_text()
    assert "| 2 | off |" in table and "| 2 | on |" in table and "n/a (CPU)" in table
    bad = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--resolution", "60"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "--resolution 60" in bad.stderr
