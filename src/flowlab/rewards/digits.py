"""Digits-classifier reward: the probability of a target class under flowlab's cached digits
CNN (:func:`flowlab.metrics.digits.load_classifier`, the same classifier the digits FD
uses, trained once on the TRAIN split and cached under ``$FLOWLAB_CACHE``).

Images are in the reward convention, ``[0, 1]`` with 0 the background (what
:func:`flowlab.data.digits.to_unit_range` gives for flowlab digits samples). 8×8
single-channel images go straight in; others are converted: 3 channels averaged to grey,
then resized to 8×8 (area averaging when shrinking, bilinear when growing). Non-square
images are rejected (resizing them would distort the digit).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flowlab.rewards.base import OptionError, RewardFunction, register_reward

__all__ = ["DigitsClassifierReward", "digits_to_model_space"]


def digits_to_model_space(images: Tensor) -> Tensor:
    """Reward images ``(N, C, H, W)`` in ``[0, 1]`` -> classifier input ``(N, 1, 8, 8)`` in ``[-1, 1]``.

    Raises:
        ValueError: for non-square images (the only case that cannot be converted faithfully).
    """
    n, c, h, w = images.shape
    x = images.to(torch.float32)
    if c == 3:
        x = x.mean(dim=1, keepdim=True)
    elif c != 1:
        raise ValueError(f"digits reward needs 1 or 3 channels, got {c}")
    if (h, w) != (8, 8):
        if h != w:
            raise ValueError(
                f"digits reward needs square images (8×8, or larger/smaller squares it resizes to 8×8); got {h}×{w}, "
                "which would be distorted by resizing"
            )
        x = F.interpolate(x, size=(8, 8), mode="area") if h > 8 else F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).contiguous()


@register_reward("digits_classifier")
class DigitsClassifierReward(RewardFunction):
    """``p(target | image)`` under the cached flowlab digits CNN; scale ``[0, 1]``.

    Args:
        target: the digit to reward, 0..9.
        cache_dir: where the classifier is cached (default ``$FLOWLAB_CACHE`` or
            ``~/.cache/flowlab``); it is trained there (a few seconds on a CPU) if missing.
        device: where the classifier runs.
        log_prob: return ``log p(target | image)`` instead (unbounded below, so a few
            hopeless samples weigh more; the probability is the DiffusionNFT digits reward).
    """

    def __init__(self, *, target: int, cache_dir: str | None = None, device: str = "cpu", log_prob: bool = False):
        super().__init__()
        if not 0 <= target <= 9:
            raise OptionError("target", f"must be a digit 0..9, got {target}")
        from flowlab.metrics.digits import load_classifier

        try:
            device_ = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise OptionError("device", f"not a torch device: {e}") from None
        model, self.classifier_info = load_classifier(cache_dir)
        self.model = model.eval().to(device_)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.target = target
        self.device = device_
        self.log_prob = log_prob

    @torch.no_grad()
    def score(self, images: Tensor, prompts, metadata) -> Tensor:
        x = digits_to_model_space(images).to(self.device)
        logp = self.model(x).float().log_softmax(dim=1)[:, self.target]
        return logp if self.log_prob else logp.exp()
