"""``WGFPipeline``: sample a diffusers diffusion model (e.g. a DDPM ``UNet2DModel``) as a
probability-flow ODE (or the same-marginal SDE family) with flowlab's solvers."""
from __future__ import annotations

from typing import Sequence

import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from ..flow.likelihood import LikelihoodOutput
from ..pipelines.arguments import check_class_labels, check_finite, check_latents, check_output_type, check_positive_int, check_solver
from ..pipelines.flow_pipeline import FlowPipelineOutput, HubSnapshotMixin, postprocess
from .flow import DIFFUSERS_PREDICTION_TYPES, ProbabilityFlow

__all__ = ["WGFPipeline"]


class WGFPipeline(HubSnapshotMixin, DiffusionPipeline):
    """A diffusers model + its DDPM/DDIM scheduler, sampled in flowlab time (t=0 noise, t=1 data).

    The components have the names of diffusers' ``DDPMPipeline`` (``unet``, ``scheduler``), so
    ``WGFPipeline.from_pretrained(<a DDPMPipeline folder>)`` loads one. The scheduler only
    supplies the beta schedule (``alphas_cumprod``, see
    :class:`flowlab.wgf.schedule.DiscreteSchedulePath`) and ``prediction_type``
    (``epsilon``, ``sample``, ``v_prediction``); ``prediction_type="score"`` in the call reads
    the model as a score model.

    Example::

        pipe = WGFPipeline(unet=UNet2DModel(...), scheduler=DDPMScheduler(...))
        out = pipe(batch_size=16, num_inference_steps=20, solver="multistep", output_type="np")
        out = pipe(batch_size=16, num_inference_steps=200, solver="euler", eta=1.0)   # reverse SDE
        ll = pipe.log_likelihood(images_in_minus1_1).log_prob
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        c = self.unet.config
        if hasattr(c, "sample_shape"):
            return tuple(c.sample_shape)
        size = c.sample_size if isinstance(c.sample_size, (tuple, list)) else (c.sample_size, c.sample_size)
        return (c.in_channels, *size)

    def probability_flow(
        self, prediction_type: str | None = None, class_labels: Tensor | None = None, timestep_input: str = "continuous"
    ) -> ProbabilityFlow:
        """The :class:`ProbabilityFlow` (velocity, score, sampling, likelihood) of this pipeline's model."""
        return ProbabilityFlow.from_diffusers(self.unet, self.scheduler, prediction_type, timestep_input, class_labels)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 32,
        solver: str | None = None,
        eta: float = 0.0,
        shift: float = 1.0,
        class_labels: int | Sequence[int] | Tensor | None = None,
        prediction_type: str | None = None,
        timestep_input: str = "continuous",
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_trajectory: bool = False,
    ) -> FlowPipelineOutput | tuple:
        """Draw samples.

        Args:
            batch_size: number of samples (taken from ``latents`` or a list of ``class_labels`` when given).
            num_inference_steps: solver steps on the flowlab grid, ``>= 1`` (ignored by ``dopri5``).
            solver: ``euler``, ``midpoint``, ``heun``, ``multistep`` or ``dopri5``; default
                ``multistep`` (DPM-Solver++(2M), 1 NFE/step) for ``eta = 0``, ``euler``
                (Euler–Maruyama, the only choice) for ``eta > 0``.
            eta: 0 = probability-flow ODE, 1 = reverse-time SDE, in between: same marginals
                (:class:`flowlab.flow.sde.MarginalSDE`).
            shift: SD3 time shift of the grid, ``> 0`` (``> 1``: more steps near noise).
            class_labels: for class-conditional UNets (``model(..., class_labels=...)``): an int for
                every sample, or one label per sample (``< num_class_embeds`` when the UNet sets it).
            prediction_type: override the scheduler's (``epsilon``, ``sample``, ``v_prediction``, ``score``).
            output_type: ``pil``, ``np``, ``pt`` (images in [0, 1]) or ``latent`` (raw, model space).

        Raises:
            ValueError: any invalid argument, named with its value, before anything is sampled.
        """
        check_output_type(output_type)
        batch_size = check_positive_int("batch_size", batch_size)
        num_inference_steps = check_positive_int("num_inference_steps", num_inference_steps)
        eta = check_finite("eta", eta, minimum=0.0)
        solver = check_solver(solver or ("multistep" if eta == 0 else "euler"))
        if eta > 0 and solver != "euler":
            raise ValueError(f"solver must be 'euler' (Euler–Maruyama) for eta > 0, got {solver!r}")
        shift = check_finite("shift", shift, minimum=0.0, strict=True)
        if prediction_type is not None and prediction_type not in DIFFUSERS_PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {sorted(DIFFUSERS_PREDICTION_TYPES)} or None, got {prediction_type!r}")
        if timestep_input not in ("continuous", "discrete"):
            raise ValueError(f"timestep_input must be 'continuous' or 'discrete', got {timestep_input!r}")
        if latents is not None and torch.is_tensor(latents) and latents.ndim >= 1:
            batch_size = latents.shape[0]
        num_classes = getattr(self.unet.config, "num_class_embeds", None)
        class_labels, batch_size = check_class_labels(class_labels, batch_size, num_classes)
        if class_labels is not None:
            class_labels = class_labels.to(self.device)
        shape = (batch_size, *self.sample_shape)
        check_latents(latents, shape)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        flow = self.probability_flow(prediction_type, class_labels, timestep_input)
        out = flow.sample(latents.to(self.device), num_inference_steps, solver, eta=eta, shift=shift, generator=generator, return_trajectory=return_trajectory)
        images = postprocess(out.x, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return FlowPipelineOutput(images=images, nfe=out.nfe, trajectory=out.trajectory)

    def log_likelihood(
        self,
        images: Tensor,
        solver: str = "dopri5",
        num_steps: int = 64,
        estimator: str = "hutchinson",
        prediction_type: str | None = None,
        generator: torch.Generator | None = None,
    ) -> LikelihoodOutput:
        """``log p(images)`` (nats, model space ``[-1, 1]``) of the probability-flow ODE; Hutchinson by default."""
        flow = self.probability_flow(prediction_type)
        return flow.log_likelihood(images.to(self.device, self.unet.dtype), solver=solver, num_steps=num_steps, estimator=estimator, generator=generator)
