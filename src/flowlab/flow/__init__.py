"""The flow-matching core: paths, parameterisations, time samplers, couplings, losses,
solvers, the same-marginal SDE family, the one sampling entry (:func:`sample`), guidance and
likelihoods. Time convention: ``t = 0`` noise, ``t = 1`` data."""
from .conventions import (
    PREDICTION_T_EPS,
    diffusers_to_velocity,
    shift_sigma,
    shift_t,
    sigma_to_t,
    t_to_sigma,
    t_to_timestep,
    timestep_to_t,
    velocity_to_diffusers,
)
from .couplings import Coupling, IndependentCoupling, MinibatchOTCoupling, build_coupling
from .discrete import DIFFUSERS_PREDICTION_TYPES, DiscreteSchedulePath, diffusers_v_to_epsilon
from .guidance import guided_field
from .likelihood import LikelihoodOutput, divergence, gaussian_log_density, log_likelihood
from .losses import FlowMatchingLoss, LossOutput
from .parameterization import PREDICTION_TYPES, convert, to_epsilon, to_score, to_velocity, to_x1
from .meanflow import AverageVelocityFn, MeanFlowGuidance, MeanFlowLoss, MeanFlowLossOutput, meanflow_target, sample_time_pairs
from .paths import PATHS, AffinePath, CosinePath, LinearPath, PathSample, VPPath, get_path
from .sampling import SampleOutput, sample
from .sde import MarginalSDE, diffusion_coefficient
from .solvers import (
    SOLVERS,
    AVERAGE_VELOCITY_SOLVERS,
    Dopri5Solver,
    EulerSolver,
    HeunSolver,
    MeanFlowSolver,
    MidpointSolver,
    MultistepSolver,
    Solver,
    SolverOutput,
    get_solver,
    steps_for_nfe,
    time_grid,
)
from .time_samplers import (
    LOSS_WEIGHTINGS,
    LogitNormalTimeSampler,
    ModeTimeSampler,
    ShiftedTimeSampler,
    TimeSampler,
    UniformTimeSampler,
    build_time_sampler,
    loss_weight,
)
