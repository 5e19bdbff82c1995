"""MeanFlow (Geng et al., 2025): learn the *average* velocity over a time interval, so that one
network evaluation jumps across it.

**In flowlab time** (``t = 0`` noise, ``t = 1`` data; sampling integrates ``dx/dt = v(x, t)``
forward). For a trajectory ``x_tau`` of the probability-flow ODE and two times ``t <= r``, the
average velocity of the step that starts at the state ``x_t`` and ends at the later time ``r``
(closer to data) is

    u(x_t, t, r) = 1 / (r - t) * integral_t^r v(x_tau, tau) d tau,   u(x_t, t, t) = v(x_t, t),

so that ``x_r = x_t + (r - t) u(x_t, t, r)``: a sampler steps from noise to data with one
evaluation per step (:class:`~flowlab.flow.solvers.MeanFlowSolver`).

**The MeanFlow identity.** Multiply by ``(r - t)`` and differentiate in ``t`` along the trajectory,
``r`` held fixed (the state moves with ``dx_t/dt = v``):

    d/dt [(r - t) u(x_t, t, r)] = -u + (r - t) du/dt = d/dt integral_t^r v = -v(x_t, t)
    =>  u(x_t, t, r) = v(x_t, t) - (t - r) du/dt,   du/dt = v . d_x u + d_t u,

the total derivative being the Jacobian-vector product of ``u`` with tangent ``(v, 1, 0)`` in
``(x, t, r)``. Written with the paper's names (its second time argument is the moving one), this is
``u_tgt = v - (t - r) d/dt u`` with the JVP along ``(v, 0, 1)`` in ``(x, r, t)``: the same formula. The
paper (noise at ``t_p = 1``) has ``r_p < t_p``; the map ``t = 1 - t_p``, ``r = 1 - r_p``,
``v = -v_p``, ``u = -u_p`` turns its identity into this one, with ``t <= r`` here.

**Training** (:class:`MeanFlowLoss`) regresses ``u_theta(x_t, t, r)`` onto the stop-gradient target

    u_tgt = v_t + (r - t) * sg(JVP_{(v_t, 1, 0)} u_theta(x_t, t, r)),

with ``v_t`` the path's conditional velocity (``x1 - x0`` on the linear path), as flow matching
replaces the marginal velocity by the conditional one. The reference computes both ``u_theta`` (kept
in the graph) and the tangent (detached) with one forward-mode JVP of the whole batch
(:func:`meanflow_target`). Since the target is a stop-gradient, :func:`meanflow_prediction_and_target`
(what the loss uses) computes it without a graph, and only on the ``r != t`` rows (at ``r = t`` the JVP
term is multiplied by ``r - t = 0`` and the target is ``v``), then runs one ordinary forward of the
whole batch for ``u``: the same loss and gradients up to round-off, at one flow-matching step plus a
graph-free JVP of a quarter of the batch. A model may supply its own forward-mode derivative
(``jvp_fn``; :meth:`flowlab.models.MLPVelocity.jvp` is written out layer by layer and costs half of
``torch.func.jvp`` on that network). The paper trains with a fraction of
``r != t`` pairs (``distinct_fraction``, 25% in its ImageNet ablation, 75% in the authors' CIFAR-10
script) and the adaptive weight ``w = 1 / (||u - u_tgt||^2 + c)^p`` (stop-gradient; ``p = 1``, ``c = 1e-3``;
the JAX code's ``c`` is ``0.01`` on the sum over pixels).

**Time pairs** (:func:`sample_time_pairs`): either two draws of one sampler, sorted (the paper's
description), or, with a separate sampler for ``r``, the authors' code's ``tr_sampler v1``: ``t`` and
``r`` drawn from their own distributions, ``r = t`` with probability ``1 - distinct_fraction``, then
``r = max(t, r)``. Their CIFAR-10 values, ``t ~ logit-normal(-0.6, 1.6)`` and ``r ~ logit-normal(-4, 1.6)``
on their time (noise at 1), are ``t ~ logit-normal(0.6, 1.6)`` and ``r ~ logit-normal(4, 1.6)`` here
(``logit(1 - t) = -logit(t)``).

**Guidance in training** (:class:`MeanFlowGuidance`, the paper's Sec. 4.2): for class-conditional models the
velocity in the target and in the tangent becomes the guided ``v_g``, so that one evaluation of the
trained model samples with classifier-free guidance.

=====================  =========================================  ================================
setting                paper (ImageNet 256)                       here (default)
=====================  =========================================  ================================
(t, r) distribution    two logit-normal draws, sorted             two draws of the recipe's time sampler, sorted,
                                                                  or ``t`` and ``r`` from separate samplers
fraction r != t        25% (ablated 0-100%)                       ``distinct_fraction=0.25``
adaptive weight p, c   p = 1, c = 1e-3                            ``adaptive_p=1``, ``adaptive_c=1e-3``
||.||^2                squared error of the sample                mean over dimensions (as ``FlowMatchingLoss``)
network time inputs    (t, t - r)                                 (t, r - t): the same up to sign
guidance (omega,       the JAX code's default omega 1, kappa 0.5  none (``guidance=None``); the recipe's
kappa)                 (learnt scale 2)                           ``meanflow.guidance_omega/kappa``
=====================  =========================================  ================================
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .couplings import Coupling, IndependentCoupling
from .losses import LossOutput
from .paths import AffinePath, LinearPath, expand_like
from .time_samplers import TimeSampler, UniformTimeSampler

__all__ = [
    "AverageVelocityFn",
    "AverageVelocityJvpFn",
    "MeanFlowGuidance",
    "MeanFlowLoss",
    "MeanFlowLossOutput",
    "meanflow_prediction_and_target",
    "meanflow_target",
    "sample_time_pairs",
]

#: ``jvp_fn(x, t, r, dx, *per_sample) -> (u, du_dt)``: the average velocity and its derivative along ``(dx, 1, 0)`` in
#: ``(x, t, r)``, without an autograd graph (see :func:`meanflow_prediction_and_target`).
AverageVelocityJvpFn = Callable[..., tuple[Tensor, Tensor]]

#: ``u(x, t, r, *per_sample) -> (B, ...)``: the average velocity from the state ``x`` at times ``t`` ``(B,)``
#: to ``r`` ``(B,)``; ``per_sample`` are optional further per-sample inputs (class labels, ...), ``(B, ...)`` or ``None``.
AverageVelocityFn = Callable[..., Tensor]


@dataclass
class MeanFlowLossOutput(LossOutput):
    """:class:`~flowlab.flow.losses.LossOutput` plus ``squared_error`` ``(B,)``: the unweighted
    ``mean_d (u - u_tgt)^2`` per sample (the adaptive weight keeps the loss itself near 1 when ``p = 1``)."""

    squared_error: Tensor | None = None


def meanflow_target(u_fn: AverageVelocityFn, x_t: Tensor, t: Tensor, r: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The network's average velocity and its MeanFlow target, from one forward-mode JVP.

    Args:
        u_fn: the average-velocity model ``u(x, t, r)``.
        x_t: states ``(B, ...)`` at times ``t`` ``(B,)``; ``r`` ``(B,)`` the step's other end (``r >= t``).
        v: the velocity ``dx_t/dt`` ``(B, ...)`` at ``(x_t, t)`` (conditional or exact).

    Returns:
        ``(u, u_tgt)``: ``u = u_fn(x_t, t, r)`` with its graph, and the detached target
        ``v + (r - t) * (v . d_x u + d_t u)``.
    """
    u, du_dt = torch.func.jvp(lambda x, tt: u_fn(x, tt, r), (x_t, t), (v, torch.ones_like(t)))
    return u, (v + expand_like(r - t, v) * du_dt).detach()


