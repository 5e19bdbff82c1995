"""Sharded (FSDP2) training on two gloo processes on the CPU: each process holds half of every sharded
parameter and of its EMA, the result matches the data-parallel run, resume is exact, and the final
artefact is a whole diffusers pipeline that ``from_pretrained`` loads."""
import json
import os
import pickle
import shutil
import sys
import types

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from conftest import launch_two_cpu_processes, tiny_overrides
from flowlab.errors import CheckpointError, ConfigError
from flowlab.train.checkpoint import check_dcp_metadata, verify_checkpoint
from flowlab.train.strategy import DataParallel, DeepSpeedZero3, Sharded, make_strategy

WEIGHTS = os.path.join("pipeline", "velocity_model", "diffusion_pytorch_model.safetensors")
# grad accumulation (no no_sync under FSDP2: gradients reduce-scattered every micro-step), nested FSDP
# units (every MLP layer of >= 500 parameters gets its own unit, the rest goes to the root's) and a
# sample grid half-way (the EMA model gathered to the main process during training)
RUN = ["train.max_steps=20", "train.checkpoint_every=10", "train.grad_accum_steps=2", "sample.every=10"]
SHARD = ["train.fsdp=true", "train.fsdp_min_num_params=500"]


def _loss(run):
    return [json.loads(x)["loss"] for x in open(run / "metrics.jsonl") if "loss" in json.loads(x)]


