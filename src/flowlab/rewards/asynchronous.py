"""Run a reward in background threads so slow rewards overlap with training.

A reward server round trip or a large CLIP model can take as long as a training step.
:class:`AsyncReward` submits the call to a :class:`~concurrent.futures.ThreadPoolExecutor`
and hands back a :class:`~concurrent.futures.Future`; the recipe computes the next rollouts
(or trains on the previous ones) while the scores are computed, then calls
``future.result()``. Threads suffice: the heavy parts (HTTP waits, torch kernels, PIL
encoding) release the GIL.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Mapping, Sequence

from torch import Tensor

from flowlab.rewards.base import RewardFunction, check_inputs

__all__ = ["AsyncReward"]


class AsyncReward:
    """Thread-pool wrapper around a reward.

    Args:
        reward: the reward to run (any ``(images, prompts, metadata) -> scores`` callable).
        max_workers: threads, i.e. batches scored concurrently. Two calls of the same reward
            then run at once: fine for the built-ins (inference-only torch modules, stateless
            HTTP clients); use 1 for a user reward that is not thread-safe.

    Example::

        with AsyncReward(reward, max_workers=2) as async_reward:
            fut = async_reward.submit(images, prompts, metadata)
            ...  # train on the previous batch
            scores = fut.result()
    """

    def __init__(self, reward: RewardFunction, max_workers: int = 1):
        if not callable(reward):
            raise TypeError(f"AsyncReward needs a callable reward, got {type(reward).__name__}")
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be a positive integer, got {max_workers!r}")
        self.reward = reward
        self.max_workers = max_workers
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"reward-{getattr(reward, 'name', 'fn')}")
        self._closed = False
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return getattr(self.reward, "name", type(self.reward).__name__)

    @property
    def info(self) -> dict[str, Any]:
        """The wrapped reward's :attr:`~RewardFunction.info` (of its last finished call)."""
        return getattr(self.reward, "info", {})

    def submit(self, images: Tensor, prompts: Sequence[str] | None = None, metadata: Sequence[Mapping] | None = None) -> "Future[Tensor]":
        """Start scoring a batch; returns a future of the float32 CPU scores ``(N,)``.

        The inputs are validated now (a malformed call fails here, not in the future) and
        ``images`` is copied to the CPU, so the caller may reuse or free its buffer at once.
        An exception of the reward (e.g. :class:`~flowlab.rewards.base.RewardError`) is
        raised by ``future.result()``.

        Raises:
            RuntimeError: if the wrapper was closed.
        """
        images, prompts, metadata = check_inputs(images, prompts, metadata)
        images = images.to("cpu", copy=True) if images.device.type == "cpu" else images.to("cpu")
        with self._lock:
            if self._closed:
                raise RuntimeError(f"AsyncReward({self.name!r}) is closed")
            return self._executor.submit(self.reward, images, prompts, metadata)

    def __call__(self, images: Tensor, prompts: Sequence[str] | None = None, metadata: Sequence[Mapping] | None = None) -> Tensor:
        """Score synchronously (``submit(...).result()``)."""
        return self.submit(images, prompts, metadata).result()

    def close(self, wait: bool = True, cancel_pending: bool = False) -> None:
        """Shut the thread pool down (idempotent).

        Args:
            wait: block until running calls finish.
            cancel_pending: cancel calls that have not started yet.
        """
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=wait, cancel_futures=cancel_pending)

    def __enter__(self) -> "AsyncReward":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(wait=True, cancel_pending=exc[0] is not None)

    def __repr__(self) -> str:
        return f"AsyncReward({self.reward!r}, max_workers={self.max_workers})"
