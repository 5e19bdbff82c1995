"""Reference fidelity and memory layout of the SD3 RL recipes (issue 11), on the tiny SD3 pipeline.

* timesteps: the sampler's grid is diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` grid,
  and NFT / FlowGRPO train ``int(steps * 0.99)`` of its steps as the references do;
* FlowGRPO: the unconditional CFG branch carries no gradient; zero-advantage samples are left out;
  ``rl.steps_per_rollout`` splits one rollout batch over several optimiser steps;
* LoRA starts with peft's gaussian init; latents decode in float32;
* memory: ``rl.micro_batch`` parts give the single-batch gradient, and the activations saved per part
  grow with the micro-batch, not with the global batch;
* prompt data: JSONL metadata reaches the rewards, a held-out set is evaluated; prompt embeddings cache;
* every shipped SD3.5 config runs two steps with tiny components through overrides;
* SD3 on the family adapter: one step of each recipe gives the numbers of the policy before the move.
"""
import glob
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ROOT, run_checked  # noqa: E402
from helpers_sd3 import write_tiny_sd3  # noqa: E402

from flowlab.nft.memory import SavedActivationMeter  # noqa: E402
from flowlab.nft.policy import LoraSpec  # noqa: E402
from flowlab.nft.sd3 import SD3Policy  # noqa: E402
from flowlab.recipes import load_config, recipe_class  # noqa: E402
from flowlab.train.recipe import StepContext  # noqa: E402

