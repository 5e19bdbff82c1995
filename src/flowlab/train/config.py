"""Typed configuration: YAML files plus ``key=value`` overrides, validated before training.

Every section is a dataclass. :func:`load_config` merges a YAML file with dotted
overrides (``train.max_steps=200``), rejects unknown keys and wrong types with a
:class:`ConfigError` that names the dotted key, and checks value ranges and choices.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

__all__ = [
    "ConfigError",
    "Config",
    "DataConfig",
    "ModelConfig",
    "FlowConfig",
    "TrainConfig",
    "SampleConfig",
    "EvalConfig",
    "HubConfig",
    "check_hub_config",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "parse_overrides",
    "CONFIG_SECTIONS",
    "register_config_section",
]


from ..errors import ConfigError


def _choices(*values, **kw):
    return {"choices": values, **kw}


@dataclass
class DataConfig:
    """``data``: what to train on."""

    name: str = field(default="digits", metadata=_choices("digits", "moons", "8gaussians", "checkerboard", "imagefolder", "hf"))
    path: Optional[str] = None  # imagefolder: a local folder; hf: a Hub dataset name or local path
    split: str = "train"
    image_column: str = "image"
    label_column: Optional[str] = None
    resolution: int = field(default=32, metadata={"min": 1})
    channels: int = field(default=3, metadata=_choices(1, 3))
    center_crop: bool = True
    random_flip: bool = False
    num_samples: int = field(default=20000, metadata={"min": 1})  # 2-D toys
    num_workers: int = field(default=0, metadata={"min": 0})


@dataclass
class ModelConfig:
    """``model``: the velocity network."""

    type: str = field(default="mlp", metadata=_choices("mlp", "unet", "dit", "conservative"))  # conservative: v = grad of a scalar MLP
    class_conditional: bool = False
    label_dropout: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0})
    attention: str = field(default="sdpa", metadata=_choices("sdpa", "xformers"))
    pretrained: Optional[str] = None  # a FlowPipeline folder / Hub id to initialise from
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    # mlp
    hidden_dim: int = field(default=256, metadata={"min": 1})
    depth: int = field(default=4, metadata={"min": 1})
    time_embed_dim: int = field(default=128, metadata={"min": 2})
    # unet
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128])
    down_block_types: list[str] = field(default_factory=lambda: ["DownBlock2D", "AttnDownBlock2D"])
    up_block_types: list[str] = field(default_factory=lambda: ["AttnUpBlock2D", "UpBlock2D"])
    layers_per_block: int = field(default=2, metadata={"min": 1})
    attention_head_dim: int = field(default=32, metadata={"min": 1})
    norm_num_groups: int = field(default=32, metadata={"min": 1})
    # dit
    num_layers: int = field(default=6, metadata={"min": 1})
    num_attention_heads: int = field(default=4, metadata={"min": 1})
    patch_size: int = field(default=2, metadata={"min": 1})


@dataclass
class FlowConfig:
    """``flow``: the path, parameterisation, time sampler, weighting and coupling."""

    path: str = field(default="linear", metadata=_choices("linear", "cosine", "vp"))
    prediction_type: str = field(default="velocity", metadata=_choices("velocity", "x1", "epsilon"))
    time_sampler: str = field(default="uniform", metadata=_choices("uniform", "logit_normal", "mode"))
    logit_mean: float = 0.0
    logit_std: float = field(default=1.0, metadata={"min": 1e-6})
    mode_scale: float = 1.29
    shift: float = field(default=1.0, metadata={"min": 1e-6})
    loss_weighting: str = field(default="none", metadata=_choices("none", "sigma_sqrt", "cosmap"))
    coupling: str = field(default="independent", metadata=_choices("independent", "ot"))


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
        default="cosine", metadata=_choices("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
    )
    warmup_steps: int = field(default=100, metadata={"min": 0})
    grad_accum_steps: int = field(default=1, metadata={"min": 1})
    max_grad_norm: float = field(default=1.0, metadata={"min": 0.0})  # 0 disables clipping
    mixed_precision: str = field(default="no", metadata=_choices("no", "fp16", "bf16"))
    ema_decay: float = field(default=0.999, metadata={"min": 0.0, "max": 1.0})
    checkpoint_every: int = field(default=500, metadata={"min": 0})  # 0: only at the end
    checkpoints_total_limit: int = field(default=2, metadata={"min": 1})
    resume: Optional[str] = None  # "latest" or a checkpoint folder
    overwrite: bool = False  # allow starting afresh in an output_dir that holds another run
    log_every: int = field(default=25, metadata={"min": 1})
    max_nonfinite_steps: int = field(default=20, metadata={"min": 1})
    report_to: str = field(default="tensorboard", metadata=_choices("tensorboard", "wandb", "none"))
    compile: bool = False  # run the model through torch.compile (accelerate's dynamo_backend="inductor")


@dataclass
class SampleConfig:
    """``sample``: sampling defaults saved with the pipeline, and periodic sample grids."""

    solver: str = field(default="heun", metadata=_choices("euler", "midpoint", "heun", "multistep", "dopri5", "meanflow"))  # meanflow: recipe meanflow
    num_inference_steps: int = field(default=16, metadata={"min": 1})
    shift: float = field(default=1.0, metadata={"min": 1e-6})
    guidance_scale: float = 1.0
    every: int = field(default=500, metadata={"min": 0})  # 0: only at the end
    num_images: int = field(default=64, metadata={"min": 1})


@dataclass
class EvalConfig:
    """``eval``: periodic evaluation (digits: Fréchet distance in a classifier's feature space)."""

    every: int = field(default=0, metadata={"min": 0})  # 0: only at the end
    num_samples: int = field(default=1000, metadata={"min": 2})
    solver: str = field(default="heun", metadata=_choices("euler", "midpoint", "heun", "multistep", "dopri5", "meanflow"))
    num_inference_steps: int = field(default=16, metadata={"min": 1})
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
    """A whole run. ``recipe`` picks the training recipe (``flow_matching``).

    Recipes may add sections of their own (e.g. ``nft:``) with :func:`register_config_section`;
    they are validated like the built-in ones and read as attributes (``config.nft``).
    """

    recipe: str = "flow_matching"
    output_dir: str = "runs/default"
    seed: int = field(default=0, metadata={"min": 0, "max": 2**32 - 1})  # numpy's seed range
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    def __getattr__(self, name: str):
        # only reached when normal lookup fails: recipe-specific sections, defaults if not given
        if name in CONFIG_SECTIONS:
            sections = self.__dict__.setdefault("_sections", {})
            return sections.setdefault(name, CONFIG_SECTIONS[name]())
        raise AttributeError(f"'Config' object has no attribute {name!r}")


CONFIG_SECTIONS: dict[str, type] = {}


def register_config_section(name: str, cls: type) -> type:
    """Add a top-level config section ``name`` validated by the dataclass ``cls`` (for recipes)."""
    if name in {f.name for f in dataclasses.fields(Config)}:
        raise ValueError(f"config section {name!r} already exists")
    CONFIG_SECTIONS[name] = cls
    return cls


# --------------------------------------------------------------------------- validation


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(value: Any, tp, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(value, inner[0], key)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(args[0])}, got {type(value).__name__} {value!r}")
        return [_check_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:  # free-form mappings (e.g. reward specs), checked by their consumer
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of keys, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    extra = CONFIG_SECTIONS if cls is Config else {}
    kwargs, sections = {}, {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k in extra:
            sections[k] = _build(extra[k], v if v is not None else {}, key)
            continue
        if k not in fields:
            close = difflib.get_close_matches(str(k), [*fields, *extra], n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}; valid keys here: {', '.join([*fields, *extra])}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v if v is not None else {}, key)
            continue
        meta = fields[k].metadata
        if isinstance(v, bool) and {"no", "yes"} & set(meta.get("choices", ())):
            v = "yes" if v else "no"  # YAML 1.1 reads a bare `no` (e.g. train.mixed_precision=no) as false
        value = _check_value(v, tp, key)
        if value is not None:
            if "choices" in meta and value not in meta["choices"]:
                raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, meta['choices']))}")
            if "min" in meta and value < meta["min"]:
                raise ConfigError(f"{key}: must be >= {meta['min']}, got {value!r}")
            if "max" in meta and value > meta["max"]:
                raise ConfigError(f"{key}: must be <= {meta['max']}, got {value!r}")
        kwargs[k] = value
    obj = cls(**kwargs)
    if sections:
        obj.__dict__["_sections"] = sections
    return obj


