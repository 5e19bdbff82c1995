"""Reference reward server: any registered reward over the HTTP protocol of
:mod:`flowlab.rewards.remote`, with the standard library's ``http.server``.

::

    python -m flowlab.rewards.server --reward jpeg_compressibility --port 8000
    python -m flowlab.rewards.server --reward digits_classifier --option target=3 --port 8000
    python -m flowlab.rewards.server --spec '{"name": "clip_score", "model": "/models/clip"}'

``POST`` (any path) takes ``{"images": [base64 PNG...], "prompts": [...], "metadata": [...]}``
and answers ``{"scores": [...]}`` (NaN as ``null``) plus ``{"info": {...}}``; ``GET`` answers
``{"status": "ok", "reward": <name>}`` (a health check). A malformed request (or one the reward
rejects with ValueError/TypeError, e.g. no prompts for CLIP) gets a 400, any other error a 500, each with ``{"error": "..."}``. Calls to the reward are serialised
by a lock (rewards need not be thread-safe); requests are accepted concurrently.

It is meant for tests, for serving a reward from another environment, and as a template
for real servers. It has no authentication: bind it to localhost or a private network.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Mapping

import yaml

from flowlab.rewards.base import RewardFunction, build_reward
from flowlab.rewards.imaging import decode_png_base64

__all__ = ["make_server", "serve_in_thread", "main"]

MAX_BODY_BYTES = 512 * 1024 * 1024


class _BadRequest(ValueError):
    pass


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats by None (JSON has no NaN) in nested info dicts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    return str(value)


def _parse_request(body: bytes) -> tuple[Any, list[str] | None, list[dict] | None]:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _BadRequest(f"the body is not JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise _BadRequest('expected a JSON object {"images": [base64 PNG, ...], "prompts": [...], "metadata": [...]}')
    try:
        images = decode_png_base64(data["images"])
    except ValueError as e:
        raise _BadRequest(str(e)) from None
    n = images.shape[0]
    prompts, metadata = data.get("prompts"), data.get("metadata")
    if prompts is not None and (not isinstance(prompts, list) or len(prompts) != n or not all(isinstance(p, str) for p in prompts)):
        raise _BadRequest(f"'prompts' must be a list of {n} strings")
    if metadata is not None and (not isinstance(metadata, list) or len(metadata) != n or not all(isinstance(m, dict) for m in metadata)):
        raise _BadRequest(f"'metadata' must be a list of {n} objects")
    return images, prompts, metadata


def make_server(reward: RewardFunction, host: str = "127.0.0.1", port: int = 8000, quiet: bool = True) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) that scores requests with ``reward``.

    Args:
        reward: the reward to serve.
        host: interface to bind.
        port: port to bind (0 picks a free one; read it from ``server.server_address``).
        quiet: do not log each request to stderr.

    Returns:
        The server; run it with ``serve_forever()`` and stop it with ``shutdown()`` and
        ``server_close()``.
    """
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
            if not quiet:
                super().log_message(format, *args)

        def _send(self, code: int, obj: Mapping[str, Any]) -> None:
            body = json.dumps(_json_safe(obj)).encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (stdlib naming)
            self._send(200, {"status": "ok", "reward": reward.name})

        def do_POST(self) -> None:  # noqa: N802
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._send(411, {"error": "Content-Length is required"})
                return
            if length > MAX_BODY_BYTES:
                self._send(413, {"error": f"request body over {MAX_BODY_BYTES} bytes; send smaller batches"})
                return
            body = self.rfile.read(length)
            try:
                images, prompts, metadata = _parse_request(body)
            except _BadRequest as e:
                self._send(400, {"error": str(e)})
                return
            try:
                with lock:
                    scores = reward(images, prompts, metadata)
                    info = dict(reward.info)
            except (ValueError, TypeError) as e:  # the request does not suit this reward (e.g. no prompts)
                self._send(400, {"error": f"{type(e).__name__}: {e}"})
                return
            except Exception as e:  # report, keep serving
                self._send(500, {"error": f"{type(e).__name__}: {e}"})
                return
            self._send(200, {"scores": [None if math.isnan(s) else s for s in scores.tolist()], "info": info})

    return ThreadingHTTPServer((host, port), Handler)


def serve_in_thread(reward: RewardFunction, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Start :func:`make_server` in a daemon thread; returns the server and its URL.
    Stop it with ``server.shutdown(); server.server_close()``."""
    server = make_server(reward, host, port)
    threading.Thread(target=server.serve_forever, name="flowlab-reward-server", daemon=True).start()
    h, p = server.server_address[:2]
    return server, f"http://{h}:{p}/"


def _parse_options(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--option expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    from flowlab.rewards import REWARDS
    from flowlab.errors import ConfigError

    parser = argparse.ArgumentParser(prog="python -m flowlab.rewards.server", description="Serve a flowlab reward over HTTP.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--reward", help=f"a registered reward: {', '.join(sorted(REWARDS))}")
    group.add_argument("--spec", help='a full reward spec as JSON/YAML, e.g. \'{"name": "digits_classifier", "target": 3}\'')
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a reward option (YAML value), repeatable")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    spec = yaml.safe_load(args.spec) if args.spec else {"name": args.reward}
    if not isinstance(spec, dict):
        parser.error("--spec must be a mapping")
    spec.update(_parse_options(args.option))
    try:
        reward = build_reward(spec, key="reward")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = make_server(reward, args.host, args.port, quiet=not args.verbose)
    host, port = server.server_address[:2]
    print(f"serving reward {reward.name!r} on http://{host}:{port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
