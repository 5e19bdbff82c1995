"""FLUX.1 (dev and schnell) through diffusers' ``FluxPipeline`` / ``FluxTransformer2DModel``.

Conventions. The transformer takes ``timestep = sigma`` in ``[0, 1]`` (FluxPipeline passes
``scheduler.timesteps / 1000``) with ``sigma = 1 - t`` and predicts ``eps - x_data = -u``; it
multiplies timestep and guidance by 1000 itself. So, through :mod:`flowlab.flow.conventions`::

    u(x, t) = diffusers_to_velocity(unpack(transformer(pack(x), timestep=t_to_timestep(t, 1), guidance=w, ...)))

on the linear path ``x_t = t x_data + (1 - t) eps``.

* **Guidance.** FLUX.1-dev is guidance-distilled: the guidance scale ``w`` enters as an embedding
  (``guidance_embeds=True``, one network evaluation, no negative prompt; FluxPipeline's default
  ``w = 3.5``). FLUX.1-schnell has no guidance embedding and takes ``w = 1`` only.
* **Latents.** flowlab handles the unpacked VAE latents ``(B, C, h, w)`` (``h = 2 * (H // (2 f))``,
  ``f`` the VAE scale factor); :meth:`FluxAdapter._forward` packs them into ``(B, h/2 * w/2, 4C)``
  patch tokens with ``FluxPipeline._pack_latents`` and unpacks the prediction with
  ``_unpack_latents`` (a permutation, so the ODE is the same in either layout).
* **Dynamic shift.** FluxPipeline shifts its sigmas by ``mu = calculate_shift(image_seq_len, ...)``
  with the scheduler's ``base/max_image_seq_len`` and ``base/max_shift``; its exponential time shift
  ``sigma' = e^mu / (e^mu + 1/sigma - 1)`` is SD3's ``shift_sigma`` with ``shift = e^mu``.
  :attr:`FluxAdapter.time_shift` gives that ``e^mu`` for the adapter's resolution, to pass as the
  ``shift`` of flowlab's sampling grids.
* **Text.** CLIP (pooled ``(B, 768)``) and T5 (``(B, L, 4096)``) through ``FluxPipeline.encode_prompt``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..flow.conventions import diffusers_to_velocity, t_to_timestep
from ..flow.paths import AffinePath, LinearPath
from .base import JOINT_ATTENTION_LORA_TARGETS, Conditioning, FamilyAdapter, cast_module, load_family_pipeline, resolve_dtype

__all__ = ["FluxAdapter", "flux_time_shift"]


def flux_time_shift(image_seq_len: int, scheduler_config: Any = None) -> float:
    """``e^mu`` with ``mu = calculate_shift(image_seq_len, ...)`` as FluxPipeline computes it from its scheduler's config.

    Defaults (no config): FLUX.1's ``base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15``.
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    get = (lambda k, d: scheduler_config.get(k, d)) if scheduler_config is not None else (lambda k, d: d)
    mu = calculate_shift(image_seq_len, get("base_image_seq_len", 256), get("max_image_seq_len", 4096),
                         get("base_shift", 0.5), get("max_shift", 1.15))
    return math.exp(mu)


