#!/usr/bin/env python
"""Benchmark of flowlab's flow-matching core: trainer overhead, and sample quality vs NFE per solver.

    python eval/bench_core.py --json bench_core.json                 # full run (trains a quickstart pipeline)
    python eval/bench_core.py --pipeline runs/quickstart/pipeline    # reuse a trained digits pipeline
    python eval/bench_core.py --quick --hidden-dim 32 --depth 2      # seconds-long smoke version

(a) **Trainer overhead.** flowlab's ``Trainer`` (``FlowMatchingRecipe``, the quickstart model and
optimiser: class-conditional ``MLPVelocity``, AdamW, EMA, clipping at 1.0, ``report_to=none``,
no sampling / evaluation / checkpoints while timing) against a bare PyTorch loop doing the same
per-step work on the same model, batch and in-memory digits tensor: random batch by index,
noise, logit-normal ``t``, label dropout, linear path, velocity MSE, backward,
``clip_grad_norm_``, ``AdamW.step``, an EMA update (``flowlab.train.ema.InPlaceEMA``, as the
trainer uses) and ``zero_grad``. The trainer is timed by its own per-window ``steps_per_sec``
in ``metrics.jsonl`` (window = ``train.log_every``; the first window(s) are warm-up and are
dropped; logging, start-up and the final sample/checkpoint are outside the windows); the bare
loop runs the same warm-up and the same number of timed steps. Repeats are interleaved
(bare, flowlab, bare, flowlab, ...), and the overhead is the median over repeats of
``bare_steps_per_sec / flowlab_steps_per_sec - 1``. The CPU used by *other* processes during each
half of a pair is read from ``/proc/stat``; pairs above ``--max-background`` cores are flagged,
left out of the medians and replaced (up to ``--max-pairs``). On a shared machine ``--threads 1``
is far less sensitive to other jobs than torch's default thread count.

(b) **Quality vs NFE.** Digits Fréchet distance (``DigitsEvaluator``, samples in [0, 1]) of a
trained pipeline for euler / midpoint / heun / multistep at NFE 4, 8, 16, 32 (steps =
NFE / nfe_per_step), plus dopri5 (adaptive, its NFE reported), all from the *same* initial
noise (drawn once from ``--seed``) and class labels ``arange(n) % 10``; each cell also gets its RMS
distance to the dopri5 samples (the ODE error, which FD does not measure). Then the check "the best
second-order solver at 8 NFE is no worse than Euler at 32 NFE", also on a few other noise seeds,
and the 8-NFE solvers on shifted time grids (``shift``), reported apart from the main table.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import math
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RUNTIME = """Runtime of the default run (the shared 2-core CPU, --threads 1; docs/benchmarks.md): about 10 min
on a quiet machine (part (a), 9 pairs, ~5.5 min; training the quickstart pipeline ~3.3 min; part (b) ~1.5 min),
about twice that when other jobs share the cores. --pipeline skips the training; --quick takes seconds."""
REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "quickstart.yaml"
SECOND_ORDER = ("midpoint", "heun", "multistep")
FIXED_SOLVERS = ("euler", "midpoint", "heun", "multistep")
TARGET_OVERHEAD = 0.05


# --------------------------------------------------------------------------- CLI


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=RUNTIME,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small version: fewer steps, repeats and samples (smoke test)")
    p.add_argument("--config", type=str, default=str(DEFAULT_CONFIG), help="base config (default: configs/quickstart.yaml)")
    p.add_argument("--workdir", type=str, default=None, help="where runs go (default: a temporary folder, removed at the end)")
    p.add_argument("--json", type=str, default=None, help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's)")
    p.add_argument("--skip-trainer", action="store_true", help="skip part (a)")
    p.add_argument("--skip-fd", action="store_true", help="skip part (b)")
    # model (part a, and part b when it trains its own pipeline)
    p.add_argument("--hidden-dim", type=int, default=None, help="MLP width (default: the config's, 384)")
    p.add_argument("--depth", type=int, default=None, help="MLP depth (default: the config's, 4)")
    p.add_argument("--time-embed-dim", type=int, default=None, help="(default: the config's)")
    # part (a)
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default: the config's, 128)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 300; quick 20)")
    p.add_argument("--window", type=int, default=None, help="train.log_every = timing window (default 50; quick 10)")
    p.add_argument("--warmup-windows", type=int, default=1, help="windows dropped as warm-up (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved bare/flowlab pairs (default 9: single pairs spread by several percent at 2 threads; quick 2)")
    p.add_argument("--max-background", type=float, default=None,
                   help="a pair is 'contended' when other processes used more CPU cores than this (from /proc/stat) while "
                        "it ran; contended pairs are reported but replaced (default 0.3; quick: no limit)")
    p.add_argument("--max-pairs", type=int, default=None, help="most pairs to run while looking for clean ones (default 2 x --repeats)")
    p.add_argument("--profile", action="store_true", help="also cProfile one flowlab and one bare run and print the top entries")
    # part (b)
    p.add_argument("--pipeline", type=str, default=None, help="a trained digits FlowPipeline folder (default: train one)")
    p.add_argument("--train-steps", type=int, default=None, help="max_steps when training the pipeline (default: the config's; quick 150)")
    p.add_argument("--num-samples", type=int, default=None, help="samples per FD (default 1000; quick 200)")
    p.add_argument("--sample-batch-size", type=int, default=None, help="pipeline batch (default: all samples at once)")
    p.add_argument("--nfe", type=str, default="4,8,16,32", help="NFE budgets for the fixed-step solvers")
    p.add_argument("--solvers", type=str, default=",".join(FIXED_SOLVERS))
    p.add_argument("--no-dopri5", action="store_true")
    p.add_argument("--shifts", type=str, default=None, help="extra time-grid shifts for the 8-NFE solvers (default 0.5,2.0; quick 2.0)")
    p.add_argument("--claim-seeds", type=int, default=None, help="extra noise seeds for the 8-vs-32 check (default 2; quick 0)")
    p.add_argument("--cache-dir", type=str, default=None, help="digits classifier cache (default $FLOWLAB_CACHE or ~/.cache/flowlab)")
    args = p.parse_args(argv)

    q = args.quick
    args.steps = args.steps if args.steps is not None else (20 if q else 300)
    args.window = args.window if args.window is not None else (10 if q else 50)
    args.repeats = args.repeats if args.repeats is not None else (2 if q else 9)
    if args.max_background is None:
        args.max_background = float("inf") if q else 0.3
    args.max_pairs = max(args.max_pairs if args.max_pairs is not None else 2 * args.repeats, args.repeats)
    args.num_samples = args.num_samples if args.num_samples is not None else (200 if q else 1000)
    args.shifts = _floats(args.shifts) if args.shifts is not None else ([2.0] if q else [0.5, 2.0])
    args.claim_seeds = args.claim_seeds if args.claim_seeds is not None else (0 if q else 2)
    if args.train_steps is None and q:
        args.train_steps = 150
    args.nfe = _ints(args.nfe)
    args.solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
    if args.steps < 1 or args.window < 1 or args.repeats < 1 or args.warmup_windows < 1:
        p.error("--steps, --window, --repeats and --warmup-windows must be >= 1")
    if args.steps % args.window:
        p.error(f"--steps ({args.steps}) must be a multiple of --window ({args.window})")
    if args.num_samples < 2:
        p.error("--num-samples must be >= 2")
    for s in args.solvers:
        if s not in FIXED_SOLVERS:
            p.error(f"--solvers: {s!r} is not one of {', '.join(FIXED_SOLVERS)} (dopri5 runs unless --no-dopri5)")
    return args


# --------------------------------------------------------------------------- shared


def _model_overrides(args) -> list[str]:
    out = []
    if args.hidden_dim is not None:
        out.append(f"model.hidden_dim={args.hidden_dim}")
    if args.depth is not None:
        out.append(f"model.depth={args.depth}")
    if args.time_embed_dim is not None:
        out.append(f"model.time_embed_dim={args.time_embed_dim}")
    return out


def _quiet_run_overrides(output_dir: Path) -> list[str]:
    """No trackers, sampling, evaluation or intermediate checkpoints (the end of a run still
    draws one small sample grid and saves one checkpoint, after the last timed window)."""
    return [
        f"output_dir={output_dir}",
        "train.overwrite=true",
        "train.report_to=none",
        "train.checkpoint_every=0",
        "sample.every=0",
        "sample.num_images=10",
        "sample.num_inference_steps=2",
        "eval.every=0",
        "eval.enabled=false",
    ]


def _cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall s, machine busy CPU-s from /proc/stat, this process's CPU-s); None where /proc/stat is missing."""
    try:
        import resource

        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        busy = (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / hz  # user nice system irq softirq steal
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), busy, ru.ru_utime + ru.ru_stime
    except (OSError, ValueError, ImportError, IndexError):
        return None


