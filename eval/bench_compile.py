#!/usr/bin/env python
"""CPU speed-up of ``train.compile`` (``torch.compile``, inductor) on the quickstart model's training step.

    python eval/bench_compile.py --json bench_compile.json
    python eval/bench_compile.py --quick                      # tiny model, seconds

Two copies of the quickstart recipe's model (same initial weights), one run through ``torch.compile`` as
``train.compile=true`` does, train on the same batches in interleaved blocks (eager, compiled, eager, ...)
after one warm-up block each (the compiled model compiles there). A step is ``recipe.training_step`` +
backward + ``AdamW.step`` (:func:`bench_meanflow.time_training_steps`): the part of a trainer step that
compilation can change. Reported per step: process CPU seconds (at one torch thread, the wall time of a
quiet machine) and wall seconds, medians over blocks, and the speed-up ``eager / compiled``. The one-off
compilation (in the warm-up block) is not counted.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

RUNTIME = """Runtime (the shared 2-core CPU, OMP_NUM_THREADS=1): about 3-5 min on a quiet machine for the default
run (compilation included); 12.6 min of wall time was measured at a load average of 15-20."""

import torch

REPO = Path(__file__).resolve().parents[1]


def _bench_meanflow():
    spec = importlib.util.spec_from_file_location("flowlab_eval_bench_meanflow", REPO / "eval" / "bench_meanflow.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=RUNTIME, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    p.add_argument("--steps", type=int, default=50, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny model (smoke test)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        p.error(f"--steps and --repeats must be >= 1, got {args.steps} and {args.repeats}")
    torch.set_num_threads(args.threads)
    bm = _bench_meanflow()
    over = [f"output_dir={tempfile.mkdtemp(prefix='bench_compile_')}"]
    if args.quick:
        over += ["model.hidden_dim=32", "model.depth=2", "model.time_embed_dim=16", "train.batch_size=32"]
    t0 = time.perf_counter()
    setups = {"eager": bm.build_step_setup(args.config, over), "compiled": bm.build_step_setup(args.config, over, compile_model=True)}
    times = bm.time_training_steps(setups, args.steps, args.repeats)
    med = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    res = {
        "config": args.config,
        "threads": args.threads,
        "steps_per_block": args.steps,
        "per_step_seconds": times,
        "median_per_step_seconds": med,
        "speedup_cpu": med["eager"]["cpu"] / med["compiled"]["cpu"],
        "speedup_wall": med["eager"]["wall"] / med["compiled"]["wall"],
        "machine": {"python": platform.python_version(), "torch": torch.__version__},
        "runtime_seconds": time.perf_counter() - t0,
    }
    print(
        f"per step: eager {med['eager']['cpu'] * 1e3:.1f} ms CPU / {med['eager']['wall'] * 1e3:.1f} ms wall, compiled "
        f"{med['compiled']['cpu'] * 1e3:.1f} ms CPU / {med['compiled']['wall'] * 1e3:.1f} ms wall -> speed-up "
        f"{res['speedup_cpu']:.2f}x (CPU), {res['speedup_wall']:.2f}x (wall)",
        flush=True,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
