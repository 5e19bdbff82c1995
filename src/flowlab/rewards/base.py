"""The reward protocol, the registry of named rewards and the builders used by configs.

A reward maps a batch of images (with optional prompts and per-sample metadata) to one score
per image::

    scores = reward(images, prompts, metadata)

* ``images``: float tensor ``(N, C, H, W)`` in ``[0, 1]`` with ``C`` = 1 or 3, on any device;
* ``prompts``: ``list[str]`` of length ``N`` or ``None``;
* ``metadata``: ``list[dict]`` of length ``N`` or ``None``;
* returns a float32 tensor ``(N,)`` on the CPU. ``NaN`` marks a sample the reward could not
  score (an image with NaN/inf pixels, a sample the server returned ``null`` for, ...); a
  reward never raises because of one bad sample. Non-finite scores (``±inf``) are turned into
  NaN too, so consumers test only ``isnan``.

A whole-call failure (a reward server that stays down, a user function that raises, a
wrong number of scores) raises :class:`RewardError`.

Rewards are registered by name with :func:`register_reward` and built from config specs
(``{"name": "digits_classifier", "target": 3}``) with :func:`build_reward`: every other key
of the spec is a keyword argument of the reward's constructor, checked against its
annotations, so a misspelt or mistyped option fails at start-up with a
:class:`~flowlab.errors.ConfigError` naming ``<key>.<option>`` (the checks are :func:`flowlab.schema.check_value`, shared with the run config).
"""
from __future__ import annotations

import abc
import inspect
import typing
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from flowlab.errors import ConfigError, OptionError, RewardError
from flowlab.schema import check_value, did_you_mean

__all__ = [
    "RewardFunction",
    "RewardError",
    "OptionError",
    "REWARDS",
    "register_reward",
    "build_reward",
    "build_rewards",
    "coerce_scores",
    "check_inputs",
]




# --------------------------------------------------------------------------- protocol


