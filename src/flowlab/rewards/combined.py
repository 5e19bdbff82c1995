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

The normalisation is over the batch the reward is called with, so the total is a relative
score, meaningful within a batch: use the components' raw means in
:attr:`~flowlab.rewards.base.RewardFunction.info` to track progress over training. Called per
rollout chunk, each chunk would get its own statistics and the scores of one prompt's group,
spread over chunks or processes, would not be comparable. For statistics over the whole
global batch, take each chunk's raw per-reward scores with :meth:`CombinedReward.raw_scores`
(``(N, K)``), gather them, and combine the global matrix once with :func:`combine_scores`
(or :meth:`CombinedReward.combine_global`).

``combine: sum`` gives the reference's weighted raw sum instead (``multi_score`` in
``flow_grpo/rewards.py``: ``total = sum_k w_k * s_k``, lines 393-398 in yifan123/flow_grpo,
295-300 in NVlabs/DiffusionNFT), for reproducing its runs; the weights then act on raw scales.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from flowlab.rewards.base import RewardError, RewardFunction

__all__ = ["CombinedReward", "zscore", "combine_scores", "COMBINE_MODES"]

COMBINE_MODES = ("zscore", "sum")


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


def combine_scores(scores: Tensor, weights: Sequence[float], combine: str = "zscore") -> Tensor:
    """Combine a matrix of per-reward scores into one score per sample.

    Args:
        scores: ``(N, K)``: column ``k`` holds reward ``k``'s raw scores of the ``N`` samples
            (NaN where it could not score), e.g. the whole global batch gathered from all chunks
            and processes.
        weights: ``K`` weights.
        combine: ``zscore`` (``sum_k w_k · zscore(s[:, k])``, statistics over the ``N`` rows,
            see :func:`zscore`) or ``sum`` (``sum_k w_k · s[:, k]``, the reference's raw sum).

    Returns:
        float64 ``(N,)``; NaN for a row that is NaN in any column.

    Raises:
        ValueError: a wrong shape, weight count or mode.
    """
    if combine not in COMBINE_MODES:
        raise ValueError(f"combine must be one of {', '.join(COMBINE_MODES)}, got {combine!r}")
    if scores.ndim != 2:
        raise ValueError(f"scores must be a matrix (N, K), got shape {tuple(scores.shape)}")
    if scores.shape[1] != len(weights):
        raise ValueError(f"scores has {scores.shape[1]} columns but {len(weights)} weights were given")
    s = scores.detach().to("cpu", torch.float64)
    total = torch.zeros(s.shape[0], dtype=torch.float64)
    for k, w in enumerate(weights):
        column = zscore(s[:, k]) if combine == "zscore" else s[:, k]
        total = total + float(w) * column  # NaN + x = NaN: a sample NaN anywhere is NaN in the total
    return total


class CombinedReward(RewardFunction):
    """Weighted sum of z-scored rewards (see the module docstring for why), or of raw ones
    (``combine="sum"``, the reference's).

    Args:
        rewards: the component rewards.
        weights: one finite weight per component (negative to penalise); default all 1.
        names: labels of the components in :attr:`info` (default: their ``name``, made
            unique with a ``_<i>`` suffix).
        combine: ``zscore`` (default) or ``sum`` (see :func:`combine_scores`).

    After each call :attr:`info` holds ``<label>/mean`` (the raw component's mean over its
    scored samples), ``<label>/std`` and ``<label>/num_nan`` for each component, and
    :attr:`last_components` maps each label to its raw ``(N,)`` scores.

    For a combination over the global batch, call :meth:`raw_scores` on each chunk, gather the
    ``(N, K)`` matrices and pass the global one to :meth:`combine_global`.
    """

    name = "combined"

    def __init__(
        self,
        rewards: Sequence[RewardFunction],
        weights: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
        combine: str = "zscore",
    ):
        super().__init__()
        if combine not in COMBINE_MODES:
            raise ValueError(f"CombinedReward combine must be one of {', '.join(COMBINE_MODES)}, got {combine!r}")
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
        self.combine = combine
        self.last_components: dict[str, Tensor] = {}

    def score(self, images: Tensor, prompts: list[str] | None, metadata: list[dict] | None) -> tuple[Tensor, dict[str, Any]]:
        n = images.shape[0]
        info: dict[str, Any] = {}
        components: dict[str, Tensor] = {}
        for label, reward in zip(self.names, self.rewards):
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
        self.last_components = components
        total = combine_scores(torch.stack([components[k] for k in self.names], dim=1), self.weights, self.combine)
        return total.to(torch.float32), info

    def raw_scores(self, images: Tensor, prompts: Sequence[str] | None = None, metadata: Sequence[dict] | None = None) -> Tensor:
        """Each component's raw scores, uncombined: float32 ``(N, K)`` with columns in :attr:`names`
        order; NaN where a component could not score and in the rows of images with non-finite
        pixels. Updates :attr:`info` like a call."""
        self(images, prompts, metadata)
        raw = torch.stack([self.last_components[k] for k in self.names], dim=1)
        bad = ~torch.isfinite(images.detach()).flatten(1).all(dim=1).cpu()
        return raw.masked_fill(bad[:, None], float("nan"))

    def combine_global(self, scores: Tensor) -> Tensor:
        """:func:`combine_scores` of a gathered ``(N, K)`` matrix with this reward's weights and mode;
        float32 ``(N,)``."""
        return combine_scores(scores, self.weights, self.combine).to(torch.float32)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}×{w:g}" for n, w in zip(self.names, self.weights))
        return f"CombinedReward({parts}, combine={self.combine!r})"
