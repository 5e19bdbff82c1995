"""The documentation runs as written: every ```python block of README.md and docs/*.md is executed,
each file's blocks in order in one namespace, in a temporary working folder where a session fixture
has put the small artefacts the blocks load (``runs/quickstart/pipeline`` and the other run folders,
made by a few training steps or built and saved). A block that cannot run here (GPU, the Hub, hours of
training) carries ``<!-- docs-test: skip (reason) -->`` on the line before it; skips are counted and
printed. Also: the docs never ask for a machine-specific venv or ``PYTHONPATH=src``, and the eval scripts
import the installed package and state their default run time in ``--help``."""
from __future__ import annotations

import ast
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import ROOT

REPO = Path(ROOT)
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SKIP = re.compile(r"^<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->$")
FENCE = re.compile(r"^```python\s*$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    source: str
    skip: str | None  # reason, or None


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a markdown file, with the skip marker of the line before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            if j == len(lines):
                raise AssertionError(f"{path.name}:{i + 1}: unterminated ```python block")
            prev = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            m = SKIP.match(prev)
            if prev.startswith("<!-- docs-test") and not m:
                raise AssertionError(f"{path.name}:{i}: malformed marker {prev!r}; write <!-- docs-test: skip (reason) -->")
            blocks.append(Block(path, i + 1, "\n".join(lines[i + 1 : j]) + "\n", m.group("reason") if m else None))
            i = j
        i += 1
    return blocks


# --------------------------------------------------------------------------- artefacts the blocks load


def _train(config: str, output_dir: Path, *overrides: str) -> None:
    from flowlab.recipes import Trainer, load_config

    Trainer(load_config(str(REPO / "configs" / config), [f"output_dir={output_dir}", "train.report_to=none", *overrides])).train()


@pytest.fixture(scope="session")
def docs_workdir(tmp_path_factory) -> Path:
    """A working folder holding small stand-ins of the run folders the docs load:

    * ``runs/quickstart/pipeline``: the quickstart config (a smaller MLP) trained for 2 steps;
    * ``runs/nft_digits/pipeline``: a copy of it (a fine-tuned pipeline has the same layout);
    * ``runs/meanflow_digits/pipeline``: the MeanFlow config (the same smaller MLP) trained for 2 steps;
    * ``runs/reflow_digits/pipeline``: the reflow config on that quickstart stand-in (64 pairs), 2 steps;
    * ``runs/noprop_dt_digits/classifier``, ``runs/noprop_ct_digits/classifier``: small, untrained
      NoProp classifiers of each variant, saved;
    * ``runs/reversal_jepa/model`` (+ ``model/data``): the reversal_jepa config on 120 entities, 2 steps.
    """
    from flowlab.noprop import NoPropClassifier

    work = tmp_path_factory.mktemp("docs")
    runs = work / "runs"
    _train("quickstart.yaml", runs / "quickstart", "train.max_steps=2", "train.warmup_steps=1", "model.hidden_dim=64",
           "model.depth=2", "eval.enabled=false", "sample.every=0", "train.checkpoint_every=0")
    shutil.copytree(runs / "quickstart" / "pipeline", runs / "nft_digits" / "pipeline")
    _train("meanflow_digits.yaml", runs / "meanflow_digits", "train.max_steps=2", "train.warmup_steps=1", "model.hidden_dim=64",
           "model.depth=2", "eval.enabled=false", "sample.every=0", "train.checkpoint_every=0")
    _train("reflow_digits.yaml", runs / "reflow_digits", f"reflow.teacher={runs / 'quickstart' / 'pipeline'}", "reflow.num_pairs=64",
           "train.max_steps=2", "train.warmup_steps=1", "eval.enabled=false", "sample.every=0", "train.checkpoint_every=0")
    for variant, extra in (("dt", {"num_blocks": 3}), ("ct", {"embedding": "prototype", "inference_steps": 3})):
        torch.manual_seed(0)
        NoPropClassifier(variant=variant, hidden_dim=16, channels=(4, 8), time_embed_dim=8, **extra).save_pretrained(
            runs / f"noprop_{variant}_digits" / "classifier")
    _train("reversal_jepa.yaml", runs / "reversal_jepa", "train.max_steps=2", "train.warmup_steps=1",
           "reversal.num_entities_a=80", "reversal.num_entities_b=40", "reversal.num_relations=4", "reversal.names_share=5",
           "reversal.hidden_size=16", "reversal.num_heads=2", "reversal.encoder_layers=1", "reversal.eval_max_queries=20",
           "train.batch_size=16", "eval.every=0", "train.checkpoint_every=0")
    return work


# --------------------------------------------------------------------------- the blocks


def test_blocks_are_found_and_markers_parsed(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("text\n```python\na = 1\n```\n<!-- docs-test: skip (needs a GPU) -->\n\n```python\nb = 2\n```\n```bash\nls\n```\n")
    blocks = python_blocks(md)
    assert [(b.line, b.source, b.skip) for b in blocks] == [(2, "a = 1\n", None), (7, "b = 2\n", "needs a GPU")]
    md.write_text("<!-- docs-test: skp -->\n```python\npass\n```\n")
    with pytest.raises(AssertionError, match="malformed marker"):
        python_blocks(md)
    assert len(python_blocks(REPO / "README.md")) >= 6


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_python_blocks_run(doc, docs_workdir, monkeypatch, capsys):
    from flowlab.rewards import base as reward_base

    blocks = python_blocks(doc)
    if not blocks:
        pytest.skip(f"{doc.name} has no python blocks")
    monkeypatch.chdir(docs_workdir)
    monkeypatch.setattr(reward_base, "REWARDS", dict(reward_base.REWARDS))  # blocks may register rewards
    namespace: dict = {"__name__": f"docs_{doc.stem}"}
    ran, skipped = 0, []
    for block in blocks:
        where = f"{doc.relative_to(REPO)}:{block.line}"
        if block.skip:
            skipped.append(f"{where} ({block.skip})")
            continue
        torch.manual_seed(0)
        try:
            exec(compile(block.source, where, "exec"), namespace)
        except Exception as e:  # the message names the block and shows it
            raise AssertionError(f"the python block at {where} fails as written: {type(e).__name__}: {e}\n\n{block.source}") from e
        ran += 1
    with capsys.disabled():
        print(f"\n{doc.relative_to(REPO)}: {ran} python block(s) ran, {len(skipped)} skipped"
              + "".join(f"\n  skipped {s}" for s in skipped))
    assert ran + len(skipped) == len(blocks)


def test_skips_are_rare():
    blocks = [b for doc in DOCS for b in python_blocks(doc)]
    skipped = [f"{b.path.name}:{b.line} ({b.skip})" for b in blocks if b.skip]
    print(f"\n{len(blocks)} python blocks in README.md and docs/, {len(skipped)} skipped: " + "; ".join(skipped))
    assert len(skipped) <= len(blocks) // 3, skipped


# --------------------------------------------------------------------------- setup instructions and eval scripts


def test_docs_use_the_installed_package():
    """No machine-specific venv and no ``PYTHONPATH=src``: ``pip install -e .`` makes flowlab importable."""
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for bad in ("PYTHONPATH=src", "/work/venv", "/work/main"):
            assert bad not in text, f"{doc.relative_to(REPO)} mentions {bad!r}"


@pytest.mark.parametrize("script", sorted((REPO / "eval").glob("*.py")), ids=lambda p: p.name)
def test_eval_scripts_import_the_package_and_state_their_run_time(script):
    tree = ast.parse(script.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) and node.value.id == "sys":
            raise AssertionError(f"eval/{script.name}:{node.lineno} edits or reads sys.path; import the installed flowlab instead")
    runtime = next((n.value.value for n in tree.body if isinstance(n, ast.Assign) and [getattr(t, "id", None) for t in n.targets] == ["RUNTIME"]
                    and isinstance(n.value, ast.Constant)), None)
    assert runtime and re.search(r"\d+(\.\d+)? ?(s|min)\b", runtime) and "2-core" in runtime, f"eval/{script.name}: RUNTIME"
    parsers = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "ArgumentParser"]
    assert len(parsers) == 1 and any(k.arg == "epilog" and getattr(k.value, "id", None) == "RUNTIME" for k in parsers[0].keywords), \
        f"eval/{script.name}: its ArgumentParser must show RUNTIME (epilog=RUNTIME) in --help"
