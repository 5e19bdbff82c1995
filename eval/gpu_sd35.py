#!/usr/bin/env python
"""Seconds per step and peak memory of one DiffusionNFT LoRA step on an SD3.5-Medium-sized transformer.

    # on a GPU machine (no download: the transformer is built from its config with random weights)
    python eval/gpu_sd35.py --json sd35_nft_step.json --markdown sd35_nft_step.md

    # the same measurement at tiny size on the CPU (tests, machines without a GPU)
    python eval/gpu_sd35.py --tiny --micro-batches 1 2 --json tiny.json

Speed and memory do not depend on weight values, so ``SD3Transformer2DModel`` is built from the
configuration of ``stabilityai/stable-diffusion-3.5-medium`` (``SD35_MEDIUM`` below) with random
weights, in bf16 on CUDA (float32 on CPU), with DiffusionNFT's two LoRA adapters (``default``
trained, ``old`` the frozen rollout policy; rank 32, alpha 64, on the attention projections
``SD3Policy.default_lora_targets``; float32 adapter weights, AdamW). One measured step, at ``--resolution``
512 (latents ``16 x 64 x 64``, 1024 image tokens) with prompt embeddings of ``77 + --t5-tokens`` (128)
tokens, is what the NFT recipe does per backward part and optimiser step:

    for each of --timesteps training timesteps (default 1, one backward part):
        u_old = v_old(x_t, t)            no grad      (adapter "old")
        u_ref = v_base(x_t, t)           no grad      (adapters disabled; the KL term)
        u     = v_theta(x_t, t)          with grad    (adapter "default"), bf16 autocast on CUDA
        loss  = nft_loss(x0_normalized, beta 1) + kl_coef ||u - u_ref||^2;  loss.backward()
    AdamW step on the adapters

Timed with CUDA synchronisation, median over ``--repeats`` steps after one warm-up step; peak memory is
``torch.cuda.max_memory_allocated`` over the measured steps (weights included). Micro-batches
1/4/9 (the reference's 9 images per GPU) with gradient checkpointing on and off; an out-of-memory
configuration is recorded as ``OOM``. The frozen text encoders and VAE are not built: an NFT step
does not run them (rollouts and cached prompt embeddings do); kept on the GPU in bf16 they add about
11 GB (CLIP-L 0.12 B, OpenCLIP-G 0.69 B, T5-XXL encoder 4.8 B parameters, VAE 0.08 B).

``--json`` writes ``{"device", "config", "settings", "results": [{"micro_batch", "gradient_checkpointing",
"seconds_per_step", "images_per_second", "peak_memory_gib", "status"}]}``; ``--markdown`` the table.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Any

import torch

RUNTIME = """Runtime: --tiny on the shared 2-core CPU (OMP_NUM_THREADS=1), micro-batches 1/4/9, checkpointing on and
off: about 20 s including imports (measured 20.3 s at a load average of ~12). The full-size run needs a CUDA GPU
with >= 40 GB (a 2.5 B-parameter transformer in bf16) and was not run here (no GPU was available): 6
configurations x (1 + --repeats) steps."""

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json. Checked against diffusers: its single-file
# loader tells SD3.5-Medium apart by pos_embed of 147456 = 384^2 positions (loaders/single_file_utils.py,
# "sd35_medium"); SD3Transformer2DModel documents dual_attention_layers (0..12) for SD3.5; the inner width
# 24 heads x 64 = 1536 matches caption_projection_dim; qk_norm "rms_norm" (SD3.5 adds QK normalisation).
SD35_MEDIUM: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536, "pooled_projection_dim": 2048,
    "out_channels": 16, "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
}
# the same architecture (dual attention, QK norm) at a size that steps in well under a second on a CPU
TINY: dict[str, Any] = {
    "sample_size": 8, "patch_size": 2, "in_channels": 16, "num_layers": 2, "attention_head_dim": 8,
    "num_attention_heads": 4, "joint_attention_dim": 32, "caption_projection_dim": 32, "pooled_projection_dim": 16,
    "out_channels": 16, "pos_embed_max_size": 16, "dual_attention_layers": (0,), "qk_norm": "rms_norm",
}
VAE_SCALE_FACTOR = 8  # SD3's VAE: 3 downsamplings
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"]


def build_transformer(config: dict[str, Any], device: torch.device, dtype: torch.dtype, rank: int, alpha: float):
    """``SD3Transformer2DModel(**config)`` with random weights on ``device`` in ``dtype``, plus the NFT adapters."""
    from diffusers import SD3Transformer2DModel

    from flowlab.nft.policy import LoraSpec, add_policy_adapters

    with torch.device(device):
        transformer = SD3Transformer2DModel(**config)
    if dtype != torch.float32:
        transformer.to(dtype)
    add_policy_adapters(transformer, LoraSpec(rank, alpha, LORA_TARGETS))
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # adapters train in float32 (as SD3Policy)
    return transformer


def velocity(transformer, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """flowlab velocity ``u`` (t = 1 data) from the SD3 transformer's ``noise - data`` at ``sigma = 1 - t``."""
    from flowlab.flow.conventions import diffusers_to_velocity, t_to_timestep

    dtype = next(p for p in transformer.parameters() if not p.requires_grad).dtype
    out = transformer(hidden_states=x.to(dtype), timestep=t_to_timestep(t), encoder_hidden_states=embeds.to(dtype),
                      pooled_projections=pooled.to(dtype), return_dict=False)[0]
    return diffusers_to_velocity(out).float()


