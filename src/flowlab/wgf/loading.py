"""Open a saved pipeline folder (flowlab ``FlowPipeline``, or a diffusers DDPM/DDIM/``WGFPipeline``)
as a :class:`~flowlab.wgf.flow.ProbabilityFlow`."""
from __future__ import annotations

import json
import os

from .flow import ProbabilityFlow

__all__ = ["load_probability_flow"]


def load_probability_flow(path: str, prediction_type: str | None = None) -> tuple[ProbabilityFlow, tuple[int, ...], object]:
    """``(flow, sample_shape, pipeline)`` for the pipeline saved in ``path``.

    A ``FlowPipeline`` folder is read through its scheduler's path and prediction type; any
    other ``model_index.json`` with ``unet`` + ``scheduler`` components (``DDPMPipeline``,
    ``DDIMPipeline``, ``WGFPipeline``) through :class:`~flowlab.wgf.pipeline.WGFPipeline`.

    Raises:
        FileNotFoundError: ``no such folder: <path>``, or a folder that is no pipeline (for a
            training run folder, with the hint to load ``<run>/pipeline``).
    """
    from ..pipelines.loading import PIPELINE_INDEX, check_pipeline_folder

    path = os.path.expanduser(path)
    check_pipeline_folder(path)
    index = os.path.join(path, PIPELINE_INDEX)
    with open(index) as f:
        cls_name = json.load(f).get("_class_name")
    if cls_name == "FlowPipeline":
        from ..pipelines import FlowPipeline

        pipe = FlowPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        return ProbabilityFlow.from_flow_pipeline(pipe), tuple(pipe.velocity_model.sample_shape), pipe
    from .pipeline import WGFPipeline

    pipe = WGFPipeline.from_pretrained(path)
    return pipe.probability_flow(prediction_type), pipe.sample_shape, pipe
