"""ImageReward (Xu et al. 2023): a BLIP image-text model with an MLP head trained on human preferences,
through the ``image-reward`` package (``import ImageReward``).

The score of image ``i`` for prompt ``i`` is ImageReward's normalised reward
``(mlp(f_i) - 0.16717) / 1.03334`` with ``f_i`` the [CLS] feature of BLIP's text encoder
cross-attending to the image (``ImageReward.ImageReward.score_gard``), typically -2..2. The
reference (``flow_grpo/imagereward_scorer.py`` lines 23-27 in yifan123/flow_grpo and
NVlabs/DiffusionNFT) scores every prompt against every image with ``inference_rank`` and keeps
the diagonal; this reward computes only the ``N`` diagonal pairs, batched, with the package's
own preprocessing (``model.preprocess``: bicubic resize to 224, centre crop, CLIP
normalisation, on the 8-bit PIL image) and tokenisation (padding to 35 tokens).

Loading builds ``ImageReward.ImageReward.ImageReward(med_config)`` and loads the checkpoint
``ImageReward.pt`` (``THUDM/ImageReward`` on the Hub, or a local file) with
``torch.load(weights_only=True)`` and ``strict=False`` (as ``ImageReward.load`` does; the
package's own loader unpickles without ``weights_only``). ``image-reward`` is an optional
extra: ``pip install 'flowlab[imagereward]'``.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from flowlab.rewards.base import OptionError, RewardFunction, register_reward
from flowlab.rewards.clip import _DTYPES
from flowlab.rewards.extras import require_extra
from flowlab.rewards.hps import load_state_dict_file
from flowlab.rewards.imaging import to_pil

__all__ = ["ImageRewardReward", "IMAGEREWARD_REPO"]

IMAGEREWARD_REPO = "THUDM/ImageReward"
_MAX_TEXT_TOKENS = 35  # ImageReward.score / inference_rank tokenise with max_length=35


def _hub_file(source: str | None, filename: str, field: str) -> str:
    """A local file, or ``filename`` of the ImageReward Hub repository when ``source`` is ``None``."""
    if source is not None:
        path = os.path.expanduser(source)
        if not os.path.isfile(path):
            raise OptionError(field, f"{source!r} is not a file")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(IMAGEREWARD_REPO, filename)
    except Exception as e:
        raise OptionError(field, f"cannot fetch {filename} from {IMAGEREWARD_REPO} ({type(e).__name__}: {e}); pass a local file") from e


@register_reward("imagereward")
class ImageRewardReward(RewardFunction):
    """ImageReward v1.0 (module docstring).

    Args:
        checkpoint: a local ``ImageReward.pt`` (``.safetensors`` also read); default: the Hub file.
        med_config: a local BLIP ``med_config.json``; default: the Hub file.
        device: where the model runs.
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        batch_size: images per forward pass.
        scorer: a ready model with ImageReward's interface (``preprocess(pil) -> (3, S, S)``,
            ``blip.tokenizer``, ``score_gard(input_ids, attention_mask, pixels) -> (N, 1)``),
            from Python only; then the ``imagereward`` extra is not needed.

    Raises:
        OptionError: a bad dtype or file, or (field ``name``) the missing ``imagereward`` extra.
    """

    def __init__(
        self,
        *,
        checkpoint: str | None = None,
        med_config: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 16,
        scorer: nn.Module | None = None,
    ):
        super().__init__()
        if dtype not in _DTYPES:
            raise OptionError("dtype", f"must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        if batch_size < 1:
            raise OptionError("batch_size", f"must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.dtype = _DTYPES[dtype]
        self.batch_size = batch_size
        if scorer is None:
            scorer = self._load(checkpoint, med_config)
        for name in ("preprocess", "score_gard"):
            if not callable(getattr(scorer, name, None)):
                raise OptionError("scorer", f"{type(scorer).__name__} has no {name}() (not an ImageReward model)")
        self.scorer = scorer.eval().to(self.device, self.dtype)
        self.scorer.device = self.device  # score_gard puts its attention mask on scorer.device
        for p in self.scorer.parameters():
            p.requires_grad_(False)

    def _load(self, checkpoint: str | None, med_config: str | None) -> nn.Module:
        module = require_extra("ImageReward.ImageReward", "imagereward", "imagereward")
        ckpt = _hub_file(checkpoint, "ImageReward.pt", "checkpoint")
        config = _hub_file(med_config, "med_config.json", "med_config")
        model = module.ImageReward(med_config=config, device="cpu")
        model.load_state_dict(load_state_dict_file(ckpt, "checkpoint"), strict=False)
        return model

    def score(self, images: Tensor, prompts: list[str] | None, metadata: Any) -> Tensor:
        if prompts is None:
            raise ValueError("reward 'imagereward' scores image-text agreement and needs prompts (got None)")
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            pil = [im.convert("RGB") for im in to_pil(images[i : i + self.batch_size])]
            pixels = torch.stack([self.scorer.preprocess(im) for im in pil]).to(self.device, self.dtype)
            tok = self.scorer.blip.tokenizer(
                prompts[i : i + self.batch_size], padding="max_length", truncation=True, max_length=_MAX_TEXT_TOKENS, return_tensors="pt"
            )
            rewards = self.scorer.score_gard(tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device), pixels)
            out.append(rewards.float().reshape(-1))
        return torch.cat(out)
