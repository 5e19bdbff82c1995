"""File I/O shared by every layer: atomic writes, and the file suffixes of pickle-based weights.

The bottom layer (like :mod:`flowlab.errors`): it imports nothing from flowlab.

An atomic write goes to a temporary file in the destination's folder (same filesystem), is
flushed and ``fsync``-ed, then renamed over the destination with :func:`os.replace`, and the
folder is ``fsync``-ed. A reader therefore sees either the old file or the complete new one,
never a half-written file, whatever kills the writer; a writer that fails (an exception, a
full disk) leaves the old file untouched and no temporary file behind. Temporary names are
unique per call (``.<name>.<pid>.<random>.tmp``), so concurrent writers of the same file do not
clobber each other's temporary file: the last rename wins.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = [
    "PICKLE_SUFFIXES",
    "atomic_path",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "replace_dir_atomic",
    "fsync_dir",
]

#: File suffixes of pickle-based weights (torch ``.bin``/``.pt``/``.pth``, Lightning ``.ckpt``, plain
#: pickles). Checkpoint loading checks every such file loads with ``weights_only=True``; the Hub
#: push refuses to publish them (safetensors only).
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pickle", ".pkl", ".pt", ".pth")


def fsync_dir(path: str | os.PathLike) -> None:
    """``fsync`` a folder, so a rename inside it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - filesystems that refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it replaces ``path``.

    For writers that take a file name (``safetensors.torch.save_file``, ``PIL.Image.save``)::

        with atomic_path("model.safetensors") as tmp:
            save_file(state, tmp)

    The parent folder is created. If the block raises, the temporary file is removed, ``path`` is
    left as it was, and the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique name, not created here (so the writer's own open applies the usual umask permissions)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file for writing; when the block ends without error it replaces ``path``.

    Args:
        path: the destination.
        mode: ``"w"`` (text, the default) or ``"wb"``.
        encoding: text encoding (default UTF-8 for text mode).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as f:
        yield f
        f.flush()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, **dumps_kwargs: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically. The object is serialised before the file is
    opened, so an unserialisable object leaves no trace."""
    atomic_write_text(path, json.dumps(obj, indent=indent, **dumps_kwargs) + "\n")


def replace_dir_atomic(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a completed folder ``tmp`` to ``final``, replacing an older ``final`` safely.

    The older ``final`` is first renamed to ``.old-<name>`` (and deleted once the new one is in
    place), so at every moment either the old or the new complete folder exists.
    """
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".old-{final.name}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)
