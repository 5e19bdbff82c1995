#!/usr/bin/env python
"""Few-step sampling on digits: MeanFlow at 1 and 2 NFE against the standard flow-matching model's Euler-32.

    python eval/bench_meanflow.py --json bench_meanflow.json            # 3 seeds, quickstart budget
    python eval/bench_meanflow.py --quick --json /tmp/mf.json           # seconds-long smoke version

For every seed, in one run: the standard model (``configs/quickstart.yaml``, ``recipe: flow_matching``,
its ``train.max_steps``) and a MeanFlow model (``configs/meanflow_digits.yaml``, ``recipe: meanflow``)
are trained for the **same compute**, then sampled from the same initial noise and class labels and
scored by the digits Fréchet distance (``DigitsEvaluator``, the FD space of ``eval/digits.py``).

**Equal wall time.** The trainer takes a step budget, not a time budget (its cosine LR schedule needs
the end), so the MeanFlow step count is set from a measured cost ratio: before training, the two
recipes' training steps (forward, loss, backward, AdamW) are timed in interleaved blocks at the same
torch thread count, in *process CPU time* (on a shared machine, wall time mixes in other jobs' load;
at one torch thread CPU time is the wall time of a quiet machine), and the MeanFlow run gets
``round(standard_steps * cost_standard / cost_meanflow)`` steps (``--mf-steps`` sets it instead).
Each run's wall and CPU seconds are recorded, so the match can be checked.

**Scores.** Standard model: Euler at 32 NFE (the reference), and Euler-1/2 and multistep-2 (what the
standard model gives at MeanFlow's budget). MeanFlow model: ``solver="meanflow"`` at 1 and 2 NFE
through ``FlowPipeline`` (saved and re-loaded with ``from_pretrained``), and Euler-32 of its
instantaneous velocity ``u(x, t, t)``; 2-NFE MeanFlow is scored on the pipeline's own grid (its config's
``sample.shift``) and on the uniform one. Targets: MeanFlow 2-NFE FD <= standard Euler-32 FD, and
1-NFE FD <= 1.5 x standard Euler-32 FD, per seed and on the mean over seeds.

**Reflow** (opt-in, ``--reflow-steps N``): a second few-step route. Per seed, once the standard model is trained,
``configs/reflow_digits.yaml`` (``recipe: reflow``) distils it in the same process: its teacher pairs are drawn (timed
on their own), then a student that starts from the standard model trains ``N`` steps on them; the student is scored
at Euler-1, Euler-2 and Euler-32 from the same noise and labels. Its cost is *extra* to the standard model's (pair
generation CPU-s + reflow training CPU-s, both recorded), not matched to it.

    python eval/bench_meanflow.py --seeds 0,1,2 --reflow-steps 1000 --json bench_meanflow_reflow.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

RUNTIME = """Runtime (the shared 2-core CPU, OMP_NUM_THREADS=1): the default (3 seeds) trains the quickstart and the
MeanFlow model per seed, about 15 min of CPU in all on a quiet machine (143-154 CPU-s per standard run,
136-139 per MeanFlow run; 12-15 min of wall time per run at a load average of 10-13). --reflow-steps 1000 adds
about 95 CPU-s per seed (configs/reflow_digits.yaml: 10,000 guided heun-16 teacher pairs, about 50 s, then the training)."""

import torch

REPO = Path(__file__).resolve().parents[1]


def _bench_core():
    """``eval/bench_core.py`` (its FD sampler and quiet-run settings are shared, not copied)."""
    spec = importlib.util.spec_from_file_location("flowlab_eval_bench_core", REPO / "eval" / "bench_core.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=RUNTIME, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fm-config", default=str(REPO / "configs" / "quickstart.yaml"), help="the standard model's config")
    p.add_argument("--mf-config", default=str(REPO / "configs" / "meanflow_digits.yaml"), help="the MeanFlow model's config")
    p.add_argument("--reflow-config", default=str(REPO / "configs" / "reflow_digits.yaml"), help="the reflow student's config (with --reflow-steps)")
    p.add_argument("--reflow-steps", type=int, default=None,
                   help="also reflow each seed's standard model for this many steps and score the student (default: off)")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="training seeds (each trains both models)")
    p.add_argument("--fm-steps", type=int, default=None, help="standard model's steps (default: its config's train.max_steps)")
    p.add_argument("--mf-steps", type=int, default=None, help="MeanFlow steps (default: equal compute from the measured cost ratio)")
    p.add_argument("--probe-steps", type=int, default=30, help="steps per timed block of the cost probe")
    p.add_argument("--probe-repeats", type=int, default=3, help="interleaved blocks per recipe in the cost probe")
    p.add_argument("--num-samples", type=int, default=1000, help="samples per FD cell")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the initial noise shared by every cell")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: far less sensitive to other jobs)")
    p.add_argument("--quick", action="store_true", help="tiny models and budgets (smoke test)")
    p.add_argument("--workdir", default=None, help="where runs are written (default: a temporary folder)")
    p.add_argument("--reuse-runs", action="store_true",
                   help="score runs already in --workdir (<standard|meanflow>-<seed>/, same seed and steps) instead of training them")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    for key in ("fm_steps", "mf_steps", "reflow_steps", "probe_steps", "probe_repeats", "num_samples"):
        v = getattr(args, key)
        if v is not None and v < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {v}")
    if not args.seeds:
        p.error("--seeds: give at least one seed")
    return args


def _overrides(args, output_dir: Path, seed: int, steps: int | None) -> list[str]:
    over = _bench_core()._quiet_run_overrides(output_dir) + [f"seed={seed}"]
    if steps is not None:
        over.append(f"train.max_steps={steps}")
        if steps < 1000:
            over.append(f"train.warmup_steps={min(100, max(steps // 10, 1))}")
    if args.quick:
        over += ["model.hidden_dim=32", "model.depth=2", "model.time_embed_dim=16", "train.batch_size=32"]
    return over


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def build_step_setup(cfg_path: str, overrides: list[str], compile_model: bool = False) -> dict[str, Any]:
    """A recipe, its dataset, model (``torch.compile``-d if asked) and AdamW, for :func:`time_training_steps`."""
    from flowlab.recipes import load_config
    from flowlab.train.recipe import get_recipe

    cfg = load_config(cfg_path, overrides)
    torch.manual_seed(0)
    recipe = get_recipe(cfg)
    data = recipe.build_dataset()
    model = recipe.build_model(data)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    return {"cfg": cfg, "recipe": recipe, "data": data, "model": torch.compile(model) if compile_model else model, "opt": opt}


def time_training_steps(setups: dict[str, dict[str, Any]], steps: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per training step (``recipe.training_step`` + backward + ``AdamW.step``, the work a trainer step
    adds nothing to but bookkeeping) of each setup, in interleaved blocks of ``steps`` steps after one warm-up
    block each: ``{"cpu": [...], "wall": [...]}`` per setup, one entry per block. CPU time is this process's
    (at one torch thread, the wall time of a quiet machine)."""

    def block(setup: dict[str, Any], start: int) -> tuple[float, float]:
        cfg, recipe, data, model, opt = (setup[k] for k in ("cfg", "recipe", "data", "model", "opt"))
        b = cfg.train.batch_size
        c0, w0 = _cpu_seconds(), time.perf_counter()
        for step in range(start, start + steps):
            idx = torch.arange(step * b, (step + 1) * b) % len(data)
            ctx = StepContext(step, 0, torch.Generator().manual_seed(step), b, 0, b, torch.device("cpu"))
            recipe.training_step(model, data.get_batch(idx), ctx).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return (_cpu_seconds() - c0) / steps, (time.perf_counter() - w0) / steps

    from flowlab.train.recipe import StepContext

    for setup in setups.values():  # warm-up (and, for compiled models, compilation)
        block(setup, 0)
    out = {name: {"cpu": [], "wall": []} for name in setups}
    for k in range(repeats):
        for name, setup in setups.items():
            cpu, wall = block(setup, (k + 1) * steps)
            out[name]["cpu"].append(cpu)
            out[name]["wall"].append(wall)
    return out


