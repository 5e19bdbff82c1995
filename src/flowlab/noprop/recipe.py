"""The NoProp recipe (``recipe: noprop``): DT, CT, FM and the back-prop baseline through the shared Trainer.

* ``dt``: every block's loss is yielded separately (:meth:`Recipe.training_losses`), so the trainer
  back-propagates and frees one block at a time; block ``t`` sees only its own input
  ``z_{t-1} ~ q(z_{t-1} | y)`` drawn from the fixed forward process, never another block's output.
  The head and (learned / prototype) embedding form one more local unit trained by the head's
  cross-entropy and the KL term; blocks read the embedding detached. Under ``accelerate launch``
  the blocks are split across processes (block parallelism, no gradient all-reduce).
* ``backprop``: the same stack trained end to end through the recursion with cross-entropy.
* ``ct``: continuous time, learnable schedule, ``SNR'``-weighted loss; ODE inference by the core solvers.
* ``fm``: the core's :class:`~flowlab.flow.FlowMatchingLoss` on the linear path in label-embedding space.
"""
from __future__ import annotations

from typing import Optional

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor
from torch.nn import functional as F

from ..data import build_dataset
from ..flow import FlowMatchingLoss, LinearPath, UniformTimeSampler
from ..errors import ConfigError
from ..train.config import Config
from ..train.recipe import DataSectionRecipe, StepContext, StepOutput
from .config import NoPropConfig
from .models import NoPropClassifier
from .schedules import gaussian_kl_to_standard, noisy_label

__all__ = ["NoPropConfig", "NoPropRecipe", "build_classifier", "accuracy", "load_eval_split"]


def build_classifier(config: Config, image_shape, num_classes: int) -> NoPropClassifier:
    """A :class:`NoPropClassifier` from ``noprop.*`` (and ``model.*`` when ``noprop.backbone=model``)."""
    n = config.noprop
    backbone_config = None
    if n.backbone == "model":
        m = config.model  # an image backbone: NoPropConfig.check
        backbone_config = {"type": m.type, "dropout": m.dropout}
        if m.type == "mlp":
            backbone_config.update(hidden_dim=m.hidden_dim, depth=m.depth, time_embed_dim=m.time_embed_dim)
        elif m.type == "unet":
            backbone_config.update(block_out_channels=list(m.block_out_channels), down_block_types=list(m.down_block_types),
                                   up_block_types=list(m.up_block_types), layers_per_block=m.layers_per_block,
                                   attention_head_dim=m.attention_head_dim, norm_num_groups=m.norm_num_groups)
        elif m.type == "dit":
            backbone_config.update(num_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                                   attention_head_dim=m.attention_head_dim, patch_size=m.patch_size)
    return NoPropClassifier(
        variant=n.variant, image_shape=tuple(image_shape), num_classes=num_classes, num_blocks=n.num_blocks,
        embedding=n.embedding, embed_dim=n.embed_dim, hidden_dim=n.hidden_dim, dropout=n.dropout, channels=tuple(n.channels),
        time_embed_dim=n.time_embed_dim, backbone=n.backbone, backbone_config=backbone_config, gamma_0=n.gamma_0,
        gamma_1=n.gamma_1, schedule_eps=n.schedule_eps, solver=n.solver, inference_steps=n.inference_steps,
        inference_noise=n.inference_noise,
    )


def load_eval_split(config: Config):
    """``(images, labels)`` of the held-out split ``noprop.eval_split`` (digits: the fixed 360-image test split)."""
    import dataclasses

    held_out = {"split": config.noprop.eval_split, "random_flip": False, "center_crop": True}
    fields = {f.name for f in dataclasses.fields(config.data)}  # the keys of this data.name
    data = dataclasses.replace(config.data, **{k: v for k, v in held_out.items() if k in fields})
    ds = build_dataset(data, config.seed)
    n = min(len(ds), config.noprop.eval_max_examples)
    if hasattr(ds, "get_batch"):
        b = ds.get_batch(torch.arange(n))
        return b["x"], b["label"]
    items = [ds[i] for i in range(n)]
    return torch.stack([it["x"] for it in items]), torch.tensor([it["label"] for it in items])


@torch.no_grad()
def accuracy(model: NoPropClassifier, images: Tensor, labels: Tensor, steps: Optional[int] = None, seed: int = 0) -> float:
    """Fraction of ``images`` classified as ``labels`` (noise seeded by ``seed``)."""
    pred = model.predict(images, generator=torch.Generator().manual_seed(seed), steps=steps)
    return float((pred == labels.cpu()).float().mean())


def _owner(block: int, num_blocks: int, num_processes: int) -> int:
    return block * num_processes // num_blocks


