"""Several rewards combined with weights, after per-reward normalisation.

The public DiffusionNFT / FlowGRPO code sums the raw scores of several rewards with weights.
Those scores live on unrelated scales (PickScore/26 ~ 0.8 with a spread of ~0.02, an
aesthetic score ~ 5 with a spread of ~0.5, JPEG sizes in kB with a spread of tens), and the
advantages are normalised only *after* the sum, so the total's variation, hence the whole
learning signal, comes from whichever reward has the largest spread: the weights do not
mean what they say. :class:`CombinedReward` instead standardises every component over the
batch first::

    z_k = (s_k - mean(s_k)) / std(s_k)          (over the samples where s_k is not NaN)
    total = sum_k w_k * z_k

so ``w_k`` is the share of the signal reward ``k`` gets, whatever its units: multiplying one
reward's raw scores by 1000 leaves the total unchanged. A component with zero spread over
the batch (e.g. every sample got the same score) carries no ranking information and
contributes 0. A sample that is NaN in any component is NaN in the total (it was not fully
scored; the recipe drops it).

The normalisation is over the batch the reward is called with (one process's rollouts), so
the total is a relative score, meaningful within a batch: use the components' raw means in
:attr:`~flowlab.rewards.base.RewardFunction.info` to track progress over training.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from flowlab.rewards.base import RewardError, RewardFunction

__all__ = ["CombinedReward", "zscore"]


def zscore(scores: Tensor, rel_eps: float = 1e-12) -> Tensor:
    """Standardise ``scores`` ``(N,)`` over its non-NaN entries, in float64.

    Args:
        scores: float tensor ``(N,)``; NaN entries are ignored and stay NaN.
        rel_eps: a spread at or below ``rel_eps · max(1, |mean|)`` counts as zero.

    Returns:
        float64 ``(N,)``: ``(s - mean) / std`` (population std) where finite; 0 for every
        finite entry if there are fewer than two of them or they have zero spread.
    """
    s = scores.to(torch.float64)
    ok = ~torch.isnan(s)
    out = torch.zeros_like(s)
    out[~ok] = float("nan")
    if int(ok.sum()) < 2:
        return out
    v = s[ok]
    mean = v.mean()
    std = v.std(unbiased=False)
    if not bool(std > rel_eps * max(1.0, float(mean.abs()))):
        return out
    out[ok] = (v - mean) / std
    return out


class CombinedReward(RewardFunction):
    """Weighted sum of z-scored rewards (see the module docstring for why).

    Args:
        rewards: the component rewards.
        weights: one finite weight per component (negative to penalise); default all 1.
        names: labels of the components in :attr:`info` (default: their ``name``, made
            unique with a ``_<i>`` suffix).

    After each call :attr:`info` holds ``<label>/mean`` (the raw component's mean over its
    scored samples), ``<label>/std`` and ``<label>/num_nan`` for each component, and
    :attr:`last_components` maps each label to its raw ``(N,)`` scores.
    """

    name = "combined"

    def __init__(self, rewards: Sequence[RewardFunction], weights: Sequence[float] | None = None, names: Sequence[str] | None = None):
        super().__init__()
        rewards = list(rewards)
        if not rewards:
            raise ValueError("CombinedReward needs at least one reward")
        for i, r in enumerate(rewards):
            if not callable(r):
                raise TypeError(f"component {i} of CombinedReward is not callable: {r!r}")
        weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
        if len(weights) != len(rewards):
            raise ValueError(f"CombinedReward got {len(rewards)} rewards but {len(weights)} weights")
        if not all(torch.isfinite(torch.tensor(weights, dtype=torch.float64))):
            raise ValueError(f"CombinedReward weights must be finite, got {weights}")
        if names is None:
            base = [getattr(r, "name", type(r).__name__) for r in rewards]
            names = [b if base.count(b) == 1 else f"{b}_{i}" for i, b in enumerate(base)]
        names = list(names)
        if len(names) != len(rewards) or len(set(names)) != len(names):
            raise ValueError(f"CombinedReward names must be unique, one per reward; got {names}")
        self.rewards = rewards
        self.weights = weights
        self.names = names
        self.last_components: dict[str, Tensor] = {}

    def score(self, images: Tensor, prompts: list[str] | None, metadata: list[dict] | None) -> tuple[Tensor, dict[str, Any]]:
        n = images.shape[0]
        total = torch.zeros(n, dtype=torch.float64)
        info: dict[str, Any] = {}
        components: dict[str, Tensor] = {}
        for label, reward, w in zip(self.names, self.rewards, self.weights):
            try:
                raw = reward(images, prompts, metadata)
            except RewardError as e:
                raise RewardError(f"component {label!r} of the combined reward failed: {e}") from e
            if not isinstance(raw, Tensor) or raw.shape != (n,):
                raise RewardError(f"component {label!r} returned {getattr(raw, 'shape', type(raw).__name__)}, expected a tensor ({n},)")
            raw = raw.detach().to("cpu", torch.float32)
            components[label] = raw
            ok = ~torch.isnan(raw)
            info[f"{label}/mean"] = float(raw[ok].double().mean()) if bool(ok.any()) else float("nan")
            info[f"{label}/std"] = float(raw[ok].double().std(unbiased=False)) if bool(ok.any()) else float("nan")
            info[f"{label}/num_nan"] = int((~ok).sum())
            total = total + w * zscore(raw)  # NaN + x = NaN: a sample NaN anywhere is NaN in the total
        self.last_components = components
        return total.to(torch.float32), info

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}×{w:g}" for n, w in zip(self.names, self.weights))
        return f"CombinedReward({parts})"
