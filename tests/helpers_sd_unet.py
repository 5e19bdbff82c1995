"""A tiny Stable Diffusion (SD1.5-style) pipeline built from configs on the CPU (no download).

The components follow diffusers' own SD fast tests, smaller: a two-level ``UNet2DConditionModel``
(one cross-attention block), a one-block ``AutoencoderKL`` (VAE scale factor 1, SD's scaling
factor 0.18215), a tiny ``CLIPTextModel`` with the byte-level tokenizer of :mod:`helpers_clip`, and
SD's ``scaled_linear`` DDIM schedule (``prediction_type`` ``epsilon`` as SD1.5 or ``v_prediction``
as SD2.1-768).
"""
from __future__ import annotations

import torch
from helpers_clip import write_clip_tokenizer_files  # tests/ is on sys.path (pytest's rootdir import)
from helpers_tiny import tiny_clip_text_config, tiny_clip_tokenizer, tiny_vae

__all__ = ["build_tiny_sd", "write_tiny_sd", "build_tiny_sdxl", "write_tiny_sdxl"]


def build_tiny_sd(tokenizer_dir: str, seed: int = 0, prediction_type: str = "epsilon"):
    """A tiny ``StableDiffusionPipeline`` (float32, CPU) whose CLIP tokenizer reads ``tokenizer_dir``."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = tiny_clip_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4,
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer))
    torch.manual_seed(seed + 2)
    vae = tiny_vae(scaling_factor=0.18215)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def write_tiny_sd(directory: str, seed: int = 0, prediction_type: str = "epsilon") -> str:
    """Write a tiny SD pipeline folder (``save_pretrained``) to ``directory`` and return it."""
    tok_dir = directory + "-tokenizer-files"
    write_clip_tokenizer_files(tok_dir)
    build_tiny_sd(tok_dir, seed, prediction_type).save_pretrained(directory)
    return directory


def build_tiny_sdxl(tokenizer_dir: str, seed: int = 0):
    """A tiny ``StableDiffusionXLPipeline`` (float32, CPU): a ``text_time`` UNet, CLIP + CLIP-with-projection."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer(tokenizer_dir)
    text_config = tiny_clip_text_config(tokenizer)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=4, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, transformer_layers_per_block=1,
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    torch.manual_seed(seed + 3)
    vae = tiny_vae(scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tiny_clip_tokenizer(tokenizer_dir),
                                     unet=unet, scheduler=scheduler)


def write_tiny_sdxl(directory: str, seed: int = 0) -> str:
    """Write a tiny SDXL pipeline folder (``save_pretrained``) to ``directory`` and return it."""
    tok_dir = directory + "-tokenizer-files"
    write_clip_tokenizer_files(tok_dir)
    build_tiny_sdxl(tok_dir, seed).save_pretrained(directory)
    return directory
