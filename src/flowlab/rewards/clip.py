"""CLIP-based rewards through transformers: CLIP score, PickScore and the LAION aesthetic
predictor.

All three load a ``transformers.CLIPModel`` with its tokenizer and image processor from a
local folder or a Hub id (``trust_remote_code`` is never set; offline use follows
``HF_HUB_OFFLINE``, and local folders always work offline). Images are quantised to uint8
PIL images and preprocessed by the model's own image processor (resize, centre crop,
normalise), as the public code does; grey images are repeated to RGB.

Scales (``cos`` is the cosine similarity of the L2-normalised projected image and text
embeddings, ``s = exp(logit_scale)`` the model's learned temperature, 100 for the released
CLIP models):

* ``clip_score = s · cos / 100``: the model's image-text logit divided by 100. For the
  released CLIP checkpoints ``s = 100``, so this is exactly the cosine similarity (the
  "CLIP score ÷ 100" of the public code), typically 0.15–0.40. It is not clipped at 0
  (unlike the CLIPScore metric), so a reward keeps its ranking below 0.
* ``pickscore = s · cos / 26``: PickScore's logit divided by 26 as in the public
  DiffusionNFT/FlowGRPO code, typically ~0.8–0.9 for SD-sized images.
* ``aesthetic``: the LAION improved aesthetic predictor, an MLP head on the L2-normalised
  CLIP image embedding; scores are on the predictor's 1–10 rating scale (typically 4–7).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowlab.rewards.base import OptionError, RewardFunction, register_reward
from flowlab.rewards.imaging import to_pil

__all__ = ["CLIPScoreReward", "PickScoreReward", "AestheticReward", "AestheticMLP", "load_aesthetic_head"]

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _resolve_source(source: str, field: str) -> str:
    """A local folder (expanded) or a Hub id; reject a path-looking string that does not exist,
    which transformers would otherwise report as a confusing Hub error."""
    expanded = os.path.expanduser(source)
    if os.path.isdir(expanded):
        return expanded
    looks_like_path = source.startswith(("/", ".", "~")) or source.count("/") > 1 or os.sep != "/" and os.sep in source
    if looks_like_path or os.path.isfile(expanded):
        raise OptionError(field, f"{source!r} is not a folder (expected a save_pretrained folder or a Hub id like 'openai/clip-vit-large-patch14')")
    return source


def _pooled(out: Any) -> Tensor:
    """``get_{image,text}_features`` returns a tensor (transformers 4) or an output whose
    ``pooler_output`` is the projected embedding (transformers 5)."""
    return out if isinstance(out, Tensor) else out.pooler_output


class _CLIPReward(RewardFunction):
    """Loads a ``CLIPModel`` + tokenizer + image processor and computes normalised embeddings."""

    needs_text = True

    def _load(self, model: str, processor: str | None, device: str, dtype: str, batch_size: int) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        if dtype not in _DTYPES:
            raise OptionError("dtype", f"must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        if batch_size < 1:
            raise OptionError("batch_size", f"must be >= 1, got {batch_size}")
        try:
            device_ = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise OptionError("device", f"not a torch device: {e}") from None
        model_src = _resolve_source(model, "model")
        proc_field = "processor" if processor is not None else "model"
        proc_src = _resolve_source(processor, "processor") if processor is not None else model_src
        try:
            clip = CLIPModel.from_pretrained(model_src)
        except Exception as e:  # OSError (missing files / offline), ValueError (not a CLIP config), ...
            raise OptionError("model", f"cannot load a CLIPModel from {model!r}: {type(e).__name__}: {e}") from e
        try:
            image_processor = AutoImageProcessor.from_pretrained(proc_src)
        except Exception as e:
            raise OptionError(proc_field, f"cannot load an image processor from {proc_src!r}: {type(e).__name__}: {e}") from e
        tokenizer = None
        if self.needs_text:
            try:
                tokenizer = AutoTokenizer.from_pretrained(proc_src)
            except Exception as e:
                raise OptionError(proc_field, f"cannot load a tokenizer from {proc_src!r}: {type(e).__name__}: {e}") from e
            if len(tokenizer) <= 2:
                raise OptionError(
                    proc_field,
                    f"the tokenizer loaded from {proc_src!r} has only {len(tokenizer)} tokens: its vocabulary files are missing "
                    "(transformers returns an empty tokenizer instead of failing)",
                )
        self.model = clip.eval().to(device_, _DTYPES[dtype])
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = device_
        self.batch_size = batch_size
        self.source = model
        max_pos = getattr(clip.config.text_config, "max_position_embeddings", 77)
        tok_max = getattr(tokenizer, "model_max_length", max_pos) if tokenizer is not None else max_pos
        self.max_text_length = int(min(max_pos, tok_max if isinstance(tok_max, int) and tok_max > 0 else max_pos))

    @torch.no_grad()
    def image_embeddings(self, images: Tensor) -> Tensor:
        """L2-normalised projected CLIP image embeddings ``(N, D)``, float32 on the model's device."""
        feats = []
        for i in range(0, images.shape[0], self.batch_size):
            pil = [im.convert("RGB") for im in to_pil(images[i : i + self.batch_size])]
            pixels = self.image_processor(images=pil, return_tensors="pt")["pixel_values"]
            pixels = pixels.to(self.device, next(self.model.parameters()).dtype)
            feats.append(_pooled(self.model.get_image_features(pixel_values=pixels)).float())
        f = torch.cat(feats)
        return f / f.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> Tensor:
        """L2-normalised projected CLIP text embeddings ``(N, D)``, float32; each distinct
        prompt is encoded once (RL batches repeat every prompt G times)."""
        unique = list(dict.fromkeys(prompts))
        feats = []
        for i in range(0, len(unique), self.batch_size):
            tok = self.tokenizer(
                unique[i : i + self.batch_size], padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt"
            )
            tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
            feats.append(_pooled(self.model.get_text_features(**tok)).float())
        f = torch.cat(feats)
        f = f / f.norm(dim=-1, keepdim=True)
        index = {p: j for j, p in enumerate(unique)}
        return f[torch.tensor([index[p] for p in prompts], device=f.device)]


