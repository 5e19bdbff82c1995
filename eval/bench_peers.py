#!/usr/bin/env python
"""Side-by-side benchmark of flowlab against Meta's ``flow_matching`` and ``torchcfm``.

    OMP_NUM_THREADS=1 python eval/bench_peers.py --threads 1 --json bench_peers.json   # full run
    python eval/bench_peers.py --pipeline runs/quickstart/pipeline --json out.json      # reuse a digits pipeline
    python eval/bench_peers.py --quick --json quick.json                                # smoke test (~1 min)

The peers are a benchmark-only extra: ``pip install -e .[peers]`` (``flow_matching`` is
CC-BY-NC and never imported by ``src/flowlab``).

(a) **Sampling** (one trained digits ``FlowPipeline``, the quickstart model). The same
initial noise, class labels, time grid and velocity field (``FlowPipeline.velocity_field``) go
to flowlab (``FlowPipeline.__call__``, ``output_type="latent"``) and to
``flow_matching.solver.ODESolver.sample`` (torchdiffeq underneath, ``step_size=None`` so that
it steps on the given grid). For each shared method (euler, midpoint, heun = torchdiffeq's
``heun2``) at each NFE: the largest absolute difference of the samples, and the wall time per
1,000 samples as the median over interleaved repeats (the order alternates between repeats);
the ratio is ``flowlab / flow_matching`` per repeat, then the median. Quality: digits Fréchet
distance (``flowlab.metrics.DigitsEvaluator``, the space of ``eval/digits.py``) at 4 and 8
NFE for every fixed-step method of each library (flowlab adds its ``multistep`` solver;
flow_matching adds torchdiffeq's ``rk4`` and ``explicit_adams``), and each library's best.

(b) **Likelihood.** ``flowlab.flow.log_likelihood`` against ``ODESolver.compute_likelihood`` on
the same model (conditioned on the true labels), the same real test digits and the same
midpoint grid from ``t = 1`` to ``t = 0``, with the exact divergence and with Hutchinson's
estimator (each library draws its own Rademacher probe, so the Hutchinson values are compared
with the exact ones, not with each other). Times: medians over interleaved repeats.

(c) **OT-CFM training** on the 2-D toys: flowlab's ``Trainer`` on ``configs/toy2d.yaml`` with
``flow.coupling=ot`` against a bare PyTorch loop around torchcfm's
``ExactOptimalTransportConditionalFlowMatcher(sigma=0)``, with the same model (flowlab's
``MLPVelocity`` of the config), dataset tensor, batch, AdamW settings, LR schedule, gradient
clipping and EMA. Throughput: steps per second over the steps after the first log window
(flowlab: its own ``metrics.jsonl`` windows). Quality: sliced 2-Wasserstein distance
(``flowlab.metrics.vectors.sliced_wasserstein``) between EMA samples (Heun, 16 steps, the same
noise for both) and fresh data, with the data-vs-data floor; at equal steps, and at equal
training wall time (the slower library is retrained for the steps it manages in the time the
faster one needs for the full budget). Medians over ``--toy-repeats`` seeds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

RUNTIME = """Runtime of the default run (--threads 1): about 20-25 min on a quiet 2-core CPU (training the quickstart
pipeline ~4 min, sampling ~3 min, likelihoods ~2 min, OT-CFM training ~15 min); 68 min (4,087 s) on the shared
2-core CPU under heavy load from other jobs (load 9-19; docs/benchmarks.md). --pipeline skips the training of the
digits model; --quick takes 10-60 s."""
REPO = Path(__file__).resolve().parents[1]
QUICKSTART_CONFIG = REPO / "configs" / "quickstart.yaml"
TOY_CONFIG = REPO / "configs" / "toy2d.yaml"
PEER = "flow_matching"
# flowlab solver name -> torchdiffeq method used by flow_matching's ODESolver (same scheme)
SHARED_METHODS = {"euler": "euler", "midpoint": "midpoint", "heun": "heun2"}
# fixed-step methods of each library that enter the best-quality comparison, with NFE per step
FLOWLAB_METHODS = {"euler": 1, "midpoint": 2, "heun": 2, "multistep": 1}
PEER_METHODS = {"euler": 1, "midpoint": 2, "heun2": 2, "rk4": 4, "explicit_adams": 1}
IDENTICAL_ATOL = 1e-5  # largest |difference| of samples (values of order 1) counted as identical


# --------------------------------------------------------------------------- CLI


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _names(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=RUNTIME, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke-test sizes: tiny models, few samples, steps and repeats (~1 min)")
    p.add_argument("--json", type=str, default=None, help="write every figure here")
    p.add_argument("--workdir", type=str, default=None, help="where training runs go (default: a temporary folder, removed at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's; 1 recommended)")
    p.add_argument("--skip-sampling", action="store_true", help="skip part (a)")
    p.add_argument("--skip-likelihood", action="store_true", help="skip part (b)")
    p.add_argument("--skip-training", action="store_true", help="skip part (c)")
    p.add_argument("--cache-dir", type=str, default=None, help="digits classifier cache (default $FLOWLAB_CACHE or ~/.cache/flowlab)")
    # (a) + (b): the digits pipeline
    p.add_argument("--pipeline", type=str, default=None, help="a trained digits FlowPipeline folder (default: train the quickstart)")
    p.add_argument("--train-steps", type=int, default=None, help="quickstart max_steps when training it here (default: the config's 3000; quick 60)")
    p.add_argument("--hidden-dim", type=int, default=None, help="quickstart MLP width when training it here (default 384; quick 32)")
    p.add_argument("--depth", type=int, default=None, help="quickstart MLP depth when training it here (default 4; quick 2)")
    p.add_argument("--num-samples", type=int, default=None, help="samples per sampling run and FD (default 1000; quick 100)")
    p.add_argument("--nfe", type=str, default=None, help="NFE budgets of the equal-NFE comparison (default 4,8,16; quick 4,8)")
    p.add_argument("--quality-nfe", type=str, default="4,8", help="NFE budgets of the best-quality comparison")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timing repeats (default 7; quick 2)")
    p.add_argument("--lik-points", type=int, default=None, help="real test digits for the likelihoods (default 100; quick 8)")
    p.add_argument("--lik-steps", type=int, default=None, help="midpoint steps of the likelihood ODE (default 16; quick 4)")
    p.add_argument("--lik-repeats", type=int, default=None, help="interleaved likelihood timing repeats (default 3; quick 1)")
    # (c) OT-CFM training
    p.add_argument("--toy-datasets", type=str, default="8gaussians,moons")
    p.add_argument("--toy-steps", type=int, default=None, help="training steps per run (default: the config's 2000; quick 40)")
    p.add_argument("--toy-window", type=int, default=None, help="log window = timing window; the first is warm-up (default 100; quick 10)")
    p.add_argument("--toy-repeats", type=int, default=None, help="seeds per dataset, run interleaved (default 3; quick 1)")
    p.add_argument("--toy-eval-samples", type=int, default=None, help="samples for the sliced W2 (default 4000; quick 500)")
    args = p.parse_args(argv)

    q = args.quick
    defaults = {
        "train_steps": (60, None), "hidden_dim": (32, None), "depth": (2, None), "num_samples": (100, 1000),
        "repeats": (2, 7), "lik_points": (8, 100), "lik_steps": (4, 16), "lik_repeats": (1, 3),
        "toy_steps": (40, None), "toy_window": (10, 100), "toy_repeats": (1, 3), "toy_eval_samples": (500, 4000),
    }
    for key, (quick, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if q else full)
    args.nfe = _ints(args.nfe) if args.nfe is not None else ([4, 8] if q else [4, 8, 16])
    args.quality_nfe = _ints(args.quality_nfe)
    args.toy_datasets = _names(args.toy_datasets)
    for key in ("num_samples", "repeats", "lik_points", "lik_steps", "lik_repeats", "toy_window", "toy_repeats", "toy_eval_samples"):
        if getattr(args, key) < (2 if key in ("num_samples", "toy_eval_samples") else 1):
            p.error(f"--{key.replace('_', '-')} is too small: {getattr(args, key)}")
    if args.toy_steps is not None and args.toy_steps < 2 * args.toy_window:
        p.error(f"--toy-steps ({args.toy_steps}) must be at least two --toy-window ({args.toy_window}): the first window is warm-up")
    for n in args.nfe + args.quality_nfe:
        if n < 1:
            p.error(f"NFE budgets must be >= 1, got {n}")
    from flowlab.data import TOY2D

    for name in args.toy_datasets:
        if name not in TOY2D:
            p.error(f"--toy-datasets: {name!r} is not one of {', '.join(TOY2D)}")
    return args


def import_peers():
    """``(flow_matching.solver.ODESolver, flow_matching.utils.ModelWrapper, torchcfm's OT matcher)``,
    or an ImportError that says how to install them."""
    try:
        from flow_matching.solver import ODESolver
        from flow_matching.utils import ModelWrapper
        from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher
    except ImportError as e:
        raise ImportError(f"eval/bench_peers.py needs the benchmark-only peers: pip install -e '.[peers]' ({e})") from e
    return ODESolver, ModelWrapper, ExactOptimalTransportConditionalFlowMatcher


# --------------------------------------------------------------------------- shared


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each callable per repeat, run in turn; the order is reversed every other
    repeat so that neither side always runs first (warm caches, a neighbour's load)."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            times[k].append(_timed(fns[k])[1])
    return times


def _ratio_stats(flowlab_s: list[float], peer_s: list[float], per: float = 1.0) -> dict[str, Any]:
    ratios = [a / b for a, b in zip(flowlab_s, peer_s)]
    return {
        "flowlab_seconds": _median(flowlab_s) * per,
        "peer_seconds": _median(peer_s) * per,
        "ratio": _median(ratios),  # flowlab / peer: < 1 means flowlab is faster
        "ratio_per_repeat": ratios,
        "flowlab_seconds_per_repeat": [s * per for s in flowlab_s],
        "peer_seconds_per_repeat": [s * per for s in peer_s],
    }


class CountedField:
    """A velocity ``(x, t) -> v`` that counts its calls; ``t`` may be a float or a 0-d/``(B,)`` tensor."""

    def __init__(self, field: Callable[[Tensor, Tensor], Tensor]):
        self.field, self.calls = field, 0

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        self.calls += 1
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        return self.field(x, t.expand(x.shape[0]) if t.ndim == 0 else t)


def _peer_model(field: Callable[[Tensor, Tensor], Tensor], model_wrapper_cls):
    """``field`` as a flow_matching ``ModelWrapper`` (its solvers call ``model(x=x, t=t)`` with a 0-d ``t``)."""

    class FieldWrapper(model_wrapper_cls):
        def __init__(self):
            super().__init__(None)
            self.counted = CountedField(field)

        def forward(self, x: Tensor, t: Tensor, **extras) -> Tensor:
            return self.counted(x, t)

    return FieldWrapper()


def train_quickstart(args, workdir: Path) -> Path:
    """Train the quickstart digits pipeline with flowlab's Trainer; returns its pipeline folder."""
    from flowlab import Trainer, load_config

    out = workdir / "quickstart"
    over = [f"output_dir={out}", "train.overwrite=true", "train.report_to=none", f"seed={args.seed}",
            "sample.every=0", "train.checkpoint_every=0", "eval.enabled=false"]
    if args.hidden_dim is not None:
        over.append(f"model.hidden_dim={args.hidden_dim}")
    if args.depth is not None:
        over.append(f"model.depth={args.depth}")
    if args.train_steps is not None:
        over += [f"train.max_steps={args.train_steps}", f"train.warmup_steps={min(100, max(args.train_steps // 10, 1))}"]
    cfg = load_config(QUICKSTART_CONFIG, over)
    print(f"training the quickstart pipeline ({cfg.train.max_steps} steps, MLP {cfg.model.hidden_dim}x{cfg.model.depth}) ...", flush=True)
    _, seconds = _timed(lambda: Trainer(cfg).train())
    print(f"  trained in {seconds:.1f} s", flush=True)
    return out / "pipeline"


# --------------------------------------------------------------------------- (a) sampling


def bench_sampling(args, pipe, evaluator, ODESolver, ModelWrapper) -> dict[str, Any]:
    """Equal-NFE identity and speed of the shared methods, and each library's best 4/8-NFE FD."""
    n = args.num_samples
    gen = torch.Generator().manual_seed(args.seed)
    latents = torch.randn((n, *pipe.velocity_model.sample_shape), generator=gen, dtype=pipe.velocity_model.dtype)
    labels = torch.arange(n) % pipe.velocity_model.num_classes
    field = pipe.velocity_field(labels.to(pipe.device), 1.0)
    peer = _peer_model(field, ModelWrapper)
    ode = ODESolver(velocity_model=peer)
    per_1000 = 1000.0 / n

    def flowlab_run(solver: str, steps: int) -> Tensor:
        return pipe(latents=latents, class_labels=labels, num_inference_steps=steps, solver=solver, output_type="latent").images

    def peer_run(method: str, steps: int) -> tuple[Tensor, int]:
        grid = pipe.scheduler.set_timesteps(steps, device=pipe.device).to(latents.dtype)  # the same grid as flowlab's
        peer.counted.calls = 0
        x = ode.sample(x_init=latents, step_size=None, method=method, time_grid=grid)
        return x, peer.counted.calls

    equal: list[dict[str, Any]] = []
    print(f"(a) sampling: {n} samples, flowlab FlowPipeline vs {PEER} ODESolver, same noise, labels, grid and field", flush=True)
    for solver, method in SHARED_METHODS.items():
        per = FLOWLAB_METHODS[solver]
        for nfe in args.nfe:
            if nfe % per:
                continue
            steps = nfe // per
            ours = flowlab_run(solver, steps)  # also the warm-up of both sides
            theirs, peer_nfe = peer_run(method, steps)
            times = _interleaved({"flowlab": lambda: flowlab_run(solver, steps), "peer": lambda: peer_run(method, steps)}, args.repeats)
            diff = float((ours - theirs).abs().max())
            row = {"method": solver, "peer_method": method, "nfe": nfe, "peer_nfe": peer_nfe, "steps": steps,
                   "max_abs_diff": diff, "identical": diff <= IDENTICAL_ATOL, "bitwise_identical": bool(torch.equal(ours, theirs)),
                   **_ratio_stats(times["flowlab"], times["peer"], per_1000)}
            equal.append(row)
            print(f"  {solver:9s} nfe {nfe:3d}: max |diff| {diff:.2e}  flowlab {row['flowlab_seconds']:.3f} s / 1000  "
                  f"{PEER} {row['peer_seconds']:.3f} s / 1000  ratio {row['ratio']:.3f}", flush=True)

    quality: dict[str, Any] = {}
    for nfe in args.quality_nfe:
        cell: dict[str, dict[str, Any]] = {"flowlab": {}, PEER: {}}
        for solver, per in FLOWLAB_METHODS.items():
            if nfe % per == 0:
                x = flowlab_run(solver, nfe // per)
                cell["flowlab"][solver] = {"fd": evaluator.evaluate(x, value_range="model")["fd"], "nfe": nfe, "steps": nfe // per}
        for method, per in PEER_METHODS.items():
            if nfe % per == 0:
                x, used = peer_run(method, nfe // per)
                cell[PEER][method] = {"fd": evaluator.evaluate(x, value_range="model")["fd"], "nfe": used, "steps": nfe // per}
        best = {}
        for lib in ("flowlab", PEER):
            ok = {m: r for m, r in cell[lib].items() if r["nfe"] <= nfe and math.isfinite(r["fd"])}
            if ok:
                m = min(ok, key=lambda k: ok[k]["fd"])
                best[lib] = {"method": m, "fd": ok[m]["fd"]}
        quality[str(nfe)] = {**cell, "best": best}
        print(f"  FD at {nfe} NFE: " + "; ".join(f"{lib} best {b['method']} {b['fd']:.3f}" for lib, b in best.items())
              + "  | " + ", ".join(f"{lib}:{m} {r['fd']:.2f}" for lib in ("flowlab", PEER) for m, r in cell[lib].items()), flush=True)
    return {"num_samples": n, "repeats": args.repeats, "identical_atol": IDENTICAL_ATOL, "equal_nfe": equal,
            "quality": quality, "floor": evaluator.floor, "floor_num_samples": evaluator._floor_num_samples}


# --------------------------------------------------------------------------- (b) likelihood


def bench_likelihood(args, pipe, ODESolver, ModelWrapper) -> dict[str, Any]:
    """flowlab's ``log_likelihood`` vs ``ODESolver.compute_likelihood``, exact and Hutchinson."""
    from flowlab.data.digits import DigitsDataset
    from flowlab.flow import gaussian_log_density, log_likelihood, time_grid

    test = DigitsDataset("test")
    k = min(args.lik_points, len(test.x))
    x_img, labels = test.x[:k].to(pipe.device, pipe.velocity_model.dtype), test.labels[:k].long().to(pipe.device)
    shape = x_img.shape
    field = pipe.velocity_field(labels, 1.0)

    def flat_field(x: Tensor, t: Tensor) -> Tensor:
        # flow_matching's exact divergence indexes ut[:, i], so both libraries get the model on flat (B, D) inputs
        return field(x.reshape(shape), t).flatten(1)

    x1 = x_img.flatten(1)
    ode = ODESolver(velocity_model=_peer_model(flat_field, ModelWrapper))
    grid = time_grid(args.lik_steps).flip(0).to(x1)

    def ours(estimator: str):
        with torch.no_grad():
            return log_likelihood(flat_field, x1, solver="midpoint", num_steps=args.lik_steps, estimator=estimator,
                                  generator=torch.Generator().manual_seed(args.seed + 1))

    def theirs(exact: bool):
        torch.manual_seed(args.seed + 2)  # flow_matching draws its Hutchinson probe from the global RNG
        return ode.compute_likelihood(x_1=x1, log_p0=gaussian_log_density, step_size=None, method="midpoint",
                                      time_grid=grid, exact_divergence=exact)

    out: dict[str, Any] = {"num_points": k, "solver": "midpoint", "steps": args.lik_steps, "nfe": 2 * args.lik_steps,
                           "repeats": args.lik_repeats, "dim": int(x1.shape[1])}
    print(f"(b) likelihood: {k} real test digits, midpoint {args.lik_steps} steps, flowlab log_likelihood vs {PEER} compute_likelihood", flush=True)
    exact_ref = None
    for estimator in ("exact", "hutchinson"):
        a = ours(estimator)
        x0_b, lp_b = theirs(estimator == "exact")
        times = _interleaved({"flowlab": lambda: ours(estimator), "peer": lambda: theirs(estimator == "exact")}, args.lik_repeats)
        row: dict[str, Any] = {
            "flowlab_mean_log_prob": float(a.log_prob.mean()),
            "peer_mean_log_prob": float(lp_b.mean()),
            **_ratio_stats(times["flowlab"], times["peer"]),
        }
        if estimator == "exact":
            exact_ref = (a.log_prob + lp_b) / 2
            row["max_abs_diff_log_prob"] = float((a.log_prob - lp_b).abs().max())
            row["max_abs_diff_x0"] = float((a.x_0 - x0_b).abs().max())
            row["mean_log_prob_per_dim"] = float(a.log_prob.mean()) / x1.shape[1]
        else:  # independent probes: compare each estimate with the exact value
            for name, lp in (("flowlab", a.log_prob), ("peer", lp_b)):
                err = lp - exact_ref
                row[f"{name}_mean_error_vs_exact"] = float(err.mean())
                row[f"{name}_mean_abs_error_vs_exact"] = float(err.abs().mean())
                row[f"{name}_error_std"] = float(err.std()) if k > 1 else 0.0
        out[estimator] = row
        agree = (f"max |diff| {row['max_abs_diff_log_prob']:.2e} nats" if estimator == "exact" else
                 f"mean |error vs exact| flowlab {row['flowlab_mean_abs_error_vs_exact']:.3f}, {PEER} {row['peer_mean_abs_error_vs_exact']:.3f} nats")
        print(f"  {estimator:10s}: mean log p flowlab {row['flowlab_mean_log_prob']:.3f} / {PEER} {row['peer_mean_log_prob']:.3f}; {agree}; "
              f"{row['flowlab_seconds']:.2f} s vs {row['peer_seconds']:.2f} s (ratio {row['ratio']:.3f})", flush=True)
    return out


# --------------------------------------------------------------------------- (c) OT-CFM training


def _toy_config(args, dataset: str, seed: int, steps: int | None, output_dir: Path):
    from flowlab import load_config

    over = [f"output_dir={output_dir}", "train.overwrite=true", "train.report_to=none", f"seed={seed}",
            f"data.name={dataset}", "flow.coupling=ot", "sample.every=0", "sample.num_images=16",
            "sample.num_inference_steps=2", "eval.enabled=false", "train.checkpoint_every=0", f"train.log_every={args.toy_window}"]
    if steps is not None:
        over.append(f"train.max_steps={steps}")
    if args.quick:
        over += ["model.hidden_dim=32", "model.depth=2", "train.batch_size=64", "train.warmup_steps=5"]
    return load_config(TOY_CONFIG, over)


def train_flowlab_toy(args, cfg) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``Trainer(cfg).train()``; throughput from its ``metrics.jsonl`` windows after the first; the EMA model."""
    from flowlab import FlowPipeline
    from flowlab import Trainer

    out = Path(cfg.output_dir)
    Trainer(cfg).train()
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    w = cfg.train.log_every
    sps = [float(r["steps_per_sec"]) for r in recs if "steps_per_sec" in r and r["step"] > w]
    if not sps:
        raise RuntimeError(f"no timed windows after the first in {out / 'metrics.jsonl'}")
    seconds = sum(w / s for s in sps)
    model = FlowPipeline.from_pretrained(str(out / "pipeline")).velocity_model.eval()
    shutil.rmtree(out, ignore_errors=True)
    return model, {"steps": cfg.train.max_steps, "timed_steps": w * len(sps), "train_seconds": seconds, "steps_per_sec": w * len(sps) / seconds}


def train_torchcfm_toy(args, cfg, matcher_cls) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A bare PyTorch loop around torchcfm's exact-OT matcher with the trainer's model, data and optimiser."""
    import numpy as np
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from flowlab.data import build_dataset
    from flowlab.models import MLPVelocity

    m, t = cfg.model, cfg.train
    data = build_dataset(cfg.data, cfg.seed).x
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)  # torchcfm draws its OT pairs with numpy's global RNG
    model = MLPVelocity(sample_shape=tuple(data.shape[1:]), hidden_dim=m.hidden_dim, depth=m.depth,
                        time_embed_dim=m.time_embed_dim, num_classes=0, dropout=m.dropout)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)
    sched = get_scheduler(t.lr_scheduler, opt, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps)
    ema = EMAModel(model.parameters(), decay=t.ema_decay, foreach=True)
    fm = matcher_cls(sigma=0.0)
    n, b = data.shape[0], t.batch_size

    def step() -> None:
        x1 = data[torch.randint(n, (b,))]
        x0 = torch.randn_like(x1)
        tt, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
        loss = (model(xt, tt) - ut).pow(2).mean()
        loss.backward()
        if t.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        opt.step()
        sched.step()
        ema.step(model.parameters())
        opt.zero_grad(set_to_none=True)

    w = t.log_every
    for _ in range(w):  # warm-up window, as the trainer's first window
        step()
    t0 = time.perf_counter()
    for _ in range(t.max_steps - w):
        step()
    seconds = time.perf_counter() - t0
    ema.copy_to(model.parameters())
    model.eval()
    timed = t.max_steps - w
    return model, {"steps": t.max_steps, "timed_steps": timed, "train_seconds": seconds, "steps_per_sec": timed / seconds}


@torch.no_grad()
def toy_quality(model: torch.nn.Module, dataset: str, args, seed: int) -> float:
    """Sliced W2 between Heun-16 samples of ``model`` and fresh data (same noise and projections for every model)."""
    from flowlab.data.toy2d import sample_toy2d
    from flowlab.flow import get_solver, time_grid
    from flowlab.metrics.vectors import sliced_wasserstein

    m = args.toy_eval_samples
    noise = torch.randn(m, 2, generator=torch.Generator().manual_seed(10_000 + seed))
    x = get_solver("heun").solve(lambda x, t: model(x, t), noise, time_grid(16)).x
    ref = sample_toy2d(dataset, m, seed=20_000 + seed)
    return sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(seed))


def bench_training(args, workdir: Path, matcher_cls, report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Per dataset: interleaved flowlab / torchcfm runs per seed, then medians; ``report(results so far)``
    after each dataset."""
    from flowlab.data.toy2d import sample_toy2d
    from flowlab.metrics.vectors import sliced_wasserstein

    res: dict[str, Any] = {}
    print(f"(c) OT-CFM training: flowlab Trainer (configs/toy2d.yaml, flow.coupling=ot) vs torchcfm exact-OT bare loop", flush=True)
    for dataset in args.toy_datasets:
        runs = []
        for r in range(args.toy_repeats):
            seed = args.seed + r
            cfg = _toy_config(args, dataset, seed, args.toy_steps, workdir / f"toy-{dataset}-{r}")
            first = ("flowlab", "torchcfm") if r % 2 == 0 else ("torchcfm", "flowlab")
            got: dict[str, tuple[torch.nn.Module, dict[str, Any]]] = {}
            for lib in first:
                got[lib] = train_flowlab_toy(args, cfg) if lib == "flowlab" else train_torchcfm_toy(args, cfg, matcher_cls)
            run: dict[str, Any] = {"seed": seed}
            for lib, (model, stats) in got.items():
                run[lib] = {**stats, "sw2": toy_quality(model, dataset, args, seed)}
            # equal wall time: the slower library gets the steps it manages in the faster one's training time
            fast, slow = sorted(("flowlab", "torchcfm"), key=lambda k: run[k]["train_seconds"])
            budget = run[fast]["train_seconds"]
            w = cfg.train.log_every
            steps_slow = max(2 * w, int(round(w + budget * run[slow]["steps_per_sec"])))  # + the warm-up window
            cfg_slow = _toy_config(args, dataset, seed, steps_slow, workdir / f"toy-{dataset}-{r}-time")
            model, stats = train_flowlab_toy(args, cfg_slow) if slow == "flowlab" else train_torchcfm_toy(args, cfg_slow, matcher_cls)
            run["equal_time"] = {"budget_seconds": budget, "faster": fast, "slower": slow, fast: {"steps": run[fast]["steps"], "sw2": run[fast]["sw2"]},
                                 slow: {**stats, "sw2": toy_quality(model, dataset, args, seed)}}
            run["steps_per_sec_ratio"] = run["flowlab"]["steps_per_sec"] / run["torchcfm"]["steps_per_sec"]
            m = args.toy_eval_samples
            run["floor_sw2"] = sliced_wasserstein(sample_toy2d(dataset, m, seed=30_000 + seed), sample_toy2d(dataset, m, seed=20_000 + seed),
                                                  generator=torch.Generator().manual_seed(seed))
            runs.append(run)
            et = run["equal_time"]
            print(f"  {dataset:10s} seed {seed}: steps/s flowlab {run['flowlab']['steps_per_sec']:.1f} torchcfm {run['torchcfm']['steps_per_sec']:.1f} "
                  f"(ratio {run['steps_per_sec_ratio']:.3f}); SW2 at {run['flowlab']['steps']} steps flowlab {run['flowlab']['sw2']:.4f} "
                  f"torchcfm {run['torchcfm']['sw2']:.4f}; equal time ({budget:.1f} s): {slow} {et[slow]['steps']} steps SW2 {et[slow]['sw2']:.4f}; "
                  f"floor {run['floor_sw2']:.4f}", flush=True)

        def med(f):
            return _median([f(x) for x in runs])

        res[dataset] = {
            "steps": runs[0]["flowlab"]["steps"],
            "batch_size": _toy_config(args, dataset, args.seed, args.toy_steps, workdir / "probe").train.batch_size,
            "flowlab_steps_per_sec": med(lambda x: x["flowlab"]["steps_per_sec"]),
            "torchcfm_steps_per_sec": med(lambda x: x["torchcfm"]["steps_per_sec"]),
            "steps_per_sec_ratio": med(lambda x: x["steps_per_sec_ratio"]),  # flowlab / torchcfm: > 1 means flowlab is faster
            "equal_steps_sw2": {"flowlab": med(lambda x: x["flowlab"]["sw2"]), "torchcfm": med(lambda x: x["torchcfm"]["sw2"])},
            "equal_time_sw2": {lib: med(lambda x, lib=lib: x["equal_time"][lib]["sw2"]) for lib in ("flowlab", "torchcfm")},
            "equal_time_steps": {lib: med(lambda x, lib=lib: x["equal_time"][lib]["steps"]) for lib in ("flowlab", "torchcfm")},
            "floor_sw2": med(lambda x: x["floor_sw2"]),
            "runs": runs,
        }
        if report is not None:
            report(res)
    return res


# --------------------------------------------------------------------------- report


def format_report(res: dict[str, Any]) -> str:
    lines = []
    s = res.get("sampling")
    if s:
        lines.append(f"(a) sampling, {s['num_samples']} samples, seconds per 1000 samples (median of {s['repeats']} interleaved repeats)")
        lines.append(f"  {'method':9s} {'NFE':>4s} {'max|diff|':>10s} {'flowlab s':>10s} {PEER + ' s':>16s} {'ratio':>7s}")
        for r in s["equal_nfe"]:
            lines.append(f"  {r['method']:9s} {r['nfe']:4d} {r['max_abs_diff']:10.1e} {r['flowlab_seconds']:10.3f} {r['peer_seconds']:16.3f} {r['ratio']:7.3f}")
        for nfe, q in s["quality"].items():
            lines.append(f"  best FD at {nfe} NFE: " + "; ".join(f"{lib} {b['method']} {b['fd']:.3f}" for lib, b in q["best"].items())
                         + f"  (floor {s['floor']:.3f})")
    lk = res.get("likelihood")
    if lk:
        e, h = lk["exact"], lk["hutchinson"]
        lines.append(f"(b) likelihood, {lk['num_points']} points, midpoint {lk['steps']} steps")
        lines.append(f"  exact:      max |diff| {e['max_abs_diff_log_prob']:.2e} nats; {e['flowlab_seconds']:.2f} s vs {e['peer_seconds']:.2f} s (ratio {e['ratio']:.3f})")
        lines.append(f"  hutchinson: mean |err vs exact| {h['flowlab_mean_abs_error_vs_exact']:.3f} vs {h['peer_mean_abs_error_vs_exact']:.3f} nats; "
                     f"{h['flowlab_seconds']:.3f} s vs {h['peer_seconds']:.3f} s (ratio {h['ratio']:.3f})")
    tr = res.get("training")
    if tr:
        lines.append("(c) OT-CFM training (medians over seeds)")
        for name, d in tr.items():
            lines.append(f"  {name:10s} steps/s flowlab {d['flowlab_steps_per_sec']:.1f} torchcfm {d['torchcfm_steps_per_sec']:.1f} (ratio {d['steps_per_sec_ratio']:.3f}); "
                         f"SW2 equal steps {d['equal_steps_sw2']['flowlab']:.4f} / {d['equal_steps_sw2']['torchcfm']:.4f}; "
                         f"equal time {d['equal_time_sw2']['flowlab']:.4f} / {d['equal_time_sw2']['torchcfm']:.4f}; floor {d['floor_sw2']:.4f}")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpf = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmpf.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmpf, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ODESolver, ModelWrapper, OTMatcher = import_peers()
    import flow_matching
    import torchcfm

    import flowlab as flowlab_pkg

    prev_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="flowlab-bench-peers-")
        workdir = Path(tmp)
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "torch_threads": torch.get_num_threads()},
        "versions": {"flowlab": getattr(flowlab_pkg, "__version__", None), "torch": torch.__version__,
                     "flow_matching": getattr(flow_matching, "__version__", None), "torchcfm": getattr(torchcfm, "__version__", None)},
        "argv": list(sys.argv[1:] if argv is None else argv),
        "complete": False,
    }

    def partial() -> None:  # each finished part reaches the JSON at once (a long run may be cut short)
        if args.json:
            write_json(args.json, {**result, "runtime_seconds": time.perf_counter() - t_start})

    try:
        if not (args.skip_sampling and args.skip_likelihood):
            import flowlab.models  # noqa: F401  (diffusers only loads components whose module is imported)
            from flowlab import FlowPipeline

            path = Path(args.pipeline) if args.pipeline else train_quickstart(args, workdir)
            pipe = FlowPipeline.from_pretrained(str(path))
            pipe.set_progress_bar_config(disable=True)
            pipe.velocity_model.eval()
            result["pipeline"] = str(path) if args.pipeline else f"trained here: configs/quickstart.yaml, seed {args.seed}"
            if not args.skip_sampling:
                from flowlab.metrics import DigitsEvaluator

                result["sampling"] = bench_sampling(args, pipe, DigitsEvaluator.load(args.cache_dir), ODESolver, ModelWrapper)
                partial()
            if not args.skip_likelihood:
                result["likelihood"] = bench_likelihood(args, pipe, ODESolver, ModelWrapper)
                partial()
        if not args.skip_training:
            result["training"] = bench_training(args, workdir, OTMatcher, report=lambda res: (result.__setitem__("training", res), partial()))
    finally:
        torch.set_num_threads(prev_threads)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result["runtime_seconds"] = time.perf_counter() - t_start
    result["complete"] = True
    print(format_report(result))
    print(f"bench_peers: total {result['runtime_seconds']:.1f} s")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
