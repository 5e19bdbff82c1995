"""Memory layout of an RL step: what one process holds, and what one backward part saves.

flowlab's RL recipes bound activation memory by two numbers, independent of the group size and of
the prompts per step: ``rl.micro_batch`` samples per forward/backward part (and per rollout and
reward chunk), times the training timesteps per part (``nft.timestep_chunk`` /
``grpo.timestep_chunk``). The reference runs 9 images per GPU per backward
(NVlabs/DiffusionNFT ``config/nft.py`` lines 26-46: ``bsz = 9``, one timestep per backward).

:class:`SavedActivationMeter` measures what autograd saves for the backward pass (the activations),
with :class:`torch.autograd.graph.saved_tensors_hooks`; :func:`static_memory` estimates the
weights and the optimiser state of a policy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["SavedActivationMeter", "StaticMemory", "static_memory"]


class SavedActivationMeter(torch.autograd.graph.saved_tensors_hooks):
    """Context manager counting the bytes of the distinct tensors autograd saves for backward.

    Example::

        with SavedActivationMeter() as meter:
            loss = model(x).square().mean()
        meter.bytes  # activations kept alive until loss.backward()

    Tensors saved several times (same storage, offset and shape) count once.
    """

    def __init__(self):
        self.bytes = 0
        self._seen: set[tuple] = set()
        super().__init__(self._pack, lambda x: x)

    def _pack(self, x: Tensor) -> Tensor:
        key = (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.dtype)
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += x.numel() * x.element_size()
        return x

    def __enter__(self) -> "SavedActivationMeter":
        super().__enter__()
        return self


@dataclass
class StaticMemory:
    """Per-process memory that does not depend on the batch (bytes).

    Attributes:
        weights: every parameter and buffer of the policy (frozen and trained).
        trainable: the trained parameters alone.
        optimizer_state: AdamW's two float32 moments per trained parameter (``8`` bytes each).
        gradients: one float32 gradient per trained parameter.
    """

    weights: int
    trainable: int
    optimizer_state: int
    gradients: int


def static_memory(module: nn.Module) -> StaticMemory:
    """:class:`StaticMemory` of ``module`` (AdamW with float32 state, as the recipes build)."""
    seen: set[int] = set()
    weights = trainable_numel = trainable = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        weights += t.numel() * t.element_size()
        if isinstance(t, nn.Parameter) and t.requires_grad:
            trainable += t.numel() * t.element_size()
            trainable_numel += t.numel()
    return StaticMemory(weights=weights, trainable=trainable, optimizer_state=8 * trainable_numel, gradients=4 * trainable_numel)
