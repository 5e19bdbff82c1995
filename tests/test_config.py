"""Config schema: shipped YAMLs validate, overrides parse, and every mistake is a ConfigError naming the dotted key."""
import dataclasses
import glob
import os
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowlab.recipes import config_from_dict, config_to_dict, load_config  # the top layer: registers the recipes
from flowlab.schema import TaggedUnion
from flowlab.train.config import Config, ConfigError, parse_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def _err(overrides, path=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


# --------------------------------------------------------------------------- shipped configs


def test_there_are_configs():
    assert any(p.endswith("quickstart.yaml") for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_every_shipped_config_validates(path, tmp_path):
    with open(path) as f:
        raw = yaml.safe_load(f)
    overrides = []
    if raw.get("data", {}).get("name") in ("imagefolder", "hf") and not raw["data"].get("path"):
        # configs for the user's own images leave data.path to the command line
        assert "data.path" in _err([], path)
        overrides = [f"data.path={tmp_path}"]
    cfg = load_config(path, overrides)
    assert isinstance(cfg, Config)
    # every key written in the file made it into the config unchanged (nothing silently dropped)
    as_dict = config_to_dict(cfg)
    for section, values in raw.items():
        if isinstance(values, dict):
            for k, v in values.items():
                if v is not None:
                    got = as_dict[section][k]
                    assert got == v or (isinstance(v, (int, float)) and float(got) == float(v)), f"{section}.{k}"
        else:
            assert as_dict[section] == values
    from flowlab.recipes import get_recipe

    assert get_recipe(cfg).name == cfg.recipe  # the recipe exists and accepts the config


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_shipped_config_builds_its_model(path, tmp_path):
    """The model section of each config is consistent with its data (a UNet's groups divide its channels, ...)."""
    from flowlab.recipes.flow_matching.recipe import build_velocity_model

    cfg = load_config(path, [f"data.path={tmp_path}"] if "imagefolder" in open(path).read() else [])
    if cfg.recipe != "flow_matching":
        pytest.skip(f"recipe {cfg.recipe} has no velocity model section")
    d = cfg.data
    if d.name == "digits":
        shape = (1, 8, 8)
    elif d.name in ("moons", "8gaussians", "checkerboard"):
        shape = (2,)
    else:
        shape = (d.channels, d.resolution, d.resolution)
    model = build_velocity_model(cfg, shape, 10 if cfg.model.class_conditional else 0)
    assert tuple(model.sample_shape) == shape


def test_defaults_are_valid_and_round_trip():
    cfg = load_config()
    assert cfg == Config()
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg


def test_yaml_round_trip_of_a_loaded_config(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"), ["train.lr=3e-4", "model.hidden_dim=32"])
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(p) == cfg


# --------------------------------------------------------------------------- overrides


def test_overrides_parse_numbers_bools_lists():
    cfg = load_config(
        None,
        [
            "train.lr=1e-4",
            "train.max_steps=200",
            "train.adam_beta2=0.95",
            "sample.guidance_scale=3",
            "model.type=unet",
            "model.block_out_channels=[32,64]",
            "model.down_block_types=[DownBlock2D, AttnDownBlock2D]",
            "model.class_conditional=true",
            "eval.enabled=false",
            "model.pretrained=null",
            "output_dir=/tmp/some where",
            "train.resume=latest",
        ],
    )
    assert cfg.train.lr == 1e-4 and type(cfg.train.lr) is float
    assert cfg.train.max_steps == 200 and type(cfg.train.max_steps) is int
    assert cfg.train.adam_beta2 == 0.95
    assert cfg.sample.guidance_scale == 3.0 and type(cfg.sample.guidance_scale) is float
    assert cfg.model.block_out_channels == [32, 64]
    assert cfg.model.down_block_types == ["DownBlock2D", "AttnDownBlock2D"]
    assert cfg.model.class_conditional is True
    assert cfg.eval.enabled is False
    assert cfg.model.pretrained is None
    assert cfg.output_dir == "/tmp/some where"
    assert cfg.train.resume == "latest"


def test_overrides_win_over_the_file_and_keep_the_rest(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 3\ntrain:\n  max_steps: 50\n  lr: 0.01\nmodel:\n  hidden_dim: 64\n")
    cfg = load_config(p, ["train.max_steps=7", "--model.depth=2"])
    assert (cfg.seed, cfg.train.max_steps, cfg.train.lr, cfg.model.hidden_dim, cfg.model.depth) == (3, 7, 0.01, 64, 2)
    # a later override of the same key wins
    assert load_config(p, ["train.max_steps=7", "train.max_steps=9"]).train.max_steps == 9


def test_parse_overrides_nesting():
    assert parse_overrides(["a.b.c=1", "a.b.d=[1, 2]", "a.e=x", "f="]) == {"a": {"b": {"c": 1, "d": [1, 2]}, "e": "x"}, "f": None}


@pytest.mark.parametrize("item,match", [("train.max_steps", "key=value"), ("=3", "empty key"), ("train.max_steps=[1, 2", "train.max_steps")])
def test_malformed_overrides(item, match):
    assert match in _err([item])


def test_override_section_and_value_clash():
    assert "train" in _err(["train=3", "train.max_steps=5"])
    assert "train" in _err(["train.max_steps=5", "train=3"])


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "override,key,suggestion",
    [
        ("train.max_stpes=5", "train.max_stpes", "train.max_steps"),
        ("trian.max_steps=5", "trian", "train"),
        ("model.hiden_dim=5", "model.hiden_dim", "model.hidden_dim"),
        ("flow.predicton_type=x1", "flow.predicton_type", "flow.prediction_type"),
        ("sede=3", "sede", "seed"),
        ("eval.enable=false", "eval.enable", "eval.enabled"),
    ],
)
def test_unknown_keys_name_the_dotted_key_and_suggest(override, key, suggestion):
    msg = _err([override])
    assert f"unknown config key '{key}'" in msg
    assert f"did you mean '{suggestion}'" in msg


def test_unknown_key_without_close_match_lists_valid_keys():
    msg = _err(["train.zzzzzz=1"])
    assert "unknown config key 'train.zzzzzz'" in msg and "did you mean" not in msg
    assert "max_steps" in msg and "batch_size" in msg


def test_unknown_key_in_a_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_step: 10\n")
    msg = _err([], p)
    assert "train.max_step" in msg and "did you mean 'train.max_steps'" in msg


# --------------------------------------------------------------------------- wrong types, ranges, choices


@pytest.mark.parametrize(
    "override,key,words",
    [
        ("train.max_steps=abc", "train.max_steps", "integer"),
        ("train.max_steps=1.5", "train.max_steps", "integer"),
        ("train.max_steps=true", "train.max_steps", "integer"),
        ("train.max_steps=[1]", "train.max_steps", "integer"),
        ("model.class_conditional=maybe", "model.class_conditional", "true or false"),
        ("model.class_conditional=1", "model.class_conditional", "true or false"),
        ("train.lr=fast", "train.lr", "number"),
        ("train.lr=true", "train.lr", "number"),
        ("train.lr=nan", "train.lr", "finite"),
        ("train.lr=.inf", "train.lr", "finite"),
        ("model.label_dropout=.nan", "model.label_dropout", "finite"),
        ("model.type=unet model.block_out_channels=32", "model.block_out_channels", "list"),
        ("model.type=unet model.block_out_channels=[32,x]", "model.block_out_channels[1]", "integer"),
        ("data.name=5", "data.name", "string"),
        ("model={}", None, None),  # an empty section is fine
        ("train=5", "train", "mapping"),
    ],
)
def test_wrong_types_name_the_key(override, key, words):
    if key is None:
        load_config(None, override.split())
        return
    msg = _err(override.split())
    assert msg.startswith(f"{key}:") or f"'{key}'" in msg, msg
    assert words in msg


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.batch_size=0", "train.batch_size"),
        ("train.max_steps=-3", "train.max_steps"),
        ("model.label_dropout=2", "model.label_dropout"),
        ("model.label_dropout=-0.1", "model.label_dropout"),
        ("train.ema_decay=1.5", "train.ema_decay"),
        ("eval.num_samples=1", "eval.num_samples"),
        ("seed=-1", "seed"),
        ("seed=4294967296", "seed"),
    ],
)
def test_out_of_range_values_name_the_key(override, key):
    msg = _err([override])
    assert msg.startswith(f"{key}: must be")


def test_range_edges_are_inclusive():
    cfg = load_config(None, ["model.label_dropout=0", "train.ema_decay=1", "train.batch_size=1", "seed=4294967295"])
    assert cfg.model.label_dropout == 0.0 and cfg.train.ema_decay == 1.0 and cfg.seed == 2**32 - 1


@pytest.mark.parametrize(
    "override,key",
    [
        ("flow.path=foo", "flow.path"),
        ("model.type=transformer", "model.type"),
        ("sample.solver=rk4", "sample.solver"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("data.name=imagefolder data.path=x data.channels=2", "data.channels"),
    ],
)
def test_bad_choices_name_the_key_and_the_choices(override, key):
    msg = _err(override.split())
    assert msg.startswith(f"{key}: ") and "is not one of" in msg


def test_flow_path_choices_listed():
    msg = _err(["flow.path=foo"])
    assert "'linear'" in msg and "'cosine'" in msg and "'vp'" in msg


# --------------------------------------------------------------------------- files and cross-checks


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    msg = _err([], path)
    assert str(path) in msg and "does not exist" in msg


def test_invalid_yaml_names_the_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("train:\n  max_steps: [1, 2\n  lr: 0.1\n")
    msg = _err([], p)
    assert str(p) in msg and "not valid YAML" in msg


def test_yaml_that_is_not_a_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    msg = _err([], p)
    assert str(p) in msg and "mapping" in msg


def test_empty_yaml_gives_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("# nothing\n")
    assert load_config(p) == Config()


@pytest.mark.parametrize("name", ["imagefolder", "hf"])
def test_image_datasets_need_a_path(name, tmp_path):
    msg = _err([f"data.name={name}"])
    assert msg.startswith("data.path:") and "required" in msg
    assert load_config(None, [f"data.name={name}", f"data.path={tmp_path}"]).data.path == str(tmp_path)


def test_resume_must_be_latest_or_a_folder(tmp_path):
    assert "train.resume" in _err([f"train.resume={tmp_path / 'missing'}"])
    assert load_config(None, [f"train.resume={tmp_path}"]).train.resume == str(tmp_path)


def test_xformers_with_mlp_is_refused():
    assert _err(["model.type=mlp", "model.attention=xformers"]).startswith("model.attention:")


# --------------------------------------------------------------------------- property tests


def _leaf_fields():
    """(dotted key, type, metadata) of every non-section field of the schema."""
    out = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            if f.name == "sections":  # the recipe's sections, walked below
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], key + ".")
            else:
                out.append((key, hints[f.name], dict(f.metadata)))

    walk(Config, "")
    for name, schema in RECIPE_SECTIONS.items():  # the default recipe's sections (default variant of a union)
        walk(schema.variants[schema.default] if isinstance(schema, TaggedUnion) else schema, name + ".")
    return out


