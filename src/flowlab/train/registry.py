"""The recipe registry: recipe name -> its config sections and a loader of its class.

The engine keeps the registry but never fills it: the top layer (:mod:`flowlab.recipes` for the
built-in recipes, or a user's own module) calls :func:`register_recipe`. A registration is cheap:
the sections are light dataclasses (no torch, no diffusers), and the recipe class is imported by
``load`` only after the config has validated, so a config typo is reported at once.

This module imports no torch: :mod:`flowlab.train.config` validates configs against it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..errors import ConfigError
from ..schema import did_you_mean

__all__ = ["RecipeSpec", "RECIPES", "register_recipe", "recipe_spec", "recipe_class"]


@dataclass(frozen=True)
class RecipeSpec:
    """What the engine knows of a recipe before importing it.

    Attributes:
        name: the config's ``recipe:`` value.
        sections: the config sections the recipe reads, section name -> schema (a dataclass or a
            :class:`~flowlab.schema.TaggedUnion`), besides the core ``train`` and ``hub``. A config
            that gives any other section is refused. A section's dataclass may define
            ``check(self, config)``, called once the whole config has validated, for checks across keys.
        load: returns the :class:`~flowlab.train.recipe.Recipe` subclass (imports it on first call).
    """

    name: str
    sections: Mapping[str, Any] = field(default_factory=dict)
    load: Callable[[], type] = field(default=lambda: None, compare=False)


RECIPES: dict[str, RecipeSpec] = {}


def register_recipe(name: str, sections: Mapping[str, Any] | None = None, load: Callable[[], type] | None = None):
    """Register recipe ``name`` with its config ``sections`` (see :class:`RecipeSpec`).

    With ``load`` it registers directly; without, it is a class decorator::

        @register_recipe("my_recipe", sections={"my_recipe": MySection})
        class MyRecipe(Recipe): ...

    The engine's schedule sections ``sample`` (``every``, ``num_images``) and ``eval``
    (``every``, ``enabled``) are added unless ``sections`` gives its own (a subclass of
    :class:`~flowlab.train.config.SampleConfig` / :class:`~flowlab.train.config.EvalConfig`).

    Returns:
        The :class:`RecipeSpec` (direct form) or the decorator.
    """
    from .config import CORE_SECTIONS, EvalConfig, SampleConfig

    own = dict(sections or {})
    for clash in set(own) & set(CORE_SECTIONS):
        raise ValueError(f"recipe {name!r}: section {clash!r} belongs to the core config")
    merged = {**own, **{k: v for k, v in (("sample", SampleConfig), ("eval", EvalConfig)) if k not in own}}

    def _register(loader: Callable[[], type]) -> RecipeSpec:
        spec = RecipeSpec(name, merged, loader)
        RECIPES[name] = spec
        return spec

    if load is not None:
        return _register(load)

    def deco(cls):
        cls.name = name
        _register(lambda: cls)
        return cls

    return deco


def recipe_spec(name: Any) -> RecipeSpec:
    """The registered recipe ``name`` (raises :class:`ConfigError` naming ``recipe``)."""
    if not isinstance(name, str) or name not in RECIPES:
        if not RECIPES:
            raise ConfigError(
                f"recipe: unknown recipe {name!r}; no recipe is registered: load configs with flowlab.load_config "
                "(or import flowlab.recipes), which registers the built-in recipes"
            )
        raise ConfigError(f"recipe: unknown recipe {name!r}{did_you_mean(name, RECIPES)}; available: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def recipe_class(name: str) -> type:
    """The recipe class registered as ``name`` (imported now), with ``cls.name`` set to ``name``."""
    cls = recipe_spec(name).load()
    cls.name = name
    return cls
