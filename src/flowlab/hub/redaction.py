"""Secret scrubbing for everything a push shows or publishes: the card, the config, errors and log lines.

A Hub token must never reach a card, an uploaded config, an error message or a log record. Two
tools: :func:`scrub_token` removes the token in use and anything token-shaped from a text, and
:func:`redact_secrets` replaces secret-looking values of a config-like structure. While pushing,
:func:`scrubbed_logging` applies :func:`scrub_token` to every log record created (flowlab's,
huggingface_hub's, the HTTP client's).
"""
from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, Iterator, Optional

__all__ = ["REDACTED", "scrub_token", "redact_secrets", "scrubbed_logging"]

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
def scrubbed_logging(token: Optional[str]) -> Iterator[None]:
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
