"""OCR reward: how well the text rendered in an image matches the text the prompt asks for.

As in the reference (``flow_grpo/ocr.py``, ``OcrScorer.__call__``, lines 22-63 in
yifan123/flow_grpo, 19-61 in NVlabs/DiffusionNFT), with ``target`` the text between the first pair
of double quotes in the prompt (``prompt.split('"')[1]``) and ``recognised`` the concatenation
of every text line the recogniser found with a confidence above 0::

    t = target without spaces, lower case          r = recognised without spaces, lower case
    d = 0                         if t is a substring of r
        min(levenshtein(r, t), |t|)  otherwise      (many unrelated characters cost at most |t|)
    reward = 1 - d / |t|          in [0, 1]

A recogniser that raises on an image scores it 0 (``d = |t|``), as the reference does; :attr:`info`
``num_ocr_failed`` counts those images. The
target may instead come from the metadata (``metadata[i]["text"]``, e.g. a JSONL prompt file
with a ``text`` field), which takes precedence over the quotes.

The recogniser is PaddleOCR (English, no angle classifier, as the reference), an optional
extra: ``pip install 'flowlab[ocr]'``. Any object with ``recognise(image) -> [(text,
confidence), ...]`` (``image`` an ``(H, W, 3)`` uint8 array) can be passed instead
(:class:`TextRecogniser`).
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
from torch import Tensor

from flowlab.rewards.base import OptionError, RewardFunction, register_reward
from flowlab.rewards.extras import require_extra
from flowlab.rewards.imaging import to_uint8

__all__ = ["OCRReward", "TextRecogniser", "PaddleOCRRecogniser", "levenshtein", "ocr_reward", "quoted_text"]


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1) between ``a`` and ``b``,
    by the two-row dynamic programme in ``O(|a|·|b|)`` time."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def ocr_reward(recognised: str, target: str) -> float:
    """The reference's score of ``recognised`` text against ``target`` (module docstring).

    Raises:
        ValueError: if ``target`` has no character other than spaces (the score is undefined).
    """
    t = target.replace(" ", "").lower()
    if not t:
        raise ValueError(f"OCR target text {target!r} is empty")
    r = recognised.replace(" ", "").lower()
    d = 0 if t in r else min(levenshtein(r, t), len(t))
    return 1.0 - d / len(t)


def quoted_text(prompt: str) -> str | None:
    """The text between the first pair of double quotes of ``prompt`` (``prompt.split('"')[1]``),
    or ``None`` when it has no closing quote."""
    parts = prompt.split('"')
    return parts[1] if len(parts) >= 3 else None


@runtime_checkable
class TextRecogniser(Protocol):
    """Finds text in an image: ``recognise(image) -> [(text, confidence), ...]`` for an
    ``(H, W, 3)`` uint8 RGB array."""

    def recognise(self, image: np.ndarray) -> list[tuple[str, float]]: ...


class PaddleOCRRecogniser:
    """PaddleOCR as a :class:`TextRecogniser`. PaddleOCR 2.x is set up as the reference
    (``PaddleOCR(use_angle_cls=False, lang="en", use_gpu=..., show_log=False)``, ``ocr(image,
    cls=False)``); PaddleOCR 3.x, whose API changed, with the equivalent switches
    (``use_textline_orientation=False``, no document unwarping/orientation) and ``predict``.

    Raises:
        OptionError: (field ``name``) if the ``ocr`` extra is not installed.
    """

    def __init__(self, use_gpu: bool = False, lang: str = "en"):
        paddleocr = require_extra("paddleocr", "ocr", "ocr")
        self.major = int(str(getattr(paddleocr, "__version__", "2")).split(".")[0] or 2)
        if self.major >= 3:
            self.ocr = paddleocr.PaddleOCR(
                use_doc_orientation_classify=False, use_doc_unwarping=False, use_textline_orientation=False,
                lang=lang, device="gpu" if use_gpu else "cpu",
            )
        else:
            self.ocr = paddleocr.PaddleOCR(use_angle_cls=False, lang=lang, use_gpu=use_gpu, show_log=False)

    def recognise(self, image: np.ndarray) -> list[tuple[str, float]]:
        if self.major >= 3:
            found = []
            for res in self.ocr.predict(image):
                found += [(str(t), float(c)) for t, c in zip(res["rec_texts"], res["rec_scores"])]
            return found
        result = self.ocr.ocr(image, cls=False)
        lines = result[0] if result else None
        return [(str(line[1][0]), float(line[1][1])) for line in lines or []]


@register_reward("ocr")
class OCRReward(RewardFunction):
    """Normalised edit-distance OCR reward (module docstring).

    Args:
        use_gpu: run PaddleOCR on the GPU.
        lang: PaddleOCR's language model (``en`` in the reference).
        recogniser: a ready :class:`TextRecogniser` (then PaddleOCR is not loaded); for tests and
            other OCR engines, from Python only.

    Raises:
        OptionError: (field ``name``) when PaddleOCR is needed and the ``ocr`` extra is missing.
    """

    def __init__(self, *, use_gpu: bool = False, lang: str = "en", recogniser: TextRecogniser | None = None):
        super().__init__()
        if recogniser is not None and not callable(getattr(recogniser, "recognise", None)):
            raise OptionError("recogniser", f"{type(recogniser).__name__} has no recognise(image) method")
        self.recogniser = recogniser if recogniser is not None else PaddleOCRRecogniser(use_gpu=use_gpu, lang=lang)

    @staticmethod
    def targets(prompts: list[str] | None, metadata: list[dict] | None, n: int) -> list[str]:
        """Each image's target text: ``metadata[i]["text"]`` if given, else the prompt's quoted text.

        Raises:
            ValueError: naming the sample whose target cannot be found or is empty.
        """
        out = []
        for i in range(n):
            meta_text = metadata[i].get("text") if metadata is not None else None
            if meta_text is not None:
                target = str(meta_text)
            else:
                target = quoted_text(prompts[i]) if prompts is not None else None
                if target is None:
                    shown = repr(prompts[i][:80]) if prompts is not None else "(no prompt)"
                    raise ValueError(f"the ocr reward needs the target text in double quotes in the prompt, or metadata 'text'; sample {i} has neither: {shown}")
            if not target.replace(" ", ""):
                raise ValueError(f"the ocr target text of sample {i} is empty")
            out.append(target)
        return out

    def score(self, images: Tensor, prompts: list[str] | None, metadata: list[dict] | None) -> tuple[list[float], dict[str, Any]]:
        targets = self.targets(prompts, metadata, images.shape[0])
        arrays = to_uint8(images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images)
        scores, failed = [], 0
        for image, target in zip(arrays, targets):
            try:
                found = self.recogniser.recognise(image)
                text = "".join(t for t, confidence in found if confidence > 0)
            except Exception:  # the reference's "OCR processing failed": maximum penalty
                text, failed = "", failed + 1
            scores.append(ocr_reward(text, target))
        return scores, {"num_ocr_failed": failed}

    def __repr__(self) -> str:
        return f"OCRReward(recogniser={type(self.recogniser).__name__})"