class _CLIPSimilarityReward(_CLIPReward):
    """Image-text agreement: ``exp(logit_scale) · cos(image, prompt) / divisor``."""

    def _setup(self, model: str, processor: str | None, divisor: float, device: str, dtype: str, batch_size: int) -> None:
        """Check ``divisor`` and load the model."""
        if not divisor > 0:
            raise OptionError("divisor", f"must be positive, got {divisor}")
        self.divisor = divisor
        self._load(model, processor, device, dtype, batch_size)

    def score(self, images: Tensor, prompts: list[str] | None, metadata) -> Tensor:
        if prompts is None:
            raise ValueError(f"reward {self.name!r} scores image-text agreement and needs prompts (got None)")
        cos = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(dim=-1)
        return self.model.logit_scale.detach().float().exp() * cos / self.divisor


@register_reward("clip_score")
class CLIPScoreReward(_CLIPSimilarityReward):
    """``exp(logit_scale) · cos(image, prompt) / divisor`` with a CLIP model (see the module
    docstring; with the released CLIP models and the default divisor, the cosine itself).

    Args:
        model: a ``CLIPModel`` folder (``save_pretrained``) or Hub id.
        processor: where the tokenizer and image processor live (default: ``model``).
        divisor: the scale divisor (100).
        device: where the model runs.
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        batch_size: images per forward pass.
    """

    def __init__(
        self,
        *,
        model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        divisor: float = 100.0,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 32,
    ):
        super().__init__()
        self._setup(model, processor, divisor, device, dtype, batch_size)


