"""Epsilon / v-prediction text-to-image UNets (SD1.5, SD2.1, SDXL) through diffusers' ``UNet2DConditionModel``.

Conventions. The UNet was trained on a discrete DDPM schedule ``abar_k`` (``k = 0 .. N-1``, noise
growing with ``k``). flowlab reads it on :class:`~flowlab.flow.discrete.DiscreteSchedulePath`, the
continuous VP path through that schedule, whose timestep map ``u(t) = (1 - t) N - 1`` takes flowlab
time (``t = 0`` noise, ``t = 1`` data) to the UNet's (fractional) ``timestep``; the model is
evaluated at ``t <= 1 - 1/N`` (``u >= 0``, where it was trained). Predictions:

* ``epsilon`` (SD1.5, SDXL) as is;
* ``v_prediction`` (SD2.1-768) ``v = alpha eps - sigma x1`` -> ``eps = sigma x_t + alpha v`` (VP);
* ``sample`` (x1) as is, read as ``x1``;

then :func:`flowlab.flow.parameterization.convert` gives the probability-flow velocity on the path.
Classifier-free guidance is ``eps_neg + w (eps_cond - eps_neg)`` against the negative prompt (``""``),
both branches in one batched forward (the same guided field whichever parameterisation it is read
in: the converters are affine in the prediction at fixed ``(x, t)``).

SDXL (``addition_embed_type="text_time"``) also takes the pooled CLIP-G embedding (``text_embeds``)
and the micro-conditioning ``time_ids = (H, W, 0, 0, H, W)``, both carried in the conditioning dict.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..flow.discrete import DIFFUSERS_PREDICTION_TYPES, DiscreteSchedulePath, diffusers_v_to_epsilon
from ..flow.paths import AffinePath
from .base import Conditioning, FamilyAdapter, cast_module, load_family_pipeline, resolve_dtype

__all__ = ["UNetAdapter"]


class UNetAdapter(FamilyAdapter):
    """A Stable Diffusion UNet pipeline (SD1.5/SD2.1: ``StableDiffusionPipeline``; SDXL:
    ``StableDiffusionXLPipeline``) as a flowlab family adapter (see the module docstring).

    Conditioning: ``prompt_embeds`` ``(B, L, D)``; SDXL adds ``text_embeds`` ``(B, P)`` and ``time_ids`` ``(B, 6)``.

    Args:
        unet: ``UNet2DConditionModel``.
        vae: ``AutoencoderKL`` (decoded as the pipelines do: ``vae.decode(x / scaling_factor)``).
        text_encoder, tokenizer: the CLIP text encoder and tokenizer.
        scheduler: any diffusers scheduler with ``alphas_cumprod`` and ``config.prediction_type``
            (the pipeline's ``PNDMScheduler``, ``DDIMScheduler``, ...): only its beta schedule is used.
        text_encoder_2, tokenizer_2: SDXL's second (projection) CLIP encoder, or ``None`` for SD1.5/2.1.
        resolution: image side in pixels (default: the pipelines' ``unet.config.sample_size * f``).
        guidance_scale: the CFG scale used when none is given (the pipelines' 7.5 / SDXL's 5.0).
        negative_prompt: the unconditional prompt of CFG.
        prediction_type: override the scheduler's (``epsilon``, ``v_prediction``, ``sample``).
        force_zeros_for_empty_prompt: SDXL only, as its pipeline config: an empty negative prompt is
            all-zero embeddings (not the encoding of ``""``).
        cache_size: prompt embeddings kept (least recently used dropped first).
        dtype: dtype of the frozen text encoders and VAE.
    """

    network_name = "unet"
    frozen_names = ("text_encoder", "text_encoder_2", "vae")
    default_lora_targets = ["to_k", "to_q", "to_v", "to_out.0"]

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer,
        scheduler,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2=None,
        resolution: int | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str = "",
        prediction_type: str | None = None,
        force_zeros_for_empty_prompt: bool = True,
        dtype: torch.dtype = torch.float32,
        cache_size: int = 256,
    ):
        super().__init__(negative_prompt=negative_prompt, cache_size=cache_size)
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        self.is_sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
        if self.is_sdxl and text_encoder_2 is None:
            raise ValueError("an SDXL UNet (addition_embed_type='text_time') needs text_encoder_2 and tokenizer_2")
        self.pipeline_class = StableDiffusionXLPipeline if self.is_sdxl else StableDiffusionPipeline
        kind = prediction_type or scheduler.config.prediction_type
        if kind not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type: {kind!r} is not one of 'epsilon', 'v_prediction', 'sample'")
        self.raw_prediction_type = kind
        self.prediction_type = DIFFUSERS_PREDICTION_TYPES["epsilon" if kind == "v_prediction" else kind]
        self.tokenizer, self.tokenizer_2, self.scheduler = tokenizer, tokenizer_2, scheduler
        self.text_encoder, self.text_encoder_2, self.vae = text_encoder, text_encoder_2, vae
        for m in self.frozen_modules().values():
            cast_module(m, dtype).requires_grad_(False).eval()
        self.unet = unet
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt) and self.is_sdxl
        self._path = DiscreteSchedulePath.from_scheduler(scheduler)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.guidance_scale = float(guidance_scale)
        self.resolution = int(resolution) if resolution is not None else int(unet.config.sample_size) * self.vae_scale_factor
        if self.resolution % self.vae_scale_factor:
            raise ConfigError(f"resolution: {self.resolution} must be a multiple of the VAE scale factor {self.vae_scale_factor}")

    @classmethod
    def from_pretrained(cls, base: str, key: str = "base", dtype: torch.dtype | str | None = None, sdxl: bool | None = None,
                        **kwargs: Any) -> "UNetAdapter":
        """Load a ``StableDiffusionPipeline`` (SD1.5/2.1) or ``StableDiffusionXLPipeline`` folder / Hub id.

        ``sdxl=None`` reads the pipeline class from the folder's ``model_index.json``; ``kwargs`` go to
        :class:`UNetAdapter`. The safety checker is not loaded (images are scored, not shown).

        Raises:
            ConfigError: naming ``key`` when the pipeline cannot be loaded.
        """
        from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

        dtype = resolve_dtype(dtype)
        if sdxl is None:
            try:
                sdxl = "XL" in str(DiffusionPipeline.load_config(base).get("_class_name", ""))
            except Exception:
                sdxl = False  # load_family_pipeline below reports the real problem, naming `key`
        cls_ = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
        extra = {} if sdxl else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        pipe = load_family_pipeline(cls_, base, dtype, key=key, **extra)
        if sdxl:
            kwargs.setdefault("force_zeros_for_empty_prompt", bool(pipe.config.get("force_zeros_for_empty_prompt", True)))
        return cls(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, scheduler=pipe.scheduler,
                   text_encoder_2=getattr(pipe, "text_encoder_2", None), tokenizer_2=getattr(pipe, "tokenizer_2", None),
                   dtype=dtype, **kwargs)

    def pipeline(self, network: nn.Module | None = None):
        unet = network if network is not None else self.unet
        common = dict(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=unet, scheduler=self.scheduler)
        if self.is_sdxl:
            return self.pipeline_class(text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2, **common)
        return self.pipeline_class(safety_checker=None, feature_extractor=None, requires_safety_checker=False, **common)

    # ----------------------------------------------------------------- shapes and path
    @property
    def path(self) -> AffinePath:
        return self._path

    @property
    def t_range(self) -> tuple[float, float]:
        return (0.0, 1.0 - 1.0 / self._path.num_train_timesteps)

    @property
    def guidance_default(self) -> float:
        return self.guidance_scale

    # ----------------------------------------------------------------- conditioning
    def _encode_unique(self, prompts: list[str]) -> Conditioning:
        pipe = self.pipeline()
        if not self.is_sdxl:
            pe, _ = pipe.encode_prompt(prompts, self.text_device, 1, False)
            return {"prompt_embeds": pe}
        pe, _, pooled, _ = pipe.encode_prompt(prompts, None, self.text_device, 1, False)
        size = (self.resolution, self.resolution)
        proj = int(self.text_encoder_2.config.projection_dim)
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=pe.dtype, text_encoder_projection_dim=proj)
        return {"prompt_embeds": pe, "text_embeds": pooled, "time_ids": time_ids.to(pe.device).expand(len(prompts), -1)}

    def negative_embeddings(self) -> Conditioning:
        """The negative prompt's conditioning (batch 1); SDXL with ``force_zeros_for_empty_prompt`` and an
        empty negative prompt: zero text embeddings (the micro-conditioning ``time_ids`` unchanged), as its pipeline."""
        neg = super().negative_embeddings()
        if self.force_zeros_for_empty_prompt and not self.negative_prompt:
            neg = {k: (v if k == "time_ids" else torch.zeros_like(v)) for k, v in neg.items()}
        return neg

    # ----------------------------------------------------------------- the field
    def _unet(self, network: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        dtype = next(network.parameters()).dtype
        added = {"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)} if self.is_sdxl else None
        out = network(x.to(dtype), timestep.to(dtype), encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                      added_cond_kwargs=added, return_dict=False)[0]
        return out.to(x.dtype)

    def _forward(self, network: nn.Module, x: Tensor, t: Tensor, cond: Conditioning, guidance: float, detach_unconditional: bool = False) -> Tensor:
        """UNet output at ``timestep = u(t)`` (guided: ``neg + w (cond - neg)``), read as ``epsilon`` / ``x1``."""
        n = self._path.num_train_timesteps
        timestep = self._path.timestep(t.to(torch.float64)).clamp(0, n - 1).float()
        out = self._classifier_free_guidance(lambda x_, u, c: self._unet(network, x_, u, c), x, timestep, cond, guidance, detach_unconditional)
        if self.raw_prediction_type == "v_prediction":
            out = diffusers_v_to_epsilon(self._path, out, x, t.to(x.dtype))
        return out

    # ----------------------------------------------------------------- images
    def decode(self, x: Tensor, batch_size: int = 16) -> Tensor:
        """As the SD pipelines: ``vae.decode(x / scaling_factor)`` (SDXL VAEs with ``latents_mean`` /
        ``latents_std``: ``x * std / scaling_factor + mean``), then ``[-1, 1] -> [0, 1]``."""
        cfg = self.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            std = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            return self._decode_vae(x * std / cfg.scaling_factor + mean, batch_size)
        return self._decode_vae(x / cfg.scaling_factor, batch_size)
