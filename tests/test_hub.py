"""Hub publishing with the real ``huggingface_hub`` client against a local fake Hub.

:class:`FakeHub` is an HTTP server on 127.0.0.1 (a thread, port 0) that speaks the part of
the Hub API ``HfApi.create_repo`` / ``create_branch`` / ``create_commit`` use, and the part
``from_pretrained(repo_id)`` downloads through:

* ``POST /api/repos/create`` (409 if the repo exists), ``POST /api/models/{repo}/branch/{b}``
* ``POST /api/validate-yaml`` (the card's front matter must parse)
* ``POST /api/models/{repo}/preupload/{rev}``: the LFS-or-regular decision as the Hub makes
  it (binary sample, a default ``.gitattributes`` LFS suffix, or >= 10 MB -> LFS), with the
  remote oid of a file that is already there
* ``POST /{repo}.git/info/lfs/objects/batch`` (git-lfs batch API, ``basic`` transfer), ``PUT``
  of the object (its sha256 is checked) and the ``verify`` action
* ``POST /api/models/{repo}/commit/{rev}``: the ndjson commit (``header``, base64 ``file``,
  ``lfsFile`` whose object must have been uploaded, ``deletedFile``)
* ``GET /api/models/{repo}[/revision/{rev}]``, ``GET /api/models/{repo}/tree/{rev}``,
  ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` (``X-Repo-Commit``, ``ETag``,
  ``X-Linked-Etag``/``X-Linked-Size`` for LFS files)

Every request must carry ``Authorization: Bearer <token>``; error bodies *echo the request
headers* (as a careless server might), so a test fails if the token can leak through an
exception. Xet storage is switched off (``HF_HUB_DISABLE_XET``): the client then uses the
git-lfs protocol above, which the Hub still serves.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import torch
import yaml

from conftest import ROOT, tiny_overrides
from helpers_http import LocalHTTPServer, QuietHandler
from flowlab.cli import main as flowlab_main
from flowlab.cli import train_main
from flowlab.hub import HubError, push_to_hub, read_card_data, redact_secrets, scrub_token, write_card_data

TOKEN = "hf_flowlabTestToken0123456789abcdefXYZ"
WRONG_TOKEN = "hf_someOtherToken9876543210zyxwvuTSRQ"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".png", ".jpg", ".npz", ".npy", ".zip", ".gz")


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub(LocalHTTPServer):
    """A minimal Hugging Face Hub on 127.0.0.1. See the module docstring for the routes.

    Args:
        token: the only token accepted.
        fail_status: answer every request with this HTTP status (``None``: behave).
        fail_first: with ``fail_status``, fail only the first ``fail_first`` requests.
    """

    def __init__(self, token: str = TOKEN, fail_status: int | None = None, fail_first: int | None = None):
        self.token = token
        self.fail_status, self.fail_first = fail_status, fail_first
        self.repos: dict[str, dict] = {}  # repo_id -> {"private", "branches": {name: {"sha", "files": {path: (bytes, mode)}}}}
        self.lfs: dict[str, bytes] = {}  # sha256 -> bytes
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(QuietHandler):
            def _serve(self, method):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                status, headers, payload = hub.handle(method, self.path, dict(self.headers), body)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(payload)

            def do_GET(self):
                self._serve("GET")

            def do_HEAD(self):
                self._serve("HEAD")

            def do_POST(self):
                self._serve("POST")

            def do_PUT(self):
                self._serve("PUT")

        super().__init__(Handler)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _json(status, obj, extra=None):
        return status, {"Content-Type": "application/json", **(extra or {})}, json.dumps(obj).encode()

    def _error(self, status, message, headers):
        # a careless server: the error body echoes the request headers (Authorization included)
        return self._json(status, {"error": f"{message}; request headers were {headers}"})

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        """The files of a branch: path -> bytes."""
        return {p: data for p, (data, _) in self.repos[repo_id]["branches"][branch]["files"].items()}

    def modes(self, repo_id: str, branch: str = "main") -> dict[str, str]:
        return {p: mode for p, (_, mode) in self.repos[repo_id]["branches"][branch]["files"].items()}

    def _branch(self, repo_id, rev):
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, None
        rev = unquote(rev)
        if rev in repo["branches"]:
            return rev, repo["branches"][rev]
        for name, b in repo["branches"].items():  # a commit sha of a branch head
            if b["sha"] == rev:
                return name, b
        return None, None

    # ------------------------------------------------------------------ routing
    def handle(self, method: str, raw_path: str, headers: dict, body: bytes):
        url = urlsplit(raw_path)
        path, query = url.path, parse_qs(url.query)
        with self.lock:
            self.requests.append((method, path))
            if self.fail_status is not None and (self.fail_first is None or len(self.requests) <= self.fail_first):
                return self._error(self.fail_status, "the fake hub is failing on purpose", headers)
            auth = {k.lower(): v for k, v in headers.items()}.get("authorization", "")
            if auth != f"Bearer {self.token}" and not path.startswith("/lfs-objects/"):
                return self._error(401, "Invalid credentials in Authorization header", headers)
            try:
                return self._route(method, path, query, body)
            except Exception as e:  # a bug in the fake: surface it in the test
                self.unhandled.append((method, path, repr(e)))
                return self._json(500, {"error": f"fake hub bug: {e!r}"})

    def _route(self, method, path, query, body):
        R = r"(?P<repo>[^/]+/[^/]+?)"
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        if m := re.fullmatch(rf"/api/models/{R}/preupload/(?P<rev>.+)", path):
            return self._preupload(m["repo"], m["rev"], json.loads(body))
        if m := re.fullmatch(rf"/api/models/{R}/commit/(?P<rev>.+)", path):
            return self._commit(m["repo"], m["rev"], body)
        if m := re.fullmatch(rf"/api/models/{R}/branch/(?P<branch>.+)", path):
            return self._create_branch(m["repo"], unquote(m["branch"]))
        if m := re.fullmatch(rf"/{R}\.git/info/lfs/objects/batch", path):
            return self._lfs_batch(m["repo"], json.loads(body))
        if method == "PUT" and (m := re.fullmatch(r"/lfs-objects/(?P<oid>[0-9a-f]{64})", path)):
            if hashlib.sha256(body).hexdigest() != m["oid"]:
                return self._json(400, {"error": "sha256 mismatch"})
            self.lfs[m["oid"]] = body
            return self._json(200, {})
        if method == "POST" and path == "/lfs-verify":
            req = json.loads(body)
            ok = req["oid"] in self.lfs and len(self.lfs[req["oid"]]) == req["size"]
            return self._json(200 if ok else 404, {} if ok else {"error": "object not found"})
        if method == "GET" and (m := re.fullmatch(rf"/api/models/{R}(?:/revision/(?P<rev>.+))?", path)):
            return self._model_info(m["repo"], m["rev"] or "main")
        if method == "GET" and (m := re.fullmatch(rf"/api/models/{R}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", path)):
            return self._tree(m["repo"], m["rev"], m["sub"] or "")
        if method in ("GET", "HEAD") and (m := re.fullmatch(rf"/{R}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)):
            return self._resolve(method, m["repo"], m["rev"], unquote(m["file"]))
        self.unhandled.append((method, path))
        return self._json(404, {"error": f"fake hub: no route for {method} {path}"})

    def _create_repo(self, req):
        repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else f"user/{req['name']}"
        if repo_id in self.repos:
            return self._json(409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
        sha = hashlib.sha1(repo_id.encode()).hexdigest()
        self.repos[repo_id] = {"private": req.get("visibility") == "private", "branches": {"main": {"sha": sha, "files": {}}}}
        return self._json(200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": "fake"})

    def _create_branch(self, repo_id, branch):
        if repo_id not in self.repos:
            return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        branches = self.repos[repo_id]["branches"]
        if branch in branches:
            return self._json(409, {"error": f"Reference refs/heads/{branch} already exists"})
        branches[branch] = {"sha": branches["main"]["sha"], "files": dict(branches["main"]["files"])}
        return self._json(200, {})

    def _validate_yaml(self, req):
        content = req["content"]
        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        if not m:
            return self._json(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
        try:
            meta = yaml.safe_load(m.group(1))
        except yaml.YAMLError as e:
            return self._json(400, {"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []})
        if not isinstance(meta, dict):
            return self._json(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
        return self._json(200, {"errors": [], "warnings": []})

    @staticmethod
    def _upload_mode(path: str, size: int, sample: bytes) -> str:
        if size >= 10 * 1024 * 1024 or path.lower().endswith(LFS_SUFFIXES) or b"\0" in sample:
            return "lfs"
        try:
            sample.decode("utf-8")
        except UnicodeDecodeError:
            return "lfs"
        return "regular"

    def _preupload(self, repo_id, rev, req):
        name, branch = self._branch(repo_id, rev)
        if branch is None:
            return self._json(404, {"error": "Repository or revision not found"}, {"X-Error-Code": "RevisionNotFound"})
        out = []
        for f in req["files"]:
            mode = self._upload_mode(f["path"], f["size"], base64.b64decode(f["sample"]))
            existing = branch["files"].get(f["path"])
            oid = None
            if existing is not None:
                data, emode = existing
                oid = hashlib.sha256(data).hexdigest() if emode == "lfs" else _git_blob_sha1(data)
            out.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return self._json(200, {"files": out, "commitOid": branch["sha"]})

    def _lfs_batch(self, repo_id, req):
        if repo_id not in self.repos:
            return self._json(404, {"message": "Repository not found"})
        assert req["operation"] == "upload" and "basic" in req["transfers"], req
        objects = []
        for o in req["objects"]:
            obj = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in self.lfs:  # already stored: no actions, the client skips the upload
                obj["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-objects/{o['oid']}", "header": {}},
                    "verify": {"href": f"{self.url}/lfs-verify", "header": {}},
                }
            objects.append(obj)
        return self._json(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def _commit(self, repo_id, rev, body):
        name, branch = self._branch(repo_id, rev)
        if branch is None:
            return self._json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        assert lines[0]["key"] == "header", lines[0]
        files = dict(branch["files"])
        record = {"repo": repo_id, "branch": name, "summary": lines[0]["value"]["summary"], "modes": {}}
        for item in lines[1:]:
            v = item["value"]
            if item["key"] == "file":
                assert v["encoding"] == "base64"
                files[v["path"]] = (base64.b64decode(v["content"]), "regular")
                record["modes"][v["path"]] = "regular"
            elif item["key"] == "lfsFile":
                if v["oid"] not in self.lfs:
                    return self._json(422, {"error": f"LFS object {v['oid']} for {v['path']} was never uploaded"})
                files[v["path"]] = (self.lfs[v["oid"]], "lfs")
                record["modes"][v["path"]] = "lfs"
            elif item["key"] == "deletedFile":
                files.pop(v["path"], None)
            else:
                return self._json(400, {"error": f"unsupported commit operation {item['key']}"})
        sha = hashlib.sha1((branch["sha"] + json.dumps(sorted(record["modes"]))).encode() + os.urandom(8)).hexdigest()
        branch["files"], branch["sha"] = files, sha
        record["sha"] = sha
        self.commits.append(record)
        return self._json(200, {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

    def _entry(self, path, data, mode):
        entry = {"type": "file", "path": path, "size": len(data), "oid": _git_blob_sha1(data)}
        if mode == "lfs":
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _model_info(self, repo_id, rev):
        name, branch = self._branch(repo_id, rev)
        if branch is None:
            return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        siblings = [{"rfilename": p} for p in sorted(branch["files"])]
        return self._json(
            200,
            {"_id": "fake", "id": repo_id, "modelId": repo_id, "sha": branch["sha"], "private": self.repos[repo_id]["private"],
             "tags": [], "siblings": siblings, "lastModified": "2026-01-01T00:00:00.000Z"},
        )

    def _tree(self, repo_id, rev, sub):
        name, branch = self._branch(repo_id, rev)
        if branch is None:
            return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        entries, dirs = [], set()
        for p, (data, mode) in sorted(branch["files"].items()):
            if sub and not p.startswith(sub.rstrip("/") + "/"):
                continue
            parts = p.split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in dirs and (not sub or d.startswith(sub.rstrip("/") + "/")):
                    dirs.add(d)
                    entries.append({"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0})
            entries.append(self._entry(p, data, mode))
        return self._json(200, entries)

    def _resolve(self, method, repo_id, rev, file):
        name, branch = self._branch(repo_id, rev)
        if branch is None:
            return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if file not in branch["files"]:
            return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": branch["sha"]})
        data, mode = branch["files"][file]
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": branch["sha"], "ETag": f'"{_git_blob_sha1(data)}"'}
        if mode == "lfs":
            headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))})
        headers["Content-Length"] = str(len(data))
        return 200, headers, data


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def hub_client(monkeypatch):
    """Let the real client talk to a local endpoint: online, git-lfs instead of Xet."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def _tree_digest(folder) -> dict[str, str]:
    """sha256 of every file under ``folder`` (and its mtime), to prove a push leaves the run untouched."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest() + f"@{p.stat().st_mtime_ns}"
    return out


def _hub_env(hub: FakeHub, tmp_path) -> dict:
    return {
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": TOKEN,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "PYTHONPATH": os.path.join(ROOT, "src"),
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny class-conditional run through ``train.py`` with ``hub.push=true`` against a fake Hub."""
    tmp = tmp_path_factory.mktemp("hub")
    out = str(tmp / "run")
    hub = FakeHub()
    with hub:
        args = tiny_overrides(
            out, "train.max_steps=6", "train.log_every=3", "train.checkpoint_every=3", "model.class_conditional=true",
            "hub.push=true", "hub.repo_id=alice/flowlab-digits",
        )
        proc = subprocess.run(
            [sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, capture_output=True, text=True,
            env={**os.environ, **_hub_env(hub, tmp)}, timeout=300,
        )
    return out, hub, proc


EXPECTED_PIPELINE_FILES = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "velocity_model/config.json",
    "velocity_model/diffusion_pytorch_model.safetensors",
}
EXPECTED_FILES = EXPECTED_PIPELINE_FILES | {"README.md", "samples/grid.png", "config.yaml", "metrics.jsonl"}