def probe_cost(args, workdir: Path) -> dict[str, Any]:
    """CPU seconds per training step of each recipe (:func:`time_training_steps`; the trainer's own per-step
    work is the same for both)."""
    setups = {
        name: build_step_setup(cfg_path, _overrides(args, workdir / f"probe-{name}", 0, None))
        for name, cfg_path in (("standard", args.fm_config), ("meanflow", args.mf_config))
    }
    per_step = {name: v["cpu"] for name, v in time_training_steps(setups, args.probe_steps, args.probe_repeats).items()}
    med = {n: statistics.median(v) for n, v in per_step.items()}
    return {"cpu_seconds_per_step": per_step, "median": med, "cost_ratio_meanflow_over_standard": med["meanflow"] / med["standard"]}


def train(args, cfg_path: str, output_dir: Path, seed: int, steps: int | None) -> dict[str, Any]:
    from flowlab.recipes import Trainer, load_config

    cfg = load_config(cfg_path, _overrides(args, output_dir, seed, steps))
    if args.reuse_runs and (output_dir / "pipeline" / "model_index.json").is_file():
        import yaml

        done = yaml.safe_load((output_dir / "config.yaml").read_text())
        if (done["recipe"], done["seed"], done["train"]["max_steps"]) != (cfg.recipe, seed, cfg.train.max_steps):
            raise SystemExit(f"--reuse-runs: {output_dir} holds recipe {done['recipe']}, seed {done['seed']}, "
                             f"{done['train']['max_steps']} steps; this benchmark wants {cfg.recipe}, {seed}, {cfg.train.max_steps}")
        return {"steps": cfg.train.max_steps, "wall_seconds": None, "cpu_seconds": None, "reused": True, "pipeline": str(output_dir / "pipeline")}
    w0, c0 = time.perf_counter(), _cpu_seconds()
    Trainer(cfg).train()
    return {"steps": cfg.train.max_steps, "wall_seconds": time.perf_counter() - w0, "cpu_seconds": _cpu_seconds() - c0, "pipeline": str(output_dir / "pipeline")}


