#!/usr/bin/env python
"""Parametric forward-chaining benchmark: the GPT-2 baseline against JEPA + memory on the same facts.

    # the whole benchmark in one run: train both shipped configs, then evaluate (CPU, OMP_NUM_THREADS=1).
    # CPU time measured on the shared 2-core machine: GPT-2 ~235 s, JEPA + memory ~140 s, evaluation ~2 s,
    # ~10 s start-up: ~7 min on a quiet machine (the wall time under a load of ~10 was ~6x that)
    OMP_NUM_THREADS=1 python eval/forward_chaining.py --train --json chain.json

    # three data seeds (run seed = data seed), then mean, sample std and per-seed values: ~20 min
    OMP_NUM_THREADS=1 python eval/forward_chaining.py --train --seeds 0 1 2 --json chain3.json
    python eval/forward_chaining.py --combine seed0.json seed1.json seed2.json   # the same from single-seed JSONs

    # evaluate finished runs (each holds <run>/model, written by train.py)
    python eval/forward_chaining.py --runs runs/chain_ar runs/chain_jepa --json chain.json

    # fresh data (other seed and sizes): overrides go to both configs
    python eval/forward_chaining.py --train --set chain.data_seed=7 chain.modulus=101

    # the paper's sizes (GPU): P = 10007, 10 core entities per value, branching factors 10/20/30/40
    python eval/forward_chaining.py --train --gpu --json chain_gpu.json

Data (flowlab.data.forward_chaining, the ``chain:`` config section): values mod P linked by addition
facts ``(u, <+k>, w)``; only the core entities' values are stated (``(c, <=>, <v>)``); problem trees
(one set of roots per branching factor) link roots through bridges to the core, and every bridge's and
root's value must be deduced by chaining facts during training, some in reverse (subtraction).

For each model: the value queries ``(e, <=>, ?)`` of every bridge and root whose value the facts
determine, ranked against all entities, broken down by branching factor (roots: the paper's
"problems solved out of 20") and by hop count (shortest chain of facts from the core), plus the
trained facts (``attr``, ``problem``) and the held-out rule facts (``rule``) at value level.
``--json`` writes::

    {"protocol": {...sizes, addends, counts...},
     "paper": {"o3-mini_solved_of_20": {"10": 17, "20": 4, "30": 0, "40": 0}},
     "models": {"ar" | "jepa_memory" | "jepa": {
         "queries": acc, "queries_mrr": mrr, "roots": acc,
         "facts": {"attr": acc, "problem": acc, "rule": acc},
         "by_branching_factor": {"<b>": {"roots": acc, "roots_solved": n, "roots_total": n, "queries": acc, "count": n}},
         "by_hops": {"<h>": {"accuracy": acc, "count": n}},
         "parameters": n, "train_seconds": s | null, "train_cpu_seconds": s | null, "eval_cpu_seconds": s}}}
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME = """Runtime (OMP_NUM_THREADS=1): there is no default run; give --runs, --train or --combine.
--train, the benchmark: ~7 min of CPU (GPT-2 ~235 s, JEPA + memory ~140 s, evaluation ~2 s, start-up ~10 s),
i.e. ~7 min on a quiet 2-core machine; measured on the shared one at a load of ~10 it took ~6x that in wall time.
--train --seeds 0 1 2: three benchmarks, ~20 min quiet. --runs / --combine: evaluation only, seconds."""

import torch

CONFIGS = {"ar": "chain_ar.yaml", "jepa_memory": "chain_jepa.yaml"}
GPU_CONFIGS = {"ar": "chain_ar_gpu.yaml", "jepa_memory": "chain_jepa_gpu.yaml"}
#: Wang & Sun: problems (of 20) o3-mini solved in context, per branching factor
PAPER_O3_MINI = {"10": 17, "20": 4, "30": 0, "40": 0}


def model_key(model) -> str:
    """``ar``, ``jepa`` or ``jepa_memory`` for a loaded reversal model."""
    from flowlab.jepa import ReversalGPT2

    if isinstance(model, ReversalGPT2):
        return "ar"
    return "jepa_memory" if model.config.memory else "jepa"


def report(model, data) -> dict:
    """The nested per-model entry of the JSON (module docstring) for ``model`` on ``data``."""
    from flowlab.jepa.chain import chain_query_counts, evaluate_forward_chaining

    flat = evaluate_forward_chaining(model, data)
    counts = chain_query_counts(data)
    hops = sorted(int(k.split("_")[1]) for k in flat if k.startswith("hops_"))
    return {
        "queries": flat["queries"], "queries_mrr": flat["queries_mrr"], "roots": flat["roots"],
        "facts": {k: flat[k] for k in ("attr", "problem", "rule")},
        "by_branching_factor": {
            str(b): {"roots": flat[f"roots_bf{b}"], "roots_solved": round(flat[f"roots_bf{b}"] * counts[f"roots_bf{b}"]),
                     "roots_total": counts[f"roots_bf{b}"], "queries": flat[f"queries_bf{b}"], "count": counts[f"queries_bf{b}"]}
            for b in data.spec.branching_factors
        },
        "by_hops": {str(h): {"accuracy": flat[f"hops_{h}"], "count": counts[f"hops_{h}"]} for h in hops},
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def protocol(data) -> dict:
    """The dataset's sizes for the JSON."""
    from dataclasses import asdict

    from flowlab.jepa.chain import chain_query_counts

    counts = chain_query_counts(data)
    return {**asdict(data.spec), "addends": data.addends, "entities": data.num_entities,
            "train_facts": len(data.splits["train"]), "queries": counts["queries"], "roots": counts["roots"]}


