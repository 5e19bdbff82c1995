"""Atomic, verifiable training checkpoints around ``accelerator.save_state``.

A checkpoint is written into ``checkpoints/.tmp-checkpoint-<step>``, completed with
``trainer_state.json`` and a ``manifest.json`` (size and SHA-256 of every file), flushed
to disk, and only then renamed to ``checkpoints/checkpoint-<step>``. A kill at any moment
leaves either the previous checkpoints untouched or the new one complete. On resume,
checkpoints are verified against their manifest, newest first; a truncated or corrupted
one is reported by name and skipped.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from ..errors import CheckpointError
from ..fileio import PICKLE_SUFFIXES, atomic_write_json, fsync_dir, replace_dir_atomic

__all__ = [
    "CheckpointError",
    "CHECKPOINT_PREFIX",
    "list_checkpoints",
    "verify_checkpoint",
    "finalize_checkpoint",
    "find_resume_checkpoint",
    "prune_checkpoints",
    "replace_dir_atomic",
    "check_weights_only",
    "check_dcp_metadata",
    "write_error_message",
]

logger = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "checkpoint-"
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
_PATTERN = re.compile(r"^checkpoint-(\d+)$")
_STALE = re.compile(r"^\.(tmp|old)-checkpoint-\d+$")




def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_error_message(error: OSError, target: str | os.PathLike) -> str:
    """One paragraph for an ``OSError`` (a full disk, a lost permission) while saving ``target``.

    Saves go to a temporary folder that is renamed only when complete, so the message can
    promise that nothing older was replaced.
    """
    reason = error.strerror or str(error) or type(error).__name__
    where = f" (writing {error.filename})" if error.filename else ""
    hint = " Free some disk space or choose another output_dir." if error.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return (
        f"cannot save {target}: {reason}{where}.{hint} The save was abandoned; earlier checkpoints and the "
        "previously saved artefact are intact, and train.resume=latest continues from the newest checkpoint."
    )


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Completed checkpoints under ``root`` as ``(step, path)``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _PATTERN.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def finalize_checkpoint(tmp_dir: Path, final_dir: Path, state: dict) -> None:
    """Add ``trainer_state.json`` and the manifest to ``tmp_dir`` and move it to ``final_dir``."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    atomic_write_json(tmp_dir / STATE, state)
    files = {}
    for p in sorted(tmp_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files[str(p.relative_to(tmp_dir))] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    atomic_write_json(tmp_dir / MANIFEST, {"step": state.get("step"), "files": files})
    fsync_dir(tmp_dir)
    replace_dir_atomic(tmp_dir, final_dir)


def check_weights_only(file: str | os.PathLike, name: str | None = None) -> None:
    """Refuse a torch pickle file that holds anything but tensors, numbers, strings and containers.

    ``accelerator.load_state`` unpickles the custom states (``custom_checkpoint_*.pkl``: the
    LR scheduler, the EMA) with ``weights_only=False``, which would run any code a crafted
    file carries. Every pickle of a checkpoint is therefore first loaded here with
    ``torch.load(..., weights_only=True)`` (accelerate's allow-list for RNG states; ``mmap``
    so tensor data is not read), and a file that needs anything else is rejected unread.

    Raises:
        CheckpointError: naming ``name`` (default: the file).
    """
    from accelerate.utils.other import load

    name = name or str(file)
    try:
        load(str(file), map_location="cpu", mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to load safely is a refusal
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{name} cannot be loaded with torch.load(weights_only=True), so it is not unpickled: {first}"
        ) from None


#: what a ``torch.distributed.checkpoint`` ``.metadata`` pickle may name (a sharded FSDP checkpoint's index)
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": None,  # any of its dataclasses and enums
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}
DCP_METADATA = ".metadata"


def check_dcp_metadata(file: str | os.PathLike, name: str | None = None) -> None:
    """Refuse a ``torch.distributed.checkpoint`` index (``.metadata``) that names anything but DCP's own
    metadata classes, torch dtypes/sizes and paths.

    DCP reads this file with a plain ``pickle.load`` when a sharded (FSDP) checkpoint is loaded, so a
    crafted one could run code; it is unpickled here first with an allow-list (:data:`_DCP_GLOBALS`).

    Raises:
        CheckpointError: naming ``name`` (default: the file) and the refused global.
    """
    import pickle

    import torch

    class _Restricted(pickle.Unpickler):
        def find_class(self, module: str, qualname: str):
            allowed = _DCP_GLOBALS.get(module, set())
            if module == "torch" and isinstance(getattr(torch, qualname, None), (torch.dtype, type(torch.Size))):
                return getattr(torch, qualname)
            if module in _DCP_GLOBALS and (allowed is None or qualname in allowed):
                return super().find_class(module, qualname)
            raise pickle.UnpicklingError(f"refused global {module}.{qualname}")

    name = name or str(file)
    try:
        with open(file, "rb") as f:
            _Restricted(f).load()
    except Exception as e:  # noqa: BLE001 - any failure to load safely is a refusal
        raise CheckpointError(f"{name} is not a plain torch.distributed.checkpoint index, so it is not loaded: {e}") from None


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check every file of a checkpoint against its manifest; return its trainer state.

    Every pickled file (``.bin``, ``.pkl``, ``.pt``) must also load with ``weights_only=True``
    (:func:`check_weights_only`), and every ``torch.distributed.checkpoint`` index of a sharded
    checkpoint through :func:`check_dcp_metadata`.

    Raises:
        CheckpointError: naming the checkpoint and the file that is missing, truncated, altered
            or unsafe to unpickle.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {MANIFEST} (was the save interrupted?)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupted ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(m, dict) and {"size", "sha256"} <= m.keys() for m in files.values()):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupted (no valid 'files' table)")
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST}
    unlisted = sorted(on_disk - files.keys())
    if unlisted:
        raise CheckpointError(f"checkpoint {path}: {unlisted[0]} is not in its {MANIFEST} (added or renamed after the save)")
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {rel}")
        if f.stat().st_size != meta["size"]:
            raise CheckpointError(f"checkpoint {path}: {rel} is truncated ({f.stat().st_size} of {meta['size']} bytes)")
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {rel} is corrupted (checksum mismatch)")
    for f in sorted(path.rglob("*")):  # every pickle, listed in the manifest or not
        if f.is_file() and f.name.endswith(PICKLE_SUFFIXES):
            check_weights_only(f, f"checkpoint {path}: {f.relative_to(path)}")
        elif f.is_file() and f.name == DCP_METADATA:
            check_dcp_metadata(f, f"checkpoint {path}: {f.relative_to(path)}")
    try:
        return json.loads((path / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {STATE} ({e})") from None


def find_resume_checkpoint(root: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest checkpoint under ``root`` that verifies, with its trainer state.

    Broken checkpoints are logged by name and skipped; ``None`` if there is none.
    """
    for step, path in reversed(list_checkpoints(root)):
        try:
            return path, verify_checkpoint(path)
        except CheckpointError as e:
            logger.warning("skipping %s; falling back to an older checkpoint", e)
    return None


def prune_checkpoints(root: str | os.PathLike, total_limit: int) -> list[Path]:
    """Delete the oldest checkpoints so that at most ``total_limit`` remain; also stale temporaries."""
    root = Path(root)
    removed = []
    ckpts = list_checkpoints(root)
    for _, p in ckpts[: max(0, len(ckpts) - total_limit)]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if root.is_dir():  # half-written folders left by a kill during an earlier save
        for p in root.iterdir():
            if _STALE.match(p.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed
