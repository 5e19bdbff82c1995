"""A tiny Stable Diffusion 3 pipeline built from configs on the CPU (no download).

The components follow diffusers' own SD3 fast tests: a one-layer ``SD3Transformer2DModel``, a
one-block ``AutoencoderKL`` (VAE scale factor 1, SD3's scaling and shift factors), two tiny
``CLIPTextModelWithProjection`` and no T5 (``text_encoder_3=None``). The CLIP tokenizers are
built from a byte-level BPE vocabulary written by :mod:`helpers_clip` (all 256 byte symbols, a few
merges and CLIP's special tokens), so nothing is fetched from the Hub.
"""
from __future__ import annotations

import torch
from helpers_clip import write_clip_tokenizer_files  # tests/ is on sys.path (pytest's rootdir import)

__all__ = ["write_tiny_sd3", "build_tiny_sd3", "write_clip_tokenizer_files"]


def build_tiny_sd3(tokenizer_dir: str, seed: int = 0):
    """A tiny ``StableDiffusion3Pipeline`` (float32, CPU) whose tokenizers read ``tokenizer_dir``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
    if len(tokenizer) <= 2:  # transformers 5 can hand back an empty tokenizer instead of failing
        raise RuntimeError(f"the tiny CLIP tokenizer in {tokenizer_dir} came back empty (vocabulary {len(tokenizer)})")
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    text_config = CLIPTextConfig(
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
        hidden_act="gelu", projection_dim=32, max_position_embeddings=77,
    )
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=32,
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModelWithProjection(text_config)
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77),
        text_encoder_3=None, tokenizer_3=None,
    )


def write_tiny_sd3(directory: str, seed: int = 0) -> str:
    """Write a tiny SD3 pipeline folder (``save_pretrained``) to ``directory`` and return it."""
    tok_dir = directory + "-tokenizer-files"
    write_clip_tokenizer_files(tok_dir)
    build_tiny_sd3(tok_dir, seed).save_pretrained(directory)
    return directory