def _background_cores(a, b) -> float | None:
    """CPU cores busy with *other* processes between two snapshots (a contention gauge)."""
    if a is None or b is None or b[0] <= a[0]:
        return None
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / (b[0] - a[0]))


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# --------------------------------------------------------------------------- (a) trainer overhead


def _trainer_config(args, output_dir: Path, max_steps: int):
    from flowlab.recipes import load_config

    over = _quiet_run_overrides(output_dir) + _model_overrides(args) + [
        f"seed={args.seed}",
        f"train.max_steps={max_steps}",
        f"train.log_every={args.window}",
    ]
    if args.batch_size is not None:
        over.append(f"train.batch_size={args.batch_size}")
    return load_config(args.config, over)


def run_flowlab(args, output_dir: Path, profile: cProfile.Profile | None = None) -> dict[str, Any]:
    """One ``Trainer.train()``; throughput from its ``metrics.jsonl`` windows after warm-up."""
    from flowlab.recipes import Trainer

    warm = args.warmup_windows * args.window
    cfg = _trainer_config(args, output_dir, warm + args.steps)
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    if profile is not None:
        profile.enable()
    try:
        trainer.train()
    finally:
        if profile is not None:
            profile.disable()
    wall = time.perf_counter() - t0
    recs = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [r for r in recs if "steps_per_sec" in r and r["step"] > warm]
    if len(windows) != args.steps // args.window:
        raise RuntimeError(f"expected {args.steps // args.window} timed windows in metrics.jsonl, found {len(windows)}")
    sps = [float(r["steps_per_sec"]) for r in windows]
    # total steps / total time over the timed windows (the windows have equal length)
    steps_per_sec = len(sps) * args.window / sum(args.window / s for s in sps)
    return {
        "steps_per_sec": steps_per_sec,
        "window_steps_per_sec": sps,
        "wall_seconds": wall,
        "final_loss": float(windows[-1]["loss"]),
    }