RES = 16
PROMPTS = ["a photo of the cat", "an apple on the table", "two dogs", "a red car"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_sd3(str(tmp_path_factory.mktemp("sd3") / "tiny-sd3"))


def _recipe(tiny, recipe="nft", *overrides):
    """A recipe with its policy built on the tiny pipeline (no trainer)."""
    cfg = load_config(None, [
        f"recipe={recipe}", "rl.pipeline=sd3", f"rl.base={tiny}", f"rl.resolution={RES}", f"rl.prompts=[{', '.join(PROMPTS)}]",
        "rl.rewards=[{name: jpeg_compressibility}]", "rl.lora_rank=4", "rl.group_size=3", "rl.num_inference_steps=4",
        "train.batch_size=2", *overrides,
    ])
    r = recipe_class(cfg.recipe)(cfg)
    torch.manual_seed(0)  # the LoRA's gaussian A
    r.build_model(r.build_dataset())
    return r


def _ctx(step=0, batch=2):
    return StepContext(step, 0, torch.Generator().manual_seed(1000 + step), batch, 0, batch, torch.device("cpu"))


def _grads(r, step=0, meter_peaks=None):
    """Back-propagate every part of one step; the LoRA gradients (and the activations saved per part)."""
    policy = r.policy
    policy.zero_grad(set_to_none=True)
    parts = iter(r.training_losses(policy, {"index": torch.tensor([0, 1])}, _ctx(step)))
    while True:
        with SavedActivationMeter() as meter:
            part = next(parts, None)
        if part is None:
            break
        part.loss.backward()
        if meter_peaks is not None:
            meter_peaks.append(meter.bytes)
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def _perturb_lora(policy, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------- timesteps


def test_time_grid_is_the_schedulers_and_nft_trains_nine_of_ten(tiny):
    from diffusers import FlowMatchEulerDiscreteScheduler

    policy = SD3Policy.from_pretrained(tiny, resolution=RES)
    grid = policy.time_grid(10, shift=3.0)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    torch.testing.assert_close(1.0 - grid, sched.sigmas.double(), rtol=0, atol=1e-7)  # t = 1 - sigma, ending at 0
    last = 1.0 - float(grid[-2])  # the smallest non-zero sigma: shift twice applied to 1/1000
    s = 3 * 1e-3 / (1 + 2 * 1e-3)
    assert last == pytest.approx(3 * s / (1 + 2 * s), rel=1e-5) and 0.008 < last < 0.01
    r = _recipe(tiny, "nft", "rl.num_inference_steps=10", "rl.shift=3.0")
    ro = r.rollout(r.policy, {"index": torch.tensor([0, 1])}, _ctx())
    times = r._train_times(ro, _ctx())
    assert times.shape == (6, 9)  # int(10 * 0.99) = 9 of the 10 non-final grid times per sample
    for row in times:
        assert len(set(row.tolist())) == 9
        assert all(any(abs(t - float(g)) < 1e-6 for g in grid[:-1]) for t in row.tolist())
    assert float(times.max()) > 0.99  # trains down to sigma ~ 0.009 (the old grid stopped at 0.25)


def test_flowgrpo_trains_the_first_int_099_steps(tiny):
    r = _recipe(tiny, "flowgrpo", "rl.num_inference_steps=10", "grpo.timestep_fraction=0.99", "grpo.timestep_chunk=1")
    assert r.train_timesteps(10) == 9
    seen = []
    orig = r.policy.forward

    def spy(x, t, cond, guidance_scale=1.0):
        seen.append(sorted(set(t.tolist())))
        return orig(x, t, cond, guidance_scale)

    r.policy.forward = spy
    grid = r.policy.time_grid(10, r.rl.shift).float()
    list(r.training_losses(r.policy, {"index": torch.tensor([0, 1])}, _ctx()))
    assert [s[0] for s in seen] == pytest.approx([float(grid[k]) for k in range(9)], abs=1e-6)


# --------------------------------------------------------------------------- FlowGRPO details


def test_cfg_training_forward_detaches_the_unconditional_branch(tiny):
    """d/dtheta [u_neg + w (u_cond - u_neg)] with u_neg detached = w d u_cond / dtheta."""
    policy = SD3Policy.from_pretrained(tiny, lora=LoraSpec(4, 8, SD3Policy.default_lora_targets), resolution=RES)
    _perturb_lora(policy)
    cond = policy.encode(PROMPTS[:2])
    x = torch.randn((2, *policy.sample_shape), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.6])
    w = 4.5
    params = [p for p in policy.parameters() if p.requires_grad]
    guided = torch.autograd.grad(policy(x, t, cond, w).sum(), params)
    conditional = torch.autograd.grad(policy(x, t, cond).sum(), params)
    attached = torch.autograd.grad(policy.field(cond, "current", w)(x, t).sum(), params)
    scale = max(float(c.abs().max()) for c in conditional)
    for g, c in zip(guided, conditional):
        torch.testing.assert_close(g, w * c, rtol=1e-3, atol=1e-4 * w * scale)  # batched-forward round-off only
    gap = max(float((a - w * c).abs().max()) for a, c in zip(attached, conditional))
    assert gap > 1e-2 * w * scale  # with the branch attached the gradient differs: the check can fail
    with torch.no_grad():  # the value is the ordinary guided field
        torch.testing.assert_close(policy(x, t, cond, w), policy.field(cond, "current", w)(x, t))


def test_zero_advantage_samples_are_left_out_of_the_flowgrpo_mean(tiny):
    r = _recipe(tiny, "flowgrpo", "grpo.kl_coef=0")
    policy = r.policy
    _perturb_lora(policy)
    ro = r.rollout(policy, {"index": torch.tensor([0, 1])}, _ctx())
    adv = torch.tensor([1.0, -1.0, 0.0, 0.5, 0.0, -0.5])
    valid = torch.ones(6, dtype=torch.bool)
    loss = sum(p.loss for p in r.method_losses(policy, policy, ro, adv, valid, _ctx()))
    keep = adv != 0
    sub = sum(p.loss for p in r.method_losses(policy, policy, ro.select(keep.nonzero().squeeze(1)), adv[keep], valid[keep], _ctx()))
    torch.testing.assert_close(loss, sub)  # the mean over the 4 non-zero samples, not over 6


def test_steps_per_rollout_share_one_rollout_batch(tiny, monkeypatch):
    r = _recipe(tiny, "flowgrpo", "rl.steps_per_rollout=2")
    calls, rows = [], []
    orig_rollout, orig_losses = r.rollout, r.method_losses
    monkeypatch.setattr(r, "rollout", lambda *a: calls.append(1) or orig_rollout(*a))
    monkeypatch.setattr(r, "method_losses", lambda model, policy, ro, *a: rows.append(ro.rows.tolist()) or orig_losses(model, policy, ro, *a))
    for step in range(4):
        list(r.training_losses(r.policy, {"index": torch.tensor([0, 1])}, _ctx(step)))
    assert len(calls) == 2  # steps 0 and 2 roll out; 1 and 3 train on the rest of the batch
    assert sorted(rows[0] + rows[1]) == list(range(6)) and len(rows[0]) == 3
    assert sorted(rows[2] + rows[3]) == list(range(6))


# --------------------------------------------------------------------------- LoRA init and decoding


def test_lora_gaussian_init_and_float32_vae(tiny):
    policy = SD3Policy.from_pretrained(tiny, lora=LoraSpec(4, 8, SD3Policy.default_lora_targets), resolution=RES, dtype=torch.bfloat16)
    assert policy.transformer.peft_config["default"].init_lora_weights == "gaussian"
    a = torch.cat([p.detach().flatten() for n, p in policy.transformer.named_parameters() if "lora_A.default" in n])
    b = torch.cat([p.detach().flatten() for n, p in policy.transformer.named_parameters() if "lora_B.default" in n])
    assert float(b.abs().max()) == 0.0  # the adapted model starts as the base
    assert float(a.std()) == pytest.approx(1 / 4, rel=0.15)  # peft gaussian: A ~ N(0, 1/r)
    assert all(p.dtype == torch.float32 for p in policy.vae.parameters())
    assert next(policy.text_encoder.parameters()).dtype == torch.bfloat16
    x = torch.randn((2, *policy.sample_shape), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img = policy.decode(x)
    ref = SD3Policy.from_pretrained(tiny, resolution=RES).decode(x)
    assert img.dtype == torch.float32
    torch.testing.assert_close(img, ref)  # float32 decoding even under bf16 autocast


# --------------------------------------------------------------------------- memory layout


def test_micro_batches_give_the_single_batch_gradient(tiny):
    grads = {}
    for mb in (0, 2):  # 6 local samples: one part, or 3 micro-batches of 2
        r = _recipe(tiny, "nft", f"rl.micro_batch={mb}", "nft.timestep_chunk=0", "nft.kl_coef=1e-2")
        _perturb_lora(r.policy)
        grads[mb] = _grads(r)
    assert grads[0] and grads[0].keys() == grads[2].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[2][k], grads[0][k], rtol=1e-4, atol=1e-7)


def test_flowgrpo_micro_batches_give_the_single_batch_gradient(tiny):
    grads = {}
    for mb in (0, 2):
        r = _recipe(tiny, "flowgrpo", f"rl.micro_batch={mb}", "grpo.timestep_chunk=0", "rl.guidance_scale=2.0")
        _perturb_lora(r.policy)
        grads[mb] = _grads(r)
    for k in grads[0]:
        torch.testing.assert_close(grads[2][k], grads[0][k], rtol=1e-4, atol=1e-7)


def test_saved_activations_grow_with_the_micro_batch_not_the_global_batch(tiny):
    def peak(batch, mb):
        r = _recipe(tiny, "nft", f"rl.micro_batch={mb}", f"rl.group_size={batch}", "nft.timestep_chunk=1")
        peaks = []
        _grads(r, meter_peaks=peaks)
        return max(peaks)

    small, big = peak(2, 2), peak(6, 2)  # 4 or 12 local samples, 2 per part
    assert big == small
    assert peak(2, 4) > 1.5 * small  # twice the micro-batch: about twice the activations


def test_memory_layout_is_logged_on_the_first_step(tiny):
    r = _recipe(tiny, "nft", "rl.micro_batch=2", "nft.timestep_chunk=1")
    first = next(iter(r.training_losses(r.policy, {"index": torch.tensor([0, 1])}, _ctx())))
    logs = first.logs
    assert logs["memory/images_per_backward_part"] == 2 and logs["memory/images_per_rollout_chunk"] == 2
    assert logs["memory/weights_gb"] > 0 and logs["memory/optimizer_state_gb"] > 0
    lora = sum(p.numel() for p in r.policy.parameters() if p.requires_grad)
    assert logs["memory/optimizer_state_gb"] * 2**30 == pytest.approx(8 * lora)
    assert logs["memory/activations_per_part_gb"] > 0


def test_gradient_checkpointing_switches_on(tiny):
    r = _recipe(tiny, "nft", "rl.gradient_checkpointing=true")
    assert r.policy.transformer.is_gradient_checkpointing


def test_prompt_embedding_cache_frees_the_text_encoders(tiny, monkeypatch):
    policy = SD3Policy.from_pretrained(tiny, resolution=RES)
    plain = policy.encode(PROMPTS)
    size = policy.cache_prompt_embeddings(PROMPTS)
    assert size > 0

    def boom(*a, **k):
        raise AssertionError("text encoder called for a cached prompt")

    monkeypatch.setattr(policy.text_encoder, "forward", boom)
    monkeypatch.setattr(policy.text_encoder_2, "forward", boom)
    cached = policy.encode(list(reversed(PROMPTS)) + [""])  # "" is the (cached) negative prompt
    torch.testing.assert_close(cached["prompt_embeds"][:4], plain["prompt_embeds"].flip(0))
    torch.testing.assert_close(cached["pooled_prompt_embeds"][:4], plain["pooled_prompt_embeds"].flip(0))


# --------------------------------------------------------------------------- prompt data and evaluation


def _metadata_reward_module(tmp_path):
    """A user reward whose score is the prompt's metadata ``target`` (image-independent: a closed form)."""
    (tmp_path / "meta_reward.py").write_text(
        "import torch\n"
        "def score(images, prompts, metadata):\n"
        "    return torch.tensor([float(m['target']) for m in metadata])\n"
    )
    return "meta_reward:score"


def test_jsonl_metadata_reaches_rewards_and_the_held_out_set_is_evaluated(tiny, tmp_path):
    fn = _metadata_reward_module(tmp_path)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": p, "target": i}) + "\n" for i, p in enumerate(PROMPTS)))
    held_out = tmp_path / "test.jsonl"
    held_out.write_text("".join(json.dumps({"prompt": p, "target": 10 + i}) + "\n" for i, p in enumerate(["a blue bird", "a tree"])))
    out = tmp_path / "run"
    env_path = f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    run_checked([
        sys.executable, "train.py", "recipe=nft", f"output_dir={out}", "rl.pipeline=sd3", f"rl.base={tiny}", f"rl.resolution={RES}",
        f"rl.prompts_file={train}", f"rl.eval_prompts_file={held_out}", f"rl.rewards=[{{name: python, function: '{fn}'}}]",
        "rl.lora_rank=4", "rl.group_size=2", "rl.num_inference_steps=2", "rl.eval_steps=2", "train.batch_size=2",
        "train.max_steps=2", "train.report_to=none", "train.checkpoint_every=0", "sample.every=0", "eval.every=1",
    ], env={**os.environ, "PYTHONPATH": env_path})
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_means = [x["reward_mean"] for x in rec if "reward_mean" in x]
    assert train_means and all(m in {0.5, 1.0, 1.5, 2.0, 2.5} for m in train_means)  # means of 2 distinct targets in 0..3
    evals = [x["eval/reward"] for x in rec if "eval/reward" in x]
    assert evals == [10.5, 10.5]  # the held-out set's targets, every eval.every = 1 steps


# --------------------------------------------------------------------------- shipped configs run


_SD35 = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "configs", "*_sd35_*.yaml")))


