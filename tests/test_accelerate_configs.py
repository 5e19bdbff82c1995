"""configs/accelerate/*.yaml: each loads with accelerate's own config loader and turns into the
launch arguments / environment it documents (no GPU needed); the trainer's guard for sharded
setups refuses the combinations that would train wrongly and fills in what DeepSpeed needs."""
import glob
import os
import types

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils.launch import prepare_multi_gpu_env

from conftest import ROOT
from flowlab.errors import ConfigError
from flowlab.recipes import load_config
from flowlab.train.trainer import _check_sharded_setup

ACC = os.path.join(ROOT, "configs", "accelerate")
FILES = sorted(glob.glob(os.path.join(ACC, "*.yaml")))


def _launch_args(name, *extra):
    """What ``accelerate launch --config_file <name> ... train.py`` would run with."""
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", os.path.join(ACC, name), *extra, "train.py"])
    args, _, _ = _validate_launch_command(args)
    return args


def test_the_four_setups_exist():
    assert {os.path.basename(f) for f in FILES} >= {"ddp_gpu.yaml", "ddp_multinode.yaml", "fsdp.yaml", "deepspeed_zero2.yaml"}


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(f) for f in FILES])
def test_loads_with_accelerates_loader(path):
    cfg = load_config_from_file(path)  # raises on keys this accelerate does not know
    assert isinstance(cfg, ClusterConfig)
    assert cfg.num_processes >= 2 and cfg.mixed_precision == "bf16"
    text = open(path).read()
    assert "accelerate launch --config_file configs/accelerate/" + os.path.basename(path) in text  # usage in the header


def test_multinode_placeholders_are_documented():
    cfg = load_config_from_file(os.path.join(ACC, "ddp_multinode.yaml"))
    assert cfg.distributed_type == DistributedType.MULTI_GPU and cfg.num_machines == 2
    assert cfg.num_processes % cfg.num_machines == 0  # total processes over all nodes
    text = open(os.path.join(ACC, "ddp_multinode.yaml")).read()
    for key in ("main_process_ip", "main_process_port", "machine_rank", "num_processes"):
        assert f"#   {key}" in text, key
    args = _launch_args("ddp_multinode.yaml", "--machine_rank", "1", "--main_process_ip", "192.168.0.7")
    assert (args.machine_rank, args.main_process_ip, args.num_machines, args.multi_gpu) == (1, "192.168.0.7", 2, True)


def test_fsdp_is_fsdp2_full_shard_with_sharded_checkpoints():
    cfg = load_config_from_file(os.path.join(ACC, "fsdp.yaml"))
    assert cfg.distributed_type == DistributedType.FSDP
    env = prepare_multi_gpu_env(_launch_args("fsdp.yaml"))
    assert env["FSDP_VERSION"] == "2"  # flowlab's Sharded strategy refuses FSDP1
    assert env["FSDP_RESHARD_AFTER_FORWARD"] == "true"  # FULL_SHARD
    assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"  # accelerate's sharded save_state
    assert env["FSDP_AUTO_WRAP_POLICY"] == "SIZE_BASED_WRAP" and int(env["FSDP_MIN_NUM_PARAMS"]) > 0
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.constants import FSDP_AUTO_WRAP_POLICY, FSDP_STATE_DICT_TYPE
    from torch.distributed.fsdp import StateDictType

    assert env["FSDP_AUTO_WRAP_POLICY"] in FSDP_AUTO_WRAP_POLICY and env["FSDP_STATE_DICT_TYPE"] in FSDP_STATE_DICT_TYPE
    # the plugin accelerate builds from this environment on every process of the launch
    fsdp_env = {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}
    old = {k: os.environ.get(k) for k in fsdp_env}
    os.environ.update(fsdp_env)
    try:
        plugin = FullyShardedDataParallelPlugin()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT


def test_deepspeed_is_zero2_and_leaves_accumulation_to_one_step():
    cfg = load_config_from_file(os.path.join(ACC, "deepspeed_zero2.yaml"))
    assert cfg.distributed_type == DistributedType.DEEPSPEED
    ds = cfg.deepspeed_config
    assert ds["zero_stage"] == 2 and ds["gradient_accumulation_steps"] == 1
    assert float(ds["gradient_clipping"]) == load_config().train.max_grad_norm  # matches flowlab's default
    args = _launch_args("deepspeed_zero2.yaml")
    assert args.use_deepspeed and args.zero_stage == 2 and float(args.gradient_clipping) == 1.0


def test_deepspeed_zero3_builds_whole_models_and_leaves_accumulation_to_one_step():
    cfg = load_config_from_file(os.path.join(ACC, "deepspeed_zero3.yaml"))
    assert cfg.distributed_type == DistributedType.DEEPSPEED
    ds = cfg.deepspeed_config
    assert ds["zero_stage"] == 3 and ds["gradient_accumulation_steps"] == 1
    assert ds["zero3_init_flag"] is False  # recipes build whole models; accelerator.prepare partitions them
    assert float(ds["gradient_clipping"]) == load_config().train.max_grad_norm
    args = _launch_args("deepspeed_zero3.yaml")
    assert args.use_deepspeed and args.zero_stage == 3


# --------------------------------------------------------------------------- the trainer's guard


def _fake_accelerator(kind, ds_config=None, zero_stage=None, processes=4):
    plugin = types.SimpleNamespace(deepspeed_config=ds_config or {}, zero_stage=zero_stage)
    return types.SimpleNamespace(distributed_type=kind, num_processes=processes, state=types.SimpleNamespace(deepspeed_plugin=plugin))


def test_guard_lets_fsdp_through():  # the Sharded strategy handles it (tests/test_fsdp.py)
    _check_sharded_setup(_fake_accelerator(DistributedType.FSDP), load_config(None, ["train.grad_accum_steps=4"]).train, 8)


def test_guard_deepspeed_zero3_is_let_through_with_its_micro_batch():  # DeepSpeedZero3 gathers (strategy.py)
    ds = {"zero_optimization": {"stage": 3}}
    _check_sharded_setup(_fake_accelerator(DistributedType.DEEPSPEED, ds), load_config().train, 4)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["train_batch_size"] == 16


def test_guard_deepspeed_zero2_gets_its_micro_batch():
    ds = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": "auto", "train_micro_batch_size_per_gpu": "auto"}
    _check_sharded_setup(_fake_accelerator(DistributedType.DEEPSPEED, ds), load_config().train, 8)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 1


@pytest.mark.parametrize(
    "ds,overrides,match",
    [
        ({"zero_optimization": {"stage": 4}}, [], "zero_stage: 4 is not a ZeRO stage"),
        ({"zero_optimization": {"stage": 2}}, ["train.grad_accum_steps=2"], "train.grad_accum_steps"),
        ({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4}, [], "gradient_accumulation_steps=4"),
    ],
)
def test_guard_refuses_what_deepspeed_would_get_wrong(ds, overrides, match):
    with pytest.raises(ConfigError, match=match):
        _check_sharded_setup(_fake_accelerator(DistributedType.DEEPSPEED, ds), load_config(None, overrides).train, 8)


def test_guard_leaves_ddp_alone():
    for kind in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        _check_sharded_setup(_fake_accelerator(kind), load_config(None, ["train.grad_accum_steps=4"]).train, 8)
