"""NoProp networks: label embeddings, the paper's denoising block, and :class:`NoPropClassifier`.

``NoPropClassifier`` is a diffusers ``ModelMixin`` + ``ConfigMixin``: ``save_pretrained`` /
``from_pretrained`` (safetensors) come for free, and ``predict(images)`` returns class
indices whatever the variant:

* ``dt``: ``T`` independent blocks ``u_hat_t = softmax(logits_t(x, z_{t-1})) @ W_embed`` chained by
  the DT recursion, then the linear head on ``z_T``.
* ``backprop``: the same stack, trained end to end through the (noise-free) recursion.
* ``ct``: one time-conditioned block ``u_hat(z_t, x, t)`` integrated as an ODE by the core's solvers
  along the learnable schedule (:class:`~flowlab.noprop.schedules.GammaPath`); head on ``z_1``.
* ``fm``: one time-conditioned block predicting a velocity in label-embedding space, integrated
  along the core's linear path; the class is the nearest label embedding of ``z_1``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from diffusers import ModelMixin  # noqa: F401  (diffusers' loader looks for it in this namespace)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import Tensor, nn
from torch.nn import functional as F

from ..flow import LinearPath, get_solver, time_grid
from ..flow.parameterization import to_velocity
from ..models import MODEL_TYPES, sinusoidal_embedding
from .config import EMBEDDINGS, VARIANTS
from .schedules import DiscreteCosineSchedule, GammaPath, MonotoneGamma

__all__ = ["NoPropClassifier", "DenoisingBlock", "ImageEncoder", "VARIANTS", "EMBEDDINGS"]


class _MixtureSquaredError(torch.autograd.Function):
    """``||softmax(logits) @ W - W[y]||^2`` per row, with ``W`` held fixed; saves only ``softmax(logits)``
    (which an unfused softmax would save anyway) and recomputes the rest in backward, so a DT block's
    loss keeps no activation beyond what the block itself needs."""

    @staticmethod
    def forward(ctx, logits: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        p = logits.softmax(-1)
        ctx.save_for_backward(p, weight, labels)
        return (p @ weight - weight[labels]).pow(2).sum(1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        p, weight, labels = ctx.saved_tensors
        d_uhat = 2 * (p @ weight - weight[labels]) * grad[:, None]
        d_p = d_uhat @ weight.t()
        return p * (d_p - (d_p * p).sum(1, keepdim=True)), None, None


class ImageEncoder(nn.Module):
    """Image path of a block: ``(B, C, H, W) -> (B, hidden)``.

    ``paper``: conv 3x3 -> ReLU -> 2x2 max-pool -> dropout for each of ``channels`` (32, 64, 128),
    then FC (+ BatchNorm if ``norm``). ``model``: any flowlab image backbone (a velocity network
    built from ``backbone_config``, read at ``t = 1``), flattened, then FC (+ BatchNorm).
    """

    def __init__(self, image_shape, hidden: int, channels=(32, 64, 128), dropout: float = 0.2, norm: bool = True,
                 backbone: str = "paper", backbone_config: Optional[dict] = None):
        super().__init__()
        c, h, w = image_shape
        self.backbone = backbone
        if backbone == "paper":
            layers = []
            for out in channels:
                layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2) if min(h, w) >= 2 else nn.Identity(), nn.Dropout(dropout)]
                c, h, w = out, (h // 2 if min(h, w) >= 2 else h), (w // 2 if min(h, w) >= 2 else w)
            self.features = nn.Sequential(*layers, nn.Flatten())
            flat = c * h * w
        elif backbone == "model":
            cfg = dict(backbone_config or {})
            kind = cfg.pop("type", "mlp")
            self.features = MODEL_TYPES[kind](sample_shape=tuple(image_shape), **cfg)
            flat = int(math.prod(image_shape))
        else:
            raise ValueError(f"backbone must be 'paper' or 'model', got {backbone!r}")
        self.fc = nn.Linear(flat, hidden)
        self.norm = nn.BatchNorm1d(hidden) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.backbone == "model":
            h = self.features(x, torch.ones(x.shape[0], device=x.device, dtype=x.dtype)).flatten(1)
        else:
            h = self.features(x)
        return self.norm(self.fc(h))


def _fc(d_in: int, d_out: int, norm: bool) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out) if norm else nn.Identity(), nn.ReLU())


class DenoisingBlock(nn.Module):
    """One NoProp block ``(x, z[, t]) -> out`` (paper figure, as transcribed).

    Image path :class:`ImageEncoder`; noisy-label path FC+BN+ReLU twice with a skip; optional
    sinusoidal time embedding (CT/FM); concatenation -> (FC+BN+ReLU) x 2 -> FC(``out_dim``).
    """

    def __init__(self, image_shape, embed_dim: int, out_dim: int, hidden: int = 256, dropout: float = 0.2, norm: bool = True,
                 time_embed_dim: int = 0, channels=(32, 64, 128), backbone: str = "paper", backbone_config: Optional[dict] = None):
        super().__init__()
        self.image = ImageEncoder(image_shape, hidden, channels, dropout, norm, backbone, backbone_config)
        self.label_in = _fc(embed_dim, hidden, norm)
        self.label_mid = _fc(hidden, hidden, norm)
        self.time_embed_dim = time_embed_dim
        self.time = nn.Sequential(nn.Linear(time_embed_dim, time_embed_dim), nn.ReLU()) if time_embed_dim else None
        self.trunk = nn.Sequential(_fc(2 * hidden + time_embed_dim, hidden, norm), _fc(hidden, hidden, norm), nn.Linear(hidden, out_dim))

    def forward(self, x: Tensor, z: Tensor, t: Optional[Tensor] = None) -> Tensor:
        hz = self.label_in(z)
        hz = hz + self.label_mid(hz)
        parts = [self.image(x), hz]
        if self.time is not None:
            parts.append(self.time(sinusoidal_embedding(t.reshape(-1).expand(x.shape[0]), self.time_embed_dim, scale=100.0).to(x.dtype)))
        return self.trunk(torch.cat(parts, 1))


class NoPropClassifier(ModelMixin, ConfigMixin):
    """A NoProp classifier (DT, CT, FM) or its back-prop baseline.

    Args:
        variant: ``dt``, ``ct``, ``fm`` or ``backprop``.
        image_shape: ``(C, H, W)`` of the inputs (in ``[-1, 1]``).
        num_classes: number of classes.
        num_blocks: ``T`` (DT and back-prop).
        embedding: ``one_hot`` (fixed identity), ``learned`` (orthogonal init) or ``prototype``
            (each class's medoid image, flattened; set with :meth:`init_prototypes`).
        embed_dim: label-embedding size (forced to ``num_classes`` for one-hot, to ``C*H*W`` for prototype).
        hidden_dim, dropout, channels: block sizes (paper: 256, 0.2, (32, 64, 128)).
        time_embed_dim: time features of the CT/FM network.
        backbone: ``paper`` (conv path) or ``model`` (a flowlab velocity network, ``backbone_config``).
        gamma_0, gamma_1: CT schedule ends (``SNR = exp(-gamma)``; ``gamma_0 > gamma_1``).
        schedule_eps: DT schedule clamp.
        solver, inference_steps: CT/FM inference defaults (any core solver).
        inference_noise: DT only: scale ``s`` of the posterior noise in ``z_t = a_t u_hat_t + b_t z_{t-1} + s sqrt(c_t) eps``;
            1 samples ``z_T`` as the paper does, 0 follows the posterior mean (one sampled ``z_T`` per image can land
            on the wrong class even when the blocks agree on the right one; see docs/noprop.md).
    """

    @register_to_config
    def __init__(
        self,
        variant: str = "dt",
        image_shape: tuple = (1, 8, 8),
        num_classes: int = 10,
        num_blocks: int = 10,
        embedding: str = "one_hot",
        embed_dim: int = 20,
        hidden_dim: int = 256,
        dropout: float = 0.2,
        channels: tuple = (32, 64, 128),
        time_embed_dim: int = 64,
        backbone: str = "paper",
        backbone_config: Optional[dict] = None,
        gamma_0: float = 3.0,
        gamma_1: float = -3.0,
        schedule_eps: float = 1e-3,
        solver: str = "euler",
        inference_steps: int = 20,
        inference_noise: float = 1.0,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
        if not 0.0 <= inference_noise <= 1.0:
            raise ValueError(f"inference_noise must be in [0, 1], got {inference_noise!r}")
        image_shape = tuple(image_shape)
        d = {"one_hot": num_classes, "prototype": int(math.prod(image_shape))}.get(embedding, embed_dim)
        self.embed_dim = d
        if embedding == "one_hot":
            self.register_buffer("embed_weight", torch.eye(num_classes))
        elif embedding == "learned":
            w = torch.empty(num_classes, d)
            nn.init.orthogonal_(w)
            self.embed_weight = nn.Parameter(w)
        else:
            self.embed_weight = nn.Parameter(torch.zeros(num_classes, d))
        self.head = nn.Linear(d, num_classes)
        self.init_head()
        common = dict(hidden=hidden_dim, dropout=dropout, channels=tuple(channels), backbone=backbone, backbone_config=backbone_config)
        if variant in ("dt", "backprop"):
            self.blocks = nn.ModuleList(DenoisingBlock(image_shape, d, num_classes, norm=True, **common) for _ in range(num_blocks))
            self.schedule = DiscreteCosineSchedule(num_blocks, schedule_eps)
        else:
            out = num_classes if variant == "ct" else d
            self.net = DenoisingBlock(image_shape, d, out, norm=False, time_embed_dim=time_embed_dim, **common)
            if variant == "ct":
                self.gamma = MonotoneGamma(gamma_0, gamma_1)

    # ------------------------------------------------------------------ pieces
    def label_embedding(self, labels: Tensor) -> Tensor:
        """``u_y`` ``(B, D)`` for integer labels ``(B,)``."""
        return self.embed_weight[labels]

    @torch.no_grad()
    def init_head(self, scale: float = 10.0) -> None:
        """Start the head as the nearest-embedding classifier: ``logits_c = -scale/2 ||z - u_c||^2 + const``
        (``W = scale U``, ``b_c = -scale/2 ||u_c||^2``); a linear head from scratch needs thousands of steps."""
        w = self.embed_weight.detach().float()
        self.head.weight.copy_(scale * w)
        self.head.bias.copy_(-0.5 * scale * w.pow(2).sum(1))

    @torch.no_grad()
    def init_prototypes(self, images: Tensor, labels: Tensor) -> None:
        """Prototype embeddings: each class's medoid image (the one nearest to all others of its class)."""
        flat = images.flatten(1).float()
        for c in range(self.config.num_classes):
            xc = flat[labels == c]
            if len(xc) == 0:
                continue
            medoid = xc[torch.cdist(xc, xc).sum(1).argmin()]
            self.embed_weight[c] = medoid.to(self.embed_weight)
        self.init_head(1.0)

    def mixture(self, logits: Tensor, detach_embedding: bool = False) -> Tensor:
        """``softmax(logits) @ W_embed`` (a probability-weighted mixture of class embeddings)."""
        w = self.embed_weight.detach() if detach_embedding else self.embed_weight
        return logits.softmax(-1) @ w.to(logits.dtype)

    def block_denoise(self, t: int, x: Tensor, z: Tensor, detach_embedding: bool = True) -> Tensor:
        """DT block ``t`` (0-based; the paper's ``t + 1``) predicts ``u_hat`` from ``z_t`` (paper: ``z_{t-1}``)."""
        return self.mixture(self.blocks[t](x, z), detach_embedding)

    def block_squared_error(self, t: int, x: Tensor, z: Tensor, labels: Tensor) -> Tensor:
        """``||u_hat_t(z, x) - u_y||^2`` per example for DT block ``t`` (embedding held fixed), shape ``(B,)``."""
        logits = self.blocks[t](x, z)
        return _MixtureSquaredError.apply(logits.float(), self.embed_weight.detach().float(), labels)

    def ct_denoise(self, x: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """CT prediction ``u_hat(z_t, x, t)``."""
        return self.mixture(self.net(x, z, t))

    def fm_velocity(self, x: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """FM velocity ``v(z_t, x, t)`` in label-embedding space."""
        return self.net(x, z, t)

    # ------------------------------------------------------------------ inference
    def dt_chain(self, x: Tensor, z: Tensor, noise: Optional[list] = None, detach_embedding: bool = False) -> Tensor:
        """The DT recursion ``z_t = a_t u_hat_t + b_t z_{t-1} + sqrt(c_t) eps_t`` from ``z_0 = z``; ``noise`` is a list of
        ``eps_t`` (``None``: deterministic). Returns ``z_T``."""
        a, b, c = (v.to(x.device, x.dtype) for v in self.schedule.inference_coefficients())
        for t in range(len(self.blocks)):
            u_hat = self.block_denoise(t, x, z, detach_embedding)
            z = a[t] * u_hat + b[t] * z
            if noise is not None:
                z = z + c[t].sqrt() * noise[t]
        return z

    def final_state(self, images: Tensor, generator: Optional[torch.Generator] = None, steps: Optional[int] = None,
                    solver: Optional[str] = None) -> Tensor:
        """``z_T`` / ``z_1`` reached from noise ``z_0 ~ N(0, I)`` for ``images`` ``(B, C, H, W)``.

        ``steps`` and ``solver`` choose the ODE integration of the ``ct`` and ``fm`` variants (default: the
        config's ``inference_steps`` / ``solver``).

        Raises:
            ValueError: ``steps`` or ``solver`` given to a ``dt`` or ``backprop`` classifier, whose ``T`` blocks
                are one fixed recursion with nothing to integrate.
        """
        cfg = self.config
        if cfg.variant in ("dt", "backprop"):
            given = [f"{name}={value!r}" for name, value in (("steps", steps), ("solver", solver)) if value is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)}: the NoProp variant {cfg.variant!r} runs its "
                    f"{cfg.num_blocks} blocks as one fixed recursion and has no ODE steps or solver to choose; "
                    "these options apply to the 'ct' and 'fm' variants only (leave them unset)"
                )
        x = images.to(self.device, self.dtype)
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        z0 = torch.randn((x.shape[0], self.embed_dim), generator=gen).to(x)
        if cfg.variant in ("dt", "backprop"):
            noise = None
            scale = getattr(cfg, "inference_noise", 1.0)  # models saved before the option sampled
            if cfg.variant == "dt" and scale > 0:
                noise = [scale * torch.randn((x.shape[0], self.embed_dim), generator=gen).to(x) for _ in self.blocks]
            return self.dt_chain(x, z0, noise)
        steps = steps or cfg.inference_steps
        solver = solver or cfg.solver
        if cfg.variant == "ct":
            path = GammaPath(self.gamma)
            field = lambda z, t: to_velocity(path, self.ct_denoise(x, z, t), z, t, "x1")  # noqa: E731
        else:
            path = LinearPath()
            field = lambda z, t: self.fm_velocity(x, z, t)  # noqa: E731
        return get_solver(solver, path=path).solve(field, z0, time_grid(steps, device=x.device)).x

    @torch.no_grad()
    def class_logits(self, images: Tensor, generator: Optional[torch.Generator] = None, steps: Optional[int] = None,
                     solver: Optional[str] = None) -> Tensor:
        """Class scores ``(B, classes)``: the head on ``z_T`` (DT, CT, back-prop); for FM minus the squared
        distance of ``z_1`` to each class embedding."""
        z = self.final_state(images, generator, steps, solver)
        if self.config.variant == "fm":
            return -torch.cdist(z.float(), self.embed_weight.float()).pow(2)
        return self.head(z)

    def forward(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return self.class_logits(images, generator)

    @torch.no_grad()
    def predict_proba(self, images: Tensor, generator: Optional[torch.Generator] = None, steps: Optional[int] = None,
                      solver: Optional[str] = None) -> Tensor:
        """Class probabilities ``(B, classes)`` (softmax of :meth:`class_logits`)."""
        return self.class_logits(images, generator, steps, solver).float().softmax(-1)

    @torch.no_grad()
    def predict(self, images: Tensor, generator: Optional[torch.Generator] = None, steps: Optional[int] = None,
                solver: Optional[str] = None, batch_size: int = 512) -> Tensor:
        """Class indices ``(B,)`` for images ``(B, C, H, W)`` in ``[-1, 1]`` (eval mode; seeded noise: reproducible).

        ``steps`` / ``solver`` apply to the ``ct`` and ``fm`` variants; a ``dt`` or ``backprop`` classifier refuses
        them with a ``ValueError`` (see :meth:`final_state`)."""
        was = self.training
        self.eval()
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        try:
            out = [self.class_logits(images[i : i + batch_size], gen, steps, solver).argmax(-1) for i in range(0, len(images), batch_size)]
        finally:
            self.train(was)
        return torch.cat(out).cpu()
