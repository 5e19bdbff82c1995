"""Typed schemas: one validator for every config section and every config-addressable option.

A schema is a dataclass whose fields carry their type and, in ``field(metadata=...)``, their
allowed values (:func:`choices`, ``min``, ``max``). :func:`build` turns a mapping (read from YAML
and ``key=value`` overrides) into that dataclass and raises an
:class:`~flowlab.errors.OptionError` (a :class:`~flowlab.errors.ConfigError`) whose message starts
with the dotted key at fault::

    build(TrainConfig, {"lr": "fast"}, "train")
    # OptionError: train.lr: expected a number, got str 'fast'

A :class:`TaggedUnion` is a section whose keys depend on one of its values (``model.type: mlp``
takes ``hidden_dim``, ``model.type: unet`` takes ``block_out_channels``); a key of another variant
is refused, so no key is accepted and then ignored.

This module is the bottom layer: it imports only the standard library and :mod:`flowlab.errors`.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from .errors import ConfigError, OptionError

__all__ = ["choices", "did_you_mean", "check_value", "type_name", "build", "TaggedUnion", "is_schema", "schema_keys"]


def choices(*values: Any, **metadata: Any) -> dict:
    """Field metadata allowing only ``values`` (plus any other metadata, e.g. ``min``)::

    solver: str = field(default="heun", metadata=choices("euler", "heun"))
    """
    return {"choices": values, **metadata}


def did_you_mean(word: str, candidates: Iterable[str], prefix: str = "") -> str:
    """``" (did you mean '<prefix><closest>'?)"`` for the closest candidate, or ``""`` if none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def type_name(tp: Any) -> str:
    """A readable name of a type annotation (``int``, ``list[int]``, ``null``)."""
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_value(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it lightly coerced.

    Coercions are those YAML makes necessary: an integral float for ``int`` (``1e3``), an int or a
    numeric string for ``float`` (YAML 1.1 reads ``1e-4`` without a dot as a string), a tuple for
    ``list``. ``Any`` (or no annotation) accepts anything; a union accepts the first arm that fits.

    Raises:
        OptionError: ``key`` and what was expected, e.g. ``train.lr: expected a number, got str 'x'``.
    """
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        for arm in arms:
            try:
                return check_value(value, arm, key)
            except OptionError:
                if len(arms) == 1:
                    raise
        raise OptionError(key, f"expected {' or '.join(type_name(a) for a in args)}, got {type(value).__name__} {value!r}")
    if tp is os.PathLike:
        if isinstance(value, os.PathLike):
            return value
        raise OptionError(key, f"expected a path, got {type(value).__name__} {value!r}")
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise OptionError(key, f"expected a mapping of keys, got {type(value).__name__} {value!r}")
        if args:
            kt, vt = args
            return {check_value(k, kt, key): check_value(v, vt, f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if origin in (list, Sequence) or tp in (list, Sequence):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            of = f" of {type_name(args[0])}" if args else ""
            raise OptionError(key, f"expected a list{of}, got {type(value).__name__} {value!r}")
        return [check_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if tp is bool:
        if not isinstance(value, bool):
            raise OptionError(key, f"expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionError(key, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionError(key, f"expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise OptionError(key, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise OptionError(key, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise OptionError(key, f"expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


def _check_range(value: Any, metadata: Mapping, key: str) -> None:
    if value is None:
        return
    if "choices" in metadata and value not in metadata["choices"]:
        raise OptionError(key, f"{value!r} is not one of {', '.join(map(repr, metadata['choices']))}")
    if "min" in metadata and value < metadata["min"]:
        raise OptionError(key, f"must be >= {metadata['min']}, got {value!r}")
    if "max" in metadata and value > metadata["max"]:
        raise OptionError(key, f"must be <= {metadata['max']}, got {value!r}")


@dataclass(frozen=True)
class TaggedUnion:
    """A section whose dataclass is picked by the value of one key, the ``tag``.

    Each variant is a dataclass with the tag as a ``str`` field whose default is its own tag
    value, so a built section is a plain dataclass that writes itself back with its tag.

    Attributes:
        name: the section's name, for messages (``model``).
        tag: the key that picks the variant (``type``).
        variants: tag value -> dataclass. Several values may share a dataclass.
        default: the tag value of a section given without the tag.
    """

    name: str
    tag: str
    variants: Mapping[str, type]
    default: str

    def variant(self, value: Any, key: str) -> type:
        """The dataclass of tag ``value`` (raises :class:`OptionError` naming ``key``)."""
        if not isinstance(value, str):
            raise OptionError(key, f"expected a string, one of {', '.join(map(repr, self.variants))}; got {type(value).__name__} {value!r}")
        if value not in self.variants:
            raise OptionError(key, f"{value!r} is not one of {', '.join(map(repr, self.variants))}{did_you_mean(value, self.variants)}")
        return self.variants[value]

    def __call__(self, **values: Any):
        """A section of the variant named by ``values[tag]`` (the default variant without it)."""
        tag = values.setdefault(self.tag, self.default)
        return self.variant(tag, f"{self.name}.{self.tag}")(**values)


def is_schema(tp: Any) -> bool:
    """Whether ``tp`` is a section schema (a dataclass or a :class:`TaggedUnion`)."""
    return isinstance(tp, TaggedUnion) or (isinstance(tp, type) and dataclasses.is_dataclass(tp))


def schema_keys(schema: Any) -> list[str]:
    """Every key a section of ``schema`` may take (all variants' keys for a tagged union)."""
    if isinstance(schema, TaggedUnion):
        keys: dict[str, None] = {}
        for cls in schema.variants.values():
            keys.update(dict.fromkeys(f.name for f in dataclasses.fields(cls)))
        return list(keys)
    return [f.name for f in dataclasses.fields(schema)]


def build(schema: Any, data: Any, prefix: str, extra: Iterable[str] = (), siblings: Mapping[str, Any] | None = None) -> Any:
    """Validate the mapping ``data`` into the dataclass (or tagged-union variant) ``schema``.

    Args:
        schema: a dataclass or a :class:`TaggedUnion`. Nested dataclass fields are built recursively.
        data: the section as read from YAML (``None`` counts as empty).
        prefix: the section's dotted key, used in every message (``model``).
        extra: keys to offer in "did you mean" hints besides the schema's own (e.g. other sections).
        siblings: other sections of the same config, name -> schema: an unknown key that one of them
            takes is answered with that section's key (``nft.rewards``: "did you mean 'rl.rewards'?").

    Returns:
        An instance of the dataclass. A YAML ``no``/``yes`` read as a bool is turned back into the
        string where the field's choices hold it (``train.mixed_precision=no``).

    Raises:
        OptionError: an unknown key (with the closest valid one), a key of another variant of a
            tagged union (naming the variant), a missing required key, a wrong type, or a value out of
            its choices or range.
    """
    data = {} if data is None else data
    where = prefix or "config"
    if not isinstance(data, Mapping):
        raise OptionError(where, f"expected a mapping of keys, got {type(data).__name__} {data!r}")
    variant_note = ""
    if isinstance(schema, TaggedUnion):
        tag_value = data.get(schema.tag, schema.default)
        cls = schema.variant(tag_value, f"{prefix}.{schema.tag}" if prefix else schema.tag)
        variant_note = f"{prefix}.{schema.tag}={tag_value}"
        other_keys = set(schema_keys(schema))
    else:
        cls, other_keys = schema, set()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            valid = ", ".join(fields)
            if k in other_keys:
                raise OptionError(key, f"not a key of {variant_note}; valid: {valid}")
            hint = did_you_mean(k, [*fields, *extra], f"{prefix}." if prefix else "")
            owner = next((name for name, other in (siblings or {}).items() if name != prefix and k in schema_keys(other)), None)
            if not hint and owner is not None:
                hint = f" (did you mean '{owner}.{k}'?)"
            raise ConfigError(f"unknown config key '{key}'{hint}; valid keys here: {valid}")
        tp = hints[k]
        if is_schema(tp):
            kwargs[k] = build(tp, v, key, siblings=siblings)
            continue
        metadata = fields[k].metadata
        if isinstance(v, bool) and {"no", "yes"} & set(metadata.get("choices", ())):
            v = "yes" if v else "no"  # YAML 1.1 reads a bare `no` as false
        value = check_value(v, tp, key)
        _check_range(value, metadata, key)
        kwargs[k] = value
    missing = [
        name for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        context = f" when {variant_note}" if variant_note else ""
        raise OptionError(f"{prefix}.{missing[0]}" if prefix else missing[0], f"required{context}")
    return cls(**kwargs)
