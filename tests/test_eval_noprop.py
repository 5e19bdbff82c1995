"""eval/noprop.py: the runs are interleaved seed by seed, and the JSON's DT-vs-back-prop figures (accuracy
difference, wall / CPU time ratios of the means, per-pair ratios) are computed from the per-seed runs."""
import json
import math

import pytest

from conftest import load_eval_script


def _bench():
    return load_eval_script("noprop")


def _run(acc, seconds, cpu, peak=None):
    r = {"accuracy": acc, "seconds": seconds, "cpu_seconds": cpu, "seconds_per_epoch": seconds / 10, "epochs": 10.0,
         "steps": 100, "parameters": 1234}
    if peak is not None:
        r["peak_saved_bytes"] = peak
    return r


def test_summarize_dt_against_backprop():
    bench = _bench()
    per_seed = {"dt": [_run(0.99, 90.0, 170.0, peak=10), _run(0.98, 110.0, 190.0)],
                "backprop": [_run(0.97, 100.0, 150.0, peak=100), _run(0.96, 100.0, 250.0)]}
    res = bench.summarize(per_seed, [0, 1], [1, 2], torch_threads=2)
    assert res["torch_threads"] == 2 and res["seeds"] == [0, 1]
    dt, bp = res["dt"], res["backprop"]
    assert math.isclose(dt["accuracy"], 0.985) and math.isclose(bp["accuracy"], 0.965)
    assert math.isclose(dt["accuracy_minus_backprop"], 0.02)
    assert math.isclose(dt["seconds_ratio_to_backprop"], 1.0)  # (90 + 110) / (100 + 100)
    assert math.isclose(dt["cpu_seconds_ratio_to_backprop"], 0.9)  # 360 / 400
    assert dt["pair_seconds_ratios"] == pytest.approx([0.9, 1.1])
    assert dt["seconds_per_seed"] == [90.0, 110.0] and bp["cpu_seconds_per_seed"] == [150.0, 250.0]
    assert dt["parameters"] == bp["parameters"] == 1234 and dt["steps"] == 100
    assert math.isclose(dt["peak_saved_ratio_to_backprop"], 0.1)
    json.dumps(res)  # the script writes it as JSON


def test_runs_are_interleaved_seed_by_seed(tmp_path, monkeypatch):
    bench = _bench()
    order = []

    def fake_run(variant, seed, workdir, extra, ct_steps):
        order.append((variant, seed))
        return _run(0.9, 1.0 + seed, 2.0)

    monkeypatch.setattr(bench, "run_variant", fake_run)
    out = tmp_path / "noprop.json"
    assert bench.main(["--json", str(out), "--variants", "dt", "backprop", "--seeds", "0", "1", "2"]) == 0
    assert order == [("dt", 0), ("backprop", 0), ("dt", 1), ("backprop", 1), ("dt", 2), ("backprop", 2)]
    res = json.loads(out.read_text())
    assert res["dt"]["seconds_per_seed"] == [1.0, 2.0, 3.0] and res["dt"]["pair_seconds_ratios"] == [1.0, 1.0, 1.0]
