"""Digits-classifier reward: the probability of a target class under flowlab's cached digits
CNN (:func:`flowlab.metrics.digits.load_classifier`, the same classifier the digits FD
uses, trained once on the TRAIN split and cached under ``$FLOWLAB_CACHE``).

The target is either one fixed digit (``target: 3``: "draw a 3", whatever the condition) or
``target: prompted``: each sample's own class, read from its metadata (``label_key``,
``condition`` by default: the class label a flowlab ``rl.class_labels`` rollout was drawn for).
The latter is the class-conditional correctness reward, GenEval-like: "draw the digit you were
asked for".

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

from flowlab.rewards.base import OptionError, RewardError, RewardFunction, register_reward

__all__ = ["DigitsClassifierReward", "digits_to_model_space", "PROMPTED"]

#: ``target`` value that reads each sample's class from its metadata.
PROMPTED = "prompted"


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
        target: the digit to reward, 0..9, or ``"prompted"``: each sample's class, ``metadata[i][label_key]``
            (an integer 0..9; flowlab's class-label RL gives ``{"condition": label}``).
        label_key: the metadata field holding a sample's class when ``target: prompted``.
        cache_dir: where the classifier is cached (default ``$FLOWLAB_CACHE`` or
            ``~/.cache/flowlab``); it is trained there (a few seconds on a CPU) if missing.
        device: where the classifier runs.
        log_prob: return ``log p(target | image)`` instead (unbounded below, so a few
            hopeless samples weigh more; the probability is the DiffusionNFT digits reward).

    Raises:
        RewardError: with ``target: prompted``, when a call has no metadata or a sample's
            ``label_key`` is missing or not a digit (e.g. an unconditional rollout, ``condition: None``):
            a set-up error, not a per-sample failure.
    """

    def __init__(
        self, *, target: int | str, label_key: str = "condition", cache_dir: str | None = None, device: str = "cpu",
        log_prob: bool = False,
    ):
        super().__init__()
        if isinstance(target, str):
            if target != PROMPTED:
                raise OptionError("target", f"expected an integer 0..9 or {PROMPTED!r} (each sample's class from its metadata), got str {target!r}")
        elif not 0 <= target <= 9:
            raise OptionError("target", f"must be a digit 0..9 or {PROMPTED!r}, got {target}")
        if not label_key:
            raise OptionError("label_key", "must name a metadata field, got an empty string")
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
        self.label_key = label_key
        self.device = device_
        self.log_prob = log_prob

    def targets(self, n: int, metadata: list[dict] | None) -> Tensor:
        """The class each of ``n`` samples is scored against, ``(n,)`` int64.

        Raises:
            RewardError: ``target: prompted`` without metadata, or with a sample whose
                ``label_key`` is missing or not an integer 0..9.
        """
        if self.target != PROMPTED:
            return torch.full((n,), int(self.target), dtype=torch.long)
        if metadata is None:
            raise RewardError(
                f"digits_classifier: target {PROMPTED!r} reads each sample's class from metadata[{self.label_key!r}], "
                "but this call has no metadata (give the rewards per-sample metadata, e.g. rl.class_labels rollouts)"
            )
        labels = []
        for i, m in enumerate(metadata):
            c = m.get(self.label_key)
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= 9:
                hint = " (an unconditional sample: set rl.class_labels to the digits to prompt)" if c is None and self.label_key in m else ""
                raise RewardError(
                    f"digits_classifier: target {PROMPTED!r} needs metadata[{self.label_key!r}] = a digit 0..9 for every "
                    f"sample; sample {i} has {c!r}{hint}" + ("" if self.label_key in m else f" (its metadata keys: {sorted(m)})")
                )
            labels.append(c)
        return torch.tensor(labels, dtype=torch.long)

    @torch.no_grad()
    def score(self, images: Tensor, prompts, metadata) -> Tensor:
        target = self.targets(images.shape[0], metadata).to(self.device)
        x = digits_to_model_space(images).to(self.device)
        logp = self.model(x).float().log_softmax(dim=1).gather(1, target[:, None])[:, 0]
        return logp if self.log_prob else logp.exp()
