"""Dependencies run one way: core (flow) <- models/data <- engine (train) <- recipes <- CLI/hub.

Checked twice: by the modules a fresh interpreter has loaded after importing the engine, and by an
AST scan of every import statement and every string that names a flowlab module (what importlib
would be given) in the lower layers.

The model families (``families/``) sit under both of their users, RL (``nft/``) and WGF (``wgf/``):
they take their maths from the core (``flow/``) and name neither user.
"""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "flowlab"

#: Bottom-layer modules every layer may use.
BOTTOM = {"errors", "schema", "names", "fileio", "card_data"}
#: What each lower layer may import (top-level flowlab packages / modules).
ALLOWED = {
    "flow": BOTTOM | {"flow"},
    "models": BOTTOM | {"flow", "models"},
    "data": BOTTOM | {"flow", "models", "data"},
    "train": BOTTOM | {"flow", "models", "data", "train"},
    "families": BOTTOM | {"flow", "models", "pipelines", "families"},
}
RECIPE_PACKAGES = ("flowlab.nft", "flowlab.noprop", "flowlab.jepa", "flowlab.recipes")


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """Absolute names imported by ``node`` in ``module`` (``flowlab.train.config``)."""
    if node.level == 0:
        return [node.module] if node.module else []
    base = module.split(".")[: -node.level]
    target = ".".join(base + ([node.module] if node.module else []))
    # `from .. import x` may import a submodule x
    return [target] if node.module else [f"{target}.{alias.name}" for alias in node.names]


def _flowlab_names(path: Path, module: str) -> list[tuple[int, str]]:
    """``(line, absolute flowlab module)`` of every import and every module-name string in a file."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out += [(node.lineno, name) for name in _resolve(module, node)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if re.fullmatch(r"flowlab(\.\w+)+", node.value):  # e.g. importlib.import_module("flowlab.nft.recipe")
                out.append((node.lineno, node.value))
    return [(line, name) for line, name in out if name == "flowlab" or name.startswith("flowlab.")]


def _lower_layer_files():
    for layer in ALLOWED:
        for path in sorted((SRC / layer).rglob("*.py")):
            rel = path.relative_to(SRC.parent).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
                module = ".".join(parts) + ".__init__"  # relative imports resolve from the package itself
            else:
                module = ".".join(parts)
            yield layer, path, module


@pytest.mark.parametrize("layer,path,module", list(_lower_layer_files()), ids=lambda v: str(v) if isinstance(v, str) else None)
def test_lower_layers_name_no_higher_layer(layer, path, module):
    bad = []
    for line, name in _flowlab_names(path, module):
        parts = name.split(".")
        top = parts[1] if len(parts) > 1 else ""
        if top not in ALLOWED[layer]:
            bad.append(f"{path.relative_to(SRC.parent)}:{line}: {name}")
    assert not bad, f"layer {layer} reaches up to: " + "; ".join(bad)


def test_the_scan_sees_imports_and_importlib_strings(tmp_path):
    """The scanner itself: a relative import, an absolute one and a module-name string are all found."""
    f = tmp_path / "m.py"
    f.write_text('from ..nft import recipe\nimport flowlab.hub\nimport importlib\nimportlib.import_module("flowlab.jepa.recipe")\n'
                 '"""docs mention flowlab.recipes in prose"""\n')
    names = {name for _, name in _flowlab_names(f, "flowlab.train.m")}
    assert names == {"flowlab.nft", "flowlab.hub", "flowlab.jepa.recipe"}


def test_the_families_and_the_core_load_no_wgf_or_rl_module():
    """Importing every family adapter (and the core) in a fresh interpreter loads nothing of ``wgf/`` or ``nft/``:
    the discrete-schedule path and the v -> epsilon conversion they use live in ``flow/``."""
    code = (
        "import sys, flowlab.flow, flowlab.families\n"
        "from flowlab.families import FAMILIES\n"
        "import importlib\n"
        "for module, _ in FAMILIES.values():\n"
        "    importlib.import_module(module, 'flowlab.families')\n"
        "assert {'flowlab.families.sd3', 'flowlab.families.flux', 'flowlab.families.unet'} <= set(sys.modules)\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('flowlab.wgf', 'flowlab.nft')))\n"
        "assert not bad, bad\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_moved_core_names_are_the_same_objects_at_their_old_paths():
    """``wgf.schedule`` / ``wgf.flow`` re-export what moved to ``flow.discrete`` (old imports keep working)."""
    from flowlab.flow import discrete
    from flowlab.wgf import flow as wgf_flow, schedule

    assert schedule.DiscreteSchedulePath is discrete.DiscreteSchedulePath
    assert schedule.t_to_diffusers_timestep is discrete.t_to_diffusers_timestep
    assert wgf_flow.diffusers_v_to_epsilon is discrete.diffusers_v_to_epsilon
    assert wgf_flow.DIFFUSERS_PREDICTION_TYPES is discrete.DIFFUSERS_PREDICTION_TYPES


def _python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (nothing imported yet) from the repository root."""
    env = {**os.environ, "PYTHONPATH": str(SRC.parent), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=SRC.parents[1])


def test_importing_the_engine_loads_no_recipe():
    code = (
        "import sys, flowlab.train.trainer, flowlab.train.config, flowlab.train.recipe, flowlab.train.registry\n"
        f"bad = sorted(m for m in sys.modules if m.startswith({RECIPE_PACKAGES!r}))\n"
        "assert not bad, bad\n"
        "from flowlab.train.registry import RECIPES\n"
        "assert RECIPES == {}, sorted(RECIPES)\n"  # the engine fills no registry
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_config_validation_imports_no_torch():
    """A config is validated (and a typo reported) before torch or diffusers is imported."""
    code = (
        "import sys\n"
        "from flowlab.recipes import load_config\n"
        "from flowlab.errors import ConfigError\n"
        "for name in ('quickstart', 'nft_digits', 'noprop_dt_digits', 'reversal_jepa'):\n"
        "    load_config(f'configs/{name}.yaml')\n"
        "try:\n"
        "    load_config('configs/quickstart.yaml', ['train.max_stpes=1'])\n"
        "except ConfigError as e:\n"
        "    assert 'train.max_steps' in str(e)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', 'accelerate'))\n"
        "assert not heavy, heavy[:5]\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_engine_refuses_a_config_when_no_recipe_is_registered():
    """Without the top layer the engine knows no recipe, and says where to get them."""
    code = (
        "from flowlab.train.config import load_config\n"
        "from flowlab.errors import ConfigError\n"
        "try:\n"
        "    load_config(None, [])\n"
        "except ConfigError as e:\n"
        "    assert str(e).startswith('recipe:') and 'flowlab.recipes' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('accepted')\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-500:]