def run_bare(args, x: torch.Tensor, y: torch.Tensor, cfg, profile: cProfile.Profile | None = None) -> dict[str, Any]:
    """The same per-step work as the trainer, written as a plain PyTorch loop."""
    from flowlab.models import MLPVelocity
    from flowlab.train.ema import InPlaceEMA

    m, t, f = cfg.model, cfg.train, cfg.flow
    torch.manual_seed(args.seed)
    model = MLPVelocity(
        sample_shape=tuple(x.shape[1:]), hidden_dim=m.hidden_dim, depth=m.depth, time_embed_dim=m.time_embed_dim,
        num_classes=10, dropout=m.dropout,
    )
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)
    ema = InPlaceEMA(model.parameters(), decay=t.ema_decay)
    g = torch.Generator().manual_seed(args.seed)
    n, b, null = x.shape[0], t.batch_size, 10
    p_drop, max_norm = m.label_dropout, t.max_grad_norm
    mean, std = f.logit_mean, f.logit_std

    def step():
        idx = torch.randint(n, (b,), generator=g)
        x1, labels = x[idx], y[idx]
        labels = torch.where(torch.rand(b, generator=g) < p_drop, torch.full_like(labels, null), labels)
        x0 = torch.randn(x1.shape, generator=g)
        tt = torch.sigmoid(mean + std * torch.randn(b, generator=g))
        tb = tt.view(-1, 1, 1, 1)
        xt = tb * x1 + (1 - tb) * x0
        loss = (model(xt, tt, labels) - (x1 - x0)).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        ema.step(model.parameters())
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup_windows * args.window):
        step()
    if profile is not None:
        profile.enable()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    elapsed = time.perf_counter() - t0
    if profile is not None:
        profile.disable()
    return {"steps_per_sec": args.steps / elapsed, "seconds": elapsed, "final_loss": float(loss.detach())}


