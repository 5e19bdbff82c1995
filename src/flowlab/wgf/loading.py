"""Open a saved pipeline (flowlab ``FlowPipeline``, a diffusers DDPM/DDIM/``WGFPipeline``, or a
text-to-image family: ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``FluxPipeline``)
as a :class:`~flowlab.wgf.flow.ProbabilityFlow`."""
from __future__ import annotations

import json
import os
from typing import Sequence

from .flow import ProbabilityFlow

__all__ = ["load_probability_flow", "FAMILY_PIPELINES"]

#: diffusers pipeline class -> flowlab model family (:mod:`flowlab.families`)
FAMILY_PIPELINES = {"StableDiffusionPipeline": "sd_unet", "StableDiffusionXLPipeline": "sd_unet", "FluxPipeline": "flux",
                    "StableDiffusion3Pipeline": "sd3"}


def load_probability_flow(
    path: str,
    prediction_type: str | None = None,
    prompts: Sequence[str] | None = None,
    guidance_scale: float | None = None,
    resolution: int | None = None,
) -> tuple[ProbabilityFlow, tuple[int, ...], object]:
    """``(flow, sample_shape, pipeline_or_adapter)`` for the pipeline saved in ``path``.

    A ``FlowPipeline`` folder is read through its scheduler's path and prediction type; a
    text-to-image family (``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` / ``FluxPipeline``,
    a folder or a Hub id) through its :mod:`flowlab.families` adapter with ``prompts`` (required),
    ``guidance_scale`` (CFG, or FLUX's guidance embedding; ``None``: the family's default) and
    ``resolution`` (``None``: the family's default), the third item then being the adapter (its
    ``decode`` turns latents into images); any other ``model_index.json`` with ``unet`` + ``scheduler``
    (``DDPMPipeline``, ``DDIMPipeline``, ``WGFPipeline``) through :class:`~flowlab.wgf.pipeline.WGFPipeline`.

    Raises:
        FileNotFoundError: ``no such folder: <path>``, or a folder that is no pipeline (for a
            training run folder, with the hint to load ``<run>/pipeline``).
        ValueError: ``prompts`` missing for a text-to-image pipeline, or given for one without text.
    """
    from ..pipelines.loading import PIPELINE_INDEX, check_pipeline_folder, is_local_reference

    path = os.path.expanduser(path)
    if is_local_reference(path):
        check_pipeline_folder(path)
        with open(os.path.join(path, PIPELINE_INDEX)) as f:
            cls_name = json.load(f).get("_class_name")
    else:  # a Hub id: only text-to-image families are read from the Hub here
        from diffusers import DiffusionPipeline

        cls_name = DiffusionPipeline.load_config(path).get("_class_name")
    if cls_name in FAMILY_PIPELINES:
        if not prompts:
            raise ValueError(f"prompts: the {cls_name} at {path} is a text-to-image model; give at least one prompt")
        from ..families import load_family

        extra = {} if resolution is None else {"resolution": int(resolution)}
        if prediction_type is not None and FAMILY_PIPELINES[cls_name] == "sd_unet":
            extra["prediction_type"] = prediction_type
        adapter = load_family(FAMILY_PIPELINES[cls_name], path, key="pipeline", dtype="float32", **extra)
        return ProbabilityFlow.from_family(adapter, list(prompts), guidance_scale), tuple(adapter.sample_shape), adapter
    if prompts:
        raise ValueError(f"prompts: the {cls_name} at {path} takes no text; leave prompts empty")
    if cls_name == "FlowPipeline":
        from ..pipelines import FlowPipeline

        pipe = FlowPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        return ProbabilityFlow.from_flow_pipeline(pipe), tuple(pipe.velocity_model.sample_shape), pipe
    from .pipeline import WGFPipeline

    pipe = WGFPipeline.from_pretrained(path)
    return pipe.probability_flow(prediction_type), pipe.sample_shape, pipe
