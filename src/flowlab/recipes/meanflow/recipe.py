"""The MeanFlow recipe (``recipe: meanflow``): flow matching's data, model and pipeline, trained on
MeanFlow's average-velocity loss (:mod:`flowlab.flow.meanflow`) so that the saved ``FlowPipeline``
samples in one or two steps (``solver="meanflow"``).

It is :class:`~flowlab.recipes.flow_matching.recipe.FlowMatchingRecipe` with ``mean_flow = True`` (the model
gets its second time input, the scheduler records that the model is a MeanFlow model) and another
training step; the path, time sampler and coupling are the ``flow:`` section's, as for flow matching
(``meanflow.time_pairs: separate`` adds a second sampler, for ``r``).
"""
from __future__ import annotations

import torch

from ...errors import ConfigError
from ...flow import MeanFlowGuidance, MeanFlowLoss, build_time_sampler
from ...train.config import Config
from ...train.recipe import StepContext, StepOutput
from ..flow_matching.recipe import FlowMatchingRecipe

__all__ = ["MeanFlowRecipe"]


def _bare(model):
    """The network inside DDP / FSDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers. Not accelerate's
    ``extract_model_from_parallel``: it runs every training step here, and that one searches the file system for
    DeepSpeed on each call (the per-step cost the trainer stopped paying by unwrapping once)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            return model
        model = inner


def _exact_jvp_fn(model):
    """The network's written-out JVP along ``(dx, 1, 0)`` (``MLPVelocity.jvp``) where it applies, else ``None``
    (the loss falls back to ``torch.func.jvp`` through the wrapper). A sharded network (FSDP) holds shards, not
    its layers' full weights, outside its own forward, so it always takes the fallback."""
    if "FullyShardedDataParallel" in type(model).__name__:
        return None
    net = _bare(model)
    if not hasattr(net, "jvp") or not net.supports_exact_jvp():
        return None
    if any(type(p.data) is not torch.Tensor for p in net.parameters()):  # DTensor shards (FSDP2), ...
        return None
    return lambda x, t, r, dx, y: net.jvp(x, t, y, r, dx, torch.ones_like(t))


class MeanFlowRecipe(FlowMatchingRecipe):
    """MeanFlow (``recipe: meanflow``): an average-velocity model ``u(x, t, r)`` for 1-2 step sampling.

    Class-conditional models are trained with label dropout to the null class, as in flow matching,
    so classifier-free guidance works at sampling time (applied to ``u``).
    """

    mean_flow = True

    def __init__(self, config: Config):
        f = config.flow
        if f.prediction_type != "velocity":
            raise ConfigError(f"flow.prediction_type: MeanFlow learns an average velocity; set it to 'velocity', got {f.prediction_type!r}")
        if f.loss_weighting != "none":
            raise ConfigError(
                f"flow.loss_weighting: MeanFlow weights its loss adaptively (meanflow.adaptive_p); set it to 'none', got {f.loss_weighting!r}"
            )
        super().__init__(config)
        m = config.meanflow
        self.guided = (m.guidance_omega, m.guidance_kappa) != (1.0, 0.0)
        if self.guided:
            if not config.model.class_conditional:
                raise ConfigError(
                    "meanflow.guidance_omega / meanflow.guidance_kappa: training-time guidance needs a class-conditional model "
                    "(model.class_conditional: true); set them to 1.0 / 0.0 for an unconditional one"
                )
            if not config.model.label_dropout > 0:
                raise ConfigError("model.label_dropout: training-time guidance needs the null class trained; set it > 0 (the paper uses 0.1)")
        fm = self.loss  # the flow-matching loss built from flow.*: MeanFlow shares its path, time sampler and coupling
        self.mean_flow_loss = MeanFlowLoss(
            path=fm.path,
            time_sampler=fm.time_sampler,
            coupling=fm.coupling,
            distinct_fraction=m.distinct_fraction,
            adaptive_p=m.adaptive_p,
            adaptive_c=m.adaptive_c,
            r_time_sampler=(
                build_time_sampler(m.r_time_sampler, mean=m.r_logit_mean, std=m.r_logit_std) if m.time_pairs == "separate" else None
            ),
        )

    def build_model(self, dataset):
        model = super().build_model(dataset)  # sets num_classes: the null class is the last label
        if self.guided:
            m = self.config.meanflow
            self.mean_flow_loss.guidance = MeanFlowGuidance(omega=m.guidance_omega, kappa=m.guidance_kappa, null_label=self.num_classes)
        return model

    def training_step(self, model, batch, ctx: StepContext) -> StepOutput:
        x1, labels, x0 = self.data_labels_noise(batch, ctx)
        t, r = ctx.draw(self.mean_flow_loss.sample_times).unbind(1)
        # labels go in as a per-sample input: the loss runs the JVP on the r != t rows only, without a graph
        # (so the bare network's own forward-mode derivative can stand in for torch.func.jvp: nothing to sync)
        out = self.mean_flow_loss(
            lambda x, tt, rr, y: model(x, tt, y, r=rr), x1, x_0=x0, t=t, r=r, conditioning=(labels,), jvp_fn=_exact_jvp_fn(model), groups=labels
        )
        return StepOutput(loss=out.loss, logs={"mean_flow_mse": out.squared_error.mean()})
