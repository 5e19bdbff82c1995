"""The adapter protocol: what flowlab needs from one diffusers model family.

An adapter wraps a family's components (the denoising ``network``, its text encoders, its VAE)
and answers, in flowlab's conventions (``t = 0`` noise, ``t = 1`` data):

* :meth:`FamilyAdapter.encode`: prompts -> a dict of conditioning tensors batched along dim 0,
  each distinct prompt encoded once and cached;
* :meth:`FamilyAdapter.predict`: the network's raw prediction at ``(x, t)`` (``prediction_type``
  says what it is: ``velocity``, ``epsilon``, ``v_prediction``, ``x1``), with the family's
  guidance: classifier-free guidance against the negative prompt, or FLUX's guidance embedding;
* :meth:`FamilyAdapter.velocity`: the same, converted to flowlab's velocity on :attr:`path`
  (through :func:`flowlab.flow.parameterization.convert`; every time/sign convention goes through
  :mod:`flowlab.flow.conventions` or the path's own timestep map);
* :meth:`FamilyAdapter.decode`: latents ``(B, *sample_shape)`` -> images ``(B, 3, H, W)`` in [0, 1];
* :meth:`FamilyAdapter.save_lora`: a peft adapter of the network in the family's diffusers layout,
  so ``<FamilyPipeline>.from_pretrained(base).load_lora_weights(directory)`` restores it.

Latents are always handled *unpacked* ``(B, C, h, w)`` (FLUX packs them into patch tokens inside
:meth:`predict` only): the ODE, its solvers, likelihoods and conservativity diagnostics see the
same tensor layout for every family.

The network is a parameter of :meth:`predict` (default: the adapter's own), so an RL policy can
evaluate its frozen ``old`` / ``ref`` copies through the same adapter.
"""
from __future__ import annotations

import warnings
from abc import abstractmethod
from collections import OrderedDict
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..flow.parameterization import convert
from ..flow.paths import AffinePath

__all__ = ["FamilyAdapter", "JOINT_ATTENTION_LORA_TARGETS", "broadcast_conditioning", "resolve_dtype", "cast_module", "load_family_pipeline", "lora_state_and_config"]

Conditioning = dict[str, Tensor]

#: LoRA targets of the MM-DiT transformers (SD3, FLUX.1): the image and text projections of the joint attention,
#: as the public DiffusionNFT / FlowGRPO code adapts SD3.
JOINT_ATTENTION_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"]