def train_reflow(args, teacher: str, output_dir: Path, seed: int) -> dict[str, Any]:
    """Reflow ``teacher`` (a pipeline folder) with ``--reflow-config`` for ``--reflow-steps`` steps: the pairs first
    (timed on their own, written to the run folder), then the trainer (which reuses them)."""
    from flowlab.recipes import Trainer, load_config
    from flowlab.recipes.reflow.pairs import PAIRS_FILE
    from flowlab.train.recipe import get_recipe

    over = _overrides(args, output_dir, seed, args.reflow_steps) + [f"reflow.teacher={teacher}"]
    if args.quick:
        over.append("reflow.num_pairs=256")
    cfg = load_config(args.reflow_config, over)
    (output_dir / PAIRS_FILE).unlink(missing_ok=True)  # an earlier run's pairs would hide their cost
    w0, c0 = time.perf_counter(), _cpu_seconds()
    get_recipe(cfg).build_dataset()
    pairs = {"num_pairs": cfg.reflow.num_pairs, "teacher_solver": cfg.reflow.teacher_solver, "teacher_steps": cfg.reflow.teacher_steps,
             "teacher_guidance_scale": cfg.reflow.teacher_guidance_scale,
             "wall_seconds": time.perf_counter() - w0, "cpu_seconds": _cpu_seconds() - c0}
    w0, c0 = time.perf_counter(), _cpu_seconds()
    Trainer(cfg).train()
    wall, cpu = time.perf_counter() - w0, _cpu_seconds() - c0
    return {"steps": cfg.train.max_steps, "pairs": pairs, "wall_seconds": wall, "cpu_seconds": cpu,
            "extra_cpu_seconds": pairs["cpu_seconds"] + cpu, "pipeline": str(output_dir / "pipeline")}


def _timing(run: dict[str, Any]) -> str:
    if run.get("reused"):
        return "reused (trained before this run)"
    return f"{run['wall_seconds']:.0f} s wall / {run['cpu_seconds']:.0f} s CPU"


