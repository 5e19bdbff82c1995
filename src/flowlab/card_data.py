"""Model-card data of a run: what a recipe says about its trained artefact, saved as ``<output_dir>/card.json``.

A recipe's ``card_data(repo_id)`` is the only source of a card's usage snippet, tags and pipeline
tag. The trainer calls it once, right after ``save_final``, with the placeholder :data:`REPO_ID`
for the repo id (unknown until a push) and writes the result with :func:`write_card_data`; a push
reads it back with :func:`read_card_data` and substitutes the real repo id. So publishing a run
never imports, builds or inspects a recipe, and never guesses from the artefact's file layout.

``card.json``::

    {"format": 1, "recipe": "flow_matching", "artifact": "pipeline", "library_name": "flowlab",
     "usage": "from flowlab import FlowPipeline\\npipe = FlowPipeline.from_pretrained(\\"{repo_id}\\")\\n...",
     "tags": ["flow-matching", "image-generation"], "pipeline_tag": "unconditional-image-generation",
     "base_model": null, "datasets": null, "license": null, "description": null}

This module is at the bottom of flowlab's layers (it imports only :mod:`flowlab.errors` and
:mod:`flowlab.fileio`), so the engine and every recipe may import it.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from .errors import HubError
from .fileio import atomic_write_json

__all__ = [
    "CARD_DATA_FILE",
    "REPO_ID",
    "CardData",
    "write_card_data",
    "read_card_data",
    "looks_like_repo_id",
    "flow_pipeline_card_data",
]

#: The file in a run folder that holds its card data.
CARD_DATA_FILE = "card.json"
#: Placeholder for the repo id in ``usage`` and ``description``; a push replaces it with the target repo id.
REPO_ID = "{repo_id}"
_FORMAT = 1


@dataclass
class CardData:
    """The card data of one run.

    Attributes:
        recipe: the config's ``recipe:`` (e.g. ``flow_matching``).
        artifact: the folder under the run folder that ``save_final`` wrote (what a push uploads).
        usage: Python code that loads and uses the model, with :data:`REPO_ID` for the repo id.
        tags: Hub tags (the card adds ``flowlab``, the library's own tag, and the recipe's name).
        pipeline_tag: the Hub task (``unconditional-image-generation``, ``image-classification``,
            ``text-to-image``, ...), or ``None`` when no Hub task fits.
        library_name: the library that loads the artefact.
        base_model: the Hub id the model was fine-tuned from.
        datasets: Hub dataset ids it was trained on.
        license: a Hub license id (``None``: the push's ``license``, ``hub.license`` or the default).
        description: Markdown shown under the card's title (``None``: a generic sentence).
    """

    recipe: str
    artifact: str
    usage: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    pipeline_tag: Optional[str] = None
    library_name: str = "flowlab"
    base_model: Optional[str] = None
    datasets: Optional[list[str]] = None
    license: Optional[str] = None
    description: Optional[str] = None

    #: the keys a recipe's ``card_data()`` may return (``recipe`` and ``artifact`` come from the trainer)
    RECIPE_KEYS = ("usage", "tags", "pipeline_tag", "library_name", "base_model", "datasets", "license", "description")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> "CardData":
        """Validate ``data`` (a parsed ``card.json``, or ``recipe``/``artifact`` plus a recipe's
        ``card_data()``); a :class:`HubError` naming ``source`` and the key at fault otherwise."""
        if not isinstance(data, Mapping):
            raise HubError(f"{source}: card data must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        for key, value in data.items():
            if key == "format":
                continue
            if key not in known:
                raise HubError(f"{source}: unknown card data key {key!r} (known: {', '.join(sorted(known))})")
            if key in ("tags", "datasets"):
                if isinstance(value, str):
                    value = [value]
                ok = value is None and key == "datasets" or isinstance(value, list) and all(isinstance(v, str) and v for v in value)
                if not ok:
                    raise HubError(f"{source}: card data key {key!r} must be a list of non-empty strings, got {value!r}")
            elif key in ("recipe", "artifact", "library_name"):
                if not isinstance(value, str) or not value:
                    raise HubError(f"{source}: card data key {key!r} must be a non-empty string, got {value!r}")
            elif value is not None and not isinstance(value, str):
                raise HubError(f"{source}: card data key {key!r} must be a string or null, got {type(value).__name__}")
        for key in ("recipe", "artifact"):
            if key not in data:
                raise HubError(f"{source}: card data has no {key!r}")
        if Path(data["artifact"]).name != data["artifact"] or data["artifact"] in (".", ".."):
            raise HubError(f"{source}: card data key 'artifact' must be a folder name in the run folder, got {data['artifact']!r}")
        values = {k: ([v] if k in ("tags", "datasets") and isinstance(v, str) else v) for k, v in data.items() if k != "format"}
        values["tags"] = list(dict.fromkeys(values.get("tags") or []))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, **asdict(self)}

    def for_repo(self, repo_id: str) -> "CardData":
        """A copy with :data:`REPO_ID` in ``usage`` and ``description`` replaced by ``repo_id``."""
        usage, description = (text.replace(REPO_ID, repo_id) if text else text for text in (self.usage, self.description))
        return CardData(**{**asdict(self), "usage": usage, "description": description})


def write_card_data(output_dir: str | os.PathLike, card_data: Mapping[str, Any], *, recipe: str, artifact: str) -> Path:
    """Validate a recipe's ``card_data(REPO_ID)`` and write it atomically to ``<output_dir>/card.json``.

    Args:
        output_dir: the run folder.
        card_data: the recipe's fields (keys: :attr:`CardData.RECIPE_KEYS`).
        recipe: the recipe's registry name. artifact: the folder ``save_final`` wrote.

    Returns:
        The path written.
    """
    if not isinstance(card_data, Mapping):
        raise HubError(f"recipe {recipe!r}: card_data() must return a dict, got {type(card_data).__name__}")
    extra = sorted(set(card_data) - set(CardData.RECIPE_KEYS))
    if extra:
        raise HubError(
            f"recipe {recipe!r}: card_data() returned the unknown key {extra[0]!r} (known: {', '.join(CardData.RECIPE_KEYS)})"
        )
    data = CardData.from_dict({**card_data, "recipe": recipe, "artifact": artifact}, f"recipe {recipe!r} card_data()")
    path = Path(output_dir) / CARD_DATA_FILE
    atomic_write_json(path, data.to_dict())
    return path


def read_card_data(output_dir: str | os.PathLike) -> CardData:
    """The card data of a finished run. A :class:`HubError` if ``card.json`` is missing or invalid."""
    path = Path(output_dir) / CARD_DATA_FILE
    if not path.is_file():
        raise HubError(
            f"{output_dir} has no {CARD_DATA_FILE}: the trainer writes it with the trained artefact when training "
            "finishes (did the run finish?). For a run trained before flowlab wrote it, write it once with "
            "flowlab.hub.write_card_data(output_dir, {'usage': ..., 'tags': [...], 'pipeline_tag': ...}, "
            "recipe=..., artifact=<the artefact folder>), or pass card_data= (with 'recipe' and 'artifact') to push_to_hub"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HubError(f"{path} is not valid JSON: {e}") from None
    return CardData.from_dict(data, str(path))


def looks_like_repo_id(value: Any) -> bool:
    """Whether ``value`` is a Hub repo id (``"name"`` or ``"user/name"``) rather than a local path.

    A local path is one that exists, starts with ``.``, ``/`` or ``~``, is no valid repo id, or whose
    first component is an existing local folder (``runs/quickstrt`` is a typo of a local path, not the
    Hub repo ``quickstrt`` of the user ``runs``).
    """
    if not isinstance(value, str) or not value or os.path.exists(value) or value.startswith((".", "/", "~")):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return not ("/" in value and os.path.isdir(value.split("/", 1)[0]))


def flow_pipeline_card_data(repo_id: str, *, class_labels: Optional[str] = None, images: bool = True) -> dict[str, Any]:
    """Usage, tags and pipeline tag of a :class:`~flowlab.pipelines.FlowPipeline` artefact.

    Args:
        repo_id: the repo id (or :data:`REPO_ID`).
        class_labels: for a class-conditional model, the Python expression of the labels passed to
            the pipeline (e.g. ``"list(range(10))"``); ``None`` for an unconditional one.
        images: the pipeline draws images (``False``: vectors, returned as a tensor).

    A class-conditional image model is tagged ``class-conditional-image-generation`` and has no
    ``pipeline_tag``: the Hub's tasks have none for class labels, and ``unconditional-image-generation``
    would be wrong.
    """
    if class_labels is not None:
        call = f'pipe(class_labels={class_labels}, output_type="{"pil" if images else "pt"}").images'
    else:
        call = f'pipe(batch_size=16, output_type="{"pil" if images else "pt"}").images'
    data: dict[str, Any] = {
        "usage": f'from flowlab import FlowPipeline\npipe = FlowPipeline.from_pretrained("{repo_id}")\n'
        f"{'images' if images else 'samples'} = {call}",
        "tags": ["flow-matching"],
        "pipeline_tag": None,
    }
    if images and class_labels is not None:
        data["tags"] += ["image-generation", "class-conditional-image-generation"]
    elif images:
        data["tags"] += ["image-generation"]
        data["pipeline_tag"] = "unconditional-image-generation"
    return data
