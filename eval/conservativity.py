"""How conservative is a trained field? Diagnostics per time bin, a table and PNG plots.

    python eval/conservativity.py --pipeline runs/quickstart/pipeline --out runs/quickstart/conservativity

Works on a flowlab ``FlowPipeline`` folder, on diffusers ``DDPMPipeline``/``DDIMPipeline``/
``WGFPipeline`` folders (read as probability flows, :mod:`flowlab.wgf`) and on text-to-image
families (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``FluxPipeline``; a folder or a
Hub id) with ``--prompt`` (repeatable) and ``--guidance-scale`` (CFG, or FLUX's guidance embedding),
through :mod:`flowlab.families`; ``--config`` reads the options from a YAML file (keys are the
option names with ``_``, e.g. ``configs/wgf/sd15.yaml``), command-line options override it. The
points are the model's own samples noised along its path to each time (``--data`` uses a
built-in dataset instead). The field analysed is the implied score (``--field``; velocity and
epsilon differ from it only by gradient terms and time-dependent factors, so they share its curl).
Writes ``<out>/conservativity.png`` (each diagnostic against t with 95% CIs), for 2-D models
``<out>/quiver_curl.png`` (the field with its curl as colour), and ``--json``.

    python eval/conservativity.py --config configs/wgf/sd15.yaml --json runs/wgf_sd15/report.json
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import yaml

from flowlab.wgf import load_probability_flow
from flowlab.wgf.diagnostics import conservativity_report, noised_points


RUNTIME = """Runtime of the default run on the quickstart pipeline (the 2-core CPU, OMP_NUM_THREADS=1): about 12 s
(measured 11.4 s: 256 samples, 5 bins x 64 points, exact Jacobians, plots). Larger models and
--num-points scale it up."""


def _pool(flow, shape, args) -> torch.Tensor:
    if args.data:
        if args.data == "digits":
            from flowlab.data.digits import load_digits_arrays

            return torch.from_numpy(load_digits_arrays("train")[0][: args.num_samples]).float()
        from flowlab.data import sample_toy2d

        return sample_toy2d(args.data, args.num_samples, seed=args.seed).float()
    noise = torch.randn(args.num_samples, *shape, generator=torch.Generator().manual_seed(args.seed))
    return flow.sample(noise, args.sample_steps, args.solver, shift=args.shift).x.float()


def _apply_config(p: argparse.ArgumentParser, argv) -> None:
    """``--config FILE``: its keys become the parser's defaults; an unknown key is an error naming it."""
    known, _ = p.parse_known_args(argv)
    if not known.config:
        return
    try:
        with open(known.config, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except OSError as e:
        p.error(f"--config: cannot read {known.config}: {e.strerror}")
    if not isinstance(values, dict):
        p.error(f"--config: {known.config} must hold a mapping of option names to values")
    dests = {a.dest for a in p._actions} - {"help", "config"}
    for key in values:
        if key not in dests:
            p.error(f"--config: unknown key {key!r} in {known.config}; known keys: {', '.join(sorted(dests))}")
    p.set_defaults(**values)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, epilog=RUNTIME,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="a YAML file of option values (keys: option names with _)")
    p.add_argument("--pipeline", default=None, help="a saved pipeline folder (or a Hub id of a text-to-image pipeline)")
    p.add_argument("--prompt", dest="prompts", action="append", default=None,
                   help="text-to-image pipelines: a prompt (repeat for several; sample i takes prompt i %% n)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="text-to-image pipelines: CFG scale, or FLUX.1-dev's guidance embedding (default: the family's)")
    p.add_argument("--resolution", type=int, default=None, help="text-to-image pipelines: image side in pixels")
    p.add_argument("--shift", type=float, default=None,
                   help="time shift of the sampling grid (default: FLUX's dynamic shift for FLUX pipelines, else 1)")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: <pipeline>/../conservativity)")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument("--field", default="score", choices=["score", "velocity", "epsilon", "x1"])
    p.add_argument("--num-bins", type=int, default=5)
    p.add_argument("--t-min", type=float, default=0.05)
    p.add_argument("--t-max", type=float, default=0.95)
    p.add_argument("--num-points", type=int, default=64, help="points per time bin")
    p.add_argument("--num-probes", type=int, default=None, help="probes for the asymmetry (default: exact up to 64 dims, else 4)")
    p.add_argument("--radius", type=float, default=0.25, help="loop radius (model units)")
    p.add_argument("--length", type=float, default=0.5, help="segment length for path dependence (model units)")
    p.add_argument("--num-samples", type=int, default=256, help="model samples that seed the points")
    p.add_argument("--sample-steps", type=int, default=16)
    p.add_argument("--solver", default="heun")
    p.add_argument("--data", default=None, help="seed the points from a built-in dataset (digits, moons, 8gaussians, checkerboard)")
    p.add_argument("--prediction-type", default=None, help="diffusers pipelines: override the scheduler's prediction_type")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true")
    _apply_config(p, argv)
    args = p.parse_args(argv)
    if not args.pipeline:
        p.error("--pipeline is required (on the command line or in --config)")

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    flow, shape, loaded = load_probability_flow(args.pipeline, args.prediction_type, args.prompts, args.guidance_scale, args.resolution)
    if args.shift is None:
        args.shift = float(getattr(loaded, "time_shift", 1.0))
    pool = _pool(flow, shape, args)
    field = lambda x, t: flow.predict(x, t, args.field)  # noqa: E731
    rep = conservativity_report(
        field, noised_points(flow.path, pool), num_bins=args.num_bins, t_range=(args.t_min, args.t_max), num_points=args.num_points,
        num_probes=args.num_probes, radius=args.radius, length=args.length, generator=torch.Generator().manual_seed(args.seed),
    )
    seconds = time.perf_counter() - start
    print(f"conservativity of the {args.field} field of {args.pipeline} (sample shape {shape}; mean [95% CI] per time bin; 0 = conservative)")
    print(rep.table())
    print(f"({seconds:.1f} s)")
    result = {"pipeline": args.pipeline, "field": args.field, "sample_shape": list(shape), "seconds": seconds, **rep.to_dict()}
    if not args.no_plots:
        from flowlab.wgf.plots import plot_quiver_curl, plot_report

        out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.pipeline.rstrip("/"))), "conservativity")
        os.makedirs(out, exist_ok=True)
        plot_report({args.field: rep}, os.path.join(out, "conservativity.png"), title=os.path.basename(args.pipeline.rstrip("/")))
        result["plots"] = [os.path.join(out, "conservativity.png")]
        if tuple(shape) == (2,):
            extent = float(pool.abs().max()) * 1.1
            plot_quiver_curl(field, os.path.join(out, "quiver_curl.png"), extent=extent, title=f"{args.field} field")
            result["plots"].append(os.path.join(out, "quiver_curl.png"))
        print("plots: " + ", ".join(result["plots"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
