"""Where a pipeline is loaded from: a local pipeline folder, or a Hub repo id.

``from_pretrained`` of flowlab's pipelines takes either. The argument is read as a **local
path** when it exists, when it is not a valid Hub repo id (``name`` or ``owner/name``), or when
its first component is an existing local folder (``runs/quickstrt`` is a typo of a local path,
not a Hub repo of the user ``runs``); then it must be a saved pipeline folder. A training run
folder (``config.yaml``, ``pipeline/``) is refused with the folder to load instead.
"""
from __future__ import annotations

import os

from ..card_data import looks_like_repo_id

__all__ = ["PIPELINE_INDEX", "is_local_reference", "check_pipeline_folder", "load_flow_pipeline"]

PIPELINE_INDEX = "model_index.json"


def is_local_reference(path: str) -> bool:
    """Whether ``path`` names a local folder (existing or mistyped) rather than a Hub repo id
    (:func:`flowlab.card_data.looks_like_repo_id`, negated)."""
    return not looks_like_repo_id(path)


def check_pipeline_folder(path: str) -> None:
    """Raise a clear error unless ``path`` is a saved pipeline folder (it holds ``model_index.json``).

    Raises:
        FileNotFoundError: ``no such folder: <path>``, or a folder without ``model_index.json``
            (with the hint ``<path>/pipeline`` when it is a training run folder).
    """
    if not os.path.isdir(path):
        what = "a file, not a pipeline folder" if os.path.exists(path) else "no such folder"
        raise FileNotFoundError(f"{what}: {path!r} (a saved pipeline folder with {PIPELINE_INDEX}, or a Hub repo id)")
    if os.path.isfile(os.path.join(path, PIPELINE_INDEX)):
        return
    run_pipeline = os.path.join(path, "pipeline")
    if os.path.isfile(os.path.join(path, "config.yaml")) or os.path.isdir(run_pipeline):
        raise FileNotFoundError(f"{path!r} is a training run folder, not a pipeline; load {run_pipeline!r}")
    raise FileNotFoundError(f"{path!r} holds no {PIPELINE_INDEX}: it is not a saved pipeline folder")


def load_flow_pipeline(reference: str, key: str):
    """The :class:`~flowlab.pipelines.FlowPipeline` saved at ``reference`` (a pipeline folder or a Hub repo
    id) that the config key ``key`` names (``model.pretrained``, ``rl.base``, ``reflow.teacher``).

    Raises:
        ConfigError: naming ``key`` and ``reference``: nothing there (with a hint to train it first when
            it is a missing local folder), a folder of something else, or a pipeline other than a
            ``FlowPipeline`` of a flowlab velocity model.
    """
    from ..errors import ConfigError
    from .flow_pipeline import FlowPipeline

    try:
        pipe = FlowPipeline.from_pretrained(reference)
    except (OSError, ValueError, KeyError, AttributeError) as e:  # no folder / repo, or a folder of something else
        path = os.path.expanduser(reference)
        missing = is_local_reference(path) and not os.path.exists(path)
        hint = " (train it first, e.g. python train.py --config configs/quickstart.yaml)" if missing else ""
        detail = f"its model_index.json lacks the key {e} (not a saved pipeline)" if isinstance(e, KeyError) else " ".join(str(e).split())
        raise ConfigError(f"{key}: cannot load a FlowPipeline from {reference!r}{hint}: {detail}") from None
    if not isinstance(pipe, FlowPipeline) or not hasattr(pipe.velocity_model, "sample_shape"):
        raise ConfigError(f"{key}: {reference!r} holds a {type(pipe).__name__}, not a FlowPipeline of a flowlab velocity model")
    return pipe
