"""End-to-end: training really learns (CPU-fast).

* an MLP flow on the 8-Gaussians toy reaches a sliced-Wasserstein distance far below that of
  the untrained model and of N(0, I), close to the data-vs-data floor;
* a class-conditional digits MLP draws the digit it is asked for (judged by the cached digits
  classifier), and classifier-free guidance makes it more so.
"""
import json
import math
import os

import pytest
import torch

from flowlab.data import sample_toy2d
from flowlab.metrics.vectors import sliced_wasserstein
from flowlab.pipelines import FlowPipeline
from flowlab.recipes import Trainer, load_config
from flowlab.recipes.flow_matching.recipe import FlowMatchingRecipe


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_toy_flow_learns_eight_gaussians(tmp_path):
    out = str(tmp_path / "toy")
    n_eval = 4000
    cfg = load_config(
        None,
        [
            f"output_dir={out}",
            "data.name=8gaussians",
            "model.type=mlp",
            "model.hidden_dim=64",
            "model.depth=2",
            "model.time_embed_dim=32",
            "train.batch_size=256",
            "train.max_steps=800",
            "train.warmup_steps=20",
            "train.lr=3e-3",
            "train.log_every=100",
            "train.checkpoint_every=0",
            "train.report_to=none",
            "sample.every=0",
            "sample.num_images=500",
            "eval.every=0",
            f"eval.num_samples={n_eval}",
            "eval.solver=heun",
            "eval.num_inference_steps=16",
        ],
    )
    recipe = FlowMatchingRecipe(cfg)
    final = Trainer(cfg, recipe).train()

    records = _metrics(out)
    evals = [r for r in records if "eval/sliced_w2" in r]
    assert len(evals) == 1 and evals[0]["step"] == 800  # eval.every=0: once, at the end
    trained = evals[0]["eval/sliced_w2"]
    assert final["eval/sliced_w2"] == trained
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]

    # references, on the same evaluation set as the recipe's (seed + 12345) and the same projections
    ref = sample_toy2d("8gaussians", n_eval, seed=cfg.seed + 12345)

    def sw(x):
        return sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(0))

    gaussian = sw(torch.randn(n_eval, 2, generator=torch.Generator().manual_seed(1)))
    floor = sw(sample_toy2d("8gaussians", n_eval, seed=777))  # real vs real: the finite-sample floor
    torch.manual_seed(0)
    untrained_model = recipe.build_model(recipe.build_dataset()).eval()
    untrained = recipe.evaluate(untrained_model, torch.Generator().manual_seed(cfg.seed + 1))["sliced_w2"]

    assert trained < 0.45 * gaussian, (trained, gaussian)
    assert trained < 0.45 * untrained, (trained, untrained)
    # most of the gap to the data is closed
    assert trained - floor < 0.25 * (gaussian - floor), (trained, floor, gaussian)

    # the saved pipeline draws the same kind of samples: points next to the eight modes
    pipe = FlowPipeline.from_pretrained(os.path.join(out, "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    x = pipe(batch_size=2000, generator=torch.Generator().manual_seed(0), output_type="pt").images.double()
    assert x.shape == (2000, 2)
    centers = torch.tensor([(math.cos(a), math.sin(a)) for a in (k * math.pi / 4 for k in range(8))], dtype=torch.float64) * 2.0 / 1.42

    def near_a_mode(p):
        return (torch.cdist(p, centers).min(1).values < 0.5).double().mean().item()

    # data: sd 0.07 around each mode, so ~100% within 0.5; N(0, I): ~36%
    assert near_a_mode(x) > 0.8 and near_a_mode(x) > 2 * near_a_mode(torch.randn(2000, 2, dtype=torch.float64)), near_a_mode(x)
    nearest = torch.cdist(x, centers).argmin(1)
    assert (torch.bincount(nearest, minlength=8) > 100).all()  # no mode dropped


def test_class_conditional_digits_follow_labels_and_guidance(tmp_path):
    from flowlab.metrics.digits import DigitsEvaluator

    out = str(tmp_path / "digits")
    cfg = load_config(
        None,
        [
            f"output_dir={out}",
            "data.name=digits",
            "model.type=mlp",
            "model.hidden_dim=128",
            "model.depth=3",
            "model.time_embed_dim=64",
            "model.class_conditional=true",
            "model.label_dropout=0.2",
            "flow.time_sampler=logit_normal",
            "train.batch_size=128",
            "train.max_steps=400",
            "train.warmup_steps=20",
            "train.lr=2e-3",
            "train.log_every=100",
            "train.checkpoint_every=0",
            "train.report_to=none",
            "sample.every=0",
            "sample.num_images=20",
            "sample.num_inference_steps=8",
            "eval.enabled=false",
        ],
    )
    Trainer(cfg).train()
    pipe = FlowPipeline.from_pretrained(os.path.join(out, "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.velocity_model.num_classes == 10
    evaluator = DigitsEvaluator.load()

    labels = torch.arange(10).repeat_interleave(30)

    def accuracy(w):
        imgs = pipe(class_labels=labels, guidance_scale=w, num_inference_steps=16, solver="heun", generator=torch.Generator().manual_seed(0), output_type="pt").images
        pred = evaluator.predict_proba(imgs, value_range="unit").argmax(1)
        per_class = torch.stack([(pred[labels == k] == k).float().mean() for k in range(10)])
        return (pred == labels).float().mean().item(), per_class

    acc1, per_class1 = accuracy(1.0)
    acc3, _ = accuracy(3.0)
    assert acc1 > 0.6, acc1  # chance is 0.1
    assert (per_class1 > 0.2).all(), per_class1  # every digit is drawn when asked for
    assert acc3 > acc1, (acc1, acc3)
    assert acc3 > 0.85, acc3

    # unconditional samples (the null class learned by label dropout) cover many digits
    imgs = pipe(batch_size=300, generator=torch.Generator().manual_seed(1), output_type="pt").images
    hist = torch.bincount(evaluator.predict_proba(imgs, value_range="unit").argmax(1), minlength=10)
    assert (hist > 0).sum() >= 7, hist
    assert hist.max() < 0.5 * 300, hist
