"""Exact saved-activation accounting with ``torch.autograd.graph.saved_tensors_hooks``.

Every tensor autograd saves for backward is wrapped in a small handle that adds its storage's
bytes to a live counter when packed (once per storage) and subtracts them when the graph that
holds the last handle is freed (after ``backward`` or when the loss is dropped). ``peak_bytes`` is the maximum live total: the
activation memory a training step needs, counted exactly on any device. Tensors that are
parameters (or views of a parameter's storage) and the input batch are not activations and are
not counted.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

__all__ = ["SavedActivationMeter"]


class _Handle:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor, meter, key, nbytes):
        self.tensor = tensor
        meter._acquire(key, nbytes)
        weakref.finalize(self, meter._release, key)


class SavedActivationMeter:
    """Context manager counting live saved-for-backward bytes; ``peak_bytes`` after the block.

    A storage saved several times (e.g. a softmax output kept by both the softmax and the next
    matmul) is counted once, for its whole size, while any handle to it is alive.

    Args:
        exclude: modules whose parameters and buffers, and tensors (e.g. the input batch), are not
            counted: they are held whether or not autograd saves them.
    """

    def __init__(self, *exclude: nn.Module | torch.Tensor):
        tensors = [t for m in exclude for t in ([m] if torch.is_tensor(m) else [*m.parameters(), *m.buffers()])]
        self._param_ptrs = {t.untyped_storage().data_ptr() for t in tensors}
        self._refs: dict[int, list] = {}
        self.live = 0
        self.peak_bytes = 0
        self.count = 0

    def _acquire(self, key: int, nbytes: int) -> None:
        ref = self._refs.setdefault(key, [0, nbytes])
        if ref[0] == 0:
            self.live += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live)
        ref[0] += 1

    def _release(self, key: int) -> None:
        ref = self._refs[key]
        ref[0] -= 1
        if ref[0] == 0:
            self.live -= ref[1]
            del self._refs[key]

    def _pack(self, t: torch.Tensor):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self._param_ptrs or st.nbytes() == 0:
            return t
        self.count += 1
        return _Handle(t, self, key, st.nbytes())

    @staticmethod
    def _unpack(h):
        return h.tensor if isinstance(h, _Handle) else h

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        return False
