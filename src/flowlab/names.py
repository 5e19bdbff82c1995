"""Names that configs choose from, in a module light enough for config validation (no torch).

The modules that implement them (:data:`flowlab.flow.solvers.SOLVERS`, :data:`flowlab.data.TOY2D`)
are heavier; ``tests/test_config.py`` checks that the two lists agree.
"""
from __future__ import annotations

__all__ = ["SOLVER_NAMES", "TOY2D_NAMES"]

#: The core ODE solvers (keys of :data:`flowlab.flow.solvers.SOLVERS`).
SOLVER_NAMES = ("euler", "midpoint", "heun", "multistep", "dopri5")
#: The 2-D toy distributions (:data:`flowlab.data.TOY2D`).
TOY2D_NAMES = ("moons", "8gaussians", "checkerboard")
