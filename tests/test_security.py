"""Security: no code path unpickles untrusted data, every weight file is safetensors.

- a static scan of ``src/``, ``eval/`` and ``train.py``: every ``torch.load`` passes
  ``weights_only=True``; no ``pickle``/``dill``/``marshal``, ``yaml.load`` (unsafe loader),
  ``np.load(allow_pickle=True)``, ``trust_remote_code=True``, ``eval``/``exec``;
- every file written by a training run and by each model type's final ``save_final`` /
  ``save_pretrained`` is inspected by its bytes: weights are safetensors, the artefacts hold no
  pickle at all, and the only pickles in a checkpoint are accelerate's state files, each
  loadable with ``torch.load(weights_only=True)``;
- a checkpoint whose pickle would run code (even with a matching manifest) is refused by name
  before it is unpickled, and resume falls back to the previous checkpoint.
"""
import ast
import hashlib
import json
import os
import shutil
import zipfile

import pytest
import torch

from conftest import ROOT, tiny_overrides
from flowlab.fileio import PICKLE_SUFFIXES

SOURCES = [os.path.join(ROOT, "train.py")] + [
    os.path.join(d, f)
    for top in ("src", "eval")
    for d, _, fs in os.walk(os.path.join(ROOT, top))
    for f in fs
    if f.endswith(".py")
]


# --------------------------------------------------------------------------- static scan


def _call_name(node: ast.Call) -> str:
    f = node.func
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def _kw(node: ast.Call, name: str):
    for k in node.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


# The one module allowed to import pickle: the FlowGRPO reward servers (GenEval) answer in pickle, and
# this module reads those answers with an Unpickler whose find_class admits only plain data and numpy
# arrays (no callable can be named, so nothing runs); tests/test_rewards_servers.py checks that a
# payload calling os.system is refused before it runs.
# The checkpoint module may too: torch.distributed.checkpoint (sharded FSDP checkpoints) reads its
# ``.metadata`` index with a plain pickle.load, so verify_checkpoint first reads each index with an
# Unpickler whose find_class admits only DCP's metadata classes, torch dtypes/sizes and paths
# (tests/test_fsdp.py::test_dcp_index_with_a_foreign_global_is_refused checks os.system is refused).
PICKLE_ALLOWED = {
    os.path.join("src", "flowlab", "rewards", "restricted_pickle.py"),
    os.path.join("src", "flowlab", "train", "checkpoint.py"),
}


