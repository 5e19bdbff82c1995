"""Any user function as a reward: ``{name: python, function: "my_pkg.rewards:brightness"}``.

The function is called as ``fn(images, prompts, metadata, **kwargs)`` with the reward call's
arguments (float ``(N, C, H, W)`` images in ``[0, 1]``) and returns ``N`` scores as a list,
ndarray or tensor (``None``/NaN for samples it cannot score). The DDPO/FlowGRPO convention
``(scores, info)`` is accepted too: a returned pair whose second item is a dict is read as
scores plus an info dict, merged into :attr:`~flowlab.rewards.base.RewardFunction.info`.

If the attribute is a class, it is instantiated once with ``kwargs`` and the instance is
called with ``(images, prompts, metadata)``: a way to load a model once.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from torch import Tensor

from flowlab.rewards.base import OptionError, RewardError, RewardFunction, register_reward
from flowlab.schema import did_you_mean

__all__ = ["PythonReward", "import_callable"]


def import_callable(spec: str, field: str = "function") -> Callable:
    """Import ``"package.module:attr"`` (``attr`` may be dotted, ``Class.method``).

    Raises:
        OptionError: (field ``field``) if the spec is malformed, the module cannot be imported
            (with the underlying ImportError, including one raised inside the module), the
            attribute is missing (with the closest names) or is not callable.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise OptionError(field, f"expected 'module:function' (e.g. 'my_rewards:brightness'), got {spec!r}")
    module_name, attr = (s.strip() for s in spec.split(":"))
    if not module_name or not attr:
        raise OptionError(field, f"expected 'module:function' with both parts non-empty, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise OptionError(field, f"cannot import module {module_name!r} of {spec!r}: {e}; is it installed or on sys.path/PYTHONPATH?") from e
        raise OptionError(field, f"module {module_name!r} of {spec!r} failed to import a dependency: {e}") from e
    except Exception as e:  # an error raised while executing the module
        raise OptionError(field, f"importing module {module_name!r} of {spec!r} raised {type(e).__name__}: {e}") from e
    obj: Any = module
    walked = module_name
    for part in attr.split("."):
        if not hasattr(obj, part):
            hint = did_you_mean(part, [n for n in dir(obj) if not n.startswith("_")])
            raise OptionError(field, f"{walked!r} has no attribute {part!r} (from {spec!r}){hint}")
        obj = getattr(obj, part)
        walked = f"{walked}.{part}"
    if not callable(obj):
        raise OptionError(field, f"{spec!r} is a {type(obj).__name__}, not a callable")
    return obj


@register_reward("python")
class PythonReward(RewardFunction):
    """A user function (or class) given as ``module:attribute``.

    Args:
        function: ``"module:function"`` or ``"module:Class"``.
        kwargs: extra keyword arguments: passed to the function at every call, or to the
            class's constructor once.
        label: the reward's name in logs (default: the function spec).
    """

    def __init__(self, *, function: str, kwargs: dict[str, Any] | None = None, label: str | None = None):
        super().__init__()
        obj = import_callable(function)
        kwargs = dict(kwargs or {})
        if isinstance(obj, type):
            try:
                self.fn = obj(**kwargs)
            except Exception as e:
                raise OptionError("kwargs", f"constructing {function!r} with {kwargs} raised {type(e).__name__}: {e}") from e
            self.kwargs: dict[str, Any] = {}
        else:
            self.fn = obj
            self.kwargs = kwargs
        self.function = function
        self.name = label or function

    def score(self, images: Tensor, prompts: list[str] | None, metadata: list[dict] | None) -> Any:
        try:
            out = self.fn(images, prompts, metadata, **self.kwargs)
        except Exception as e:
            raise RewardError(f"user reward {self.function!r} raised {type(e).__name__}: {e}") from e
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
            return out[0], {"user": out[1]} if out[1] else {}
        return out
