#!/usr/bin/env python
"""Head-to-head benchmark of DiffusionNFT and FlowGRPO on digits, in one run.

Both methods fine-tune the same base (the quickstart's class-conditional FlowPipeline, sampled
unconditionally) so that it draws a target digit, the reward being the flowlab digits classifier's
probability of that class. Each method keeps its public code's defaults (``configs/nft_digits.yaml``,
``configs/flowgrpo_digits.yaml``) except the learning rate, which is chosen for each method from the
same grid by the same rule on seed 0: the highest mean rollout reward over the last quarter of the
budget, among the learning rates whose final samples pass the quality guards (FD to the real
target-class digits <= ``--fd-multiple`` x the base's, diversity >= ``--div-fraction`` x the base's);
the chosen rate is then run on the other seeds. Same rollout budget, same seeds, same base.

Reported per method (mean and spread over seeds): rollout reward against rollouts and against
training wall time (rollouts + rewards + updates; evaluation excluded), rollouts and seconds to reach
a smoothed reward of ``--threshold``, whether it stays there to the end, and the quality guards of
the final (EMA) model. The base's guards are those of its own conditional samples of the target
class (what the base can already draw). The reward-hacking bar (``hacking_bar`` in the JSON, per method
and per seed) reads the FD in the feature space of an independent judge classifier (not the reward
model; ``flowlab.nft.quality``): final judge FD <= ``--fd-multiple`` x the base's, with eval reward >=
``--threshold``, on every seed.

    python eval/bench_nft.py --json runs/bench_nft.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

RUNTIME = """Runtime of the default run (the 2-core CPU, 1 torch thread; docs/benchmarks.md): about 15 min on a
quiet machine (the 4-rate grid x 2 methods on seed 0, then each chosen rate on seeds 1 and 2). It needs
the base pipeline first: python train.py --config configs/quickstart.yaml (about 2.5 min)."""
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smooth(values: list[float], k: int) -> list[float]:
    """Trailing moving average over ``k`` entries."""
    out = []
    for i in range(len(values)):
        w = values[max(0, i - k + 1) : i + 1]
        out.append(sum(w) / len(w))
    return out


def reward_curve(recs: list[dict], rollouts_per_step: int, args) -> dict:
    """A run's rollout reward against rollouts and training seconds (rollouts + rewards + updates, from
    ``steps_per_sec``; evaluation excluded), from its ``metrics.jsonl`` records ``recs``, with the rollouts
    and seconds to reach a smoothed reward of ``args.threshold`` (``args.smooth`` steps), whether it stays
    there, and the mean reward over the last quarter of the budget."""
    steps_recs = [r for r in recs if "reward_mean" in r]
    rollouts = [r["step"] * rollouts_per_step for r in steps_recs]
    reward = [r["reward_mean"] for r in steps_recs]
    seconds, acc = [], 0.0
    for r in steps_recs:
        acc += 1.0 / max(r["steps_per_sec"], 1e-9)
        seconds.append(acc)
    sm = smooth(reward, args.smooth)
    reach = next((i for i, v in enumerate(sm) if v >= args.threshold), None)
    return {
        "rollouts": rollouts, "reward": reward, "seconds": seconds,
        "rollouts_to_threshold": rollouts[reach] if reach is not None else None,
        "seconds_to_threshold": seconds[reach] if reach is not None else None,
        "stays_above": reach is not None and min(sm[reach:]) >= args.threshold,
        "min_after_reach": min(sm[reach:]) if reach is not None else None,
        "last_quarter_reward": statistics.mean(reward[-max(1, len(reward) // 4) :]),
    }


def run_one(method: str, base: str, lr: float, seed: int, steps: int, args, workdir: str) -> dict:
    """Train one method; return its reward curve, wall time and final guards."""
    from flowlab.recipes import Trainer, load_config

    out = os.path.join(workdir, f"{method}_lr{lr:g}_s{seed}")
    overrides = [
        f"output_dir={out}", f"seed={seed}", f"rl.base={base}", f"train.lr={lr}", f"train.max_steps={steps}",
        f"rl.rewards=[{{name: digits_classifier, target: {args.target}}}]", "train.report_to=none", "train.log_every=1",
        "train.checkpoint_every=0", "sample.every=0", "eval.every=0", f"rl.eval_samples={args.eval_samples}",
        "train.overwrite=true", *args.override,
    ]
    cfg = load_config(os.path.join(ROOT, "configs", f"{method}_digits.yaml"), overrides)
    t0 = time.perf_counter()
    Trainer(cfg).train()
    total = time.perf_counter() - t0
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    final = [r for r in recs if "eval/reward" in r][-1]
    return {
        "lr": lr, "seed": seed, **reward_curve(recs, cfg.train.batch_size * cfg.rl.group_size, args),
        "fd": final["eval/fd_target"], "diversity": final["eval/diversity"], "eval_reward": final["eval/reward"],
        "fd_judge": final["eval/fd_judge"], "wall_s": total,
    }


def base_guards(base: str, target: int, n: int) -> dict:
    import torch

    from flowlab import FlowPipeline
    from flowlab.nft.quality import digits_quality

    pipe = FlowPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    x = pipe(batch_size=n, class_labels=target, generator=g, output_type="pt", solver="multistep", num_inference_steps=20).images
    q = digits_quality(x, target)
    return {"fd": q["fd_target"], "fd_judge": q["fd_judge"], "diversity": q["diversity"], "diversity_real": q["diversity_real"]}


def passes(run: dict, base: dict, args) -> bool:
    return run["fd"] <= args.fd_multiple * base["fd"] and run["diversity"] >= args.div_fraction * base["diversity"]


def hacking_check(results: dict, method: str, base: dict, args) -> dict:
    """The reward-hacking bar of one method (:func:`flowlab.nft.quality.hacking_bar`), per seed and
    overall: the final (EMA) samples' FD to the real target-class digits in the independent judge's
    feature space <= ``--fd-multiple`` x the base's own class-conditional samples', with eval reward
    >= ``--threshold``. The method passes when every seed does."""
    from flowlab.nft.quality import hacking_bar

    runs = results[method]["runs"]
    per_seed = [hacking_bar(r["fd_judge"], base["fd_judge"], r["eval_reward"], args.fd_multiple, args.threshold) for r in runs]
    for r, bar in zip(runs, per_seed):
        r["hacking_bar"] = bar
    mean = hacking_bar(statistics.mean(r["fd_judge"] for r in runs), base["fd_judge"],
                       statistics.mean(r["eval_reward"] for r in runs), args.fd_multiple, args.threshold)
    return {**mean, "passes": all(b["passes"] for b in per_seed), "seeds_passing": sum(b["passes"] for b in per_seed),
            "num_seeds": len(per_seed)}


def summarize(runs: list[dict]) -> dict:
    def stat(key):
        vals = [r[key] for r in runs if r[key] is not None]
        if not vals:
            return None, None
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    n = min(len(r["reward"]) for r in runs)
    mean_curve = [statistics.mean(r["reward"][i] for r in runs) for i in range(n)]
    spread = [statistics.pstdev([r["reward"][i] for r in runs]) for i in range(n)]
    out = {
        "lr": runs[0]["lr"], "seeds": [r["seed"] for r in runs],
        "rollouts": runs[0]["rollouts"][:n], "reward": mean_curve, "reward_std": spread,
        "seconds": [statistics.mean(r["seconds"][i] for r in runs) for i in range(n)],
        "stays_above": all(r["stays_above"] for r in runs), "reached": all(r["rollouts_to_threshold"] is not None for r in runs),
    }
    for key in ("rollouts_to_threshold", "seconds_to_threshold", "fd", "fd_judge", "diversity", "eval_reward", "last_quarter_reward", "min_after_reach"):
        m, s = stat(key)
        out[key], out[key + "_std"] = m, s
        vals = [r[key] for r in runs if r[key] is not None]
        out[key + "_median"] = statistics.median(vals) if vals else None
    out["runs"] = runs
    return out


def add_ratios(results: dict) -> None:
    """FlowGRPO's rollouts (seconds) to the threshold over NFT's, from the medians over seeds (robust to a
    seed that ran while the shared machine was busy); ``None`` if either never got there."""
    if "nft" not in results or "flowgrpo" not in results:
        return
    n, f = results["nft"], results["flowgrpo"]
    for name, key in (("rollout_ratio", "rollouts_to_threshold_median"), ("time_ratio", "seconds_to_threshold_median")):
        ok = n[key] and f[key] and n["reached"] and f["reached"]
        results[name] = f[key] / n[key] if ok else None


def add_protocol_arguments(p: argparse.ArgumentParser, threshold: float | None = 0.9, threshold_help: str | None = None) -> None:
    """The options of the protocol (shared with ``eval/bench_nft_cond.py``): base, rollout budget, seeds,
    learning-rate grid, reach threshold and smoothing, quality guards, overrides, threads, work folder, JSON."""
    p.add_argument("--base", default=os.path.join(ROOT, "runs/quickstart/pipeline"), help="FlowPipeline to fine-tune")
    p.add_argument("--budget", type=int, default=9600, help="rollouts per run (both methods)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4, 3e-4], help="the learning-rate grid (both methods)")
    p.add_argument("--threshold", type=float, default=threshold, help=threshold_help)
    p.add_argument("--smooth", type=int, default=5, help="moving-average window (steps) of the reward curve")
    p.add_argument("--fd-multiple", type=float, default=3.0)
    p.add_argument("--div-fraction", type=float, default=0.5)
    p.add_argument("--override", nargs="*", default=[], help="extra key=value overrides for both methods")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="write the results here")


def start_protocol(args, prog: str) -> str | None:
    """Set torch's threads (``--threads``) and return the work folder (``--workdir`` or a new temporary one);
    ``None``, after saying how to train it, when the base pipeline ``--base`` is missing."""
    import torch

    torch.set_num_threads(args.threads)
    if not os.path.isdir(args.base):
        print(f"{prog}: {args.base} not found; train it with: python train.py --config configs/quickstart.yaml", file=sys.stderr)
        return None
    return args.workdir or tempfile.mkdtemp(prefix=f"{prog}_")


def write_results(results: dict, path: str | None) -> None:
    """Write the benchmark's results as JSON to ``path`` (nothing when ``None``)."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {path}")


