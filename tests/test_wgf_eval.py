"""eval/conservativity.py and eval/bench_wgf.py, run small."""
import json
import os

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from conftest import load_eval_script
from flowlab.models import MLPVelocity
from flowlab.pipelines import FlowPipeline, FlowScheduler
from flowlab.wgf import WGFPipeline


def test_conservativity_script_on_a_2d_flow_pipeline(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    model = MLPVelocity(sample_shape=(2,), hidden_dim=16, depth=1, time_embed_dim=8)
    for p in model.parameters():
        p.data += 0.2 * torch.randn_like(p)
    FlowPipeline(velocity_model=model, scheduler=FlowScheduler()).save_pretrained(tmp_path / "pipe")
    res = load_eval_script("conservativity").main(
        ["--pipeline", str(tmp_path / "pipe"), "--out", str(tmp_path / "plots"), "--json", str(tmp_path / "c.json"),
         "--num-bins", "2", "--num-points", "8", "--num-samples", "32", "--sample-steps", "2"]
    )
    printed = capsys.readouterr().out
    assert "asymmetry" in printed and "[0.05, 0.50]" in printed
    assert os.path.getsize(tmp_path / "plots" / "conservativity.png") > 1000
    assert os.path.getsize(tmp_path / "plots" / "quiver_curl.png") > 1000
    saved = json.load(open(tmp_path / "c.json"))
    assert len(saved["bins"]) == 2 and saved["bins"][0]["asymmetry"]["mean"] > 0.01  # a random MLP is not conservative
    assert res["sample_shape"] == [2]


def test_conservativity_script_on_a_ddpm_unet(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    WGFPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path / "ddpm")
    res = load_eval_script("conservativity").main(
        ["--pipeline", str(tmp_path / "ddpm"), "--out", str(tmp_path / "plots"), "--num-bins", "2", "--num-points", "4",
         "--num-samples", "8", "--sample-steps", "2", "--solver", "multistep", "--field", "epsilon"]
    )
    assert "2 probes" not in capsys.readouterr().out  # 64 dims: exact Jacobian by default
    assert res["bins"][0]["asymmetry"]["method"] == "exact" and res["bins"][0]["asymmetry"]["mean"] > 0
    assert not (tmp_path / "plots" / "quiver_curl.png").exists()  # not a 2-D model
    res = load_eval_script("conservativity").main(
        ["--pipeline", str(tmp_path / "ddpm"), "--no-plots", "--num-bins", "1", "--num-points", "4", "--num-samples", "8",
         "--sample-steps", "2", "--num-probes", "3"]
    )
    assert res["bins"][0]["asymmetry"]["method"] == "3 probes"


def test_bench_wgf_quick_writes_every_field(tmp_path):
    res = load_eval_script("bench_wgf").main(["--quick", "--datasets", "toy", "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "b.json")])
    saved = json.load(open(tmp_path / "b.json"))
    for label in ("free", "conservative"):
        r = saved["toy"][label]
        assert {"sliced_w2", "floor_data_vs_data"} <= set(r["quality"])
        assert {"train_seconds", "train_ms_per_step", "sample_ms_per_sample", "sample_nfe", "params"} <= set(r["costs"])
        assert len(r["diagnostics"]) == 3 and {"asymmetry", "curl", "loop", "path"} <= set(r["diagnostics"][0])
    assert max(b["asymmetry"]["mean"] for b in saved["toy"]["conservative"]["diagnostics"]) < 1e-5
    assert res["toy"]["free"]["costs"]["params"] > 0
