"""flowlab.fileio: atomic writes leave either the old or the new complete file, and no temporary file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT
from flowlab.fileio import (
    PICKLE_SUFFIXES,
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    replace_dir_atomic,
)


def _listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_writes_round_trip_and_create_the_folder(tmp_path):
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "t.txt", "héllo\n")
    atomic_write_json(tmp_path / "j.json", {"x": [1, 2], "y": None})
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    assert json.loads((tmp_path / "j.json").read_text()) == {"x": [1, 2], "y": None}
    assert _listing(tmp_path) == ["a", "j.json", "t.txt"]
    # the file gets the ordinary permissions a plain open() gives (umask applied), not a private 0600
    umask = os.umask(0)
    os.umask(umask)
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert (tmp_path / "t.txt").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failure_in_the_middle_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_open(target) as f:
            f.write("half of the new content")
            f.flush()
            assert target.read_text() == "old\n"  # not visible before the block ends
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n" and _listing(tmp_path) == ["metrics.jsonl"]
    with pytest.raises(ZeroDivisionError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            1 / 0
    assert target.read_text() == "old\n" and _listing(tmp_path) == ["metrics.jsonl"]
    # an unserialisable object fails before anything is written
    with pytest.raises(TypeError):
        atomic_write_json(target, {"x": object()})
    assert target.read_text() == "old\n" and _listing(tmp_path) == ["metrics.jsonl"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(target, "a"):
            pass


def test_a_killed_writer_leaves_the_old_file(tmp_path):
    """SIGKILL in the middle of a write: the destination still holds the old complete content."""
    target = tmp_path / "state.json"
    atomic_write_json(target, {"step": 1})
    script = textwrap.dedent(f"""
        import os, signal
        from flowlab.fileio import atomic_open
        with atomic_open({str(target)!r}) as f:
            f.write('{{"step": 2, "half')
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")})
    assert proc.returncode == -9
    assert json.loads(target.read_text()) == {"step": 1}


def test_replace_dir_atomic(tmp_path):
    final, tmp = tmp_path / "pipeline", tmp_path / ".tmp-pipeline"
    final.mkdir()
    (final / "old.json").write_text("1")
    tmp.mkdir()
    (tmp / "new.json").write_text("2")
    replace_dir_atomic(tmp, final)
    assert _listing(final) == ["new.json"] and _listing(tmp_path) == ["pipeline"]
    # a first save (no older folder)
    tmp.mkdir()
    (tmp / "x").write_text("3")
    replace_dir_atomic(tmp, tmp_path / "other")
    assert _listing(tmp_path) == ["other", "pipeline"]


def test_one_list_of_pickle_suffixes():
    """The union of the lists the checkpoint loader and the Hub push used to keep separately."""
    assert set(PICKLE_SUFFIXES) == {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
    from flowlab.hub import push as hub_push
    from flowlab.train import checkpoint

    assert checkpoint.PICKLE_SUFFIXES is PICKLE_SUFFIXES and hub_push.PICKLE_SUFFIXES is PICKLE_SUFFIXES