def score(args, pipeline: str, cells: list[tuple], evaluator, latents, labels) -> dict[str, dict[str, Any]]:
    """FD of each ``(solver, nfe, shift[, guidance_scale])`` cell; ``shift=None`` is the saved pipeline's own time
    grid (its scheduler's ``shift``, what a user of the pipeline gets), keyed ``solver-nfe``; others
    ``solver-nfe-shiftS``; a sampling-time guidance scale other than 1 adds ``-cfgW``. ``nfe`` counts evaluations of
    the sampled field; with sampling-time CFG each one runs the network on the conditional and the null batch
    (two network evaluations per sample)."""
    from flowlab import FlowPipeline

    sample_fd = _bench_core().sample_fd
    pipe = FlowPipeline.from_pretrained(pipeline)
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for solver, nfe, shift, *w in cells:
        w = w[0] if w else None
        row, _ = sample_fd(pipe, evaluator, latents, labels, solver, nfe, shift, 500, guidance_scale=w)
        row["shift"] = pipe.scheduler.config.shift if shift is None else shift  # the grid actually used
        key = (f"{solver}-{nfe}" if shift is None else f"{solver}-{nfe}-shift{shift:g}") + ("" if w in (None, 1.0) else f"-cfg{w:g}")
        out[key] = {k: row[k] for k in ("solver", "steps", "shift", "guidance_scale", "nfe", "fd", "confidence", "num_nonfinite", "seconds")}
    return out


STANDARD_CELLS = [("euler", 32, None), ("euler", 1, None), ("euler", 2, None), ("multistep", 2, None)]
#: the pipeline's own grid at 1 and 2 NFE (the targets), 2 NFE on the uniform grid 0 -> 1/2 -> 1 for comparison,
#: and Euler-32 of u(x, t, t) on the uniform grid (how good the model is as a plain velocity model)
MEANFLOW_CELLS = [("meanflow", 1, None), ("meanflow", 2, None), ("meanflow", 2, 1.0), ("euler", 32, 1.0)]
#: the reflow student at the few-step budgets and at Euler-32 (how good it is as a plain velocity model)
REFLOW_CELLS = [("euler", 1, None), ("euler", 2, None), ("euler", 32, None)]