class FluxAdapter(FamilyAdapter):
    """FLUX.1 components as a flowlab family adapter (see the module docstring).

    Conditioning: ``prompt_embeds`` ``(B, L, D_t5)`` and ``pooled_prompt_embeds`` ``(B, D_clip)``.

    Args:
        transformer: ``FluxTransformer2DModel``.
        vae: ``AutoencoderKL`` (decoded as FluxPipeline does: ``vae.decode(x / scaling + shift)``).
        text_encoder, tokenizer: CLIP-L text encoder and tokenizer.
        text_encoder_2, tokenizer_2: T5 encoder and tokenizer.
        scheduler: the pipeline's ``FlowMatchEulerDiscreteScheduler`` (its dynamic-shift settings).
        resolution: image side in pixels.
        max_sequence_length: T5 tokens (FLUX.1-dev: up to 512, schnell: up to 256).
        guidance_scale: the guidance embedding used when none is given (FLUX.1-dev's 3.5; ignored by
            schnell, which has no guidance embedding).
        cache_size: prompt embeddings kept (least recently used dropped first).
        dtype: dtype of the frozen text encoders and VAE (the transformer keeps the dtype it was given).
    """

    network_name = "transformer"
    prediction_type = "velocity"
    frozen_names = ("text_encoder", "text_encoder_2", "vae")
    default_lora_targets = JOINT_ATTENTION_LORA_TARGETS

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer,
        text_encoder_2: nn.Module,
        tokenizer_2,
        scheduler=None,
        resolution: int = 512,
        max_sequence_length: int = 512,
        guidance_scale: float = 3.5,
        dtype: torch.dtype = torch.float32,
        cache_size: int = 256,
    ):
        super().__init__(negative_prompt="", cache_size=cache_size)
        from diffusers import FluxPipeline

        self.pipeline_class = FluxPipeline
        self.tokenizer, self.tokenizer_2, self.scheduler = tokenizer, tokenizer_2, scheduler
        self.text_encoder, self.text_encoder_2, self.vae = text_encoder, text_encoder_2, vae
        for m in self.frozen_modules().values():
            cast_module(m, dtype).requires_grad_(False).eval()
        self.transformer = transformer
        self.resolution, self.max_sequence_length = int(resolution), int(max_sequence_length)
        self.guidance_scale = float(guidance_scale)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if self.resolution % (2 * self.vae_scale_factor):
            raise ConfigError(f"resolution: {self.resolution} must be a multiple of {2 * self.vae_scale_factor} (2 x VAE scale factor)")
        if int(transformer.config.in_channels) % 4:
            raise ValueError(f"FluxTransformer2DModel.in_channels must be 4 x latent channels, got {transformer.config.in_channels}")

    @classmethod
    def from_pretrained(cls, base: str, key: str = "base", dtype: torch.dtype | str | None = None, **kwargs: Any) -> "FluxAdapter":
        """Load a ``FluxPipeline`` folder or Hub id; ``kwargs`` go to :class:`FluxAdapter` (``resolution``,
        ``max_sequence_length``, ``guidance_scale``). ``dtype=None`` follows accelerate's mixed precision.

        Raises:
            ConfigError: naming ``key`` when the pipeline cannot be loaded.
        """
        from diffusers import FluxPipeline

        dtype = resolve_dtype(dtype)
        pipe = load_family_pipeline(FluxPipeline, base, dtype, key=key)
        return cls(transformer=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                   text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2, scheduler=pipe.scheduler, dtype=dtype, **kwargs)

    def pipeline(self, network: nn.Module | None = None):
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        return FluxPipeline(
            scheduler=self.scheduler or FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=self.vae,
            text_encoder=self.text_encoder, tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2, transformer=network if network is not None else self.transformer,
        )

    # ----------------------------------------------------------------- shapes, path, shift
    @property
    def has_guidance_embedding(self) -> bool:
        """FLUX.1-dev (guidance-distilled): ``True``; schnell: ``False``."""
        return bool(self.transformer.config.guidance_embeds)

    @property
    def guidance_embedded(self) -> bool:
        return self.has_guidance_embedding

    @property
    def guidance_default(self) -> float:
        return self.guidance_scale if self.has_guidance_embedding else 1.0

    @property
    def latent_side(self) -> int:
        return 2 * (self.resolution // (2 * self.vae_scale_factor))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (int(self.transformer.config.in_channels) // 4, self.latent_side, self.latent_side)

    @property
    def image_seq_len(self) -> int:
        """Packed latent tokens ``(h / 2) * (w / 2)`` (what FluxPipeline's ``calculate_shift`` takes)."""
        return (self.latent_side // 2) ** 2

    @property
    def time_shift(self) -> float:
        """FluxPipeline's dynamic shift ``e^mu`` at this resolution (flowlab's ``shift`` of a sampling grid)."""
        return flux_time_shift(self.image_seq_len, getattr(self.scheduler, "config", None))

    @property
    def path(self) -> AffinePath:
        return LinearPath()

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "max_sequence_length": self.max_sequence_length}

    # ----------------------------------------------------------------- conditioning
    def _encode_unique(self, prompts: list[str]) -> Conditioning:
        pe, pooled, _ = self.pipeline().encode_prompt(
            prompt=prompts, prompt_2=None, device=self.text_device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}

    # ----------------------------------------------------------------- the field
    def pack(self, x: Tensor) -> Tensor:
        """``(B, C, h, w)`` latents -> ``(B, h/2 * w/2, 4C)`` patch tokens (``FluxPipeline._pack_latents``)."""
        b, c, h, w = x.shape
        return self.pipeline_class._pack_latents(x, b, c, h, w)

    def unpack(self, tokens: Tensor) -> Tensor:
        """``(B, h/2 * w/2, 4C)`` -> ``(B, C, h, w)`` (``FluxPipeline._unpack_latents`` at this resolution)."""
        return self.pipeline_class._unpack_latents(tokens, self.resolution, self.resolution, self.vae_scale_factor)

    def _forward(self, network: nn.Module, x: Tensor, t: Tensor, cond: Conditioning, guidance: float, detach_unconditional: bool = False) -> Tensor:
        self.check_latents(x)
        if self.has_guidance_embedding:
            g = torch.full((x.shape[0],), guidance, device=x.device, dtype=torch.float32)
        elif guidance != 1.0:
            raise ValueError(f"guidance_scale={guidance}: this FLUX transformer has no guidance embedding (schnell); use 1.0")
        else:
            g = None
        dtype = next(network.parameters()).dtype
        prompt_embeds = cond["prompt_embeds"]
        h = self.latent_side // 2
        out = network(
            hidden_states=self.pack(x.to(dtype)),
            timestep=t_to_timestep(t, 1).to(dtype),
            guidance=g,
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=prompt_embeds.to(dtype),
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=x.device, dtype=dtype),
            img_ids=self.pipeline_class._prepare_latent_image_ids(x.shape[0], h, h, x.device, dtype),
            return_dict=False,
        )[0]
        return diffusers_to_velocity(self.unpack(out)).to(x.dtype)

    # ----------------------------------------------------------------- images
    def decode(self, x: Tensor, batch_size: int = 16) -> Tensor:
        """As FluxPipeline: ``vae.decode(x / scaling_factor + shift_factor)``, then ``[-1, 1] -> [0, 1]``."""
        cfg = self.vae.config
        return self._decode_vae(x / cfg.scaling_factor + (cfg.shift_factor or 0.0), batch_size)