def nft_step(transformer, optimizer, inputs: dict[str, torch.Tensor], timesteps: int, beta: float, kl_coef: float,
             autocast: bool) -> float:
    """One optimiser step of DiffusionNFT (``timesteps`` backward parts); returns the last loss."""
    from flowlab.flow.paths import LinearPath
    from flowlab.nft.losses import nft_loss

    path = LinearPath()
    x1, noise, r = inputs["x1"], inputs["noise"], inputs["r"]
    device = x1.device
    optimizer.zero_grad(set_to_none=True)
    loss_value = float("nan")
    for k in range(timesteps):
        t = inputs["t"][:, k]
        x_t = path.sample(noise, x1, t).x_t
        target = x1 - noise
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else torch.autocast(device.type, enabled=False)
        with ctx:
            with torch.no_grad():
                transformer.set_adapter("old")
                u_old = velocity(transformer, x_t, t, inputs["embeds"], inputs["pooled"])
                transformer.disable_adapters()
                u_ref = velocity(transformer, x_t, t, inputs["embeds"], inputs["pooled"])
                transformer.enable_adapters()
            transformer.set_adapter("default")  # peft: the active adapter trains, "old" is frozen again
            u = velocity(transformer, x_t, t, inputs["embeds"], inputs["pooled"])
            loss = nft_loss(u, u_old, target, r, beta, kind="x0_normalized", path=path, x_t=x_t, t=t, x_data=x1).mean()
            loss = loss + kl_coef * ((u - u_ref) ** 2).flatten(1).mean(1).mean()
        (loss / timesteps).backward()
        loss_value = float(loss.detach())
    optimizer.step()
    return loss_value