def _mean_sd(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from flowlab.metrics.digits import DigitsEvaluator

    t_start = time.perf_counter()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_meanflow_"))
    workdir.mkdir(parents=True, exist_ok=True)
    from flowlab.recipes import load_config

    fm_steps = args.fm_steps or (30 if args.quick else load_config(args.fm_config).train.max_steps)
    probe = probe_cost(args, workdir)
    ratio = probe["cost_ratio_meanflow_over_standard"]
    mf_steps = args.mf_steps or max(1, round(fm_steps / ratio))
    print(f"cost probe: {probe['median']['standard'] * 1e3:.1f} ms (standard) vs {probe['median']['meanflow'] * 1e3:.1f} ms (MeanFlow) "
          f"CPU per step, ratio {ratio:.2f} -> MeanFlow trains {mf_steps} steps for the standard {fm_steps}", flush=True)

    evaluator = DigitsEvaluator.load()
    mf_cfg = load_config(args.mf_config)
    w_mf = mf_cfg.meanflow.guidance_omega / (1.0 - mf_cfg.meanflow.guidance_kappa)  # the guidance scale MeanFlow learns
    # like for like: the standard model's Euler-32 with sampling-time CFG at that scale (two network evaluations a step)
    guided_cells = [("euler", 32, None, w_mf)] if w_mf != 1.0 else []
    n = args.num_samples
    labels = torch.arange(n) % 10
    runs = []
    for seed in args.seeds:
        std = train(args, args.fm_config, workdir / f"standard-{seed}", seed, fm_steps)
        print(f"seed {seed}: standard {std['steps']} steps, {_timing(std)}", flush=True)
        mf = train(args, args.mf_config, workdir / f"meanflow-{seed}", seed, mf_steps)
        print(f"seed {seed}: MeanFlow {mf['steps']} steps, {_timing(mf)}", flush=True)
        from flowlab import FlowPipeline

        shape = (n, *FlowPipeline.from_pretrained(std["pipeline"]).velocity_model.sample_shape)
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(args.noise_seed + seed))
        std["fd"] = score(args, std["pipeline"], STANDARD_CELLS + guided_cells, evaluator, latents, labels)
        mf["fd"] = score(args, mf["pipeline"], MEANFLOW_CELLS, evaluator, latents, labels)
        if args.reflow_steps:
            rf = train_reflow(args, std["pipeline"], workdir / f"reflow-{seed}", seed)
            rf["fd"] = score(args, rf["pipeline"], REFLOW_CELLS, evaluator, latents, labels)
        ref = std["fd"]["euler-32"]["fd"]
        row = {
            "seed": seed,
            "standard": std,
            "meanflow": mf,
            "standard_euler32_fd": ref,
            "meanflow_1nfe_fd": mf["fd"]["meanflow-1"]["fd"],
            "meanflow_2nfe_fd": mf["fd"]["meanflow-2"]["fd"],
        }
        if guided_cells:
            row["meanflow_guidance_scale"] = w_mf
            row["standard_euler32_same_cfg_fd"] = std["fd"][f"euler-32-cfg{w_mf:g}"]["fd"]
        if args.reflow_steps:
            row |= {"reflow": rf, "reflow_euler1_fd": rf["fd"]["euler-1"]["fd"], "reflow_euler2_fd": rf["fd"]["euler-2"]["fd"],
                    "reflow_euler32_fd": rf["fd"]["euler-32"]["fd"], "reflow_extra_cpu_seconds": rf["extra_cpu_seconds"]}
        row["target_2nfe_no_worse"] = row["meanflow_2nfe_fd"] <= ref
        row["target_1nfe_within_1.5x"] = row["meanflow_1nfe_fd"] <= 1.5 * ref
        runs.append(row)
        print(
            f"seed {seed}: standard euler-32 FD {ref:.3f} | MeanFlow 1-NFE {row['meanflow_1nfe_fd']:.3f} "
            f"({row['meanflow_1nfe_fd'] / ref:.2f}x), 2-NFE {row['meanflow_2nfe_fd']:.3f} ({row['meanflow_2nfe_fd'] / ref:.2f}x) | "
            + ", ".join(f"standard {k} {v['fd']:.2f}" for k, v in std["fd"].items() if k != "euler-32")
            + f", MeanFlow 2-NFE uniform grid {mf['fd']['meanflow-2-shift1']['fd']:.2f}, euler-32 {mf['fd']['euler-32-shift1']['fd']:.2f}",
            flush=True,
        )
        if args.reflow_steps:
            share = f" = {rf['extra_cpu_seconds'] / std['cpu_seconds']:.2f}x the standard model's training" if std.get("cpu_seconds") else ""
            print(
                f"seed {seed}: reflow {rf['steps']} steps on {rf['pairs']['num_pairs']} pairs | extra cost: pairs {rf['pairs']['cpu_seconds']:.0f} CPU-s "
                f"+ training {rf['cpu_seconds']:.0f} CPU-s{share} | FD euler-1 {row['reflow_euler1_fd']:.3f}, euler-2 {row['reflow_euler2_fd']:.3f}, "
                f"euler-32 {row['reflow_euler32_fd']:.3f}",
                flush=True,
            )
    keys = ("standard_euler32_fd", "meanflow_1nfe_fd", "meanflow_2nfe_fd") + (("standard_euler32_same_cfg_fd",) if guided_cells else ())
    if args.reflow_steps:
        keys += ("reflow_euler1_fd", "reflow_euler2_fd", "reflow_euler32_fd", "reflow_extra_cpu_seconds")
    summary = {key: _mean_sd([r[key] for r in runs]) for key in keys}
    ref = summary["standard_euler32_fd"]["mean"]
    summary["target_2nfe_no_worse"] = summary["meanflow_2nfe_fd"]["mean"] <= ref
    summary["target_1nfe_within_1.5x"] = summary["meanflow_1nfe_fd"]["mean"] <= 1.5 * ref
    result = {
        "fm_config": args.fm_config,
        "mf_config": args.mf_config,
        "standard_steps": fm_steps,
        "meanflow_steps": mf_steps,
        "reflow_config": args.reflow_config if args.reflow_steps else None,
        "reflow_steps": args.reflow_steps,
        "threads": args.threads,
        "num_samples": n,
        "probe": probe,
        "runs": runs,
        "summary": summary,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count()},
        "runtime_seconds": time.perf_counter() - t_start,
    }
    print(json.dumps(summary, indent=1), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
