"""Stable Diffusion 3 with LoRA as an RL policy (``rl.pipeline: sd3``), on a tiny pipeline built from configs.

Checks the time/velocity conventions against the raw transformer and diffusers' own scheduler, the
three policy roles (LoRA and full fine-tuning), classifier-free guidance, VAE decoding, checkpoint
state, and end to end: ``python train.py`` with ``recipe=nft`` and ``recipe=flowgrpo`` fine-tunes a
LoRA that a fresh ``StableDiffusion3Pipeline`` loads with ``load_lora_weights`` and that reproduces
the trained policy's velocity.
"""
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ROOT, run_checked  # noqa: E402
from helpers_sd3 import write_tiny_sd3  # noqa: E402

from flowlab.nft.policy import LoraSpec  # noqa: E402
from flowlab.nft.sd3 import SD3Policy  # noqa: E402
from flowlab.errors import ConfigError
from flowlab.recipes import load_config  # noqa: E402

RES = 32
PROMPTS = ["a photo of the cat", "an apple on the table"]
TARGETS = SD3Policy.default_lora_targets


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_sd3(str(tmp_path_factory.mktemp("sd3") / "tiny-sd3"))


def _pipe(path):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)


def _raw(transformer, x, sigma, cond):
    """The transformer's own output (diffusers convention) at ``timestep = sigma * 1000``."""
    with torch.no_grad():
        return transformer(
            hidden_states=x, timestep=sigma * 1000.0, encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"], return_dict=False,
        )[0]


def _inputs(policy, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *policy.sample_shape), generator=g), torch.rand(n, generator=g) * 0.9 + 0.05


def _perturb_lora(policy, scale=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if ".default." in name and "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------- conventions


def test_velocity_is_minus_the_transformer_output_at_sigma_one_minus_t(tiny):
    policy = SD3Policy.from_pretrained(tiny, resolution=RES)
    pipe = _pipe(tiny)
    assert policy.sample_shape == (4, RES, RES)  # one-block VAE: scale factor 1
    pe, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=77)
    cond = policy.encode(PROMPTS)
    torch.testing.assert_close(cond["prompt_embeds"], pe)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], pooled)
    x, t = _inputs(policy)
    u = policy.velocity(x, t, cond, "current")
    sigma = 1.0 - t  # written out by hand on purpose
    torch.testing.assert_close(u, -_raw(pipe.transformer, x, sigma, cond))
    # an Euler step of flowlab's field from t to t + dt is diffusers' scheduler step from sigma to sigma - dt
    sched = pipe.scheduler
    sched.set_timesteps(sigmas=[float(sigma[0]), float(sigma[0]) - 0.1], device="cpu")
    sched.set_begin_index(0)
    raw = _raw(pipe.transformer, x[:1], sigma[:1], {k: v[:1] for k, v in cond.items()})
    x_next = sched.step(raw, sched.timesteps[0], x[:1], return_dict=False)[0]
    torch.testing.assert_close(x[:1] + 0.1 * u[:1], x_next, rtol=1e-5, atol=1e-5)
    # and the policy's path is diffusers' forward noising x_sigma = (1 - sigma) x + sigma eps
    eps = torch.randn_like(x)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(policy.path.sample(eps, x, t).x_t, (1 - s) * x + s * eps)


def test_lora_roles_old_ref_and_update(tiny):
    policy = SD3Policy.from_pretrained(tiny, lora=LoraSpec(4, 8, TARGETS), resolution=RES)
    base = _pipe(tiny).transformer
    cond = policy.encode(PROMPTS)
    x, t = _inputs(policy)
    trained = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trained and all(".default." in n and "lora_" in n for n in trained)
    _perturb_lora(policy)
    with torch.no_grad():
        cur, old, ref = (policy.velocity(x, t, cond, r) for r in ("current", "old", "ref"))
    base_u = -_raw(base, x, 1.0 - t, cond)
    torch.testing.assert_close(ref, base_u)
    torch.testing.assert_close(old, base_u)  # the old adapter is still the zero-initialised copy
    assert (cur - ref).abs().max() > 1e-3
    policy.update_old(0.0)
    with torch.no_grad():
        torch.testing.assert_close(policy.velocity(x, t, cond, "old"), cur)
        torch.testing.assert_close(policy(x, t, cond), cur)  # role switching leaves `default` active
    assert [n for n, p in policy.named_parameters() if p.requires_grad] == trained