def load_run(run_dir: str):
    """``(model, data)`` saved in ``<run_dir>/model`` by a ``chain.enabled`` run."""
    from flowlab.data.forward_chaining import read_forward_chaining_data
    from flowlab.jepa.recipe import load_reversal_model

    model_dir = os.path.join(run_dir, "model")
    if not os.path.isdir(model_dir):
        raise SystemExit(f"eval/forward_chaining.py: {model_dir} not found (train it first: python train.py --config configs/chain_*.yaml)")
    return load_reversal_model(model_dir), read_forward_chaining_data(os.path.join(model_dir, "data"))


def train_all(workdir: str, configs: dict, overrides: list[str], keys: list[str]) -> dict[str, tuple[str, float, float]]:
    """Train the shipped configs through the shared Trainer, one after the other;
    ``{key: (run_dir, wall seconds, CPU seconds of this process)}`` (data generation included)."""
    from flowlab.recipes import train_benchmark_runs

    out = {}
    for k in keys:
        cpu = time.process_time()
        (run_dir, wall), = train_benchmark_runs({k: os.path.join(ROOT, "configs", configs[k])}, workdir, "chain", overrides).values()
        out[k] = (run_dir, wall, time.process_time() - cpu)
    return out


def format_table(models: dict) -> str:
    """Roots solved per branching factor and accuracy per hop count, one line per model."""
    any_model = next(iter(models.values()))
    bfs, hops = list(any_model["by_branching_factor"]), list(any_model["by_hops"])
    head = (f"{'model':<12} " + " ".join(f"{'bf' + b:>7}" for b in bfs) + " | "
            + " ".join(f"{'hop' + h:>6}" for h in hops) + f" | {'all':>6} {'rule':>6} {'train s':>8}")
    lines = [head, "-" * len(head)]
    for k, r in models.items():
        bf = " ".join(f"{str(v['roots_solved']) + '/' + str(v['roots_total']):>7}" for v in r["by_branching_factor"].values())
        hp = " ".join(f"{v['accuracy']:>6.3f}" for v in r["by_hops"].values())
        secs = r.get("train_seconds")
        lines.append(f"{k:<12} {bf} | {hp} | {r['queries']:>6.3f} {r['facts']['rule']:>6.3f} "
                     f"{'-' if secs is None else format(secs, '.0f'):>8}")
    lines.append("columns: roots solved per branching factor | value-query accuracy per hop count | all queries, "
                 "held-out rule facts")
    return "\n".join(lines)


def evaluate_runs(run_dirs: list[str], seconds: dict, cpu_seconds: dict) -> tuple[dict, dict]:
    """``(protocol, {model key: report})`` of trained runs, all on the same data (one run per model kind)."""
    models: dict = {}
    proto = None
    for d in run_dirs:
        model, data = load_run(d)
        key = model_key(model)
        if key in models:
            raise SystemExit(f"eval/forward_chaining.py: two runs of the same kind ({key}); give one run per model")
        p_d = protocol(data)
        if proto is not None and p_d != proto:
            raise SystemExit(f"eval/forward_chaining.py: {d} was trained on other data than the first run "
                             f"({p_d} != {proto}); compare models on the same data")
        proto = p_d
        cpu = time.process_time()
        with torch.no_grad():
            entry = report(model, data)
        models[key] = {**entry, "train_seconds": seconds.get(key), "train_cpu_seconds": cpu_seconds.get(key),
                       "eval_cpu_seconds": time.process_time() - cpu}
    return proto, models


def _mean_std(values: list[float]) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(values) > 1 else 0.0, "values": list(values)}