def best_rate(grid: list[dict]) -> dict:
    """The selection rule: among the seed-0 runs of the grid whose final samples pass the quality guards
    (``passes_guards``; all of them if none does), the highest last-quarter rollout reward, ties broken by
    fewer rollouts to the threshold."""
    ok = [r for r in grid if r["passes_guards"]] or grid
    return max(ok, key=lambda r: (r["last_quarter_reward"], -(r["rollouts_to_threshold"] or 1e18)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog=RUNTIME,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=int, default=3)
    p.add_argument("--eval-samples", type=int, default=512)
    p.add_argument("--methods", nargs="+", default=["nft", "flowgrpo"])
    add_protocol_arguments(p)
    args = p.parse_args(argv)

    workdir = start_protocol(args, "bench_nft")
    if workdir is None:
        return 2
    base = base_guards(args.base, args.target, args.eval_samples)
    print(f"base (conditional class {args.target}): fd {base['fd']:.2f}, judge fd {base['fd_judge']:.2f}, "
          f"diversity {base['diversity']:.3f} (real {base['diversity_real']:.3f})")
    results: dict = {"base": base, "config": vars(args)}
    for method in args.methods:
        from flowlab.recipes import load_config

        cfg = load_config(os.path.join(ROOT, "configs", f"{method}_digits.yaml"), [*args.override])
        per_step = cfg.train.batch_size * cfg.rl.group_size
        steps = max(1, args.budget // per_step)
        grid = []
        for lr in args.lrs:
            r = run_one(method, args.base, lr, args.seeds[0], steps, args, workdir)
            r["passes_guards"] = passes(r, base, args)
            grid.append(r)
            print(f"{method} lr {lr:g} seed {args.seeds[0]}: last-quarter reward {r['last_quarter_reward']:.3f}, "
                  f"to {args.threshold}: {r['rollouts_to_threshold']} rollouts, stays {r['stays_above']}, "
                  f"fd {r['fd']:.1f}, judge fd {r['fd_judge']:.1f}, diversity {r['diversity']:.3f}, "
                  f"guards {'ok' if r['passes_guards'] else 'FAIL'}, {r['wall_s']:.0f}s")
        best = best_rate(grid)
        runs = [best] + [run_one(method, args.base, best["lr"], s, steps, args, workdir) for s in args.seeds[1:]]
        for r in runs[1:]:
            print(f"{method} lr {best['lr']:g} seed {r['seed']}: to {args.threshold}: {r['rollouts_to_threshold']} rollouts, "
                  f"stays {r['stays_above']}, fd {r['fd']:.1f}, judge fd {r['fd_judge']:.1f}, diversity {r['diversity']:.3f}")
        results[method] = summarize(runs)
        results[method]["lr_grid"] = [{k: g[k] for k in ("lr", "last_quarter_reward", "rollouts_to_threshold", "fd", "fd_judge", "diversity", "passes_guards")} for g in grid]
        results[method]["hacking_bar"] = hacking_check(results, method, base, args)
    add_ratios(results)
    print("\nmedian (mean ± sd) over seeds")
    print("method     lr      to-0.9 rollouts     to-0.9 seconds    stays  last-quarter  fd (base %.1f)  diversity (base %.2f)" % (base["fd"], base["diversity"]))
    for m in args.methods:
        s = results[m]

        def fmt(key, f="%.0f"):
            return "never" if s[key] is None else (f % s[key + "_median"]) + " (" + (f % s[key]) + " ± " + (f % s[key + "_std"]) + ")"

        print(f"{m:9s} {s['lr']:<7g} {fmt('rollouts_to_threshold'):>18s} {fmt('seconds_to_threshold', '%.1f'):>16s}   {str(s['stays_above']):5s}  "
              f"{s['last_quarter_reward']:.3f}         {s['fd']:.1f} ± {s['fd_std']:.1f}     {s['diversity']:.3f} ± {s['diversity_std']:.3f}")
    print(f"reward-hacking bar: judge FD <= {args.fd_multiple:g} x the base's class-{args.target} samples' ({base['fd_judge']:.2f}) "
          f"and eval reward >= {args.threshold:g}, every seed")
    for m in args.methods:
        b = results[m]["hacking_bar"]
        print(f"{m:9s} judge fd {b['fd_judge']:.2f} ({b['fd_ratio']:.2f}x base), eval reward {b['reward']:.3f}: "
              f"{'PASS' if b['passes'] else 'FAIL'} ({b['seeds_passing']}/{b['num_seeds']} seeds)")
    if "rollout_ratio" in results:
        print(f"FlowGRPO / NFT to reach {args.threshold}: rollouts x{results['rollout_ratio'] or float('nan'):.2f}, "
              f"wall time x{results['time_ratio'] or float('nan'):.2f}")
    write_results(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