def test_every_sd35_config_is_covered():
    assert {"nft_sd35_pickscore", "nft_sd35_geneval", "nft_sd35_ocr", "nft_sd35_multi_reward", "flowgrpo_sd35_pickscore"} <= set(_SD35)


@pytest.mark.parametrize("name", _SD35)
def test_sd35_config_runs_two_steps_with_tiny_components(name, tiny, tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f'a sign that says "{p}"\n' for p in PROMPTS))
    n_rewards = len(cfg.rl.rewards)
    rewards = ", ".join(["{name: jpeg_compressibility}", "{name: jpeg_incompressibility}", "{name: jpeg_compressibility, weight: 0.5}"][:n_rewards])
    out = tmp_path / "run"
    run_checked([
        sys.executable, "train.py", "--config", os.path.join(ROOT, "configs", f"{name}.yaml"), f"output_dir={out}",
        f"rl.base={tiny}", f"rl.resolution={RES}", f"rl.prompts_file={prompts}", f"rl.eval_prompts_file={prompts}",
        f"rl.rewards=[{rewards}]", "rl.lora_rank=4", "rl.lora_alpha=8", "rl.group_size=2", "rl.micro_batch=3",
        "rl.max_sequence_length=77", "rl.num_inference_steps=3", "rl.eval_steps=2", "train.batch_size=2", "train.max_steps=2",
        "train.mixed_precision=no", "train.report_to=none", "train.checkpoint_every=0", "sample.every=0", "eval.every=2",
    ])
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rec if "loss" in x] == [1, 2]
    local = 2 * 2 // cfg.rl.steps_per_rollout  # samples each optimiser step trains on (one process)
    assert rec[0]["memory/images_per_backward_part"] >= min(3, local) and rec[0]["memory/images_per_rollout_chunk"] >= min(3, local)
    assert any("eval/reward" in x for x in rec)
    if n_rewards > 1:
        assert any("eval/reward/jpeg_incompressibility" in x for x in rec)
    assert (out / "pipeline" / "pytorch_lora_weights.safetensors").is_file()


