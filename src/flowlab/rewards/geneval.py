"""GenEval as a reward, through the FlowGRPO reward server's wire format.

GenEval (object detection with Mask2Former plus CLIP colour classification) needs mmdet and
its own environment, so FlowGRPO serves it over HTTP (``yifan123/reward-server``,
``app_geneval.py``) and its trainer is a client (``flow_grpo/rewards.py`` ``geneval_score``,
lines 160-229 in yifan123/flow_grpo). :class:`GenEvalReward` speaks exactly that protocol, so
the existing server works unchanged::

    POST <url>   (body: a pickle, protocol 4)
    {"images": [<JPEG bytes>, ...],          # PIL ``save(format="JPEG")``, default quality 75
     "meta_datas": [{...}, ...],             # one GenEval metadata dict per image
     "only_strict": bool}                    # True: skip GenEval's official (non-strict) check

    200 OK   (body: a pickle)
    {"scores": [float, ...],                 # partial credit in [0, 1] (the training reward)
     "rewards": [0./1., ...],                # GenEval's official correctness (0 when only_strict)
     "strict_rewards": [0./1., ...],         # exact counts/colours/positions
     "group_rewards": {tag: [...]},          # per category: 0/1 for the images of that tag,
     "group_strict_rewards": {tag: [...]}}   #   -10.0 as a placeholder for the others

    500  a traceback as text (retried, as the reference's ``Retry(status_forcelist=[500])``)

Each metadata dict is a line of GenEval's ``*_metadata.jsonl``: ``tag`` (``single_object``,
``two_object``, ``counting``, ``colors``, ``position``, ``color_attr``), ``include`` (a list of
``{"class", "count"[, "color"][, "position"]}``), optionally ``exclude``, and ``prompt`` (the
server reads it; it is filled in from the prompt when missing).

Security: the answer is unpickled with :func:`flowlab.rewards.restricted_pickle.loads`, which
accepts plain data only (dicts, lists, numbers, strings, numpy arrays) and refuses any other
global, so a hostile server cannot run code in the trainer. Point ``url`` only at a server you
run: the request is a pickle too, which the server unpickles.

The reward returned is ``score`` (partial credit, the reference's training reward; see
``multi_score`` in ``flow_grpo/rewards.py`` lines 381-393), ``strict`` or ``accuracy``. After
each call :attr:`info` holds ``score``, ``strict_accuracy``, ``accuracy`` (when the server
computed it, i.e. ``only_strict`` is false) and, per category present in the batch,
``<tag>/strict_accuracy``, ``<tag>/accuracy`` and ``<tag>/count``; :attr:`last_results` keeps the
per-image values for exact aggregation over many batches (:func:`category_accuracy`).
"""
from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from flowlab.rewards.base import OptionError, RewardError, RewardFunction, coerce_scores, register_reward
from flowlab.rewards.imaging import to_pil
from flowlab.rewards.remote import AttemptError, HTTPClient
from flowlab.rewards import restricted_pickle

__all__ = ["GenEvalReward", "GENEVAL_TAGS", "category_accuracy", "encode_jpeg"]

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
"""GenEval's six categories (``required_keys`` of the server's ``compute_geneval``)."""

_PLACEHOLDER = -10.0  # the server's value in a category's list for images of another category
_SCORES = {"score": "scores", "strict": "strict_rewards", "accuracy": "rewards"}


def encode_jpeg(images: Tensor, quality: int = 75) -> list[bytes]:
    """Float ``(N, C, H, W)`` in ``[0, 1]`` -> JPEG bytes of the RGB 8-bit images (PIL's default
    quality 75, as the reference client's ``img.save(buffer, format="JPEG")``)."""
    out = []
    for im in to_pil(images):
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def category_accuracy(tags: Sequence[str], correct: Sequence[float] | Tensor) -> dict[str, tuple[float, int]]:
    """Accuracy per GenEval category.

    Args:
        tags: ``N`` category tags.
        correct: ``N`` values in {0, 1} (NaN entries are skipped).

    Returns:
        ``{tag: (mean of correct over that tag's images, number of images)}`` for each tag present.
    """
    c = torch.as_tensor(correct, dtype=torch.float64).reshape(-1)
    if c.numel() != len(tags):
        raise ValueError(f"got {len(tags)} tags but {c.numel()} values")
    out = {}
    for tag in dict.fromkeys(tags):
        sel = torch.tensor([t == tag for t in tags]) & ~torch.isnan(c)
        k = int(sel.sum())
        out[tag] = (float(c[sel].mean()) if k else float("nan"), k)
    return out