def _every_key_of(schema) -> set:
    variants = schema.variants.values() if isinstance(schema, TaggedUnion) else [schema]
    return {f.name for cls in variants for f in dataclasses.fields(cls)}


RECIPE_SECTIONS = dict(__import__("flowlab.recipes", fromlist=["RECIPES"]).RECIPES["flow_matching"].sections)
LEAVES = _leaf_fields()
SECTIONS = [""] + [f"{name}." for name in ("train", "hub", *RECIPE_SECTIONS)]
ALL_NAMES = (
    {k.rsplit(".", 1)[-1] for k, _, _ in LEAVES} | {s.rstrip(".") for s in SECTIONS if s}
    | {k for schema in RECIPE_SECTIONS.values() for k in _every_key_of(schema)} | {"sections"}
)

_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True).filter(lambda n: n not in ALL_NAMES)
_plain = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20)
)
_values = st.one_of(_plain, st.lists(_plain, max_size=3), st.dictionaries(st.text(max_size=5), _plain, max_size=2))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(section=st.sampled_from(SECTIONS), name=_names, value=_values)
def test_property_unknown_keys_always_raise_config_error(section, name, value):
    key = section + name
    data: dict = {}
    node = data
    if section:
        node = data.setdefault(section.rstrip("."), {})
    node[name] = value
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert f"'{key}'" in str(e.value)


