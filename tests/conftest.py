import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The test models are tiny: one intra-op thread is faster than two fighting over a shared
# 2-core machine (and subprocesses inherit the setting).
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def tiny_overrides(output_dir, *extra):
    """A digits run small enough for tests: tiny MLP, few steps, no trackers."""
    return [
        f"output_dir={output_dir}",
        "data.name=digits",
        "model.type=mlp",
        "model.hidden_dim=32",
        "model.depth=2",
        "model.time_embed_dim=16",
        "train.batch_size=32",
        "train.max_steps=40",
        "train.warmup_steps=5",
        "train.lr=1e-3",
        "train.log_every=10",
        "train.checkpoint_every=20",
        "train.report_to=none",
        "sample.every=0",
        "sample.num_images=4",
        "sample.num_inference_steps=2",
        "eval.enabled=false",
        *extra,
    ]


@pytest.fixture(scope="session", autouse=True)
def _flowlab_cache(tmp_path_factory):
    os.environ.setdefault("FLOWLAB_CACHE", str(tmp_path_factory.mktemp("flowlab_cache")))
