"""``train.compile``: the model runs through ``torch.compile`` (accelerate's ``dynamo_backend="inductor"``) and
trains to the same losses and weights as without, and the artefacts are those of the plain model."""
import json
import os

import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from flowlab.pipelines import FlowPipeline
from flowlab.recipes import Trainer, load_config


def _run(out, compile_):
    cfg = load_config(None, tiny_overrides(out, f"train.compile={compile_}", "train.max_steps=6", "train.log_every=2", "train.checkpoint_every=0"))
    trainer = Trainer(cfg)
    trainer.train()
    losses = [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]
    return trainer, losses


def test_compiled_training_matches_eager(tmp_path):
    eager, eager_losses = _run(str(tmp_path / "eager"), "false")
    compiled, compiled_losses = _run(str(tmp_path / "compiled"), "true")
    assert type(compiled.model).__name__ == "OptimizedModule"  # the model really ran through torch.compile
    assert type(eager.model).__name__ == "MLPVelocity"
    assert len(eager_losses) == len(compiled_losses) == 3
    assert torch.allclose(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-5, atol=1e-6), (compiled_losses, eager_losses)
    # the EMA copy (sampling, evaluation, the saved pipeline) is the plain module, with the same weights
    assert type(compiled.ema_model()).__name__ == "MLPVelocity"
    w = [load_file(str(tmp_path / run / "pipeline" / "velocity_model" / "diffusion_pytorch_model.safetensors")) for run in ("eager", "compiled")]
    assert w[0].keys() == w[1].keys()
    for k in w[0]:
        assert torch.allclose(w[0][k], w[1][k], atol=1e-5), k
    pipe = FlowPipeline.from_pretrained(str(tmp_path / "compiled" / "pipeline"))
    assert type(pipe.velocity_model).__name__ == "MLPVelocity"
