"""Reflow pairs: noises ``x0``, labels ``y`` and the teacher's ODE solutions ``x1 = Phi_teacher(x0 | y)``.

Reflow (Liu et al., 2022, "Flow straight and fast", Sec. 2.2) trains a new flow on the straight paths
``x_t = (1 - t) x0 + t x1`` between the two ends of the teacher's ODE trajectories: the coupling
``(x0, x1)`` is deterministic and its paths do not cross, so the student's field is straighter and a
few Euler steps follow it closely. The pairs are a fixed set, drawn once from the run's seed and
kept in the run folder (``reflow_pairs.safetensors``), so a resumed run trains on the same pairs
without sampling the teacher again.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ...data.base import InMemoryDataset
from ...errors import ConfigError, DataError
from ...fileio import atomic_path
from ...pipelines import FlowPipeline
from ...pipelines.loading import load_flow_pipeline

__all__ = ["ReflowPairs", "load_teacher", "teacher_fingerprint", "generate_pairs", "load_or_generate_pairs", "PAIRS_FILE"]

#: The cache of a run's pairs, in its output folder.
PAIRS_FILE = "reflow_pairs.safetensors"
TEACHER_REQUIRED = "reflow.teacher: required: the FlowPipeline folder to distil (e.g. runs/quickstart/pipeline)"


class ReflowPairs(InMemoryDataset):
    """Teacher pairs as an in-memory dataset: items ``{"x": x1, "x0": x0, "label": y}``.

    Args:
        x0: noises ``(N, *sample_shape)``.
        x1: the teacher's samples from them ``(N, *sample_shape)``.
        labels: ``(N,)`` class labels (``None``: an unconditional teacher).
        num_classes: the teacher's number of classes (``0``: unconditional).
        kind: ``image`` (``(C, H, W)`` samples in ``[-1, 1]``) or ``vector``.
    """

    def __init__(self, x0: Tensor, x1: Tensor, labels: Tensor | None, num_classes: int, kind: str):
        if x0.shape != x1.shape:
            raise DataError(f"reflow pairs: noise {tuple(x0.shape)} and samples {tuple(x1.shape)} differ in shape")
        super().__init__(x1, labels, num_classes=num_classes, kind=kind)
        self.x0 = x0

    def __getitem__(self, i: int) -> dict:
        return {**super().__getitem__(i), "x0": self.x0[i]}

    def get_batch(self, indices: Tensor) -> dict:
        return {**super().get_batch(indices), "x0": self.x0[indices]}


def load_teacher(reference: str | None) -> FlowPipeline:
    """The teacher pipeline named by ``reflow.teacher`` (a ``FlowPipeline`` folder or Hub id) of a plain
    velocity model (not a MeanFlow model).

    Raises:
        ConfigError: naming ``reflow.teacher``: not set, missing, not a ``FlowPipeline``, or a MeanFlow model.
    """
    if not reference:
        raise ConfigError(TEACHER_REQUIRED)
    pipe = load_flow_pipeline(reference, "reflow.teacher")
    if pipe.scheduler.config.mean_flow:
        raise ConfigError(f"reflow.teacher: {reference!r} holds a MeanFlow model; reflow distils a velocity model's ODE")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def teacher_fingerprint(teacher: FlowPipeline) -> str:
    """SHA-256 of the teacher's weights (names, shapes, dtypes and bytes) and scheduler config: two teachers
    with equal fingerprints draw the same pairs."""
    h = hashlib.sha256(json.dumps(dict(teacher.scheduler.config), sort_keys=True, default=str).encode())
    for name, t in sorted(teacher.velocity_model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def generate_pairs(
    teacher: FlowPipeline,
    num_pairs: int,
    seed: int,
    solver: str,
    steps: int,
    guidance_scale: float = 1.0,
    batch_size: int = 1000,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> ReflowPairs:
    """Draw ``num_pairs`` teacher pairs.

    From ``torch.Generator().manual_seed(seed)``: the noises ``x0 ~ N(0, I)`` ``(num_pairs, *sample_shape)``,
    then (a class-conditional teacher) labels ``y ~ U{0, ..., K-1}`` ``(num_pairs,)``. Each ``x1`` is the
    teacher pipeline's own sample from ``latents=x0``, ``class_labels=y`` (``solver`` at ``steps`` steps,
    guidance ``guidance_scale``), in model space, computed ``batch_size`` pairs at a time on ``device``.
    """
    model = teacher.velocity_model
    shape, num_classes = tuple(model.sample_shape), int(model.num_classes)
    if guidance_scale != 1.0 and num_classes == 0:
        raise ConfigError("reflow.teacher_guidance_scale: classifier-free guidance needs a class-conditional teacher; set it to 1")
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((num_pairs, *shape), generator=g)
    labels = torch.randint(num_classes, (num_pairs,), generator=g) if num_classes > 0 else None
    teacher.to(device)
    from tqdm.auto import tqdm

    x1 = []
    with tqdm(total=num_pairs, unit="pair", desc="reflow: teacher pairs", disable=not progress) as bar:
        for start in range(0, num_pairs, batch_size):
            end = min(start + batch_size, num_pairs)
            out = teacher(
                batch_size=end - start, latents=x0[start:end].to(device), class_labels=None if labels is None else labels[start:end],
                solver=solver, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent",
            )
            x1.append(out.images.float().cpu())
            bar.update(end - start)
    x1 = torch.cat(x1)
    if not torch.isfinite(x1).all():
        raise DataError(f"reflow.teacher: the teacher's {solver}-{steps} samples hold non-finite values")
    return ReflowPairs(x0, x1, labels, num_classes, "image" if len(shape) == 3 else "vector")


def _save_pairs(path: Path, pairs: ReflowPairs, key: dict) -> None:
    from safetensors.torch import save_file

    tensors = {"x0": pairs.x0.contiguous(), "x1": pairs.x.contiguous()}
    if pairs.labels is not None:
        tensors["labels"] = pairs.labels.contiguous()
    meta = {"key": json.dumps(key, sort_keys=True), "num_classes": str(pairs.num_classes), "kind": pairs.kind}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def _read_key(path: Path) -> dict | None:
    """The key a cache file was written under (``None``: no readable cache)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return json.loads((f.metadata() or {}).get("key", "null"))
    except (OSError, ValueError, json.JSONDecodeError):
        return None


