"""``FlowPipeline``: sample a flowlab velocity model like any diffusers pipeline."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from .. import models as _models  # noqa: F401  (diffusers' loader needs the component modules imported)
from ..flow.guidance import guided_field
from ..flow.sampling import sample
from .arguments import OUTPUT_TYPES, check_class_labels, check_finite, check_latents, check_output_type, check_positive_int, check_solver
from .loading import check_pipeline_folder, is_local_reference
from .scheduling_flow import FlowScheduler

__all__ = ["FlowPipeline", "FlowPipelineOutput", "HubSnapshotMixin", "OUTPUT_TYPES", "check_output_type", "postprocess"]


def postprocess(x: Tensor, output_type: str, is_image: bool = True):
    """Model-space samples -> the requested output: images in [0, 1] as a tensor ``(B, C, H, W)``
    (``pt``), numpy ``(B, H, W, C)`` (``np``) or PIL images (``pil``); ``latent`` and vector
    samples are returned as drawn (numpy for ``np``)."""
    if output_type != "latent" and is_image:
        x = ((x.float() + 1) / 2).clamp(0, 1)
    if output_type not in ("np", "pil"):
        return x
    arr = x.float().cpu().numpy()
    if is_image:
        arr = arr.transpose(0, 2, 3, 1)
    return FlowPipeline.numpy_to_pil(arr) if output_type == "pil" else arr


class HubSnapshotMixin:
    """``from_pretrained`` that also takes a Hub repo id for pipelines whose components live outside
    diffusers: diffusers' Hub download path only accepts components from diffusers / transformers
    modules, while loading from a local folder imports flowlab's. So a repo id is first downloaded
    with ``huggingface_hub.snapshot_download`` (honouring ``revision``, ``token``, ``cache_dir``,
    ``local_files_only`` and ``HF_HUB_OFFLINE``), then loaded from the snapshot folder."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a saved pipeline folder or a Hub repo id (see :mod:`flowlab.pipelines.loading`).

        Raises:
            FileNotFoundError: a local path that is no pipeline folder: ``no such folder: <path>``,
                or, for a training run folder, the hint to load ``<run>/pipeline``.
        """
        path = os.path.expanduser(str(pretrained_model_name_or_path))
        if is_local_reference(path):
            check_pipeline_folder(path)
        else:
            from huggingface_hub import snapshot_download

            path = snapshot_download(
                path,
                revision=kwargs.pop("revision", None),
                token=kwargs.pop("token", None),
                cache_dir=kwargs.pop("cache_dir", None),
                local_files_only=kwargs.pop("local_files_only", False),
            )
        return super().from_pretrained(path, **kwargs)


@dataclass
class FlowPipelineOutput(ImagePipelineOutput):
    """``images``: PIL list, numpy ``(B, H, W, C)`` in [0, 1], or tensor ``(B, C, H, W)`` in [0, 1]
    (vector models: ``(B, D)`` samples as drawn). ``nfe``: network evaluations used.
    ``trajectory``: states at every grid time (model space), when asked for."""

    nfe: int = 0
    trajectory: list | None = None


class FlowPipeline(HubSnapshotMixin, DiffusionPipeline):
    """Sample a velocity model by integrating ``dx/dt = v(x, t)`` from noise (t=0) to data (t=1).

    Components:
        velocity_model: a flowlab velocity network (``MLPVelocity``, ``UNetVelocity``, ``DiTVelocity``)
            taking ``(x, t, class_labels)``.
        scheduler: a :class:`FlowScheduler` with the path, prediction type and sampling defaults.

    Example::

        pipe = FlowPipeline.from_pretrained("runs/quickstart/pipeline")
        out = pipe(batch_size=64, num_inference_steps=8, solver="heun",
                   generator=torch.Generator().manual_seed(0), output_type="np")
    """

    model_cpu_offload_seq = "velocity_model"

    def __init__(self, velocity_model, scheduler: FlowScheduler):
        super().__init__()
        self.register_modules(velocity_model=velocity_model, scheduler=scheduler)

    @property
    def is_image_model(self) -> bool:
        return len(self.velocity_model.sample_shape) == 3

    def velocity_field(self, class_labels: Tensor | None = None, guidance_scale: float = 1.0):
        """The (guided) velocity ``(x, t) -> v`` of this pipeline's model, in flowlab time; for a MeanFlow
        model also callable as the average velocity ``(x, t, r) -> u``."""
        model = self.velocity_model
        sched = self.scheduler

        def model_fn(x, t, labels, r=None):  # r: MeanFlow's step end (solver "meanflow")
            return sched.model_velocity(model, x, t, labels, r)

        return guided_field(model_fn, class_labels, guidance_scale, model.null_label)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int | None = None,
        solver: str | None = None,
        shift: float | None = None,
        class_labels: int | Sequence[int] | Tensor | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_trajectory: bool = False,
    ) -> FlowPipelineOutput | tuple:
        """Draw samples.

        Args:
            batch_size: number of samples (taken from ``latents`` or a list of ``class_labels`` when left at 1).
            num_inference_steps: solver steps, ``>= 1`` (default: the scheduler's); ignored by ``dopri5``.
                A MeanFlow model samples in 1 or 2 steps with ``solver="meanflow"`` (1 NFE per step).
            solver: ``euler``, ``midpoint``, ``heun``, ``multistep`` or ``dopri5`` (default: the scheduler's);
                ``meanflow`` for a MeanFlow model (scheduler ``mean_flow=True``).
            shift: SD3 time shift of the step grid, ``> 0`` (default: the scheduler's).
            class_labels: an int for every sample, or one label per sample (class-conditional models).
            guidance_scale: classifier-free guidance weight (1 = plain conditional sampling).
            generator: RNG(s) for the initial noise.
            latents: initial noise ``(B, *sample_shape)`` instead of drawing it.
            output_type: ``pil``, ``np`` or ``pt`` (images in [0, 1]); vector models return raw samples.
            return_trajectory: also return the states at every grid time.

        Raises:
            ValueError: any invalid argument, named with its value, before anything is sampled.
        """
        sched = self.scheduler.config
        check_output_type(output_type, self.is_image_model)
        batch_size = check_positive_int("batch_size", batch_size)
        steps = check_positive_int("num_inference_steps", sched.num_inference_steps if num_inference_steps is None else num_inference_steps)
        solver = check_solver(sched.solver if solver is None else solver)
        self.scheduler.check_solver(solver, sched.mean_flow)
        shift = check_finite("shift", sched.shift if shift is None else shift, minimum=0.0, strict=True)
        guidance_scale = check_finite("guidance_scale", sched.guidance_scale if guidance_scale is None else guidance_scale)
        if latents is not None and torch.is_tensor(latents) and latents.ndim >= 1 and batch_size == 1:
            batch_size = latents.shape[0]
        labels, batch_size = check_class_labels(class_labels, batch_size, self.velocity_model.num_classes)
        if labels is not None:
            labels = labels.to(self.device)
        if guidance_scale != 1.0 and labels is None:
            raise ValueError("guidance_scale != 1 needs class_labels (classifier-free guidance of a class-conditional model)")
        dtype = self.velocity_model.dtype
        shape = (batch_size, *self.velocity_model.sample_shape)
        check_latents(latents, shape)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        latents = latents.to(self.device, dtype)

        solver_obj = self.scheduler.make_solver(solver)
        times = self.scheduler.set_timesteps(steps, device=self.device, shift=shift)
        field = self.velocity_field(labels, guidance_scale)
        expected = None if solver_obj.name == "dopri5" else solver_obj.nfe_per_step * (len(times) - 1)
        with self._nfe_bar(expected) as bar:

            def counted(x, t, *times):
                v = field(x, t, *times)
                bar.update()
                return v

            out = sample(counted, latents, solver=solver_obj, times=times, return_trajectory=return_trajectory)

        images = postprocess(out.x, output_type, self.is_image_model)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return FlowPipelineOutput(images=images, nfe=out.nfe, trajectory=out.trajectory)

    def _nfe_bar(self, total: int | None):
        """A progress bar counting network evaluations (no total for the adaptive dopri5)."""
        if total is not None:
            return self.progress_bar(total=total)
        from tqdm.auto import tqdm

        config = dict(getattr(self, "_progress_bar_config", {}))
        dist = torch.distributed
        config.setdefault("disable", dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)
        return tqdm(total=None, unit="nfe", **config)

    @staticmethod
    def numpy_to_pil(images: np.ndarray):
        from PIL import Image

        images = (images * 255).round().astype("uint8")
        if images.shape[-1] == 1:
            return [Image.fromarray(img[..., 0], mode="L") for img in images]
        return [Image.fromarray(img) for img in images]
