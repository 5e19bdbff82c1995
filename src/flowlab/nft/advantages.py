"""Group-relative advantages and DiffusionNFT's optimality probabilities.

Both RL recipes score ``G`` samples per condition ("group") and compare each sample with its
group. DiffusionNFT's public code (and FlowGRPO's) use the group mean and the **global**
standard deviation of the batch's rewards::

    A = (R - mean_group(R)) / (max(std_global(R), floor) + eps),   A <- clip(A, -c, c)

and DiffusionNFT maps it to an optimality probability ``r = 1/2 + 1/2 * A / c`` in ``[0, 1]``
(the paper's ``r = 1/2 + 1/2 clip((R - E R) / Z, -1, 1)`` with ``Z = c * std``).

Rewards that are NaN or infinite mark samples the reward model could not score: they are left
out of the statistics and get ``valid = False`` (the recipes drop them from the loss). A group
whose finite rewards are all equal carries no signal: its advantages are 0 and it is counted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Advantages", "group_advantages", "optimality_probability"]


@dataclass
class Advantages:
    """Per-sample advantages ``(N,)``, a validity mask ``(N,)`` and counts for the logs."""

    advantages: Tensor
    valid: Tensor
    num_nonfinite: int
    num_zero_variance_groups: int
    num_groups: int


def group_advantages(rewards: Tensor, groups: Tensor, clip: float = 5.0, eps: float = 1e-4, std_floor: float = 0.0) -> Advantages:
    """Advantages of ``rewards`` ``(N,)`` relative to their group (``groups`` ``(N,)`` integer ids).

    Args:
        rewards: one reward per sample (NaN / inf: unscored).
        groups: the group (condition) of each sample.
        clip: ``c``, the advantages are clipped to ``[-c, c]`` (``0`` disables clipping).
        eps: added to the global std.
        std_floor: the global std is taken as at least this. Once a reward saturates (every sample
            scores ~1), the batch std collapses and dividing by it turns differences of 1e-3 into
            full-size advantages that push the model off the data manifold (reward hacking); a
            floor on the scale lets such differences count for what they are.
    """
    rewards = rewards.detach().double().cpu()
    groups = groups.detach().long().cpu()
    valid = torch.isfinite(rewards)
    adv = torch.zeros_like(rewards)
    ids = torch.unique(groups)
    zero_var = 0
    if valid.sum() > 0:
        std = rewards[valid].std(unbiased=False) if valid.sum() > 1 else torch.zeros((), dtype=rewards.dtype)
        for g in ids:
            m = (groups == g) & valid
            if m.sum() == 0:
                continue
            r = rewards[m]
            if m.sum() < 2 or (r.max() - r.min()) <= 1e-12 * max(1.0, float(r.abs().max())):
                zero_var += 1
                continue
            adv[m] = (r - r.mean()) / (max(float(std), std_floor) + eps)
    else:
        zero_var = len(ids)
    if clip > 0:
        adv = adv.clamp(-clip, clip)
    return Advantages(
        advantages=adv.float(), valid=valid, num_nonfinite=int((~valid).sum()),
        num_zero_variance_groups=zero_var, num_groups=len(ids),
    )


def optimality_probability(advantages: Tensor, clip: float = 5.0) -> Tensor:
    """DiffusionNFT's ``r = clamp(1/2 + 1/2 * A / c, 0, 1)`` (the public code's ``A / 10 + 1/2`` for ``c = 5``)."""
    if clip <= 0:
        raise ValueError(f"the advantage clip must be > 0 to map advantages to [0, 1], got {clip}")
    return (0.5 + 0.5 * advantages / clip).clamp(0.0, 1.0)