class NoPropRecipe(DataSectionRecipe):
    """NoProp classifiers (``recipe: noprop``, section ``noprop:``); saves a :class:`NoPropClassifier`."""

    name = "noprop"

    artifact_name = "classifier"

    def __init__(self, config: Config):
        super().__init__(config)
        n = config.noprop
        self.variant = n.variant
        self.eta = n.eta if n.eta is not None else (0.1 if n.variant == "dt" else 1.0)
        self.data_parallel = n.variant != "dt"  # DT: block parallelism instead
        self.fm_loss = FlowMatchingLoss(path=LinearPath(), time_sampler=UniformTimeSampler(), prediction_type="velocity")
        ce = n.fm_endpoint_ce
        self.fm_endpoint_ce = ce if ce is not None else (1.0 if n.embedding == "learned" else 0.0)
        self._rank, self._world = 0, 1

    # ------------------------------------------------------------------ set-up
    def build_model(self, dataset):
        num_classes = getattr(dataset, "num_classes", 0)
        if num_classes <= 0:
            raise ConfigError(f"recipe: noprop needs labels; the dataset {self.config.data.name!r} has none (set data.label_column)")
        shape = tuple(dataset.sample_shape)
        if len(shape) != 3:
            raise ConfigError(f"recipe: noprop classifies images (C, H, W); data.name={self.config.data.name} gives {shape}")
        model = build_classifier(self.config, shape, num_classes)
        if self.config.noprop.embedding == "prototype":
            if hasattr(dataset, "get_batch"):
                b = dataset.get_batch(torch.arange(len(dataset)))
            else:
                idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.config.seed))[:2000]
                items = [dataset[int(i)] for i in idx]
                b = {"x": torch.stack([it["x"] for it in items]), "label": torch.tensor([it["label"] for it in items])}
            model.init_prototypes(b["x"], b["label"])
        try:
            from accelerate.state import PartialState

            st = PartialState()
            self._rank, self._world = st.process_index, st.num_processes
        except Exception:  # pragma: no cover
            pass
        return model

    def parameter_owners(self, model, num_processes):
        T = model.config.num_blocks
        owners = {}
        for name, _ in [*model.named_parameters(), *model.named_buffers()]:
            if name.startswith("blocks."):
                owners[name] = _owner(int(name.split(".")[1]), T, num_processes)
        return owners

    def grad_clip_groups(self, model):
        if self.variant != "dt":
            return None
        blocks = [list(b.parameters()) for b in model.blocks]
        rest = [p for n, p in model.named_parameters() if not n.startswith("blocks.")]
        return [*blocks, rest]

    def owned_blocks(self, num_blocks: int) -> list[int]:
        """Blocks this process trains (all of them in a single process)."""
        if self._world <= 1:
            return list(range(num_blocks))
        return [t for t in range(num_blocks) if _owner(t, num_blocks, self._world) == self._rank]

    # ------------------------------------------------------------------ losses
    @staticmethod
    def _unwrap(model) -> NoPropClassifier:
        return extract_model_from_parallel(model)

    @staticmethod
    def _generator(ctx: StepContext, base: int, unit: int) -> torch.Generator:
        """Noise of one local unit, independent of which process trains it."""
        return torch.Generator().manual_seed((base * 1_000_003 + 7919 * (unit + 1)) % (2**63 - 1))

    def _randn(self, ctx: StepContext, gen: torch.Generator, dim: int) -> Tensor:
        return ctx.local(torch.randn((ctx.global_batch, dim), generator=gen))

    def block_loss(self, model, t: int, x: Tensor, y: Tensor, eps: Tensor) -> Tensor:
        """DT loss of block ``t`` (0-based): ``(eta / 2) (SNR(t+1) - SNR(t)) E||u_hat(z_t, x) - u_y||^2`` with
        ``z_t = sqrt(abar_t) u_y + sqrt(1 - abar_t) eps`` (paper indices shifted by one)."""
        m = self._unwrap(model)
        u = m.label_embedding(y).detach()
        ab = m.schedule.alpha_bar[t].to(x.dtype)
        z = noisy_label(u, ab, eps.to(x.dtype))
        w = float(m.schedule.weights()[t])
        return 0.5 * self.eta * w * m.block_squared_error(t, x, z, y).mean()

    def head_loss(self, model, x: Tensor, y: Tensor, eps: Tensor) -> tuple[Tensor, dict]:
        """Cross-entropy of the head on ``z_T ~ q(z_T | y)`` plus ``KL(q(z_0 | y) || N(0, I))`` (head and embedding only)."""
        m = self._unwrap(model)
        u = m.label_embedding(y)
        ab = m.schedule.alpha_bar
        z_T = noisy_label(u, ab[-1].to(u.dtype), eps.to(u.dtype))
        ce = F.cross_entropy(m.head(z_T).float(), y)
        kl = gaussian_kl_to_standard(u.float(), ab[0].float()).mean()
        return ce + kl, {"ce": ce.detach(), "kl": kl.detach()}

    def training_losses(self, model, batch, ctx: StepContext):
        if self.variant != "dt":
            yield self.training_step(model, batch, ctx)
            return
        m = self._unwrap(model)
        x, y = batch["x"], batch["label"].long()
        base = int(torch.randint(0, 2**62, (1,), generator=ctx.generator))
        T = len(m.blocks)
        for t in self.owned_blocks(T):
            eps = self._randn(ctx, self._generator(ctx, base, t), m.embed_dim)
            loss = self.block_loss(model, t, x, y, eps)
            yield StepOutput(loss=loss, logs={f"block_{t}": loss.detach()})
        if self._rank == 0:
            eps = self._randn(ctx, self._generator(ctx, base, T), m.embed_dim)
            loss, logs = self.head_loss(model, x, y, eps)
            yield StepOutput(loss=loss, logs=logs)

    def training_step(self, model, batch, ctx: StepContext) -> StepOutput:
        x, y = batch["x"], batch["label"].long()
        m = self._unwrap(model)
        if self.variant == "dt":  # all local losses at once (the trainer uses training_losses instead)
            parts = list(self.training_losses(model, batch, ctx))
            return StepOutput(loss=sum(p.loss for p in parts))
        if self.variant == "backprop":
            z0 = ctx.randn(m.embed_dim).to(x.dtype)
            z_T = m.dt_chain(x, z0, noise=None, detach_embedding=False)
            ce = F.cross_entropy(m.head(z_T).float(), y)
            return StepOutput(loss=ce, logs={"ce": ce.detach()})
        u = m.label_embedding(y)
        t = ctx.rand().to(x.dtype)
        z0 = ctx.randn(m.embed_dim).to(x.dtype)
        if self.variant == "ct":
            return self._ct_loss(m, x, y, u, t, z0, ctx)
        return self._fm_loss(m, x, y, u, t, z0)

    def _ct_loss(self, m: NoPropClassifier, x, y, u, t, eps, ctx) -> StepOutput:
        """``CE(head(z_1)) + KL(q(z_0|y) || N(0,I)) + (eta/2) SNR'(t) ||u_hat(z_t, x, t) - u_y||^2``, ``SNR = exp(-gamma)``."""
        g, dg = m.gamma.with_derivative(t.float(), create_graph=True)
        ab = torch.sigmoid(-g)
        snr_prime = -dg * torch.exp(-g)  # > 0: gamma decreases
        z_t = noisy_label(u, ab.to(u.dtype), eps)
        u_hat = m.ct_denoise(x, z_t, t)
        denoise = (0.5 * self.eta * snr_prime * (u_hat.float() - u.float()).pow(2).sum(1)).mean()
        ends = torch.sigmoid(-m.gamma(torch.tensor([0.0, 1.0], device=x.device)))
        eps1 = ctx.randn(m.embed_dim).to(u.dtype)
        z_1 = noisy_label(u, ends[1].to(u.dtype), eps1)
        ce = F.cross_entropy(m.head(z_1).float(), y)
        kl = gaussian_kl_to_standard(u.float(), ends[0].float()).mean()
        loss = denoise + ce + kl
        return StepOutput(loss=loss, logs={"denoise": denoise.detach(), "ce": ce.detach(), "kl": kl.detach()})

    def _fm_loss(self, m: NoPropClassifier, x, y, u, t, z0) -> StepOutput:
        """The core flow-matching loss on ``z_t = t u_y + (1 - t) z_0`` (target ``u_y - z_0``), plus, for learned
        embeddings, cross-entropy on the extrapolated endpoint ``z_t + (1 - t) v`` (against embedding collapse)."""
        out = self.fm_loss(lambda z, tt: m.fm_velocity(x, z, tt), u, x_0=z0, t=t)
        loss, logs = out.loss, {"fm": out.loss.detach()}
        if self.fm_endpoint_ce > 0:
            s = out.sample
            v = m.fm_velocity(x, s.x_t, s.t)
            end = s.x_t + (1 - s.t)[:, None] * v
            logits = -torch.cdist(end.float(), m.embed_weight.float()).pow(2)
            ce = F.cross_entropy(logits, y)
            loss = loss + self.fm_endpoint_ce * ce
            logs["endpoint_ce"] = ce.detach()
        return StepOutput(loss=loss, logs=logs)

    # ------------------------------------------------------------------ evaluation and saving
    def evaluate(self, model, generator) -> dict:
        if not hasattr(self, "_eval_data"):
            self._eval_data = load_eval_split(self.config)
        x, y = self._eval_data
        out = {"accuracy": accuracy(model, x, y, seed=self.config.seed)}
        if self.variant in ("ct", "fm"):
            for s in self.config.noprop.eval_steps:
                out[f"accuracy_{s}_steps"] = accuracy(model, x, y, steps=s, seed=self.config.seed)
        return out

    def save_final(self, model, directory: str) -> None:
        self._unwrap(model).save_pretrained(directory)

    def card_data(self, repo_id: str) -> dict:
        """Model-card fields of the saved :class:`NoPropClassifier` (see :meth:`Recipe.card_data`)."""
        return {
            "usage": (
                f'from flowlab.noprop import NoPropClassifier\nclf = NoPropClassifier.from_pretrained("{repo_id}")\n'
                "labels = clf.predict(images)  # images (B, C, H, W) in [-1, 1]"
            ),
            "tags": [f"noprop-{self.variant}", "image-classification"],
            "pipeline_tag": "image-classification",
        }
