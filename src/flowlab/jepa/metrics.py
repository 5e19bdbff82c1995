"""Ranking metrics of link-prediction style queries."""
from __future__ import annotations

from torch import Tensor

__all__ = ["gold_ranks", "ranking_metrics"]


def gold_ranks(scores: Tensor, gold: Tensor) -> Tensor:
    """Rank ``(Q,)`` of each gold entity among ``scores`` ``(Q, N)`` (1 = best).

    Ties count against the gold entity: ``rank = #{n : score_n >= score_gold}``, so a model that
    scores everything equally gets rank ``N``, never 1.
    """
    g = scores.gather(1, gold.long()[:, None])
    return (scores >= g).sum(1)


def ranking_metrics(scores: Tensor, gold: Tensor) -> dict[str, float]:
    """``{"accuracy": P(rank = 1), "mrr": mean(1 / rank)}`` of ``scores`` ``(Q, N)`` against ``gold`` ``(Q,)``."""
    if scores.ndim != 2 or gold.shape != scores.shape[:1]:
        raise ValueError(f"scores must be (Q, N) and gold (Q,), got {tuple(scores.shape)} and {tuple(gold.shape)}")
    if len(gold) == 0:
        return {"accuracy": float("nan"), "mrr": float("nan")}
    r = gold_ranks(scores, gold).double()
    return {"accuracy": float((r == 1).double().mean()), "mrr": float((1.0 / r).mean())}
