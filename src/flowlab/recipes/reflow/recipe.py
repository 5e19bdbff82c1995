"""The reflow recipe (``recipe: reflow``): distil a trained ``FlowPipeline`` into a straighter one that
samples well with one or two Euler steps (Liu et al., 2022, rectified flow's "reflow").

1. Pairs (:mod:`.pairs`): ``reflow.num_pairs`` noises ``x0`` and labels ``y`` from the run's seed, each carried
   to ``x1`` by the teacher's ODE (``reflow.teacher_solver`` / ``teacher_steps`` / ``teacher_guidance_scale``),
   drawn once and cached in the run folder (a resumed run reuses them).
2. Training: :class:`~flowlab.recipes.flow_matching.recipe.FlowMatchingRecipe`'s step on those pairs instead
   of (data, fresh noise): the flow-matching loss on the straight path ``x_t = (1 - t) x0 + t x1``, target
   ``x1 - x0`` (velocity), with the ``flow:`` section's time sampler and the same label dropout (the null class
   learns the straight coupling of the label-marginal). The student starts from the teacher's weights
   (``reflow.init_from_teacher``; ``model.pretrained`` names other ones).

The saved artefact is an ordinary ``FlowPipeline`` whose scheduler defaults to the ``sample:`` section
(Euler at 2 steps by default)::

    pipe = FlowPipeline.from_pretrained("runs/reflow_digits/pipeline")
    images = pipe(class_labels=list(range(10)), num_inference_steps=1, solver="euler").images
"""
from __future__ import annotations

import copy
import os

import torch

from ...card_data import looks_like_repo_id
from ...errors import ConfigError
from ...train.config import Config
from ..flow_matching.recipe import FlowMatchingRecipe, build_velocity_model
from .pairs import PAIRS_FILE, TEACHER_REQUIRED, ReflowPairs, generate_pairs, load_or_generate_pairs, load_teacher, teacher_fingerprint

__all__ = ["ReflowRecipe"]


class ReflowRecipe(FlowMatchingRecipe):
    """Reflow distillation of ``reflow.teacher`` (``recipe: reflow``); see the module docstring."""

    name = "reflow"

    def __init__(self, config: Config):
        f = config.flow
        if f.path != "linear":
            raise ConfigError(f"flow.path: reflow trains on the straight path between teacher pairs; set it to 'linear', got {f.path!r}")
        if f.coupling != "independent":
            raise ConfigError(
                f"flow.coupling: the teacher's pairs are reflow's coupling (noise and sample are not re-paired); set it to 'independent', got {f.coupling!r}"
            )
        if not config.reflow.teacher:
            raise ConfigError(TEACHER_REQUIRED)
        super().__init__(config)
        self._teacher = None

    # ------------------------------------------------------------------ teacher and pairs
    @property
    def teacher(self):
        """The teacher ``FlowPipeline`` (loaded on first use; dropped once the pairs exist)."""
        if self._teacher is None:
            self._teacher = load_teacher(self.config.reflow.teacher)
        return self._teacher

    def prepare(self) -> None:
        """Load the teacher now, so a wrong ``reflow.teacher`` fails before the run folder is touched."""
        self.teacher  # noqa: B018

    def pairs_key(self) -> dict:
        """What the pairs are a function of: the teacher (its reference and weights' fingerprint), the seed and
        the ``reflow.*`` sampling settings. A cache drawn under another key is not reused."""
        r = self.config.reflow
        return {
            "teacher": r.teacher, "teacher_sha256": teacher_fingerprint(self.teacher), "seed": self.config.seed, "num_pairs": r.num_pairs,
            "solver": r.teacher_solver, "steps": r.teacher_steps, "guidance_scale": float(r.teacher_guidance_scale),
        }

    def build_dataset(self) -> ReflowPairs:
        """The teacher pairs, from ``<output_dir>/reflow_pairs.safetensors`` when it holds this run's, else drawn now
        (the main process draws and writes them, the others then read the file)."""
        from accelerate import PartialState

        r, state = self.config.reflow, PartialState()
        path = os.path.join(self.config.output_dir, PAIRS_FILE)

        def generate() -> ReflowPairs:
            return generate_pairs(
                self.teacher, r.num_pairs, self.config.seed, r.teacher_solver, r.teacher_steps, r.teacher_guidance_scale,
                batch_size=r.generation_batch_size, device=state.device, progress=state.is_main_process,
            )

        with state.main_process_first():
            return load_or_generate_pairs(path, self.pairs_key(), generate, resuming=self.config.train.resume is not None, log=state.print)

    # ------------------------------------------------------------------ student
    def build_model(self, dataset: ReflowPairs):
        """The student: a copy of the teacher's network (``reflow.init_from_teacher``, the default), the network of
        ``model.pretrained`` when set, or a new one from ``model.*``. It is class-conditional when the teacher is
        (a new network: when ``model.class_conditional`` also asks for it) and learns from the pairs' labels.
        The teacher is released afterwards: the pairs are all training needs of it."""
        cfg = self.config
        self.sample_shape, self.kind = tuple(dataset.sample_shape), dataset.kind
        if cfg.model.pretrained or cfg.reflow.init_from_teacher:
            key = "model.pretrained" if cfg.model.pretrained else "reflow.teacher"
            if cfg.model.pretrained:
                model = build_velocity_model(cfg, self.sample_shape, dataset.num_classes)
            else:
                teacher_prediction = self.teacher.scheduler.config.prediction_type
                if teacher_prediction != cfg.flow.prediction_type:
                    raise ConfigError(
                        f"flow.prediction_type: the student starts from the teacher's weights, which predict {teacher_prediction!r}; "
                        f"set it to {teacher_prediction!r} (or reflow.init_from_teacher=false)"
                    )
                model = copy.deepcopy(self.teacher.velocity_model).to("cpu")
            if int(model.num_classes) != dataset.num_classes:
                raise ConfigError(f"{key}: the student network has {model.num_classes} classes, the teacher's pairs {dataset.num_classes}")
            self.num_classes = dataset.num_classes
        else:
            if cfg.model.class_conditional and dataset.num_classes == 0:
                raise ConfigError("model.class_conditional: the teacher is unconditional, so its pairs have no labels; set model.class_conditional=false")
            self.num_classes = dataset.num_classes if cfg.model.class_conditional else 0
            model = build_velocity_model(cfg, self.sample_shape, self.num_classes)
        self._teacher = None
        return model

    def data_labels_noise(self, batch, ctx):
        """The pair ``(x1, y, x0)`` of each row: flow matching's labels (with its label dropout; its fresh noise
        is drawn, keeping the step's random stream in flow matching's order, and replaced by the pair's ``x0``)."""
        x1, labels, _ = super().data_labels_noise(batch, ctx)
        return x1, labels, batch["x0"].to(x1.dtype)

    def card_data(self, repo_id: str) -> dict:
        """Flow matching's card fields; a teacher on the Hub is the card's ``base_model`` (unless ``model.pretrained`` is)."""
        data = super().card_data(repo_id)
        if "base_model" not in data and looks_like_repo_id(self.config.reflow.teacher):
            data["base_model"] = self.config.reflow.teacher
        return data
