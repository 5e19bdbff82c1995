"""Re-export: the affine path of a diffusers beta schedule moved to :mod:`flowlab.flow.discrete` (core maths,
shared by the model families and WGF). ``from flowlab.wgf.schedule import DiscreteSchedulePath`` keeps working."""
from ..flow.discrete import DiscreteSchedulePath, diffusers_timestep_to_t, t_to_diffusers_timestep

__all__ = ["DiscreteSchedulePath", "t_to_diffusers_timestep", "diffusers_timestep_to_t"]
