"""HTTP reward client: scores come from a reward server (GenEval, OCR, VLM judges, ... are
usually served this way, in their own environment).

Protocol (JSON both ways, never pickle)::

    POST <url>   Content-Type: application/json
    {"images": ["<base64 PNG>", ...], "prompts": ["...", ...], "metadata": [{...}, ...]}

    200 OK
    {"scores": [0.93, null, ...]}           # one per image; null -> NaN (could not score)

Images are 8-bit PNGs (grey or RGB) of the ``[0, 1]`` float images (``round(255·x)``).
``prompts`` is a list of N strings (``""`` when the caller gave none) and ``metadata`` a list
of N JSON objects (``{}`` when none; tensors and numpy values are converted to lists and
numbers). A response may carry an ``"info"`` object, which is copied to the reward's
:attr:`~flowlab.rewards.base.RewardFunction.info` under ``server``.

Failures (a timeout, a refused connection, an HTTP error status, malformed JSON or a wrong
number of scores) are retried ``retries`` times with exponential backoff
``min(backoff · 2^k, backoff_max)``; HTTP 4xx answers other than 408/425/429 mean the
request itself is wrong and are not retried. When the attempts are spent, a
:class:`~flowlab.rewards.base.RewardError` names the URL, the attempts and the last cause.
``flowlab.rewards.server`` is a reference server for this protocol. Proxies come from the
environment (``http_proxy``/``https_proxy``/``no_proxy``) except for loopback URLs
(``localhost``, ``127.*``, ``::1``), which are always reached directly.
"""
from __future__ import annotations

import json
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from torch import Tensor

from flowlab.rewards.base import OptionError, RewardError, RewardFunction, coerce_scores, register_reward
from flowlab.rewards.imaging import encode_png_base64

__all__ = ["HTTPReward", "HTTPClient", "AttemptError", "parse_json_answer", "json_default"]

T = TypeVar("T")

_RETRYABLE_4XX = {408, 425, 429}


def json_default(value: Any) -> Any:
    """``json.dumps`` fallback for metadata: tensors and numpy arrays/scalars to lists/numbers."""
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


class AttemptError(Exception):
    """One failed attempt of :class:`HTTPClient`: ``cause`` is a short description, ``retryable``
    whether to try again. A response parser raises it for an answer it cannot read."""

    def __init__(self, cause: str, retryable: bool = True):
        super().__init__(cause)
        self.cause = cause
        self.retryable = retryable


def _check_client_options(url: str, timeout: float, retries: int, backoff: float, backoff_max: float) -> None:
    if not url.startswith(("http://", "https://")):
        raise OptionError("url", f"must start with http:// or https://, got {url!r}")
    if not timeout > 0:
        raise OptionError("timeout", f"must be positive, got {timeout}")
    if retries < 0:
        raise OptionError("retries", f"must be >= 0, got {retries}")
    if backoff < 0:
        raise OptionError("backoff", f"must be >= 0, got {backoff}")
    if backoff_max < 0:
        raise OptionError("backoff_max", f"must be >= 0, got {backoff_max}")


class HTTPClient:
    """POSTs a body to one URL with timeouts and retries; shared by every reward that talks to a server
    (:class:`HTTPReward`, the GenEval client, the VLM judge).

    Args:
        url: the endpoint, ``http://`` or ``https://``.
        timeout: seconds allowed for connecting and for each read of the answer.
        retries: extra attempts after the first failure.
        backoff: the first wait between attempts, in seconds; doubled at every retry.
        backoff_max: the cap of a single wait.
        headers: extra HTTP headers sent with every request.

    Raises:
        OptionError: a URL that is not http(s), a non-positive timeout, negative retries or backoff.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        backoff_max: float = 30.0,
        headers: dict[str, str] | None = None,
    ):
        _check_client_options(url, timeout, retries, backoff, backoff_max)
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.headers = dict(headers or {})
        host = (urllib.parse.urlsplit(url).hostname or "").lower()
        # a proxy from the environment (http_proxy) cannot reach this machine's loopback
        loopback = host in ("localhost", "::1") or host.startswith("127.")
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({})) if loopback else urllib.request.build_opener()

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0-based): ``min(backoff·2^retry, backoff_max)``."""
        return min(self.backoff * math.pow(2.0, retry), self.backoff_max)

    def post(self, body: bytes, parse: Callable[[bytes], T], content_type: str = "application/json", accept: str = "application/json") -> T:
        """POST ``body`` and return ``parse(answer bytes)``, retrying failed attempts.

        A timeout, a refused or broken connection, an HTTP status >= 500 or 408/425/429, and an
        :class:`AttemptError` raised by ``parse`` (retryable unless it says otherwise) are retried
        with exponential backoff; other 4xx statuses are not.

        Raises:
            RewardError: when the attempts are spent, naming the URL, the attempts and the last cause.
        """
        attempts = 0
        started = time.monotonic()
        last = "no attempt made"
        while True:
            attempts += 1
            try:
                return parse(self._attempt(body, content_type, accept))
            except AttemptError as e:
                last = e.cause
                if not e.retryable or attempts > self.retries:
                    break
            time.sleep(self.delay(attempts - 1))
        elapsed = time.monotonic() - started
        raise RewardError(
            f"reward server {self.url} failed after {attempts} attempt{'s' if attempts != 1 else ''} in {elapsed:.1f} s "
            f"(timeout {self.timeout:g} s, retries {self.retries}, backoff {self.backoff:g} s capped at {self.backoff_max:g} s); "
            f"last error: {last}. Check that the server is running and reachable from this machine, or raise the "
            f"reward's timeout/retries."
        )

    def _attempt(self, body: bytes, content_type: str, accept: str) -> bytes:
        req = urllib.request.Request(self.url, data=body, method="POST", headers={"Content-Type": content_type, "Accept": accept, **self.headers})
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            detail = ""
            try:
                detail = e.read(300).decode("utf-8", "replace").strip()
            except Exception:
                pass
            retryable = e.code >= 500 or e.code in _RETRYABLE_4XX
            raise AttemptError(f"HTTP status {e.code} {e.reason}" + (f": {detail}" if detail else ""), retryable) from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise AttemptError(f"timeout after {self.timeout:g} s") from None
            if isinstance(reason, ConnectionRefusedError):
                raise AttemptError("connection refused") from None
            raise AttemptError(f"connection failed ({reason})") from None
        except (socket.timeout, TimeoutError):
            raise AttemptError(f"timeout after {self.timeout:g} s (reading the answer)") from None
        except (ConnectionError, OSError) as e:  # reset / broken pipe / incomplete read
            raise AttemptError(f"connection error ({type(e).__name__}: {e})") from None


