"""The conditional digits RL task: class labels as prompts, the reward of each sample's prompted class,
FlowGRPO with CFG against CFG-free NFT (configs/*_digits_cond.yaml, eval/bench_nft_cond.py)."""
import json
import os
import sys

import pytest
import torch

from test_nft import _metrics, _rl_args, tiny_base, train  # noqa: F401  (tiny_base is a fixture)

from flowlab.recipes import load_config
from flowlab.rewards.digits import DigitsClassifierReward

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cond_args(recipe, out, base, *extra):
    args = _rl_args(recipe, out, base, *extra)  # "--config", the unconditional config, then the small-run overrides
    return ["--config", f"configs/{recipe}_digits_cond.yaml", *args[2:]]


def test_conditional_configs_differ_only_in_method_and_guidance():
    nft = load_config(os.path.join(REPO, "configs/nft_digits_cond.yaml"))
    grpo = load_config(os.path.join(REPO, "configs/flowgrpo_digits_cond.yaml"))
    for cfg in (nft, grpo):
        assert cfg.rl.class_labels == list(range(10))
        assert cfg.rl.rewards == [{"name": "digits_classifier", "target": "prompted"}]
    assert nft.rl.guidance_scale == nft.rl.eval_guidance_scale == 1.0  # CFG-free rollouts and evaluation
    assert grpo.rl.guidance_scale > 1.0 and grpo.rl.eval_guidance_scale == grpo.rl.guidance_scale  # CFG, as its reference
    # the same rollout budget, sampler and evaluation
    for key in ("group_size", "num_inference_steps", "eval_solver", "eval_steps", "adv_std_floor", "adv_clip"):
        assert getattr(nft.rl, key) == getattr(grpo.rl, key), key
    for key in ("max_steps", "batch_size", "ema_decay", "weight_decay", "max_grad_norm"):
        assert getattr(nft.train, key) == getattr(grpo.train, key), key


@pytest.mark.parametrize("recipe", ["nft", "flowgrpo"])
def test_each_sample_is_rewarded_for_its_own_class(recipe, tiny_base, tmp_path, monkeypatch):  # noqa: F811
    calls = []
    score = DigitsClassifierReward.score

    def recording_score(self, images, prompts, metadata):
        calls.append((images.clone(), list(prompts), [dict(m) for m in metadata]))
        return score(self, images, prompts, metadata)

    monkeypatch.setattr(DigitsClassifierReward, "score", recording_score)
    out = tmp_path / "run"
    train(*_cond_args(recipe, out, tiny_base, "train.max_steps=2", "train.checkpoint_every=0"))
    rec = [r for r in _metrics(out) if "reward_mean" in r]
    assert [r["step"] for r in rec] == [1, 2]
    # the rollouts of the two steps (2 conditions x G = 4 each), then the final evaluation (rl.eval_samples = 8)
    assert [len(c[1]) for c in calls] == [8, 8, 8]
    for step, (images, prompts, meta) in enumerate(calls[:2]):
        labels = [m["condition"] for m in meta]
        assert all(isinstance(c, int) and 0 <= c <= 9 for c in labels)
        assert prompts == [str(c) for c in labels]
        assert labels[:4] == [labels[0]] * 4 and labels[4:] == [labels[4]] * 4  # a group shares its prompt
        # the logged reward is the mean probability of each sample's own class
        fixed = torch.stack([score(DigitsClassifierReward(target=c), images[i : i + 1], None, None)[0] for i, c in enumerate(labels)])
        assert rec[step]["reward_mean"] == pytest.approx(float(fixed.mean()), abs=1e-6)
    assert [m["condition"] for m in calls[2][2]] == list(range(8))  # evaluation cycles through the classes
    # FlowGRPO samples its rollouts with CFG (two branches per sample), NFT without
    cfg_factor = 2 if recipe == "flowgrpo" else 1
    assert rec[0]["memory/images_per_rollout_chunk"] == 8 * cfg_factor


def test_prompted_reward_on_unconditional_rollouts_is_a_clear_error(tiny_base, tmp_path):  # noqa: F811
    from flowlab.cli import train_main
    from flowlab.errors import RewardError

    with pytest.raises(RewardError, match=r"target 'prompted' .*sample 0 has None \(an unconditional sample: set rl\.class_labels"):
        train_main(_cond_args("nft", tmp_path / "x", tiny_base, "rl.class_labels=[]", "train.max_steps=1"))


def test_bench_nft_cond_writes_the_promised_json(tiny_base, tmp_path):  # noqa: F811
    sys.path.insert(0, os.path.join(REPO, "eval"))
    import bench_nft_cond

    out, work = tmp_path / "bench.json", tmp_path / "w"
    common = ["--base", tiny_base, "--budget", "16", "--lrs", "1e-4", "--seeds", "0", "1", "--per-class", "4", "--cfg-grid", "1", "2",
              "--workdir", str(work), "--override", "train.batch_size=2", "rl.group_size=4", "rl.num_inference_steps=2", "rl.eval_steps=2"]
    assert bench_nft_cond.main([*common, "--methods", "nft"]) == 0  # one method per process ...
    assert bench_nft_cond.main([*common, "--reuse", "--json", str(out)]) == 0  # ... FlowGRPO trained, NFT read back
    res = json.loads(out.read_text())
    w = load_config(os.path.join(REPO, "configs/flowgrpo_digits_cond.yaml")).rl.guidance_scale
    assert res["guidance_scale"] == w and res["base_cfg"]["guidance_scale"] == w and res["base_no_cfg"]["guidance_scale"] == 1.0
    assert [q["guidance_scale"] for q in res["base_cfg_sweep"]] == sorted({1.0, 2.0, w})
    for q in res["base_cfg_sweep"]:
        assert len(q["fd_per_class"]) == 10 and q["fd_class_mean"] == pytest.approx(sum(q["fd_per_class"]) / 10)
        assert 0.0 <= q["reward"] <= 1.0 and q["fd_all"] > 0
    for m in ("nft", "flowgrpo"):
        assert res[m]["rollouts"] == [8, 16] and len(res[m]["reward"]) == 2 and len(res[m]["seconds"]) == 2
        assert res[m]["seeds"] == [0, 1] and res[m]["lr"] == 1e-4
        assert all(r["quality"]["guidance_scale"] == res[m]["eval_guidance_scale"] for r in res[m]["runs"])
    assert res["nft"]["eval_guidance_scale"] == 1.0 and res["flowgrpo"]["eval_guidance_scale"] == w
    assert "rollout_ratio" in res and "time_ratio" in res
    assert sorted(os.listdir(work)) == ["flowgrpo_lr0.0001_s0", "flowgrpo_lr0.0001_s1", "nft_lr0.0001_s0", "nft_lr0.0001_s1"]