def _problems(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    rel = os.path.relpath(path, ROOT)
    out = []
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for n in names:
                if n.split(".")[0] in ("pickle", "cPickle", "dill", "marshal", "shelve", "joblib"):
                    if n == "pickle" and rel in PICKLE_ALLOWED:
                        continue
                    out.append(f"{where}: imports {n}")
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        if name.endswith("torch.load"):
            if not _is_const(_kw(node, "weights_only"), True):
                out.append(f"{where}: torch.load without weights_only=True")
        if name in ("eval", "exec", "compile") and isinstance(node.func, ast.Name):
            out.append(f"{where}: {name}()")
        if name.endswith("yaml.load") or name.endswith("yaml.unsafe_load") or name.endswith("yaml.full_load"):
            out.append(f"{where}: {name} (use yaml.safe_load)")
        if name.endswith("np.load") or name.endswith("numpy.load"):
            if not _is_const(_kw(node, "allow_pickle"), False) and _kw(node, "allow_pickle") is not None:
                out.append(f"{where}: np.load(allow_pickle=...)")
        trc = _kw(node, "trust_remote_code")
        if trc is not None and not _is_const(trc, False):
            out.append(f"{where}: trust_remote_code is not literally False")
        if _is_const(_kw(node, "safe_serialization"), False) or _is_const(_kw(node, "use_safetensors"), False):
            out.append(f"{where}: safetensors switched off")
    return out


def test_there_are_sources_to_scan():
    assert len(SOURCES) > 20 and any(p.endswith("trainer.py") for p in SOURCES)


def test_no_unsafe_deserialisation_in_the_code():
    problems = [p for path in SOURCES for p in _problems(path)]
    assert not problems, "\n".join(problems)


def test_the_scan_catches_what_it_should(tmp_path):
    """The scanner itself: each forbidden pattern is reported (so a pass above means something)."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nimport torch, yaml, numpy as np\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\n"
        "yaml.load(open('c'))\nnp.load('a.npy', allow_pickle=True)\n"
        "AutoModel.from_pretrained('x', trust_remote_code=True)\neval('1')\n"
        "m.save_pretrained('d', safe_serialization=False)\n"
    )
    got = _problems(str(bad))
    assert len(got) == 8, got
    good = tmp_path / "good.py"
    good.write_text("import torch, yaml\ntorch.load('x', weights_only=True)\nyaml.safe_load('a: 1')\nmodel.eval()\n")
    assert _problems(str(good)) == []


# --------------------------------------------------------------------------- what is written

PICKLE_PROTOCOL_2_PLUS = b"\x80"


def _kind(path: str) -> str:
    """``safetensors``, ``torch-zip`` (a torch.save file: a zip holding a pickle), ``pickle`` or ``other``, by content."""
    with open(path, "rb") as f:
        head = f.read(16)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.endswith(".pkl") for n in z.namelist()):
                return "torch-zip"
        return "other"
    if head[:1] == PICKLE_PROTOCOL_2_PLUS:
        return "pickle"
    if len(head) >= 8:
        n = int.from_bytes(head[:8], "little")
        if 0 < n < 100_000_000 and os.path.getsize(path) >= 8 + n:
            with open(path, "rb") as f:
                f.seek(8)
                try:
                    json.loads(f.read(n))
                    return "safetensors"
                except (ValueError, UnicodeDecodeError):
                    pass
    return "other"


def _files(root):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def _assert_artefact_is_pickle_free(directory):
    files = _files(directory)
    assert files, f"{directory} is empty"
    weights = [f for f in files if _kind(f) == "safetensors"]
    assert weights, f"no safetensors weights in {directory}: {files}"
    for f in files:
        kind = _kind(f)
        assert kind not in ("pickle", "torch-zip"), f"{f} is a pickle"
        assert not f.endswith(PICKLE_SUFFIXES), f
        if f.endswith(".safetensors"):
            assert kind == "safetensors", f
        if kind == "safetensors":
            assert f.endswith(".safetensors"), f


# accelerate's save_state: safetensors model(s), plus torch pickles for optimizer, custom states, RNG
CHECKPOINT_PICKLES = ("optimizer.bin", "optimizer_", "scheduler", "custom_checkpoint_", "random_states_", "scaler.pt", "sampler")


def test_training_run_writes_only_safetensors_weights(tmp_path):
    from flowlab.cli import train_main
    from flowlab.train.checkpoint import check_weights_only, list_checkpoints

    out = tmp_path / "run"
    assert train_main(tiny_overrides(str(out), "train.max_steps=4", "train.checkpoint_every=2", "train.log_every=2")) == 0
    _assert_artefact_is_pickle_free(out / "pipeline")
    ckpts = list_checkpoints(out / "checkpoints")
    assert ckpts
    for _, ckpt in ckpts:
        kinds = {os.path.relpath(f, ckpt): _kind(f) for f in _files(ckpt)}
        assert kinds["model.safetensors"] == "safetensors"
        for rel, kind in kinds.items():
            if kind in ("pickle", "torch-zip"):
                assert rel.startswith(CHECKPOINT_PICKLES), f"unexpected pickle {rel} in {ckpt}"
                check_weights_only(os.path.join(ckpt, rel))  # plain tensors and containers only
    for f in _files(out):  # nothing else anywhere in the run folder is a pickle
        if "checkpoints" not in f:
            assert _kind(f) not in ("pickle", "torch-zip"), f


MODEL_CASES = {
    "flow_matching-mlp": (None, ["model.type=mlp", "model.hidden_dim=16", "model.depth=1", "model.time_embed_dim=8"]),
    "flow_matching-conservative": (None, ["model.type=conservative", "model.hidden_dim=16", "model.depth=1", "model.time_embed_dim=8"]),
    "flow_matching-unet": (None, ["model.type=unet", "model.block_out_channels=[8,8]", "model.norm_num_groups=4", "model.layers_per_block=1",
                                  "model.attention_head_dim=4", "model.class_conditional=true"]),
    "flow_matching-dit": (None, ["model.type=dit", "model.num_layers=1", "model.num_attention_heads=2", "model.attention_head_dim=4"]),
    "noprop": ("configs/noprop_dt_digits.yaml", ["noprop.num_blocks=2", "noprop.hidden_dim=8", "noprop.channels=[4,4,4]"]),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_final_artefact_of_each_model_type_is_safetensors(case, tmp_path):
    """What each recipe's ``save_final`` writes (``save_pretrained`` of a FlowPipeline or a classifier)."""
    from flowlab.recipes import load_config
    from flowlab.recipes import get_recipe

    config, overrides = MODEL_CASES[case]
    cfg = load_config(os.path.join(ROOT, config) if config else None, [f"output_dir={tmp_path}", "data.name=digits", *overrides])
    recipe = get_recipe(cfg)
    model = recipe.build_model(recipe.build_dataset())
    recipe.save_final(model, str(tmp_path / "artefact"))
    _assert_artefact_is_pickle_free(tmp_path / "artefact")


# --------------------------------------------------------------------------- a malicious checkpoint


class _Payload:
    """Unpickling this object creates a folder: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _resign(ckpt):
    """Rewrite the manifest so that every file verifies (an attacker can do this too)."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for rel in manifest["files"]:
        data = (ckpt / rel).read_bytes()
        manifest["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("victim", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"])
def test_checkpoint_with_code_in_a_pickle_is_refused_before_unpickling(tmp_path, caplog, capsys, victim):
    from flowlab.cli import train_main
    from flowlab.train.checkpoint import CheckpointError, verify_checkpoint

    out = tmp_path / "run"
    args = tiny_overrides(str(out), "train.max_steps=4", "train.checkpoint_every=2", "train.log_every=2")
    assert train_main(args) == 0
    ckpt = out / "checkpoints" / "checkpoint-4"
    marker = tmp_path / "code-ran"
    torch.save({"state": _Payload(str(marker))}, ckpt / victim)
    _resign(ckpt)
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.") + ".*weights_only=True"):
        verify_checkpoint(ckpt)
    # a path to the bad checkpoint given explicitly: exit 2, named, nothing run
    assert train_main([*args, f"train.resume={ckpt}"]) == 2
    assert victim in capsys.readouterr().err and not marker.exists()
    # train.resume=latest: reported by name, skipped, the previous checkpoint is used
    assert train_main([*args, "train.resume=latest"]) == 0
    assert not marker.exists(), "the pickle's code was executed"
    assert "checkpoint-4" in caplog.text and victim in caplog.text
    assert "checkpoint-2 at step 2" in capsys.readouterr().out
