"""``FlowScheduler``: the sampling configuration a ``FlowPipeline`` is saved with.

It is a diffusers ``SchedulerMixin`` + ``ConfigMixin`` (saved as ``scheduler_config.json``)
that records how the model was trained (path, prediction type) and how to sample it by
default (solver, number of steps, time shift, guidance). It builds the flowlab time grid and
the solver, and reads the model as a velocity; the integration itself is done by
:func:`flowlab.flow.sampling.sample`.
"""
from __future__ import annotations

from diffusers import SchedulerMixin  # noqa: F401  (diffusers' loader looks for it in this namespace)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import Tensor

from ..flow.conventions import PREDICTION_T_EPS
from ..flow.parameterization import to_velocity
from ..flow.paths import AffinePath, get_path
from ..flow.solvers import AVERAGE_VELOCITY_SOLVERS, SOLVERS, Solver, get_solver, time_grid

__all__ = ["FlowScheduler"]


class FlowScheduler(SchedulerMixin, ConfigMixin):
    """Sampling configuration of a flow model (flowlab time: 0 = noise, 1 = data).

    Args:
        path: ``linear``, ``cosine`` or ``vp`` (the path the model was trained on).
        prediction_type: ``velocity``, ``x1`` or ``epsilon``.
        solver: default solver (``euler``, ``midpoint``, ``heun``, ``multistep``, ``dopri5``; ``meanflow``
            for a MeanFlow model).
        num_inference_steps: default number of solver steps.
        shift: SD3 time shift of the step grid (``> 1`` spends more steps near noise).
        guidance_scale: default classifier-free guidance weight.
        vp_beta_min, vp_beta_max: the VP path's beta schedule.
        rtol, atol: tolerances of ``dopri5``.
        mean_flow: the model is a MeanFlow average-velocity model ``u(x, t, r)``
            (:mod:`flowlab.flow.meanflow`): it samples in 1-2 steps with ``solver="meanflow"`` and, read
            at ``r = t``, is a velocity model for every other solver. Older saved schedulers load as ``False``.
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(
        self,
        path: str = "linear",
        prediction_type: str = "velocity",
        solver: str = "heun",
        num_inference_steps: int = 16,
        shift: float = 1.0,
        guidance_scale: float = 1.0,
        vp_beta_min: float = 0.1,
        vp_beta_max: float = 20.0,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        mean_flow: bool = False,
    ):
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
        if mean_flow and prediction_type != "velocity":
            raise ValueError(f"a MeanFlow model predicts an average velocity: prediction_type must be 'velocity', got {prediction_type!r}")
        self.check_solver(solver, mean_flow)
        get_path(path, **self._path_kwargs(path))  # validates the name
        self.timesteps: Tensor | None = None

    @staticmethod
    def check_solver(solver: str, mean_flow: bool) -> None:
        """Refuse an average-velocity solver (``meanflow``) for a model that is not a MeanFlow model."""
        if solver in AVERAGE_VELOCITY_SOLVERS and not mean_flow:
            raise ValueError(
                f"solver {solver!r} needs a MeanFlow (average-velocity) model, and this scheduler's model is a "
                f"plain velocity model (mean_flow=False); choose one of {sorted(set(SOLVERS) - AVERAGE_VELOCITY_SOLVERS)}"
            )

    @staticmethod
    def _path_kwargs(path: str, beta_min: float = 0.1, beta_max: float = 20.0) -> dict:
        return {"beta_min": beta_min, "beta_max": beta_max} if path == "vp" else {}

    @property
    def path(self) -> AffinePath:
        c = self.config
        return get_path(c.path, **self._path_kwargs(c.path, c.vp_beta_min, c.vp_beta_max))

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, shift: float | None = None) -> Tensor:
        """Set and return the flowlab time grid ``(num_inference_steps + 1,)`` from 0 (noise) to 1 (data)."""
        n = self.config.num_inference_steps if num_inference_steps is None else num_inference_steps
        self.timesteps = time_grid(n, shift=self.config.shift if shift is None else shift, device=device)
        return self.timesteps

    def make_solver(self, name: str | None = None) -> Solver:
        """The named solver (default: the scheduler's) with this scheduler's path and tolerances."""
        c = self.config
        name = name or c.solver
        self.check_solver(name, c.mean_flow)
        return get_solver(name, path=self.path, rtol=c.rtol, atol=c.atol)

    def to_velocity(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Model output in its prediction type -> velocity on the scheduler's path."""
        return to_velocity(self.path, model_output, x_t, t, self.config.prediction_type)

    def model_velocity(self, model, x: Tensor, t: Tensor, class_labels: Tensor | None = None, r: Tensor | None = None) -> Tensor:
        """``model(x, t, class_labels)`` read as a velocity ``(B, ...)`` at flowlab times ``t`` ``(B,)``.

        Velocity models are read as is; x1 / epsilon models at ``t`` clamped to
        ``[PREDICTION_T_EPS, 1 - PREDICTION_T_EPS]`` (see :data:`flowlab.flow.conventions.PREDICTION_T_EPS`).
        With ``r`` ``(B,)`` (MeanFlow models only): the average velocity ``u(x, t, r)`` over ``[t, r]``.
        """
        if r is not None:
            if not self.config.mean_flow:
                raise ValueError("an end time r was given, but this scheduler's model is not a MeanFlow model (mean_flow=False)")
            return model(x, t.to(x.dtype), class_labels, r=r.to(x.dtype))
        if self.config.prediction_type != "velocity":
            t = t.clamp(PREDICTION_T_EPS, 1 - PREDICTION_T_EPS)
        return self.to_velocity(model(x, t.to(x.dtype), class_labels), x, t)

    def __len__(self) -> int:
        return self.config.num_inference_steps
