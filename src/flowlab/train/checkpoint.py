"""Atomic, verifiable training checkpoints around ``accelerator.save_state``.

A checkpoint is written into ``checkpoints/.tmp-checkpoint-<step>``, completed with
``trainer_state.json`` and a ``manifest.json`` (size and SHA-256 of every file), flushed
to disk, and only then renamed to ``checkpoints/checkpoint-<step>``. A kill at any moment
leaves either the previous checkpoints untouched or the new one complete. On resume,
checkpoints are verified against their manifest, newest first; a truncated or corrupted
one is reported by name and skipped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

__all__ = [
    "CheckpointError",
    "CHECKPOINT_PREFIX",
    "list_checkpoints",
    "verify_checkpoint",
    "finalize_checkpoint",
    "find_resume_checkpoint",
    "prune_checkpoints",
    "write_json_atomic",
    "replace_dir_atomic",
]

logger = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "checkpoint-"
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message names it."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Write JSON to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir_atomic(tmp: Path, final: Path) -> None:
    """Move a completed folder ``tmp`` to ``final``, replacing an older ``final`` safely."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".old-{final.name}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


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
    write_json_atomic(tmp_dir / STATE, state)
    files = {}
    for p in sorted(tmp_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files[str(p.relative_to(tmp_dir))] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    write_json_atomic(tmp_dir / MANIFEST, {"step": state.get("step"), "files": files})
    _fsync_dir(tmp_dir)
    replace_dir_atomic(tmp_dir, final_dir)


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check every file of a checkpoint against its manifest; return its trainer state.

    Raises:
        CheckpointError: naming the checkpoint and the file that is missing, truncated or altered.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {MANIFEST} (was the save interrupted?)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupted ({e})") from None
    for rel, meta in manifest.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {rel}")
        if f.stat().st_size != meta["size"]:
            raise CheckpointError(f"checkpoint {path}: {rel} is truncated ({f.stat().st_size} of {meta['size']} bytes)")
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {rel} is corrupted (checksum mismatch)")
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
    return removed