def test_full_finetuning_roles_and_checkpoint_state(tiny):
    policy = SD3Policy.from_pretrained(tiny, lora=None, reference=True, resolution=RES)
    cond = policy.encode(PROMPTS[:1])
    x, t = _inputs(policy, n=1)
    before = policy.velocity(x, t, cond, "current").detach()
    with torch.no_grad():
        for p in policy.transformer.parameters():
            p.add_(0.01 * torch.randn_like(p))
        cur = policy.velocity(x, t, cond, "current")
        torch.testing.assert_close(policy.velocity(x, t, cond, "ref"), before)
        torch.testing.assert_close(policy.velocity(x, t, cond, "old"), before)
        policy.update_old(0.0)
        torch.testing.assert_close(policy.velocity(x, t, cond, "old"), cur)
    assert all(not p.requires_grad for p in policy.text_encoder.parameters())
    # checkpoints leave the frozen encoders and VAE out, and still load strictly
    state = policy.state_dict()
    assert state and all(k.startswith(("transformer.", "old.", "ref.")) for k in state)
    fresh = SD3Policy.from_pretrained(tiny, lora=None, reference=True, resolution=RES)
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh.velocity(x, t, cond, "current"), cur)


def test_guidance_and_decode(tiny):
    policy = SD3Policy.from_pretrained(tiny, resolution=RES)
    pipe = _pipe(tiny)
    cond = policy.encode(PROMPTS)
    x, t = _inputs(policy)
    _, neg, _, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True, max_sequence_length=77)
    with torch.no_grad():
        u_c = -_raw(pipe.transformer, x, 1.0 - t, cond)
        u_n = -_raw(pipe.transformer, x, 1.0 - t, {"prompt_embeds": neg, "pooled_prompt_embeds": neg_pooled})
        torch.testing.assert_close(policy.field(cond, "current", 4.5)(x, t), u_n + 4.5 * (u_c - u_n), rtol=1e-4, atol=1e-4)
    images = policy.decode(3 * x)
    assert images.shape == (2, 3, RES, RES) and images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        by_hand = pipe.vae.decode(3 * x / 1.5035 + 0.0609, return_dict=False)[0]
    torch.testing.assert_close(images, (by_hand / 2 + 0.5).clamp(0, 1))


