"""A diffusers ``StableDiffusion3Pipeline`` as an RL policy (``rl.pipeline: sd3``).

:class:`SD3Policy` wraps the pipeline's components in one ``nn.Module``:

* the **network** is the ``SD3Transformer2DModel``; with LoRA it carries the peft adapters
  ``default`` (trained) and ``old`` (the soft-updated rollout policy), and the reference is the
  transformer with its adapters disabled; with full fine-tuning ``old`` / ``ref`` are frozen copies;
* the text encoders (CLIP-L, CLIP-G and the optional T5) and the VAE are frozen submodules, so the
  trainer moves them to the device with the rest; prompts are encoded by the pipeline's own
  ``encode_prompt`` (a pipeline object built around the same components, nothing copied).

Conventions. flowlab samples latents with time ``t`` (``0`` noise, ``1`` data) and velocity
``u = data - noise``; SD3's transformer takes ``timestep = sigma * 1000`` with ``sigma = 1 - t`` and
predicts ``eps - x_data = -u``. All conversions go through :mod:`flowlab.flow.conventions`::

    u(x, t) = diffusers_to_velocity(transformer(x, timestep=t_to_timestep(t, 1000), ...))

The latent path is the linear one, ``x_t = t x_data + (1 - t) eps`` (= ``(1 - sigma) x + sigma eps``).
Latents decode to images as the SD3 pipeline does: ``vae.decode(x / scaling_factor + shift_factor)``,
then ``[-1, 1] -> [0, 1]``.

Saving writes the LoRA in diffusers' layout (``pytorch_lora_weights.safetensors`` with its adapter
config), so ``StableDiffusion3Pipeline.from_pretrained(base).load_lora_weights(directory)`` restores
the fine-tuned model; full fine-tuning saves the transformer (``directory/transformer``) only.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..flow.conventions import diffusers_to_velocity, sigma_to_t, t_to_timestep
from ..flow.guidance import combine_guidance
from ..flow.paths import AffinePath, LinearPath
from ..errors import ConfigError
from ..families.base import JOINT_ATTENTION_LORA_TARGETS
from .policy import LoraSpec, Policy, add_policy_adapters

__all__ = ["SD3Policy"]

_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
_TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")


class SD3Policy(Policy):
    """Stable Diffusion 3 (transformer + LoRA or full fine-tuning) as a flowlab RL policy.

    Conditioning is a dict of tensors batched along dim 0: ``prompt_embeds`` ``(B, L, D)`` and
    ``pooled_prompt_embeds`` ``(B, P)`` (what :meth:`encode` returns for a list of prompts).

    Args:
        transformer: the pipeline's ``SD3Transformer2DModel`` (trained in place).
        vae: the pipeline's ``AutoencoderKL`` (frozen).
        text_encoder, text_encoder_2: the two CLIP text encoders (frozen).
        tokenizer, tokenizer_2: their tokenizers.
        text_encoder_3, tokenizer_3: T5 encoder and tokenizer, or ``None`` (zeros in its place, as
            the pipeline does).
        scheduler: the pipeline's ``FlowMatchEulerDiscreteScheduler`` (its ``num_train_timesteps``
            scales time to the transformer's ``timestep``).
        lora: LoRA settings, or ``None`` for full fine-tuning.
        reference: keep a frozen copy of the base transformer for a KL term (full fine-tuning only;
            with LoRA the reference is the adapter-free transformer).
        resolution: image side in pixels; latents are ``(C, resolution / f, resolution / f)`` with
            ``f`` the VAE scale factor.
        max_sequence_length: T5 tokens (the length of the T5 part of ``prompt_embeds``).
        negative_prompt: the unconditional prompt of classifier-free guidance (``""`` as in SD3).
        dtype: dtype of the frozen weights (text encoders, VAE and, with LoRA, the base transformer);
            the trained weights (LoRA adapters, or the whole transformer) stay float32.
    """

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
        lora: LoraSpec | None = None,
        reference: bool = False,
        resolution: int = 512,
        max_sequence_length: int = 77,
        negative_prompt: str = "",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.lora = lora
        self.scheduler = scheduler
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoder, text_encoder_2, text_encoder_3
        self.vae = vae
        for m in self._frozen_modules():  # the VAE stays float32: latents decode for rewards in float32, as the references do
            _cast(m, torch.float32 if m is vae else dtype).requires_grad_(False).eval()
        self.transformer = transformer
        self.compute_dtype = dtype
        self.resolution = int(resolution)
        self.max_sequence_length = int(max_sequence_length)
        self.negative_prompt = negative_prompt
        self.num_train_timesteps = int(getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000) or 1000)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        side = self.vae_scale_factor * int(transformer.config.patch_size)
        if self.resolution % side:
            raise ConfigError(f"rl.resolution: {self.resolution} must be a multiple of {side} (VAE scale factor x patch size)")
        self._negative: dict[tuple, dict[str, Tensor]] = {}
        self._embedding_cache: dict[str, dict[str, Tensor]] | None = None  # prompt -> CPU embeddings
        self._pipe = None
        # checkpoints hold the transformer (and its old / ref copies) only: the frozen encoders and VAE
        # are the base pipeline's, several GB for SD3.5, and are restored from it
        self._register_state_dict_hook(_drop_frozen_state)
        self._register_load_state_dict_pre_hook(_fill_frozen_state, with_module=True)
        if lora is not None:
            _cast(transformer, dtype)
            add_policy_adapters(transformer, lora)
            for name, p in transformer.named_parameters():  # adapters train (and soft-update) in float32
                if "lora_" in name:
                    p.data = p.data.float()
        else:
            _cast(transformer, torch.float32).requires_grad_(True)
            self.compute_dtype = torch.float32
            self._keep_frozen_copies(transformer, reference)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls,
        base: str,
        lora: LoraSpec | None = None,
        reference: bool = False,
        resolution: int = 512,
        max_sequence_length: int = 77,
        dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ) -> "SD3Policy":
        """Load ``base`` (a local ``StableDiffusion3Pipeline`` folder or a Hub id) as a policy.

        Components the pipeline's ``model_index.json`` lists as absent (e.g. ``text_encoder_3``) are
        passed as ``None``; ``kwargs`` go to :class:`SD3Policy` (e.g. ``negative_prompt``) or, for
        component names, to ``StableDiffusion3Pipeline.from_pretrained`` (``text_encoder_3=None``
        drops T5). ``dtype=None`` follows accelerate's mixed precision (bf16/fp16 frozen weights when
        training in mixed precision, float32 otherwise).

        Raises:
            ConfigError: naming ``rl.base`` when the pipeline cannot be loaded.
        """
        from diffusers import StableDiffusion3Pipeline

        from ..pipelines.loading import check_pipeline_folder, is_local_reference

        dtype = _resolve_dtype(dtype)
        components = {k: kwargs.pop(k) for k in list(kwargs) if k in (*_TEXT_ENCODERS, *_TOKENIZERS, "transformer", "vae", "scheduler")}
        try:
            if is_local_reference(base):  # "no such folder" / the run folder's pipeline/, not a Hub-id error
                check_pipeline_folder(base)
            index = StableDiffusion3Pipeline.load_config(base)
            for name in (*_TEXT_ENCODERS, *_TOKENIZERS, "image_encoder", "feature_extractor"):
                entry = index.get(name)
                if name not in components and (entry is None or (isinstance(entry, (list, tuple)) and entry[0] is None)):
                    components[name] = None
            with warnings.catch_warnings():  # diffusers >= 0.40 renames torch_dtype to dtype; >= 0.35 takes both
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                # the VAE loads in float32 (latents decode for rewards in float32); the rest in `dtype`
                pipe = StableDiffusion3Pipeline.from_pretrained(base, torch_dtype={"default": dtype, "vae": torch.float32}, **components)
        except Exception as e:  # a loader boundary: missing folder, offline Hub id, wrong pipeline kind, ...
            raise ConfigError(f"rl.base: cannot load a StableDiffusion3Pipeline from {base!r}: {type(e).__name__}: {e}") from None
        return cls(
            transformer=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
            text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2, text_encoder_3=pipe.text_encoder_3,
            tokenizer_3=pipe.tokenizer_3, scheduler=pipe.scheduler, lora=lora, reference=reference,
            resolution=resolution, max_sequence_length=max_sequence_length, dtype=dtype, **kwargs,
        )

    def _frozen_modules(self) -> list[nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3, self.vae) if m is not None]

    def __deepcopy__(self, memo: dict) -> "SD3Policy":
        """Copies (e.g. the trainer's EMA copy) share the frozen text encoders and VAE: they never change."""
        for m in self._frozen_modules():
            memo[id(m)] = m
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = None if key == "_pipe" else copy.deepcopy(value, memo)
        return new

    def train(self, mode: bool = True) -> "SD3Policy":
        """Train mode for the transformer only; the frozen encoders and VAE stay in eval mode."""
        super().train(mode)
        for m in self._frozen_modules():
            m.eval()
        return self

    # ----------------------------------------------------------------- policy contract
    @property
    def network(self) -> nn.Module:
        return self.transformer

    @property
    def sample_shape(self) -> tuple[int, ...]:
        side = self.resolution // self.vae_scale_factor
        return (int(self.transformer.config.in_channels), side, side)

    @property
    def path(self) -> AffinePath:
        return LinearPath()

    def _velocity(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], role: str) -> Tensor:
        """``u = -transformer(x, timestep = (1 - t) * 1000, prompt embeddings)`` of ``role``, shape of ``x``."""
        if not torch.is_tensor(t) or t.ndim == 0:
            t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        timestep = t_to_timestep(t.float(), self.num_train_timesteps)
        dtype = self.compute_dtype
        with self._role(role) as net:
            out = net(
                hidden_states=x.to(dtype),
                timestep=timestep,
                encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
                return_dict=False,
            )[0]
        return diffusers_to_velocity(out).to(x.dtype)

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

    def field(self, cond: dict[str, Tensor], role: str = "current", guidance_scale: float = 1.0, detach_unconditional: bool = False):
        """Sampling field of ``role``; ``guidance_scale != 1`` is classifier-free guidance against the
        negative prompt: ``u = u_neg + w (u_cond - u_neg)``, both branches in one batched forward
        (``detach_unconditional``: no gradient through ``u_neg``, see :func:`~flowlab.flow.guidance.combine_guidance`)."""
        if guidance_scale == 1.0:
            return super().field(cond, role)
        n = cond["prompt_embeds"].shape[0]
        neg = self.negative_embeddings(cond["prompt_embeds"].device, cond["prompt_embeds"].dtype)
        both = {k: torch.cat([cond[k], neg[k].expand(n, *neg[k].shape[1:])]) for k in ("prompt_embeds", "pooled_prompt_embeds")}

        def guided(x: Tensor, t: Tensor) -> Tensor:
            u_cond, u_neg = self.velocity(torch.cat([x, x]), torch.cat([t, t]), both, role).chunk(2)
            return combine_guidance(u_cond, u_neg, guidance_scale, detach_unconditional)

        return guided

    def negative_embeddings(self, device, dtype) -> dict[str, Tensor]:
        """The negative prompt's embeddings ``(1, L, D)`` / ``(1, P)``, computed once per device and dtype."""
        key = (str(device), dtype)
        if key not in self._negative:
            emb = self.encode([self.negative_prompt])
            self._negative[key] = {k: v.to(device=device, dtype=dtype) for k, v in emb.items()}
        return self._negative[key]

    def pipeline(self):
        """A ``StableDiffusion3Pipeline`` around this policy's components (the same objects, not copies)."""
        if self._pipe is None:
            from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

            self._pipe = StableDiffusion3Pipeline(
                transformer=self.transformer, scheduler=self.scheduler or FlowMatchEulerDiscreteScheduler(), vae=self.vae,
                text_encoder=self.text_encoder, tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2,
                tokenizer_2=self.tokenizer_2, text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3,
            )
        return self._pipe

    @torch.no_grad()
    def encode(self, conditions: Sequence[str]) -> dict[str, Tensor]:
        """Prompts -> ``{"prompt_embeds": (B, L, D), "pooled_prompt_embeds": (B, P)}`` through the
        pipeline's ``encode_prompt`` (each distinct prompt encoded once), on the transformer's device.
        With the embedding cache on (:meth:`cache_prompt_embeddings`), cached prompts are looked up
        and new ones are encoded and added."""
        prompts = ["" if c is None else str(c) for c in conditions]
        unique = list(dict.fromkeys(prompts))
        device = next(self.transformer.parameters()).device
        if self._embedding_cache is None:
            pe, pooled = self._encode_unique(unique)
        else:
            missing = [p for p in unique if p not in self._embedding_cache]
            if missing:
                self._fill_cache(missing)
            pe = torch.cat([self._embedding_cache[p]["prompt_embeds"] for p in unique])
            pooled = torch.cat([self._embedding_cache[p]["pooled_prompt_embeds"] for p in unique])
        index = torch.tensor([unique.index(p) for p in prompts], device=pe.device)
        return {"prompt_embeds": pe.index_select(0, index).to(device), "pooled_prompt_embeds": pooled.index_select(0, index).to(device)}

    def _encode_unique(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """``encode_prompt`` of distinct ``prompts`` on the text encoders' device."""
        device = next(self.text_encoder.parameters()).device
        pe, _, pooled, _ = self.pipeline().encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return pe, pooled

    def _fill_cache(self, prompts: list[str], batch_size: int = 64) -> None:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            pe, pooled = self._encode_unique(chunk)
            for j, p in enumerate(chunk):
                self._embedding_cache[p] = {"prompt_embeds": pe[j : j + 1].cpu(), "pooled_prompt_embeds": pooled[j : j + 1].cpu()}

    @torch.no_grad()
    def cache_prompt_embeddings(self, prompts: Sequence[str], offload: bool = True, batch_size: int = 64) -> int:
        """Encode a fixed prompt set (and the negative prompt) once, keep the embeddings in CPU memory,
        and with ``offload`` move the text encoders off the accelerator (to the CPU): later
        :meth:`encode` calls of these prompts never run them. Returns the cache size in bytes.

        A prompt outside the set is still encoded (by the offloaded encoders, on the CPU)."""
        if self._embedding_cache is None:
            self._embedding_cache = {}
        wanted = list(dict.fromkeys([self.negative_prompt, *["" if p is None else str(p) for p in prompts]]))
        self._fill_cache([p for p in wanted if p not in self._embedding_cache], batch_size)
        if offload:
            for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3):
                if m is not None:
                    m.to("cpu")
        return sum(v.numel() * v.element_size() for e in self._embedding_cache.values() for v in e.values())

    @torch.no_grad()
    def decode(self, x: Tensor, batch_size: int = 16) -> Tensor:
        """Latents ``(B, C, h, w)`` -> images ``(B, 3, H, W)`` in [0, 1], as the SD3 pipeline decodes
        (``vae.decode(x / scaling_factor + shift_factor)``), ``batch_size`` latents at a time, in
        float32 (the VAE is kept in float32 and autocast is off here), as the references decode for
        rewards (NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py`` line 412)."""
        cfg = self.vae.config
        shift = cfg.shift_factor or 0.0
        out = []
        with torch.autocast(device_type=x.device.type, enabled=False):
            for i in range(0, x.shape[0], batch_size):
                z = x[i : i + batch_size].float() / cfg.scaling_factor + shift
                img = self.vae.decode(z, return_dict=False)[0]
                out.append(((img.float() + 1) / 2).clamp(0, 1))
        return torch.cat(out)

    def save(self, directory: str) -> None:
        """Write the LoRA in diffusers' layout (``load_lora_weights(directory)``), or the fully
        fine-tuned transformer to ``directory/transformer``; plus ``flowlab_sd3.json`` (settings)."""
        os.makedirs(directory, exist_ok=True)
        info: dict[str, Any] = {"resolution": self.resolution, "max_sequence_length": self.max_sequence_length}
        if self.lora is not None:
            from diffusers import StableDiffusion3Pipeline
            from peft.utils import get_peft_model_state_dict

            lora_state = get_peft_model_state_dict(self.transformer, adapter_name="default")
            state = {k: v.detach().float().cpu().contiguous() for k, v in lora_state.items()}
            config = self.transformer.peft_config["default"].to_dict()
            StableDiffusion3Pipeline.save_lora_weights(directory, transformer_lora_layers=state, transformer_lora_adapter_metadata=config)
            info["lora"] = {"rank": self.lora.rank, "alpha": self.lora.alpha, "target_modules": self.lora.target_modules}
        else:
            self.transformer.save_pretrained(os.path.join(directory, "transformer"))
        with open(os.path.join(directory, "flowlab_sd3.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)


def _cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module.to(dtype)`` unless its floating-point weights already have that dtype."""
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        module.to(dtype)
    return module


_FROZEN_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoder_3.", "vae.")


def _drop_frozen_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """``state_dict`` hook: leave the frozen text encoders and VAE out of the policy's state."""
    for key in [k for k in state_dict if k.startswith(tuple(prefix + p for p in _FROZEN_PREFIXES))]:
        del state_dict[key]


def _fill_frozen_state(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook: frozen weights absent from a checkpoint keep their current values."""
    for name, sub in (("text_encoder", module.text_encoder), ("text_encoder_2", module.text_encoder_2),
                      ("text_encoder_3", module.text_encoder_3), ("vae", module.vae)):
        if sub is None:
            continue
        for key, value in sub.state_dict(keep_vars=True).items():
            state_dict.setdefault(f"{prefix}{name}.{key}", value.detach())


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``None``: the dtype of accelerate's mixed precision if a state exists (bf16 / fp16), else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "no": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(names)}")
        return names[dtype]
    try:
        from accelerate.state import AcceleratorState

        state = AcceleratorState._shared_state
        mp = str(state.get("_mixed_precision") or "no")
    except Exception:  # pragma: no cover - accelerate internals moved
        mp = "no"
    return names.get(mp, torch.float32)
