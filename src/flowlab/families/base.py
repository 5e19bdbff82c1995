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

Copies share what never changes. ``copy.deepcopy(adapter)`` (and so the deep copy of an RL policy
holding it: the trainer's EMA copy) copies the network only; the frozen text encoders and VAE
(:attr:`FamilyAdapter.frozen_names`), the tokenizers and the prompt-embedding caches (functions of
those frozen encoders) are the same objects in the copy. This is the one deep-copy rule of every family.
"""
from __future__ import annotations

import copy
import warnings
from abc import abstractmethod
from collections import OrderedDict
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..flow.guidance import combine_guidance
from ..flow.parameterization import convert
from ..flow.paths import AffinePath
from ..flow.solvers import time_grid

__all__ = ["FamilyAdapter", "JOINT_ATTENTION_LORA_TARGETS", "broadcast_conditioning", "resolve_dtype", "cast_module", "load_family_pipeline", "lora_state_and_config"]

Conditioning = dict[str, Tensor]

#: LoRA targets of the MM-DiT transformers (SD3, FLUX.1): the image and text projections of the joint attention,
#: as the public DiffusionNFT / FlowGRPO code adapts SD3.
JOINT_ATTENTION_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"]


class FamilyAdapter(nn.Module):
    """Base class of the per-family adapters (see the module docstring).

    Subclasses set :attr:`pipeline_class` (the diffusers pipeline of the family), :attr:`network_name`
    (its denoiser component: ``transformer`` or ``unet``), :attr:`default_lora_targets` and
    :attr:`prediction_type`, hold the components as attributes named as in the pipeline (and ``resolution``,
    ``vae_scale_factor``), and implement :meth:`_encode_unique`, :meth:`_forward`, :meth:`decode` and :attr:`path`.

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
    tokenizer_names: tuple[str, ...] = ("tokenizer", "tokenizer_2", "tokenizer_3")

    def __init__(self, negative_prompt: str = "", cache_size: int = 256):
        super().__init__()
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.negative_prompt = negative_prompt
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[tuple[str, str], Conditioning] = OrderedDict()  # (device, prompt) -> batch-1 conditioning
        self._pinned: dict[str, Conditioning] = {}  # prompt -> batch-1 CPU conditioning (cache_prompt_embeddings)

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

    def shared_components(self) -> list[Any]:
        """What a deep copy shares instead of copying: the frozen modules, the tokenizers and the
        prompt-embedding caches (see the module docstring)."""
        tokenizers = [tok for n in self.tokenizer_names if (tok := getattr(self, n, None)) is not None]
        return [*self.frozen_modules().values(), *tokenizers, self._cache, self._pinned]

    def __deepcopy__(self, memo: dict) -> "FamilyAdapter":
        """A copy whose network is copied and whose :meth:`shared_components` are the same objects."""
        for obj in self.shared_components():
            memo[id(obj)] = obj
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    @abstractmethod
    def pipeline(self, network: nn.Module | None = None):
        """The family's diffusers pipeline around these components (the same objects, not copies)."""

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def text_device(self) -> torch.device:
        """Where the text encoders are (the CPU after :meth:`cache_prompt_embeddings` offloaded them)."""
        for n, m in self.frozen_modules().items():
            if n.startswith("text_encoder"):
                return next(m.parameters()).device
        return self.device

    # ----------------------------------------------------------------- conditioning
    @abstractmethod
    def _encode_unique(self, prompts: list[str]) -> Conditioning:
        """Encode distinct prompts with the pipeline's own ``encode_prompt``; tensors batched along dim 0."""

    @torch.no_grad()
    def encode(self, prompts: Sequence[str | None]) -> Conditioning:
        """Prompts (``None`` = the empty prompt) -> conditioning dict on the network's device; a prompt in
        the cache (the last ``cache_size`` used, or the set given to :meth:`cache_prompt_embeddings`) is
        not encoded again.

        The cache keeps embeddings on the device they were computed on; a model moved to another
        device re-encodes (the key includes the device). Prompts of the pinned set are kept on the CPU
        and moved to the device per call.
        """
        if isinstance(prompts, str):
            raise TypeError(f"prompts must be a list of strings, got the string {prompts!r}")
        texts = ["" if p is None else str(p) for p in prompts]
        if not texts:
            raise ValueError("prompts: give at least one prompt")
        device = self.device
        unique = list(dict.fromkeys(texts))
        found = {p: self._cache[(str(device), p)] for p in unique if p not in self._pinned and (str(device), p) in self._cache}
        missing = [p for p in unique if p not in self._pinned and p not in found]
        if missing and self._pinned:
            self._pin(missing)  # with a pinned set, new prompts join it (on the CPU)
        elif missing:
            found.update(self._encode_rows(missing, device))
        for p in unique:
            if p in self._pinned:
                found[p] = {k: v.to(device) for k, v in self._pinned[p].items()}
            else:  # most recently used last; the oldest beyond cache_size are dropped
                self._cache[(str(device), p)] = found[p]
                self._cache.move_to_end((str(device), p))
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        rows = [found[p] for p in texts]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def _encode_rows(self, prompts: list[str], device: torch.device, batch_size: int = 64) -> dict[str, Conditioning]:
        """``prompt -> batch-1 conditioning`` on ``device``, encoded ``batch_size`` distinct prompts at a time."""
        out: dict[str, Conditioning] = {}
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            enc = self._encode_unique(chunk)
            out.update({p: {k: v[j : j + 1].to(device) for k, v in enc.items()} for j, p in enumerate(chunk)})
        return out

    def _pin(self, prompts: list[str], batch_size: int = 64) -> None:
        self._pinned.update(self._encode_rows(prompts, torch.device("cpu"), batch_size))

    @torch.no_grad()
    def cache_prompt_embeddings(self, prompts: Sequence[str | None], offload: bool = True, batch_size: int = 64) -> int:
        """Encode a fixed prompt set (and the negative prompt) once, keep the embeddings in CPU memory,
        and with ``offload`` move the text encoders off the accelerator (to the CPU): later :meth:`encode`
        calls of these prompts never run them. Returns the pinned embeddings' size in bytes.

        A prompt outside the set is still encoded (by the offloaded encoders, on the CPU) and joins the set.
        """
        wanted = list(dict.fromkeys([self.negative_prompt, *["" if p is None else str(p) for p in prompts]]))
        self._pin([p for p in wanted if p not in self._pinned], batch_size)
        if offload:
            for n, m in self.frozen_modules().items():
                if n.startswith("text_encoder"):
                    m.to("cpu")
        return sum(v.numel() * v.element_size() for e in self._pinned.values() for v in e.values())

    def negative_embeddings(self) -> Conditioning:
        """The negative prompt's conditioning, batch 1 (cached like every prompt)."""
        return self.encode([self.negative_prompt])

    def clear_cache(self) -> None:
        """Forget every cached prompt embedding, pinned ones included (e.g. after fine-tuning a text encoder)."""
        self._cache.clear()
        self._pinned.clear()

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
    def sample_shape(self) -> tuple[int, ...]:
        """Unpacked latent shape ``(C, h, w)`` of one sample: the network's input channels at
        ``resolution / vae_scale_factor`` (a family that packs or pads latents overrides this)."""
        side = self.resolution // self.vae_scale_factor
        return (int(self.network.config.in_channels), side, side)

    def check_latents(self, x: Tensor) -> None:
        """Raise a ``ValueError`` unless ``x`` is ``(B, *sample_shape)`` (families whose network needs exactly that size)."""
        if tuple(x.shape[1:]) != tuple(self.sample_shape):
            raise ValueError(f"{type(self).__name__}: latents must have shape (B, {', '.join(map(str, self.sample_shape))}), got {tuple(x.shape)}")

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

    def _classifier_free_guidance(
        self, evaluate, x: Tensor, t: Tensor, cond: Conditioning, guidance: float, detach_unconditional: bool = False
    ) -> Tensor:
        """``evaluate(x, t, cond)`` guided against the negative prompt: ``out_neg + w (out_cond - out_neg)``
        (:func:`~flowlab.flow.guidance.combine_guidance`), both branches in one batched evaluation;
        ``guidance == 1`` is the conditional evaluation alone. The combination is affine in the output, so
        it is the same guided field whichever parameterisation ``evaluate`` returns."""
        if guidance == 1.0:
            return evaluate(x, t, cond)
        neg = self.negative_embeddings()
        both = {k: torch.cat([v, neg[k].to(device=v.device, dtype=v.dtype).expand(x.shape[0], *neg[k].shape[1:])]) for k, v in cond.items()}
        out_cond, out_neg = evaluate(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return combine_guidance(out_cond, out_neg, guidance, detach_unconditional)

    def time_grid(self, num_steps: int, shift: float = 1.0, device=None) -> Tensor:
        """The sampler's ``num_steps + 1`` flowlab times from noise to data, float64: uniform then shifted
        (:func:`flowlab.flow.solvers.time_grid`); a family whose pipeline samples on its scheduler's own
        grid overrides this."""
        return time_grid(num_steps, shift=shift, device=device)

    # ----------------------------------------------------------------- images and LoRA
    @abstractmethod
    def decode(self, x: Tensor, batch_size: int = 16) -> Tensor:
        """Latents ``(B, *sample_shape)`` -> images ``(B, 3, H, W)`` in [0, 1], as the family's pipeline decodes."""

    def _decode_vae(self, z: Tensor, batch_size: int) -> Tensor:
        """``vae.decode`` of VAE-space latents ``z``, ``batch_size`` at a time, ``[-1, 1] -> [0, 1]``, in the
        VAE's own dtype (autocast off: a float32 VAE decodes in float32 under a bf16 training autocast)."""
        vae_dtype = next(self.vae.parameters()).dtype
        out = []
        with torch.no_grad(), torch.autocast(device_type=z.device.type, enabled=False):
            for i in range(0, z.shape[0], batch_size):
                img = self.vae.decode(z[i : i + batch_size].to(vae_dtype), return_dict=False)[0]
                out.append(((img.float() + 1) / 2).clamp(0, 1))
        return torch.cat(out)

    def settings(self) -> dict[str, Any]:
        """What a trained artefact records about the adapter (``flowlab_*.json`` next to the weights)."""
        return {"resolution": self.resolution, "guidance_scale": self.guidance_default}

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


def load_family_pipeline(pipeline_class: type, base: str, dtype: torch.dtype | dict[str, torch.dtype], key: str = "base",
                         **components: Any):
    """``pipeline_class.from_pretrained(base)`` with components the folder lists as absent passed as ``None``.

    ``dtype`` is one dtype, or diffusers' per-component dict (``{"default": torch.bfloat16, "vae": torch.float32}``).

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