def check_inputs(images: Tensor, prompts: Sequence[str] | None, metadata: Sequence[Mapping] | None) -> tuple[Tensor, list[str] | None, list[dict] | None]:
    """Validate a reward call's arguments.

    Args:
        images: float tensor ``(N, C, H, W)`` in ``[0, 1]``, ``C`` in {1, 3}.
        prompts: ``N`` strings or ``None``.
        metadata: ``N`` dicts or ``None``.

    Returns:
        ``(images, prompts, metadata)`` with ``images`` detached (same device and dtype) and
        the sequences turned into lists.

    Raises:
        TypeError, ValueError: on a wrong type, shape, channel count or length (a bug in the
            caller, not a per-sample failure).
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"reward images must be a torch.Tensor (N, C, H, W) in [0, 1], got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(
            f"reward images must be a floating-point tensor in [0, 1], got dtype {images.dtype}"
            + (" (divide uint8 images by 255)" if images.dtype == torch.uint8 else "")
        )
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"reward images must be shaped (N, C, H, W) with C = 1 or 3, got {tuple(images.shape)}")
    n = images.shape[0]
    if prompts is not None:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of N strings (one per image), not a single string")
        prompts = list(prompts)
        if len(prompts) != n:
            raise ValueError(f"got {n} images but {len(prompts)} prompts")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be strings; prompt {bad[0]} is {type(prompts[bad[0]]).__name__}")
    if metadata is not None:
        metadata = list(metadata)
        if len(metadata) != n:
            raise ValueError(f"got {n} images but {len(metadata)} metadata entries")
        bad = [i for i, m in enumerate(metadata) if not isinstance(m, Mapping)]
        if bad:
            raise TypeError(f"metadata must be dicts; entry {bad[0]} is {type(metadata[bad[0]]).__name__}")
        metadata = [dict(m) for m in metadata]
    return images.detach(), prompts, metadata


def coerce_scores(scores: Any, n: int, source: str) -> Tensor:
    """Turn a reward's output into a float32 CPU tensor ``(n,)``; non-finite values become NaN.

    Args:
        scores: a tensor, ndarray, list/tuple of numbers (``None`` is NaN) or a scalar when
            ``n == 1``.
        n: the number of images scored.
        source: what produced the scores, for error messages.

    Raises:
        RewardError: if the scores are not numbers or there are not exactly ``n`` of them.
    """
    try:
        if isinstance(scores, Tensor):
            t = scores.detach().to("cpu", torch.float32)
        elif isinstance(scores, np.ndarray):
            t = torch.from_numpy(np.asarray(scores, dtype=np.float32))
        elif isinstance(scores, (list, tuple)):
            vals = []
            for s in scores:
                if s is None:
                    vals.append(float("nan"))
                elif isinstance(s, Tensor):
                    vals.append(float(s.detach().reshape(-1)[0]) if s.numel() == 1 else _raise_type(s))
                elif isinstance(s, (bool, str, bytes)) or not isinstance(s, (int, float, np.number)):
                    _raise_type(s)
                else:
                    vals.append(float(s))
            t = torch.tensor(vals, dtype=torch.float32)
        elif isinstance(scores, (int, float, np.number)) and not isinstance(scores, bool) and n == 1:
            t = torch.tensor([float(scores)], dtype=torch.float32)
        else:
            _raise_type(scores)
    except (TypeError, ValueError) as e:
        raise RewardError(f"{source} returned scores that are not numbers ({e})") from e
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 1 or t.shape[0] != n:
        raise RewardError(f"{source} returned {tuple(t.shape)} scores for {n} images; expected one score per image, shape ({n},)")
    return torch.where(torch.isfinite(t), t, torch.full_like(t, float("nan"))).contiguous()


def _raise_type(value: Any) -> typing.NoReturn:
    raise TypeError(f"cannot read {type(value).__name__} {value!r:.60} as a score")


class RewardFunction(abc.ABC):
    """Base class of rewards: ``reward(images, prompts, metadata) -> scores``.

    Subclasses implement :meth:`score`. :meth:`__call__` validates the inputs, clamps the
    images to ``[0, 1]``, scores images with non-finite pixels as NaN without showing them to
    :meth:`score` (they are replaced by mid-grey), runs :meth:`score` under
    ``torch.no_grad()``, coerces the output to a float32 CPU tensor
    ``(N,)`` with non-finite values as NaN, and records :attr:`info`.

    Attributes:
        name: the registry name (or a descriptive name for user rewards).
        info: a dict describing the last call, for logging: ``mean`` (over the scored
            samples), ``num_nan`` and whatever the reward adds (e.g. the components of a
            combined reward). Replaced, never mutated, at each call, so reading it from
            another thread is safe.
    """

    name: str = "reward"

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}

    @abc.abstractmethod
    def score(self, images: Tensor, prompts: list[str] | None, metadata: list[dict] | None) -> Any:
        """Score a validated batch.

        Args:
            images: float ``(N, C, H, W)`` in ``[0, 1]`` (finite), on the caller's device.
            prompts: ``N`` strings or ``None``.
            metadata: ``N`` dicts or ``None``.

        Returns:
            ``N`` scores (tensor, ndarray or list; ``None``/NaN for samples that could not be
            scored), or a tuple ``(scores, info)`` where ``info`` is a dict merged into
            :attr:`info`.
        """

    def __call__(self, images: Tensor, prompts: Sequence[str] | None = None, metadata: Sequence[Mapping] | None = None) -> Tensor:
        """Score ``images``; see the module docstring for the contract."""
        images, prompts, metadata = check_inputs(images, prompts, metadata)
        n = images.shape[0]
        if n == 0:
            self.info = {"mean": float("nan"), "num_nan": 0, "num_samples": 0}
            return torch.zeros(0, dtype=torch.float32)
        bad = ~torch.isfinite(images).flatten(1).all(dim=1)
        if bool(bad.any()):
            images = torch.where(torch.isfinite(images), images, torch.full_like(images, 0.5))
        images = images.clamp(0.0, 1.0)
        with torch.no_grad():  # scores are data, never differentiated through
            out = self.score(images, prompts, metadata)
        extra: dict[str, Any] = {}
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
            out, extra = out
        scores = coerce_scores(out, n, f"reward {self.name!r}")
        bad = bad.cpu()
        if bool(bad.any()):
            scores = scores.masked_fill(bad, float("nan"))
        finite = ~torch.isnan(scores)
        self.info = {
            "mean": float(scores[finite].double().mean()) if bool(finite.any()) else float("nan"),
            "num_nan": int((~finite).sum()),
            "num_samples": n,
            **extra,
        }
        return scores

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# --------------------------------------------------------------------------- registry

REWARDS: dict[str, Callable[..., RewardFunction]] = {}
"""Registered rewards: name -> class or factory taking the spec's options as keyword arguments."""


def register_reward(name: str, factory: Callable[..., RewardFunction] | None = None):
    """Register a reward class or factory under ``name`` (usable as a decorator).

    The factory's keyword parameters are the reward's options: :func:`build_reward` checks a
    spec's keys and value types against their names and annotations (``str``, ``int``,
    ``float``, ``bool``, ``dict``, ``list``, ``Any``, unions and ``Optional``).

    Example::

        @register_reward("brightness")
        class Brightness(RewardFunction):
            def __init__(self, *, target: float = 0.5):
                super().__init__()
                self.target = target

            def score(self, images, prompts, metadata):
                return -(images.mean(dim=(1, 2, 3)) - self.target).abs()

    Raises:
        ValueError: if ``name`` is taken by another factory.
    """

    def _register(f: Callable[..., RewardFunction]):
        if not isinstance(name, str) or not name:
            raise ValueError(f"reward name must be a non-empty string, got {name!r}")
        if name in REWARDS and REWARDS[name] is not f:
            raise ValueError(f"reward {name!r} is already registered ({REWARDS[name]!r})")
        REWARDS[name] = f
        if isinstance(f, type) and issubclass(f, RewardFunction) and f.__dict__.get("name") is None:
            f.name = name
        return f

    return _register(factory) if factory is not None else _register


