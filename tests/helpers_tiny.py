"""Tiny components shared by the tiny text-to-image pipelines of the tests (no download).

* :func:`tiny_clip_tokenizer`: a ``CLIPTokenizer`` over the byte-level BPE files of :mod:`helpers_clip`,
  checked to have a real vocabulary (transformers 5 can hand back an empty one instead of failing);
* :func:`tiny_clip_text_config`: a 2-layer, 32-wide ``CLIPTextConfig`` for that tokenizer;
* :func:`tiny_vae`: a one-block ``AutoencoderKL`` (VAE scale factor 1) with the family's latent scaling.
"""
from __future__ import annotations

__all__ = ["tiny_clip_tokenizer", "tiny_clip_text_config", "tiny_vae"]


def tiny_clip_tokenizer(tokenizer_dir: str):
    """``CLIPTokenizer`` read from ``tokenizer_dir`` (``model_max_length=77``), with a non-trivial vocabulary."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
    if len(tokenizer) <= 2:
        raise RuntimeError(f"the tiny CLIP tokenizer in {tokenizer_dir} came back empty (vocabulary {len(tokenizer)})")
    return tokenizer


def tiny_clip_text_config(tokenizer):
    """A 2-layer CLIP text config (hidden size and projection 32) whose special tokens are ``tokenizer``'s."""
    from transformers import CLIPTextConfig

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    return CLIPTextConfig(
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
        hidden_act="gelu", projection_dim=32, max_position_embeddings=77,
    )


def tiny_vae(scaling_factor: float, shift_factor: float | None = None, sample_size: int = 8):
    """A one-block ``AutoencoderKL`` with 4 latent channels (scale factor 1); no quant convs for flow-matching
    families (``shift_factor`` given, as SD3/FLUX), quant convs as SD1.5/SDXL otherwise."""
    from diffusers import AutoencoderKL

    flow_family = shift_factor is not None
    return AutoencoderKL(
        sample_size=sample_size, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=4, norm_num_groups=1, use_quant_conv=not flow_family, use_post_quant_conv=not flow_family,
        shift_factor=shift_factor, scaling_factor=scaling_factor,
    )