def summarize(results: list[dict]) -> dict:
    """Mean, sample standard deviation and per-seed values over several single-seed results (``--json`` layouts
    of one data seed each): per model, roots solved per branching factor, accuracy per hop count, all queries,
    the fact splits and the CPU seconds of training."""
    keys = [k for k in results[0]["models"] if all(k in r["models"] for r in results)]
    out = {}
    for k in keys:
        runs = [r["models"][k] for r in results]
        out[k] = {
            "roots_solved": {b: _mean_std([m["by_branching_factor"][b]["roots_solved"] for m in runs])
                             for b in runs[0]["by_branching_factor"]},
            "roots_total": {b: runs[0]["by_branching_factor"][b]["roots_total"] for b in runs[0]["by_branching_factor"]},
            "by_hops": {h: _mean_std([m["by_hops"][h]["accuracy"] for m in runs if h in m["by_hops"]])
                        for h in runs[0]["by_hops"]},
            "queries": _mean_std([m["queries"] for m in runs]),
            "facts": {f: _mean_std([m["facts"][f] for m in runs]) for f in runs[0]["facts"]},
            "train_cpu_seconds": (_mean_std(cpu) if (cpu := [m["train_cpu_seconds"] for m in runs
                                                              if m.get("train_cpu_seconds") is not None]) else None),
        }
    return out


def format_summary(summary: dict, n: int) -> str:
    """One line per model: mean ± std over ``n`` seeds."""
    lines = []
    for k, s in summary.items():
        bf = "  ".join(f"bf{b} {v['mean']:.1f}±{v['std']:.1f}/{s['roots_total'][b]}" for b, v in s["roots_solved"].items())
        hp = "  ".join(f"hop{h} {v['mean']:.3f}±{v['std']:.3f}" for h, v in s["by_hops"].items())
        lines.append(f"{k} ({n} seeds): roots solved {bf} | {hp} | all {s['queries']['mean']:.3f}±{s['queries']['std']:.3f} "
                     f"| attr {s['facts']['attr']['mean']:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog=RUNTIME, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=None, help="trained run folders (output_dir of train.py)")
    p.add_argument("--train", action="store_true", help="train the shipped configs first (the benchmark)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="with --train: one benchmark per seed (run and data seed), then mean and spread")
    p.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                   help="mean and spread of single-seed results written by --json (one per data seed)")
    p.add_argument("--gpu", action="store_true", help="with --train: the paper-size configs (configs/chain_*_gpu.yaml)")
    p.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="with --train: which ones")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="with --train: config overrides for every model")
    p.add_argument("--workdir", default=None, help="with --train: where the runs go (default: a temporary folder)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if not args.train and not args.runs and not args.combine:
        p.error("give --runs DIR..., --train or --combine JSON...")
    if args.gpu and not args.train:
        p.error("--gpu only applies with --train")
    if args.seeds and not args.train:
        p.error("--seeds only applies with --train")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t_start = time.perf_counter()
    paper = {"o3-mini_solved_of_20": PAPER_O3_MINI}
    if args.combine or args.seeds:
        if args.combine:
            results = []
            for path in args.combine:
                with open(path) as f:
                    results.append(json.load(f))
        else:
            workdir = args.workdir or tempfile.mkdtemp(prefix="chain_bench_")
            results = []
            for seed in args.seeds:
                trained = train_all(os.path.join(workdir, f"seed_{seed}"), GPU_CONFIGS if args.gpu else CONFIGS,
                                    [*args.set, f"seed={seed}"], args.models)
                proto, models = evaluate_runs([d for d, _, _ in trained.values()], {k: s for k, (_, s, _) in trained.items()},
                                              {k: c for k, (_, _, c) in trained.items()})
                print(f"seed {seed}:\n{format_table(models)}")
                results.append({"protocol": proto, "paper": paper, "models": models})
        summary = summarize(results)
        print(format_summary(summary, len(results)))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"seeds": {str(r["protocol"]["seed"]): r for r in results}, "summary": summary, "paper": paper,
                           "total_seconds": time.perf_counter() - t_start}, f, indent=2)
        return 0
    seconds: dict = {}
    cpu_seconds: dict = {}
    run_dirs = list(args.runs or [])
    if args.train:
        workdir = args.workdir or tempfile.mkdtemp(prefix="chain_bench_")
        trained = train_all(workdir, GPU_CONFIGS if args.gpu else CONFIGS, args.set, args.models)
        run_dirs += [d for d, _, _ in trained.values()]
        seconds = {k: s for k, (_, s, _) in trained.items()}
        cpu_seconds = {k: c for k, (_, _, c) in trained.items()}
    proto, models = evaluate_runs(run_dirs, seconds, cpu_seconds)
    total = time.perf_counter() - t_start
    print(format_table(models))
    print(f"Wang & Sun, o3-mini in context: {PAPER_O3_MINI} problems solved of 20 per branching factor")
    print(f"total wall time {total:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"protocol": proto, "paper": paper, "models": models, "total_seconds": total}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