def _factory_options(factory: Callable) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    target = factory.__init__ if isinstance(factory, type) else factory
    sig = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: check names only
        hints = {}
    params = {
        k: p
        for k, p in sig.parameters.items()
        if k != "self" and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    return params, hints, var_kw


def build_reward(spec: Mapping[str, Any] | RewardFunction, key: str = "reward") -> RewardFunction:
    """Build one reward from a config spec.

    Args:
        spec: ``{"name": <registered name>, <option>: <value>, ...}``. A ``weight`` key is
            accepted and ignored (it belongs to :func:`build_rewards`). A ready
            :class:`RewardFunction` is returned as is.
        key: the spec's dotted config path, used in error messages (``rl.rewards[0]``).

    Returns:
        The reward.

    Raises:
        ConfigError: naming ``key`` and the field at fault: a missing or unknown ``name``, an
            unknown option (with the closest valid one), a wrong type, a missing required
            option, or a value the reward rejects (e.g. a model folder that does not exist).
    """
    if isinstance(spec, RewardFunction):
        return spec
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{key}: expected a mapping like {{name: jpeg_compressibility}}, got {type(spec).__name__} {spec!r}")
    if "name" not in spec:
        raise ConfigError(f"{key}.name: missing; choose one of {', '.join(sorted(REWARDS))}")
    name = spec["name"]
    if not isinstance(name, str) or name not in REWARDS:
        raise ConfigError(f"{key}.name: unknown reward {name!r}{did_you_mean(name, REWARDS)}; registered rewards: {', '.join(sorted(REWARDS))}")
    factory = REWARDS[name]
    params, hints, var_kw = _factory_options(factory)
    kwargs: dict[str, Any] = {}
    for field, value in spec.items():
        if field in ("name", "weight"):
            continue
        if not isinstance(field, str):
            raise ConfigError(f"{key}: option names must be strings, got {field!r}")
        if field not in params:
            if var_kw:
                kwargs[field] = value
                continue
            valid = ", ".join(params) or "none"
            raise ConfigError(f"{key}.{field}: unknown option for reward {name!r}{did_you_mean(field, params)}; valid options: {valid}")
        try:
            kwargs[field] = check_value(value, hints.get(field, params[field].annotation), field)
        except OptionError as e:
            raise ConfigError(f"{key}.{e.field}: {e.message} (reward {name!r})") from None
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise ConfigError(f"{key}.{missing[0]}: required option of reward {name!r} is missing")
    try:
        reward = factory(**kwargs)
    except OptionError as e:
        raise ConfigError(f"{key}.{e.field}: {e.message} (reward {name!r})") from e
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from e
    if not isinstance(reward, RewardFunction):
        raise ConfigError(f"{key}.name: the factory registered as {name!r} returned {type(reward).__name__}, not a RewardFunction")
    return reward


def build_rewards(specs: Sequence[Mapping[str, Any]] | Mapping[str, Any], key: str = "rewards", combine: str = "zscore") -> RewardFunction:
    """Build the reward of a config: one spec gives that reward, several a weighted
    :class:`~flowlab.rewards.combined.CombinedReward`.

    Args:
        specs: a list of specs (each as in :func:`build_reward`, with an optional ``weight``,
            default 1.0), or a single spec mapping.
        key: the list's dotted config path; spec ``i`` is reported as ``key[i]``.
        combine: how several rewards combine: ``zscore`` (default) or ``sum`` (the reference's
            weighted raw sum); see :mod:`flowlab.rewards.combined`.

    Returns:
        The reward; with one spec its ``weight`` is ignored (a single reward's scale is
        irrelevant to group-normalised advantages).

    Raises:
        ConfigError: an empty list, a bad spec, or a weight that is not a finite number.
    """
    from flowlab.rewards.combined import CombinedReward

    if isinstance(specs, (Mapping, RewardFunction)):
        specs = [specs]
    if not isinstance(specs, Sequence) or isinstance(specs, (str, bytes)):
        raise ConfigError(f"{key}: expected a list of reward specs, got {type(specs).__name__} {specs!r}")
    if len(specs) == 0:
        raise ConfigError(f"{key}: at least one reward is needed, e.g. [{{name: jpeg_compressibility}}]")
    rewards, weights = [], []
    for i, spec in enumerate(specs):
        k = f"{key}[{i}]"
        reward = build_reward(spec, key=k)
        w = spec.get("weight", 1.0) if isinstance(spec, Mapping) else 1.0
        try:
            w = check_value(w, float, "weight")
        except OptionError as e:
            raise ConfigError(f"{k}.weight: {e.message}") from None
        rewards.append(reward)
        weights.append(w)
    if len(rewards) == 1:
        return rewards[0]
    return CombinedReward(rewards, weights, combine=combine)
