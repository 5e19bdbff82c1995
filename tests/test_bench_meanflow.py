"""Smoke test of eval/bench_meanflow.py (``--quick``): one seed trains both models for equal compute, scores
every cell from the same noise, and the JSON holds the targets and, for a MeanFlow config that learns
guidance, the standard model's Euler-32 at the same sampling-time guidance scale. FDs and timings of the
tiny models are not asserted (they are meaningless at this size)."""
import json
import math

from conftest import load_eval_script


def _load_bench():
    return load_eval_script("bench_meanflow")


def test_bench_meanflow_quick_json(tmp_path):
    out = tmp_path / "mf.json"
    res = _load_bench().main(["--quick", "--seeds", "0", "--num-samples", "100", "--probe-steps", "3", "--probe-repeats", "1",
                              "--workdir", str(tmp_path / "runs"), "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["summary"] == json.loads(json.dumps(res["summary"]))
    (run,) = saved["runs"]
    ratio = saved["probe"]["cost_ratio_meanflow_over_standard"]
    assert ratio > 0 and saved["meanflow_steps"] == max(1, round(saved["standard_steps"] / ratio))  # equal compute
    assert run["meanflow"]["steps"] == saved["meanflow_steps"] and run["standard"]["steps"] == saved["standard_steps"]
    # the shipped config learns guidance scale 1.5: the like-for-like standard cell is Euler-32 with CFG 1.5 (32 field
    # evaluations, each on the conditional and the null batch)
    assert run["meanflow_guidance_scale"] == 1.5
    cfg_cell = run["standard"]["fd"]["euler-32-cfg1.5"]
    assert cfg_cell["guidance_scale"] == 1.5 and cfg_cell["nfe"] == 32 and run["standard"]["fd"]["euler-32"]["nfe"] == 32
    assert run["standard_euler32_same_cfg_fd"] == cfg_cell["fd"]
    assert run["meanflow"]["fd"]["meanflow-1"]["nfe"] == 1 and run["meanflow"]["fd"]["meanflow-2"]["nfe"] == 2
    assert run["target_2nfe_no_worse"] == (run["meanflow_2nfe_fd"] <= run["standard_euler32_fd"])
    assert run["target_1nfe_within_1.5x"] == (run["meanflow_1nfe_fd"] <= 1.5 * run["standard_euler32_fd"])
    assert all(math.isfinite(c["fd"]) for part in ("standard", "meanflow") for c in run[part]["fd"].values())
    assert set(saved["summary"]) >= {"standard_euler32_fd", "meanflow_1nfe_fd", "meanflow_2nfe_fd", "standard_euler32_same_cfg_fd"}
