"""A tiny byte-level BPE CLIP tokenizer written to a folder (no download).

The vocabulary holds every byte symbol alone and word-final (``</w>``), one token per merge,
then ``<|startoftext|>`` and ``<|endoftext|>``: ``2 * 256 + len(merges) + 2`` entries, so a
``CLIPTokenizer`` read from the folder has a real vocabulary (not transformers' empty fallback).
"""
from __future__ import annotations

import json
import os

__all__ = ["bytes_to_unicode", "write_clip_tokenizer_files"]

DEFAULT_MERGES = (("t", "h"), ("th", "e</w>"), ("a", "n</w>"))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode symbol table (the BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer_files(directory: str | os.PathLike, merges=DEFAULT_MERGES) -> dict[str, int]:
    """Write ``vocab.json`` and ``merges.txt`` of a tiny CLIP BPE tokenizer into ``directory``.

    Args:
        directory: the folder (created if missing).
        merges: ``(left, right)`` pairs, in merge order; each adds the token ``left + right``.
            Default: ``th``, ``the</w>`` and ``an</w>`` (517 entries in all).

    Returns:
        The vocabulary written: token -> id.
    """
    os.makedirs(directory, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(["#version: 0.2"] + [f"{a} {b}" for a, b in merges]) + "\n")
    return vocab