def _is_valid(value, tp, meta) -> bool:
    """Whether ``value`` (as parsed from YAML) is an acceptable value for a field: an independent oracle."""
    import math

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None:
            return True
        tp = [a for a in args if a is not type(None)][0]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return isinstance(value, list) and all(_is_valid(v, args[0], {}) for v in value)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())
    elif tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return False
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif tp is str:
        if isinstance(value, bool) and {"no", "yes"} & set(meta.get("choices", ())):
            value = "yes" if value else "no"  # YAML's reading of a bare no / yes, for fields offering them
        ok = isinstance(value, str)
    else:  # pragma: no cover
        raise AssertionError(tp)
    if not ok:
        return False
    if "choices" in meta and value not in meta["choices"]:
        return False
    if "min" in meta and value < meta["min"]:
        return False
    if "max" in meta and value > meta["max"]:
        return False
    return True


_raw_text = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.sampled_from(["abc", "1.5", "-1", "0", "yes", "maybe", "[1, x]", "{a: 1}", "nan", ".inf", "1e-4", "1e400", "null", "~", "''", "[", "!!binary x"]),
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
# keys whose validity depends on more than their own value (cross-checks, the recipe registry) are left to the tests above
_SELF_CONTAINED = [leaf for leaf in LEAVES if leaf[0] not in ("recipe", "train.resume", "model.attention", "data.name", "data.path", "model.type")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(leaf=st.sampled_from(_SELF_CONTAINED), raw=_raw_text)
def test_property_garbage_values_raise_config_error_naming_the_key(leaf, raw):
    key, tp, meta = leaf
    override = f"{key}={raw}"
    try:
        parsed = yaml.safe_load(raw) if raw.strip() else None
        parse_ok = True
    except yaml.YAMLError:
        parse_ok = False
    try:
        cfg = load_config(None, [override])
    except ConfigError as e:
        assert key in str(e), (override, str(e))
        assert not (parse_ok and _is_valid(parsed, tp, meta)), f"valid value rejected: {override!r}: {e}"
        return
    # accepted: then it must have been a valid value, stored under the key
    assert parse_ok and _is_valid(parsed, tp, meta), f"invalid value accepted: {override!r}"
    section, _, name = key.rpartition(".")
    obj = getattr(cfg, section) if section else cfg
    assert hasattr(obj, name)


@settings(max_examples=150, deadline=None)
@given(leaf=st.sampled_from(_SELF_CONTAINED), value=_values)
def test_property_garbage_python_values_raise_config_error(leaf, value):
    """Same through config_from_dict (values as a YAML file would give them, including nested garbage)."""
    key, tp, meta = leaf
    data: dict = {}
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    try:
        config_from_dict(data)
    except ConfigError as e:
        assert key in str(e)
        assert not _is_valid(value, tp, meta), f"valid value rejected: {key}={value!r}"
        return
    assert _is_valid(value, tp, meta), f"invalid value accepted: {key}={value!r}"


def test_recipe_sections_register_validate_and_serialise():
    """A recipe's own section (``register_recipe(..., sections=...)``) is validated and read like the core ones."""
    import dataclasses

    from flowlab.train.registry import RECIPES, register_recipe

    @dataclasses.dataclass
    class ToySection:
        beta: float = dataclasses.field(default=1.0, metadata={"min": 0.0})
        groups: int = 4

    register_recipe("toy_recipe", {"toy_recipe": ToySection}, load=lambda: None)
    try:
        cfg = load_config(None, ["recipe=toy_recipe", "toy_recipe.beta=0.5"])
        assert cfg.toy_recipe.beta == 0.5 and cfg.toy_recipe.groups == 4
        assert config_to_dict(cfg)["toy_recipe"] == {"beta": 0.5, "groups": 4}
        assert set(config_to_dict(cfg)) == {"recipe", "output_dir", "seed", "toy_recipe", "sample", "eval", "train", "hub"}
        assert load_config(None, ["recipe=toy_recipe"]).toy_recipe.beta == 1.0  # defaults when absent
        with pytest.raises(ConfigError, match="toy_recipe.beta"):
            load_config(None, ["recipe=toy_recipe", "toy_recipe.beta=-1"])
        with pytest.raises(ConfigError, match="did you mean 'toy_recipe.groups'"):
            load_config(None, ["recipe=toy_recipe", "toy_recipe.grups=3"])
        with pytest.raises(ConfigError, match="did you mean 'toy_recipe'"):
            load_config(None, ["recipe=toy_recipe", "toy_recipes.beta=1"])
        # the section belongs to its recipe: another recipe's config refuses it, naming both
        with pytest.raises(ConfigError, match=r"toy_recipe: section of recipe toy_recipe; recipe 'flow_matching' does not read it"):
            load_config(None, ["toy_recipe.beta=1"])
    finally:
        RECIPES.pop("toy_recipe")
    with pytest.raises(AttributeError):
        load_config(None, []).toy_recipe


def test_bare_no_is_the_string_choice_not_false():
    """YAML 1.1 reads `no` as false; for a field whose choices include "no" it means the choice."""
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        load_config(None, ["train.mixed_precision=true"])  # "yes" is not a choice


# --------------------------------------------------------------------------- sections owned by recipes


@pytest.mark.parametrize(
    "overrides,start,words",
    [
        (["recipe=nft", "data.name=digits"], "data: section of recipe flow_matching, meanflow, noprop", ["recipe 'nft' does not read it"]),
        (["recipe=reversal_jepa", "model.hidden_dim=8"], "model: section of recipe", ["recipe 'reversal_jepa'"]),
        (["noprop.variant=dt"], "noprop: section of recipe noprop", ["recipe 'flow_matching'"]),
        (["recipe=flowgrpo", "nft.kl_coef=0.1"], "nft: section of recipe nft", ["recipe 'flowgrpo'"]),
    ],
)
def test_a_section_the_recipe_does_not_read_is_refused(overrides, start, words):
    msg = _err(overrides)
    assert msg.startswith(start), msg
    assert all(w in msg for w in words), msg


@pytest.mark.parametrize(
    "overrides,key,variant",
    [
        (["data.resolution=16"], "data.resolution", "data.name=digits"),  # digits are 8x8 greyscale
        (["data.channels=1"], "data.channels", "data.name=digits"),
        (["data.name=moons", "data.split=test"], "data.split", "data.name=moons"),
        (["model.block_out_channels=[8,8]"], "model.block_out_channels", "model.type=mlp"),
        (["model.type=dit", "model.hidden_dim=8"], "model.hidden_dim", "model.type=dit"),
        (["model.type=conservative", "model.attention=xformers"], "model.attention", "model.type=conservative"),
        (["recipe=nft", "rl.prompts=[a cat]"], "rl.prompts", "rl.pipeline=flowlab"),
        (["recipe=nft", "rl.pipeline=sd3", "rl.base=x/y", "rl.prompts=[a]", "rl.class_labels=[1]"], "rl.class_labels", "rl.pipeline=sd3"),
    ],
)
def test_keys_of_another_variant_are_refused_not_ignored(overrides, key, variant):
    msg = _err(overrides)
    assert msg.startswith(f"{key}: not a key of {variant}; valid: "), msg


def test_the_engine_sample_section_takes_no_sampler_settings_for_recipes_without_them():
    msg = _err(["recipe=noprop", "sample.solver=heun"])
    assert "unknown config key 'sample.solver'" in msg and "every" in msg


def test_a_key_of_a_sibling_section_is_pointed_to():
    """docs once said nft.rewards; the key is rl.rewards, and the error says so."""
    msg = _err(["recipe=nft", "nft.rewards=[{name: jpeg_compressibility}]"])
    assert "unknown config key 'nft.rewards'" in msg and "did you mean 'rl.rewards'?" in msg
    assert "did you mean 'flow.time_sampler'?" in _err(["recipe=nft", "nft.time_sampler=uniform"])


def test_rl_settings_validate_themselves():
    assert _err(["recipe=nft", "rl.rewards=[]"]).startswith("rl.rewards: give at least one reward")
    assert _err(["recipe=nft", "rl.pipeline=sd3", "rl.base=x/y"]).startswith("rl.prompts: an sd3 pipeline needs prompts")
    assert _err(["recipe=nft", "rl.base=null"]).startswith("rl.base:")
    sd3 = load_config(None, ["recipe=flowgrpo", "rl.pipeline=sd3", "rl.base=x/y", "rl.prompts=[a cat, a dog]"])
    assert sd3.rl.conditions() == ["a cat", "a dog"] and not hasattr(sd3.rl, "class_labels")
    flowlab_rl = load_config(None, ["recipe=nft", "rl.class_labels=[3, 5]"]).rl
    assert flowlab_rl.conditions() == [3, 5] and not hasattr(flowlab_rl, "prompts")
    assert load_config(None, ["recipe=nft"]).rl.conditions() == [None]  # unconditional: the null class


def test_noprop_model_backbone_must_be_an_image_backbone():
    assert _err(["recipe=noprop", "noprop.backbone=model", "model.type=conservative"]).startswith("model.type: noprop.backbone=model")
    assert load_config(None, ["recipe=noprop", "noprop.backbone=model", "model.type=unet"]).model.type == "unet"


@pytest.mark.parametrize(
    "overrides,model_keys,data_keys",
    [
        ([], {"type", "class_conditional", "label_dropout", "pretrained", "dropout", "hidden_dim", "depth", "time_embed_dim"}, {"name", "split"}),
        (["model.type=unet", "model.block_out_channels=[16,32]"], {"block_out_channels", "norm_num_groups", "attention"}, {"name", "split"}),
        (["model.type=dit", "model.patch_size=4", "data.name=moons"], {"num_layers", "patch_size", "attention"}, {"name", "num_samples"}),
        (["data.name=hf", "data.path=user/images", "data.resolution=16"], {"hidden_dim"}, {"path", "resolution", "channels", "num_workers"}),
    ],
    ids=["mlp-digits", "unet", "dit-moons", "mlp-hf"],
)
def test_tagged_union_sections_round_trip_through_config_yaml(tmp_path, overrides, model_keys, data_keys):
    cfg = load_config(None, overrides)
    saved = config_to_dict(cfg)
    assert model_keys <= set(saved["model"]) and data_keys <= set(saved["data"])
    if saved["model"]["type"] == "mlp":  # an MLP run's config lists no UNet / DiT keys
        assert not {"block_out_channels", "num_layers", "attention", "patch_size"} & set(saved["model"])
    if saved["data"]["name"] == "digits":  # nor image-folder keys for the embedded digits
        assert set(saved["data"]) == {"name", "split"}
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(saved, sort_keys=False))
    again = load_config(p)
    assert again == cfg and type(again.model) is type(cfg.model) and type(again.data) is type(cfg.data)
    assert list(config_to_dict(again)) == ["recipe", "output_dir", "seed", "data", "model", "flow", "sample", "eval", "train", "hub"]


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_every_shipped_config_round_trips_through_its_saved_form(path, tmp_path):
    """What a run writes to config.yaml (config_to_dict) loads back to the same config."""
    cfg = load_config(path, [f"data.path={tmp_path}"] if "imagefolder" in open(path).read() else [])
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    assert load_config(p) == cfg


