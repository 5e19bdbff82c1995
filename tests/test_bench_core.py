"""Smoke test of eval/bench_core.py: a tiny ``--quick`` run returns and writes the JSON report with
finite values. Timings are not asserted (the machine is shared and noisy)."""
import json
import math

import torch

from conftest import load_eval_script


def _load_bench():
    return load_eval_script("bench_core")


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_bench_core_quick_json(tmp_path, capsys):
    bench = _load_bench()
    threads = torch.get_num_threads()
    out = tmp_path / "sub" / "bench.json"
    res = bench.main(
        [
            "--quick", "--threads", "1",  # one thread: with two, a busy shared core makes tiny ops crawl
            "--hidden-dim", "32", "--depth", "2", "--time-embed-dim", "16", "--batch-size", "32",
            "--steps", "10", "--window", "5", "--repeats", "2",
            "--train-steps", "30", "--num-samples", "100", "--nfe", "4,8,32", "--shifts", "2.0", "--claim-seeds", "1",
            "--workdir", str(tmp_path / "work"), "--json", str(out),
        ]
    )
    data = json.loads(out.read_text())
    assert {"trainer_overhead", "trainer", "fd", "floor", "claim_8nfe_vs_euler32", "fd_shift_8nfe", "runtime_seconds"} <= set(data)
    assert data["trainer_overhead"] == res["trainer_overhead"]

    # (a) trainer overhead: numbers exist and are finite (values are not checked: timings are noisy)
    tr = data["trainer"]
    assert _finite(data["trainer_overhead"]) and _finite(tr["overhead_ms_per_step"])
    assert len(tr["bare_steps_per_sec"]) == len(tr["flowlab_steps_per_sec"]) == len(tr["overhead_per_repeat"]) == 2
    assert all(_finite(v) and v > 0 for v in tr["bare_steps_per_sec"] + tr["flowlab_steps_per_sec"])
    assert all(len(w) == 2 for w in tr["flowlab_window_steps_per_sec"])  # 10 timed steps / window 5
    assert tr["steps"] == 10 and tr["warmup_steps"] == 5 and tr["batch_size"] == 32

    # (b) FD table: every solver at every NFE its nfe_per_step divides, plus dopri5 with its actual NFE
    fd = data["fd"]
    assert set(fd["euler"]) == set(fd["multistep"]) == {"4", "8", "32"}
    assert set(fd["midpoint"]) == set(fd["heun"]) == {"4", "8", "32"}
    assert len(fd["dopri5"]) == 1 and int(next(iter(fd["dopri5"]))) > 0
    assert all(_finite(v) and v >= 0 for row in fd.values() for v in row.values())
    assert _finite(data["floor"]) and data["floor"] > 0

    claim = data["claim_8nfe_vs_euler32"]
    assert claim["solver"] in ("midpoint", "heun", "multistep")
    assert _finite(claim["fd_8nfe"]) and claim["fd_euler_32nfe"] == fd["euler"]["32"]
    assert claim["holds"] == (claim["fd_8nfe"] <= claim["fd_euler_32nfe"])
    assert len(claim["per_seed"]) == 2 and all(_finite(r["fd_8nfe"]) and _finite(r["fd_euler_32nfe"]) for r in claim["per_seed"])

    assert set(data["fd_shift_8nfe"]) == {"1", "2"}
    assert all(_finite(v) for row in data["fd_shift_8nfe"].values() for v in row.values())
    assert torch.get_num_threads() == threads  # --threads is undone when main returns
    printed = capsys.readouterr().out
    assert "trainer overhead" in printed and "NFE 32" in printed