# --------------------------------------------------------------------------- the numbers before the move

#: ``(rollout sum, rollout |x| sum, loss, gradient norm, backward parts)`` of one step of each recipe on the
#: tiny SD3 pipeline, recorded from ``flowlab.nft.sd3.SD3Policy`` as it was before SD3 moved onto
#: :class:`flowlab.families.SD3Adapter` (commit ecff50b), with the seeds below; the adapter reproduced them
#: to the last digit on this machine (the tolerance leaves room for other BLAS builds).
BEFORE_THE_MOVE = {
    "nft": (-749.0840301727294, 5782.517058300495, 4.855621814727783, 0.390499202722485, 1),
    "flowgrpo": (-1004.6970092652773, 5303.805355114717, 0.0002659758029039949, 0.020525256434700243, 4),
    "nft_full": (-749.0840301727294, 5782.517058300495, 4.813236713409424, 0.09353100667502075, 1),
}
BEFORE_THE_MOVE_OVERRIDES = {"nft": ("nft.kl_coef=1e-2",), "flowgrpo": ("rl.guidance_scale=2.0", "grpo.kl_coef=0.01"),
                             "nft_full": ("rl.lora_rank=0", "nft.kl_coef=1e-2")}


@pytest.mark.parametrize("case", sorted(BEFORE_THE_MOVE))
def test_sd3_rollouts_losses_and_gradients_are_the_numbers_before_the_move(tiny, case):
    from flowlab.families import SD3Adapter

    r = _recipe(tiny, case.split("_")[0], *BEFORE_THE_MOVE_OVERRIDES[case])
    policy = r.policy
    assert type(policy) is SD3Policy and isinstance(policy.adapter, SD3Adapter)
    if policy.lora is not None:  # the trained adapter only (the rollouts' old adapter stays the base)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in policy.transformer.named_parameters():
                if ".default." in name and "lora_B" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
    batch = {"index": torch.tensor([0, 1])}
    ro = r.rollout(policy, batch, _ctx())
    torch.manual_seed(5)
    losses = [part.loss for part in r.training_losses(policy, batch, _ctx())]
    total = sum(losses)
    total.backward()
    grads = [p.grad.double() for p in policy.parameters() if p.requires_grad and p.grad is not None]
    got = (float(ro.x.double().sum()), float(ro.x.double().abs().sum()), float(total.detach()),
           float(torch.sqrt(sum((g**2).sum() for g in grads))), len(losses))
    want = BEFORE_THE_MOVE[case]
    assert got[4] == want[4]
    assert got[:4] == pytest.approx(want[:4], rel=1e-5, abs=1e-9)
