"""Any diffusion or flow model as the velocity field of its forward process's probability-flow ODE.

The forward (noising) process of an affine Gaussian path ``x_t = alpha_t x1 + sigma_t x0``
moves densities along the Wasserstein gradient flow whose velocity, in flowlab time
(``t = 0`` noise, ``t = 1`` data), is

    v(x, t) = (alpha'/alpha) x + (g^2 / 2) grad log p_t(x),
    g^2(t)  = 2 sigma (sigma alpha'/alpha - sigma')          (the forward SDE's diffusion)

and generation integrates ``dx/dt = v`` from noise to data (the probability-flow ODE). A
model that predicts epsilon, x1 (diffusers ``sample``), diffusers ``v_prediction``, the
score or the velocity gives ``v`` through the core converter table
(:func:`flowlab.flow.parameterization.convert`). :class:`ProbabilityFlow` holds such a
model and its path and offers

* :meth:`ProbabilityFlow.sample`: any flowlab solver (``euler``, ``midpoint``, ``heun``,
  ``multistep``, ``dopri5``) at any step count, or with ``eta > 0`` the stochastic family
  with the same marginals (Euler–Maruyama on
  ``dx = [v + (eta^2 / 2) g^2 score] dt + eta g dW``; ``eta = 1`` is the reverse-time SDE),
  both through :func:`flowlab.flow.sampling.sample`; the family is
  :class:`flowlab.flow.sde.MarginalSDE`, the same one FlowGRPO samples (``noise_level = sqrt(2) eta``
  on the linear path);
* :meth:`ProbabilityFlow.log_likelihood`: exact or Hutchinson log-likelihoods of the
  field (through :func:`flowlab.flow.likelihood.log_likelihood`).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..flow.conventions import PREDICTION_T_EPS
from ..flow.discrete import DIFFUSERS_PREDICTION_TYPES, DiscreteSchedulePath, diffusers_v_to_epsilon
from ..flow.likelihood import LikelihoodOutput, log_likelihood
from ..flow.parameterization import PREDICTION_TYPES, convert
from ..flow.paths import AffinePath
from ..flow.sampling import SampleOutput, sample
from ..flow.sde import MarginalSDE, diffusion_coefficient

__all__ = [
    "ProbabilityFlow",
    "DIFFUSERS_PREDICTION_TYPES",
    "diffusion_coefficient",
    "diffusers_v_to_epsilon",
    "sample_sde",
]

_ALL_KINDS = (*PREDICTION_TYPES, "sample", "v_prediction")


class ProbabilityFlow:
    """A model read as the probability-flow velocity of its path.

    Args:
        predict: ``(x, t) -> prediction`` with ``x`` ``(B, ...)`` and flowlab times ``t`` ``(B,)``.
        path: the affine path the model was trained on (e.g. :class:`DiscreteSchedulePath`).
        prediction_type: what ``predict`` returns: ``velocity``, ``x1``, ``epsilon``, ``score``,
            or diffusers' names ``sample`` (= ``x1``) and ``v_prediction``.
        t_range: the model is evaluated (and its output converted) at ``t`` clamped to this
            range: diffusers models were never trained below timestep 0, i.e. above
            ``t = 1 - 1/N``, and x1/epsilon/score predictions carry no velocity where
            ``sigma_t = 0``.

    Example::

        flow = ProbabilityFlow.from_diffusers(unet, DDPMScheduler(...))
        x = flow.sample(torch.randn(16, 3, 32, 32), num_inference_steps=20, solver="multistep").x
    """

    def __init__(
        self,
        predict: Callable[[Tensor, Tensor], Tensor],
        path: AffinePath,
        prediction_type: str = "velocity",
        t_range: tuple[float, float] = (0.0, 1.0),
    ):
        if prediction_type not in _ALL_KINDS:
            raise ValueError(f"unknown prediction type {prediction_type!r}; choose one of {_ALL_KINDS}")
        self.predict_fn, self.path = predict, path
        self.prediction_type = {"sample": "x1"}.get(prediction_type, prediction_type)
        self.t_range = (float(t_range[0]), float(t_range[1]))

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_diffusers(
        cls,
        model,
        scheduler,
        prediction_type: str | None = None,
        timestep_input: str = "continuous",
        class_labels: Tensor | None = None,
    ) -> "ProbabilityFlow":
        """A diffusers model (e.g. ``UNet2DModel``) with its ``DDPMScheduler``/``DDIMScheduler``.

        Args:
            model: ``model(x, timestep, ...)`` returning a tensor or an object with ``.sample``.
            scheduler: anything with ``alphas_cumprod`` and ``config.prediction_type``.
            prediction_type: ``epsilon``, ``sample``, ``v_prediction`` or ``score``
                (default: the scheduler's).
            timestep_input: ``continuous`` passes the fractional timestep ``u(t)`` (UNet2DModel's
                sinusoidal embedding takes floats); ``discrete`` rounds it to the nearest integer
                (models that look timesteps up in a table).
            class_labels: passed through as ``model(..., class_labels=...)`` when given.
        """
        if timestep_input not in ("continuous", "discrete"):
            raise ValueError(f"timestep_input must be 'continuous' or 'discrete', got {timestep_input!r}")
        kind = prediction_type or scheduler.config.prediction_type
        if kind not in DIFFUSERS_PREDICTION_TYPES:
            raise ValueError(f"unknown diffusers prediction_type {kind!r}; choose one of {sorted(DIFFUSERS_PREDICTION_TYPES)}")
        path = DiscreteSchedulePath.from_scheduler(scheduler)
        n = path.num_train_timesteps

        def predict(x: Tensor, t: Tensor) -> Tensor:
            u = path.timestep(t.to(torch.float64)).clamp(0, n - 1)
            if timestep_input == "discrete":
                u = u.round()
            kwargs = {} if class_labels is None else {"class_labels": class_labels}
            out = model(x, u.to(x.dtype), **kwargs)
            return getattr(out, "sample", out)

        return cls(predict, path, kind, t_range=(0.0, 1.0 - 1.0 / n))

    @classmethod
    def from_flow_pipeline(cls, pipe, class_labels: Tensor | None = None, guidance_scale: float = 1.0) -> "ProbabilityFlow":
        """A flowlab ``FlowPipeline`` (its model, path and prediction type; guidance included)."""
        field = pipe.velocity_field(class_labels, guidance_scale)  # converts to velocity, clamps t
        t_range = (0.0, 1.0) if pipe.scheduler.config.prediction_type == "velocity" else (PREDICTION_T_EPS, 1 - PREDICTION_T_EPS)
        return cls(field, pipe.scheduler.path, "velocity", t_range=t_range)

    @classmethod
    def from_family(cls, adapter, prompts: Sequence[str | None], guidance_scale: float | None = None) -> "ProbabilityFlow":
        """A diffusers model family with text conditioning (:class:`flowlab.families.FamilyAdapter`,
        e.g. ``UNetAdapter`` for SD1.5/2.1/SDXL, ``FluxAdapter`` for FLUX.1).

        Args:
            adapter: the family adapter (components, path, prediction type, guidance).
            prompts: one prompt for every sample, or one per sample (sample ``i`` takes prompt
                ``i % len(prompts)``, so batches tiled by the diagnostics keep their prompts);
                encoded once, through the adapter's cache.
            guidance_scale: classifier-free guidance against the negative prompt (SD UNets) or the
                guidance embedding (FLUX.1-dev); ``None``: the adapter's default; ``1.0``: none (CFG).

        The flow works on the family's *unpacked* latents ``(B, *adapter.sample_shape)``; decode
        samples with ``adapter.decode``. Example::

            adapter = UNetAdapter.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
            flow = ProbabilityFlow.from_family(adapter, ["a photo of a cat"], guidance_scale=7.5)
            x = flow.sample(torch.randn(4, *adapter.sample_shape), num_inference_steps=25, solver="multistep").x
            images = adapter.decode(x)
        """
        cond = adapter.encode(list(prompts))

        def predict(x: Tensor, t: Tensor) -> Tensor:
            return adapter.predict(x, t, cond, guidance_scale)

        return cls(predict, adapter.path, adapter.prediction_type, t_range=adapter.t_range)

    # ------------------------------------------------------------------ fields

    def _clamp(self, t: Tensor) -> Tensor:
        return t.clamp(*self.t_range)

    def _raw(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, str]:
        if not torch.is_tensor(t) or t.ndim == 0:
            t = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
        t = self._clamp(t.to(x.dtype))
        pred = self.predict_fn(x, t)
        kind = self.prediction_type
        if kind == "v_prediction":
            pred, kind = diffusers_v_to_epsilon(self.path, pred, x, t), "epsilon"
        return pred, t, kind

    def predict(self, x: Tensor, t: Tensor, kind: str = "velocity") -> Tensor:
        """The model's prediction at ``(x, t)`` converted to ``kind`` (``velocity``, ``x1``, ``epsilon``, ``score``)."""
        pred, t, src = self._raw(x, t)
        return convert(self.path, pred, x, t, src, kind)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        """Probability-flow velocity ``v(x, t)`` in flowlab time."""
        return self.predict(x, t, "velocity")

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """The implied score ``grad log p_t(x)``."""
        return self.predict(x, t, "score")

    def epsilon(self, x: Tensor, t: Tensor) -> Tensor:
        """The implied noise prediction ``-sigma_t * score``."""
        return self.predict(x, t, "epsilon")

    def x1(self, x: Tensor, t: Tensor) -> Tensor:
        """The implied data prediction ``E[x1 | x_t = x]``."""
        return self.predict(x, t, "x1")

    __call__ = velocity

    def velocity_and_score(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Both from one model evaluation."""
        pred, tc, src = self._raw(x, t)
        return convert(self.path, pred, x, tc, src, "velocity"), convert(self.path, pred, x, tc, src, "score")

    # ------------------------------------------------------------------ sampling, likelihood

    def sample(
        self,
        x: Tensor,
        num_inference_steps: int = 32,
        solver: str = "heun",
        eta: float = 0.0,
        shift: float = 1.0,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        rtol: float = 1e-5,
        atol: float = 1e-5,
    ) -> SampleOutput:
        """Integrate from noise ``x`` at ``t = 0`` to data at ``t = 1`` (:func:`flowlab.flow.sampling.sample`).

        ``eta = 0``: the probability-flow ODE with the named solver (``multistep`` is
        DPM-Solver++(2M) on this path; its first-order step is exactly DDIM(eta=0)).
        ``eta > 0``: Euler–Maruyama on the stochastic family with the same marginals
        (``solver`` must then be ``euler``); see :class:`flowlab.flow.sde.MarginalSDE`.
        """
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        sde = MarginalSDE.from_eta(self.path, eta) if eta > 0 else None
        return sample(
            self.velocity, x, solver=solver, num_steps=num_inference_steps, shift=shift, path=self.path, rtol=rtol, atol=atol,
            sde=sde, generator=generator, return_trajectory=return_trajectory,
        )

    def log_likelihood(
        self,
        x_1: Tensor,
        solver: str = "dopri5",
        num_steps: int = 64,
        estimator: str = "exact",
        generator: torch.Generator | None = None,
    ) -> LikelihoodOutput:
        """``log p_1(x_1)`` of the probability-flow ODE under an ``N(0, I)`` source at ``t = 0``
        (:func:`flowlab.flow.likelihood.log_likelihood` on :meth:`velocity`)."""
        return log_likelihood(self.velocity, x_1, solver=solver, num_steps=num_steps, estimator=estimator, generator=generator)


def sample_sde(
    flow: ProbabilityFlow,
    x: Tensor,
    times: Tensor,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
) -> SampleOutput:
    """Euler–Maruyama on ``dx = [v + (eta^2/2) g^2 score] dt + eta g dW`` along increasing ``times``:
    :func:`flowlab.flow.sampling.sample` with ``MarginalSDE.from_eta(flow.path, eta)``.

    Every ``eta >= 0`` has the marginals ``p_t`` of the probability-flow ODE; ``eta = 1`` is the
    reverse-time SDE of the forward process. No noise is added on the last step (the output is
    the mean), and the step is deterministic where ``alpha_t = 0`` (``g`` is infinite there, e.g.
    at ``t = 0`` on the linear path). Euler–Maruyama needs ``g^2 h`` small: use more steps for
    larger ``eta`` (one network evaluation per step).
    """
    return sample(flow.velocity, x, times=times, sde=MarginalSDE.from_eta(flow.path, eta), generator=generator, return_trajectory=return_trajectory)
