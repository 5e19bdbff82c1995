"""Model cards and publishing a trained run to the Hugging Face Hub.

:func:`push_to_hub` uploads one finished run (a training ``output_dir``) as one commit:

=========================  =====================================================================
repo path                  what
=========================  =====================================================================
``<artefact contents>``    whatever the recipe's ``save_final`` wrote (``pipeline/`` for
                           flow matching, ``classifier/`` for NoProp, a LoRA folder, a
                           transformers model, ...) at the repo **root**, so
                           ``FlowPipeline.from_pretrained("user/name")``,
                           ``pipe.load_lora_weights("user/name")`` or a transformers
                           ``from_pretrained("user/name")`` load straight from the repo id
``README.md``              the model card: YAML metadata (license, library, base model, tags,
                           pipeline tag), final metrics table, sample grid, usage snippet, the
                           training config with secret-looking values redacted
``samples/grid.png``       the run's last sample grid (``samples/step_*.png``), if any
``config.yaml``            the training config (secret-looking values redacted)
``metrics.jsonl``          the training metrics
=========================  =====================================================================

``checkpoints/``, ``logs/`` and anything else in the run folder are never uploaded. The
run folder is only read: a push, a dry run or a failed push leave it byte-for-byte unchanged.

The token comes from the usual Hugging Face sources (the ``token`` argument, ``HF_TOKEN``,
the cached ``hf auth login``). It is never written to the card, the config or the
metrics, never logged, and scrubbed from every error this module raises. Transient
failures (connection errors, HTTP 408/429/5xx) are retried with exponential backoff; then
a one-paragraph :class:`HubError` names the repo and the cause.

A recipe can contribute card fields with an optional method ``card_data(self, repo_id) -> dict``
(or ``card_data(self)``)
(keys: ``license``, ``base_model``, ``tags``, ``pipeline_tag``, ``library_name``,
``datasets``, ``usage`` (Python code), ``description`` (Markdown)); its values override the
defaults this module derives from the artefact's layout, and its ``tags`` are added to the
default ones.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from .errors import HubError

__all__ = [
    "HubError",
    "PushFile",
    "PushResult",
    "DEFAULT_LICENSE",
    "push_to_hub",
    "plan_push",
    "build_model_card",
    "redact_secrets",
    "scrub_token",
]

logger = logging.getLogger(__name__)

#: License written in the card when neither the call nor the run's ``hub.license`` gives one
#: (flowlab itself is Apache-2.0).
DEFAULT_LICENSE = "apache-2.0"

#: HTTP status codes worth retrying (the same set huggingface_hub's own backoff uses).
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})

# files a recipe's artefact folder must not carry to the Hub: pickle-based weights
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_IMAGE_DATASETS = ("digits", "imagefolder", "hf")
# classes saved by flowlab recipes -> module to import them from in the card's usage snippet
_FLOWLAB_CLASSES = {
    "FlowPipeline": "flowlab",
    "WGFPipeline": "flowlab.wgf",
    "NoPropClassifier": "flowlab.noprop",
}
# a key naming a secret as one of its ``_``/``-``/``.``-separated words (``hf_token``, ``api_key``; not ``tokenizer``)
_SECRET_KEY = re.compile(
    r"(?:^|[_\-.])(token|secret|password|passwd|apikey|api[_\-]key|credentials?|auth|private[_\-]key)(?:$|[_\-.])", re.I
)
_SECRET_VALUE = re.compile(
    r"(hf_[A-Za-z0-9]{16,}"  # Hugging Face tokens
    r"|api_org_[A-Za-z0-9]{16,}"
    r"|(?:sk|pk|rk)-[A-Za-z0-9_\-]{16,}"  # OpenAI-style keys
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"
    r"|xox[abposr]-[A-Za-z0-9\-]{10,}"
    r"|AKIA[0-9A-Z]{16}"
    r"|eyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,})"  # JWTs
)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<user>[^/\s:@]+):(?P<pw>[^/\s@]+)@", re.I)
# "Authorization: Bearer x", "'authorization': 'Basic x'", "bearer x", "x-api-key=x" (not "Authorization header")
_AUTH_HEADER = re.compile(
    r"((?:authorization|x-api-key)[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token)\s+)?)((?!(?:bearer|basic|token)\s)[A-Za-z0-9_\-.~+/=:]+)", re.I
)
_BEARER = re.compile(r"(bearer\s+)([A-Za-z0-9_\-.~+/=:]{6,})", re.I)
REDACTED = "<redacted>"




@dataclass
class PushFile:
    """One file of a push.

    Attributes:
        path_in_repo: where it lands in the repo (POSIX path).
        source: the local file it is read from, or ``None`` for a file generated for the push
            (the card, a redacted config).
        size: bytes.
        content: the bytes of a generated file (``None`` for local files).
    """

    path_in_repo: str
    source: Optional[str]
    size: int
    content: Optional[bytes] = field(default=None, repr=False)


@dataclass
class PushResult:
    """What :func:`push_to_hub` did (or, with ``dry_run``, would do).

    Attributes:
        repo_id: the target repo. revision: the branch committed to (``None``: main).
        files: every file of the commit, in upload order.
        card_path: with ``dry_run``, where the card was written for preview; else ``None``.
        dry_run: nothing was sent.
        repo_url / commit_url / commit_oid: from the Hub after a push.
        attempts: tries it took (0 for a dry run).
    """

    repo_id: str
    revision: Optional[str]
    files: list[PushFile]
    card_path: Optional[str] = None
    dry_run: bool = False
    repo_url: Optional[str] = None
    commit_url: Optional[str] = None
    commit_oid: Optional[str] = None
    attempts: int = 0

    @property
    def paths_in_repo(self) -> list[str]:
        return [f.path_in_repo for f in self.files]


# --------------------------------------------------------------------------- secrets


def scrub_token(text: str, token: Optional[str] = None) -> str:
    """``text`` with ``token``, anything token-shaped, authorization headers and URL passwords replaced.

    Args:
        text: any message (an exception's, a log line, a card).
        token: the token in use, removed wherever it appears, whatever its shape.
    """
    if token:
        text = text.replace(token, REDACTED)
    text = _SECRET_VALUE.sub(REDACTED, text)
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    for pattern in (_AUTH_HEADER, _BEARER):
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


def redact_secrets(obj: Any, token: Optional[str] = None) -> Any:
    """A copy of a config-like nested structure with secret-looking values replaced by ``<redacted>``.

    A value is secret-looking when one of its key's words is token, secret, password, API key, auth or
    credential(s), or when the value itself looks like a known token format (``hf_...``, ``ghp_...``,
    a JWT, ...) or holds a password in a URL; ``token`` (the one in use) is removed from every string.
    """
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if _SECRET_KEY.search(str(k)) and v not in (None, "", False) and not isinstance(v, (dict, list, bool)):
                out[k] = REDACTED
            else:
                out[k] = redact_secrets(v, token)
        return out
    if isinstance(obj, (list, tuple)):
        return [redact_secrets(v, token) for v in obj]
    if isinstance(obj, str):
        return scrub_token(obj, token)
    return obj


@contextlib.contextmanager
def _scrubbed_logging(token: Optional[str]) -> Iterator[None]:
    """While pushing, scrub ``token`` from every log record created (ours, huggingface_hub's, httpx's)."""
    if not token:
        yield
        return
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is left to logging's own error handling
            return record
        if token in message or _SECRET_VALUE.search(message):
            record.msg, record.args = scrub_token(message, token), ()
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(previous)


# --------------------------------------------------------------------------- reading a run


def _read_config(output_dir: Path) -> dict:
    path = output_dir / "config.yaml"
    if not path.is_file():
        raise HubError(
            f"{output_dir} has no config.yaml: it is not a flowlab run folder (give the output_dir of a finished training run)"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise HubError(f"{path} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise HubError(f"{path} must hold a mapping of config sections, got {type(data).__name__}")
    return data


def _recipe_for(config: dict):
    """The recipe object of a run (``None`` if its recipe is not installed or its config no longer validates)."""
    from .recipes import RECIPES, config_from_dict
    from .train.registry import recipe_class

    name = config.get("recipe", "flow_matching")
    if name not in RECIPES:
        return None, None
    cls = recipe_class(name)
    try:
        return cls, cls(config_from_dict(config))
    except Exception:  # e.g. an older run's config: the class alone still names the artefact
        return cls, None


def _artifact_dir(output_dir: Path, config: dict, recipe_cls) -> Path:
    recipe = config.get("recipe", "flow_matching")
    if recipe_cls is None:
        from .recipes import RECIPES

        raise HubError(
            f"{output_dir} was trained with recipe {recipe!r}, which this flowlab does not know "
            f"(known: {', '.join(sorted(RECIPES))}); cannot tell which folder holds the trained artefact"
        )
    path = output_dir / recipe_cls.artifact_name
    if not path.is_dir() or not any(path.iterdir()):
        raise HubError(
            f"{output_dir} has no {recipe_cls.artifact_name}/ folder (recipe {recipe!r} saves its trained artefact there "
            "when training finishes): did the run finish?"
        )
    return path


def _artifact_files(artifact: Path) -> list[tuple[str, Path]]:
    """``(path_in_repo, local_path)`` of every file under the artefact folder (hidden files skipped)."""
    out = []
    for root, dirs, files in os.walk(artifact):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(files):
            if name.startswith("."):
                continue
            local = Path(root) / name
            rel = local.relative_to(artifact).as_posix()
            if local.is_symlink() and not local.resolve().is_relative_to(artifact.resolve()):
                raise HubError(f"{local} is a link to a file outside the artefact folder; refusing to upload it")
            if name.endswith(_PICKLE_SUFFIXES):
                raise HubError(
                    f"{local} holds pickle-based weights; flowlab publishes safetensors only (re-save the model with "
                    "safe_serialization / save_pretrained's safetensors default)"
                )
            out.append((rel, local))
    return out


def _read_metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
        if isinstance(rec, dict):
            records.append(rec)
    return records


# bookkeeping columns of metrics.jsonl left out of the card's table
_METRIC_SKIP = {"step", "lr", "grad_norm", "samples_per_sec", "steps_per_sec", "skipped_steps"}


def final_metrics(records: list[dict]) -> dict[str, tuple[float, Optional[int]]]:
    """The last value of each numeric metric and the step it was logged at (eval metrics first)."""
    last: dict[str, tuple[float, Optional[int]]] = {}
    for rec in records:
        for k, v in rec.items():
            if k in _METRIC_SKIP or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            last[k] = (float(v), rec.get("step"))
    order = sorted(last, key=lambda k: (not k.startswith("eval/"), k != "loss", k))
    return {k: last[k] for k in order}


def _last_sample_grid(output_dir: Path) -> Optional[Path]:
    samples = output_dir / "samples"
    if not samples.is_dir():
        return None
    grids = sorted(p for p in samples.glob("step_*.png") if p.is_file())
    return grids[-1] if grids else None


# --------------------------------------------------------------------------- the model card


def _looks_like_repo_id(value: Any) -> bool:
    if not isinstance(value, str) or not value or os.path.exists(value) or value.startswith((".", "/", "~")):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _default_card_data(repo_id: str, config: dict, artifact: Path) -> dict:
    """Card fields derived from the run's config and the artefact's on-disk layout."""
    recipe = config.get("recipe", "flow_matching")
    data_cfg = config.get("data") or {}
    model_cfg = config.get("model") or {}
    generative = (artifact / "model_index.json").is_file() or (artifact / "pytorch_lora_weights.safetensors").is_file()
    tags = list(dict.fromkeys(["flowlab", *(["flow-matching"] if generative else []), recipe.replace("_", "-")]))
    card: dict[str, Any] = {"library_name": "flowlab", "tags": tags}
    if _looks_like_repo_id(model_cfg.get("pretrained")):
        card["base_model"] = model_cfg["pretrained"]
    if data_cfg.get("name") == "hf" and _looks_like_repo_id(data_cfg.get("path")):
        card["datasets"] = [data_cfg["path"]]
    is_image = data_cfg.get("name") in _IMAGE_DATASETS

    if (artifact / "model_index.json").is_file():  # a diffusers pipeline (FlowPipeline, WGFPipeline, ...)
        cls = json.loads((artifact / "model_index.json").read_text()).get("_class_name", "DiffusionPipeline")
        module = _FLOWLAB_CLASSES.get(cls)
        if module is None:
            module, cls = "diffusers", "DiffusionPipeline"
        num_classes = 0
        for sub in sorted(artifact.iterdir()):
            if (sub / "config.json").is_file():
                num_classes = max(num_classes, int(json.loads((sub / "config.json").read_text()).get("num_classes") or 0))
        if num_classes:  # class-conditional: one label per sample
            call = f'pipe(class_labels=list(range({min(num_classes, 16)})), output_type="pil").images'
        else:
            call = 'pipe(batch_size=16, output_type="pil").images'
        card["usage"] = f'from {module} import {cls}\npipe = {cls}.from_pretrained("{repo_id}")\nimages = {call}'
        if is_image:
            card["pipeline_tag"] = "unconditional-image-generation"
            tags.append("image-generation")
    elif (artifact / "pytorch_lora_weights.safetensors").is_file():  # diffusers LoRA (save_lora_weights layout)
        base = card.get("base_model", "<base model repo id>")
        card["usage"] = (
            f'from diffusers import DiffusionPipeline\npipe = DiffusionPipeline.from_pretrained("{base}")\n'
            f'pipe.load_lora_weights("{repo_id}")'
        )
        card["pipeline_tag"] = "text-to-image"
        tags.append("lora")
    elif (artifact / "adapter_config.json").is_file():  # a peft adapter
        card["usage"] = (
            f'from peft import AutoPeftModel\nmodel = AutoPeftModel.from_pretrained("{repo_id}")\n'
            "model.eval()"
        )
        tags.append("lora")
    elif (artifact / "config.json").is_file():
        cfg = json.loads((artifact / "config.json").read_text())
        cls = cfg.get("_class_name")
        if cls:  # a diffusers ModelMixin
            module = _FLOWLAB_CLASSES.get(cls, "diffusers")
            card["usage"] = f'from {module} import {cls}\nmodel = {cls}.from_pretrained("{repo_id}")\nmodel.eval()'
            if cls == "NoPropClassifier":
                card["pipeline_tag"] = "image-classification"
                card["usage"] = (
                    f'from flowlab.noprop import NoPropClassifier\nclf = NoPropClassifier.from_pretrained("{repo_id}")\n'
                    "labels = clf.predict(images)  # images (B, C, H, W) in [-1, 1]"
                )
        else:  # a transformers model
            card["usage"] = f'from transformers import AutoModel\nmodel = AutoModel.from_pretrained("{repo_id}")\nmodel.eval()'
            tags.append("transformers")
    return card


def _merge_card_data(default: dict, extra: Optional[dict]) -> dict:
    out = dict(default)
    for k, v in (extra or {}).items():
        if v is None:
            continue
        if k == "tags":
            out["tags"] = list(dict.fromkeys([*out.get("tags", []), *([v] if isinstance(v, str) else v)]))
        else:
            out[k] = v
    return out


def _fmt(value: float) -> str:
    return f"{value:.4g}" if value != int(value) or abs(value) >= 1e6 else str(int(value))


def build_model_card(
    repo_id: str,
    config: dict,
    card_data: dict,
    metrics: dict[str, tuple[float, Optional[int]]],
    grid_path_in_repo: Optional[str],
    license: str,
    token: Optional[str] = None,
) -> str:
    """The ``README.md`` of a pushed run: YAML metadata, then Markdown.

    Args:
        repo_id: the target repo (used in the usage snippet).
        config: the run's training config (redacted here before it is shown).
        card_data: fields from :func:`_default_card_data` merged with the recipe's ``card_data()``.
        metrics: :func:`final_metrics` of the run.
        grid_path_in_repo: where the sample grid lands in the repo, or ``None``.
        license: a Hub license id.
        token: the token in use (scrubbed from everything, should it appear anywhere).
    """
    recipe = config.get("recipe", "flow_matching")
    meta: dict[str, Any] = {"license": card_data.get("license", license), "library_name": card_data.get("library_name", "flowlab")}
    for key in ("base_model", "datasets", "pipeline_tag"):
        if card_data.get(key):
            meta[key] = card_data[key]
    meta["tags"] = list(dict.fromkeys(card_data.get("tags", [])))
    name = repo_id.split("/")[-1]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {name}", ""]
    lines.append(
        card_data.get("description")
        or f"Trained with flowlab (recipe `{recipe}`)."
        + (f" Fine-tuned from [`{meta['base_model']}`](https://huggingface.co/{meta['base_model']})." if meta.get("base_model") else "")
    )
    lines += ["", "## Usage", "", "```python", card_data.get("usage", f'# see the files of {repo_id}'), "```", ""]
    lines += ["## Final metrics", ""]
    if metrics:
        lines += ["| metric | value | step |", "|---|---|---|"]
        lines += [f"| `{k}` | {_fmt(v)} | {'' if s is None else s} |" for k, (v, s) in metrics.items()]
    else:
        lines.append("No metrics were recorded.")
    lines.append("")
    if grid_path_in_repo:
        lines += ["## Samples", "", f"![samples from the final model]({grid_path_in_repo})", ""]
    lines += [
        "## Training config",
        "",
        "Reproduce with `python train.py --config config.yaml` (the file is in this repo).",
        "",
        "```yaml",
        yaml.safe_dump(redact_secrets(config, token), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return scrub_token("\n".join(lines), token)


# --------------------------------------------------------------------------- planning


def _free(path: str, taken: set[str]) -> str:
    return path if path not in taken else f"flowlab/{path}"


def plan_push(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    license: Optional[str] = None,
    token: Optional[str] = None,
) -> list[PushFile]:
    """The files a push of ``output_dir`` to ``repo_id`` uploads, with the card and config generated.

    Reads the run folder only. Raises :class:`HubError` if it is not a finished flowlab run.
    """
    out = Path(output_dir)
    if not out.is_dir():
        raise HubError(f"{out} does not exist or is not a folder (give the output_dir of a finished training run)")
    config = _read_config(out)
    recipe_cls, recipe = _recipe_for(config)
    artifact = _artifact_dir(out, config, recipe_cls)
    files = [PushFile(rel, str(local), local.stat().st_size) for rel, local in _artifact_files(artifact) if rel != "README.md"]
    taken = {f.path_in_repo for f in files} | {"README.md"}

    grid = _last_sample_grid(out)
    grid_in_repo = None
    if grid is not None:
        grid_in_repo = _free("samples/grid.png", taken)
        taken.add(grid_in_repo)
        files.append(PushFile(grid_in_repo, str(grid), grid.stat().st_size))

    config_in_repo = _free("config.yaml", taken)
    taken.add(config_in_repo)
    redacted = redact_secrets(config, token)
    if redacted == config and not (token and token in (out / "config.yaml").read_text()):
        files.append(PushFile(config_in_repo, str(out / "config.yaml"), (out / "config.yaml").stat().st_size))
    else:
        content = yaml.safe_dump(redacted, sort_keys=False).encode()
        files.append(PushFile(config_in_repo, None, len(content), content))

    metrics_path = out / "metrics.jsonl"
    if metrics_path.is_file():
        metrics_in_repo = _free("metrics.jsonl", taken)
        taken.add(metrics_in_repo)
        raw = metrics_path.read_bytes()
        if token and token.encode() in raw:  # cannot happen through flowlab; never publish it if it did
            raw = raw.replace(token.encode(), REDACTED.encode())
            files.append(PushFile(metrics_in_repo, None, len(raw), raw))
        else:
            files.append(PushFile(metrics_in_repo, str(metrics_path), len(raw)))

    hub_cfg = config.get("hub") if isinstance(config.get("hub"), dict) else {}
    lic = license or hub_cfg.get("license") or DEFAULT_LICENSE
    extra = None
    hook = getattr(recipe, "card_data", None) if recipe is not None else None
    if callable(hook):
        import inspect

        extra = hook(repo_id) if inspect.signature(hook).parameters else hook()
        if not isinstance(extra, dict):
            raise HubError(f"recipe {config.get('recipe')!r}: card_data() must return a dict, got {type(extra).__name__}")
    card_data = _merge_card_data(_default_card_data(repo_id, config, artifact), extra)
    card = build_model_card(repo_id, config, card_data, final_metrics(_read_metrics(out)), grid_in_repo, lic, token).encode()
    files.insert(0, PushFile("README.md", None, len(card), card))
    return files


# --------------------------------------------------------------------------- pushing


def _resolve_token(token: Optional[str]) -> str:
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()  # HF_TOKEN, then the cached login
    if not found:
        raise HubError(
            "no Hugging Face token found: set the HF_TOKEN environment variable or log in once with `hf auth login` "
            "(`huggingface-cli login` in older huggingface_hub releases); tokens are never read from configs"
        )
    return found


def _is_transient(err: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError):
        response = getattr(err, "response", None)
        return response is not None and response.status_code in TRANSIENT_STATUS
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    try:
        import httpx2 as httpx  # the HTTP client huggingface_hub 2.x uses
    except ImportError:  # pragma: no cover - older huggingface_hub
        try:
            import httpx
        except ImportError:
            httpx = None
    if httpx is not None and isinstance(err, (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)):
        return True
    try:
        import requests

        return isinstance(err, (requests.ConnectionError, requests.Timeout))
    except ImportError:  # pragma: no cover
        return False


def _retry_after(err: BaseException) -> float:
    """Seconds a 429/503 response asks to wait (``Retry-After``), else 0."""
    response = getattr(err, "response", None)
    try:
        return max(0.0, float(response.headers.get("Retry-After", 0))) if response is not None else 0.0
    except (TypeError, ValueError, AttributeError):  # an HTTP date or garbage: use our own schedule
        return 0.0


def _describe(err: BaseException, token: Optional[str]) -> str:
    """A short, token-free account of what went wrong."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError) and getattr(err, "response", None) is not None:
        status = err.response.status_code
        server = (getattr(err, "server_message", None) or "").strip()
        if status == 401:
            what = "authentication failed (HTTP 401): the token was refused; check HF_TOKEN or `hf auth login`"
        elif status == 403:
            what = "permission denied (HTTP 403): the token cannot write to this repo or namespace (it needs write access)"
        elif status == 404:
            what = "not found (HTTP 404): the repo or revision does not exist or is not visible to this token"
        elif status == 429:
            what = "rate limited by the Hub (HTTP 429)"
        else:
            what = f"the Hub answered HTTP {status} {err.response.reason_phrase or ''}".rstrip()
        if server:
            what += f" ({server})"
    else:
        what = f"{type(err).__name__}: {err}"
    what = " ".join(scrub_token(what, token).split())  # one line, token-free
    return what if len(what) <= 400 else what[:400].rstrip(" .") + " [...]"


def push_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    dry_run: bool = False,
    commit_message: Optional[str] = None,
    max_retries: int = 3,
    retry_wait: float = 2.0,
    license: Optional[str] = None,
    endpoint: Optional[str] = None,
    preview_dir: Optional[str | os.PathLike] = None,
) -> PushResult:
    """Publish a finished training run to the Hugging Face Hub as one commit.

    Args:
        output_dir: the run folder (``config.yaml``, ``metrics.jsonl``, ``samples/``, the artefact folder).
        repo_id: ``"user/name"``; created if missing (``private`` applies only then).
        private: create the repo private.
        revision: branch to commit to (created from main if missing); ``None``: main.
        token: a Hub token; default ``HF_TOKEN`` or the cached ``hf auth login``.
        dry_run: send nothing; list the files and write the card to ``preview_dir``.
        commit_message: default ``"Upload <artefact> trained with flowlab (<recipe>)"``.
        max_retries: retries after the first try on transient failures (connection errors, HTTP
            408/429/5xx); waits ``retry_wait * 2**k`` seconds, or the response's ``Retry-After`` if
            longer, capped at 60, before retry ``k + 1``.
        retry_wait: the first backoff delay in seconds.
        license: the card's license; default the run's ``hub.license``, else :data:`DEFAULT_LICENSE`.
        endpoint: the Hub URL; default ``HF_ENDPOINT`` or https://huggingface.co.
        preview_dir: where a dry run writes ``README.md`` (default: a new temporary folder).

    Returns:
        A :class:`PushResult` listing every file (``path_in_repo``, local source, size).

    Raises:
        HubError: the run folder is not a finished flowlab run, no token is found, or the push
            failed (after retries, for transient failures). The message is one paragraph that
            names the repo and the cause and never contains the token.
    """
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"{repo_id!r} is not a valid Hub repo id ('user/name'): {e}") from None
    if revision is not None and not revision.strip():
        raise HubError("revision must be a branch name (or omitted for main)")

    with _scrubbed_logging(token):
        files = plan_push(output_dir, repo_id, license=license, token=token)  # a finished run? (before asking for a token)
    resolved = None if dry_run else _resolve_token(token)
    with _scrubbed_logging(resolved):
        if resolved and resolved != token:  # found in HF_TOKEN / the cached login: scrub that one too
            files = plan_push(output_dir, repo_id, license=license, token=resolved)
        if dry_run:
            preview = Path(preview_dir) if preview_dir is not None else Path(tempfile.mkdtemp(prefix="flowlab-push-preview-"))
            preview.mkdir(parents=True, exist_ok=True)
            card_path = preview / "README.md"
            card_path.write_bytes(files[0].content)
            return PushResult(repo_id, revision, files, card_path=str(card_path), dry_run=True)
        return _push(files, output_dir, repo_id, private, revision, resolved, commit_message, max_retries, retry_wait, endpoint)