class FamilyAdapter(nn.Module):
    """Base class of the per-family adapters (see the module docstring).

    Subclasses set :attr:`pipeline_class` (the diffusers pipeline of the family), :attr:`network_name`
    (its denoiser component: ``transformer`` or ``unet``), :attr:`default_lora_targets` and
    :attr:`prediction_type`, hold the components as attributes named as in the pipeline, and implement
    :meth:`_encode_unique`, :meth:`_forward`, :meth:`decode`, :attr:`sample_shape` and :attr:`path`.

    Args:
        negative_prompt: the unconditional prompt of classifier-free guidance.
        cache_size: prompt embeddings kept (least recently used dropped first); FLUX's T5 embeddings
            are ``512 x 4096`` values per prompt, so a prompt list of thousands is not kept whole.
    """

    pipeline_class: type
    network_name: str
    default_lora_targets: list[str]
    prediction_type: str = "velocity"
    frozen_names: tuple[str, ...] = ()

    def __init__(self, negative_prompt: str = "", cache_size: int = 256):
        super().__init__()
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.negative_prompt = negative_prompt
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[tuple[str, str], Conditioning] = OrderedDict()  # (device, prompt) -> batch-1 conditioning

    # ----------------------------------------------------------------- components
    @property
    def network(self) -> nn.Module:
        """The denoising network (``transformer`` / ``unet``), the one a LoRA or fine-tuning trains."""
        return getattr(self, self.network_name)

    def frozen_modules(self) -> dict[str, nn.Module]:
        """The frozen components (text encoders, VAE) by attribute name; absent ones are left out."""
        return {n: m for n in self.frozen_names if (m := getattr(self, n, None)) is not None}

    def train(self, mode: bool = True) -> "FamilyAdapter":
        """Train mode for the network only; the frozen encoders and VAE stay in eval mode."""
        super().train(mode)
        for m in self.frozen_modules().values():
            m.eval()
        return self

    @abstractmethod
    def pipeline(self, network: nn.Module | None = None):
        """The family's diffusers pipeline around these components (the same objects, not copies)."""

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    # ----------------------------------------------------------------- conditioning
    @abstractmethod
    def _encode_unique(self, prompts: list[str]) -> Conditioning:
        """Encode distinct prompts with the pipeline's own ``encode_prompt``; tensors batched along dim 0."""

    @torch.no_grad()
    def encode(self, prompts: Sequence[str | None]) -> Conditioning:
        """Prompts (``None`` = the empty prompt) -> conditioning dict; a prompt in the cache (the last
        ``cache_size`` used) is not encoded again.

        The cache keeps embeddings on the device they were computed on; a model moved to another
        device re-encodes (the key includes the device).
        """
        if isinstance(prompts, str):
            raise TypeError(f"prompts must be a list of strings, got the string {prompts!r}")
        texts = ["" if p is None else str(p) for p in prompts]
        if not texts:
            raise ValueError("prompts: give at least one prompt")
        device = str(self.device)
        unique = list(dict.fromkeys(texts))
        missing = [p for p in unique if (device, p) not in self._cache]
        found = {p: self._cache[(device, p)] for p in unique if (device, p) in self._cache}
        if missing:
            enc = self._encode_unique(missing)
            found.update({p: {k: v[i : i + 1] for k, v in enc.items()} for i, p in enumerate(missing)})
        for p in unique:  # most recently used last; the oldest beyond cache_size are dropped
            self._cache[(device, p)] = found[p]
            self._cache.move_to_end((device, p))
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        rows = [found[p] for p in texts]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def negative_embeddings(self) -> Conditioning:
        """The negative prompt's conditioning, batch 1 (cached like every prompt)."""
        return self.encode([self.negative_prompt])

    def clear_cache(self) -> None:
        """Forget every cached prompt embedding (e.g. after fine-tuning a text encoder)."""
        self._cache.clear()

    # ----------------------------------------------------------------- the field
    @property
    @abstractmethod
    def path(self) -> AffinePath:
        """The affine path the network was trained on, in flowlab time."""

    @property
    def t_range(self) -> tuple[float, float]:
        """Times the network is evaluated at (inputs are clamped to this range)."""
        return (0.0, 1.0)

    @property
    @abstractmethod
    def sample_shape(self) -> tuple[int, ...]:
        """Unpacked latent shape ``(C, h, w)`` of one sample."""

    @property
    def guidance_default(self) -> float:
        """The guidance value :meth:`predict` uses when none is given (1.0: no guidance)."""
        return 1.0

    @property
    def guidance_embedded(self) -> bool:
        """``True`` for guidance-distilled networks (the guidance scale is an input embedding, one
        evaluation); ``False`` for classifier-free guidance against the negative prompt (two)."""
        return False

    @abstractmethod
    def _forward(self, network: nn.Module, x: Tensor, t: Tensor, cond: Conditioning, guidance: float, detach_unconditional: bool = False) -> Tensor:
        """One network evaluation at flowlab times ``t`` ``(B,)`` (already clamped), raw prediction.
        ``detach_unconditional``: no gradient through the unconditional branch of classifier-free guidance
        (FlowGRPO's training forward); meaningless for a guidance embedding, which has no such branch."""

    def predict(
        self, x: Tensor, t: Tensor | float, cond: Conditioning, guidance_scale: float | None = None, network: nn.Module | None = None,
        detach_unconditional: bool = False,
    ) -> Tensor:
        """The raw prediction (:attr:`prediction_type`) at ``x`` ``(B, *sample_shape)``, flowlab times ``t``.

        ``cond`` rows are matched to samples by :func:`broadcast_conditioning` (one prompt, one per
        sample, or a tiled batch). ``guidance_scale`` ``None`` is the
        family's default (:attr:`guidance_default`).
        """
        t = self.clamp_t(t, x)
        cond = broadcast_conditioning(cond, x.shape[0])
        return self._forward(network if network is not None else self.network, x, t, cond,
                             self.guidance_default if guidance_scale is None else float(guidance_scale), detach_unconditional)

    def velocity(
        self, x: Tensor, t: Tensor | float, cond: Conditioning, guidance_scale: float | None = None, network: nn.Module | None = None,
        detach_unconditional: bool = False,
    ) -> Tensor:
        """flowlab velocity ``u(x, t)`` (``t = 0`` noise, ``t = 1`` data) of the guided prediction, shape of ``x``."""
        tc = self.clamp_t(t, x)
        pred = self.predict(x, tc, cond, guidance_scale, network, detach_unconditional)
        return convert(self.path, pred, x, tc, self.prediction_type, "velocity").to(x.dtype)

    def clamp_t(self, t: Tensor | float, x: Tensor) -> Tensor:
        if not torch.is_tensor(t) or t.ndim == 0:
            t = torch.full((x.shape[0],), float(t), device=x.device)
        return t.to(x.device).float().clamp(*self.t_range)

    # ----------------------------------------------------------------- images and LoRA
    @abstractmethod
    def decode(self, x: Tensor, batch_size: int = 16) -> Tensor:
        """Latents ``(B, *sample_shape)`` -> images ``(B, 3, H, W)`` in [0, 1], as the family's pipeline decodes."""

    def _decode_vae(self, z: Tensor, batch_size: int) -> Tensor:
        """``vae.decode`` of VAE-space latents ``z``, ``batch_size`` at a time, ``[-1, 1] -> [0, 1]``."""
        vae_dtype = next(self.vae.parameters()).dtype
        out = []
        with torch.no_grad():
            for i in range(0, z.shape[0], batch_size):
                img = self.vae.decode(z[i : i + batch_size].to(vae_dtype), return_dict=False)[0]
                out.append(((img.float() + 1) / 2).clamp(0, 1))
        return torch.cat(out)

    def save_lora(self, directory: str, network: nn.Module | None = None, adapter_name: str = "default") -> None:
        """Write the peft adapter ``adapter_name`` of ``network`` in the family's diffusers LoRA layout
        (``pytorch_lora_weights.safetensors`` + adapter metadata): ``load_lora_weights(directory)`` restores it."""
        state, config = lora_state_and_config(network if network is not None else self.network, adapter_name)
        self.pipeline_class.save_lora_weights(
            directory, **{f"{self.network_name}_lora_layers": state, f"{self.network_name}_lora_adapter_metadata": config}
        )

    def save_network(self, directory: str, network: nn.Module | None = None) -> None:
        """Write the (fully fine-tuned) network to ``directory/<network_name>`` (``from_pretrained`` layout)."""
        import os

        (network if network is not None else self.network).save_pretrained(os.path.join(directory, self.network_name))