def _front_matter(card: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert m, card[:300]
    return yaml.safe_load(m.group(1))


def _assert_no_token(*texts):
    for t in texts:
        if isinstance(t, bytes):
            assert TOKEN.encode() not in t
        else:
            assert TOKEN not in t, t[-2000:]


# --------------------------------------------------------------------------- train.py with hub.push=true


def test_train_with_hub_push_uploads_exactly_the_run(trained):
    out, hub, proc = trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not hub.unhandled, hub.unhandled
    assert "alice/flowlab-digits" in hub.repos and not hub.repos["alice/flowlab-digits"]["private"]
    files = hub.files("alice/flowlab-digits")
    assert set(files) == EXPECTED_FILES  # nothing missing, no checkpoints/ or logs/
    assert len(hub.commits) == 1
    # weights arrive byte for byte, as git-lfs objects; small JSON files as regular blobs
    pipe_dir = Path(out) / "pipeline"
    for rel in EXPECTED_PIPELINE_FILES:
        assert files[rel] == (pipe_dir / rel).read_bytes(), rel
    modes = hub.modes("alice/flowlab-digits")
    assert modes["velocity_model/diffusion_pytorch_model.safetensors"] == "lfs" and modes["samples/grid.png"] == "lfs"
    assert modes["model_index.json"] == "regular" and modes["README.md"] == "regular"
    last_grid = sorted((Path(out) / "samples").glob("step_*.png"))[-1]
    assert files["samples/grid.png"] == last_grid.read_bytes()
    assert files["metrics.jsonl"] == (Path(out) / "metrics.jsonl").read_bytes()
    assert yaml.safe_load(files["config.yaml"])["hub"]["repo_id"] == "alice/flowlab-digits"
    # the card
    card = files["README.md"].decode()
    meta = _front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "flowlab"
    # a class-conditional model: tagged as such, and no "unconditional" task (the Hub has no class-conditional one)
    assert {"flowlab", "flow-matching", "image-generation", "class-conditional-image-generation"} <= set(meta["tags"])
    assert "pipeline_tag" not in meta
    assert "| metric | value | step |" in card and "| `loss` |" in card
    final_loss = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()][-1]["loss"]
    assert f"| `loss` | {final_loss:.4g} | 6 |" in card
    assert "![samples from the final model](samples/grid.png)" in card
    assert 'FlowPipeline.from_pretrained("alice/flowlab-digits")' in card
    assert 'pipe(class_labels=list(range(10)), output_type="pil").images' in card  # one sample per class
    assert "```yaml\nrecipe: flow_matching" in card
    # the token is nowhere: files, logs, output
    for data in files.values():
        _assert_no_token(data)
    _assert_no_token(proc.stdout, proc.stderr)
    for log in (Path(out)).rglob("*"):
        if log.is_file() and log.suffix in (".json", ".jsonl", ".yaml", ".txt", ".log"):
            _assert_no_token(log.read_bytes())
    assert "pushed 8 files to alice/flowlab-digits" in proc.stdout


