"""A tiny FLUX.1 pipeline built from configs on the CPU (no download).

The components follow diffusers' own FLUX fast tests: a ``FluxTransformer2DModel`` with one double
and one single block (``guidance_embeds=True`` as FLUX.1-dev, ``False`` as schnell), a one-block
``AutoencoderKL`` (VAE scale factor 1, FLUX's scaling and shift factors), a tiny ``CLIPTextModel``
and a tiny ``T5EncoderModel``. The CLIP tokenizer is written by :mod:`helpers_clip`; the T5 tokenizer
is a unigram ``T5Tokenizer`` built from an explicit vocabulary (letters, digits, punctuation and
word-initial lower-case letters), so nothing is fetched from the Hub.
"""
from __future__ import annotations

import string

import torch
from helpers_clip import write_clip_tokenizer_files  # tests/ is on sys.path (pytest's rootdir import)
from helpers_tiny import tiny_clip_text_config, tiny_clip_tokenizer, tiny_vae

__all__ = ["build_tiny_flux", "write_tiny_flux", "tiny_t5_tokenizer"]

T5_LENGTH = 16  # max_sequence_length of the tiny T5 part


def tiny_t5_tokenizer():
    """A unigram ``T5Tokenizer`` over ``<pad> </s> <unk>``, ``▁``, printable characters and ``▁a..▁z``."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("▁" + c, -2.5) for c in string.ascii_lowercase]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    if len(tok) != len(pieces):
        raise RuntimeError(f"the tiny T5 tokenizer has {len(tok)} tokens, expected {len(pieces)}")
    return tok


def build_tiny_flux(tokenizer_dir: str, seed: int = 0, guidance_embeds: bool = True):
    """A tiny ``FluxPipeline`` (float32, CPU) whose CLIP tokenizer reads ``tokenizer_dir``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = tiny_clip_tokenizer(tokenizer_dir)
    tokenizer_2 = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer))
    torch.manual_seed(seed + 2)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    torch.manual_seed(seed + 3)
    vae = tiny_vae(scaling_factor=1.5035, shift_factor=0.0609)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
                                                  base_shift=0.5, max_shift=1.15, shift=3.0),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, transformer=transformer,
    )


def write_tiny_flux(directory: str, seed: int = 0, guidance_embeds: bool = True) -> str:
    """Write a tiny FLUX pipeline folder (``save_pretrained``) to ``directory`` and return it."""
    tok_dir = directory + "-tokenizer-files"
    write_clip_tokenizer_files(tok_dir)
    build_tiny_flux(tok_dir, seed, guidance_embeds).save_pretrained(directory)
    return directory