def _take(a: Tensor | None, idx: Tensor | None) -> Tensor | None:
    """Rows ``idx`` of a per-sample tensor (all rows for ``idx=None``; ``None`` stays ``None``)."""
    return a if (idx is None or a is None) else a[idx]


@dataclass(frozen=True)
class MeanFlowGuidance:
    """Classifier-free guidance built into training (MeanFlow, Geng et al. 2025, Sec. 4.2; the authors' JAX code,
    ``meanflow.py`` ``guidance_fn`` and ``cond_drop``): the model learns the average velocity of the *guided*
    field, so one network evaluation samples with guidance.

    The velocity in the target and in the JVP's tangent is replaced by

        v_g = omega * v + kappa * u(x_t, t, t | y) + (1 - omega - kappa) * u(x_t, t, t | null),

    both ``u`` graph-free, on the rows whose label was kept; rows whose label was dropped to the null class keep
    ``v`` (they learn the unguided field, which the guided one is built from). The guidance scale of the field
    learnt is ``omega / (1 - kappa)``: ``omega = 1.5, kappa = 0`` and ``omega = 1, kappa = 1/3`` both aim at the
    field of sampling-time CFG with ``w = 1.5``; ``omega = 1, kappa = 0`` is no guidance.

    Args:
        omega: weight of the sample's conditional velocity ``v``.
        kappa: weight of the model's conditional velocity, in ``[0, 1)``.
        null_label: the null class (label dropout's class).
    """

    omega: float
    kappa: float
    null_label: int

    def __post_init__(self):
        if not self.omega > 0:
            raise ValueError(f"guidance omega must be > 0, got {self.omega!r}")
        if not 0.0 <= self.kappa < 1.0:
            raise ValueError(f"guidance kappa must lie in [0, 1), got {self.kappa!r}")

    @property
    def scale(self) -> float:
        """The guidance scale of the learnt field, ``omega / (1 - kappa)``."""
        return self.omega / (1.0 - self.kappa)

    @property
    def active(self) -> bool:
        return not (self.omega == 1.0 and self.kappa == 0.0)

    @torch.no_grad()
    def velocity(
        self, u_fn: AverageVelocityFn, x_t: Tensor, t: Tensor, r: Tensor, v: Tensor, per_sample: tuple[Tensor | None, ...], u: Tensor
    ) -> Tensor:
        """``v_g`` ``(B, ...)``, graph-free. ``per_sample[0]`` holds the class labels ``(B,)`` after label dropout;
        ``u`` is the model's (detached) output at ``(x_t, t, r)``: at ``r = t`` it is ``u(x_t, t, t | y)`` already."""
        if not self.active:
            return v
        if not per_sample or per_sample[0] is None:
            raise ValueError("MeanFlowGuidance needs the class labels as the first per-sample input (a class-conditional model)")
        labels = per_sample[0]
        kept = (labels != self.null_label).nonzero().squeeze(1)
        if kept.numel() == 0:
            return v
        x, tt, vv = x_t[kept], t[kept], v[kept]
        rest = tuple(_take(c, kept) for c in per_sample[1:])
        v_g = self.omega * vv + (1.0 - self.omega - self.kappa) * u_fn(x, tt, tt, torch.full_like(labels[kept], self.null_label), *rest).to(v.dtype)
        if self.kappa:
            v_cond = u[kept].to(v.dtype).clone()
            moved = (r[kept] != tt).nonzero().squeeze(1)  # rows where u was taken at r != t: evaluate u(x, t, t | y)
            if moved.numel():
                v_cond[moved] = u_fn(x[moved], tt[moved], tt[moved], labels[kept][moved], *(_take(c, moved) for c in rest)).to(v.dtype)
            v_g = v_g + self.kappa * v_cond
        out = v.clone()
        out[kept] = v_g
        return out


