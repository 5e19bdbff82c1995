"""The top layer of training: the built-in recipes, registered with the engine, and the entry points
that need them (the command line, :func:`load_config`, :func:`train`, ``flowlab.Trainer``).

The engine (:mod:`flowlab.train`) knows no recipe. Importing this package registers the built-in
ones: each with its config sections, which are light dataclasses (no torch), and a loader that
imports the recipe class only once a config has validated::

    from flowlab.recipes import load_config, train
    config = load_config("configs/quickstart.yaml", ["train.max_steps=200"])
    train(config)          # trains any prerequisite run first (e.g. an RL recipe's missing base)

``flowlab.load_config`` and ``flowlab.Trainer`` are these same names. A recipe of your own is
registered the same way, with :func:`flowlab.train.registry.register_recipe`.

=================  ==============================  ==============================================
recipe             sections (besides train, hub)   class
=================  ==============================  ==============================================
flow_matching      data, model, flow, sample, eval recipes.flow_matching.recipe.FlowMatchingRecipe
meanflow           flow_matching's + meanflow      recipes.meanflow.recipe.MeanFlowRecipe
reflow             flow_matching's + reflow        recipes.reflow.recipe.ReflowRecipe
noprop             data, model, noprop, ...        noprop.recipe.NoPropRecipe
nft / flowgrpo     rl, nft (+ flow) / rl, grpo     nft.recipe.NFTRecipe / FlowGRPORecipe
reversal_ar/jepa   reversal                        jepa.recipe.ReversalARRecipe / ReversalJEPARecipe
=================  ==============================  ==============================================
"""
from __future__ import annotations

import os

from ..nft.config import RL_CONFIG, GRPOConfig, NFTConfig
from ..noprop.config import NoPropConfig
from ..train.config import Config, config_from_dict, config_to_dict, load_config
from ..train.registry import RECIPES, recipe_class, register_recipe
from .flow_matching.config import DATA_CONFIG, MODEL_CONFIG, FlowConfig
from .flow_matching.config import SECTIONS as _FLOW_MATCHING_SECTIONS
from .meanflow.config import SECTIONS as _MEANFLOW_SECTIONS
from .reflow.config import SECTIONS as _REFLOW_SECTIONS
from .chain_config import ChainConfig
from .reversal_config import ReversalConfig

__all__ = ["RECIPES", "load_config", "config_from_dict", "config_to_dict", "get_recipe", "train", "train_benchmark_runs", "Trainer", "Config"]


def _flow_matching():
    from .flow_matching.recipe import FlowMatchingRecipe

    return FlowMatchingRecipe


def _meanflow():
    from .meanflow.recipe import MeanFlowRecipe

    return MeanFlowRecipe


def _reflow():
    from .reflow.recipe import ReflowRecipe

    return ReflowRecipe


def _noprop():
    from ..noprop.recipe import NoPropRecipe

    return NoPropRecipe


def _nft():
    from ..nft.recipe import NFTRecipe

    return NFTRecipe


def _flowgrpo():
    from ..nft.recipe import FlowGRPORecipe

    return FlowGRPORecipe


def _reversal_ar():
    from ..jepa.recipe import ReversalARRecipe

    return ReversalARRecipe


def _reversal_jepa():
    from ..jepa.recipe import ReversalJEPARecipe

    return ReversalJEPARecipe


# Each recipe with the sections it reads (the engine adds the schedule sections `sample` and `eval`
# where a recipe does not extend them).
register_recipe("flow_matching", _FLOW_MATCHING_SECTIONS, _flow_matching)
register_recipe("meanflow", _MEANFLOW_SECTIONS, _meanflow)
register_recipe("reflow", _REFLOW_SECTIONS, _reflow)
register_recipe("noprop", {"data": DATA_CONFIG, "model": MODEL_CONFIG, "noprop": NoPropConfig}, _noprop)
register_recipe("nft", {"rl": RL_CONFIG, "nft": NFTConfig, "flow": FlowConfig}, _nft)
register_recipe("flowgrpo", {"rl": RL_CONFIG, "grpo": GRPOConfig}, _flowgrpo)
register_recipe("reversal_ar", {"reversal": ReversalConfig, "chain": ChainConfig}, _reversal_ar)
register_recipe("reversal_jepa", {"reversal": ReversalConfig, "chain": ChainConfig}, _reversal_jepa)


def get_recipe(config: Config):
    """The recipe object of ``config`` (its class is imported now)."""
    return recipe_class(config.recipe)(config)


def train(config: Config, *, log=print, teardown: bool = True) -> str:
    """Train the run ``config``, after the runs it needs (:meth:`~flowlab.train.recipe.Recipe.prerequisites`,
    trained depth first). Returns the run's ``output_dir``.

    This is the one place where a run starts another: the engine never trains from inside a recipe.
    In a multi-process launch the process group is destroyed once the whole chain has ended (or stopped
    on a signal after its checkpoint), not between its runs; with ``teardown=False`` the caller does it
    (:func:`flowlab.train.teardown.end_distributed`), e.g. after a push to the Hub.

    Raises:
        TrainingInterrupted: on SIGINT or SIGTERM, after the running run saved its checkpoint.
    """
    from ..errors import TrainingInterrupted
    from ..train.teardown import end_distributed

    try:
        _train_chain(config, log)
    except TrainingInterrupted as e:  # every process agreed to stop: the group is idle and can be destroyed
        if teardown:
            end_distributed(exit_code=e.exit_code)
        raise
    if teardown:
        end_distributed()
    return os.fspath(config.output_dir)


def _train_chain(config: Config, log) -> None:
    from ..train.trainer import Trainer

    recipe = get_recipe(config)
    for pre in recipe.prerequisites():
        if os.environ.get("RANK", "0") == "0":  # once per launch, not once per process
            log(f"flowlab: {config.recipe} needs {pre.output_dir} first; training it (recipe {pre.recipe})")
        _train_chain(pre, log)
    Trainer(config, recipe=recipe).train()


def train_benchmark_runs(configs: dict[str, str], workdir: str, prefix: str, overrides: list[str] = ()) -> dict[str, tuple[str, float]]:
    """Train several config files for a benchmark script, each in ``<workdir>/<prefix>_<key>`` (overwritten,
    no trackers, no periodic evaluation: the script evaluates once at the end). ``configs`` maps a key to a
    YAML path; ``overrides`` apply to every run. Returns ``{key: (output_dir, seconds)}``."""
    import time

    runs = {}
    for key, path in configs.items():
        out = os.path.join(workdir, f"{prefix}_{key}")
        cfg = load_config(path, [f"output_dir={out}", "train.overwrite=true", "train.report_to=none", "eval.enabled=false", *overrides])
        t0 = time.perf_counter()
        train(cfg)
        runs[key] = (out, time.perf_counter() - t0)
    return runs


def __getattr__(name: str):
    if name == "Trainer":  # the engine's trainer; importing this package has registered the recipes
        from ..train.trainer import Trainer

        return Trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
