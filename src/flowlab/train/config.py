"""Typed configuration: YAML files plus ``key=value`` overrides, validated before training.

The core of every run is ``recipe``, ``output_dir``, ``seed``, ``train`` and ``hub``; every other
section belongs to a recipe, which declares it when it is registered (:mod:`flowlab.train.registry`;
the built-in recipes are registered by :mod:`flowlab.recipes`). :func:`load_config` merges a YAML file
with dotted overrides (``train.max_steps=200``) and validates it with :mod:`flowlab.schema`: an
unknown key, a section the chosen recipe does not read, a wrong type or a value out of range is a
:class:`ConfigError` that names the dotted key. Validation imports neither torch nor diffusers.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from ..errors import ConfigError
from ..schema import build, choices, did_you_mean
from .registry import RECIPES, recipe_spec

__all__ = [
    "ConfigError",
    "Config",
    "TrainConfig",
    "SampleConfig",
    "EvalConfig",
    "HubConfig",
    "CORE_SECTIONS",
    "check_hub_config",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "parse_overrides",
]


@dataclass
class TrainConfig:
    """``train``: the optimisation loop. ``batch_size`` is the *global* batch per optimiser step."""

    max_steps: int = field(default=2000, metadata={"min": 1})
    batch_size: int = field(default=128, metadata={"min": 1})
    lr: float = field(default=1e-3, metadata={"min": 0.0})
    weight_decay: float = field(default=0.0, metadata={"min": 0.0})
    adam_beta1: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})
    adam_beta2: float = field(default=0.999, metadata={"min": 0.0, "max": 1.0})
    adam_eps: float = field(default=1e-8, metadata={"min": 0.0})
    lr_scheduler: str = field(
        default="cosine", metadata=choices("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
    )
    warmup_steps: int = field(default=100, metadata={"min": 0})
    grad_accum_steps: int = field(default=1, metadata={"min": 1})
    max_grad_norm: float = field(default=1.0, metadata={"min": 0.0})  # 0 disables clipping
    mixed_precision: str = field(default="no", metadata=choices("no", "fp16", "bf16"))
    ema_decay: float = field(default=0.999, metadata={"min": 0.0, "max": 1.0})
    checkpoint_every: int = field(default=500, metadata={"min": 0})  # 0: only at the end
    checkpoints_total_limit: int = field(default=2, metadata={"min": 1})
    resume: Optional[str] = None  # "latest" or a checkpoint folder
    overwrite: bool = False  # allow starting afresh in an output_dir that holds another run
    log_every: int = field(default=25, metadata={"min": 1})
    max_nonfinite_steps: int = field(default=20, metadata={"min": 1})
    report_to: str = field(default="tensorboard", metadata=choices("tensorboard", "wandb", "none"))
    compile: bool = False  # run the model through torch.compile (accelerate's dynamo_backend="inductor")
    # shard parameters, gradients and optimiser state with torch FSDP2 (``fully_shard``) on a launch where
    # accelerate does not set FSDP up itself (a CPU/gloo multi-process launch); an accelerate FSDP launch
    # (configs/accelerate/fsdp.yaml) shards whatever this says
    fsdp: bool = False
    fsdp_min_num_params: int = field(default=1_000_000, metadata={"min": 0})  # submodules this large get their own FSDP unit


@dataclass
class SampleConfig:
    """``sample``: when the trainer writes sample grids (every recipe has this section; a recipe
    that samples with settings of its own extends it, e.g. flow matching's solver)."""

    every: int = field(default=500, metadata={"min": 0})  # 0: only at the end
    num_images: int = field(default=64, metadata={"min": 1})


@dataclass
class EvalConfig:
    """``eval``: when the trainer calls the recipe's evaluation (every recipe has this section; a
    recipe may extend it with settings of its own)."""

    every: int = field(default=0, metadata={"min": 0})  # 0: only at the end
    enabled: bool = True


@dataclass
class HubConfig:
    """``hub``: push the trained artefact to the Hugging Face Hub at the end of training.

    There is deliberately no ``token`` key: a token in a config would be saved in
    ``config.yaml`` and pushed with the model. The token comes from ``HF_TOKEN`` or the
    cached ``hf auth login`` (``huggingface-cli login``).
    """

    push: bool = False  # push from the main process when training ends (needs repo_id)
    repo_id: Optional[str] = None  # "user/name" or "org/name"
    private: bool = False  # create the repo private (ignored if it exists)
    revision: Optional[str] = None  # branch to commit to (created if missing); None: main
    license: str = "apache-2.0"  # the model card's license (a Hub license id)


@dataclass
class Config:
    """A whole run: the core (``recipe``, ``output_dir``, ``seed``, ``train``, ``hub``) and the sections
    of its recipe, read as attributes (``config.model``, ``config.rl``).

    A section of the recipe that the config did not give reads as its defaults. A section of
    another recipe is an ``AttributeError`` naming the recipe.
    """

    recipe: str = "flow_matching"
    output_dir: str = "runs/default"
    seed: int = field(default=0, metadata={"min": 0, "max": 2**32 - 1})  # numpy's seed range
    train: TrainConfig = field(default_factory=TrainConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    sections: dict[str, Any] = field(default_factory=dict, repr=False)  # the recipe's sections, by name

    def __post_init__(self):
        spec = RECIPES.get(self.recipe)
        if spec is not None:  # every section of the recipe, so equal runs compare equal
            for name, schema in spec.sections.items():
                if name not in self.sections:
                    self.sections[name] = schema()

    def __getattr__(self, name: str):
        # only reached when normal lookup fails: the recipe's sections
        if name.startswith("__") or name == "sections":
            raise AttributeError(name)
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        spec = RECIPES.get(self.__dict__.get("recipe"))
        if spec is not None and name in spec.sections:
            return sections.setdefault(name, spec.sections[name]())
        users = sorted(r for r, s in RECIPES.items() if name in s.sections)
        if users:
            raise AttributeError(f"config section {name!r} belongs to recipe {', '.join(users)}, not to recipe {self.recipe!r}")
        raise AttributeError(f"'Config' object has no attribute {name!r}")


#: The sections every run has, whatever its recipe.
CORE_SECTIONS = {"train": TrainConfig, "hub": HubConfig}
_CORE_KEYS = ("recipe", "output_dir", "seed", "train", "hub")


# --------------------------------------------------------------------------- validation


def config_from_dict(data: dict) -> Config:
    """Validate a nested dict into a :class:`Config` (raises :class:`ConfigError`).

    The recipe (``data["recipe"]``, default ``flow_matching``) must be registered; its sections
    are validated with :func:`flowlab.schema.build`, the core keys with the core schema.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(data).__name__} {data!r}")
    _reject_hub_token(data)
    recipe = data.get("recipe", "flow_matching")
    spec = recipe_spec(recipe)
    sections = dict(spec.sections)
    core = {k: v for k, v in data.items() if k in _CORE_KEYS}
    given: dict[str, Any] = {}
    for k, v in data.items():
        if k in _CORE_KEYS:
            continue
        if k in sections:
            given[k] = build(sections[k], v, k, siblings=sections)
            continue
        owners = sorted(r for r, s in RECIPES.items() if k in s.sections)
        if owners:
            raise ConfigError(
                f"{k}: section of recipe {', '.join(owners)}; recipe {recipe!r} does not read it "
                f"(its sections: {', '.join([*_CORE_KEYS[3:], *sections])})"
            )
        valid = [*_CORE_KEYS, *sections]
        raise ConfigError(f"unknown config key '{k}'{did_you_mean(k, valid)}; valid keys here: {', '.join(valid)}")
    cfg = build(Config, core, "", extra=sections, siblings=sections)
    cfg.sections.update(given)  # the others hold their defaults (Config.__post_init__)
    for name, reason in sorted(ignored_sections(cfg).items()):
        if name in given:
            raise ConfigError(f"{name}: this run ignores the section ({reason}); remove it")
    _cross_checks(cfg)
    return cfg


def ignored_sections(cfg: Config) -> dict[str, str]:
    """Sections of the recipe that this configuration does not read, with the reason: a section dataclass may
    define ``ignored_sections(config) -> {name: reason}`` (e.g. NoProp's own blocks ignore ``model``). Such a
    section is refused when given, and left out of the saved ``config.yaml``."""
    out: dict[str, str] = {}
    for section in list(cfg.sections.values()):
        fn = getattr(section, "ignored_sections", None)
        if callable(fn):
            out.update(fn(cfg))
    return out


def _cross_checks(cfg: Config) -> None:
    t = cfg.train
    if os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        raise ConfigError(f"output_dir: {cfg.output_dir!r} is a file, not a folder")
    if t.resume is not None and t.resume != "latest" and not os.path.isdir(t.resume):
        raise ConfigError(f"train.resume: {t.resume!r} is neither 'latest' nor an existing checkpoint folder")
    for name, section in cfg.sections.items():
        check = getattr(section, "check", None)
        if callable(check):  # a section's own checks across its keys (raises ConfigError)
            check(cfg)


def _reject_hub_token(data: Any) -> None:
    """A token never goes in a config (it would be written to config.yaml and pushed with the model)."""
    hub = data.get("hub") if isinstance(data, dict) else None
    if isinstance(hub, dict) and "token" in hub:
        raise ConfigError(
            "'hub.token': tokens are not accepted in configs (they would be saved in config.yaml and pushed with "
            "the model); set the HF_TOKEN environment variable or log in once with `hf auth login` "
            "(`huggingface-cli login` in older huggingface_hub releases)"
        )


def check_hub_config(cfg: Config) -> None:
    """Start-up checks of the ``hub`` section for a run that will push (raises :class:`ConfigError`).

    Called by the command line before training (not by :func:`config_from_dict`: these checks
    relate keys to each other, to the Hub's naming rules and to the machine's login, which matter
    only to a run that pushes). A run that will push needs a token (``HF_TOKEN`` or the cached
    ``hf auth login``) now, not after training.
    """
    h = cfg.hub
    if h.push and not h.repo_id:
        raise ConfigError("hub.repo_id: required when hub.push=true (e.g. hub.repo_id=your-name/flowlab-digits)")
    if h.repo_id is not None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(h.repo_id)
        except HFValidationError as e:
            raise ConfigError(f"hub.repo_id: {h.repo_id!r} is not a valid Hub repo id ('user/name'): {e}") from None
    if h.push:
        from huggingface_hub import get_token

        if not get_token():  # HF_TOKEN, or the token cached by `hf auth login`
            raise ConfigError(
                "hub.push: true needs a Hugging Face token, and none was found: set the HF_TOKEN environment variable "
                "or log in once with `hf auth login`, or set hub.push=false (then publish later with `flowlab push`)"
            )


def config_to_dict(cfg: Config) -> dict:
    """The config as a nested dict: the core keys, then every section of the recipe, then ``train`` and ``hub``.

    :func:`config_from_dict` of the result gives back an equal config (the run's ``config.yaml``).
    """
    out: dict[str, Any] = {"recipe": cfg.recipe, "output_dir": cfg.output_dir, "seed": cfg.seed}
    spec = RECIPES.get(cfg.recipe)
    skip = ignored_sections(cfg)
    for name in [*(spec.sections if spec else ()), *cfg.sections]:  # the recipe's order
        if name not in out and name not in skip:
            out[name] = dataclasses.asdict(getattr(cfg, name))
    out["train"] = dataclasses.asdict(cfg.train)
    out["hub"] = dataclasses.asdict(cfg.hub)
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=1e-4", "model.block_out_channels=[32,64]"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.max_steps=200)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
        except RecursionError:
            raise ConfigError(f"{key}: cannot parse value (nested too deeply)") from None
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{p}' is set both as a value and as a section")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``key=value`` overrides and validate."""
    data: dict = {}
    if path is not None:
        if os.path.isdir(path):
            raise ConfigError(f"config file {str(path)!r} is a directory, not a YAML file")
        if not os.path.isfile(path):
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            with open(path, "rb") as f:  # bytes: PyYAML reports bad encodings as a YAMLError with the position
                data = yaml.safe_load(f)
            data = {} if data is None else data  # an empty file; but 0, false or [] are not mappings
        except OSError as e:
            raise ConfigError(f"config file {str(path)!r} cannot be read: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        except RecursionError:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: nested too deeply") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    data = _merge(data, parse_overrides(overrides or []))
    return config_from_dict(data)