def meanflow_prediction_and_target(
    u_fn: AverageVelocityFn,
    x_t: Tensor,
    t: Tensor,
    r: Tensor,
    v: Tensor,
    per_sample: tuple[Tensor | None, ...] = (),
    jvp_fn: AverageVelocityJvpFn | None = None,
    guidance: MeanFlowGuidance | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`meanflow_target` for a batch that mixes ``r != t`` and ``r = t`` pairs, computed in two passes:

    1. the target, without a graph: at ``r = t`` the JVP term is multiplied by ``r - t = 0`` and the target is
       ``v``; on the ``r != t`` rows only, the tangent ``du/dt`` comes from ``jvp_fn`` (a model's own
       forward-mode derivative, e.g. :meth:`flowlab.models.MLPVelocity.jvp`) or, by default, from
       ``torch.func.jvp`` of ``u_fn`` under ``torch.no_grad``;
    2. the prediction ``u``, from one ordinary forward of the whole batch with its graph.

    The target is a stop-gradient, so this equals :func:`meanflow_target` on the whole batch up to round-off,
    and so do the gradients through ``u`` (tested), for any network whose rows do not depend on each other
    and whose forward is deterministic (with active dropout the target's pass draws its own mask). It costs
    one flow-matching step plus one graph-free JVP on the ``r != t`` rows: no backward graph is recorded
    through the JVP, and the forward with a graph runs once, on the full batch.

    Args:
        u_fn: the model ``u(x, t, r, *per_sample)``.
        x_t, t, r, v: as for :func:`meanflow_target`: ``(B, ...)``, ``(B,)``, ``(B,)``, ``(B, ...)``.
        per_sample: further inputs of ``u_fn`` with a leading batch dimension ``B`` (class labels, ...), split
            with the rows; ``None`` entries are passed as ``None``.
        jvp_fn: ``jvp_fn(x, t, r, dx, *per_sample) -> (u, du_dt)``, the derivative along ``(dx, 1, 0)`` in
            ``(x, t, r)``, without a graph; ``None``: ``torch.func.jvp`` of ``u_fn``.
        guidance: training-time classifier-free guidance (:class:`MeanFlowGuidance`): ``v`` is replaced by the
            guided velocity, in the target and in the JVP's tangent; ``per_sample[0]`` must be the class labels.

    Returns:
        ``(u, u_tgt)``, ``(B, ...)`` each: ``u`` with its graph, ``u_tgt`` detached.
    """
    u = u_fn(x_t, t, r, *per_sample)
    if guidance is not None:
        v = guidance.velocity(u_fn, x_t, t, r, v, per_sample, u.detach())
    distinct = r != t
    if not bool(distinct.any()):
        return u, v.detach()
    idx = None if bool(distinct.all()) else distinct.nonzero().squeeze(1)
    x, tt, rr, vv = _take(x_t, idx), _take(t, idx), _take(r, idx), _take(v, idx)
    extra = tuple(_take(c, idx) for c in per_sample)
    with torch.no_grad():
        if jvp_fn is not None:
            _, du_dt = jvp_fn(x, tt, rr, vv, *extra)
        else:
            _, du_dt = torch.func.jvp(lambda x_, t_: u_fn(x_, t_, rr, *extra), (x, tt), (vv, torch.ones_like(tt)))
        tgt = vv + expand_like(rr - tt, vv) * du_dt.to(vv.dtype)
    if idx is None:
        return u, tgt
    target = v.detach().clone()
    target[idx] = tgt
    return u, target


def sample_time_pairs(
    time_sampler: TimeSampler,
    n: int,
    distinct_fraction: float,
    generator: torch.Generator | None = None,
    r_time_sampler: TimeSampler | None = None,
) -> Tensor:
    """Draw ``n`` pairs ``(t, r)`` with ``t <= r``, shape ``(n, 2)``.

    Without ``r_time_sampler``: two independent draws of ``time_sampler``, sorted; then, with probability
    ``1 - distinct_fraction`` per pair, ``r`` is set to ``t`` (a flow-matching pair).

    With ``r_time_sampler`` (the authors' code's ``tr_sampler v1``, in flowlab time): ``t`` from
    ``time_sampler``, ``r`` from ``r_time_sampler``, ``r = t`` with probability ``1 - distinct_fraction``,
    then ``r = max(t, r)`` (so a drawn ``r`` below ``t`` also gives a flow-matching pair).

    Either way the draws come in a fixed order from ``generator``: first times, then second times, then
    the mask.
    """
    a = time_sampler.sample(n, generator)
    b = (r_time_sampler or time_sampler).sample(n, generator)
    keep = torch.rand(n, generator=generator, device=a.device) < distinct_fraction
    if r_time_sampler is not None:
        return torch.stack([a, torch.maximum(a, torch.where(keep, b, a))], dim=1)
    t = torch.minimum(a, b)
    r = torch.where(keep, torch.maximum(a, b), t)
    return torch.stack([t, r], dim=1)


class MeanFlowLoss:
    """The MeanFlow loss ``E[ sg(w) * mean_d (u_theta(x_t, t, r) - u_tgt)^2 ]`` (see the module docstring).

    Args:
        path: the probability path (linear by default); ``v_t`` is its conditional velocity.
        time_sampler: distribution of each of the two time draws (uniform by default); of ``t`` alone
            if ``r_time_sampler`` is given.
        coupling: noise/data pairing (independent by default).
        distinct_fraction: probability that a pair has ``r != t``, in ``[0, 1]``.
        adaptive_p: power ``p`` of the adaptive weight (``0`` disables it: plain squared error).
        adaptive_c: the constant ``c > 0`` of the adaptive weight.
        r_time_sampler: a separate distribution of ``r`` (see :func:`sample_time_pairs`); ``None``: sorted pairs.
        guidance: training-time classifier-free guidance (:class:`MeanFlowGuidance`); the first ``conditioning``
            entry of each call must then be the class labels.
    """

    def __init__(
        self,
        path: AffinePath | None = None,
        time_sampler: TimeSampler | None = None,
        coupling: Coupling | None = None,
        distinct_fraction: float = 0.25,
        adaptive_p: float = 1.0,
        adaptive_c: float = 1e-3,
        r_time_sampler: TimeSampler | None = None,
        guidance: MeanFlowGuidance | None = None,
    ):
        if not 0.0 <= distinct_fraction <= 1.0:
            raise ValueError(f"distinct_fraction must lie in [0, 1], got {distinct_fraction!r}")
        if adaptive_p < 0:
            raise ValueError(f"adaptive_p must be >= 0, got {adaptive_p!r}")
        if not adaptive_c > 0:
            raise ValueError(f"adaptive_c must be > 0, got {adaptive_c!r}")
        self.path = path or LinearPath()
        self.time_sampler = time_sampler or UniformTimeSampler()
        self.coupling = coupling or IndependentCoupling()
        self.distinct_fraction = distinct_fraction
        self.adaptive_p = adaptive_p
        self.adaptive_c = adaptive_c
        self.r_time_sampler = r_time_sampler
        self.guidance = guidance

    def sample_times(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``(n, 2)`` pairs ``(t, r)``, ``t <= r`` (see :func:`sample_time_pairs`)."""
        return sample_time_pairs(self.time_sampler, n, self.distinct_fraction, generator, self.r_time_sampler)

    def __call__(
        self,
        u_fn: AverageVelocityFn,
        x_1: Tensor,
        x_0: Tensor | None = None,
        t: Tensor | None = None,
        r: Tensor | None = None,
        generator: torch.Generator | None = None,
        conditioning: tuple[Tensor | None, ...] = (),
        jvp_fn: AverageVelocityJvpFn | None = None,
        groups: Tensor | None = None,
    ) -> MeanFlowLossOutput:
        """Loss for data ``x_1`` ``(B, ...)``; noise ``x_0`` and times ``t <= r`` ``(B,)`` are drawn if not given.

        ``u_fn(x_t, t, r, *conditioning)`` returns the model's average velocity; ``conditioning`` holds its
        per-sample inputs ``(B, ...)`` (class labels, ...; ``None`` passes through), which are split with the
        batch: the JVP runs on the ``r != t`` rows only, without a graph, by ``jvp_fn`` if given
        (:func:`meanflow_prediction_and_target`).
        ``groups`` ``(B,)``: each row's conditioning (class labels after dropout); the coupling pairs within it.
        The output's ``per_sample`` holds the weighted per-sample losses; the weights are not differentiated.
        """
        if x_0 is None:
            x_0 = torch.randn(x_1.shape, generator=generator, device="cpu" if generator is None else generator.device).to(x_1)
        if (t is None) != (r is None):
            raise ValueError("MeanFlowLoss: give both t and r, or neither")
        if t is None:
            t, r = self.sample_times(x_1.shape[0], generator).to(x_1.device).unbind(1)
        if bool((r < t).any()):
            raise ValueError("MeanFlowLoss: every pair needs t <= r (flowlab time: the step goes from t towards data at r)")
        x_0, x_1 = self.coupling(x_0, x_1) if groups is None else self.coupling(x_0, x_1, groups)
        s = self.path.sample(x_0, x_1, t.to(x_1.dtype))
        u, u_tgt = meanflow_prediction_and_target(u_fn, s.x_t, s.t, r.to(x_1.dtype), s.dx_t, tuple(conditioning), jvp_fn, self.guidance)
        sq = (u.float() - u_tgt.float()).pow(2).flatten(1).mean(1)
        weight = (sq.detach() + self.adaptive_c).pow(-self.adaptive_p) if self.adaptive_p > 0 else torch.ones_like(sq)
        per_sample = weight * sq
        return MeanFlowLossOutput(loss=per_sample.mean(), per_sample=per_sample, sample=s, squared_error=sq.detach())
