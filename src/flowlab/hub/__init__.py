"""Model cards and publishing a trained run to the Hugging Face Hub.

=====================================  ================================================================
module                                 what
=====================================  ================================================================
:mod:`flowlab.card_data`               what a recipe says about its artefact (usage, tags, pipeline
                                       tag, ...), saved by the trainer as ``<output_dir>/card.json``
:mod:`flowlab.hub.card`                the model card (``huggingface_hub.ModelCard``) built from it
:mod:`flowlab.hub.push`                :func:`push_to_hub`: plan the files, push as one commit, retry
:mod:`flowlab.hub.redaction`           scrubbing tokens and secrets from cards, configs, errors, logs
=====================================  ================================================================

This package imports nothing from flowlab above :mod:`flowlab.errors` and :mod:`flowlab.fileio`:
publishing a run reads its folder and never imports, builds or inspects a recipe. See docs/hub.md.
"""
from ..errors import HubError
from .card import DEFAULT_LICENSE, LIBRARY_TAG, build_model_card, final_metrics
from ..card_data import CARD_DATA_FILE, REPO_ID, CardData, flow_pipeline_card_data, looks_like_repo_id, read_card_data, write_card_data
from .push import TRANSIENT_STATUS, PushFile, PushResult, plan_push, push_to_hub
from .redaction import REDACTED, redact_secrets, scrub_token

__all__ = [
    "HubError",
    "PushFile",
    "PushResult",
    "DEFAULT_LICENSE",
    "LIBRARY_TAG",
    "TRANSIENT_STATUS",
    "CARD_DATA_FILE",
    "REPO_ID",
    "CardData",
    "push_to_hub",
    "plan_push",
    "build_model_card",
    "final_metrics",
    "write_card_data",
    "read_card_data",
    "looks_like_repo_id",
    "flow_pipeline_card_data",
    "redact_secrets",
    "scrub_token",
    "REDACTED",
]
