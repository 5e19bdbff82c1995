"""eval/bench_ot_conditional.py: its class-blind baseline really ignores the labels, and a quick run writes
one finite FD per coupling and seed."""
import json
import math

import torch

from conftest import load_eval_script


def test_class_blind_baseline_is_the_ungrouped_assignment():
    bench = load_eval_script("bench_ot_conditional")
    g = torch.Generator().manual_seed(0)
    x0, x1, labels = torch.randn(24, 3, generator=g), torch.randn(24, 3, generator=g), torch.arange(24) % 3
    blind, _ = bench.ClassBlindOT()(x0, x1, labels)
    assert torch.equal(blind, bench.MinibatchOTCoupling()(x0, x1)[0])
    assert not torch.equal(blind, bench.MinibatchOTCoupling()(x0, x1, labels)[0])


def test_quick_run_writes_every_coupling(tmp_path):
    bench = load_eval_script("bench_ot_conditional")
    out = tmp_path / "res.json"
    bench.main(["--quick", "--steps", "20", "--num-samples", "100", "--json", str(out), "--workdir", str(tmp_path / "w")])
    res = json.loads(out.read_text())
    assert [(r["coupling"], r["seed"]) for r in res["rows"]] == [(c, 0) for c in bench.COUPLINGS]
    assert all(math.isfinite(r["fd"]) and r["fd"] > 0 for r in res["rows"])
    assert set(res["median_fd"]) == set(bench.COUPLINGS)
