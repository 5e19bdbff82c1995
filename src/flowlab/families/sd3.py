"""Stable Diffusion 3 / 3.5 through diffusers' ``StableDiffusion3Pipeline`` / ``SD3Transformer2DModel``.

Conventions. SD3's transformer takes ``timestep = sigma * num_train_timesteps`` (1000) with
``sigma = 1 - t`` and predicts ``eps - x_data = -u``. So, through :mod:`flowlab.flow.conventions`::

    u(x, t) = diffusers_to_velocity(transformer(x, timestep=t_to_timestep(t, 1000), ...))

on the linear path ``x_t = t x_data + (1 - t) eps`` (``= (1 - sigma) x + sigma eps``).

* **Guidance.** Classifier-free guidance ``u_neg + w (u_cond - u_neg)`` against the negative prompt
  (``""`` as in the pipeline), both branches in one batched forward; ``StableDiffusion3Pipeline``'s
  default ``w = 7``.
* **Text.** CLIP-L and CLIP-G (and the optional T5; zeros in its place without it, as the pipeline
  does) through ``StableDiffusion3Pipeline.encode_prompt``: ``prompt_embeds`` ``(B, 154, 4096)``
  (77 CLIP tokens + ``max_sequence_length`` T5 tokens; ``(B, 77 + L, D)`` in general) and
  ``pooled_prompt_embeds`` ``(B, 2048)``.
* **Latents.** ``(B, C, h, w)`` with ``h = resolution / f`` (``f`` the VAE scale factor), decoded as the
  pipeline does, ``vae.decode(x / scaling_factor + shift_factor)``, in float32: the VAE is kept in
  float32 whatever the dtype of the other frozen weights, as the references decode latents for rewards
  (NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py`` line 412).
* **Sampling grid.** :meth:`SD3Adapter.time_grid` is the scheduler's own
  ``FlowMatchEulerDiscreteScheduler.set_timesteps`` grid (what the references train on).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..flow.conventions import diffusers_to_velocity, sigma_to_t, t_to_timestep
from ..flow.paths import AffinePath, LinearPath
from .base import JOINT_ATTENTION_LORA_TARGETS, Conditioning, FamilyAdapter, cast_module, load_family_pipeline, resolve_dtype

__all__ = ["SD3Adapter"]

#: the pipeline's components, as ``StableDiffusion3Pipeline.from_pretrained`` takes them
_COMPONENTS = ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
               "tokenizer_2", "tokenizer_3", "image_encoder", "feature_extractor")


class SD3Adapter(FamilyAdapter):
    """SD3 / SD3.5 components as a flowlab family adapter (see the module docstring).

    Conditioning: ``prompt_embeds`` ``(B, L, D)`` and ``pooled_prompt_embeds`` ``(B, P)``.

    Args:
        transformer: ``SD3Transformer2DModel`` (kept in the dtype it was given).
        vae: ``AutoencoderKL`` (frozen, float32).
        text_encoder, tokenizer, text_encoder_2, tokenizer_2: the two CLIP text encoders (frozen) and
            their tokenizers.
        text_encoder_3, tokenizer_3: T5 encoder and tokenizer, or ``None``.
        scheduler: the pipeline's ``FlowMatchEulerDiscreteScheduler`` (its ``num_train_timesteps`` scales
            time to the transformer's ``timestep``; its shift settings give :meth:`time_grid`).
        resolution: image side in pixels, a multiple of ``f x patch_size``.
        max_sequence_length: T5 tokens (the length of the T5 part of ``prompt_embeds``).
        guidance_scale: the CFG scale used when none is given (the pipeline's 7.0).
        negative_prompt: the unconditional prompt of CFG.
        cache_size: prompt embeddings kept (least recently used dropped first).
        dtype: dtype of the frozen text encoders.
    """

    network_name = "transformer"
    prediction_type = "velocity"
    frozen_names = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
    default_lora_targets = JOINT_ATTENTION_LORA_TARGETS

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer,
        text_encoder_2: nn.Module,
        tokenizer_2,
        text_encoder_3: nn.Module | None = None,
        tokenizer_3=None,
        scheduler=None,
        resolution: int = 512,
        max_sequence_length: int = 77,
        guidance_scale: float = 7.0,
        negative_prompt: str = "",
        dtype: torch.dtype = torch.float32,
        cache_size: int = 256,
    ):
        super().__init__(negative_prompt=negative_prompt, cache_size=cache_size)
        from diffusers import StableDiffusion3Pipeline

        self.pipeline_class = StableDiffusion3Pipeline
        self.tokenizer, self.tokenizer_2, self.tokenizer_3, self.scheduler = tokenizer, tokenizer_2, tokenizer_3, scheduler
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoder, text_encoder_2, text_encoder_3
        self.vae = vae
        for m in self.frozen_modules().values():  # the VAE stays float32: latents decode for rewards in float32
            cast_module(m, torch.float32 if m is vae else dtype).requires_grad_(False).eval()
        self.transformer = transformer
        self.resolution, self.max_sequence_length = int(resolution), int(max_sequence_length)
        self.guidance_scale = float(guidance_scale)
        self.num_train_timesteps = int(getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000) or 1000)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        side = self.vae_scale_factor * int(transformer.config.patch_size)
        if self.resolution % side:
            raise ConfigError(f"resolution: {self.resolution} must be a multiple of {side} (VAE scale factor x patch size)")

    @classmethod
    def from_pretrained(cls, base: str, key: str = "base", dtype: torch.dtype | str | None = None, **kwargs: Any) -> "SD3Adapter":
        """Load a ``StableDiffusion3Pipeline`` folder or Hub id.

        Components the folder's ``model_index.json`` lists as absent (e.g. ``text_encoder_3``) are passed
        as ``None``; component names in ``kwargs`` go to ``StableDiffusion3Pipeline.from_pretrained``
        (``text_encoder_3=None, tokenizer_3=None`` drops T5), the rest to :class:`SD3Adapter`
        (``resolution``, ``max_sequence_length``, ``guidance_scale``, ``negative_prompt``). ``dtype=None``
        follows accelerate's mixed precision; the VAE loads in float32 whatever ``dtype``.

        Raises:
            ConfigError: naming ``key`` when the pipeline cannot be loaded.
        """
        from diffusers import StableDiffusion3Pipeline

        dtype = resolve_dtype(dtype)
        components = {k: kwargs.pop(k) for k in list(kwargs) if k in _COMPONENTS}
        pipe = load_family_pipeline(StableDiffusion3Pipeline, base, {"default": dtype, "vae": torch.float32}, key=key, **components)
        return cls(transformer=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                   text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2, text_encoder_3=pipe.text_encoder_3,
                   tokenizer_3=pipe.tokenizer_3, scheduler=pipe.scheduler, dtype=dtype, **kwargs)

    def pipeline(self, network: nn.Module | None = None):
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(
            transformer=network if network is not None else self.transformer, scheduler=self.scheduler or FlowMatchEulerDiscreteScheduler(),
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2, text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3,
        )

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "max_sequence_length": self.max_sequence_length}

    # ----------------------------------------------------------------- shapes, path, grid
    @property
    def path(self) -> AffinePath:
        return LinearPath()

    @property
    def guidance_default(self) -> float:
        return self.guidance_scale

    def time_grid(self, num_steps: int, shift: float = 1.0, device=None) -> Tensor:
        """The sampler's grid as diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps)``
        builds it for this pipeline's scheduler with ``shift``, in flowlab time, float64 ``(num_steps + 1,)``.

        The scheduler spaces ``num_steps`` sigmas uniformly from ``sigma_max`` to its (shifted) smallest
        training sigma, shifts them, and appends ``0``; for SD3.5 (shift 3, 1000 training steps) the last
        sigma before ``0`` is about ``0.009``. The references train on exactly these timesteps
        (``pipeline.scheduler.timesteps``: NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py`` line 662).
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        base = self.scheduler.config if self.scheduler is not None else FlowMatchEulerDiscreteScheduler().config
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(base, shift=float(shift))
        scheduler.set_timesteps(num_steps, device="cpu")
        return sigma_to_t(scheduler.sigmas.double()).to(device)

    # ----------------------------------------------------------------- conditioning
    def _encode_unique(self, prompts: list[str]) -> Conditioning:
        pe, _, pooled, _ = self.pipeline().encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.text_device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}

    # ----------------------------------------------------------------- the field
    def _velocity(self, network: nn.Module, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """``u = -transformer(x, timestep = (1 - t) * 1000, prompt embeddings)``, in ``x``'s dtype."""
        dtype = next(network.parameters()).dtype
        out = network(
            hidden_states=x.to(dtype),
            timestep=t_to_timestep(t, self.num_train_timesteps),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]
        return diffusers_to_velocity(out).to(x.dtype)

    def _forward(self, network: nn.Module, x: Tensor, t: Tensor, cond: Conditioning, guidance: float, detach_unconditional: bool = False) -> Tensor:
        self.check_latents(x)
        return self._classifier_free_guidance(lambda x_, t_, c: self._velocity(network, x_, t_, c), x, t, cond, guidance, detach_unconditional)

    # ----------------------------------------------------------------- images
    def decode(self, x: Tensor, batch_size: int = 16) -> Tensor:
        """As the SD3 pipeline: ``vae.decode(x / scaling_factor + shift_factor)`` in float32, then ``[-1, 1] -> [0, 1]``."""
        cfg = self.vae.config
        return self._decode_vae(x.float() / cfg.scaling_factor + (cfg.shift_factor or 0.0), batch_size)