def _push(files, output_dir, repo_id, private, revision, token, commit_message, max_retries, retry_wait, endpoint) -> PushResult:
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    if constants.is_offline_mode():
        raise HubError(
            f"cannot push {output_dir} to {repo_id}: HF_HUB_OFFLINE is set, so huggingface_hub makes no network "
            "requests; unset it (or use --dry-run to preview the push)"
        )
    api = HfApi(endpoint=endpoint, token=token)
    config = _read_config(Path(output_dir))
    message = commit_message or f"Upload {config.get('recipe', 'flowlab')} model trained with flowlab"
    branch = revision if revision not in (None, "main") else None
    target = f"{repo_id}" + (f" (branch {branch})" if branch else "")
    for attempt in range(1, max_retries + 2):
        try:
            # private=None (not False) when not asked: a new repo then follows the namespace's default visibility
            repo_url = api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
            if branch:
                api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model")
            ops = [
                CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=f.content if f.source is None else f.source)
                for f in files
            ]
            info = api.create_commit(repo_id, ops, commit_message=message, revision=branch, repo_type="model")
        except Exception as err:  # noqa: BLE001 - every failure becomes one token-free HubError
            cause = _describe(err, token)
            if _is_transient(err) and attempt <= max_retries:
                wait = min(max(retry_wait * 2 ** (attempt - 1), _retry_after(err)), 60.0)
                logger.warning("push to %s failed (%s); retry %d/%d in %.1fs", target, cause, attempt, max_retries, wait)
                time.sleep(wait)
                continue
            tries = f" after {attempt} attempts" if attempt > 1 else ""
            raise HubError(
                f"could not push {output_dir} to the Hub repo {target} at {api.endpoint}{tries}: {cause}. "
                f"The local run folder is unchanged; retry with `flowlab push {output_dir} --repo-id {repo_id}"
                + (" --private" if private else "")
                + (f" --revision {branch}" if branch else "")
                + "`."
            ) from None
        logger.info("pushed %d files to %s: %s", len(files), target, info.commit_url)
        return PushResult(
            repo_id, revision, files, repo_url=str(repo_url), commit_url=info.commit_url, commit_oid=info.oid, attempts=attempt
        )
    raise AssertionError("unreachable")  # pragma: no cover