def make_inputs(config: dict[str, Any], micro_batch: int, resolution: int, t5_tokens: int, timesteps: int,
                device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    side = resolution // VAE_SCALE_FACTOR
    shape = (micro_batch, config["in_channels"], side, side)
    return {
        "x1": torch.randn(shape, generator=g).to(device), "noise": torch.randn(shape, generator=g).to(device),
        "t": torch.rand(micro_batch, timesteps, generator=g).mul(0.99).to(device),
        "r": torch.rand(micro_batch, generator=g).to(device),
        "embeds": torch.randn(micro_batch, 77 + t5_tokens, config["joint_attention_dim"], generator=g).to(device),
        "pooled": torch.randn(micro_batch, config["pooled_projection_dim"], generator=g).to(device),
    }


def measure(transformer, config: dict[str, Any], micro_batch: int, checkpointing: bool, args, device: torch.device) -> dict[str, Any]:
    """Time ``args.repeats`` NFT steps (after one warm-up) at ``micro_batch``; CUDA peak memory."""
    row: dict[str, Any] = {"micro_batch": micro_batch, "gradient_checkpointing": checkpointing}
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()
    transformer.train()
    params = [p for n, p in transformer.named_parameters() if ".default." in n and "lora_" in n]
    optimizer = torch.optim.AdamW(params, lr=3e-4)
    inputs = make_inputs(config, micro_batch, args.resolution, args.t5_tokens, args.timesteps, device, args.seed)
    cuda = device.type == "cuda"
    try:
        nft_step(transformer, optimizer, inputs, args.timesteps, args.beta, args.kl_coef, cuda)  # warm-up
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            loss = nft_step(transformer, optimizer, inputs, args.timesteps, args.beta, args.kl_coef, cuda)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        if not torch.isfinite(torch.tensor(loss)):
            raise RuntimeError(f"non-finite NFT loss {loss} at micro-batch {micro_batch}")
        sec = statistics.median(times)
        row.update(status="ok", seconds_per_step=sec, images_per_second=micro_batch * args.timesteps / sec,
                   peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None, loss=loss)
    except torch.cuda.OutOfMemoryError:
        row.update(status="OOM", seconds_per_step=None, images_per_second=None, peak_memory_gib=None)
    finally:
        del optimizer, inputs
        transformer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()
    return row


def _count(n: int) -> str:
    return f"{n / 1e9:.3g} B" if n >= 1e9 else f"{n / 1e6:.3g} M" if n >= 1e6 else f"{n / 1e3:.3g} k"


def format_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"Device: {result['device']}. {s['size']} transformer ({_count(result['parameters'])} parameters), "
             f"LoRA rank {s['lora_rank']} ({_count(result['trainable_parameters'])} trained), {s['resolution']} px, "
             f"{s['timesteps']} timestep(s) per step, median of {s['repeats']} steps.", "",
             "| micro-batch | gradient checkpointing | s / step | images / s | peak memory (GiB) |",
             "|---:|:---:|---:|---:|---:|"]
    for r in result["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['micro_batch']} | {'on' if r['gradient_checkpointing'] else 'off'} | {r['status']} | | |")
            continue
        mem = "n/a (CPU)" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        lines.append(f"| {r['micro_batch']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                     f"{r['seconds_per_step']:.3f} | {r['images_per_second']:.2f} | {mem} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog=RUNTIME, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny transformer of the same architecture, on the CPU")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 4, 9], help="images per backward part (1 4 9)")
    p.add_argument("--checkpointing", choices=["both", "on", "off"], default="both", help="gradient checkpointing")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default 512; 64 with --tiny)")
    p.add_argument("--t5-tokens", type=int, default=None, help="T5 tokens after CLIP's 77 (default 128; 8 with --tiny)")
    p.add_argument("--timesteps", type=int, default=1, help="backward parts (training timesteps) per optimiser step")
    p.add_argument("--repeats", type=int, default=3, help="measured steps after the warm-up (median)")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--lora-alpha", type=float, default=64.0)
    p.add_argument("--beta", type=float, default=1.0, help="NFT guidance beta")
    p.add_argument("--kl-coef", type=float, default=1e-4)
    p.add_argument("--device", default=None, help="default: cuda when present (cpu with --tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", default=None, help="write the table here")
    args = p.parse_args(argv)
    for flag in ("timesteps", "repeats", "lora_rank"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if any(m < 1 for m in args.micro_batches):
        p.error(f"--micro-batches must be >= 1, got {args.micro_batches}")
    args.resolution = args.resolution or (64 if args.tiny else 512)
    args.t5_tokens = args.t5_tokens if args.t5_tokens is not None else (8 if args.tiny else 128)
    config = TINY if args.tiny else SD35_MEDIUM
    if args.resolution % (VAE_SCALE_FACTOR * config["patch_size"]):
        p.error(f"--resolution {args.resolution} must be a multiple of {VAE_SCALE_FACTOR * config['patch_size']}")
    if args.resolution // VAE_SCALE_FACTOR > config["pos_embed_max_size"] * config["patch_size"]:
        p.error(f"--resolution {args.resolution} exceeds the transformer's position embedding "
                f"({config['pos_embed_max_size'] * config['patch_size'] * VAE_SCALE_FACTOR} px)")
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    if device.type == "cpu" and not args.tiny:
        p.error("the SD3.5-Medium-sized step needs a CUDA GPU; use --tiny on the CPU")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(args.seed)

    from flowlab.fileio import atomic_write_json, atomic_write_text

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    transformer = build_transformer(config, device, dtype, args.lora_rank, args.lora_alpha)
    build_seconds = time.perf_counter() - t0
    n_params = sum(p.numel() for n, p in transformer.named_parameters() if "lora_" not in n)
    n_train = sum(p.numel() for n, p in transformer.named_parameters() if ".default." in n and "lora_" in n)
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.checkpointing]
    results = []
    for ckpt in modes:
        for mb in args.micro_batches:
            row = measure(transformer, config, mb, ckpt, args, device)
            results.append(row)
            print(f"micro-batch {mb:>2}  checkpointing {'on ' if ckpt else 'off'}  {row['status']:>3}  "
                  + (f"{row['seconds_per_step']:.3f} s/step" if row["status"] == "ok" else ""), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    result = {
        "device": name, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "parameters": n_params, "trainable_parameters": n_train, "build_seconds": build_seconds,
        "settings": {"size": "tiny" if args.tiny else "SD3.5-Medium", "resolution": args.resolution,
                     "t5_tokens": args.t5_tokens, "timesteps": args.timesteps, "repeats": args.repeats,
                     "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha, "beta": args.beta,
                     "kl_coef": args.kl_coef, "dtype": str(dtype).replace("torch.", ""),
                     "autocast": "bf16" if device.type == "cuda" else "off"},
        "results": results,
    }
    table = format_markdown(result)
    print(table)
    if args.json:
        atomic_write_json(args.json, result)
    if args.markdown:
        atomic_write_text(args.markdown, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
