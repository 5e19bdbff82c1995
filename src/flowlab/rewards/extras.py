"""Optional extras of rewards: import a reward's heavy dependency or stop at config time naming
the extra that installs it (``pip install 'flowlab[ocr]'``)."""
from __future__ import annotations

import importlib
from types import ModuleType

from flowlab.errors import OptionError

__all__ = ["EXTRAS", "require_extra"]

EXTRAS: dict[str, tuple[str, ...]] = {
    "ocr": ("paddleocr", "paddle"),
    "hps": ("hpsv2",),
    "imagereward": ("ImageReward",),
}
"""Extra name (``pyproject.toml`` ``[project.optional-dependencies]``) -> modules it provides."""


def require_extra(module: str, extra: str, reward: str, field: str = "name") -> ModuleType:
    """Import ``module`` or raise an :class:`~flowlab.errors.OptionError` naming the extra.

    Args:
        module: the module to import (``paddleocr``).
        extra: the flowlab extra that installs it (``ocr``).
        reward: the reward's registry name, for the message.
        field: the option reported as at fault (``name``: the reward itself needs the extra).

    Returns:
        The imported module.

    Raises:
        OptionError: when the import fails, with ``pip install 'flowlab[<extra>]'`` in the message;
            ``build_reward`` turns it into a ConfigError naming ``<key>.<field>``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise OptionError(
            field,
            f"reward {reward!r} needs the optional extra {extra!r}: install it with pip install 'flowlab[{extra}]' "
            f"(importing {module!r} failed: {e})",
        ) from e