@register_reward("pickscore")
class PickScoreReward(_CLIPSimilarityReward):
    """PickScore: ``exp(logit_scale) · cos(image, prompt) / 26`` (the public code's scaling).

    Args:
        model: the PickScore ``CLIPModel`` (folder or Hub id).
        processor: tokenizer + image processor source. Default: ``model`` itself, except for
            the released ``yuvalkirstain/PickScore_v1``, which ships no processor and uses
            that of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (as the public code does).
        divisor: the scale divisor (26).
        device: where the model runs.
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        batch_size: images per forward pass.
    """

    def __init__(
        self,
        *,
        model: str = PICKSCORE_MODEL,
        processor: str | None = None,
        divisor: float = 26.0,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 32,
    ):
        super().__init__()
        if processor is None and model == PICKSCORE_MODEL:
            processor = PICKSCORE_PROCESSOR
        self._setup(model, processor, divisor, device, dtype, batch_size)


# --------------------------------------------------------------------------- aesthetic


class AestheticMLP(nn.Module):
    """The LAION improved-aesthetic-predictor head (v2): ``input_dim → 1024 → 128 → 64 → 16 → 1``
    linear layers with dropout 0.2, 0.2, 0.1 after the first three, no nonlinearity (as
    released). State-dict keys ``layers.{0,2,4,6,7}.{weight,bias}``."""

    def __init__(self, input_dim: int = 768):
        super().__init__()
        self.input_dim = input_dim
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        """``(N, input_dim)`` -> ``(N,)``."""
        return self.layers(embeddings).squeeze(-1)


def load_aesthetic_head(path: str | os.PathLike) -> AestheticMLP:
    """Read an :class:`AestheticMLP` from ``path``: a ``.safetensors`` file, or a torch file
    read with ``torch.load(weights_only=True)`` (e.g. LAION's ``sac+logos+ava1-l14-linearMSE.pth``).
    A common key prefix (``model.``, ``module.``, ``mlp.`` ...) and a wrapping
    ``{"state_dict": ...}`` are accepted; the input width comes from the first layer.

    Raises:
        OptionError: (field ``head``) if the file is missing, unreadable, or not this layout.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise OptionError("head", f"aesthetic head weights {str(path)!r} not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise OptionError("head", f"cannot read {str(path)!r} (safetensors, or a torch file loadable with weights_only=True): {type(e).__name__}: {e}") from e
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise OptionError("head", f"{str(path)!r} does not hold a state dict of tensors")
    first = [k for k in state if k.endswith("layers.0.weight")]
    if len(first) != 1:
        raise OptionError("head", f"{str(path)!r} is not a LAION aesthetic head: no unique 'layers.0.weight' (keys: {sorted(state)[:8]})")
    prefix = first[0][: -len("layers.0.weight")]
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    w0 = state["layers.0.weight"]
    if w0.ndim != 2:
        raise OptionError("head", f"layers.0.weight in {str(path)!r} has shape {tuple(w0.shape)}, expected (1024, input_dim)")
    head = AestheticMLP(int(w0.shape[1]))
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))
        raise OptionError("head", f"{str(path)!r} does not match the LAION v2 layout {w0.shape[1]}→1024→128→64→16→1; differing (key, shape): {diff[:6]}")
    head.load_state_dict({k: v.float() for k, v in state.items()})
    return head.eval()


@register_reward("aesthetic")
class AestheticReward(_CLIPReward):
    """LAION aesthetic score: ``head(e / |e|)`` with ``e`` the projected CLIP image embedding.

    Args:
        head: the MLP weights file (safetensors, or a torch state dict file).
        model: the CLIP model the head was trained on (ViT-L/14 for the released head).
        processor: image processor source (default: ``model``).
        device: where the models run.
        dtype: CLIP's dtype (the head runs in float32).
        batch_size: images per forward pass.
    """

    needs_text = False

    def __init__(
        self,
        *,
        head: str,
        model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 32,
    ):
        super().__init__()
        mlp = load_aesthetic_head(head)
        self._load(model, processor, device, dtype, batch_size)
        dim = int(self.model.config.projection_dim)
        if mlp.input_dim != dim:
            raise OptionError("head", f"the head expects {mlp.input_dim}-d embeddings but the CLIP model {model!r} gives {dim}-d ones")
        self.head = mlp.to(self.device)
        for p in self.head.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def score(self, images: Tensor, prompts, metadata) -> Tensor:
        return self.head(self.image_embeddings(images))