@register_reward("geneval")
class GenEvalReward(RewardFunction):
    """Client of a FlowGRPO GenEval reward server (see the module docstring for the wire format).

    Args:
        url: the server (the reference's default is ``http://127.0.0.1:18085``).
        score: which per-image value is the reward: ``score`` (partial credit, the reference's
            training reward), ``strict`` (exact match, 0/1) or ``accuracy`` (GenEval's official
            correctness, 0/1; needs ``only_strict: false``).
        only_strict: ask the server to skip the official check (faster; the reference passes
            ``True`` in training and ``False`` in evaluation).
        batch_size: images per request (64 in the reference).
        jpeg_quality: JPEG quality of the images sent (75: PIL's default, as the reference).
        timeout: seconds allowed for connecting and for each read (120 in the reference).
        retries: extra attempts after a failure (the reference retries HTTP 500 up to 1000 times).
        backoff: first wait between attempts in seconds, doubled each retry.
        backoff_max: cap of one wait.
        headers: extra HTTP headers.
    """

    def __init__(
        self,
        *,
        url: str = "http://127.0.0.1:18085",
        score: str = "score",
        only_strict: bool = True,
        batch_size: int = 64,
        jpeg_quality: int = 75,
        timeout: float = 120.0,
        retries: int = 10,
        backoff: float = 1.0,
        backoff_max: float = 30.0,
        headers: dict[str, str] | None = None,
    ):
        super().__init__()
        if score not in _SCORES:
            raise OptionError("score", f"must be one of {', '.join(_SCORES)}, got {score!r}")
        if score == "accuracy" and only_strict:
            raise OptionError("only_strict", "score: accuracy needs only_strict: false (the server computes the official check only then)")
        if batch_size < 1:
            raise OptionError("batch_size", f"must be >= 1, got {batch_size}")
        if not 1 <= jpeg_quality <= 100:
            raise OptionError("jpeg_quality", f"must be in 1..100, got {jpeg_quality}")
        self.client = HTTPClient(url, timeout=timeout, retries=retries, backoff=backoff, backoff_max=backoff_max, headers=headers)
        self.url = url
        self.score_key = score
        self.only_strict = only_strict
        self.batch_size = batch_size
        self.jpeg_quality = jpeg_quality
        self.last_results: dict[str, Any] = {}

    # ----------------------------------------------------------------- request
    @staticmethod
    def request_metadata(prompts: list[str] | None, metadata: list[dict] | None) -> list[dict]:
        """The ``meta_datas`` sent: each image's metadata with ``prompt`` filled in.

        Raises:
            ValueError: no metadata, or an entry without ``tag``/``include`` or with an unknown tag.
        """
        if metadata is None:
            raise ValueError(
                "the geneval reward needs per-prompt metadata (tag, include, exclude): load the prompts from GenEval's "
                "*_metadata.jsonl with flowlab.data.prompts (format jsonl)"
            )
        out = []
        for i, m in enumerate(metadata):
            if "tag" not in m or "include" not in m:
                missing = "tag" if "tag" not in m else "include"
                raise ValueError(f"geneval metadata entry {i} has no {missing!r} (keys: {sorted(m)}); each needs tag and include")
            if m["tag"] not in GENEVAL_TAGS:
                raise ValueError(f"geneval metadata entry {i} has the unknown tag {m['tag']!r}; GenEval tags: {', '.join(GENEVAL_TAGS)}")
            m = dict(m)
            if "prompt" not in m:
                m["prompt"] = prompts[i] if prompts is not None else ""
            out.append(m)
        return out

    def score(self, images: Tensor, prompts: list[str] | None, metadata: list[dict] | None) -> tuple[Tensor, dict[str, Any]]:
        n = images.shape[0]
        meta = self.request_metadata(prompts, metadata)
        parts: dict[str, list[Tensor]] = {k: [] for k in ("scores", "strict_rewards", "rewards")}
        for i in range(0, n, self.batch_size):
            chunk = meta[i : i + self.batch_size]
            body = restricted_pickle.dumps(
                {"images": encode_jpeg(images[i : i + self.batch_size], self.jpeg_quality), "meta_datas": chunk, "only_strict": self.only_strict}
            )
            answer = self.client.post(body, lambda raw, k=len(chunk): self._parse(raw, k), content_type="application/octet-stream", accept="*/*")
            for k in parts:
                parts[k].append(answer[k])
        results = {k: torch.cat(v) for k, v in parts.items()}
        tags = [m["tag"] for m in meta]
        self.last_results = {"tags": tags, **results}
        return results[_SCORES[self.score_key]], self.summary(tags, results, self.only_strict)

    @staticmethod
    def summary(tags: Sequence[str], results: Mapping[str, Tensor], only_strict: bool) -> dict[str, Any]:
        """Batch means and per-category accuracies (see the module docstring)."""
        mean = lambda t: float(t[~torch.isnan(t)].double().mean()) if bool((~torch.isnan(t)).any()) else float("nan")  # noqa: E731
        info: dict[str, Any] = {"score": mean(results["scores"]), "strict_accuracy": mean(results["strict_rewards"])}
        if not only_strict:
            info["accuracy"] = mean(results["rewards"])
        for tag, (acc, k) in category_accuracy(tags, results["strict_rewards"]).items():
            info[f"{tag}/strict_accuracy"] = acc
            info[f"{tag}/count"] = k
        if not only_strict:
            for tag, (acc, _) in category_accuracy(tags, results["rewards"]).items():
                info[f"{tag}/accuracy"] = acc
        return info

    # ----------------------------------------------------------------- answer
    def _parse(self, raw: bytes, n: int) -> dict[str, Tensor]:
        """Read one answer: per-image ``scores``, ``strict_rewards``, ``rewards`` as float32 ``(n,)``.

        The per-category lists are checked against the per-image values (where a category's list
        is not the placeholder, it must equal that image's value), which catches a server that
        reorders or drops images."""
        try:
            data = restricted_pickle.loads(raw)
        except (restricted_pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise AttemptError(f"the answer is not a valid pickle ({type(e).__name__}: {e}); it began with {raw[:80]!r}") from None
        if not isinstance(data, dict):
            raise AttemptError(f"the answer is a {type(data).__name__}, expected a dict with 'scores', 'rewards', 'strict_rewards'")
        out = {}
        for key in ("scores", "rewards", "strict_rewards"):
            values = data.get(key)
            if values is None:
                raise AttemptError(f"the answer has no {key!r} (keys: {sorted(map(str, data))})")
            values = list(values) if isinstance(values, (list, tuple, np.ndarray)) else values
            if not isinstance(values, list) or len(values) != n:
                got = len(values) if isinstance(values, list) else type(values).__name__
                raise AttemptError(f"{key!r} has {got} entries for {n} images")
            try:
                out[key] = coerce_scores([float(v) if isinstance(v, np.generic) else v for v in values], n, f"geneval server {self.url} ({key})")
            except RewardError as e:
                raise AttemptError(f"{key!r} are not numbers ({e.__cause__ or e})") from None
        for group, per_image in (("group_strict_rewards", "strict_rewards"), ("group_rewards", "rewards")):
            groups = data.get(group, {})
            if not isinstance(groups, dict):
                raise AttemptError(f"{group!r} is a {type(groups).__name__}, expected a dict of per-category lists")
            for tag, values in groups.items():
                try:
                    v = torch.as_tensor(np.asarray(values, dtype=np.float64)).reshape(-1)
                except (TypeError, ValueError) as e:
                    raise AttemptError(f"{group}[{tag!r}] is not a list of numbers ({e})") from None
                if v.numel() != n:
                    raise AttemptError(f"{group}[{tag!r}] has {v.numel()} entries for {n} images")
                mine = v != _PLACEHOLDER
                if not torch.allclose(v[mine], out[per_image].double()[mine], equal_nan=True):
                    raise AttemptError(f"{group}[{tag!r}] disagrees with {per_image!r}: the server's answer is inconsistent", retryable=False)
        return out

    def __repr__(self) -> str:
        return f"GenEvalReward(url={self.url!r}, score={self.score_key!r}, only_strict={self.only_strict})"
