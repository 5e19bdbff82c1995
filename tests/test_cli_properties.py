"""Bad input through the training CLI (``flowlab.cli.train_main``, in-process): whatever is thrown
at it ends in exit code 2 and one paragraph ``flowlab: error: ...`` that names the key or the
file at fault, never a traceback.

Property tests (hypothesis) cover malformed command lines (wrong types, out-of-range numbers,
bad choices, unknown keys, overrides without ``=``, undecodable bytes, in any position among
valid overrides) and config files (random bytes, bad YAML, YAML that is not a mapping, random
mappings, missing files, directories, non-UTF-8). ``Trainer.train`` is replaced by a sentinel
so that an input that is accidentally valid can never start a run. The schema-level checks of
each message are in tests/test_config.py; here the subject is what a user sees.

Then broken data and shapes that only show once data and model meet, through real tiny runs:
a corrupt image (in the main process and in a DataLoader worker), model sizes that do not fit
the data, an unloadable ``model.pretrained``. (An empty image folder: tests/test_cli.py.)
"""
import contextlib
import dataclasses
import io
import os
import tempfile
import typing

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import tiny_overrides
from flowlab.cli import train_main
from flowlab.recipes import RECIPES  # the top layer: the built-in recipes and their sections
from flowlab.schema import TaggedUnion
from flowlab.train.config import Config


class _WouldTrain(BaseException):
    """Raised instead of training: the input was valid."""


@pytest.fixture(autouse=True)
def _no_training(monkeypatch):
    import flowlab.train.trainer as trainer_mod

    def refuse(self):
        raise _WouldTrain(self.config)

    monkeypatch.setattr(trainer_mod.Trainer, "train", refuse)


