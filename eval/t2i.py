#!/usr/bin/env python
"""Score a text-to-image model (SD3 family) on a prompt set with any rewards.

    # a base pipeline (a StableDiffusion3Pipeline folder or Hub id), CFG-free, with the GenEval server
    python eval/t2i.py --base stabilityai/stable-diffusion-3.5-medium --prompts geneval_test_metadata.jsonl \\
        --reward '{"name": "geneval", "url": "http://127.0.0.1:18085"}' --guidance-scale 1.0 --json base.json

    # a LoRA on that base (a folder written by save_lora_weights, e.g. <run>/pipeline)
    python eval/t2i.py --base PIPE --lora runs/nft_sd35_geneval/pipeline --prompts test.txt --reward '{"name": "pickscore"}'

    # a trained run: its config.yaml names the base, <run>/pipeline holds the LoRA or the transformer
    python eval/t2i.py --run runs/nft_sd35_geneval --prompts test.txt --reward '{"name": "jpeg_compressibility"}'

Images are drawn with the pipeline's own ``__call__`` (what users of the model get): its scheduler,
``--steps`` steps, ``--guidance-scale`` (1.0: no classifier-free guidance, > 1: CFG with the empty
negative prompt), at ``--resolution`` pixels. Image ``j`` of prompt ``i`` uses the generator seeded
``seed + i * images_per_prompt + j``, so scores do not depend on ``--batch-size``.

``--reward`` takes a JSON spec as in a config's ``rl.rewards`` (repeatable); each reward is scored
and reported on its own. ``--json`` writes::

    {"model": {"base", "lora", "run"}, "prompts": SOURCE, "n": N, "settings": {...}, "seconds": S,
     "rewards": {NAME: {"mean", "std", "n", "num_nan", "categories": {TAG: {"count", "strict_accuracy",
                 "accuracy"}}}},               # "categories" only when the reward's info reports them (GenEval)
     "per_prompt": [{"prompt", "image", "scores": {NAME: x}}]}   # with --per-prompt

``std`` is the sample standard deviation over the scored images (NaN scores are left out and counted
in ``num_nan``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any, Sequence

import torch

RUNTIME = """Runtime (the shared 2-core CPU, OMP_NUM_THREADS=1): there is no default run; give --base or --run.
On the tiny SD3 pipeline of the tests (32 px, 2 steps, 4 prompts, JPEG reward): about 16 s including imports
and loading (measured 16.1 s at a load average of ~12). SD3.5-Medium at 512 px needs a GPU; not measured here."""

_OPTIONAL_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3",
                        "image_encoder", "feature_extractor")


def resolve_run(run_dir: str) -> tuple[str, str, dict[str, Any]]:
    """``(base, pipeline_dir, settings)`` of a trained SD3 run folder.

    Args:
        run_dir: a ``train.py`` output folder holding ``config.yaml`` (``rl.pipeline: sd3`` and
            ``rl.base``) and ``pipeline/`` (the LoRA in diffusers' layout or ``transformer/``).

    Returns:
        The base pipeline, the trained artefact's folder and ``pipeline/flowlab_sd3.json`` (``{}``
        when absent: resolution and T5 length the run trained at).

    Raises:
        SystemExit: naming the missing file or key.
    """
    import yaml

    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise SystemExit(f"eval/t2i.py: --run {run_dir}: no config.yaml there (is it a train.py output_dir?)")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    rl = cfg.get("rl") if isinstance(cfg, dict) else None
    if not isinstance(rl, dict) or not rl.get("base"):
        raise SystemExit(f"eval/t2i.py: {cfg_path}: no rl.base (only RL runs of text-to-image pipelines can be scored)")
    if rl.get("pipeline", "sd3") != "sd3":
        raise SystemExit(f"eval/t2i.py: {cfg_path}: rl.pipeline is {rl.get('pipeline')!r}; this script scores sd3 runs "
                         "(use eval/rewards.py or eval/digits.py for flowlab pipelines)")
    pipeline_dir = os.path.join(run_dir, "pipeline")
    if not os.path.isdir(pipeline_dir):
        raise SystemExit(f"eval/t2i.py: --run {run_dir}: no pipeline/ folder (the run has not finished)")
    settings: dict[str, Any] = {}
    info_path = os.path.join(pipeline_dir, "flowlab_sd3.json")
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as f:
            settings = json.load(f)
    return str(rl["base"]), pipeline_dir, settings


def load_pipeline(base: str, lora: str | None = None, transformer_dir: str | None = None,
                  dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A ``StableDiffusion3Pipeline`` from ``base``, with a LoRA or a fine-tuned transformer.

    Components that ``base``'s ``model_index.json`` lists as absent (e.g. no T5) are loaded as ``None``.

    Args:
        base: a pipeline folder or Hub id.
        lora: a folder ``load_lora_weights`` reads (``pytorch_lora_weights.safetensors``), or ``None``.
        transformer_dir: a ``save_pretrained`` ``SD3Transformer2DModel`` folder replacing the base's.
        dtype: weights' dtype.
        device: where the pipeline runs.
    """
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    try:
        index = StableDiffusion3Pipeline.load_config(base)
    except Exception as e:  # noqa: BLE001 - a loader boundary: missing folder, offline Hub id
        raise SystemExit(f"eval/t2i.py: cannot read the pipeline {base!r}: {type(e).__name__}: {e}") from None
    components: dict[str, Any] = {}
    for name in _OPTIONAL_COMPONENTS:
        entry = index.get(name)
        if entry is None or (isinstance(entry, (list, tuple)) and entry[0] is None):
            components[name] = None
    if transformer_dir is not None:
        components["transformer"] = SD3Transformer2DModel.from_pretrained(transformer_dir, torch_dtype=dtype)
    pipe = StableDiffusion3Pipeline.from_pretrained(base, torch_dtype=dtype, **components)
    if lora is not None:
        if not os.path.exists(lora):
            raise SystemExit(f"eval/t2i.py: --lora {lora}: no such folder or file")
        pipe.load_lora_weights(lora)
    return pipe.to(device)


