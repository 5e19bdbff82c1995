"""Smoke test of eval/bench_peers.py (``--quick``), run when the benchmark-only peers are installed
(``pip install -e '.[peers]'``): the JSON layout, flowlab's samples equal to flow_matching's at equal
NFE on the same grid, the exact likelihoods agreeing, and the OT-CFM training figures. Timings are
not asserted (the machine is shared and noisy)."""
import json
import math

import pytest
import torch

from conftest import load_eval_script

pytest.importorskip("flow_matching.solver")
pytest.importorskip("torchcfm.conditional_flow_matching")


def _load_bench():
    return load_eval_script("bench_peers")


def _pos(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    bench = _load_bench()
    out = tmp_path_factory.mktemp("peers") / "sub" / "bench_peers.json"
    threads = torch.get_num_threads()
    res = bench.main(["--quick", "--threads", "1", "--nfe", "2,4,8", "--json", str(out)])
    assert torch.get_num_threads() == threads  # restored
    return bench, res, json.loads(out.read_text())


def test_json_layout(quick):
    _, res, data = quick
    assert {"machine", "versions", "argv", "pipeline", "sampling", "likelihood", "training", "runtime_seconds"} <= set(data)
    assert data["complete"] is True
    assert data["sampling"]["equal_nfe"] == res["sampling"]["equal_nfe"]
    assert data["versions"]["flow_matching"] and data["versions"]["torchcfm"]
    s = data["sampling"]
    assert {"num_samples", "repeats", "equal_nfe", "quality", "floor"} <= set(s)
    assert set(s["quality"]) == {"4", "8"}
    for nfe, cell in s["quality"].items():
        assert set(cell["flowlab"]) == {"euler", "midpoint", "heun", "multistep"}
        assert {"euler", "midpoint", "heun2", "rk4"} <= set(cell["flow_matching"])
        for lib in ("flowlab", "flow_matching"):
            best = cell["best"][lib]
            # the best is the lowest FD among the methods that kept to the budget
            within = {m: r["fd"] for m, r in cell[lib].items() if r["nfe"] <= int(nfe)}
            assert best["fd"] == min(within.values()) and within[best["method"]] == best["fd"]
            assert all(_pos(r["fd"]) for r in cell[lib].values())
    lk = data["likelihood"]
    for est in ("exact", "hutchinson"):
        assert _pos(lk[est]["flowlab_seconds"]) and _pos(lk[est]["peer_seconds"]) and _pos(lk[est]["ratio"])
    for name in ("8gaussians", "moons"):
        d = data["training"][name]
        assert _pos(d["flowlab_steps_per_sec"]) and _pos(d["torchcfm_steps_per_sec"])
        assert d["steps_per_sec_ratio"] == pytest.approx(d["flowlab_steps_per_sec"] / d["torchcfm_steps_per_sec"])
        assert all(_pos(v) for v in [*d["equal_steps_sw2"].values(), *d["equal_time_sw2"].values(), d["floor_sw2"]])
        run = d["runs"][0]
        assert run["flowlab"]["steps"] == run["torchcfm"]["steps"] == d["steps"] == 40
        et = run["equal_time"]
        assert {et["faster"], et["slower"]} == {"flowlab", "torchcfm"}
        assert et[et["faster"]]["steps"] == 40  # the faster library keeps its full budget


def test_equal_nfe_outputs_identical(quick):
    """Same noise, labels, grid and field: flowlab's euler/midpoint/heun equal flow_matching's
    euler/midpoint/heun2 at every NFE, and both spend exactly the stated NFE."""
    bench, _, data = quick
    rows = data["sampling"]["equal_nfe"]
    cells = {(r["method"], r["nfe"]) for r in rows}
    assert cells == {("euler", 2), ("euler", 4), ("euler", 8), ("midpoint", 2), ("midpoint", 4), ("midpoint", 8),
                     ("heun", 2), ("heun", 4), ("heun", 8)}
    for r in rows:
        assert r["peer_nfe"] == r["nfe"], r
        assert r["identical"] and r["max_abs_diff"] <= bench.IDENTICAL_ATOL, r
        assert _pos(r["flowlab_seconds"]) and _pos(r["peer_seconds"]) and len(r["ratio_per_repeat"]) == data["sampling"]["repeats"]
    # different schemes at the same NFE do not coincide, so "identical" above is not vacuous
    q = data["sampling"]["quality"]["8"]["flowlab"]
    assert len({round(r["fd"], 6) for r in q.values()}) > 1


def test_exact_likelihood_agrees(quick):
    _, _, data = quick
    e = data["likelihood"]["exact"]
    assert e["max_abs_diff_log_prob"] < 1e-3 and e["max_abs_diff_x0"] < 1e-4
    assert e["flowlab_mean_log_prob"] == pytest.approx(e["peer_mean_log_prob"], abs=1e-3)
    h = data["likelihood"]["hutchinson"]
    # Hutchinson is unbiased with a +-1 probe: per-point errors are of the size of the divergence's
    # off-diagonal mass, far below the log-density itself (~ -60 nats for 64 dims here)
    assert 0 < h["flowlab_mean_abs_error_vs_exact"] < 0.2 * abs(e["flowlab_mean_log_prob"])
    assert 0 < h["peer_mean_abs_error_vs_exact"] < 0.2 * abs(e["flowlab_mean_log_prob"])


def test_peer_field_counts_and_broadcasts_time():
    bench = _load_bench()
    seen = []

    def field(x, t):
        seen.append(t)
        return x * t[:, None]

    f = bench.CountedField(field)
    x = torch.ones(3, 2)
    assert torch.equal(f(x, torch.tensor(0.5)), 0.5 * x) and torch.equal(f(x, 0.25), 0.25 * x)
    assert f.calls == 2 and all(t.shape == (3,) for t in seen)


def test_bad_arguments_name_the_value(capsys):
    bench = _load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--toy-datasets", "moons,spirals"])
    assert "'spirals'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--toy-steps", "15", "--toy-window", "10"])
    assert "--toy-steps (15)" in capsys.readouterr().err
