"""WGF-based sampling and conservativity diagnostics.

* :class:`ProbabilityFlow`: any epsilon / x1 (``sample``) / ``v_prediction`` / score /
  velocity model as the probability-flow velocity of its forward process, sampled with
  flowlab's solvers (or the same-marginal SDE family, ``eta``), with log-likelihoods.
* :class:`DiscreteSchedulePath`: the affine path of a diffusers DDPM/DDIM beta schedule.
* :class:`WGFPipeline`: a diffusers ``UNet2DModel`` + ``DDPMScheduler`` sampled that way.
* :mod:`flowlab.wgf.diagnostics`: Jacobian asymmetry, planar curl, loop integrals and path
  dependence of a field, per time bin, with confidence intervals.
"""
from .flow import DIFFUSERS_PREDICTION_TYPES, ProbabilityFlow, diffusers_v_to_epsilon, diffusion_coefficient, sample_sde
from .schedule import DiscreteSchedulePath, diffusers_timestep_to_t, t_to_diffusers_timestep

__all__ = [
    "ProbabilityFlow",
    "DiscreteSchedulePath",
    "WGFPipeline",
    "DIFFUSERS_PREDICTION_TYPES",
    "diffusers_v_to_epsilon",
    "diffusion_coefficient",
    "sample_sde",
    "t_to_diffusers_timestep",
    "diffusers_timestep_to_t",
    "load_probability_flow",
]


def __getattr__(name):  # keep diffusers' pipeline machinery out of `import flowlab.wgf`
    if name == "WGFPipeline":
        from .pipeline import WGFPipeline

        return WGFPipeline
    if name == "load_probability_flow":
        from .loading import load_probability_flow

        return load_probability_flow
    raise AttributeError(f"module 'flowlab.wgf' has no attribute {name!r}")