def config_from_dict(data: dict) -> Config:
    """Validate a nested dict into a :class:`Config` (raises :class:`ConfigError`)."""
    from .recipe import import_builtin_recipes

    import_builtin_recipes()  # recipes register their config sections on import
    _reject_hub_token(data)
    cfg = _build(Config, data, "")
    _cross_checks(cfg)
    return cfg


def _cross_checks(cfg: Config) -> None:
    t = cfg.train
    if os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        raise ConfigError(f"output_dir: {cfg.output_dir!r} is a file, not a folder")
    if t.resume is not None and t.resume != "latest" and not os.path.isdir(t.resume):
        raise ConfigError(f"train.resume: {t.resume!r} is neither 'latest' nor an existing checkpoint folder")
    if cfg.data.name in ("imagefolder", "hf") and not cfg.data.path:
        raise ConfigError(f"data.path: required when data.name={cfg.data.name!r} (a folder of images or a dataset name)")
    if cfg.model.type in ("mlp", "conservative") and cfg.model.attention == "xformers":
        raise ConfigError(f"model.attention: xformers applies to attention models (unet, dit); model.type={cfg.model.type} has no attention")


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
    relate keys to each other and to the Hub's naming rules, which matter only to a run that pushes).
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


def config_to_dict(cfg: Config) -> dict:
    """The config as a nested dict, with the recipe sections it was given or has read."""
    out = dataclasses.asdict(cfg)
    for name, section in cfg.__dict__.get("_sections", {}).items():
        out[name] = dataclasses.asdict(section)
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
