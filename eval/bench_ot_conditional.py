#!/usr/bin/env python
"""Minibatch OT for a class-conditional model: pairing within each class against pairing across classes.

    OMP_NUM_THREADS=1 python eval/bench_ot_conditional.py --json bench_ot_conditional.json   # 2 seeds, ~15 min
    python eval/bench_ot_conditional.py --quick                                               # tiny, ~1 min

The quickstart (class-conditional digits flow matching) is trained per seed three times, changing only the
coupling: ``independent`` (the config's), ``ot`` (``flow.coupling=ot``: exact minibatch OT within each
class, labels after dropout) and ``ot_class_blind`` (the same assignment over the whole batch, as flowlab
did before it passed labels to the coupling). Each pipeline samples 1,000 digits with its own default
sampler (Heun, 16 steps), one label per class in turn, from the same noise, and is scored by the digits FD
(``flowlab.metrics.digits``; real test digits score about 1.3). Printed and saved: FD per seed and
coupling, and the median over seeds.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

RUNTIME = "Runtime (the shared 2-core CPU, OMP_NUM_THREADS=1): about 2.5 min per training run, 6 runs by default (15 min)."

import torch

from flowlab.flow import MinibatchOTCoupling

REPO = Path(__file__).resolve().parents[1]

COUPLINGS = ("independent", "ot", "ot_class_blind")


class ClassBlindOT(MinibatchOTCoupling):
    """The assignment over the whole batch, whatever the labels (the pairing before ``groups``)."""

    def __call__(self, x_0, x_1, groups=None):
        return super().__call__(x_0, x_1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=RUNTIME, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, 60 steps, 200 samples, one seed (smoke test)")
    p.add_argument("--seeds", type=str, default=None, help="comma-separated seeds (default 0,1; quick 0)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's 3000; quick 60)")
    p.add_argument("--num-samples", type=int, default=None, help="samples per FD (default 1000; quick 200)")
    p.add_argument("--workdir", type=str, default=None, help="where runs go (default: a temporary folder, removed at the end)")
    p.add_argument("--json", type=str, default=None, help="write the results here")
    return p.parse_args(argv)


def train_and_score(coupling: str, seed: int, args, workdir: Path, evaluator) -> dict:
    from flowlab import FlowPipeline
    from flowlab.recipes import Trainer, get_recipe, load_config

    out = workdir / f"{coupling}_{seed}"
    over = [f"output_dir={out}", f"seed={seed}", "train.report_to=none", "train.checkpoint_every=0", "sample.every=0",
            "eval.enabled=false", "train.overwrite=true"]
    if coupling != "independent":
        over.append("flow.coupling=ot")
    if args.steps is not None:
        over.append(f"train.max_steps={args.steps}")
    if args.quick:
        over += ["model.hidden_dim=32", "model.depth=2", "model.time_embed_dim=16", "train.warmup_steps=5"]
    cfg = load_config(str(REPO / "configs" / "quickstart.yaml"), over)
    recipe = get_recipe(cfg)
    if coupling == "ot_class_blind":
        recipe.loss.coupling = ClassBlindOT()
    t0 = time.perf_counter()
    Trainer(cfg, recipe=recipe).train()
    seconds = time.perf_counter() - t0
    pipe = FlowPipeline.from_pretrained(str(out / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    n = args.num_samples
    images = pipe(batch_size=n, class_labels=torch.arange(n) % 10, generator=torch.Generator().manual_seed(0), output_type="pt").images
    fd = evaluator.evaluate(images, value_range="unit")["fd"]
    return {"coupling": coupling, "seed": seed, "fd": float(fd), "train_seconds": seconds}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1")).split(",")]
    args.num_samples = args.num_samples or (200 if args.quick else 1000)
    if args.quick and args.steps is None:
        args.steps = 60
    from flowlab.metrics.digits import DigitsEvaluator

    evaluator = DigitsEvaluator.load()
    tmp = None if args.workdir else tempfile.TemporaryDirectory()
    workdir = Path(args.workdir or tmp.name)
    rows = []
    try:
        for seed in args.seeds:
            for coupling in COUPLINGS:
                row = train_and_score(coupling, seed, args, workdir, evaluator)
                print(f"seed {seed} {coupling:>15}: FD {row['fd']:.2f} (training {row['train_seconds']:.0f} s)", flush=True)
                rows.append(row)
    finally:
        if tmp is not None:
            tmp.cleanup()
    median = {c: statistics.median(r["fd"] for r in rows if r["coupling"] == c) for c in COUPLINGS}
    print("median FD over seeds: " + ", ".join(f"{c} {v:.2f}" for c, v in median.items()))
    res = {"rows": rows, "median_fd": median, "seeds": args.seeds, "steps": args.steps, "num_samples": args.num_samples,
           "torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads()}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