def _load_pairs(path: Path) -> ReflowPairs:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    return ReflowPairs(t["x0"], t["x1"], t.get("labels"), int(meta["num_classes"]), meta["kind"])


def load_or_generate_pairs(path: str | os.PathLike, key: dict, generate: Callable[[], ReflowPairs], resuming: bool = False,
                           log: Callable[[str], None] = print) -> ReflowPairs:
    """The pairs cached at ``path`` if they were drawn under ``key`` (teacher fingerprint, seed, solver, ...),
    else ``generate()``'s, written there atomically (a reader never sees half a file).

    Raises:
        ConfigError: ``resuming`` and the cache was drawn under another key (the run would change its
            training data midway).
    """
    path = Path(path)
    found = _read_key(path) if path.is_file() else None
    if found == key:
        log(f"flowlab reflow: reusing the {key['num_pairs']} teacher pairs in {path}")
        return _load_pairs(path)
    if found is not None:
        changed = sorted(k for k in set(key) | set(found) if key.get(k) != found.get(k))
        if resuming:
            raise ConfigError(
                f"reflow: {path} holds pairs drawn with other settings ({', '.join(changed)}) than this resumed run's; "
                "resume with the run's own reflow.* settings and teacher, or start afresh with train.overwrite=true"
            )
        log(f"flowlab reflow: {path} was drawn with other settings ({', '.join(changed)}); drawing new pairs")
    pairs = generate()
    _save_pairs(path, pairs, key)
    return pairs
