#!/usr/bin/env python
"""Evaluate digits samples from a flowlab pipeline with the digits-classifier Fréchet distance.

    python eval/digits.py --pipeline runs/quickstart/pipeline --num-samples 1000 \\
        --steps 16 --solver heun --seed 0 --json out.json
    python eval/digits.py --real-test --json real.json   # sanity check: fd == floor

Reports ``fd`` (samples vs the real TRAIN split, in classifier feature space), ``floor`` (real
TEST split, 360 images, vs TRAIN), ``confidence`` (mean max softmax) and ``class_hist``
(fraction of samples predicted as each digit). FD is biased upwards at small sample counts:
compare FDs only at equal ``--num-samples`` (use 360 to compare with the floor directly).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from flowlab.data.digits import load_digits_arrays, to_unit_range
from flowlab.fileio import atomic_write_json
from flowlab.metrics.digits import CLASSIFIER_VERSION, DigitsEvaluator


RUNTIME = """Runtime of the default run on the quickstart pipeline (the 2-core CPU, OMP_NUM_THREADS=1): about 8 s
(measured 8.3 s for 1,000 samples, heun, 16 steps), plus about 2 s the first time, to train and cache
the digits classifier."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=RUNTIME,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pipeline", type=str, help="directory of a saved FlowPipeline")
    src.add_argument("--real-test", action="store_true", help="evaluate the real test split instead (fd == floor)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--steps", type=int, default=16, help="num_inference_steps")
    p.add_argument("--solver", type=str, default="heun")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=str, default=None, help="move the pipeline here (default: leave it)")
    p.add_argument("--cache-dir", type=str, default=None, help="classifier cache (default $FLOWLAB_CACHE or ~/.cache/flowlab)")
    p.add_argument("--json", type=str, default=None, help="write the results here")
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    args = p.parse_args(argv)
    if args.num_samples < 2:
        p.error("--num-samples must be >= 2")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def _solver_nfe(solver: str, steps: int) -> int | None:
    """NFE of a fixed-step solver per sample (None for adaptive or unknown solvers)."""
    try:
        from flowlab.flow.solvers import SOLVERS
    except Exception:
        return None
    cls = SOLVERS.get(solver)
    if cls is None or solver == "dopri5":
        return None
    return int(cls.nfe_per_step) * int(steps)


def sample_pipeline(pipe, num_samples: int, batch_size: int, steps: int, solver: str, seed: int) -> tuple[torch.Tensor, int | None]:
    """Draw ``num_samples`` images ``(N, C, H, W)`` in ``[0, 1]``. One generator is seeded once
    and shared by all batches, so batches differ and the whole run is reproducible."""
    generator = torch.Generator().manual_seed(seed)
    chunks, nfe = [], None
    done = 0
    while done < num_samples:
        b = min(batch_size, num_samples - done)
        out = pipe(batch_size=b, num_inference_steps=steps, solver=solver, generator=generator, output_type="pt")
        imgs = out.images if hasattr(out, "images") else out[0]
        imgs = torch.as_tensor(imgs).detach().float().cpu()
        if imgs.shape[0] != b:
            raise RuntimeError(f"pipeline returned {imgs.shape[0]} images for batch_size={b}")
        chunks.append(imgs)
        out_nfe = getattr(out, "nfe", None)
        if out_nfe and nfe is None:  # 0 / None: not reported
            nfe = int(out_nfe)
        done += b
    return torch.cat(chunks), nfe


def format_table(res: dict[str, Any]) -> str:
    lines = [f"digits Fréchet distance (classifier {res['classifier_version']}, reference = train split, {res['reference_num_samples']} images)"]
    if res["source"] == "pipeline":
        nfe = res.get("nfe")
        lines.append(f"  source       {res['pipeline']}")
        lines.append(f"  sampler      {res['solver']}, {res['steps']} steps" + (f", nfe {nfe}" if nfe is not None else "") + f", seed {res['seed']}")
    else:
        lines.append("  source       real test split")
    ratio = res["fd"] / res["floor"] if res["floor"] > 0 else float("nan")
    lines += [
        f"  num_samples  {res['num_samples']}" + (f"   ({res['num_nonfinite']} non-finite!)" if res.get("num_nonfinite") else ""),
        f"  fd           {res['fd']:.4f}   ({ratio:.2f} x floor)",
        f"  floor        {res['floor']:.4f}   (real test, {res['floor_num_samples']} vs train; compare at equal sample counts)",
        f"  confidence   {res['confidence']:.4f}",
        "  class_hist   " + "  ".join(f"{k}:{v:.3f}" for k, v in enumerate(res["class_hist"])),
    ]
    if res.get("sample_seconds") is not None:
        lines.append(f"  sampling     {res['sample_seconds']:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    evaluator = DigitsEvaluator.load(args.cache_dir)
    res: dict[str, Any] = {}
    if args.real_test:
        x, _ = load_digits_arrays("test")
        images = to_unit_range(torch.from_numpy(x))
        meta: dict[str, Any] = {"source": "real-test", "sample_seconds": None}
    else:
        import flowlab.models  # noqa: F401  (diffusers only loads components whose module is imported)
        from flowlab import FlowPipeline

        pipe = FlowPipeline.from_pretrained(args.pipeline)
        if args.device is not None:
            pipe = pipe.to(args.device)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        t0 = time.perf_counter()
        images, nfe = sample_pipeline(pipe, args.num_samples, args.batch_size, args.steps, args.solver, args.seed)
        sample_seconds = time.perf_counter() - t0
        nfe_source = "pipeline"
        if nfe is None:
            nfe, nfe_source = _solver_nfe(args.solver, args.steps), "solver"
        meta = {
            "source": "pipeline",
            "pipeline": str(args.pipeline),
            "solver": args.solver,
            "steps": args.steps,
            "nfe": nfe,
            "nfe_source": nfe_source if nfe is not None else None,
            "seed": args.seed,
            "sample_seconds": sample_seconds,
        }
    metrics = evaluator.evaluate(images, value_range="unit")
    res.update(metrics)
    res.update(meta)
    res["classifier_version"] = CLASSIFIER_VERSION
    res["classifier_test_accuracy"] = evaluator.info.get("test_accuracy")
    if not args.quiet:
        print(format_table(res))
    if args.json:
        path = Path(args.json)
        atomic_write_json(path, res, indent=2)
        if not args.quiet:
            print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
