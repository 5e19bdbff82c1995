"""Publishing a finished training run to the Hugging Face Hub as one commit, with retries.

:func:`push_to_hub` uploads one finished run (a training ``output_dir``):

=========================  =====================================================================
repo path                  what
=========================  =====================================================================
``<artefact contents>``    whatever the recipe's ``save_final`` wrote (the folder ``card.json``
                           names: ``pipeline/`` for flow matching, ``classifier/`` for NoProp, a
                           LoRA folder, a transformers model, ...) at the repo **root**, so
                           ``FlowPipeline.from_pretrained("user/name")``,
                           ``pipe.load_lora_weights("user/name")`` or a transformers
                           ``from_pretrained("user/name")`` load straight from the repo id
``README.md``              the model card (:mod:`flowlab.hub.card`): metadata, final metrics,
                           sample grid, usage snippet, the redacted training config
``samples/grid.png``       the run's last sample grid (``samples/step_*.png``), if any
``config.yaml``            the training config (secret-looking values redacted)
``metrics.jsonl``          the training metrics
=========================  =====================================================================

``checkpoints/``, ``logs/``, ``card.json`` and anything else in the run folder are never uploaded.
The run folder is only read: a push, a dry run or a failed push leave it byte-for-byte unchanged.
What the card says about the model (usage, tags, pipeline tag, base model, the artefact folder)
comes only from the run's ``card.json`` (:mod:`flowlab.card_data`), written by the trainer from
the recipe's ``card_data()``: a push never imports a recipe and never guesses from file layouts.

The token comes from the usual Hugging Face sources (the ``token`` argument, ``HF_TOKEN``,
the cached ``hf auth login``). It is never written to the card, the config or the
metrics, never logged, and scrubbed from every error this module raises
(:mod:`flowlab.hub.redaction`). Transient failures (connection errors, HTTP 408/429/5xx) are
retried with exponential backoff; then a one-paragraph :class:`HubError` names the repo and the cause.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from ..errors import HubError
from ..fileio import PICKLE_SUFFIXES
from .card import DEFAULT_LICENSE, build_model_card, final_metrics
from ..card_data import CARD_DATA_FILE, CardData, read_card_data
from .redaction import REDACTED, redact_secrets, scrub_token, scrubbed_logging

__all__ = ["PushFile", "PushResult", "TRANSIENT_STATUS", "push_to_hub", "plan_push"]

logger = logging.getLogger(__name__)

#: HTTP status codes worth retrying (the same set huggingface_hub's own backoff uses).
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


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


def _artifact_dir(output_dir: Path, card: CardData) -> Path:
    path = output_dir / card.artifact
    if not path.is_dir() or not any(path.iterdir()):
        raise HubError(
            f"{output_dir} has no {card.artifact}/ folder (recipe {card.recipe!r} saves its trained artefact there "
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
            if name.endswith(PICKLE_SUFFIXES):
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


def _last_sample_grid(output_dir: Path) -> Optional[Path]:
    samples = output_dir / "samples"
    if not samples.is_dir():
        return None
    grids = sorted(p for p in samples.glob("step_*.png") if p.is_file())
    return grids[-1] if grids else None


# --------------------------------------------------------------------------- planning


def _free(path: str, taken: set[str]) -> str:
    return path if path not in taken else f"flowlab/{path}"


def _card_data_of(output_dir: Path, card_data: Optional[Mapping[str, Any]]) -> CardData:
    """The run's ``card.json``, with ``card_data`` (keys of :class:`CardData`) overriding its fields; a run
    without ``card.json`` needs ``card_data`` with at least ``recipe`` and ``artifact``."""
    if card_data is None:
        return read_card_data(output_dir)
    saved = read_card_data(output_dir).to_dict() if (output_dir / CARD_DATA_FILE).is_file() else {}
    return CardData.from_dict({**saved, **card_data}, "push_to_hub(card_data=...)")


def plan_push(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    license: Optional[str] = None,
    token: Optional[str] = None,
    card_data: Optional[Mapping[str, Any]] = None,
) -> list[PushFile]:
    """The files a push of ``output_dir`` to ``repo_id`` uploads, with the card and config generated.

    Reads the run folder only. Raises :class:`HubError` if it is not a finished flowlab run.
    ``card_data`` overrides fields of the run's ``card.json`` (see :func:`push_to_hub`).
    """
    out = Path(output_dir)
    if not out.is_dir():
        raise HubError(f"{out} does not exist or is not a folder (give the output_dir of a finished training run)")
    config = _read_config(out)
    card = _card_data_of(out, card_data).for_repo(repo_id)
    artifact = _artifact_dir(out, card)
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
    lic = license or card.license or hub_cfg.get("license") or DEFAULT_LICENSE
    model_card = build_model_card(repo_id, config, card, final_metrics(_read_metrics(out)), grid_in_repo, lic, token)
    readme = str(model_card).encode()
    files.insert(0, PushFile("README.md", None, len(readme), readme))
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
    card_data: Optional[Mapping[str, Any]] = None,
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
        card_data: fields of :class:`~flowlab.card_data.CardData` that override the run's
            ``card.json`` (e.g. ``{"license": "other"}``); for a run without ``card.json`` (trained
            before flowlab wrote it) it must give at least ``recipe`` and ``artifact`` (the folder to
            upload), and should give ``usage``, ``tags`` and ``pipeline_tag``.

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

    with scrubbed_logging(token):
        files = plan_push(output_dir, repo_id, license=license, token=token, card_data=card_data)  # a finished run? (before asking for a token)
    resolved = None if dry_run else _resolve_token(token)
    with scrubbed_logging(resolved):
        if resolved and resolved != token:  # found in HF_TOKEN / the cached login: scrub that one too
            files = plan_push(output_dir, repo_id, license=license, token=resolved, card_data=card_data)
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