def bench_trainer(args, workdir: Path) -> dict[str, Any]:
    from flowlab.data.digits import DigitsDataset

    ds = DigitsDataset("train")
    x, y = ds.x, ds.labels
    cfg = _trainer_config(args, workdir / "cfg-probe", 1)
    bare, flow, ratios, extra_ms = [], [], [], []
    background: list[list[float | None]] = []
    clean: list[bool] = []
    windows: list[list[float]] = []
    log = logging.getLogger("flowlab")
    r = -1
    # pairs where other processes used more than --max-background cores are kept but flagged, and
    # replaced by further pairs (up to --max-pairs in all) so that --repeats clean pairs are timed
    while sum(clean) < args.repeats and len(clean) < args.max_pairs:
        r += 1
        s0 = _cpu_snapshot()
        b = run_bare(args, x, y, cfg)
        s1 = _cpu_snapshot()
        out_dir = workdir / f"trainer-rep{r}"
        fl = run_flowlab(args, out_dir)
        s2 = _cpu_snapshot()
        background.append([_background_cores(s0, s1), _background_cores(s1, s2)])
        clean.append(all(v is None or v <= args.max_background for v in background[-1]))
        shutil.rmtree(out_dir, ignore_errors=True)
        bare.append(b["steps_per_sec"])
        flow.append(fl["steps_per_sec"])
        windows.append(fl["window_steps_per_sec"])
        ratios.append(b["steps_per_sec"] / fl["steps_per_sec"] - 1.0)
        extra_ms.append(1000.0 / fl["steps_per_sec"] - 1000.0 / b["steps_per_sec"])
        print(
            f"  pair {r + 1} ({sum(clean)}/{args.repeats} clean): bare {b['steps_per_sec']:7.2f} steps/s | flowlab {fl['steps_per_sec']:7.2f} steps/s "
            f"| overhead {ratios[-1]:+.1%}  (flowlab run wall {fl['wall_seconds']:.1f} s; other processes' load "
            f"{_fmt_load(background[-1][0])} / {_fmt_load(background[-1][1])} cores{'' if clean[-1] else ', CONTENDED'})",
            flush=True,
        )
        log.debug("bare loss %.4f flowlab loss %.4f", b["final_loss"], fl["final_loss"])
    m, t = cfg.model, cfg.train
    use = [i for i, c in enumerate(clean) if c] or list(range(len(clean)))  # all pairs if none is clean

    def med(xs):
        return _median([xs[i] for i in use])

    res = {
        "overhead": med(ratios),
        "contended": not any(clean),  # True: no pair ran on a quiet machine; the medians are over all pairs
        "pairs_used": [i + 1 for i in use],
        "overhead_all_pairs": _median(ratios),
        "overhead_per_repeat": ratios,
        "clean_per_repeat": clean,
        "max_background_cores": args.max_background if math.isfinite(args.max_background) else None,
        "bare_steps_per_sec_median": med(bare),
        "flowlab_steps_per_sec_median": med(flow),
        "overhead_of_medians": med(bare) / med(flow) - 1.0,
        "overhead_ms_per_step": med(extra_ms),
        "overhead_ms_per_step_per_repeat": extra_ms,
        "bare_ms_per_step_median": 1000.0 / med(bare),
        "torch_threads": torch.get_num_threads(),
        "background_cores_per_repeat": background,  # [during bare, during flowlab]: CPU used by other processes
        "bare_steps_per_sec": bare,
        "flowlab_steps_per_sec": flow,
        "flowlab_window_steps_per_sec": windows,
        "steps": args.steps,
        "warmup_steps": args.warmup_windows * args.window,
        "window": args.window,
        "repeats": args.repeats,
        "batch_size": t.batch_size,
        "model": {"type": "mlp", "hidden_dim": m.hidden_dim, "depth": m.depth, "time_embed_dim": m.time_embed_dim,
                  "class_conditional": True, "num_params": _num_params(m)},
        "ema": "flowlab InPlaceEMA (diffusers EMAModel state, in-place foreach lerp) in both loops",
        "target": TARGET_OVERHEAD,
        "within_target": med(ratios) <= TARGET_OVERHEAD,
    }
    if args.profile:
        res["profile"] = profile_trainer(args, workdir, x, y, cfg)
    return res


