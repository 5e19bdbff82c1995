"""Benchmark: is a learned velocity field conservative, and does it matter for sampling?

On a 2-D toy and on the embedded digits, a free-form MLP velocity (``model.type: mlp``) and a
conservative one (``model.type: conservative``, v = grad of a scalar MLP of the same width and
depth) are trained by the same flow-matching recipe with the same budget (steps, batch, lr).
For each: sample quality (toy: sliced W2 to fresh data, with the data-vs-data floor;
digits: FD in the digits classifier's feature space, with the real-vs-real floor), the
conservativity diagnostics of the implied score per time bin (points: real data noised along
the path), and the training and sampling costs.

    python eval/bench_wgf.py --json bench_wgf.json [--out runs/bench_wgf] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from flowlab.data import sample_toy2d
from flowlab.data.digits import load_digits_arrays
from flowlab.metrics.vectors import sliced_wasserstein
from flowlab.pipelines import FlowPipeline
from flowlab.recipes import Trainer, load_config
from flowlab.wgf import ProbabilityFlow
from flowlab.wgf.diagnostics import conservativity_report, noised_points

RUNTIME = """Runtime of the default run (the shared 2-core CPU, OMP_NUM_THREADS=1; docs/benchmarks.md): about
4.5 min (4 models of 1,500 steps, their samples and diagnostics). --quick takes seconds."""
MODELS = {"free": "mlp", "conservative": "conservative"}


def settings(quick: bool) -> dict:
    if quick:  # for tests: seconds
        return {
            "toy": dict(data="8gaussians", steps=30, batch=128, hidden=32, depth=2, lr=2e-3, n_eval=500),
            "digits": dict(data="digits", steps=20, batch=64, hidden=32, depth=2, lr=1e-3, n_eval=200),
            "diag": dict(num_bins=3, num_points=8),
            "sample": dict(solver="heun", steps=8, timing_batch=64),
        }
    return {
        "toy": dict(data="8gaussians", steps=1500, batch=256, hidden=128, depth=3, lr=2e-3, n_eval=4000),
        "digits": dict(data="digits", steps=1500, batch=128, hidden=256, depth=3, lr=1e-3, n_eval=1000),
        "diag": dict(num_bins=5, num_points=48),
        "sample": dict(solver="heun", steps=16, timing_batch=500),
    }


def train(dataset: dict, model_type: str, out: str, seed: int) -> tuple[str, dict]:
    cfg = load_config(
        None,
        [
            f"output_dir={out}", f"seed={seed}", f"data.name={dataset['data']}", f"model.type={model_type}",
            f"model.hidden_dim={dataset['hidden']}", f"model.depth={dataset['depth']}", "model.time_embed_dim=64",
            f"train.max_steps={dataset['steps']}", f"train.batch_size={dataset['batch']}", f"train.lr={dataset['lr']}",
            f"train.warmup_steps={min(100, dataset['steps'] // 10)}", "train.checkpoint_every=0", "train.report_to=none",
            f"train.log_every={max(1, dataset['steps'] // 10)}", "train.overwrite=true", "sample.every=0", "sample.num_images=16",
            "eval.enabled=false", "flow.path=linear", "flow.prediction_type=velocity",
        ],
    )
    start = time.perf_counter()
    Trainer(cfg).train()
    seconds = time.perf_counter() - start
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rates = [r["steps_per_sec"] for r in map(json.loads, f) if "steps_per_sec" in r]
    steady = rates[1:] or rates  # the first window includes warm-up
    return os.path.join(out, "pipeline"), {
        "train_seconds": seconds,  # wall time of the whole run (set-up, training, saving)
        "train_steps": dataset["steps"],
        "train_ms_per_step": 1000 * len(steady) / sum(steady) if steady else float("nan"),  # steady state, from metrics.jsonl
    }


def evaluate(pipe_dir: str, name: str, dataset: dict, s: dict, seed: int) -> dict:
    pipe = FlowPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    n = dataset["n_eval"]
    params = sum(p.numel() for p in pipe.velocity_model.parameters())
    kw = dict(num_inference_steps=s["sample"]["steps"], solver=s["sample"]["solver"], output_type="pt")
    out = pipe(batch_size=n, generator=torch.Generator().manual_seed(seed), **kw)
    timings = []  # sampling cost: best of 3 timed batches (the machine is shared; the minimum is the least disturbed)
    for _ in range(3):
        start = time.perf_counter()
        pipe(batch_size=s["sample"]["timing_batch"], generator=torch.Generator().manual_seed(seed + 1), **kw)
        timings.append(time.perf_counter() - start)
    costs = {
        "params": params, "sample_nfe": out.nfe, "num_eval_samples": n,
        "sample_ms_per_sample": 1000 * min(timings) / s["sample"]["timing_batch"], "sample_timing_batch": s["sample"]["timing_batch"],
    }
    if name == "toy":
        ref = sample_toy2d(dataset["data"], n, seed=seed + 12345)
        ref2 = sample_toy2d(dataset["data"], n, seed=seed + 777)
        g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        quality = {"sliced_w2": sliced_wasserstein(out.images, ref, generator=g()), "floor_data_vs_data": sliced_wasserstein(ref2, ref, generator=g())}
        pool = ref2.float()
    else:
        from flowlab.metrics.digits import DigitsEvaluator

        res = DigitsEvaluator.load().evaluate(out.images, value_range="unit")
        quality = {"fd": res["fd"], "floor_real_test_vs_train": res["floor"], "confidence": res["confidence"]}
        pool = torch.from_numpy(load_digits_arrays("train")[0]).float()
    flow = ProbabilityFlow.from_flow_pipeline(pipe)
    start = time.perf_counter()
    rep = conservativity_report(
        flow.score, noised_points(flow.path, pool), generator=torch.Generator().manual_seed(seed), **s["diag"]
    )
    diag_seconds = time.perf_counter() - start
    return {"quality": quality, "costs": costs, "diagnostics": rep.to_dict()["bins"], "diagnostics_seconds": diag_seconds, "report": rep}


def markdown(results: dict) -> str:
    """Two markdown tables: quality and costs per dataset/model; Jacobian asymmetry (and loop) per time bin."""
    lines = ["| dataset | model | quality | floor | train ms/step | sample ms/sample (NFE) | params |", "|---|---|---|---|---|---|---|"]
    for name in ("toy", "digits"):
        for label in MODELS:
            r = results.get(name, {}).get(label)
            if r is None:
                continue
            q = r["quality"]
            qual, floor = (f"SW2 {q['sliced_w2']:.3f}", f"{q['floor_data_vs_data']:.3f}") if "sliced_w2" in q else (f"FD {q['fd']:.1f}", f"{q['floor_real_test_vs_train']:.1f}")
            c = r["costs"]
            lines.append(f"| {name} | {label} | {qual} | {floor} | {c['train_ms_per_step']:.1f} | {c['sample_ms_per_sample']:.3f} ({c['sample_nfe']}) | {c['params'] / 1e6:.2f}M |")
    first = next(results[n][m] for n in ("toy", "digits") if n in results for m in MODELS if m in results[n])
    bins = [f"t {b['t_low']:.2f}-{b['t_high']:.2f}" for b in first["diagnostics"]]
    lines += ["", "Jacobian asymmetry ||J-J^T||/||J|| ± 95% CI / |normalised loop integral| of the implied score, per time bin:", ""]
    lines += ["| dataset | model | " + " | ".join(bins) + " |", "|---|---|" + "---|" * len(bins)]
    for name in ("toy", "digits"):
        for label in MODELS:
            r = results.get(name, {}).get(label)
            if r is None:
                continue
            cells = [f"{b['asymmetry']['mean']:.2g} ± {1.96 * b['asymmetry']['stderr']:.1g} / {b['loop']['mean']:.2g}" for b in r["diagnostics"]]
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, epilog=RUNTIME,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--out", default="runs/bench_wgf", help="training runs and plots go here")
    p.add_argument("--datasets", default="toy,digits")
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds; for tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = settings(args.quick)
    results: dict = {
        "settings": s, "seed": args.seed, "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "field": "implied score (velocity converted on the linear path)",
    }
    for name in args.datasets.split(","):
        dataset = s[name]
        results[name] = {}
        reports = {}
        for label, mtype in MODELS.items():
            pipe_dir, costs = train(dataset, mtype, os.path.join(args.out, f"{name}_{label}"), args.seed)
            r = evaluate(pipe_dir, name, dataset, s, args.seed)
            reports[label] = r.pop("report")
            r["costs"].update(costs)
            results[name][label] = r
            q = ", ".join(f"{k}={v:.4g}" for k, v in r["quality"].items() if isinstance(v, float))
            print(f"[{name}/{label}] {q} | train {costs['train_seconds']:.1f}s ({costs['train_ms_per_step']:.1f} ms/step) | "
                  f"sample {r['costs']['sample_ms_per_sample']:.3f} ms/sample ({r['costs']['sample_nfe']} NFE)")
            print(reports[label].table())
        try:
            from flowlab.wgf.plots import plot_report

            png = os.path.join(args.out, f"conservativity_{name}.png")
            plot_report(reports, png, title=f"{name}: free vs conservative (score field)")
            results[name]["plot"] = png
        except RuntimeError as e:  # matplotlib missing
            print(f"(no plot: {e})")
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
