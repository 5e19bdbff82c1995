#!/usr/bin/env python
"""The conditional digits benchmark: CFG-free DiffusionNFT against FlowGRPO with CFG.

The paper's headline setting, CPU-sized. The prompts are the ten digit classes of the quickstart's
class-conditional FlowPipeline; the reward is the flowlab digits classifier's probability of the
PROMPTED class (``digits_classifier`` with ``target: prompted``), a GenEval-like correctness reward
that the base needs classifier-free guidance to do well on. FlowGRPO rolls out, trains and is
evaluated with the base's CFG scale (``configs/flowgrpo_digits_cond.yaml``, as its reference does);
DiffusionNFT rolls out, trains and is evaluated without CFG (``configs/nft_digits_cond.yaml``).

Protocol (that of ``eval/bench_nft.py``): the same learning-rate grid on seed 0 for each method, the
rate with the highest mean rollout reward over the last quarter of the budget among those whose final
samples pass the quality guards (mean per-class FD to the real digits of that class <= ``--fd-multiple``
x the base's, per-class diversity >= ``--div-fraction`` x the base's; the base sampled with its CFG
scale), then that rate on the other seeds. Same rollout budget, seeds and base for both.

Reported per method (mean and spread over seeds): rollout reward against rollouts and against training
wall time, rollouts and seconds to reach a smoothed reward of ``--threshold`` (default: the base's own reward
with FlowGRPO's CFG scale, so for NFT "matches the CFG base without CFG"), whether it stays there, and the final
model's quality.

Quality of a model (:func:`conditional_quality`, ``--per-class`` samples of each digit, the evaluation
solver and steps): the reward (mean P(prompted class) over all ten classes), the FD to the real digits of
each class and its mean, the per-class diversity, and the classifier-space FD of all samples to the real
digits (the train split: the digits FD of docs/benchmarks.md). It is measured for the base with each
CFG scale of ``--cfg-grid`` (the sweep that picks FlowGRPO's scale), and for each method's final (EMA)
model with its own evaluation CFG.

    python eval/bench_nft_cond.py --json runs/bench_nft_cond.json

Runs are cached in ``--workdir`` (``result.json`` per run): with ``--reuse`` a finished run is read back
instead of trained, so the two methods can run in two processes and a third call assembles the report.
Never let two calls train the same run (method, rate, seed) into one ``--workdir`` at once: each clears
its run folder when it starts.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from bench_nft import add_protocol_arguments, add_ratios, best_rate, reward_curve, start_protocol, summarize, write_results

RUNTIME = """Runtime of the default run (the 2-core CPU shared with other jobs, 1 torch thread; docs/benchmarks.md):
about 95 min in one process (12 runs: an NFT run takes about 5 min, a FlowGRPO run about 10 min, its CFG
doubling the forward passes), about 60 min with --methods nft and --methods flowgrpo in two processes and a
final --reuse call. It needs the base pipeline first: python train.py --config configs/quickstart.yaml (about 3 min)."""
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"nft": "nft_digits_cond.yaml", "flowgrpo": "flowgrpo_digits_cond.yaml"}
NUM_CLASSES = 10


def conditional_quality(pipe, guidance_scale: float, per_class: int, seed: int = 0, solver: str = "multistep", steps: int = 20,
                        evaluator=None) -> dict:
    """Class-conditional quality of a digits FlowPipeline sampled with CFG ``guidance_scale`` (1: none).

    Draws ``per_class`` samples of each digit 0..9 and returns ``reward`` (mean P(prompted class) under
    the reward's classifier), ``fd_per_class`` (10 FDs to the real digits of each class, classifier
    features) and their mean ``fd_class_mean``, ``diversity_class_mean`` (per-class mean pairwise pixel
    distance, averaged; ``diversity_real_class_mean`` the same for the real digits), and ``fd_all``
    (all samples against the real train split, the standard digits FD).
    """
    import torch

    from flowlab.metrics.digits import DigitsEvaluator
    from flowlab.nft.quality import digits_quality
    from flowlab.rewards import build_reward

    ev = evaluator or DigitsEvaluator.load()
    reward = build_reward({"name": "digits_classifier", "target": "prompted"})
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    g = torch.Generator().manual_seed(seed)
    x = pipe(class_labels=labels, guidance_scale=guidance_scale, generator=g, output_type="pt", solver=solver,
             num_inference_steps=steps).images
    scores = reward(x, metadata=[{"condition": int(c)} for c in labels])
    per = [digits_quality(x[labels == c], c, ev) for c in range(NUM_CLASSES)]
    out = {
        "guidance_scale": guidance_scale, "reward": float(scores.mean()),
        "reward_per_class": [float(scores[labels == c].mean()) for c in range(NUM_CLASSES)],
        "fd_per_class": [q["fd_target"] for q in per], "fd_class_mean": statistics.mean(q["fd_target"] for q in per),
        "diversity_class_mean": statistics.mean(q["diversity"] for q in per),
        "diversity_real_class_mean": statistics.mean(q["diversity_real"] for q in per),
        "fd_all": ev.evaluate(x, value_range="unit")["fd"],
    }
    for key in sorted(set(per[0]) - {"fd_target", "diversity", "diversity_real"}):  # further quality figures, e.g. a judge's FD
        if isinstance(per[0][key], (int, float)):
            out[f"{key}_class_mean"] = statistics.mean(q[key] for q in per)
    return out


def load_pipeline(path: str):
    from flowlab import FlowPipeline

    pipe = FlowPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_one(method: str, base: str, lr: float, seed: int, steps: int, args, workdir: str, evaluator) -> dict:
    """Train ``method`` with its conditional config at ``lr`` and ``seed``; its reward curve and the final
    (EMA) model's :func:`conditional_quality` with the config's evaluation CFG (``rl.eval_guidance_scale``)."""
    from flowlab.recipes import Trainer, load_config

    out = os.path.join(workdir, f"{method}_lr{lr:g}_s{seed}")
    cached = os.path.join(out, "result.json")
    if args.reuse and os.path.isfile(cached):  # the final quality from the cache, the curve read afresh (--threshold may differ)
        with open(cached) as f:
            res = json.load(f)
        recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        return {**res, **reward_curve(recs, res["rollouts_per_step"], args)}
    overrides = [
        f"output_dir={out}", f"seed={seed}", f"rl.base={base}", f"train.lr={lr}", f"train.max_steps={steps}",
        "train.report_to=none", "train.log_every=1", "train.checkpoint_every=0", "sample.every=0", "eval.every=0",
        f"rl.eval_samples={NUM_CLASSES * 10}", "train.overwrite=true", *args.override,
    ]
    cfg = load_config(os.path.join(ROOT, "configs", CONFIGS[method]), overrides)
    t0 = time.perf_counter()
    Trainer(cfg).train()
    total = time.perf_counter() - t0
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    q = conditional_quality(load_pipeline(os.path.join(out, "pipeline")), cfg.rl.eval_guidance_scale, args.per_class,
                            steps=cfg.rl.eval_steps, solver=cfg.rl.eval_solver, evaluator=evaluator)
    res = {
        "lr": lr, "seed": seed, **reward_curve(recs, cfg.train.batch_size * cfg.rl.group_size, args),
        "fd": q["fd_class_mean"], "diversity": q["diversity_class_mean"], "eval_reward": q["reward"], "quality": q,
        "fd_judge": q.get("fd_judge_class_mean"),  # the independent judge's FD, where flowlab.nft.quality reports one
        "rollout_guidance_scale": cfg.rl.guidance_scale, "rollouts_per_step": cfg.train.batch_size * cfg.rl.group_size, "wall_s": total,
    }
    with open(cached, "w") as f:
        json.dump(res, f)
    return res


def passes(run: dict, base: dict, args) -> bool:
    return run["fd"] <= args.fd_multiple * base["fd_class_mean"] and run["diversity"] >= args.div_fraction * base["diversity_class_mean"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog=RUNTIME, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_arguments(p, threshold=None, threshold_help="smoothed rollout reward to reach (default: the base's reward with "
                           "FlowGRPO's CFG, i.e. CFG-free NFT matching the base's CFG correctness)")
    p.add_argument("--per-class", type=int, default=100, help="samples per digit in each quality measurement")
    p.add_argument("--cfg-grid", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0, 5.0],
                   help="CFG scales of the base's sweep (reward and FD of each)")
    p.add_argument("--methods", nargs="+", default=["nft", "flowgrpo"], choices=sorted(CONFIGS))
    p.add_argument("--reuse", action="store_true", help="read finished runs back from --workdir instead of training them")
    args = p.parse_args(argv)

    from flowlab.metrics.digits import DigitsEvaluator
    from flowlab.recipes import load_config

    workdir = start_protocol(args, "bench_nft_cond")
    if workdir is None:
        return 2
    ev = DigitsEvaluator.load()
    base_pipe = load_pipeline(args.base)
    grpo_cfg = load_config(os.path.join(ROOT, "configs", CONFIGS["flowgrpo"]), [*args.override])
    w = grpo_cfg.rl.guidance_scale
    scales = sorted(set(args.cfg_grid) | {1.0, w})
    sweep = [conditional_quality(base_pipe, s, args.per_class, steps=grpo_cfg.rl.eval_steps, solver=grpo_cfg.rl.eval_solver, evaluator=ev)
             for s in scales]
    print("base CFG sweep (%d samples per class):" % args.per_class)
    for q in sweep:
        print(f"  w {q['guidance_scale']:<4g} reward {q['reward']:.3f}  FD per class (mean) {q['fd_class_mean']:.1f}  "
              f"FD all {q['fd_all']:.1f}  diversity {q['diversity_class_mean']:.3f}{'   <- FlowGRPO config' if q['guidance_scale'] == w else ''}")
    base_cfg = next(q for q in sweep if q["guidance_scale"] == w)
    base_free = next(q for q in sweep if q["guidance_scale"] == 1.0)
    if args.threshold is None:
        args.threshold = round(base_cfg["reward"], 3)
    print(f"threshold: smoothed rollout reward {args.threshold}")
    results: dict = {"base_cfg": base_cfg, "base_no_cfg": base_free, "base_cfg_sweep": sweep, "guidance_scale": w, "config": vars(args)}
    for method in args.methods:
        cfg = load_config(os.path.join(ROOT, "configs", CONFIGS[method]), [*args.override])
        steps = max(1, args.budget // (cfg.train.batch_size * cfg.rl.group_size))
        grid = []
        for lr in args.lrs:
            r = run_one(method, args.base, lr, args.seeds[0], steps, args, workdir, ev)
            r["passes_guards"] = passes(r, base_cfg, args)
            grid.append(r)
            print(f"{method} lr {lr:g} seed {args.seeds[0]}: last-quarter reward {r['last_quarter_reward']:.3f}, "
                  f"to {args.threshold}: {r['rollouts_to_threshold']} rollouts, final reward {r['eval_reward']:.3f}, "
                  f"FD/class {r['fd']:.1f}, diversity {r['diversity']:.3f}, guards {'ok' if r['passes_guards'] else 'FAIL'}, {r['wall_s']:.0f}s")
        best = best_rate(grid)
        runs = [best] + [run_one(method, args.base, best["lr"], s, steps, args, workdir, ev) for s in args.seeds[1:]]
        for r in runs[1:]:
            print(f"{method} lr {best['lr']:g} seed {r['seed']}: to {args.threshold}: {r['rollouts_to_threshold']} rollouts, "
                  f"final reward {r['eval_reward']:.3f}, FD/class {r['fd']:.1f}, diversity {r['diversity']:.3f}")
        results[method] = summarize(runs)
        results[method]["lr_grid"] = [{k: g[k] for k in ("lr", "last_quarter_reward", "rollouts_to_threshold", "eval_reward", "fd", "diversity",
                                                          "passes_guards")} for g in grid]
        results[method]["eval_guidance_scale"] = cfg.rl.eval_guidance_scale
        results[method]["fd_all"] = statistics.mean(r["quality"]["fd_all"] for r in runs)
    add_ratios(results)
    print(f"\nfinal models, mean over seeds ({args.per_class} samples per class; base: w {w:g} and w 1)")
    print("model                      reward  FD/class  FD all  diversity")
    rows = [(f"base, CFG w {w:g}", base_cfg), ("base, no CFG", base_free)]
    for m in args.methods:
        s = results[m]
        rows.append((f"{m} (lr {s['lr']:g}), w {s['eval_guidance_scale']:g}",
                     {"reward": s["eval_reward"], "fd_class_mean": s["fd"], "fd_all": s["fd_all"], "diversity_class_mean": s["diversity"]}))
    for name, q in rows:
        print(f"{name:26s} {q['reward']:.3f}   {q['fd_class_mean']:7.1f}  {q['fd_all']:6.1f}  {q['diversity_class_mean']:.3f}")
    for m in args.methods:
        s = results[m]
        to = "never" if s["rollouts_to_threshold"] is None else f"{s['rollouts_to_threshold_median']:.0f} rollouts, {s['seconds_to_threshold_median']:.1f} s"
        print(f"{m}: to {args.threshold} (median): {to}; stays: {s['stays_above']}; last-quarter reward {s['last_quarter_reward']:.3f}")
    if results.get("rollout_ratio") is not None:
        print(f"FlowGRPO / NFT to reach {args.threshold}: rollouts x{results['rollout_ratio']:.2f}, wall time x{results['time_ratio']:.2f}")
    write_results(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
