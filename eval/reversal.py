#!/usr/bin/env python
"""Reversal benchmark: the GPT-2 baseline, the JEPA concept model and JEPA + memory on multi-token-name facts.

    # evaluate trained runs (each holds <run>/model, written by train.py)
    python eval/reversal.py --runs runs/reversal_ar runs/reversal_jepa runs/reversal_jepa_memory

    # the whole benchmark in one run: train the three shipped configs, then evaluate (CPU, 2 cores)
    python eval/reversal.py --train --json reversal.json

    # on a fresh dataset (other seed and sizes): overrides go to all three configs
    python eval/reversal.py --train --set reversal.data_seed=7 reversal.num_entities_a=2400 reversal.num_entities_b=800

    # several facts per entity: every model trains on F facts per entity for F times the steps (the same epochs),
    # the JEPA models with concepts bound to (entity, role) (reversal.binding=relation, docs/jepa.md)
    python eval/reversal.py --train --facts-per-entity 2 --models ar jepa_memory --json reversal_f2.json

For each model: accuracy and MRR of the gold entity ranked among *all* entities, on ``seen``
(group A's training facts), ``forward`` (group B's trained direction) and ``reverse`` (group B's
held-out direction, never trained), the first ``--max-queries`` facts of each split (500).
``--train`` skips the periodic evaluation (the learning curves come from ``train.py`` runs). ``--json`` writes ``{"ar": {"seen", "forward", "reverse",
"seen_mrr", "forward_mrr", "reverse_mrr"}, "jepa": {...}, "jepa_memory": {...}}`` (fractions); the
wall time of each run is printed with the table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

RUNTIME = """Runtime (the shared 2-core CPU, OMP_NUM_THREADS=1): there is no default run; give --runs or --train.
--train, the benchmark: about 9 min 20 s (docs/benchmarks.md: 9 min 17 s, of which 490 s training the three
models and about 1 min evaluating them). --runs on the three shipped models: evaluation only, about 1 min on
that machine (measured 6.8 min, GPT-2 331 s and each JEPA model 27 s, with the machine overloaded at a load
average of ~11). --train --facts-per-entity F trains F times the steps: on that machine at a load average of
~12, F = 2 took 30 min of training for GPT-2 (2,000 steps) and 33 min for the token-encoder JEPA (3,000 steps)
(docs/jepa.md, "Several facts per entity")."""
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {"ar": "reversal_ar.yaml", "jepa": "reversal_jepa.yaml", "jepa_memory": "reversal_jepa_memory.yaml"}
METRICS = ("seen", "forward", "reverse", "seen_mrr", "forward_mrr", "reverse_mrr")


def model_key(model) -> str:
    """``ar``, ``jepa`` or ``jepa_memory`` for a loaded reversal model."""
    from flowlab.jepa import ReversalGPT2

    if isinstance(model, ReversalGPT2):
        return "ar"
    return "jepa_memory" if model.config.memory else "jepa"


def evaluate_run(run_dir: str, max_queries: int | None = None) -> tuple[str, dict]:
    """``(key, metrics)`` of the model saved in ``<run_dir>/model`` on the data saved with it."""
    from flowlab.data.reversal import read_reversal_data
    from flowlab.jepa.recipe import evaluate_reversal, load_reversal_model

    model_dir = os.path.join(run_dir, "model")
    if not os.path.isdir(model_dir):
        raise SystemExit(f"eval/reversal.py: {model_dir} not found (train it first: python train.py --config configs/...)")
    model = load_reversal_model(model_dir)
    data = read_reversal_data(os.path.join(model_dir, "data"))
    return model_key(model), evaluate_reversal(model, data, max_queries)


def facts_overrides(key: str, facts_per_entity: int, max_steps: int) -> list[str]:
    """Overrides of config ``key`` (whose ``train.max_steps`` is ``max_steps``) for ``facts_per_entity`` facts per
    entity: the facts, ``F`` times the steps (each fact is seen as often as with one fact per entity) and, for the
    JEPA models when ``F > 1``, concepts bound to (entity, role) -- one concept per entity must fit the cycles
    that several facts per entity form, which one map per relation cannot (docs/jepa.md)."""
    out = [f"reversal.facts_per_entity={facts_per_entity}", f"train.max_steps={max_steps * facts_per_entity}"]
    if key != "ar" and facts_per_entity > 1:
        out.append("reversal.binding=relation")
    return out


def train_all(workdir: str, overrides: list[str], keys: list[str], facts_per_entity: int = 1) -> dict[str, tuple[str, float]]:
    """Train the shipped configs through the shared Trainer; ``{key: (run_dir, seconds)}``."""
    from flowlab.recipes import load_config, train_benchmark_runs

    runs = {}
    for key in keys:
        path = os.path.join(ROOT, "configs", CONFIGS[key])
        facts = facts_overrides(key, facts_per_entity, load_config(path).train.max_steps) if facts_per_entity > 1 else []
        runs.update(train_benchmark_runs({key: path}, workdir, "reversal", [*facts, *overrides]))  # --set wins
    return runs


def format_table(results: dict, seconds: dict | None = None) -> str:
    head = f"{'model':<12} {'seen':>6} {'forward':>8} {'reverse':>8} {'seen MRR':>9} {'fwd MRR':>8} {'rev MRR':>8}"
    if seconds:
        head += f" {'train s':>8}"
    lines = [head, "-" * len(head)]
    for k, r in results.items():
        line = (f"{k:<12} {r['seen']:>6.3f} {r['forward']:>8.3f} {r['reverse']:>8.3f} {r['seen_mrr']:>9.3f} "
                f"{r['forward_mrr']:>8.3f} {r['reverse_mrr']:>8.3f}")
        if seconds:
            line += f" {seconds.get(k, float('nan')):>8.0f}"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog=RUNTIME,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=None, help="trained run folders (output_dir of train.py)")
    p.add_argument("--train", action="store_true", help="train the three shipped configs first (the benchmark)")
    p.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="with --train: which ones")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="with --train: config overrides for every model")
    p.add_argument("--workdir", default=None, help="with --train: where the runs go (default: a temporary folder)")
    p.add_argument("--facts-per-entity", type=int, default=1, metavar="F",
                   help="with --train: facts per entity (default 1); F > 1 trains F times the steps and binds the JEPA "
                        "models' concepts to (entity, role) (reversal.binding=relation)")
    p.add_argument("--max-queries", type=int, default=500,
                   help="evaluate the first N facts of each split (default 500: all of group B's 500 forward and 500 "
                        "reverse facts at the shipped sizes, 500 of group A's 2000; 0: every fact)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if not args.train and not args.runs:
        p.error("give --runs DIR... or --train")
    if args.facts_per_entity < 1:
        p.error(f"--facts-per-entity: must be >= 1, got {args.facts_per_entity}")
    if args.facts_per_entity > 1 and not args.train:
        p.error("--facts-per-entity: only with --train (trained runs carry their data and its facts per entity)")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t_start = time.perf_counter()
    seconds: dict = {}
    run_dirs = list(args.runs or [])
    if args.train:
        workdir = args.workdir or tempfile.mkdtemp(prefix="reversal_bench_")
        trained = train_all(workdir, args.set, args.models, args.facts_per_entity)
        run_dirs += [d for d, _ in trained.values()]
        seconds = {k: s for k, (_, s) in trained.items()}
    results: dict = {}
    for d in run_dirs:
        key, metrics = evaluate_run(d, args.max_queries or None)
        if key in results:
            raise SystemExit(f"eval/reversal.py: two runs of the same kind ({key}); give one run per model")
        results[key] = {m: metrics[m] for m in METRICS}
    total = time.perf_counter() - t_start
    print(format_table(results, seconds))
    print(f"total wall time {total:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