def broadcast_conditioning(cond: Conditioning, batch: int) -> Conditioning:
    """Conditioning batched like ``x``: sample ``i`` takes row ``i % n`` of an ``n``-row conditioning.

    So ``n = batch`` is used as is, one row is expanded to every sample, and a batch tiled ``k`` times
    (``x.repeat(k, ...)``, as the conservativity diagnostics tile their probe points) keeps each
    sample's prompt. A batch that is not a multiple of ``n`` is an error.
    """
    out = {}
    for k, v in cond.items():
        n = v.shape[0]
        if n == batch:
            out[k] = v
        elif n == 1:
            out[k] = v.expand(batch, *v.shape[1:])
        elif n and batch % n == 0:
            out[k] = v.repeat(batch // n, *([1] * (v.ndim - 1)))
        else:
            raise ValueError(f"conditioning {k!r} has {n} rows but x has batch {batch}; the batch must be a multiple of the prompts")
    return out


def lora_state_and_config(network: nn.Module, adapter_name: str = "default") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The float32 CPU state dict of peft adapter ``adapter_name`` of ``network`` and its config dict."""
    from peft.utils import get_peft_model_state_dict

    if adapter_name not in getattr(network, "peft_config", {}):
        raise ValueError(f"{type(network).__name__} has no LoRA adapter {adapter_name!r} to save")
    state = get_peft_model_state_dict(network, adapter_name=adapter_name)
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    return state, network.peft_config[adapter_name].to_dict()


def cast_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module.to(dtype)`` unless its floating-point weights already have that dtype."""
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        module.to(dtype)
    return module


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "no": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``None``: the dtype of accelerate's mixed precision if a state exists (bf16 / fp16), else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    try:
        from accelerate.state import AcceleratorState

        mp = str(AcceleratorState._shared_state.get("_mixed_precision") or "no")
    except Exception:  # pragma: no cover - accelerate internals moved
        mp = "no"
    return _DTYPES.get(mp, torch.float32)


def load_family_pipeline(pipeline_class: type, base: str, dtype: torch.dtype, key: str = "base", **components: Any):
    """``pipeline_class.from_pretrained(base)`` with components the folder lists as absent passed as ``None``.

    Raises:
        ConfigError: naming ``key`` (the config key or argument that gave ``base``) when it cannot be loaded.
    """
    from ..pipelines.loading import check_pipeline_folder, is_local_reference

    try:
        if is_local_reference(base):  # "no such folder" / the run folder's pipeline/, not a Hub-id error
            check_pipeline_folder(base)
        index = pipeline_class.load_config(base)
        for name, entry in index.items():
            if name.startswith("_") or name in components:
                continue
            if entry is None or (isinstance(entry, (list, tuple)) and entry[0] is None):
                components[name] = None
        with warnings.catch_warnings():  # diffusers >= 0.40 renames torch_dtype to dtype; >= 0.35 takes both
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            return pipeline_class.from_pretrained(base, torch_dtype=dtype, **components)
    except Exception as e:  # a loader boundary: missing folder, offline Hub id, wrong pipeline kind, ...
        raise ConfigError(f"{key}: cannot load a {pipeline_class.__name__} from {base!r}: {type(e).__name__}: {e}") from None
