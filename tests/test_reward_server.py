"""The HTTP reward client against real local servers (127.0.0.1, port 0, in a thread): one that
fails and recovers, one that stays down, malformed answers; and the reference server
``flowlab.rewards.server`` round trip, in process and as ``python -m``."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_http import LocalHTTPServer, QuietHandler  # tests/ is on sys.path (pytest's rootdir import)
from flowlab.rewards import RewardError, build_reward
from flowlab.rewards.server import serve_in_thread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an http_proxy


class ScriptedServer(LocalHTTPServer):
    """A local server whose answers follow a script: ``behaviours[i]`` handles request ``i``
    (the last one repeats). A behaviour is ``"ok"``, ``("status", code)``, ``("sleep", s)``,
    ``("raw", bytes)``, ``("scores", list)`` or ``"close"`` (drop the connection)."""

    def __init__(self, *behaviours):
        self.behaviours = list(behaviours) or ["ok"]
        self.requests: list[dict] = []
        outer = self

        class Handler(QuietHandler):
            def _send(self, code, body: bytes):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                i = len(outer.requests)
                outer.requests.append({"payload": payload, "headers": dict(self.headers)})
                b = outer.behaviours[min(i, len(outer.behaviours) - 1)]
                n = len(payload["images"])
                if b == "ok":
                    self._send(200, json.dumps({"scores": [float(k) for k in range(n)]}).encode())
                elif b == "close":
                    self.close_connection = True
                    self.connection.close()
                elif b[0] == "status":
                    self._send(b[1], b'{"error": "scripted failure"}')
                elif b[0] == "sleep":
                    time.sleep(b[1])
                    try:
                        self._send(200, json.dumps({"scores": [0.0] * n}).encode())
                    except OSError:
                        pass  # the client gave up
                elif b[0] == "raw":
                    self._send(200, b[1])
                elif b[0] == "scores":
                    self._send(200, json.dumps({"scores": b[1]}).encode())

        super().__init__(Handler, path="/score")


def _client(url, **options):
    return build_reward({"name": "http", "url": url, "timeout": 1.0, "retries": 3, "backoff": 0.05, "backoff_max": 0.2, **options}, key="rl.rewards[0]")


IMAGES = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("failure", [("status", 500), ("status", 503), ("sleep", 0.6), "close"])
def test_server_fails_then_recovers(failure):
    with ScriptedServer(failure, failure, "ok") as srv:
        r = _client(srv.url, timeout=0.3)
        t0 = time.perf_counter()
        scores = r(IMAGES, ["a", "b", "c"], [{"i": 0}, {"i": 1}, {"i": 2}])
        elapsed = time.perf_counter() - t0
    assert scores.tolist() == [0.0, 1.0, 2.0]
    assert len(srv.requests) == 3
    assert elapsed < 6


def test_request_payload_follows_the_protocol():
    with ScriptedServer("ok") as srv:
        r = _client(srv.url, headers={"Authorization": "Bearer t0ken"})
        r(IMAGES[:2], ["a cat", "a dog"], [{"step": torch.tensor(3), "v": np.float32(0.5)}, {"tags": ("x",)}])
        r(IMAGES[:1, :1])  # grey, no prompts, no metadata
    p = srv.requests[0]["payload"]
    assert set(p) == {"images", "prompts", "metadata"}
    assert p["prompts"] == ["a cat", "a dog"] and p["metadata"] == [{"step": 3, "v": 0.5}, {"tags": ["x"]}]
    assert srv.requests[0]["headers"]["Authorization"] == "Bearer t0ken"
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(p["images"][1]))))
    expected = (IMAGES[1] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(decoded, expected)  # lossless 8-bit PNG
    p = srv.requests[1]["payload"]
    assert p["prompts"] == [""] and p["metadata"] == [{}]
    assert np.asarray(Image.open(io.BytesIO(base64.b64decode(p["images"][0])))).ndim == 2  # mode L


def test_server_that_stays_down_raises_naming_url():
    with ScriptedServer() as srv:
        port = srv.server.server_address[1]
    url = f"http://127.0.0.1:{port}/score"  # closed now: connection refused
    r = _client(url, retries=2)
    t0 = time.perf_counter()
    with pytest.raises(RewardError) as e:
        r(IMAGES)
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert url in msg and "3 attempts" in msg and "connection refused" in msg and "\n" not in msg


def test_always_failing_and_timeouts_are_bounded():
    with ScriptedServer(("status", 500)) as srv:
        with pytest.raises(RewardError, match=r"after 4 attempts.*HTTP status 500"):
            _client(srv.url)(IMAGES)
    assert len(srv.requests) == 4
    with ScriptedServer(("sleep", 1.0)) as srv:
        t0 = time.perf_counter()
        with pytest.raises(RewardError, match=r"after 2 attempts.*timeout after 0\.3 s"):
            _client(srv.url, timeout=0.3, retries=1)(IMAGES)
        assert time.perf_counter() - t0 < 3


def test_client_errors_are_not_retried():
    with ScriptedServer(("status", 404)) as srv:
        with pytest.raises(RewardError, match=r"after 1 attempt .*HTTP status 404"):
            _client(srv.url)(IMAGES)
    assert len(srv.requests) == 1


@pytest.mark.parametrize(
    "answer, pattern",
    [
        (("raw", b"<html>502 Bad Gateway</html>"), r"malformed JSON.*<html>"),
        (("raw", b'{"score": [1, 2, 3]}'), r"no 'scores' list"),
        (("scores", [1.0, 2.0]), r"wrong number of scores: sent 3 images, got 2"),
        (("scores", [1.0, "high", 2.0]), r"scores are not numbers"),
    ],
)
def test_malformed_answers_give_clear_errors(answer, pattern):
    with ScriptedServer(answer) as srv:
        with pytest.raises(RewardError, match=pattern) as e:
            _client(srv.url, retries=1)(IMAGES)
    assert srv.url in str(e.value) and "2 attempts" in str(e.value)


def test_null_scores_are_nan_and_batches_are_split():
    with ScriptedServer(("scores", [1.0, None])) as srv:
        s = _client(srv.url, batch_size=2)(IMAGES[:2])
    assert s[0] == 1.0 and torch.isnan(s[1])
    with ScriptedServer("ok") as srv:
        s = _client(srv.url, batch_size=2)(IMAGES)
    assert s.tolist() == [0.0, 1.0, 0.0] and [len(r["payload"]["images"]) for r in srv.requests] == [2, 1]


def test_reference_server_round_trip():
    local = build_reward({"name": "jpeg_compressibility"})
    server, url = serve_in_thread(local)
    try:
        with _DIRECT.open(url, timeout=5) as resp:
            assert json.loads(resp.read()) == {"status": "ok", "reward": "jpeg_compressibility"}
        remote = _client(url)
        x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        x[0] = 0.5
        assert torch.equal(remote(x, ["p"] * 4), local(x))  # PNG is lossless at the 8 bits JPEG sees
        assert remote.info["server"]["num_nan"] == 0
        grey = torch.rand(2, 1, 8, 8)
        assert torch.equal(remote(grey), local(grey))
        # a request the server rejects is a 400: not retried, reported
        req = urllib.request.Request(url, data=b'{"images": ["not base64!"]}', method="POST", headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            _DIRECT.open(req, timeout=5)
        assert e.value.code == 400 and "not a base64-encoded image" in e.value.read().decode()
    finally:
        server.shutdown()
        server.server_close()


def test_reference_server_reports_nan_as_null():
    local = build_reward({"name": "jpeg_incompressibility"})
    server, url = serve_in_thread(local)
    try:
        body = json.dumps({"images": [], "prompts": [], "metadata": []}).encode()
        with _DIRECT.open(urllib.request.Request(url, data=body, method="POST"), timeout=5) as resp:
            assert json.loads(resp.read())["scores"] == []
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module", autouse=True)
def cli_server():
    """``python -m flowlab.rewards.server`` started when this module's first test runs, so that
    its start-up (importing torch and flowlab) overlaps with the other tests."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowlab.rewards.server", "--reward", "jpeg_incompressibility", "--option", "quality=80", "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


def test_reference_server_command_line(cli_server, capsys):
    line = cli_server.stdout.readline()
    assert line.startswith("serving reward 'jpeg_incompressibility' on http://127.0.0.1:"), line + cli_server.stderr.read()
    url = line.split(" on ")[1].strip()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    expected = build_reward({"name": "jpeg_incompressibility", "quality": 80})(x)
    assert torch.equal(_client(url)(x), expected)

    from flowlab.rewards.server import main

    assert main(["--reward", "jpeg_compresibility"]) == 2
    assert "reward.name: unknown reward 'jpeg_compresibility'" in capsys.readouterr().err