def parse_json_answer(raw: bytes) -> Any:
    """Decode a JSON answer, as an :class:`AttemptError` (retried) when it is not JSON."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        snippet = raw[:120].decode("utf-8", "replace")
        raise AttemptError(f"malformed JSON in the answer ({e}); it began with {snippet!r}") from None


@register_reward("http")
class HTTPReward(RewardFunction):
    """Client of a reward server (see the module docstring for the protocol).

    Args:
        url: the endpoint, ``http://`` or ``https://``.
        timeout: seconds allowed for connecting and for each read of the answer.
        retries: extra attempts after the first failure.
        backoff: the first wait between attempts, in seconds; doubled at every retry.
        backoff_max: the cap of a single wait.
        headers: extra HTTP headers (e.g. ``{"Authorization": "Bearer ..."}``).
        batch_size: images per request (``None``: the whole batch in one request).
    """

    def __init__(
        self,
        *,
        url: str,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        backoff_max: float = 30.0,
        headers: dict[str, str] | None = None,
        batch_size: int | None = None,
    ):
        super().__init__()
        self.client = HTTPClient(url, timeout=timeout, retries=retries, backoff=backoff, backoff_max=backoff_max, headers=headers)
        if batch_size is not None and batch_size < 1:
            raise OptionError("batch_size", f"must be >= 1, got {batch_size}")
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.batch_size = batch_size

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0-based): ``min(backoff·2^retry, backoff_max)``."""
        return self.client.delay(retry)

    def score(self, images: Tensor, prompts: list[str] | None, metadata: list[dict] | None) -> tuple[Tensor, dict[str, Any]]:
        n = images.shape[0]
        step = self.batch_size or n
        parts, server_info = [], {}
        for i in range(0, n, step):
            sl = slice(i, i + step)
            payload = {
                "images": encode_png_base64(images[sl]),
                "prompts": list(prompts[sl]) if prompts is not None else [""] * len(range(*sl.indices(n))),
                "metadata": list(metadata[sl]) if metadata is not None else [{} for _ in range(*sl.indices(n))],
            }
            try:
                body = json.dumps(payload, default=json_default, allow_nan=False).encode("utf-8")
            except (TypeError, ValueError) as e:
                raise ValueError(f"metadata for reward server {self.url} is not JSON-serialisable: {e}") from e
            scores, info = self.client.post(body, lambda raw, k=len(payload["images"]): self._parse(raw, k))
            parts.append(scores)
            if info:
                server_info = info
        extra = {"server": server_info} if server_info else {}
        return torch.cat(parts), extra

    def _parse(self, raw: bytes, n: int) -> tuple[Tensor, dict]:
        data = parse_json_answer(raw)
        if not isinstance(data, dict) or "scores" not in data:
            raise AttemptError(f"the answer has no 'scores' list (got {str(data)[:120]!r})")
        scores = data["scores"]
        if not isinstance(scores, list):
            raise AttemptError(f"'scores' is a {type(scores).__name__}, expected a list of numbers or null")
        if len(scores) != n:
            raise AttemptError(f"wrong number of scores: sent {n} images, got {len(scores)} scores")
        try:
            t = coerce_scores(scores, n, f"reward server {self.url}")
        except RewardError as e:
            raise AttemptError(f"scores are not numbers or null ({e.__cause__ or e})") from None
        info = data.get("info")
        return t, info if isinstance(info, dict) else {}

    def __repr__(self) -> str:
        return f"HTTPReward(url={self.url!r}, timeout={self.timeout:g}, retries={self.retries})"