def _fmt_load(v) -> str:
    return "?" if v is None else f"{v:.2f}"


def _num_params(m) -> int:
    from flowlab.models import MLPVelocity

    return sum(p.numel() for p in MLPVelocity(sample_shape=(1, 8, 8), hidden_dim=m.hidden_dim, depth=m.depth,
                                              time_embed_dim=m.time_embed_dim, num_classes=10).parameters())


def profile_trainer(args, workdir: Path, x, y, cfg, top: int = 25) -> dict[str, str]:
    """cProfile one flowlab run (whole ``train()``, including start-up) and one bare loop."""
    out = {}
    prof = cProfile.Profile()
    run_flowlab(args, workdir / "trainer-profile", profile=prof)
    shutil.rmtree(workdir / "trainer-profile", ignore_errors=True)
    for name, pr in (("flowlab", prof), ("bare", None)):
        if pr is None:
            pr = cProfile.Profile()
            run_bare(args, x, y, cfg, profile=pr)
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
        out[name] = s.getvalue()
        print(f"\n--- cProfile ({name}), top {top} by tottime ---\n" + "\n".join(s.getvalue().splitlines()[:top + 12]))
    return out


def format_trainer(res: dict[str, Any]) -> str:
    lines = [
        f"(a) trainer overhead: batch {res['batch_size']}, MLP {res['model']['hidden_dim']}x{res['model']['depth']} "
        f"({res['model']['num_params'] / 1e6:.2f}M params), {res['steps']} timed steps after {res['warmup_steps']} warm-up, "
        f"{res['repeats']} interleaved repeats wanted, {len(res['overhead_per_repeat'])} pairs run",
        f"  {'repeat':>6}  {'bare steps/s':>12}  {'flowlab steps/s':>15}  {'overhead':>8}  {'other load (cores) bare/flowlab':>32}",
    ]
    for i, (b, f, r) in enumerate(zip(res["bare_steps_per_sec"], res["flowlab_steps_per_sec"], res["overhead_per_repeat"])):
        bg = res["background_cores_per_repeat"][i]
        flag = "" if res["clean_per_repeat"][i] else "  contended"
        lines.append(f"  {i + 1:>6}  {b:12.2f}  {f:15.2f}  {r:+8.1%}  {_fmt_load(bg[0]) + ' / ' + _fmt_load(bg[1]):>32}{flag}")
    which = "all pairs: NONE ran on a quiet machine" if res["contended"] else f"pairs {res['pairs_used']}"
    lines.append(f"  median over {which}")
    lines.append(f"  {'median':>6}  {res['bare_steps_per_sec_median']:12.2f}  {res['flowlab_steps_per_sec_median']:15.2f}  {res['overhead']:+8.1%}")
    verdict = "within" if res["within_target"] else "ABOVE"
    lines.append(
        f"  overhead (median of per-pair ratios) {res['overhead']:+.1%}: {verdict} the {res['target']:.0%} target; "
        f"median {res['overhead_ms_per_step']:+.2f} ms/step on a {res['bare_ms_per_step_median']:.1f} ms bare step "
        f"({res['torch_threads']} torch thread(s))"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- (b) FD vs NFE


def train_pipeline(args, workdir: Path) -> Path:
    from flowlab.recipes import Trainer, load_config

    out = workdir / "pipeline-run"
    over = [f"output_dir={out}", "train.overwrite=true", "train.report_to=none", f"seed={args.seed}"] + _model_overrides(args)
    if args.train_steps is not None:
        over += [f"train.max_steps={args.train_steps}", "eval.enabled=false", "sample.every=0", "train.checkpoint_every=0"]
        if args.train_steps < 1000:
            over.append(f"train.warmup_steps={min(100, max(args.train_steps // 10, 1))}")
    cfg = load_config(args.config, over)
    print(f"training a digits pipeline ({cfg.train.max_steps} steps, MLP {cfg.model.hidden_dim}x{cfg.model.depth}) into {out} ...", flush=True)
    t0 = time.perf_counter()
    Trainer(cfg).train()
    print(f"  trained in {time.perf_counter() - t0:.1f} s", flush=True)
    return out / "pipeline"


def sample_fd(pipe, evaluator, latents, labels, solver: str, steps: int, shift: float | None, batch: int,
              reference: torch.Tensor | None = None, guidance_scale: float | None = None) -> tuple[dict[str, Any], torch.Tensor]:
    t0 = time.perf_counter()
    chunks, nfes = [], []
    via = "pipeline"
    for i in range(0, latents.shape[0], batch):
        lat, lab = latents[i : i + batch], labels[i : i + batch]
        try:
            out = pipe(batch_size=lat.shape[0], num_inference_steps=steps, solver=solver, shift=shift, class_labels=lab,
                       latents=lat, output_type="pt", guidance_scale=guidance_scale)
            images, nfe = out.images, out.nfe
        except ValueError as e:
            # FlowPipeline.__call__ before b261f52 passed total=None to diffusers' progress_bar for
            # dopri5, which raises "Either `total` or `iterable` has to be defined." Do what the
            # pipeline does without the progress bar: same field, solver, grid and output conversion
            # (checked bit-identical to the fixed pipeline's samples).
            if solver != "dopri5" or "total" not in str(e):
                raise
            images, nfe = _solve_like_pipeline(pipe, lat, lab, solver, steps, shift)
            via = "solver (FlowPipeline dopri5 bug: progress_bar(total=None) raises)"
        chunks.append(torch.as_tensor(images).float().cpu())
        nfes.append(int(nfe))
    seconds = time.perf_counter() - t0
    images = torch.cat(chunks)
    ev = evaluator.evaluate(images, value_range="unit")
    row = {"solver": solver, "steps": steps, "shift": 1.0 if shift is None else shift, "guidance_scale": guidance_scale or 1.0,
           "nfe": max(nfes), "nfe_per_batch": nfes,
           "fd": ev["fd"], "confidence": ev["confidence"], "num_nonfinite": ev["num_nonfinite"], "seconds": seconds, "via": via}
    if reference is not None:
        # RMS distance (pixels in [0, 1]) to the adaptive solution from the same noise: the ODE error itself
        row["rmse_vs_dopri5"] = float((images - reference).pow(2).mean().sqrt())
    return row, images


@torch.no_grad()
def _solve_like_pipeline(pipe, latents, labels, solver: str, steps: int, shift: float | None):
    """``FlowPipeline.__call__(..., output_type="pt")`` minus the progress bar (image models, no guidance)."""
    sched = pipe.scheduler
    field = pipe.velocity_field(labels.to(pipe.device), sched.config.guidance_scale)
    times = sched.set_timesteps(steps, device=pipe.device, shift=shift)
    out = sched.make_solver(solver).solve(field, latents.to(pipe.device, pipe.velocity_model.dtype), times)
    return ((out.x.float() + 1) / 2).clamp(0, 1), out.nfe


def bench_fd(args, workdir: Path) -> dict[str, Any]:
    import flowlab.models  # noqa: F401  (diffusers only loads components whose module is imported)
    from flowlab import FlowPipeline
    from flowlab.flow.solvers import SOLVERS
    from flowlab.metrics.digits import DigitsEvaluator

    pipeline = Path(args.pipeline) if args.pipeline else train_pipeline(args, workdir)
    pipe = FlowPipeline.from_pretrained(str(pipeline))
    pipe.set_progress_bar_config(disable=True)
    evaluator = DigitsEvaluator.load(args.cache_dir)
    n = args.num_samples
    batch = args.sample_batch_size or n
    shape = (n, *pipe.velocity_model.sample_shape)
    labels = torch.arange(n) % 10

    def noise(seed):
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=pipe.velocity_model.dtype)

    latents = noise(args.seed)
    rows: list[dict[str, Any]] = []
    fd: dict[str, dict[str, float]] = {}
    ode_err: dict[str, dict[str, float]] = {}
    print(f"(b) digits FD vs NFE: {pipeline}, {n} samples, seed {args.seed} (same initial noise for every solver)", flush=True)
    dopri, ref = None, None
    if not args.no_dopri5:  # first: its samples are the reference of the ODE-error column
        dopri, ref = sample_fd(pipe, evaluator, latents, labels, "dopri5", 1, None, batch)
        rows.append(dopri)
        fd["dopri5"] = {str(dopri["nfe"]): dopri["fd"]}
        if dopri["via"] != "pipeline":
            print(f"  note: dopri5 sampled via {dopri['via']}", flush=True)
        print(f"  dopri5    nfe {dopri['nfe']:3d} (adaptive, rtol=atol={pipe.scheduler.config.rtol:g})  fd {dopri['fd']:8.4f}  [{dopri['seconds']:.1f} s]", flush=True)
    for solver in args.solvers:
        per = SOLVERS[solver].nfe_per_step
        for nfe in args.nfe:
            if nfe % per:
                continue
            row, _ = sample_fd(pipe, evaluator, latents, labels, solver, nfe // per, None, batch, ref)
            rows.append(row)
            fd.setdefault(solver, {})[str(row["nfe"])] = row["fd"]
            err = ""
            if "rmse_vs_dopri5" in row:
                ode_err.setdefault(solver, {})[str(row["nfe"])] = row["rmse_vs_dopri5"]
                err = f"  rmse vs dopri5 {row['rmse_vs_dopri5']:.4f}"
            print(f"  {solver:9s} nfe {row['nfe']:3d} ({row['steps']:2d} steps)  fd {row['fd']:8.4f}{err}  [{row['seconds']:.1f} s]", flush=True)

    # extra time-grid shifts for the 8-NFE solvers, kept out of the main table
    shift_res: dict[str, dict[str, float]] = {}
    shift_rows = []
    for shift in args.shifts:
        if shift == 1.0:
            continue
        for solver in args.solvers:
            per = SOLVERS[solver].nfe_per_step
            if 8 % per:
                continue
            row, _ = sample_fd(pipe, evaluator, latents, labels, solver, 8 // per, shift, batch, ref)
            shift_rows.append(row)
            shift_res.setdefault(f"{shift:g}", {})[solver] = row["fd"]
    if shift_rows:
        shift_res["1"] = {s: fd[s]["8"] for s in args.solvers if "8" in fd.get(s, {})}

    claim = _claim(args, pipe, evaluator, labels, noise, fd, batch)
    return {
        "pipeline": str(pipeline),
        "num_samples": n,
        "seed": args.seed,
        "fd": fd,
        "ode_error": ode_err,
        "rows": rows,
        "dopri5": None if dopri is None else {"nfe": dopri["nfe"], "fd": dopri["fd"], "via": dopri["via"], "rtol": pipe.scheduler.config.rtol, "atol": pipe.scheduler.config.atol},
        "floor": evaluator.floor,
        "floor_num_samples": evaluator._floor_num_samples,
        "claim": claim,
        "shift": shift_res,
        "shift_rows": shift_rows,
    }


def _claim(args, pipe, evaluator, labels, noise, fd, batch) -> dict[str, Any] | None:
    """Best second-order solver at 8 NFE vs Euler at 32 NFE (claim: no worse), on the main seed
    and, paired (same noise for both), on ``--claim-seeds`` further seeds."""
    cands = {s: fd[s]["8"] for s in SECOND_ORDER if "8" in fd.get(s, {})}
    if not cands or "32" not in fd.get("euler", {}):
        return None
    best = min(cands, key=cands.get)
    out: dict[str, Any] = {
        "solver": best,
        "fd_8nfe": cands[best],
        "fd_euler_32nfe": fd["euler"]["32"],
        "second_order_8nfe": cands,
        "holds": cands[best] <= fd["euler"]["32"],
    }
    out["margin"] = out["fd_euler_32nfe"] - out["fd_8nfe"]
    per_seed = [{"seed": args.seed, "fd_8nfe": cands[best], "fd_euler_32nfe": fd["euler"]["32"]}]
    from flowlab.flow.solvers import SOLVERS

    for k in range(1, args.claim_seeds + 1):
        seed = args.seed + 1000 * k
        lat = noise(seed)
        a = sample_fd(pipe, evaluator, lat, labels, best, 8 // SOLVERS[best].nfe_per_step, None, batch)[0]["fd"]
        e = sample_fd(pipe, evaluator, lat, labels, "euler", 32, None, batch)[0]["fd"]
        per_seed.append({"seed": seed, "fd_8nfe": a, "fd_euler_32nfe": e})
    for r in per_seed:
        r["holds"] = r["fd_8nfe"] <= r["fd_euler_32nfe"]
    out["per_seed"] = per_seed
    out["holds_on_all_seeds"] = all(r["holds"] for r in per_seed)
    return out


def format_fd(res: dict[str, Any], solvers: list[str], nfes: list[int]) -> str:
    fd = res["fd"]
    lines = [
        f"(b) digits FD (lower is better), {res['num_samples']} samples, shift 1; floor (real test {res['floor_num_samples']} vs train) "
        f"{res['floor']:.3f}",
        "  " + f"{'solver':10s}" + "".join(f"{'NFE ' + str(k):>10s}" for k in nfes),
    ]
    for s in solvers:
        cells = [f"{fd[s][str(k)]:10.3f}" if str(k) in fd.get(s, {}) else f"{'-':>10s}" for k in nfes]
        lines.append("  " + f"{s:10s}" + "".join(cells))
    if res.get("dopri5"):
        d = res["dopri5"]
        lines.append(f"  dopri5 (rtol=atol={d['rtol']:g}): NFE {d['nfe']}, fd {d['fd']:.3f}")
    err = res.get("ode_error") or {}
    if err:
        lines.append("  ODE error: RMS pixel distance (in [0, 1]) to the dopri5 samples from the same noise")
        lines.append("  " + f"{'solver':10s}" + "".join(f"{'NFE ' + str(k):>10s}" for k in nfes))
        for s in solvers:
            lines.append("  " + f"{s:10s}" + "".join(f"{err[s][str(k)]:10.4f}" if str(k) in err.get(s, {}) else f"{'-':>10s}" for k in nfes))
    c = res.get("claim")
    if c:
        lines.append(
            f"  claim: best 2nd-order @8 NFE = {c['solver']} {c['fd_8nfe']:.3f} vs euler @32 NFE {c['fd_euler_32nfe']:.3f} -> "
            + ("holds (no worse)" if c["holds"] else "does NOT hold")
        )
        if len(c["per_seed"]) > 1:
            lines.append("    paired on other noise seeds: " + "; ".join(
                f"seed {r['seed']}: {r['fd_8nfe']:.3f} vs {r['fd_euler_32nfe']:.3f} ({'ok' if r['holds'] else 'worse'})" for r in c["per_seed"]))
    if res.get("shift_rows"):
        shifts = sorted(res["shift"], key=float)
        ss = [s for s in solvers if any(s in res["shift"][k] for k in shifts)]
        lines.append("  8-NFE solvers on shifted grids (shift > 1: more steps near noise):")
        lines.append("    " + f"{'shift':>6s}" + "".join(f"{s:>11s}" for s in ss))
        for k in shifts:
            lines.append("    " + f"{k:>6s}" + "".join(f"{res['shift'][k][s]:11.3f}" if s in res["shift"][k] else f"{'-':>11s}" for s in ss))
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _finite(x) -> bool:
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(_finite(v) for v in x)
    if isinstance(x, float):
        return math.isfinite(x)
    return True


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prev_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="flowlab-bench-")
        workdir = Path(tmp)
    result: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            "python": platform.python_version(),
        },
        "argv": list(sys.argv[1:] if argv is None else argv),
    }
    try:
        if not args.skip_trainer:
            tr = bench_trainer(args, workdir)
            result["trainer_overhead"] = tr["overhead"]
            result["trainer"] = tr
            print(format_trainer(tr), flush=True)
        if not args.skip_fd:
            fdres = bench_fd(args, workdir)
            result["fd"] = fdres["fd"]
            result["floor"] = fdres["floor"]
            result["claim_8nfe_vs_euler32"] = fdres["claim"]
            result["fd_shift_8nfe"] = fdres["shift"]
            result["ode_error_vs_dopri5"] = fdres["ode_error"]
            result["fd_details"] = {k: v for k, v in fdres.items() if k not in ("fd", "floor", "claim", "shift", "ode_error")}
            print(format_fd(fdres, args.solvers, args.nfe), flush=True)
    finally:
        torch.set_num_threads(prev_threads)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result["runtime_seconds"] = time.perf_counter() - t_start
    result["all_finite"] = _finite({k: result[k] for k in ("trainer_overhead", "fd", "floor") if k in result})
    print(f"bench_core: total {result['runtime_seconds']:.1f} s")
    if args.json:
        from flowlab.fileio import atomic_write_json

        path = Path(args.json)
        atomic_write_json(path, result, indent=2, default=str)
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
