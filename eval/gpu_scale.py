#!/usr/bin/env python
"""Throughput and peak memory of flowlab training steps at real model sizes (random weights, from configs).

    python eval/gpu_scale.py --json runs/gpu_scale.json           # on a GPU machine: real sizes
    python eval/gpu_scale.py --tiny --json runs/gpu_scale.json    # anywhere (CPU): tiny sizes, a smoke test

Cases (each builds its model from an architecture config with random weights: nothing is downloaded):

* ``sd35m_lora_nft``: one DiffusionNFT LoRA update of the Stable Diffusion 3.5 Medium transformer
  (``SD3Transformer2DModel``, 2.5B, bf16 frozen base, rank-32 LoRA on the attention projections in
  float32, as ``SD3Policy``): the old policy's velocity (``old`` adapter, no gradients) and the current
  one's (``default`` adapter) at ``x_t`` on the linear path, :func:`flowlab.nft.losses.nft_loss`
  (velocity form, ``beta`` 1), backward and an AdamW step on the adapters. 1024 px (latents
  ``16 x 128 x 128``), 333 text tokens (77 CLIP + 256 T5), batch ``--batch``.
* ``flux1dev_lora_nft``: the same update on the FLUX.1-dev transformer (``FluxTransformer2DModel``,
  12B, guidance embedding, packed latents ``(B, 4096, 64)`` for 1024 px, 512 T5 tokens) with gradient
  checkpointing on.
* ``digits_dit_ddp`` / ``digits_dit_fsdp2``: flowlab's own trainer on ``configs/digits_dit.yaml``
  (flow-matching pretraining) launched with accelerate on all visible GPUs, once as DDP
  (``configs/accelerate/ddp_gpu.yaml``) and once sharded (``configs/accelerate/fsdp.yaml``). Samples
  per second is the median of the trainer's logged windows after the first; peak memory is the
  largest over processes.

Reported per case: steps/s and samples/s (after ``--warmup`` untimed steps; CUDA-synchronised),
peak allocated memory (``torch.cuda.max_memory_allocated``; on CPU the process's peak RSS, which
includes everything the process ever held), parameter counts, and the settings. With ``--tiny`` the
same code runs at toy sizes (one layer, 64 px) on the CPU, and the JSON says ``"tiny": true``: its
numbers say nothing about GPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = """Runtime: on a GPU, a few minutes per case (each case times a handful of steps after warm-up). --tiny on the
shared 2-core CPU: about 2-4 min for all three cases (two of them launch 2-process runs)."""

import torch

# published architecture configs (transformer/config.json of each model; weights are random here)
SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
FLUX1_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
SD35_TINY = dict(SD35_MEDIUM, num_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                 caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=32, sample_size=8,
                 dual_attention_layers=(0,))
FLUX1_TINY = dict(FLUX1_DEV, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak RSS on the CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # ru_maxrss is KiB on Linux


def _build(cls, config: dict, device: torch.device, dtype: torch.dtype):
    """``cls.from_config(config)`` with random weights, built directly on ``device`` and cast to ``dtype``."""
    torch.manual_seed(0)
    with torch.device(device):
        model = cls.from_config(config)
    return model if dtype == model.dtype else model.to(dtype)


def lora_nft_step_benchmark(name: str, transformer, forward, batch: dict, args, device: torch.device, checkpointing: bool) -> dict:
    """Time the NFT LoRA update of ``transformer`` (see the module docstring).

    Args:
        forward: ``(transformer, x_t, t, batch) -> flowlab velocity``, the family's call in flowlab time.
        batch: ``x_data`` (the latents, in the transformer's input layout) and the conditioning tensors.
    """
    from flowlab.nft.losses import nft_loss
    from flowlab.nft.policy import LoraSpec, adapter_pairs, add_policy_adapters

    add_policy_adapters(transformer, LoraSpec(args.lora_rank, args.lora_rank, LORA_TARGETS))
    for n, p in transformer.named_parameters():  # adapters train in float32, as SD3Policy does
        if "lora_" in n:
            p.data = p.data.float()
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    trained = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-5)
    x1 = batch["x_data"]
    g = torch.Generator(device=device).manual_seed(0)
    r = torch.rand(x1.shape[0], generator=g, device=device)

    def step():
        x0 = torch.randn(x1.shape, generator=g, device=device, dtype=x1.dtype)
        t = torch.rand(x1.shape[0], generator=g, device=device)
        tt = t.view(-1, *([1] * (x1.ndim - 1)))
        x_t = tt * x1 + (1 - tt) * x0
        transformer.set_adapter("old")
        with torch.no_grad():
            u_old = forward(transformer, x_t, t, batch).float()
        transformer.set_adapter("default")
        for _, old in adapter_pairs(transformer):
            old.requires_grad_(False)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            u = forward(transformer, x_t, t, batch).float()
        loss = nft_loss(u, u_old, (x1 - x0).float(), r, beta=1.0).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    transformer.train()
    for _ in range(args.warmup):
        step()
    _sync(device)
    _reset_peak(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    _sync(device)
    elapsed = time.perf_counter() - start
    return {
        "case": name, "steps_per_sec": args.steps / elapsed, "samples_per_sec": args.steps * x1.shape[0] / elapsed,
        "peak_memory_gib": _peak_gib(device), "batch": x1.shape[0], "latents": list(x1.shape[1:]),
        "params_total": sum(p.numel() for p in transformer.parameters()), "params_trained": sum(p.numel() for p in trained),
        "gradient_checkpointing": checkpointing, "final_loss": float(loss),
    }


def sd35m_case(args, device: torch.device) -> dict:
    from diffusers import SD3Transformer2DModel

    from flowlab.flow.conventions import diffusers_to_velocity, t_to_timestep

    cfg = SD35_TINY if args.tiny else SD35_MEDIUM
    side = 8 if args.tiny else 128  # 64 px / 1024 px with the VAE's factor 8
    tokens = 8 if args.tiny else 333
    tf = _build(SD3Transformer2DModel, cfg, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    B, dt = args.batch, tf.dtype
    batch = {
        "x_data": torch.randn(B, cfg["in_channels"], side, side, device=device, dtype=dt),
        "prompt_embeds": torch.randn(B, tokens, cfg["joint_attention_dim"], device=device, dtype=dt),
        "pooled": torch.randn(B, cfg["pooled_projection_dim"], device=device, dtype=dt),
    }

    def forward(net, x, t, b):
        out = net(hidden_states=x, timestep=t_to_timestep(t), encoder_hidden_states=b["prompt_embeds"],
                  pooled_projections=b["pooled"], return_dict=False)[0]
        return diffusers_to_velocity(out)

    return lora_nft_step_benchmark("sd35m_lora_nft", tf, forward, batch, args, device, checkpointing=False)


def flux1dev_case(args, device: torch.device) -> dict:
    from diffusers import FluxTransformer2DModel

    from flowlab.flow.conventions import diffusers_to_velocity, t_to_sigma

    cfg = FLUX1_TINY if args.tiny else FLUX1_DEV
    side = 4 if args.tiny else 64  # packed 2x2 latents: 64 px / 1024 px
    tokens = 8 if args.tiny else 512
    tf = _build(FluxTransformer2DModel, cfg, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    B, dt = args.batch, tf.dtype
    rows, cols = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(dt)
    batch = {
        "x_data": torch.randn(B, side * side, cfg["in_channels"], device=device, dtype=dt),
        "prompt_embeds": torch.randn(B, tokens, cfg["joint_attention_dim"], device=device, dtype=dt),
        "pooled": torch.randn(B, cfg["pooled_projection_dim"], device=device, dtype=dt),
        "img_ids": img_ids, "txt_ids": torch.zeros(tokens, 3, device=device, dtype=dt),
        "guidance": torch.full((B,), 3.5, device=device, dtype=torch.float32),
    }

    def forward(net, x, t, b):
        # FLUX takes sigma = 1 - t in [0, 1] as its timestep (the pipeline passes timestep / 1000)
        out = net(hidden_states=x, timestep=t_to_sigma(t), guidance=b["guidance"], encoder_hidden_states=b["prompt_embeds"],
                  pooled_projections=b["pooled"], txt_ids=b["txt_ids"], img_ids=b["img_ids"], return_dict=False)[0]
        return diffusers_to_velocity(out)

    return lora_nft_step_benchmark("flux1dev_lora_nft", tf, forward, batch, args, device, checkpointing=True)


# --------------------------------------------------------------------------- digits DiT, DDP vs FSDP2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digits_case(args, sharded: bool, workdir: Path) -> dict:
    """flowlab's trainer on configs/digits_dit.yaml under accelerate, DDP or FSDP2 (see the module docstring)."""
    name = "digits_dit_fsdp2" if sharded else "digits_dit_ddp"
    out = workdir / name
    steps = 20 if args.tiny else args.digits_steps
    overrides = [f"output_dir={out}", f"train.max_steps={steps}", "train.log_every=5", "train.checkpoint_every=0",
                 "train.report_to=none", "sample.every=0", "sample.num_images=4", "eval.enabled=false", "train.warmup_steps=0"]
    if args.tiny:
        overrides += ["model.num_layers=1", "model.num_attention_heads=2", "model.attention_head_dim=8", "train.batch_size=16"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(_free_port()), "--num_machines", "1"]
    if args.tiny or not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"  # two gloo processes; accelerate sets FSDP up on accelerators only
        launch += ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no"]
        processes = 2
        if sharded:
            overrides += ["train.fsdp=true", "train.fsdp_min_num_params=1000"]
    else:
        processes = torch.cuda.device_count()
        cfg = "fsdp.yaml" if sharded else "ddp_gpu.yaml"
        launch += ["--config_file", str(ROOT / "configs" / "accelerate" / cfg), "--num_processes", str(processes)]
    cmd = [*launch, str(Path(__file__).resolve()), "--worker", "--config", str(ROOT / "configs" / "digits_dit.yaml"), *overrides]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    windows = [json.loads(x) for x in open(out / "metrics.jsonl") if "samples_per_sec" in x]
    peaks = [json.loads(p.read_text())["peak_memory_gib"] for p in sorted(out.glob("peak_memory_rank*.json"))]
    rates = [w["samples_per_sec"] for w in windows[1:]] or [w["samples_per_sec"] for w in windows]
    return {"case": name, "processes": processes, "samples_per_sec": statistics.median(rates),
            "steps_per_sec": statistics.median([w["steps_per_sec"] for w in windows[1:] or windows]),
            "peak_memory_gib": max(peaks), "peak_memory_gib_per_process": peaks, "final_loss": windows[-1]["loss"],
            "max_steps": steps}


def worker(argv: list[str]) -> None:
    """Run under ``accelerate launch``: train, then write this process's peak memory."""
    from flowlab.recipes import Trainer, load_config

    if argv[:1] != ["--config"] or len(argv) < 2:  # the command run_digits builds: --config FILE key=value ...
        raise SystemExit(f"gpu_scale.py --worker: expected --config FILE [key=value ...], got {argv}")
    config = load_config(argv[1], argv[2:])
    trainer = Trainer(config)
    trainer.train()
    device = trainer.accelerator.device
    rank = trainer.accelerator.process_index
    Path(config.output_dir, f"peak_memory_rank{rank}.json").write_text(json.dumps({"peak_memory_gib": _peak_gib(device)}))
    trainer.accelerator.wait_for_everyone()
    from flowlab.train.teardown import end_distributed, exit_after_distributed_run

    end_distributed()  # Trainer.train leaves the process group up; end it once, bounded, and skip the
    exit_after_distributed_run(0)  # interpreter shutdown where gloo's threads can abort a finished run


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=RUNTIME, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (a smoke test; numbers say nothing about GPUs)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--cases", default="sd35m,flux1dev,digits", help="comma-separated subset of sd35m, flux1dev, digits")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per NFT case")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--digits-steps", type=int, default=200, help="trainer steps per digits run (GPU)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    if not args.tiny and not cuda:
        p.error("no CUDA device: real sizes need a GPU (SD3.5-M and FLUX.1-dev do not fit a CPU step); run with --tiny")
    device = torch.device("cuda" if cuda else "cpu")
    if args.tiny:
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
        print("gpu_scale: --tiny: toy sizes on the CPU; these numbers say nothing about GPU throughput or memory")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - {"sd35m", "flux1dev", "digits"})
    if unknown:
        p.error(f"--cases: unknown case(s) {unknown}; choose from sd35m, flux1dev, digits")
    results = []
    workdir = Path(tempfile.mkdtemp(prefix="gpu_scale_"))
    try:
        if "sd35m" in cases:
            results.append(sd35m_case(args, device))
            _reset_peak(device)
        if "flux1dev" in cases:
            results.append(flux1dev_case(args, device))
            _reset_peak(device)
        if "digits" in cases:
            results += [digits_case(args, False, workdir), digits_case(args, True, workdir)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "tiny": bool(args.tiny), "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "gpus": torch.cuda.device_count() if cuda else 0, "torch": torch.__version__,
        "peak_memory": "torch.cuda.max_memory_allocated" if cuda else "peak RSS of the process (CPU)", "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