def _run(argv):
    """``(exit code, stderr)`` of ``train_main(argv)``; ``(None, ...)`` if the config was valid."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = train_main(argv)
        except _WouldTrain:
            rc = None
    return rc, err.getvalue()


def _clean_error(rc, err, argv) -> str:
    """Assert exit code 2 and one paragraph ``flowlab: error:``; return the message."""
    assert rc == 2, f"exit code {rc} for {argv!r}: {err[-2000:]}"
    assert "Traceback" not in err, err
    assert err.count("flowlab: error:") == 1, err
    # the error starts a line of its own (after any progress bar) and is the last paragraph
    text = err[err.index("flowlab: error:"):].strip()
    start = err.index("flowlab: error:")
    assert start == 0 or err[start - 1] == "\n", err
    assert "\n\n" not in text, err
    return text


# --------------------------------------------------------------------------- the schema's leaves


def _leaves():
    """``(dotted key, type, metadata, overrides that select it)`` of every key of every recipe: a recipe's
    section is reached with ``recipe=<name>``, a variant of a tagged union with its tag (``model.type=unet``)."""
    out = {}

    def walk(cls, prefix, select):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if f.name == "sections":
                continue
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.", select)
            else:
                out.setdefault(f"{prefix}{f.name}", (f"{prefix}{f.name}", tp, dict(f.metadata), select))

    walk(Config, "", [])
    for recipe, spec in RECIPES.items():
        for name, schema in spec.sections.items():
            if isinstance(schema, TaggedUnion):
                for tag, cls in schema.variants.items():
                    walk(cls, f"{name}.", [f"recipe={recipe}", f"{name}.{schema.tag}={tag}"])
            else:
                walk(schema, f"{name}.", [f"recipe={recipe}"])
    return list(out.values())


LEAVES = _leaves()
SECTIONS = sorted({k.rsplit(".", 1)[0] for k, *_ in LEAVES if "." in k})
NAMES = {part for k, *_ in LEAVES for part in k.split(".")}
SELECT = {key: select for key, _, _, select in LEAVES}


def _base(tp):
    """``Optional[X]`` -> ``X``."""
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return [a for a in typing.get_args(tp) if a is not type(None)][0]
    return tp


def _invalid_raw(tp, meta) -> list[str]:
    """Override values (YAML text) that are wrong for a field of type ``tp`` whatever its other settings."""
    tp = _base(tp)
    out = ["{zz: 1}", "[[[1]]]"]  # a mapping, a nested list: wrong for every leaf type
    if tp is int:
        out += ["abc", "1.5", "true", "[1]", ".inf"]
    elif tp is float:
        out += ["fast", "true", ".nan", "-.inf", "[0.5]"]
    elif tp is bool:
        out += ["maybe", "2", "[true]", "0.5"]
    elif tp is str:
        out += ["[a]", "3", "true", "1.5"]
    elif typing.get_origin(tp) is list:
        out += ["5", "abc", "true"]
    if "min" in meta and tp in (int, float) and "choices" not in meta:
        out.append(repr(meta["min"] - 1) if tp is int else repr(meta["min"] - 0.5))
    if "max" in meta and tp in (int, float) and "choices" not in meta:
        out.append(repr(meta["max"] + 1))
    if "choices" in meta:
        out.append("zz_not_a_choice" if tp is str else "999999")
    return out


BAD_VALUES = [(key, raw) for key, tp, meta, _ in LEAVES for raw in _invalid_raw(tp, meta)]

_undecodable = st.binary(min_size=1, max_size=6).map(lambda b: (b"\xff" + b).decode("utf-8", "surrogateescape"))
_junk_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="="), min_size=1, max_size=15)


@st.composite
def _malformed_item(draw):
    """One bad command-line item and a fragment its error must contain."""
    kind = draw(st.sampled_from(["bad_value", "unknown_key", "no_equals", "undecodable_value", "undecodable_key"]))
    if kind == "bad_value":
        key, raw = draw(st.sampled_from(BAD_VALUES))
        return [*SELECT[key], f"{key}={raw}"], [key]
    if kind == "unknown_key":
        section = draw(st.sampled_from(["", *[s + "." for s in SECTIONS]]))
        name = draw(st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True).filter(lambda n: n not in NAMES))
        value = draw(st.sampled_from(["1", "x", "[1, 2]", "null", "{a: 1}"]))
        select = next((sel for key, *_, sel in LEAVES if key.startswith(section)), []) if section else []
        return [*select, f"{section}{name}={value}"], [f"'{section}{name}'"]
    if kind == "no_equals":
        item = draw(_junk_text.filter(lambda s: not s.lstrip().startswith("-") and s.strip()))
        return [item], ["key=value"]
    if kind == "undecodable_value":
        key, _, _, select = draw(st.sampled_from([leaf for leaf in LEAVES if leaf[0] not in ("output_dir",)]))
        return [*select, f"{key}={draw(_undecodable)}"], [key]
    return [f"train.{draw(_undecodable)}=1"], ["train."]


# valid overrides that may surround the bad one, for every recipe (none of them starts a run: training is stubbed)
_VALID = ["train.max_steps=3", "train.lr=1e-4", "seed=7", "sample.every=0", "eval.enabled=false", "train.report_to=none"]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad=_malformed_item(), before=st.lists(st.sampled_from(_VALID), max_size=3), after=st.lists(st.sampled_from(_VALID), max_size=3))
def test_property_malformed_command_lines_exit_2_naming_the_problem(bad, before, after):
    items, fragments = bad
    keys = {item.split("=", 1)[0] for item in items}
    before, after = ([v for v in vs if v.split("=", 1)[0] not in keys] for vs in (before, after))  # a later value would win
    with tempfile.TemporaryDirectory() as d:
        argv = [f"output_dir={d}/run", *before, *items, *after]
        msg = _clean_error(*_run(argv), argv)
    for frag in fragments:
        assert frag in msg, (argv, msg)


@pytest.mark.parametrize("argv,fragment", [(["--bogus"], "--bogus"), (["--config"], "--config"), (["-c"], "-c")])
def test_usage_errors_are_one_line_too(argv, fragment):
    msg = _clean_error(*_run(argv), argv)
    assert fragment in msg and "--help" in msg


# --------------------------------------------------------------------------- config files

_BROKEN_YAML = [
    b"train:\n  max_steps: [1, 2\n", b"train: {max_steps: 3", b"\ttrain: 1\n", b"a: b: c\n", b"- a\n- b\n", b"42\n",
    b"just a string\n", b"[1, 2]\n", b"train:\n  lr: 1\n lr2: 2\n", b"!!python/object:os.system x\n", b"{[1]: 2}\n",
    b"train: &a [*a]\n", b"\xff\xfe\x00t\x00r\x00", b"train:\n  lr: \xe9t\xe9\n", b"%YAML 9.9\n---\na: 1\n", b"a: 1\n---\nb: 2\n",
]


def _expected_fragment(content: bytes, path: str, parsed_ok: bool, data) -> str | None:
    if not parsed_ok or not (data is None or isinstance(data, dict)):
        return path  # unreadable, not YAML or not a mapping: the file is named
    return None  # a mapping: the message names a key instead (checked by the callers)


def _load_bytes(content: bytes):
    try:
        return True, yaml.safe_load(content)
    except (yaml.YAMLError, RecursionError):
        return False, None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(content=b"0")  # found by this property: falsy scalars were read as an empty config
@example(content=b"false")
@example(content=b"[]")
@example(content=b"")  # an empty file is the default config
@given(content=st.one_of(st.sampled_from(_BROKEN_YAML), st.binary(max_size=60), st.text(max_size=60).map(lambda s: s.encode("utf-8", "surrogatepass"))))
def test_property_any_config_file_bytes_give_a_run_or_a_clean_error(content):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.yaml")
        with open(path, "wb") as f:
            f.write(content)
        argv = ["--config", path, f"output_dir={d}/run"]
        rc, err = _run(argv)
        parsed_ok, data = _load_bytes(content)
        if rc is None:  # accepted: only an empty or valid mapping may be
            assert parsed_ok and (data is None or isinstance(data, dict)), (content, err)
            return
        msg = _clean_error(rc, err, argv)
        frag = _expected_fragment(content, path, parsed_ok, data)
        if frag:
            assert frag in msg, (content, msg)


_keys = st.one_of(st.sampled_from(sorted(NAMES)), st.text(max_size=8), st.integers(-3, 3), st.none(), st.booleans())
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True), st.text(max_size=8))
_yaml_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_keys, inner, max_size=3)), max_leaves=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.dictionaries(_keys, _yaml_values, min_size=1, max_size=4))
def test_property_random_mappings_in_a_config_file(data):
    """Random (mostly wrong) sections, keys and values: a clean error naming a key, or a valid config."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(data, f)
        argv = ["--config", path, f"output_dir={d}/run"]
        rc, err = _run(argv)
        if rc is None:
            return
        msg = _clean_error(rc, err, argv)
        top = [str(k) for k in data]
        assert any(k in msg for k in top) or path in msg, (data, msg)


