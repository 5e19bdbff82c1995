"""The flow-matching recipe: train a velocity model on images or vectors, save a ``FlowPipeline``."""
from __future__ import annotations

import torch
from torch import nn

from ...errors import ConfigError
from ...flow import FlowMatchingLoss, build_coupling, build_time_sampler, get_path
from ...card_data import flow_pipeline_card_data, looks_like_repo_id
from ...models import MODEL_TYPES, set_attention_backend
from ...pipelines import FlowPipeline, FlowScheduler
from ...pipelines.loading import load_flow_pipeline
from ...train.config import Config
from ...train.recipe import DataSectionRecipe, StepContext, StepOutput

__all__ = ["FlowMatchingRecipe", "build_velocity_model", "build_scheduler"]


def build_velocity_model(config: Config, sample_shape: tuple[int, ...], num_classes: int, mean_flow: bool = False) -> nn.Module:
    """A velocity network from ``model.*`` (or ``model.pretrained``) for samples of ``sample_shape``;
    ``mean_flow``: a MeanFlow average-velocity network ``u(x, t, r)`` (``model.type=mlp``)."""
    m = config.model
    if m.pretrained:
        model = load_flow_pipeline(m.pretrained, "model.pretrained").velocity_model
        if tuple(model.sample_shape) != tuple(sample_shape):
            raise ConfigError(f"model.pretrained: {m.pretrained} draws samples of shape {model.sample_shape}, the data has {sample_shape}")
        if bool(getattr(model.config, "mean_flow", False)) != mean_flow:
            raise ConfigError(
                f"model.pretrained: {m.pretrained} holds a {'MeanFlow' if not mean_flow else 'plain velocity'} model, "
                f"recipe {config.recipe!r} trains a {'MeanFlow' if mean_flow else 'plain velocity'} model"
            )
        return model
    if m.type in ("unet", "dit") and len(sample_shape) != 3:
        raise ConfigError(f"model.type={m.type} needs image data (C, H, W); data.name={config.data.name} gives {sample_shape}: use model.type=mlp")
    if mean_flow and m.type != "mlp":
        raise ConfigError(f"model.type: MeanFlow's second time input is built into model.type=mlp only, got {m.type!r}")
    common = {"sample_shape": tuple(sample_shape), "num_classes": num_classes, "dropout": m.dropout}
    if mean_flow:
        common["mean_flow"] = True
    try:
        model = _construct(m, common)
    except (ValueError, TypeError) as e:  # sizes that do not fit together (groups, heads, patches, block lists)
        raise ConfigError(
            f"model: cannot build model.type={m.type} for samples of shape {tuple(sample_shape)} "
            f"from the model.* settings: {' '.join(str(e).split())}"
        ) from None
    if hasattr(m, "attention"):  # unet, dit (an MLP has no attention)
        set_attention_backend(model, m.attention)
    return model


def _construct(m, common: dict) -> nn.Module:
    if m.type in ("mlp", "conservative"):  # conservative: v = grad_x of a scalar MLP of the same shape
        model = MODEL_TYPES[m.type](hidden_dim=m.hidden_dim, depth=m.depth, time_embed_dim=m.time_embed_dim, time_embed_scale=m.time_embed_scale, **common)
    elif m.type == "unet":
        model = MODEL_TYPES["unet"](
            block_out_channels=tuple(m.block_out_channels),
            down_block_types=tuple(m.down_block_types),
            up_block_types=tuple(m.up_block_types),
            layers_per_block=m.layers_per_block,
            attention_head_dim=m.attention_head_dim,
            norm_num_groups=m.norm_num_groups,
            **common,
        )
    else:
        model = MODEL_TYPES["dit"](
            num_layers=m.num_layers, num_attention_heads=m.num_attention_heads, attention_head_dim=m.attention_head_dim, patch_size=m.patch_size, **common
        )
    return model


def build_scheduler(config: Config, mean_flow: bool = False) -> FlowScheduler:
    """The ``FlowScheduler`` saved with the pipeline: training path + sampling defaults (+ whether the
    model is a MeanFlow model)."""
    for key, solver in (("sample.solver", config.sample.solver), ("eval.solver", config.eval.solver)):
        try:
            FlowScheduler.check_solver(solver, mean_flow)
        except ValueError as e:
            raise ConfigError(f"{key}: {e} (recipe {config.recipe!r})") from None
    return FlowScheduler(
        path=config.flow.path,
        prediction_type=config.flow.prediction_type,
        solver=config.sample.solver,
        num_inference_steps=config.sample.num_inference_steps,
        shift=config.sample.shift,
        guidance_scale=config.sample.guidance_scale,
        mean_flow=mean_flow,
    )


