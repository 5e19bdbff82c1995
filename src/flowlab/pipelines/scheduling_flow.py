"""``FlowScheduler``: the sampling configuration a ``FlowPipeline`` is saved with.

It is a diffusers ``SchedulerMixin`` + ``ConfigMixin`` (saved as ``scheduler_config.json``)
that records how the model was trained (path, prediction type) and how to sample it by
default (solver, number of steps, time shift, guidance). It builds the flowlab time grid
and converts model outputs to velocities; the integration itself is done by
:mod:`flowlab.flow.solvers`.
"""
from __future__ import annotations

from diffusers import SchedulerMixin  # noqa: F401  (diffusers' loader looks for it in this namespace)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import Tensor

from ..flow.parameterization import to_velocity
from ..flow.paths import AffinePath, get_path
from ..flow.solvers import SOLVERS, Solver, get_solver, time_grid

__all__ = ["FlowScheduler"]


class FlowScheduler(SchedulerMixin, ConfigMixin):
    """Sampling configuration of a flow model (flowlab time: 0 = noise, 1 = data).

    Args:
        path: ``linear``, ``cosine`` or ``vp`` (the path the model was trained on).
        prediction_type: ``velocity``, ``x1`` or ``epsilon``.
        solver: default solver (``euler``, ``midpoint``, ``heun``, ``multistep``, ``dopri5``).
        num_inference_steps: default number of solver steps.
        shift: SD3 time shift of the step grid (``> 1`` spends more steps near noise).
        guidance_scale: default classifier-free guidance weight.
        vp_beta_min, vp_beta_max: the VP path's beta schedule.
        rtol, atol: tolerances of ``dopri5``.
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
    ):
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
        get_path(path, **self._path_kwargs(path))  # validates the name
        self.timesteps: Tensor | None = None

    @staticmethod
    def _path_kwargs(path: str, beta_min: float = 0.1, beta_max: float = 20.0) -> dict:
        return {"beta_min": beta_min, "beta_max": beta_max} if path == "vp" else {}

    @property
    def path(self) -> AffinePath:
        c = self.config
        return get_path(c.path, **self._path_kwargs(c.path, c.vp_beta_min, c.vp_beta_max))

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, shift: float | None = None) -> Tensor:
        """Set and return the flowlab time grid ``(num_inference_steps + 1,)`` from 0 (noise) to 1 (data)."""
        n = num_inference_steps or self.config.num_inference_steps
        self.timesteps = time_grid(n, shift=self.config.shift if shift is None else shift, device=device)
        return self.timesteps

    def make_solver(self, name: str | None = None) -> Solver:
        name = name or self.config.solver
        if name == "dopri5":
            return get_solver(name, rtol=self.config.rtol, atol=self.config.atol)
        return get_solver(name, path=self.path)

    def to_velocity(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Model output in its prediction type -> velocity on the scheduler's path."""
        return to_velocity(self.path, model_output, x_t, t, self.config.prediction_type)

    def __len__(self) -> int:
        return self.config.num_inference_steps