def test_config_file_problems_name_the_file(tmp_path):
    cases = {
        "missing": (tmp_path / "nope.yaml", "does not exist"),
        "directory": (tmp_path, "is a directory"),
        "non_utf8": (tmp_path / "latin1.yaml", "not valid YAML"),
        "deeply_nested": (tmp_path / "deep.yaml", "not valid YAML"),
    }
    (tmp_path / "latin1.yaml").write_bytes("train:\n  lr: d\xe9j\xe0\n".encode("latin-1"))
    (tmp_path / "deep.yaml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    for name, (path, words) in cases.items():
        argv = ["--config", str(path)]
        msg = _clean_error(*_run(argv), argv)
        assert str(path) in msg and words in msg, (name, msg)


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    msg = _clean_error(*_run([f"output_dir={f}"]), f)
    assert msg.startswith("flowlab: error: output_dir:") and str(f) in msg


# --------------------------------------------------------------------------- data and shapes (real tiny runs)


@pytest.fixture
def real_training(monkeypatch):
    monkeypatch.undo()  # these go through Trainer.train for real


def _image_folder(root, n_good=3, broken=True):
    from PIL import Image

    (root / "a").mkdir(parents=True)
    for i in range(n_good):
        Image.new("RGB", (10, 12), (40 * i, 0, 0)).save(root / "a" / f"{i}.png")
    if broken:
        (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(120))  # a PNG header, then garbage
    return root


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_stops_the_run_naming_the_file(tmp_path, real_training, workers):
    pytest.importorskip("datasets")
    root = _image_folder(tmp_path / "imgs")
    argv = tiny_overrides(tmp_path / "run", "data.name=imagefolder", f"data.path={root}", "data.resolution=8",
                          "train.batch_size=4", "train.max_steps=2", f"data.num_workers={workers}")
    msg = _clean_error(*_run(argv), argv)
    assert "broken.png" in msg and "cannot decode" in msg
    assert "Original Traceback" not in msg and "worker" not in msg


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["model.type=unet", "model.block_out_channels=[8,8]", "model.norm_num_groups=3"], "divisible by num_groups"),
        (["model.type=unet", "model.block_out_channels=[8,8,8,8,8]", "model.norm_num_groups=4",
          "model.down_block_types=[DownBlock2D,DownBlock2D,DownBlock2D,DownBlock2D,DownBlock2D]",
          "model.up_block_types=[UpBlock2D,UpBlock2D,UpBlock2D,UpBlock2D,UpBlock2D]"], "divisible by 16"),
        (["model.type=unet", "model.block_out_channels=[8,8]", "model.norm_num_groups=4", "model.down_block_types=[Foo,DownBlock2D]"], "Foo"),
        (["model.type=unet", "model.block_out_channels=[8,8,8]", "model.norm_num_groups=4"], "same length"),
        (["model.type=dit", "model.patch_size=3", "model.num_layers=1"], "patch_size=3"),
        (["model.type=dit", "model.num_attention_heads=3", "model.attention_head_dim=5", "model.num_layers=1"], "divisible"),
        (["data.name=moons", "model.type=unet"], "needs image data"),
    ],
    ids=["unet-groups", "unet-depth-vs-resolution", "unet-block-type", "unet-block-lists", "dit-patch", "dit-heads", "unet-on-vectors"],
)
def test_model_that_does_not_fit_the_data_is_a_clean_error(tmp_path, real_training, extra, fragment):
    argv = tiny_overrides(tmp_path / "run", *extra)
    msg = _clean_error(*_run(argv), argv)
    assert "model" in msg and fragment in msg, msg


def test_unloadable_pretrained_model(tmp_path, real_training):
    for target in (tmp_path / "missing", tmp_path):  # nothing there; a folder that is no pipeline
        argv = tiny_overrides(tmp_path / "run", f"model.pretrained={target}")
        msg = _clean_error(*_run(argv), argv)
        assert msg.startswith("flowlab: error: model.pretrained:") and str(target) in msg


def test_wrong_channel_count_is_named(tmp_path):
    argv = tiny_overrides(tmp_path / "run", "data.name=imagefolder", f"data.path={tmp_path}", "data.channels=4")
    msg = _clean_error(*_run(argv), argv)
    assert "data.channels" in msg and "4" in msg
