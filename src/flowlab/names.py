"""Names that configs choose from, in a module light enough for config validation (no torch).

The modules that implement them (:data:`flowlab.flow.solvers.SOLVERS`, :data:`flowlab.data.TOY2D`)
are heavier; ``tests/test_config.py`` checks that the two lists agree.
"""
from __future__ import annotations

__all__ = ["SOLVER_NAMES", "ODE_SOLVER_NAMES", "AVERAGE_VELOCITY_SOLVER_NAMES", "TOY2D_NAMES"]

#: The core solvers (keys of :data:`flowlab.flow.solvers.SOLVERS`).
SOLVER_NAMES = ("euler", "midpoint", "heun", "multistep", "dopri5", "meanflow")
#: Solvers of an average-velocity (MeanFlow) model ``u(x, t, r)``; the others integrate a velocity field.
AVERAGE_VELOCITY_SOLVER_NAMES = ("meanflow",)
#: Solvers of a velocity field (the ODE solvers).
ODE_SOLVER_NAMES = tuple(s for s in SOLVER_NAMES if s not in AVERAGE_VELOCITY_SOLVER_NAMES)
#: The 2-D toy distributions (:data:`flowlab.data.TOY2D`).
TOY2D_NAMES = ("moons", "8gaussians", "checkerboard")
