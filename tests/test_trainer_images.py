"""Training on a user's image folder through 🤗 datasets, with and without DataLoader workers."""
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import tiny_overrides
from flowlab.recipes import Trainer, load_config


def _folder(root):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        os.makedirs(root / cls)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def _run(out, folder, *extra):
    cfg = load_config(None, tiny_overrides(
        out, "data.name=imagefolder", f"data.path={folder}", "data.resolution=8", "data.label_column=label",
        "model.type=unet", "model.block_out_channels=[8,16]", "model.norm_num_groups=4", "model.attention_head_dim=8",
        "model.layers_per_block=1", "model.class_conditional=true",
        "train.max_steps=3", "train.batch_size=4", "train.checkpoint_every=0", *extra))
    Trainer(cfg).train()
    return load_file(os.path.join(out, "pipeline", "velocity_model", "diffusion_pytorch_model.safetensors"))


def test_imagefolder_training_is_the_same_with_workers(tmp_path):
    folder = _folder(tmp_path / "imgs")
    a = _run(str(tmp_path / "a"), folder)
    b = _run(str(tmp_path / "b"), folder, "data.num_workers=2")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert os.path.isfile(tmp_path / "a" / "samples" / "step_0000003.png")
