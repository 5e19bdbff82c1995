"""Where a pipeline is loaded from: a local pipeline folder, or a Hub repo id.

``from_pretrained`` of flowlab's pipelines takes either. The argument is read as a **local
path** when it exists, when it is not a valid Hub repo id (``name`` or ``owner/name``), or when
its first component is an existing local folder (``runs/quickstrt`` is a typo of a local path,
not a Hub repo of the user ``runs``); then it must be a saved pipeline folder. A training run
folder (``config.yaml``, ``pipeline/``) is refused with the folder to load instead.
"""
from __future__ import annotations

import os

__all__ = ["PIPELINE_INDEX", "is_local_reference", "check_pipeline_folder"]

PIPELINE_INDEX = "model_index.json"


def is_local_reference(path: str) -> bool:
    """Whether ``path`` names a local folder (existing or mistyped) rather than a Hub repo id."""
    if os.path.exists(path):
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return True
    if path.startswith((".", "~")) or os.path.isabs(path):
        return True
    head = path.split("/", 1)[0]
    return "/" in path and os.path.isdir(head)


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