def _dcp_chunks(folder):
    """``{tensor name: [(offsets, sizes) of each saved chunk]}`` from a torch.distributed.checkpoint index."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(folder)).read_metadata()
    return {k: [(tuple(c.offsets), tuple(c.sizes)) for c in v.chunks] for k, v in meta.state_dict_metadata.items() if hasattr(v, "chunks")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    ddp, fsdp = root / "ddp", root / "fsdp"
    launch_two_cpu_processes(*tiny_overrides(ddp, *RUN))
    log = launch_two_cpu_processes(*tiny_overrides(fsdp, *RUN, *SHARD))
    return types.SimpleNamespace(root=root, ddp=ddp, fsdp=fsdp, log=log)


def test_two_processes_really_shard(runs):
    assert "2 process(es) [MULTI_CPU]" in runs.log, runs.log[-2000:]
    assert "parameters sharded (FSDP2 by fully_shard)" in runs.log
    ckpt = runs.fsdp / "checkpoints" / "checkpoint-20"
    whole = load_file(runs.fsdp / WEIGHTS)
    for part in ("pytorch_model_fsdp_0", "ema_fsdp"):
        chunks = _dcp_chunks(ckpt / part)
        assert len(chunks) == len(whole), (part, sorted(chunks))  # every (trained) parameter, and the EMA of each
        for name, saved in chunks.items():
            # every process wrote its own half of dimension 0 (the two halves tile the tensor)
            assert len(saved) == 2, (part, name, saved)
            (o0, s0), (o1, s1) = sorted(saved)
            rows = s0[0] + s1[0]
            assert o0[0] == 0 and o1[0] == s0[0] and s0[0] == (rows + 1) // 2 and s0[1:] == s1[1:], (part, name, saved)
    custom = torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=True)
    assert "last_epoch" in custom  # the LR scheduler; the EMA is not pickled whole by the main process
    assert json.loads((ckpt / "ema_state.json").read_text())["optimization_step"] == 20
    assert verify_checkpoint(ckpt)["step"] == 20  # the DCP indexes pass the allow-list


def test_sharded_matches_data_parallel(runs):
    a, b = load_file(runs.ddp / WEIGHTS), load_file(runs.fsdp / WEIGHTS)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    la, lb = _loss(runs.ddp), _loss(runs.fsdp)
    assert len(la) == len(lb) == 2
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), atol=1e-5, rtol=1e-4)
    assert (runs.fsdp / "samples" / "step_0000010.png").is_file()


def test_sharded_resume_is_exact(runs):
    resumed = runs.root / "resumed"
    shutil.copytree(runs.fsdp, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-20")
    shutil.rmtree(resumed / "pipeline")
    log = launch_two_cpu_processes(*tiny_overrides(resumed, *RUN, *SHARD, "train.resume=latest"))
    assert "resumed from" in log and "at step 10" in log, log[-2000:]
    a, b = load_file(runs.fsdp / WEIGHTS), load_file(resumed / WEIGHTS)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _loss(resumed) == _loss(runs.fsdp)


def test_final_artefact_loads_whole(runs):
    from flowlab.pipelines import FlowPipeline

    pipe = FlowPipeline.from_pretrained(str(runs.fsdp / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    state = pipe.velocity_model.state_dict()
    saved = load_file(runs.fsdp / WEIGHTS)
    for k, v in saved.items():  # whole tensors (not shards) of the configured model
        assert state[k].shape == v.shape and torch.equal(state[k], v), k
    assert pipe.velocity_model.config.hidden_dim == 32
    imgs = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert imgs.shape == (2, 8, 8, 1)


# --------------------------------------------------------------------------- set-up errors


def _accelerator(kind=DistributedType.MULTI_CPU, processes=2, fsdp_version=2, zero_stage=2):
    plugin = types.SimpleNamespace(fsdp_version=fsdp_version)
    ds = types.SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": zero_stage}}, zero_stage=zero_stage)
    state = types.SimpleNamespace(fsdp_plugin=plugin, deepspeed_plugin=ds)
    return types.SimpleNamespace(distributed_type=kind, num_processes=processes, state=state)


def _recipe(data_parallel=True):
    return types.SimpleNamespace(name="r", data_parallel=data_parallel)


def test_strategy_choice():
    assert type(make_strategy(_recipe(), _accelerator())) is DataParallel
    assert type(make_strategy(_recipe(), _accelerator(), fsdp=True)) is Sharded
    s = make_strategy(_recipe(), _accelerator(DistributedType.FSDP, 8))  # an accelerate FSDP launch shards
    assert type(s) is Sharded and s.by_accelerate
    assert type(make_strategy(_recipe(), _accelerator(DistributedType.DEEPSPEED, 8, zero_stage=2))) is DataParallel
    assert type(make_strategy(_recipe(), _accelerator(DistributedType.DEEPSPEED, 8, zero_stage=3))) is DeepSpeedZero3


@pytest.mark.parametrize(
    "acc,recipe,match",
    [
        (_accelerator(processes=1), _recipe(), "at least 2 processes"),
        (_accelerator(DistributedType.FSDP, 8, fsdp_version=1), _recipe(), "fsdp_version: 2"),
        (_accelerator(), _recipe(data_parallel=False), "data_parallel = False"),
        (_accelerator(DistributedType.DEEPSPEED, 8, zero_stage=3), _recipe(data_parallel=False), "ZeRO-3: .*data_parallel = False"),
    ],
)
def test_strategy_refuses_what_cannot_shard(acc, recipe, match):
    with pytest.raises(ConfigError, match=match):
        make_strategy(recipe, acc, fsdp=acc.distributed_type != DistributedType.DEEPSPEED)


def test_dcp_index_with_a_foreign_global_is_refused(tmp_path):
    bad = tmp_path / ".metadata"
    bad.write_bytes(pickle.dumps(os.system))
    with pytest.raises(CheckpointError, match=r"\.metadata .*refused global (posix|nt)\.system"):
        check_dcp_metadata(bad)


# --------------------------------------------------------------------------- RL under FSDP2


def _rl_args(out, base, *extra):
    return ["--config", "configs/nft_digits.yaml", f"output_dir={out}", f"rl.base={base}", "train.batch_size=2", "rl.group_size=4",
            "train.max_steps=3", "train.log_every=1", "train.checkpoint_every=0", "train.report_to=none", "rl.num_inference_steps=4",
            "rl.eval_samples=8", "rl.eval_steps=2", "sample.num_images=4", "sample.every=0", "eval.every=0", "eval.enabled=false", *extra]


@pytest.fixture(scope="module")
def rl_base(tmp_path_factory):
    from conftest import run_checked

    out = tmp_path_factory.mktemp("rl_base")
    run_checked([sys.executable, "train.py", "--config", "configs/quickstart.yaml", f"output_dir={out}", "model.hidden_dim=32",
                 "model.depth=2", "model.time_embed_dim=16", "train.max_steps=10", "train.report_to=none", "eval.enabled=false",
                 "sample.every=0", "train.checkpoint_every=0"])
    return out / "pipeline"


@pytest.mark.parametrize("lora", [0, 4], ids=["full_finetune", "lora"])
def test_nft_sharded_matches_data_parallel(tmp_path, rl_base, lora):
    """DiffusionNFT full fine-tuning (its frozen old-policy copy sharded too, soft-updated shard by shard)
    and LoRA (peft adapters inside the sharded units; the old policy is the ``old`` adapter)."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    launch_two_cpu_processes(*_rl_args(ddp, rl_base, f"rl.lora_rank={lora}"))
    log = launch_two_cpu_processes(*_rl_args(fsdp, rl_base, f"rl.lora_rank={lora}", *SHARD))
    assert "2 process(es) [MULTI_CPU]" in log and "parameters sharded" in log, log[-2000:]
    a, b, base = (load_file(p / "velocity_model" / "diffusion_pytorch_model.safetensors") for p in (ddp / "pipeline", fsdp / "pipeline", rl_base))
    assert a.keys() == b.keys() == base.keys()
    assert max((a[k] - base[k]).abs().max() for k in a) > 0  # the fine-tune changed the model
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(_loss(fsdp)), torch.tensor(_loss(ddp)), atol=1e-5, rtol=1e-4)
    if lora:  # the adapter is saved in diffusers' LoRA layout next to the merged pipeline
        assert sorted(p.name for p in (fsdp / "pipeline").rglob("*lora*.safetensors")) == sorted(p.name for p in (ddp / "pipeline").rglob("*lora*.safetensors"))
