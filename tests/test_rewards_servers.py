"""Rewards served by other programs: GenEval through the FlowGRPO reward server's pickle wire
format, and a VLM judge over an OpenAI-compatible chat endpoint; both against local fake servers
on 127.0.0.1. Also the restricted unpickler that keeps a hostile server from running code."""
from __future__ import annotations

import base64
import io
import json
import os
import pickle  # tests only: the fake servers speak the reference's pickle format
import re

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_http import LocalHTTPServer, QuietHandler
from flowlab.errors import ConfigError, RewardError
from flowlab.rewards import build_reward
from flowlab.rewards import restricted_pickle
from flowlab.rewards.geneval import GENEVAL_TAGS, GenEvalReward, category_accuracy
from flowlab.rewards.vlm import UNIFIEDREWARD_TEMPLATE


# --------------------------------------------------------------------------- restricted pickle


class _Exploit:
    """Unpickles to ``os.system(<cmd>)`` with the standard library's pickle."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Plain:
    """An ordinary class: its instances pickle as a reference to the class."""


def test_restricted_unpickler_reads_plain_data_and_numpy():
    data = {
        "scores": [0.5, 1.0], "flags": (True, None), "name": "x", "raw": b"\x00\xff", "nested": {"a": [1, 2]},
        "np_scalar": np.float32(0.25), "np_array": np.arange(6, dtype=np.float64).reshape(2, 3), "set": {1, 2},
    }
    for protocol in (2, 4, 5):
        out = restricted_pickle.loads(pickle.dumps(data, protocol=protocol))
        assert out["scores"] == [0.5, 1.0] and out["nested"] == {"a": [1, 2]} and out["raw"] == b"\x00\xff"
        assert out["np_scalar"] == np.float32(0.25) and np.array_equal(out["np_array"], data["np_array"])


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"scores": [_Exploit(f"touch {marker}")]})
    with pytest.raises(RewardError, match=r"refused to unpickle the global (posix|os)\.system"):
        restricted_pickle.loads(payload)
    assert not marker.exists()
    with pytest.raises(RewardError, match=r"builtins\.eval"):
        restricted_pickle.loads(pickle.dumps(eval))
    with pytest.raises(RewardError, match=r"refused to unpickle the global test_rewards_servers\._Plain"):
        restricted_pickle.loads(pickle.dumps(_Plain()))  # any class instance is refused too


# --------------------------------------------------------------------------- GenEval


class FakeGenEvalServer(LocalHTTPServer):
    """The reference server's protocol (yifan123/reward-server app_geneval.py) with fake scoring:
    ``score`` = metadata ``fake_score``; ``strict`` = 1 if the decoded JPEG's mean brightness > 0.5
    (so the images really travel); ``correct`` = strict unless ``only_strict`` (then 0). Group lists
    hold -10.0 for the images of other categories, as ``compute_geneval`` does.

    ``mode``: ``ok``, ``fail_once`` (HTTP 500 with a traceback first), ``hostile`` (answers a pickle
    that would run code), ``inconsistent`` (group lists that disagree with the per-image values)."""

    def __init__(self, mode="ok", marker=None):
        self.requests: list[dict] = []
        outer = self

        class Handler(QuietHandler):
            def _send(self, code, body):
                self.send_body(code, body, "application/octet-stream")

            def do_POST(self):
                data = pickle.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"data": data, "headers": dict(self.headers), "path": self.path})
                if mode == "fail_once" and len(outer.requests) == 1:
                    return self._send(500, b"Traceback (most recent call last): ... CUDA out of memory")
                if mode == "garbage":
                    return self._send(200, b"<html>proxy error</html>")
                if mode == "hostile":
                    return self._send(200, pickle.dumps({"scores": [_Exploit(f"touch {marker}")]}))
                images = [Image.open(io.BytesIO(b), formats=["jpeg"]) for b in data["images"]]
                scores, rewards, strict = [], [], []
                groups = {k: [] for k in GENEVAL_TAGS}
                strict_groups = {k: [] for k in GENEVAL_TAGS}
                for im, meta in zip(images, data["meta_datas"]):
                    s = 1.0 if np.asarray(im.convert("RGB"), np.float64).mean() / 255 > 0.5 else 0.0
                    c = 0.0 if data["only_strict"] else s
                    scores.append(np.float64(meta["fake_score"]))  # a numpy scalar, as mmdet-based code may give
                    strict.append(s)
                    rewards.append(c)
                    for k in GENEVAL_TAGS:
                        groups[k].append(c if k == meta["tag"] else -10.0)
                        strict_groups[k].append(s if k == meta["tag"] else -10.0)
                if mode == "inconsistent":
                    strict_groups[data["meta_datas"][0]["tag"]][0] = 1.0 - strict[0]
                answer = {"scores": scores, "rewards": rewards, "strict_rewards": strict, "group_rewards": groups, "group_strict_rewards": strict_groups}
                self._send(200, pickle.dumps(answer))

        super().__init__(Handler)


def _geneval_batch():
    """Five images (bright, dark alternating), their prompts and GenEval metadata."""
    images = torch.stack([torch.full((3, 16, 16), 0.9 if i % 2 == 0 else 0.1) for i in range(5)])
    tags = ["counting", "colors", "counting", "position", "single_object"]
    meta = [
        {"tag": t, "include": [{"class": "dog", "count": 1}], "exclude": [], "fake_score": 0.1 * (i + 1)} for i, t in enumerate(tags)
    ]
    prompts = [f"a photo of dog {i}" for i in range(5)]
    return images, prompts, meta


def _geneval(url, **options):
    return build_reward({"name": "geneval", "url": url, "timeout": 5.0, "retries": 2, "backoff": 0.01, "backoff_max": 0.05, **options}, key="nft.rewards[0]")


def test_geneval_speaks_the_reference_wire_format():
    images, prompts, meta = _geneval_batch()
    with FakeGenEvalServer() as srv:
        reward = _geneval(srv.url, batch_size=2, only_strict=False)
        s = reward(images, prompts, meta)
    # the request: a pickled dict with JPEG bytes, meta_datas (prompt filled in) and only_strict
    assert len(srv.requests) == 3  # 5 images in batches of 2
    first = srv.requests[0]["data"]
    assert set(first) == {"images", "meta_datas", "only_strict"} and first["only_strict"] is False
    assert all(isinstance(b, bytes) and b[:2] == b"\xff\xd8" for b in first["images"])  # JPEG
    assert [m["prompt"] for m in first["meta_datas"]] == prompts[:2]
    assert first["meta_datas"][0]["include"] == meta[0]["include"]
    # the reward: partial-credit "scores" (the reference's training reward)
    torch.testing.assert_close(s, torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]))
    strict = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    assert torch.equal(reward.last_results["strict_rewards"], strict) and torch.equal(reward.last_results["rewards"], strict)
    info = reward.info
    assert info["strict_accuracy"] == pytest.approx(0.6) and info["accuracy"] == pytest.approx(0.6) and info["score"] == pytest.approx(0.3)
    assert info["counting/strict_accuracy"] == 1.0 and info["counting/count"] == 2
    assert info["colors/accuracy"] == 0.0 and info["position/count"] == 1 and info["single_object/strict_accuracy"] == 1.0
    assert "two_object/count" not in info  # categories absent from the batch are not reported


def test_geneval_score_choice_and_only_strict():
    images, prompts, meta = _geneval_batch()
    with FakeGenEvalServer() as srv:
        strict = _geneval(srv.url, score="strict")(images, prompts, meta)
        assert srv.requests[-1]["data"]["only_strict"] is True
        accuracy = _geneval(srv.url, score="accuracy", only_strict=False)(images, prompts, meta)
    assert torch.equal(strict, torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])) and torch.equal(accuracy, strict)
    with pytest.raises(ConfigError, match=r"nft\.rewards\[0\]\.only_strict: score: accuracy needs only_strict: false"):
        _geneval("http://127.0.0.1:1", score="accuracy")
    with pytest.raises(ConfigError, match=r"nft\.rewards\[0\]\.score: must be one of score, strict, accuracy"):
        _geneval("http://127.0.0.1:1", score="f1")


def test_geneval_retries_a_server_error():
    images, prompts, meta = _geneval_batch()
    with FakeGenEvalServer("fail_once") as srv:
        s = _geneval(srv.url)(images, prompts, meta)
    assert len(srv.requests) == 2 and torch.isfinite(s).all()


def test_geneval_refuses_a_hostile_answer_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    images, prompts, meta = _geneval_batch()
    with FakeGenEvalServer("hostile", marker=marker) as srv:
        with pytest.raises(RewardError, match=r"refused to unpickle"):
            _geneval(srv.url)(images, prompts, meta)
    assert not marker.exists() and len(srv.requests) == 1  # refused at once, not retried


def test_geneval_malformed_answer_is_retried_then_named():
    images, prompts, meta = _geneval_batch()
    with FakeGenEvalServer("garbage") as srv:
        with pytest.raises(RewardError, match=r"failed after 3 attempts.*not a valid pickle.*proxy error"):
            _geneval(srv.url)(images, prompts, meta)
    assert len(srv.requests) == 3


def test_geneval_inconsistent_answer_is_an_error():
    images, prompts, meta = _geneval_batch()
    with FakeGenEvalServer("inconsistent") as srv:
        with pytest.raises(RewardError, match=r"group_strict_rewards\['counting'\] disagrees"):
            _geneval(srv.url)(images, prompts, meta)


def test_geneval_needs_metadata():
    images, prompts, meta = _geneval_batch()
    reward = _geneval("http://127.0.0.1:1")
    with pytest.raises(ValueError, match=r"needs per-prompt metadata"):
        reward(images, prompts, None)
    bad = [dict(m) for m in meta]
    del bad[3]["tag"]
    with pytest.raises(ValueError, match=r"entry 3 has no 'tag'"):
        reward(images, prompts, bad)
    bad[3]["tag"] = "counts"
    with pytest.raises(ValueError, match=r"unknown tag 'counts'"):
        reward(images, prompts, bad)


def test_category_accuracy_by_hand():
    acc = category_accuracy(["a", "b", "a", "a"], [1.0, 0.0, 0.0, float("nan")])
    assert acc == {"a": (0.5, 2), "b": (0.0, 1)}


# --------------------------------------------------------------------------- VLM judge


class FakeChatServer(LocalHTTPServer):
    """An OpenAI-compatible ``/v1/chat/completions``: replies ``Final Score: <k>`` where ``k`` is
    read from the prompt's text (``score=<k>``), or ``I cannot tell`` when the prompt has none.
    ``fail_first``: answer HTTP 503 to the first request."""

    def __init__(self, fail_first=False):
        self.requests: list[dict] = []
        outer = self

        class Handler(QuietHandler):
            def _send(self, code, obj):
                self.send_body(code, json.dumps(obj).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"body": body, "headers": dict(self.headers), "path": self.path})
                if fail_first and len(outer.requests) == 1:
                    return self._send(503, {"error": "loading"})
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": f"no route {self.path}"})
                text = body["messages"][0]["content"][1]["text"]
                m = re.search(r"score=([0-9.]+)", text)
                reply = f"The image matches well.\nFinal Score: {m.group(1)}" if m else "I cannot tell."
                self._send(200, {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]})

        super().__init__(Handler)


def _judge(url, **options):
    spec = {"name": "vlm_judge", "url": url + "/v1", "model": "UnifiedReward-7b-v1.5", "timeout": 5.0, "retries": 2, "backoff": 0.01, **options}
    return build_reward(spec, key="nft.rewards[1]")


def test_vlm_judge_requests_and_parsing():
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat score=4", "a dog score=2.5", "a bird"]
    with FakeChatServer() as srv:
        reward = _judge(srv.url, resize=16, api_key="k3y", concurrency=2)
        s = reward(images, prompts)
    assert torch.allclose(s[:2], torch.tensor([4 / 5, 2.5 / 5])) and torch.isnan(s[2])
    assert reward.info["num_unparsed"] == 1 and reward.info["num_nan"] == 1
    assert len(srv.requests) == 3
    by_prompt = {r["body"]["messages"][0]["content"][1]["text"]: r for r in srv.requests}
    req = by_prompt[UNIFIEDREWARD_TEMPLATE.replace("{prompt}", "a cat score=4")]
    body = req["body"]
    assert req["path"] == "/v1/chat/completions" and req["headers"]["Authorization"] == "Bearer k3y"
    assert body["model"] == "UnifiedReward-7b-v1.5" and body["temperature"] == 0
    image_part = body["messages"][0]["content"][0]
    assert image_part["type"] == "image_url"
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
        assert im.size == (16, 16) and im.mode == "RGB"


def test_vlm_judge_retries_and_options():
    images = torch.rand(1, 1, 8, 8)
    with FakeChatServer(fail_first=True) as srv:
        s = _judge(srv.url, resize=0)(images, ["x score=5"])
        assert len(srv.requests) == 2 and float(s[0]) == 1.0
        with Image.open(io.BytesIO(base64.b64decode(srv.requests[-1]["body"]["messages"][0]["content"][0]["image_url"]["url"].split(",", 1)[1]))) as im:
            assert im.size == (8, 8)  # resize 0: as it is
        custom = _judge(srv.url, pattern=r"Score:\s*(\d+)", max_score=10.0, template="Rate {prompt}")(images, ["score=7"])
        assert float(custom[0]) == pytest.approx(0.7)
    with pytest.raises(ConfigError, match=r"nft\.rewards\[1\]\.pattern: needs one group"):
        _judge("http://127.0.0.1:1", pattern="Score")
    with pytest.raises(ConfigError, match=r"nft\.rewards\[1\]\.template: must contain \{prompt\}"):
        _judge("http://127.0.0.1:1", template="Rate it")
    with pytest.raises(ValueError, match=r"needs prompts"):
        _judge("http://127.0.0.1:1")(images, None)


def test_vlm_judge_server_down_names_the_endpoint():
    with pytest.raises(RewardError, match=r"http://127\.0\.0\.1:1/v1/chat/completions failed after 2 attempts"):
        _judge("http://127.0.0.1:1", retries=1)(torch.rand(1, 3, 4, 4), ["p"])
