"""flowlab.schema: the one validator of config sections and reward options."""
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import pytest

from flowlab.errors import ConfigError, OptionError
from flowlab.schema import TaggedUnion, build, check_value, choices, did_you_mean, schema_keys


@pytest.mark.parametrize(
    "value,tp,expected",
    [
        (3, int, 3),
        (3.0, int, 3),  # YAML's 3e0
        (2, float, 2.0),
        ("1e-4", float, 1e-4),  # YAML 1.1 reads 1e-4 (no dot) as a string
        ((1, 2), list[int], [1, 2]),
        (None, Optional[int], None),
        ("a", Union[int, str], "a"),  # the first arm that fits
        (5, Union[int, str], 5),
        ({"a": 1}, dict[str, int], {"a": 1}),
        (object, Any, object),
    ],
)
def test_check_value_accepts_and_coerces(value, tp, expected):
    got = check_value(value, tp, "k")
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    "value,tp,key,words",
    [
        (True, int, "k", "expected an integer, got bool True"),
        (1.5, int, "k", "expected an integer"),
        ("fast", float, "k", "expected a number"),
        (float("inf"), float, "k", "expected a finite number"),
        (1, bool, "k", "expected true or false"),
        (3, str, "k", "expected a string"),
        ([1, "x"], list[int], "k[1]", "expected an integer"),
        ("x", Optional[int], "k", "expected an integer"),  # one arm: that arm's message
        ([1], Union[int, str], "k", "expected int or str"),
        ({"a": "x"}, dict[str, int], "k.a", "expected an integer"),
        ("p", os.PathLike, "k", "expected a path"),
    ],
)
def test_check_value_errors_name_the_key(value, tp, key, words):
    with pytest.raises(OptionError) as e:
        check_value(value, tp, "k")
    assert e.value.field == key and words in e.value.message and str(e.value).startswith(f"{key}: ")
    assert isinstance(e.value, ConfigError)


def test_did_you_mean():
    assert did_you_mean("max_stpes", ["max_steps", "lr"], "train.") == " (did you mean 'train.max_steps'?)"
    assert did_you_mean("zzzz", ["max_steps"]) == ""


@dataclass
class _Small:
    kind: str = field(default="small", metadata=choices("small"))
    width: int = field(default=4, metadata={"min": 1, "max": 8})


@dataclass(kw_only=True)
class _Big:
    kind: str = field(default="big", metadata=choices("big", "huge"))
    path: str
    mode: str = field(default="no", metadata=choices("no", "fp16"))


UNION = TaggedUnion(name="net", tag="kind", variants={"small": _Small, "big": _Big, "huge": _Big}, default="small")


def test_build_a_tagged_union_picks_the_variant_by_its_tag():
    assert build(UNION, None, "net") == _Small()
    assert build(UNION, {"width": 8}, "net") == _Small(width=8)
    big = build(UNION, {"kind": "huge", "path": "p", "mode": False}, "net")  # YAML's bare `no`
    assert big == _Big(kind="huge", path="p", mode="no")
    assert dataclasses.asdict(big)["kind"] == "huge"  # the tag is kept, so the section writes itself back
    assert UNION(kind="big", path="x") == _Big(path="x") and UNION() == _Small()
    assert schema_keys(UNION) == ["kind", "width", "path", "mode"]


@pytest.mark.parametrize(
    "data,message",
    [
        ({"path": "p"}, "net.path: not a key of net.kind=small; valid: kind, width"),
        ({"kind": "big"}, "net.path: required when net.kind=big"),
        ({"kind": "bigg"}, "net.kind: 'bigg' is not one of 'small', 'big', 'huge' (did you mean 'big'?)"),
        ({"kind": 3}, "net.kind: expected a string"),
        ({"width": 9}, "net.width: must be <= 8, got 9"),
        ({"width": 0}, "net.width: must be >= 1, got 0"),
        ({"widht": 2}, "unknown config key 'net.widht' (did you mean 'net.width'?); valid keys here: kind, width"),
        ([1], "net: expected a mapping of keys, got list [1]"),
    ],
)
def test_build_errors(data, message):
    with pytest.raises(ConfigError) as e:
        build(UNION, data, "net")
    assert str(e.value).startswith(message), str(e.value)


def test_build_points_to_the_sibling_section_that_takes_a_key():
    @dataclass
    class Other:
        rewards: list = field(default_factory=list)

    with pytest.raises(ConfigError, match=r"unknown config key 'net.rewards' \(did you mean 'rl.rewards'\?\)"):
        build(UNION, {"rewards": []}, "net", siblings={"net": UNION, "rl": Other})
