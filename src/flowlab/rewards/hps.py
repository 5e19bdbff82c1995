"""HPSv2 / HPSv2.1 (Human Preference Score) reward, through the ``hpsv2`` package's open_clip.

HPS is an OpenCLIP ViT-H/14 fine-tuned on human preferences; the score of an image for its
prompt is the cosine similarity of the normalised image and text embeddings (no logit scale),
typically 0.2-0.35. This follows the DiffusionNFT reference scorer
(``flow_grpo/hpsv2_scorer.py`` in NVlabs/DiffusionNFT):

* the model: ``hpsv2.src.open_clip.create_model("ViT-H-14", precision=..., output_dict=True)``
  (lines 90-102) with the HPS checkpoint's ``state_dict`` loaded over it (lines 117-118);
* preprocessing on the float image in ``[0, 1]`` (lines 16-82, 124): resize so the longer side
  is the model's image size (224) with bicubic interpolation, pad the shorter side
  symmetrically with 0 to a square, normalise with the model's (OpenAI CLIP's) mean and std;
* text through ``get_tokenizer("ViT-H-14")`` (77 tokens), score
  ``diag(image_features @ text_features.T)`` (lines 126-130).

The checkpoint is ``HPS_v2_compressed.pt`` (``version: v2.0``) or ``HPS_v2.1_compressed.pt``
(``v2.1``, the one DiffusionNFT uses) from the Hub repository ``xswu/HPSv2``, or a local file
(``checkpoint``), read with ``torch.load(weights_only=True)`` (or safetensors). ``hpsv2`` is an
optional extra: ``pip install 'flowlab[hps]'``.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowlab.rewards.base import OptionError, RewardFunction, register_reward
from flowlab.rewards.clip import _DTYPES
from flowlab.rewards.extras import require_extra

__all__ = ["HPSv2Reward", "HPS_CHECKPOINTS", "HPS_REPO", "resize_max_pad", "load_state_dict_file"]

HPS_REPO = "xswu/HPSv2"
HPS_CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_max_pad(images: Tensor, size: int, fill: float = 0.0) -> Tensor:
    """Resize ``(N, C, H, W)`` so that ``max(H, W)`` becomes ``size`` (bicubic, antialiased, aspect
    kept, sides ``round(H·s)``, ``round(W·s)``), then pad symmetrically with ``fill`` to
    ``(N, C, size, size)`` (the reference's ``ResizeMaxSize``; an image already of longer side
    ``size`` is returned unchanged)."""
    h, w = images.shape[-2:]
    scale = size / float(max(h, w))
    if scale == 1.0:
        return images
    nh, nw = round(h * scale), round(w * scale)
    x = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    ph, pw = size - nh, size - nw
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)


def load_state_dict_file(path: str, field: str) -> dict[str, Tensor]:
    """Read a state dict from a ``.safetensors`` file or a torch file loadable with
    ``weights_only=True``; a ``{"state_dict": ...}`` wrapper is unwrapped.

    Raises:
        OptionError: (``field``) when the file is missing or cannot be read safely.
    """
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise OptionError(field, f"checkpoint {path!r} not found")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise OptionError(field, f"cannot read {path!r} as safetensors or with torch.load(weights_only=True): {type(e).__name__}: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise OptionError(field, f"{path!r} does not hold a state dict of tensors")
    return state


@register_reward("hpsv2")
class HPSv2Reward(RewardFunction):
    """Human Preference Score v2 / v2.1 (module docstring).

    Args:
        version: ``v2.1`` (DiffusionNFT's) or ``v2.0``; picks the Hub checkpoint.
        checkpoint: a local HPS checkpoint (``.pt`` or ``.safetensors``) instead of the Hub one.
        device: where the model runs.
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        batch_size: images per forward pass.
        model: a ready OpenCLIP-like model (``encode_image(x, normalize=True)``,
            ``encode_text(tokens, normalize=True)``, ``visual.image_size``), from Python only;
            then the ``hps`` extra is not needed.
        tokenizer: with ``model``: ``list[str] -> LongTensor (N, L)``.

    Raises:
        OptionError: an unknown version or dtype, an unreadable checkpoint, or (field ``name``)
            the missing ``hps`` extra.
    """

    def __init__(
        self,
        *,
        version: str = "v2.1",
        checkpoint: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 16,
        model: nn.Module | None = None,
        tokenizer: Callable[[list[str]], Tensor] | None = None,
    ):
        super().__init__()
        if version not in HPS_CHECKPOINTS:
            raise OptionError("version", f"must be one of {', '.join(HPS_CHECKPOINTS)}, got {version!r}")
        if dtype not in _DTYPES:
            raise OptionError("dtype", f"must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        if batch_size < 1:
            raise OptionError("batch_size", f"must be >= 1, got {batch_size}")
        if (model is None) != (tokenizer is None):
            raise OptionError("tokenizer" if model is not None else "model", "model and tokenizer are given together")
        self.device = torch.device(device)
        self.dtype = _DTYPES[dtype]
        self.batch_size = batch_size
        if model is None:
            model, tokenizer = self._load(version, checkpoint)
        self.model = model.eval().to(self.device, self.dtype)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        size = getattr(self.model.visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = torch.tensor(getattr(self.model.visual, "image_mean", None) or OPENAI_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(getattr(self.model.visual, "image_std", None) or OPENAI_STD).view(1, 3, 1, 1)

    def _load(self, version: str, checkpoint: str | None) -> tuple[nn.Module, Callable]:
        """The real HPS model: hpsv2's open_clip ViT-H-14 with the HPS weights."""
        open_clip = require_extra("hpsv2.src.open_clip", "hps", "hpsv2")
        if checkpoint is None:
            from huggingface_hub import hf_hub_download

            try:
                checkpoint = hf_hub_download(HPS_REPO, HPS_CHECKPOINTS[version])
            except Exception as e:
                raise OptionError("checkpoint", f"cannot fetch {HPS_CHECKPOINTS[version]} from {HPS_REPO} ({type(e).__name__}: {e}); pass a local checkpoint") from e
        state = load_state_dict_file(checkpoint, "checkpoint")
        model = open_clip.create_model(
            "ViT-H-14", None, precision="fp32", device="cpu", jit=False, force_quick_gelu=False, force_custom_text=False,
            force_patch_dropout=False, force_image_size=None, pretrained_image=False, output_dict=True,
        )
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise OptionError("checkpoint", f"{checkpoint!r} is not an HPS ViT-H-14 checkpoint: {e}") from e
        return model, open_clip.get_tokenizer("ViT-H-14")

    def preprocess(self, images: Tensor) -> Tensor:
        """``(N, C, H, W)`` in ``[0, 1]`` -> normalised ``(N, 3, S, S)`` on the model's device and dtype."""
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = resize_max_pad(x, self.image_size)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x.to(self.dtype)

    def score(self, images: Tensor, prompts: list[str] | None, metadata: Any) -> Tensor:
        if prompts is None:
            raise ValueError("reward 'hpsv2' scores image-text agreement and needs prompts (got None)")
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            x = self.preprocess(images[i : i + self.batch_size])
            tokens = self.tokenizer(prompts[i : i + self.batch_size]).to(self.device)
            img = self.model.encode_image(x, normalize=True).float()
            txt = self.model.encode_text(tokens, normalize=True).float()
            out.append((img * txt).sum(dim=-1))
        return torch.cat(out)
