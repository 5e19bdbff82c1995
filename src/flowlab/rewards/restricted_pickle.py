"""A pickle codec restricted to plain data, for reward servers whose wire format is pickle.

The FlowGRPO reward servers (GenEval, DeQA, UnifiedReward; ``yifan123/reward-server``) speak
pickle both ways. Unpickling an answer with :func:`pickle.loads` would let whoever controls the
server, or the network path to it, run arbitrary code in the training process, because a
pickle can name any importable callable (``os.system``) and call it. :func:`loads` instead
uses an :class:`pickle.Unpickler` whose ``find_class`` refuses every global except the few
that plain data needs:

* built-in containers and scalars need no global at all (``dict``, ``list``, ``tuple``,
  ``str``, ``bytes``, ``int``, ``float``, ``bool``, ``None``); ``set``/``frozenset``/
  ``complex``/``bytearray`` are allowed by name;
* numpy arrays and scalars (a server may return ``np.float32`` scores): ``numpy.ndarray``,
  ``numpy.dtype``, ``numpy.core.multiarray._reconstruct`` / ``scalar``,
  ``numpy.core.numeric._frombuffer`` (protocol 5), and their ``numpy._core`` spellings in numpy 2. An object array can only hold what the rest of the
  allow-list admits, since its items are unpickled through this same ``find_class``.

Anything else (a class, a function, ``builtins.eval``) raises
:class:`~flowlab.errors.RewardError` naming the refused global, before it is called.
:func:`dumps` is plain ``pickle.dumps`` (protocol 4): what we send is our own data.

This module is one of the two places flowlab imports :mod:`pickle`, both with a restricted
``find_class`` (the other: :func:`flowlab.train.checkpoint.check_dcp_metadata`; ``tests/test_security.py``
allows exactly these files).
"""
from __future__ import annotations

import _compat_pickle
import io
import pickle
from typing import Any

from flowlab.errors import RewardError

__all__ = ["ALLOWED_GLOBALS", "RestrictedUnpickler", "UnpicklingError", "loads", "dumps"]

UnpicklingError = pickle.UnpicklingError

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "complex"),
        ("builtins", "bytearray"),
        ("builtins", "slice"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),  # protocol 2 pickles of bytes: _codecs.encode(str, 'latin1')
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5 arrays
        ("numpy._core.numeric", "_frombuffer"),
    }
)
"""``(module, name)`` pairs an answer may reference; everything else is refused."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS` (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names of protocol 0-2 pickles (``__builtin__.set``), mapped as pickle's fix_imports does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) not in ALLOWED_GLOBALS:
            raise RewardError(
                f"refused to unpickle the global {module}.{name} in a reward server's answer: only plain data "
                "(dicts, lists, numbers, strings, numpy arrays) is accepted, never code"
            )
        return super().find_class(module, name)


def loads(data: bytes) -> Any:
    """Unpickle ``data`` allowing only plain data.

    Raises:
        RewardError: if the pickle references a global outside :data:`ALLOWED_GLOBALS`.
        pickle.UnpicklingError, EOFError, ValueError: if ``data`` is not a valid pickle.
    """
    return RestrictedUnpickler(io.BytesIO(data)).load()


def dumps(obj: Any) -> bytes:
    """``pickle.dumps(obj, protocol=4)``: readable by the reference servers' Python 3 ``pickle.loads``."""
    return pickle.dumps(obj, protocol=4)