def test_bf16_frozen_weights_float32_adapters(tiny):
    policy = SD3Policy.from_pretrained(tiny, lora=LoraSpec(4, 8, TARGETS), resolution=RES, dtype=torch.bfloat16)
    assert next(policy.text_encoder.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    cond = policy.encode(PROMPTS[:1])
    x, t = _inputs(policy, n=1)
    u = policy(x, t, cond)  # outside autocast: inputs follow the frozen weights' dtype, output x's
    assert u.dtype == torch.float32 and torch.isfinite(u).all()
    assert policy.decode(x).dtype == torch.float32


def test_missing_base_is_a_config_error_naming_rl_base(tmp_path):
    with pytest.raises(ConfigError, match="rl.base"):
        SD3Policy.from_pretrained(str(tmp_path / "no-such-pipeline"), resolution=RES)
    with pytest.raises(ConfigError, match="rl.base.*no such folder"):
        SD3Policy.from_pretrained(str(tmp_path / "no-such-pipeline"), resolution=RES)
    (tmp_path / "run" / "pipeline").mkdir(parents=True)
    with pytest.raises(ConfigError, match="training run folder.*run/pipeline"):
        SD3Policy.from_pretrained(str(tmp_path / "run"), resolution=RES)


# --------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("name", ["nft_sd35_pickscore", "nft_sd35_geneval", "flowgrpo_sd35_pickscore"])
def test_sd35_configs_validate(name):
    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
    assert cfg.rl.pipeline == "sd3" and cfg.rl.base == "stabilityai/stable-diffusion-3.5-medium"
    assert cfg.rl.lora_rank == 32 and cfg.rl.lora_alpha == 64 and cfg.rl.group_size == 24 and cfg.train.batch_size == 48
    assert os.path.isfile(os.path.join(ROOT, cfg.rl.prompts_file))
    from flowlab.rewards.base import REWARDS, _factory_options

    for spec in cfg.rl.rewards:  # option names exist (building would download the reward model)
        params, _, _ = _factory_options(REWARDS[spec["name"]])
        assert set(spec) - {"name", "weight"} <= set(params), spec


# --------------------------------------------------------------------------- end to end


def _train_args(tiny, out, recipe, *extra):
    return [
        sys.executable, "train.py", f"recipe={recipe}", f"output_dir={out}", "seed=0",
        "rl.pipeline=sd3", f"rl.base={tiny}", f"rl.resolution={RES}", f"rl.prompts=[{', '.join(PROMPTS)}]",
        "rl.rewards=[{name: jpeg_compressibility}]", "rl.lora_rank=4", "rl.group_size=2", "rl.num_inference_steps=3",
        "rl.eval_steps=2", "rl.eval_samples=2", "train.batch_size=2", "train.max_steps=2", "train.lr=1e-2",
        "train.lr_scheduler=constant", "train.warmup_steps=0", "train.ema_decay=0", "train.report_to=none",
        "train.checkpoint_every=0", "train.log_every=1", "sample.every=0", "sample.num_images=2", *extra,
    ]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """Both recipes trained concurrently (the runs mostly wait on imports and I/O)."""
    root = tmp_path_factory.mktemp("runs")
    runs = {
        "nft": _train_args(tiny, root / "nft", "nft", "nft.kl_coef=1e-4"),
        "flowgrpo": _train_args(tiny, root / "flowgrpo", "flowgrpo", "rl.guidance_scale=2.0", "grpo.kl_coef=0.01"),
    }
    with ThreadPoolExecutor(2) as pool:
        logs = dict(zip(runs, pool.map(run_checked, runs.values())))
    return {k: (root / k, logs[k]) for k in runs}


@pytest.mark.parametrize("recipe", ["nft", "flowgrpo"])
def test_train_py_lora_round_trips_through_load_lora_weights(tiny, trained, recipe):
    from safetensors.torch import load_file

    out, log = trained[recipe]
    assert "saved" in log and (out / "pipeline" / "pytorch_lora_weights.safetensors").is_file()
    # the trained policy: the last checkpoint's state (EMA decay 0, so the saved LoRA is the same weights)
    policy = SD3Policy.from_pretrained(tiny, lora=LoraSpec(4, 8, TARGETS), reference=True, resolution=RES)
    policy.load_state_dict(load_file(str(out / "checkpoints" / "checkpoint-2" / "model.safetensors")))
    cond = policy.encode(PROMPTS)
    x, t = _inputs(policy, seed=3)
    with torch.no_grad():
        trained_u = policy.velocity(x, t, cond, "current")
    pipe = _pipe(tiny)
    base = _raw(pipe.transformer, x, 1.0 - t, cond)
    pipe.load_lora_weights(str(out / "pipeline"))
    tuned = _raw(pipe.transformer, x, 1.0 - t, cond)
    assert (tuned - base).abs().max() > 1e-4  # training moved the adapter
    torch.testing.assert_close(-tuned, trained_u, rtol=1e-4, atol=1e-5)


def test_flowgrpo_step_likelihoods_use_the_rollouts_guided_field(trained):
    """At the first step the trained policy is the rollout policy: with CFG (guidance 2) in the rollouts,
    the recomputed step likelihoods must match them (ratio 1, nothing clipped at clip_range 1e-4)."""
    import json

    out, _ = trained["flowgrpo"]
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["clip_fraction"] == 0.0