def test_the_light_name_lists_match_the_implementations():
    from flowlab.data import TOY2D
    from flowlab.flow.solvers import SOLVERS
    from flowlab.names import SOLVER_NAMES, TOY2D_NAMES

    assert tuple(SOLVERS) == SOLVER_NAMES and tuple(TOY2D) == TOY2D_NAMES


def test_rl_prerequisite_is_the_base_run_and_the_engine_does_not_train_it(tmp_path, monkeypatch):
    """A missing rl.base is a prerequisite the top layer trains; a Trainer never trains it from inside."""
    from flowlab.recipes import Trainer, get_recipe

    base = tmp_path / "base" / "pipeline"
    cfg = load_config(os.path.join(ROOT, "configs", "nft_digits.yaml"),
                      [f"rl.base={base}", f"rl.base_config={os.path.join(ROOT, 'configs', 'quickstart.yaml')}", f"output_dir={tmp_path / 'rl'}"])
    (pre,) = get_recipe(cfg).prerequisites()
    assert pre.recipe == "flow_matching" and pre.output_dir == str(tmp_path / "base")
    with pytest.raises(ConfigError, match=r"rl.base: .* does not exist; train it first"):
        Trainer(cfg)
    assert not (tmp_path / "base").exists()
    # a Hub id, with or without an owner, is never trained (it used to be taken for a local folder "someone/")
    for hub_id in ("some-hub-model", "someone/digits-flow"):
        not_a_path = load_config(os.path.join(ROOT, "configs", "nft_digits.yaml"), [f"rl.base={hub_id}"])
        assert get_recipe(not_a_path).prerequisites() == [], hub_id
    # ...unless its first component is a local folder: then it is a local path, trained there
    (tmp_path / "someone").mkdir()
    monkeypatch.chdir(tmp_path)
    quickstart = f"rl.base_config={os.path.join(ROOT, 'configs', 'quickstart.yaml')}"
    local = load_config(os.path.join(ROOT, "configs", "nft_digits.yaml"), ["rl.base=someone/pipeline", quickstart])
    assert [p.output_dir for p in get_recipe(local).prerequisites()] == ["someone"]
    # a missing local folder that is not a run's pipeline/ folder cannot be what training the base writes
    misnamed = load_config(os.path.join(ROOT, "configs", "nft_digits.yaml"), [f"rl.base={tmp_path / 'base' / 'model'}", quickstart])
    with pytest.raises(ConfigError, match=r"rl.base: .*model does not exist; .* so name that folder \(e.g. .*base/pipeline\)"):
        get_recipe(misnamed).prerequisites()


def test_a_section_the_run_ignores_is_refused_and_not_saved(tmp_path):
    """NoProp's paper blocks do not read `model:`: giving it is an error, and the saved config leaves it out."""
    from flowlab.recipes import load_config
    from flowlab.train.config import config_from_dict, config_to_dict

    with pytest.raises(ConfigError, match=r"^model: this run ignores the section \(noprop.backbone=paper"):
        load_config("configs/noprop_dt_digits.yaml", ["model.type=unet", f"output_dir={tmp_path}"])
    cfg = load_config("configs/noprop_dt_digits.yaml", [f"output_dir={tmp_path}"])
    saved = config_to_dict(cfg)
    assert "model" not in saved and "noprop" in saved
    assert config_to_dict(config_from_dict(saved)) == saved
    with_model = load_config("configs/noprop_dt_digits.yaml", ["noprop.backbone=model", "model.type=unet", f"output_dir={tmp_path}"])
    assert "model" in config_to_dict(with_model)
