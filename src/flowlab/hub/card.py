"""The model card of a pushed run, built with huggingface_hub's :class:`~huggingface_hub.ModelCard`.

Following diffusers' ``load_or_create_model_card`` / ``populate_model_card``: the metadata is a
:class:`~huggingface_hub.ModelCardData` (``license``, ``library_name``, ``base_model``, ``datasets``,
``pipeline_tag``, ``tags``), the library's own tag (``flowlab``) and the recipe's name are added to the
tags, and the card
is a :class:`~huggingface_hub.ModelCard` whose YAML front matter the Hub (and ``ModelCard.load``)
parses back. Every field comes from the run's :class:`~flowlab.card_data.CardData`; the body
adds the final metrics, the sample grid and the (redacted) training config.
"""
from __future__ import annotations

import math
from typing import Optional

import yaml

from ..card_data import CardData
from .redaction import redact_secrets, scrub_token

__all__ = ["DEFAULT_LICENSE", "LIBRARY_TAG", "build_model_card", "final_metrics"]

#: License written in the card when neither the call, the card data nor the run's ``hub.license``
#: gives one (flowlab itself is Apache-2.0).
DEFAULT_LICENSE = "apache-2.0"
#: The library's tag, added to every card's tags (as diffusers' ``populate_model_card`` adds its own).
LIBRARY_TAG = "flowlab"

# bookkeeping columns of metrics.jsonl left out of the card's table
_METRIC_SKIP = {"step", "lr", "grad_norm", "samples_per_sec", "steps_per_sec", "skipped_steps"}


def final_metrics(records: list[dict]) -> dict[str, tuple[float, Optional[int]]]:
    """The last value of each numeric metric and the step it was logged at (eval metrics first)."""
    last: dict[str, tuple[float, Optional[int]]] = {}
    for rec in records:
        for k, v in rec.items():
            if k in _METRIC_SKIP or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            last[k] = (float(v), rec.get("step"))
    order = sorted(last, key=lambda k: (not k.startswith("eval/"), k != "loss", k))
    return {k: last[k] for k in order}


def _fmt(value: float) -> str:
    return f"{value:.4g}" if value != int(value) or abs(value) >= 1e6 else str(int(value))


def build_model_card(
    repo_id: str,
    config: dict,
    card_data: CardData,
    metrics: dict[str, tuple[float, Optional[int]]],
    grid_path_in_repo: Optional[str],
    license: str,
    token: Optional[str] = None,
):
    """The ``README.md`` of a pushed run: a :class:`~huggingface_hub.ModelCard` (``str(card)`` is the file).

    Args:
        repo_id: the target repo (the title; ``card_data`` already has it in its usage snippet).
        config: the run's training config (redacted here before it is shown).
        card_data: the run's card data, with the repo id substituted (:meth:`CardData.for_repo`).
        metrics: :func:`final_metrics` of the run.
        grid_path_in_repo: where the sample grid lands in the repo, or ``None``.
        license: the Hub license id used when ``card_data.license`` is unset.
        token: the token in use (scrubbed from everything, should it appear anywhere).

    Returns:
        A ``huggingface_hub.ModelCard``.
    """
    from huggingface_hub import ModelCard, ModelCardData

    meta = ModelCardData(
        license=card_data.license or license,
        library_name=card_data.library_name,
        base_model=card_data.base_model,
        datasets=card_data.datasets,
        pipeline_tag=card_data.pipeline_tag,
        tags=list(dict.fromkeys([LIBRARY_TAG, card_data.recipe.replace("_", "-"), *card_data.tags])),
    )
    description = card_data.description or (
        f"Trained with flowlab (recipe `{card_data.recipe}`)."
        + (f" Fine-tuned from [`{meta.base_model}`](https://huggingface.co/{meta.base_model})." if meta.base_model else "")
    )
    lines = [f"# {repo_id.split('/')[-1]}", "", description, ""]
    lines += ["## Usage", "", "```python", card_data.usage or f"# see the files of {repo_id}", "```", ""]
    lines += ["## Final metrics", ""]
    if metrics:
        lines += ["| metric | value | step |", "|---|---|---|"]
        lines += [f"| `{k}` | {_fmt(v)} | {'' if s is None else s} |" for k, (v, s) in metrics.items()]
    else:
        lines.append("No metrics were recorded.")
    lines.append("")
    if grid_path_in_repo:
        lines += ["## Samples", "", f"![samples from the final model]({grid_path_in_repo})", ""]
    lines += [
        "## Training config",
        "",
        "Reproduce with `python train.py --config config.yaml` (the file is in this repo).",
        "",
        "```yaml",
        yaml.safe_dump(redact_secrets(config, token), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    content = f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(scrub_token(content, token))
