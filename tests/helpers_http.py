"""Local HTTP servers for tests: a threaded server on 127.0.0.1 (port 0) served from a thread."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["LocalHTTPServer", "QuietHandler"]


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler speaking HTTP/1.1 (keep-alive) that logs nothing."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_body(self, code: int, body: bytes, content_type: str = "application/json") -> None:
        """Answer with status ``code`` and ``body``."""
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class LocalHTTPServer:
    """A ``ThreadingHTTPServer`` on 127.0.0.1 with a free port, served from a daemon thread
    (handler threads are daemons too) while used as a context manager.

    Args:
        handler: the request handler class.
        path: appended to ``http://127.0.0.1:<port>`` to make :attr:`url`.

    Attributes:
        server: the ``ThreadingHTTPServer`` (bound on construction, so the port is known).
        url: ``http://127.0.0.1:<port>`` + ``path``.
    """

    def __init__(self, handler: type[BaseHTTPRequestHandler], path: str = ""):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{path}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