def build_named_rewards(specs: Sequence[str]) -> dict[str, Any]:
    """``{name: RewardFunction}`` from ``--reward`` JSON strings (a repeated name gets ``_2``, ``_3``, ...)."""
    from flowlab.rewards import build_reward

    rewards: dict[str, Any] = {}
    for i, text in enumerate(specs):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"eval/t2i.py: --reward #{i + 1} is not JSON ({e.msg}): {text!r}") from None
        if not isinstance(spec, dict) or "name" not in spec:
            raise SystemExit(f"eval/t2i.py: --reward #{i + 1} must be a JSON object with a 'name', got {text!r}")
        spec = {k: v for k, v in spec.items() if k != "weight"}  # each reward is reported on its own
        name, k = str(spec["name"]), 2
        while name in rewards:
            name, k = f"{spec['name']}_{k}", k + 1
        rewards[name] = build_reward(spec, key=f"--reward[{i}]")
    return rewards


class CategoryTally:
    """Per-category accuracy over batches from rewards' ``info`` (GenEval's ``TAG/count``,
    ``TAG/strict_accuracy``, ``TAG/accuracy``): count-weighted means over all batches."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.sums: dict[str, dict[str, float]] = {}

    def add(self, info: dict[str, Any]) -> None:
        for key, k in info.items():
            if not key.endswith("/count") or not k:
                continue
            tag = key[: -len("/count")]
            self.count[tag] = self.count.get(tag, 0) + int(k)
            sums = self.sums.setdefault(tag, {})
            for metric in ("strict_accuracy", "accuracy"):
                acc = info.get(f"{tag}/{metric}")
                if acc is not None and not math.isnan(float(acc)):
                    sums[metric] = sums.get(metric, 0.0) + float(acc) * int(k)

    def result(self) -> dict[str, dict[str, float]]:
        return {tag: {"count": n, **{m: s / n for m, s in self.sums[tag].items()}} for tag, n in self.count.items()}


def summarise(scores: torch.Tensor) -> dict[str, float]:
    """``mean``, ``std`` (sample, Bessel-corrected), ``n`` (scored) and ``num_nan`` of a score vector."""
    finite = scores[~torch.isnan(scores)].double()
    n = int(finite.numel())
    return {"mean": float(finite.mean()) if n else float("nan"),
            "std": float(finite.std()) if n > 1 else float("nan" if n == 0 else 0.0),
            "n": n, "num_nan": int(scores.numel() - n)}


def evaluate(pipe, prompts: list[str], metadata: list[dict], rewards: dict[str, Any], *, steps: int,
             guidance_scale: float, resolution: int, batch_size: int, seed: int, images_per_prompt: int = 1,
             max_sequence_length: int = 256, progress: bool = True) -> tuple[dict[str, dict], list[dict]]:
    """Sample every prompt ``images_per_prompt`` times with ``pipe(...)`` and score the images.

    Returns:
        ``({reward: summary}, per_image)`` with ``per_image[i] = {"prompt", "image", "scores": {reward: x}}``.
    """
    from tqdm.auto import tqdm

    jobs = [(i, j) for i in range(len(prompts)) for j in range(images_per_prompt)]
    scores = {name: [] for name in rewards}
    tallies = {name: CategoryTally() for name in rewards}
    pipe.set_progress_bar_config(disable=True)  # one bar over images, below
    bar = tqdm(total=len(jobs), desc="t2i eval", unit="img", disable=not progress)
    kwargs: dict[str, Any] = {"max_sequence_length": max_sequence_length} if pipe.text_encoder_3 is not None else {}
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start: start + batch_size]
        batch_prompts = [prompts[i] for i, _ in chunk]
        gens = [torch.Generator(device="cpu").manual_seed(seed + i * images_per_prompt + j) for i, j in chunk]
        with torch.no_grad():
            images = pipe(prompt=batch_prompts, num_inference_steps=steps, guidance_scale=guidance_scale,
                          height=resolution, width=resolution, generator=gens, output_type="pt", **kwargs).images
        images = images.float().clamp(0, 1)
        batch_meta = [dict(metadata[i]) for i, _ in chunk]
        for name, reward in rewards.items():
            scores[name].append(reward(images, batch_prompts, batch_meta).float().cpu())
            tallies[name].add(reward.info)
        bar.update(len(chunk))
    bar.close()
    all_scores = {name: torch.cat(s) if s else torch.zeros(0) for name, s in scores.items()}
    summary = {}
    for name, s in all_scores.items():
        summary[name] = summarise(s)
        categories = tallies[name].result()
        if categories:
            summary[name]["categories"] = categories
    per_image = [{"prompt": prompts[i], "image": j, "scores": {name: float(all_scores[name][k]) for name in rewards}}
                 for k, (i, j) in enumerate(jobs)]
    return summary, per_image


def format_table(summary: dict[str, dict]) -> str:
    lines = [f"{'reward':<28} {'mean':>10} {'std':>10} {'n':>6} {'NaN':>5}", "-" * 63]
    for name, s in summary.items():
        lines.append(f"{name:<28} {s['mean']:>10.4f} {s['std']:>10.4f} {s['n']:>6d} {s['num_nan']:>5d}")
        for tag, c in s.get("categories", {}).items():
            acc = c.get("strict_accuracy", c.get("accuracy", float("nan")))
            lines.append(f"  {tag:<26} {acc:>10.4f} {'':>10} {c['count']:>6d}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog=RUNTIME, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--base", help="a StableDiffusion3Pipeline folder or Hub id")
    src.add_argument("--run", help="a trained run folder (config.yaml names the base; pipeline/ holds the weights)")
    p.add_argument("--lora", default=None, help="with --base: a LoRA folder (load_lora_weights)")
    p.add_argument("--prompts", required=True, help="a .txt / .jsonl file, a dataset folder or a Hub dataset (load_prompts)")
    p.add_argument("--prompt-format", default="auto", choices=["auto", "txt", "jsonl", "hf"])
    p.add_argument("--split", default="test", help="split of an hf prompt set (default test)")
    p.add_argument("--column", default="prompt", help="prompt field of jsonl rows / hf columns")
    p.add_argument("--max-prompts", type=int, default=0, help="score the first N prompts only (0: all)")
    p.add_argument("--reward", action="append", required=True, metavar="JSON",
                   help='a reward spec as in rl.rewards, e.g. \'{"name": "pickscore"}\' (repeatable)')
    p.add_argument("--guidance-scale", type=float, default=1.0, help="CFG scale (1.0: no CFG; SD3.5's default is 4.5)")
    p.add_argument("--steps", type=int, default=40, help="sampler steps (default 40, the reference's eval steps)")
    p.add_argument("--resolution", type=int, default=None, help="image side in px (default: the run's, else 512)")
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default: the run's, else 256)")
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--per-prompt", action="store_true", help="also write every image's scores to the JSON")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    for flag in ("steps", "batch_size", "images_per_prompt"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_prompts < 0:
        p.error(f"--max-prompts must be >= 0, got {args.max_prompts}")
    if args.run and args.lora:
        p.error("--lora goes with --base; a --run brings its own weights")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.perf_counter()

    from flowlab.data.prompts import load_prompts
    from flowlab.errors import ConfigError
    from flowlab.fileio import atomic_write_json

    try:
        prompt_set = load_prompts(args.prompts, args.prompt_format, args.split, args.column)
    except Exception as e:  # DataError names the file and line
        raise SystemExit(f"eval/t2i.py: --prompts: {e}") from None
    prompts, metadata = list(prompt_set.prompts), [dict(m) for m in prompt_set.metadata]
    if args.max_prompts:
        prompts, metadata = prompts[: args.max_prompts], metadata[: args.max_prompts]
    if not prompts:
        raise SystemExit(f"eval/t2i.py: --prompts {args.prompts}: no prompts")
    try:
        rewards = build_named_rewards(args.reward)
    except ConfigError as e:
        raise SystemExit(f"eval/t2i.py: {e}") from None

    settings: dict[str, Any] = {}
    base, lora, transformer_dir = args.base, args.lora, None
    if args.run:
        base, trained, settings = resolve_run(args.run)
        if os.path.isdir(os.path.join(trained, "transformer")):
            transformer_dir = os.path.join(trained, "transformer")
        else:
            lora = trained
    resolution = args.resolution or int(settings.get("resolution", 512))
    max_len = args.max_sequence_length or int(settings.get("max_sequence_length", 256))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    pipe = load_pipeline(base, lora, transformer_dir, dtype, device)

    summary, per_image = evaluate(
        pipe, prompts, metadata, rewards, steps=args.steps, guidance_scale=args.guidance_scale, resolution=resolution,
        batch_size=args.batch_size, seed=args.seed, images_per_prompt=args.images_per_prompt, max_sequence_length=max_len)
    seconds = time.perf_counter() - t0
    print(format_table(summary))
    print(f"{len(per_image)} images of {len(prompts)} prompts in {seconds:.1f} s")
    if args.json:
        out = {
            "model": {"base": base, "lora": lora, "run": args.run, "transformer": transformer_dir},
            "prompts": prompt_set.source, "n": len(per_image), "num_prompts": len(prompts),
            "settings": {"steps": args.steps, "guidance_scale": args.guidance_scale, "resolution": resolution,
                         "batch_size": args.batch_size, "seed": args.seed, "images_per_prompt": args.images_per_prompt,
                         "max_sequence_length": max_len, "dtype": args.dtype, "scheduler": type(pipe.scheduler).__name__},
            "seconds": seconds, "rewards": summary,
        }
        if args.per_prompt:
            out["per_prompt"] = per_image
        atomic_write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