@pytest.fixture
def serve_pushed(trained, hub_client, monkeypatch):
    """The repo received by the ``trained`` push, served again through the fake Hub's download routes,
    with huggingface_hub's default endpoint pointed at it."""
    from huggingface_hub import constants, hf_api

    out, pushed, proc = trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    with FakeHub() as hub:
        hub.repos, hub.lfs = pushed.repos, pushed.lfs
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(hf_api.api, "endpoint", hub.url)  # the module-level HfApi behind model_info()
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield out, hub


def _same_samples(remote, local):
    for pipe in (remote, local):
        pipe.set_progress_bar_config(disable=True)
    a = remote(class_labels=[0, 1, 2], generator=torch.Generator().manual_seed(0), output_type="pt").images
    b = local(class_labels=[0, 1, 2], generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(a, b)


def test_pushed_repo_downloads_and_samples_identically(serve_pushed, tmp_path, monkeypatch):
    """The card's usage snippet, run as is against the fake Hub's download routes (from_pretrained(repo id) ->
    resolve), loads a FlowPipeline that gives bit-identical samples to the local run's."""
    from huggingface_hub import constants

    from flowlab.pipelines import FlowPipeline

    out, hub = serve_pushed
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    card = hub.files("alice/flowlab-digits")["README.md"].decode()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert snippet.count("\n") == 3  # two lines to load, one to sample
    namespace: dict = {}
    exec(snippet, namespace)
    assert not hub.unhandled, hub.unhandled
    assert any("/resolve/" in p and p.endswith("diffusion_pytorch_model.safetensors") for _, p in hub.requests)
    assert isinstance(namespace["pipe"], FlowPipeline) and len(namespace["images"]) == 10
    _same_samples(namespace["pipe"], FlowPipeline.from_pretrained(os.path.join(out, "pipeline")))


def test_flowpipeline_from_pretrained_repo_id(serve_pushed, tmp_path):
    from flowlab.pipelines import FlowPipeline

    out, hub = serve_pushed
    remote = FlowPipeline.from_pretrained("alice/flowlab-digits", cache_dir=str(tmp_path / "cache"))
    _same_samples(remote, FlowPipeline.from_pretrained(os.path.join(out, "pipeline")))


# --------------------------------------------------------------------------- push_to_hub / flowlab push


def test_push_api_private_branch_and_untouched_run(trained, hub_client):
    out, _, _ = trained
    before = _tree_digest(out)
    with FakeHub() as hub:
        res = push_to_hub(out, "bob/digits", private=True, revision="v1", token=TOKEN, endpoint=hub.url, commit_message="first")
        assert not hub.unhandled, hub.unhandled
        assert hub.repos["bob/digits"]["private"]
        assert set(hub.files("bob/digits", "v1")) == EXPECTED_FILES and hub.files("bob/digits", "main") == {}
        assert hub.commits[-1]["summary"] == "first" and hub.commits[-1]["branch"] == "v1"
        assert res.commit_oid == hub.repos["bob/digits"]["branches"]["v1"]["sha"] and res.attempts == 1
        assert sorted(res.paths_in_repo) == sorted(EXPECTED_FILES)
        # pushing the same run again: the repo exists (409 handled), unchanged files are not re-sent
        lfs_puts = sum(1 for m, p in hub.requests if m == "PUT")
        push_to_hub(out, "bob/digits", revision="v1", token=TOKEN, endpoint=hub.url, commit_message="again")
        assert sum(1 for m, p in hub.requests if m == "PUT") == lfs_puts
    assert _tree_digest(out) == before


def test_token_from_the_cached_login(trained, hub_client, monkeypatch, tmp_path):
    """No token argument, no HF_TOKEN: the token `hf auth login` cached is used."""
    from huggingface_hub import constants

    out, _, _ = trained
    (tmp_path / "token").write_text(TOKEN)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    with FakeHub() as hub:
        res = push_to_hub(out, "gus/digits", endpoint=hub.url)
        assert set(hub.files("gus/digits")) == EXPECTED_FILES and res.attempts == 1
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(HubError, match="no Hugging Face token found.*HF_TOKEN.*hf auth login"):
        push_to_hub(out, "gus/digits", endpoint="http://127.0.0.1:9")


def test_dry_run_sends_nothing_and_previews_the_card(trained, hub_client, tmp_path, capsys):
    out, _, _ = trained
    before = _tree_digest(out)
    with FakeHub() as hub:
        res = push_to_hub(out, "carol/digits", dry_run=True, endpoint=hub.url, preview_dir=tmp_path / "preview")
        assert hub.requests == []
        assert res.dry_run and set(res.paths_in_repo) == EXPECTED_FILES
        sources = {f.path_in_repo: f.source for f in res.files}
        assert sources["README.md"] is None and sources["velocity_model/diffusion_pytorch_model.safetensors"].startswith(out)
        card = Path(res.card_path).read_text()
        assert Path(res.card_path).parent == tmp_path / "preview" and "| metric | value | step |" in card
        # the CLI form
        rc = flowlab_main(["push", out, "--repo-id", "carol/digits", "--dry-run"])
        assert rc == 0 and hub.requests == []
    printed = capsys.readouterr().out
    assert "would push 8 files to carol/digits" in printed and "velocity_model/diffusion_pytorch_model.safetensors" in printed
    assert "checkpoints" not in printed and "logs/" not in printed
    assert _tree_digest(out) == before


@pytest.mark.parametrize("status", [401, 500])
def test_errors_never_contain_the_token(trained, hub_client, status, caplog, capsys):
    out, _, _ = trained
    before = _tree_digest(out)
    hub = FakeHub(token=WRONG_TOKEN) if status == 401 else FakeHub(fail_status=500)
    with hub, caplog.at_level(logging.DEBUG):
        with pytest.raises(HubError) as e:
            push_to_hub(out, "dave/digits", token=TOKEN, endpoint=hub.url, max_retries=1, retry_wait=0.01)
        # the server did see the token and echoed it back in its error body
        assert hub.requests
    msg = str(e.value)
    assert "dave/digits" in msg and str(status) in msg and "\n" not in msg
    assert ("authentication failed" in msg) if status == 401 else ("after 2 attempts" in msg)
    assert e.value.__cause__ is None and e.value.__suppress_context__
    tb = "".join(traceback.format_exception(e.value))
    captured = capsys.readouterr()
    _assert_no_token(msg, repr(e.value), tb, caplog.text, captured.out, captured.err)
    assert _tree_digest(out) == before
    # through the CLI (token from HF_TOKEN, endpoint from HF_ENDPOINT's constant): one line, exit 2
    from huggingface_hub import constants

    with FakeHub(token=WRONG_TOKEN) as hub2, pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", TOKEN)
        mp.setattr(constants, "ENDPOINT", hub2.url)
        rc = flowlab_main(["push", out, "--repo-id", "dave/digits", "--max-retries", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("flowlab: error: ") and err.count("\n") == 1, err
    _assert_no_token(err)


def test_transient_failures_are_retried_then_fail_clearly(trained, hub_client, caplog):
    out, _, _ = trained
    before = _tree_digest(out)
    with FakeHub(fail_status=503) as hub, caplog.at_level(logging.WARNING, logger="flowlab.hub"):
        with pytest.raises(HubError) as e:
            push_to_hub(out, "erin/digits", token=TOKEN, endpoint=hub.url, max_retries=3, retry_wait=0.01)
        assert hub.requests == [("POST", "/api/repos/create")] * 4  # 1 try + 3 retries
    msg = str(e.value)
    assert "erin/digits" in msg and "HTTP 503" in msg and "after 4 attempts" in msg and "unchanged" in msg
    assert "flowlab push" in msg and "\n" not in msg
    assert caplog.text.count("retry") == 3
    assert _tree_digest(out) == before
    # a Hub that recovers: the push succeeds on a later attempt
    with FakeHub(fail_status=503, fail_first=2) as hub:
        res = push_to_hub(out, "erin/digits", token=TOKEN, endpoint=hub.url, max_retries=3, retry_wait=0.01)
        assert res.attempts == 3 and set(hub.files("erin/digits")) == EXPECTED_FILES


def test_connection_errors_are_retried(trained, hub_client):
    import socket

    out, _, _ = trained
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(HubError) as e:
        push_to_hub(out, "hal/digits", token=TOKEN, endpoint=dead, max_retries=2, retry_wait=0.01)
    assert "after 3 attempts" in str(e.value) and "ConnectError" in str(e.value) and "hal/digits" in str(e.value)


def test_failed_push_after_training_keeps_the_run_and_says_how_to_retry(trained, hub_client, monkeypatch, capsys):
    from flowlab.cli import EXIT_PUSH_FAILED, _push_after_training
    from flowlab.recipes import load_config

    out, _, _ = trained
    before = _tree_digest(out)
    config = load_config(os.path.join(out, "config.yaml"), ["hub.repo_id=frank/digits", "hub.private=true"])
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub(token=WRONG_TOKEN) as hub:
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        assert _push_after_training(config) == EXIT_PUSH_FAILED
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("flowlab: error:")]
    assert len(line) == 1 and "run is saved in" in line[0]
    assert f"flowlab push {out} --repo-id frank/digits --private" in line[0]
    _assert_no_token(err)
    assert _tree_digest(out) == before


# --------------------------------------------------------------------------- config and CLI errors


def test_hub_token_in_config_is_refused(tmp_path, capsys):
    rc = train_main(tiny_overrides(str(tmp_path / "run"), f"hub.token={TOKEN}"))
    err = capsys.readouterr().err
    assert rc == 2 and "'hub.token'" in err and "HF_TOKEN" in err and "auth login" in err
    _assert_no_token(err)
    assert not (tmp_path / "run").exists()


def test_hub_push_without_repo_id_fails_at_start_up(tmp_path, capsys):
    rc = train_main(tiny_overrides(str(tmp_path / "run"), "hub.push=true"))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("flowlab: error: hub.repo_id:") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    rc = train_main(tiny_overrides(str(tmp_path / "run"), "hub.push=true", "hub.repo_id=not a repo!"))
    assert rc == 2 and "hub.repo_id" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,fragment",
    [
        ([], "a command is required"),
        (["deploy"], "unknown command 'deploy'"),
        (["push"], "output_dir"),
        (["push", "/does/not/exist", "--repo-id", "a/b"], "does not exist"),
        (["push", "{run}", "--repo-id", "bad repo id"], "not a valid Hub repo id"),
        (["push", "{bare}"], "--repo-id is required"),
        (["push", "{run}", "--repo-id", "a/b", "--bogus"], "unrecognized arguments: --bogus"),
        (["push", "{bare}", "--repo-id", "a/b"], "has no card.json"),
        (["push", "{bare_card}", "--repo-id", "a/b"], "no pipeline/ folder"),
    ],
)
def test_cli_errors_are_one_line_exit_2(argv, fragment, trained, tmp_path, capsys):
    out, _, _ = trained
    bare = tmp_path / "bare"  # a run folder whose training never finished
    bare.mkdir()
    (bare / "config.yaml").write_text("recipe: flow_matching\n")
    bare_card = tmp_path / "bare_card"  # card data written, but the artefact folder is gone
    bare_card.mkdir()
    (bare_card / "config.yaml").write_text("recipe: flow_matching\n")
    write_card_data(bare_card, {"usage": "x"}, recipe="flow_matching", artifact="pipeline")
    argv = [a.replace("{run}", out).replace("{bare}", str(bare)).replace("{bare_card}", str(bare_card)) for a in argv]
    rc = flowlab_main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("flowlab: error: ") and err.count("\n") == 1, err
    assert fragment in err


def test_flowlab_train_is_train_py(tmp_path, capsys):
    rc = flowlab_main(["train", "train.max_stpes=5"])
    err = capsys.readouterr().err
    assert rc == 2 and "did you mean 'train.max_steps'" in err
    rc = flowlab_main(["train", "--bogus"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("flowlab: error: unrecognized arguments: --bogus") and err.count("\n") == 1
    assert flowlab_main(["train", "--help"]) == 0 and "usage: flowlab train" in capsys.readouterr().out


def test_redaction_helpers():
    cfg = {"wandb": {"api_key": "abc123", "project": "p"}, "tokenizer": "t5-small", "hub_token": "x",
           "url": "https://user:secretpw@example.com/x", "note": f"token {TOKEN}", "num_tokens": 5}
    red = redact_secrets(cfg)
    assert red["wandb"] == {"api_key": "<redacted>", "project": "p"} and red["tokenizer"] == "t5-small"
    assert red["hub_token"] == "<redacted>" and "secretpw" not in red["url"] and TOKEN not in red["note"]
    assert red["num_tokens"] == 5
    assert scrub_token("Authorization: Bearer abc.def", None) == "Authorization: Bearer <redacted>"
    assert scrub_token("x my-custom-token-value y", "my-custom-token-value") == "x <redacted> y"


# --------------------------------------------------------------------------- other artefact layouts (dry runs)


def _fake_run(root: Path, recipe: str, artefact: str, files: dict[str, bytes], extra_config: str = "", card_data: dict | None = None) -> Path:
    """A finished run folder of ``recipe`` whose artefact folder holds ``files``; with ``card_data``
    (a recipe's ``card_data(REPO_ID)``), its ``card.json`` as the trainer writes it."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(f"recipe: {recipe}\ndata:\n  name: digits\n{extra_config}")
    (root / "metrics.jsonl").write_text('{"step": 10, "loss": 0.5, "eval/accuracy": 0.93}\n{"step": 20, "loss": 0.25}\n')
    for rel, data in files.items():
        (root / artefact / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / artefact / rel).write_bytes(data)
    for junk in ("checkpoints/checkpoint-20/model.safetensors", "logs/events.out", "samples/step_0000010.png", "samples/step_0000020.png"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_bytes(junk.encode())
    if card_data is not None:
        write_card_data(root, card_data, recipe=recipe, artifact=artefact)
    return root


def _recipe_card_data(config: str, *overrides: str) -> dict:
    from flowlab.hub import REPO_ID
    from flowlab.recipes import get_recipe, load_config

    return get_recipe(load_config(f"configs/{config}.yaml", list(overrides))).card_data(REPO_ID)


def test_lora_artefact_card_from_the_recipe(tmp_path):
    """An SD3 RL run whose artefact is a diffusers LoRA folder: the card is what the recipe's card_data says."""
    card_data = _recipe_card_data("flowgrpo_sd35_pickscore")
    run = _fake_run(tmp_path / "run", "flowgrpo", "pipeline", {"pytorch_lora_weights.safetensors": b"\x00weights", "README.md": b"peft card"},
                    card_data={**card_data, "license": "other"})
    before = _tree_digest(run)
    res = push_to_hub(run, "gina/sd35-grpo", dry_run=True, preview_dir=tmp_path / "preview")
    assert set(res.paths_in_repo) == {"README.md", "pytorch_lora_weights.safetensors", "samples/grid.png", "config.yaml", "metrics.jsonl"}
    grid = next(f for f in res.files if f.path_in_repo == "samples/grid.png")
    assert grid.source.endswith("step_0000020.png")  # the last grid
    card = Path(res.card_path).read_text()
    meta = _front_matter(card)
    assert meta["base_model"] == "stabilityai/stable-diffusion-3.5-medium" and meta["license"] == "other"
    assert meta["pipeline_tag"] == "text-to-image" and meta["library_name"] == "flowlab"
    assert meta["tags"][:2] == ["flowlab", "flowgrpo"] and {"lora", "reinforcement-learning"} <= set(meta["tags"])
    assert meta["tags"].count("flowgrpo") == 1
    assert 'pipe.load_lora_weights("gina/sd35-grpo")' in card and "{repo_id}" not in card
    assert 'StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium")' in card
    assert "| `eval/accuracy` | 0.93 | 10 |" in card and "| `loss` | 0.25 | 20 |" in card
    assert card.index("eval/accuracy") < card.index("`loss`")
    assert _tree_digest(run) == before


def test_noprop_and_transformers_artefacts(tmp_path):
    run = _fake_run(tmp_path / "noprop", "noprop", "classifier",
                    {"config.json": b'{"_class_name": "NoPropClassifier"}', "diffusion_pytorch_model.safetensors": b"\x00w"},
                    card_data=_recipe_card_data("noprop_dt_digits"))
    res = push_to_hub(run, "hana/noprop-digits", dry_run=True, preview_dir=tmp_path / "p1")
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= set(res.paths_in_repo)
    assert "card.json" not in res.paths_in_repo
    card = Path(res.card_path).read_text()
    assert _front_matter(card)["pipeline_tag"] == "image-classification"
    assert 'NoPropClassifier.from_pretrained("hana/noprop-digits")' in card

    run = _fake_run(tmp_path / "jepa", "reversal_jepa", "model", {"config.json": b'{"architectures": ["X"]}', "model.safetensors": b"\x00w"},
                    extra_config="wandb:\n  api_key: abc123secret\n  project: p\n", card_data=_recipe_card_data("reversal_jepa"))
    res = push_to_hub(run, "ivan/jepa", dry_run=True, preview_dir=tmp_path / "p2")
    card = Path(res.card_path).read_text()
    assert 'JEPAConceptModel.from_pretrained("ivan/jepa")' in card and "transformers" in _front_matter(card)["tags"]
    # secret-looking config values are redacted in the card and in the uploaded config.yaml
    assert "abc123secret" not in card and "api_key: <redacted>" in card
    cfg = next(f for f in res.files if f.path_in_repo == "config.yaml")
    assert cfg.source is None and b"abc123secret" not in cfg.content and b"project: p" in cfg.content
    assert b"abc123secret" in (run / "config.yaml").read_bytes()  # the local run is untouched

    # pickle-based weights are never published
    (run / "model" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(HubError, match="pytorch_model.bin.*safetensors"):
        push_to_hub(run, "ivan/jepa", dry_run=True)


# --------------------------------------------------------------------------- the card and its data


def test_card_is_a_model_card_whose_metadata_parses_back(trained, tmp_path):
    """The card is built with huggingface_hub's ModelCard: ModelCard.load reads the metadata back as ModelCardData."""
    from huggingface_hub import ModelCard, ModelCardData

    out, _, _ = trained
    res = push_to_hub(out, "kim/digits", dry_run=True, preview_dir=tmp_path / "preview", license="mit")
    card = ModelCard.load(res.card_path)
    assert isinstance(card.data, ModelCardData)
    assert card.data.license == "mit" and card.data.library_name == "flowlab" and card.data.pipeline_tag is None
    assert card.data.tags[:2] == ["flowlab", "flow-matching"] and "class-conditional-image-generation" in card.data.tags
    assert card.data.base_model is None and card.data.datasets is None
    assert card.text.lstrip().startswith("# digits") and 'FlowPipeline.from_pretrained("kim/digits")' in card.text
    assert str(card) == Path(res.card_path).read_text()  # what the push uploads is the ModelCard's text


def test_trainer_writes_the_recipe_card_data(trained):
    """card.json holds the flow-matching recipe's card data, with the repo id left as a placeholder."""
    from flowlab.hub import REPO_ID

    out, _, _ = trained
    card = read_card_data(out)
    assert card.recipe == "flow_matching" and card.artifact == "pipeline" and card.library_name == "flowlab"
    assert f'FlowPipeline.from_pretrained("{REPO_ID}")' in card.usage and "class_labels=list(range(10))" in card.usage
    assert card.pipeline_tag is None and "class-conditional-image-generation" in card.tags
    assert json.loads((Path(out) / "card.json").read_text())["format"] == 1


def test_unconditional_and_vector_pipeline_card_data():
    from flowlab.hub import flow_pipeline_card_data

    uncond = flow_pipeline_card_data("u/m")
    assert uncond["pipeline_tag"] == "unconditional-image-generation" and "class-conditional-image-generation" not in uncond["tags"]
    assert 'pipe(batch_size=16, output_type="pil")' in uncond["usage"]
    cond = flow_pipeline_card_data("u/m", class_labels="[3] * 16")
    assert cond["pipeline_tag"] is None and "class-conditional-image-generation" in cond["tags"] and "class_labels=[3] * 16" in cond["usage"]
    vec = flow_pipeline_card_data("u/m", images=False)
    assert vec["pipeline_tag"] is None and "image-generation" not in vec["tags"] and 'output_type="pt"' in vec["usage"]
    for data in (uncond, cond, vec):  # each snippet is valid Python
        compile(data["usage"], "<usage>", "exec")


@pytest.mark.parametrize("config", ["nft_digits", "flowgrpo_sd35_pickscore", "noprop_dt_digits", "reversal_jepa", "reversal_ar"])
def test_every_builtin_recipe_gives_complete_card_data(config, tmp_path):
    """Usage snippet, tags and pipeline tag from each recipe (flow matching: see test_trainer_writes_the_recipe_card_data)."""
    from flowlab.hub import REPO_ID, CardData

    data = _recipe_card_data(config)
    assert REPO_ID in data["usage"] and data["tags"] and "pipeline_tag" in data
    compile(data["usage"], "<usage>", "exec")
    assert set(data) <= set(CardData.RECIPE_KEYS)


def test_card_data_errors_name_the_key(tmp_path):
    with pytest.raises(HubError, match="unknown key 'usage_snippet'"):
        write_card_data(tmp_path, {"usage_snippet": "x"}, recipe="r", artifact="a")
    with pytest.raises(HubError, match="'tags' must be a list"):
        write_card_data(tmp_path, {"tags": [1]}, recipe="r", artifact="a")
    with pytest.raises(HubError, match="'artifact' must be a folder name"):
        write_card_data(tmp_path, {}, recipe="r", artifact="../elsewhere")
    assert not (tmp_path / "card.json").exists()
    (tmp_path / "card.json").write_text('{"recipe": "r", "artifact": "a", "colour": "red"}')
    with pytest.raises(HubError, match=r"card.json: unknown card data key 'colour'"):
        read_card_data(tmp_path)


def test_old_run_without_card_data(tmp_path):
    """A run trained before flowlab wrote card.json: a clear error, or the missing fields passed to push_to_hub."""
    run = _fake_run(tmp_path / "old", "noprop", "classifier", {"diffusion_pytorch_model.safetensors": b"\x00w"})
    before = _tree_digest(run)
    with pytest.raises(HubError, match="has no card.json.*did the run finish.*write_card_data.*card_data="):
        push_to_hub(run, "olga/old", dry_run=True)
    with pytest.raises(HubError, match="card data has no 'artifact'"):
        push_to_hub(run, "olga/old", dry_run=True, card_data={"recipe": "noprop"})
    res = push_to_hub(run, "olga/old", dry_run=True, preview_dir=tmp_path / "p",
                      card_data={"recipe": "noprop", "artifact": "classifier", "usage": 'load("{repo_id}")', "pipeline_tag": "image-classification"})
    card = Path(res.card_path).read_text()
    assert 'load("olga/old")' in card and _front_matter(card)["pipeline_tag"] == "image-classification"
    assert _tree_digest(run) == before  # nothing written to the run folder


def test_push_never_imports_a_recipe(trained, tmp_path):
    """Publishing reads card.json: no recipe module, no engine module, no registry is imported."""
    out, _, _ = trained
    script = (
        "import sys\n"
        "from flowlab.hub import push_to_hub\n"
        f"res = push_to_hub({out!r}, 'lee/digits', dry_run=True, preview_dir={str(tmp_path / 'p')!r})\n"
        "assert len(res.files) == 8, res.paths_in_repo\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('flowlab'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = proc.stdout.split()
    assert "flowlab.hub.push" in loaded
    higher = ("flowlab.train", "flowlab.nft", "flowlab.noprop", "flowlab.jepa", "flowlab.wgf", "flowlab.pipelines", "flowlab.models",
              "flowlab.rewards", "flowlab.cli")
    assert not [m for m in loaded if m.startswith(higher)], loaded