class FlowMatchingRecipe(DataSectionRecipe):
    """Conditional flow matching (``recipe: flow_matching``).

    Class-conditional models (``model.class_conditional: true``) are trained with label
    dropout ``model.label_dropout`` to the null class, for classifier-free guidance.
    """

    #: whether the model is a MeanFlow average-velocity model (set by :class:`~flowlab.recipes.meanflow.recipe.MeanFlowRecipe`)
    mean_flow: bool = False

    def __init__(self, config: Config):
        super().__init__(config)
        f = config.flow
        self.loss = FlowMatchingLoss(
            path=get_path(f.path),
            time_sampler=build_time_sampler(f.time_sampler, mean=f.logit_mean, std=f.logit_std, mode_scale=f.mode_scale, shift=f.shift),
            coupling=build_coupling(f.coupling),
            prediction_type=f.prediction_type,
            weighting=f.loss_weighting,
        )
        self.scheduler = build_scheduler(config, self.mean_flow)
        self.num_classes = 0

    name = "flow_matching"

    def build_model(self, dataset):
        if self.config.model.class_conditional:
            if getattr(dataset, "num_classes", 0) <= 0:
                raise ConfigError(
                    f"model.class_conditional: the dataset {self.config.data.name!r} has no labels "
                    "(set data.label_column for image datasets, or model.class_conditional=false)"
                )
            self.num_classes = dataset.num_classes
        self.sample_shape = tuple(dataset.sample_shape)
        self.kind = getattr(dataset, "kind", "image" if len(self.sample_shape) == 3 else "vector")
        return build_velocity_model(self.config, self.sample_shape, self.num_classes, self.mean_flow)

    def data_labels_noise(self, batch, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Data ``x1``, labels after label dropout (``None``: unconditional) and noise ``x0`` of one micro-batch.

        Randomness is drawn for the global batch, in a fixed order (dropout, then noise), then sliced
        (see :class:`StepContext`)."""
        x1 = batch["x"]
        labels = None
        if self.num_classes > 0:
            labels = batch["label"].long()
            drop = ctx.rand() < self.config.model.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        x0 = ctx.randn(*x1.shape[1:]).to(x1.dtype)
        return x1, labels, x0

    def training_step(self, model, batch, ctx: StepContext) -> StepOutput:
        x1, labels, x0 = self.data_labels_noise(batch, ctx)
        t = ctx.draw(self.loss.time_sampler.sample)
        out = self.loss(lambda xt, tt: model(xt, tt, labels), x1, x_0=x0, t=t, groups=labels)
        return StepOutput(loss=out.loss)

    def pipeline(self, model) -> FlowPipeline:
        pipe = FlowPipeline(velocity_model=model, scheduler=self.scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _sample(self, model, n: int, generator, solver=None, steps=None) -> torch.Tensor:
        pipe = self.pipeline(model)
        labels = torch.arange(n) % self.num_classes if self.num_classes > 0 else None
        out = pipe(batch_size=n, class_labels=labels, generator=generator, output_type="pt", solver=solver, num_inference_steps=steps)
        return out.images

    @torch.no_grad()
    def sample_images(self, model, num_images, generator):
        return self._sample(model, num_images, generator)

    def evaluate(self, model, generator) -> dict:
        cfg = self.config
        e = cfg.eval
        name = cfg.data.name
        if name == "digits":
            from ...metrics.digits import DigitsEvaluator

            samples = torch.cat(
                [self._sample(model, min(500, e.num_samples - i), generator, e.solver, e.num_inference_steps) for i in range(0, e.num_samples, 500)]
            )
            res = DigitsEvaluator.load().evaluate(samples, value_range="unit")
            return {k: res[k] for k in ("fd", "floor", "confidence")} | {"class_hist": res["class_hist"]}
        if self.kind == "vector" and self.sample_shape == (2,):
            from ...data import sample_toy2d
            from ...metrics.vectors import sliced_wasserstein

            samples = self._sample(model, e.num_samples, generator, e.solver, e.num_inference_steps)
            ref = sample_toy2d(name, e.num_samples, seed=cfg.seed + 12345)
            return {"sliced_w2": sliced_wasserstein(samples, ref, generator=torch.Generator().manual_seed(0))}
        return {}

    def save_final(self, model, directory: str) -> None:
        self.pipeline(model).save_pretrained(directory)

    def card_data(self, repo_id: str) -> dict:
        """Model-card fields of the saved :class:`FlowPipeline` (after :meth:`build_model`): a class-conditional
        model is sampled with one label per class (at most 16) and tagged class-conditional."""
        cfg = self.config
        labels = f"list(range({min(self.num_classes, 16)}))" if self.num_classes > 0 else None
        data = flow_pipeline_card_data(repo_id, class_labels=labels, images=self.kind == "image")
        if looks_like_repo_id(cfg.model.pretrained):
            data["base_model"] = cfg.model.pretrained
        if cfg.data.name == "hf" and looks_like_repo_id(cfg.data.path):
            data["datasets"] = [cfg.data.path]
        return data
