"""FLUX.1 through :class:`flowlab.families.FluxAdapter` and as an RL policy (``rl.pipeline: flux``),
on a tiny FluxPipeline built from configs.

Checks the conventions against the raw transformer and FluxPipeline's own sampling loop (packing,
``timestep = sigma``, sign, guidance embedding, dynamic shift), the prompt cache, decoding, the
LoRA round trip through ``FluxPipeline.load_lora_weights``, WGF's ``ProbabilityFlow.from_family``, and
end to end ``python train.py recipe=nft rl.pipeline=flux`` for 2 steps.
"""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ROOT, run_checked  # noqa: E402
from helpers_flux import T5_LENGTH, write_tiny_flux  # noqa: E402

from flowlab.families import FluxAdapter  # noqa: E402
from flowlab.flow.sampling import sample  # noqa: E402
from flowlab.flow.solvers import time_grid  # noqa: E402
from flowlab.nft.family_policy import FluxPolicy  # noqa: E402
from flowlab.nft.policy import LoraSpec  # noqa: E402
from flowlab.errors import ConfigError  # noqa: E402
from flowlab.recipes import load_config  # noqa: E402
from flowlab.wgf import ProbabilityFlow  # noqa: E402

RES = 16  # one-block VAE (scale factor 1): latents (4, 16, 16), 64 packed tokens
PROMPTS = ["a photo of the cat", "an apple on the table"]
TARGETS = FluxAdapter.default_lora_targets


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_flux(str(tmp_path_factory.mktemp("flux") / "tiny-flux"))


@pytest.fixture(scope="module")
def tiny_schnell(tmp_path_factory):
    return write_tiny_flux(str(tmp_path_factory.mktemp("flux") / "tiny-schnell"), guidance_embeds=False)


def _adapter(path, **kw):
    return FluxAdapter.from_pretrained(path, resolution=RES, max_sequence_length=T5_LENGTH, **kw)


def _pipe(path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _raw(pipe, x, sigma, cond, guidance):
    """The transformer's own output (diffusers convention, packed) at ``timestep = sigma``, unpacked by hand."""
    b, c, h, w = x.shape
    packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)
    img_ids = torch.zeros(h // 2, w // 2, 3)
    img_ids[..., 1] += torch.arange(h // 2)[:, None]
    img_ids[..., 2] += torch.arange(w // 2)[None, :]
    with torch.no_grad():
        out = pipe.transformer(
            hidden_states=packed, timestep=sigma, guidance=None if guidance is None else torch.full((b,), float(guidance)),
            pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=torch.zeros(cond["prompt_embeds"].shape[1], 3), img_ids=img_ids.reshape(-1, 3), return_dict=False,
        )[0]
    return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def _inputs(shape, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g), torch.rand(n, generator=g) * 0.9 + 0.05


# --------------------------------------------------------------------------- conventions


def test_velocity_is_minus_the_unpacked_transformer_output_at_sigma_with_the_guidance_embedding(tiny):
    adapter, pipe = _adapter(tiny), _pipe(tiny)
    assert adapter.sample_shape == (4, RES, RES) and adapter.guidance_embedded and adapter.guidance_default == 3.5
    pe, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=T5_LENGTH)
    cond = adapter.encode(PROMPTS)
    torch.testing.assert_close(cond["prompt_embeds"], pe)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], pooled)
    x, t = _inputs(adapter.sample_shape)
    with torch.no_grad():
        for w in (3.5, 1.0, 6.0):
            torch.testing.assert_close(adapter.velocity(x, t, cond, w), -_raw(pipe, x, 1.0 - t, cond, w))
        torch.testing.assert_close(adapter.velocity(x, t, cond), adapter.velocity(x, t, cond, 3.5))  # the default
        assert (adapter.velocity(x, t, cond, 1.0) - adapter.velocity(x, t, cond, 6.0)).abs().max() > 1e-4
    torch.testing.assert_close(adapter.unpack(adapter.pack(x)), x)
    eps = torch.randn_like(x)  # the path is diffusers' forward noising x_sigma = (1 - sigma) x + sigma eps
    s = (1.0 - t).view(-1, 1, 1, 1)
    torch.testing.assert_close(adapter.path.sample(eps, x, t).x_t, (1 - s) * x + s * eps)


def test_euler_sampling_with_the_dynamic_shift_reproduces_flux_pipeline(tiny):
    """flowlab's Euler ODE on the grid shifted by e^mu (mu = calculate_shift(seq len)) is FluxPipeline's loop."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    adapter, pipe = _adapter(tiny), _pipe(tiny)
    assert adapter.image_seq_len == (RES // 2) ** 2
    assert adapter.time_shift == pytest.approx(math.exp(calculate_shift(adapter.image_seq_len, 256, 4096, 0.5, 1.15)))
    cond = adapter.encode(PROMPTS)
    x, _ = _inputs(adapter.sample_shape)
    with torch.no_grad():
        ours = sample(lambda z, t: adapter.velocity(z, t, cond, 2.0), x, solver="euler",
                      times=time_grid(4, shift=adapter.time_shift), path=adapter.path).x
        theirs = pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"], latents=adapter.pack(x),
                      height=RES, width=RES, num_inference_steps=4, guidance_scale=2.0, output_type="latent").images
    torch.testing.assert_close(ours, adapter.unpack(theirs), rtol=1e-4, atol=1e-4)


def test_schnell_has_no_guidance_embedding(tiny_schnell):
    adapter, pipe = _adapter(tiny_schnell), _pipe(tiny_schnell)
    assert not adapter.guidance_embedded and adapter.guidance_default == 1.0
    cond = adapter.encode(PROMPTS[:1])
    x, t = _inputs(adapter.sample_shape, n=1)
    with torch.no_grad():
        torch.testing.assert_close(adapter.velocity(x, t, cond), -_raw(pipe, x, 1.0 - t, cond, None))
    with pytest.raises(ValueError, match="guidance_scale=3.5.*no guidance embedding"):
        adapter.velocity(x, t, cond, 3.5)


def test_prompt_cache_encodes_each_prompt_once_and_broadcasts(tiny, monkeypatch):
    adapter = _adapter(tiny)
    calls = []
    encode = adapter._encode_unique
    monkeypatch.setattr(adapter, "_encode_unique", lambda prompts: calls.append(list(prompts)) or encode(prompts))
    first = adapter.encode([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    again = adapter.encode([PROMPTS[1], None, PROMPTS[0]])
    assert calls == [[PROMPTS[0], PROMPTS[1]], [""]]
    torch.testing.assert_close(again["prompt_embeds"][0], first["prompt_embeds"][1])
    torch.testing.assert_close(first["prompt_embeds"][2], first["prompt_embeds"][0])
    x, t = _inputs(adapter.sample_shape, n=4)
    two = adapter.encode(PROMPTS)
    with torch.no_grad():  # 2 prompts for a batch of 4: sample i takes prompt i % 2
        tiled = adapter.velocity(x, t, two)
        torch.testing.assert_close(tiled[2:], adapter.velocity(x[2:], t[2:], two))
    with pytest.raises(ValueError, match="multiple of the prompts"):
        adapter.velocity(x[:3], t[:3], two)
    with pytest.raises(TypeError, match="list of strings"):
        adapter.encode("a photo of the cat")
    # a bounded cache: the least recently used prompt is dropped and encoded again when asked for
    adapter.cache_size = 2
    calls.clear()
    adapter.encode(["zebra"])  # last used: "", PROMPTS[0], PROMPTS[1] (encode(PROMPTS) above), "zebra"
    adapter.encode([PROMPTS[1], "zebra"])  # the two kept
    assert calls == [["zebra"]] and len(adapter._cache) == 2
    adapter.encode([PROMPTS[0]])
    assert calls == [["zebra"], [PROMPTS[0]]]


def test_bf16_frozen_weights_float32_adapters(tiny):
    policy = FluxPolicy.from_pretrained(tiny, lora=LoraSpec(4, 8, TARGETS), resolution=RES, max_sequence_length=T5_LENGTH,
                                        dtype=torch.bfloat16)
    assert next(policy.adapter.text_encoder_2.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    cond = policy.encode(PROMPTS[:1])
    x, t = _inputs(policy.sample_shape, n=1)
    u = policy(x, t, cond)  # outside autocast: inputs follow the network's dtype, the output x's
    assert u.dtype == torch.float32 and torch.isfinite(u).all()
    u.sum().backward()
    assert all(p.grad is not None for p in policy.trainable_parameters())
    assert policy.decode(x).dtype == torch.float32


def test_decode_as_flux_pipeline(tiny):
    adapter, pipe = _adapter(tiny), _pipe(tiny)
    x, _ = _inputs(adapter.sample_shape)
    images = adapter.decode(3 * x)
    assert images.shape == (2, 3, RES, RES) and images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        by_hand = pipe.vae.decode(3 * x / 1.5035 + 0.0609, return_dict=False)[0]
    torch.testing.assert_close(images, (by_hand / 2 + 0.5).clamp(0, 1))


def test_missing_base_is_a_config_error_naming_rl_base(tmp_path):
    with pytest.raises(ConfigError, match="rl.base.*FluxPipeline.*no such folder"):
        FluxPolicy.from_pretrained(str(tmp_path / "no-such-flux"), resolution=RES)
    with pytest.raises(ConfigError, match="resolution: 15"):
        FluxAdapter(**_components_with_resolution(15))


def _components_with_resolution(res):
    from tempfile import mkdtemp

    from helpers_flux import build_tiny_flux, write_clip_tokenizer_files

    tok = mkdtemp()
    write_clip_tokenizer_files(tok)
    p = build_tiny_flux(tok)
    return dict(transformer=p.transformer, vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer,
                text_encoder_2=p.text_encoder_2, tokenizer_2=p.tokenizer_2, resolution=res)


# --------------------------------------------------------------------------- RL policy and LoRA


def test_policy_roles_and_lora_round_trip_through_load_lora_weights(tiny, tmp_path):
    policy = FluxPolicy.from_pretrained(tiny, lora=LoraSpec(4, 8, TARGETS), resolution=RES, max_sequence_length=T5_LENGTH,
                                        guidance_scale=2.5)
    cond = policy.encode(PROMPTS)
    x, t = _inputs(policy.sample_shape)
    trained = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trained and all(".default." in n and "lora_" in n for n in trained)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.network.named_parameters():
            if ".default." in name and "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        cur, old, ref = (policy.velocity(x, t, cond, r) for r in ("current", "old", "ref"))
        base = -_raw(_pipe(tiny), x, 1.0 - t, cond, 2.5)  # every role uses the guidance embedding 2.5
        torch.testing.assert_close(ref, base)
        torch.testing.assert_close(old, base)
        assert (cur - ref).abs().max() > 1e-3
        torch.testing.assert_close(policy.field(cond, "current", 2.5)(x, t), cur)  # rollouts: the same field
        policy.update_old(0.0)
        torch.testing.assert_close(policy.velocity(x, t, cond, "old"), cur)
    # checkpoints leave the frozen encoders and VAE out
    assert all(k.startswith(("adapter.transformer.",)) for k in policy.state_dict())
    policy.save(str(tmp_path / "lora"))
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    pipe = _pipe(tiny)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(-_raw(pipe, x, 1.0 - t, cond, 2.5), cur, rtol=1e-4, atol=1e-5)


def test_full_finetuning_checkpoint_state_round_trip(tiny):
    policy = FluxPolicy.from_pretrained(tiny, lora=None, reference=True, resolution=RES, max_sequence_length=T5_LENGTH)
    cond = policy.encode(PROMPTS[:1])
    x, t = _inputs(policy.sample_shape, n=1)
    with torch.no_grad():
        before = policy.velocity(x, t, cond, "current")
        for p in policy.network.parameters():
            p.add_(0.01 * torch.randn_like(p))
        cur = policy.velocity(x, t, cond, "current")
        torch.testing.assert_close(policy.velocity(x, t, cond, "ref"), before)
    state = policy.state_dict()
    assert state and all(k.startswith(("adapter.transformer.", "old.", "ref.")) for k in state)
    fresh = FluxPolicy.from_pretrained(tiny, lora=None, reference=True, resolution=RES, max_sequence_length=T5_LENGTH)
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh.velocity(x, t, cond, "current"), cur)
    import copy

    twin = copy.deepcopy(policy)  # the trainer's EMA copy shares the frozen parts
    assert twin.adapter.text_encoder_2 is policy.adapter.text_encoder_2 and twin.network is not policy.network


# --------------------------------------------------------------------------- WGF


def test_probability_flow_from_family_on_flux(tiny):
    adapter = _adapter(tiny)
    flow = ProbabilityFlow.from_family(adapter, PROMPTS, guidance_scale=2.0)
    cond = adapter.encode(PROMPTS)
    x, t = _inputs(adapter.sample_shape)
    with torch.no_grad():
        torch.testing.assert_close(flow.velocity(x, t), adapter.velocity(x, t, cond, 2.0))
        # the linear path's score: (t u - x) / (1 - t), from the same evaluation
        v, s = flow.velocity_and_score(x, t)
        tt = t.view(-1, 1, 1, 1)
        torch.testing.assert_close(s, (tt * v - x) / (1 - tt), rtol=1e-4, atol=1e-4)
        out = flow.sample(x, num_inference_steps=3, solver="euler", shift=adapter.time_shift)
    assert out.x.shape == x.shape and torch.isfinite(out.x).all() and out.nfe == 3


def test_load_probability_flow_opens_a_flux_folder_with_prompts(tiny):
    from flowlab.wgf import load_probability_flow

    flow, shape, adapter = load_probability_flow(tiny, prompts=PROMPTS, guidance_scale=2.0, resolution=RES)
    assert shape == (4, RES, RES) and isinstance(adapter, FluxAdapter) and adapter.max_sequence_length == 512
    x, t = _inputs(shape)
    with torch.no_grad():
        torch.testing.assert_close(flow.velocity(x, t), adapter.velocity(x, t, adapter.encode(PROMPTS), 2.0))
    with pytest.raises(ValueError, match="prompts: the FluxPipeline .* give at least one prompt"):
        load_probability_flow(tiny)


# --------------------------------------------------------------------------- configs and end to end


def test_nft_flux_pickscore_config_validates():
    cfg = load_config(os.path.join(ROOT, "configs", "nft_flux_pickscore.yaml"))
    rl = cfg.rl
    assert rl.pipeline == "flux" and rl.base == "black-forest-labs/FLUX.1-dev" and rl.guidance_scale == 3.5
    assert os.path.isfile(os.path.join(ROOT, rl.prompts_file))
    # the shift is FluxPipeline's dynamic shift at this resolution (VAE scale factor 8, 2x2 patches)
    from flowlab.families.flux import flux_time_shift

    assert rl.shift == pytest.approx(flux_time_shift((rl.resolution // 16) ** 2), abs=1e-3)


def _train_args(tiny, out, recipe, *extra):
    return [
        sys.executable, "train.py", f"recipe={recipe}", f"output_dir={out}", "seed=0", "rl.pipeline=flux", f"rl.base={tiny}",
        f"rl.resolution={RES}", f"rl.max_sequence_length={T5_LENGTH}", f"rl.prompts=[{', '.join(PROMPTS)}]",
        "rl.guidance_scale=3.5", "rl.shift=1.2", "rl.rewards=[{name: jpeg_compressibility}]", "rl.lora_rank=4",
        "rl.group_size=2", "rl.num_inference_steps=2", "rl.eval_steps=2", "rl.eval_samples=2", "train.batch_size=2",
        "train.max_steps=2", "train.lr=1e-2", "train.lr_scheduler=constant", "train.warmup_steps=0", "train.ema_decay=0",
        "train.report_to=none", "train.checkpoint_every=0", "train.log_every=1", "sample.every=0", "sample.num_images=2", *extra,
    ]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """NFT and FlowGRPO on tiny FLUX-dev, run concurrently (the runs mostly wait on imports and I/O)."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("runs")
    runs = {"nft": _train_args(tiny, root / "nft", "nft", "nft.kl_coef=1e-4"),
            "flowgrpo": _train_args(tiny, root / "flowgrpo", "flowgrpo", "grpo.kl_coef=0.01")}
    with ThreadPoolExecutor(2) as pool:
        logs = dict(zip(runs, pool.map(run_checked, runs.values())))
    return {k: (root / k, logs[k]) for k in runs}


def test_train_py_nft_two_steps_on_tiny_flux_and_lora_loads(tiny, trained):
    from safetensors.torch import load_file

    out, log = trained["nft"]
    assert "saved" in log and (out / "pipeline" / "pytorch_lora_weights.safetensors").is_file()
    policy = FluxPolicy.from_pretrained(tiny, lora=LoraSpec(4, 8, TARGETS), reference=True, resolution=RES,
                                        max_sequence_length=T5_LENGTH, guidance_scale=3.5)
    policy.load_state_dict(load_file(str(out / "checkpoints" / "checkpoint-2" / "model.safetensors")))
    cond = policy.encode(PROMPTS)
    x, t = _inputs(policy.sample_shape, seed=3)
    pipe = _pipe(tiny)
    with torch.no_grad():
        trained_u = policy.velocity(x, t, cond, "current")
        base = _raw(pipe, x, 1.0 - t, cond, 3.5)
    pipe.load_lora_weights(str(out / "pipeline"))
    tuned = _raw(pipe, x, 1.0 - t, cond, 3.5)
    assert (tuned - base).abs().max() > 1e-4  # training moved the adapter
    torch.testing.assert_close(-tuned, trained_u, rtol=1e-4, atol=1e-5)


def test_flowgrpo_on_flux_recomputes_the_rollouts_step_likelihoods(trained):
    """At the first step the trained policy is the rollout policy: the step likelihoods recomputed with the
    guidance embedding (rl.guidance_scale 3.5) must match the rollouts' (ratio 1, nothing clipped at 1e-4)."""
    import json

    out, log = trained["flowgrpo"]
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "saved" in log and first["step"] == 1 and first["clip_fraction"] == 0.0


@pytest.mark.parametrize("overrides, snippet", [
    ([], 'FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev")\npipe.load_lora_weights("{repo}")'),
    (["rl.lora_rank=0"], 'transformer = FluxTransformer2DModel.from_pretrained("{repo}", subfolder="transformer")'),
])
def test_hub_card_usage_names_the_family_pipeline(overrides, snippet):
    from flowlab.hub import REPO_ID
    from flowlab.recipes import get_recipe

    data = get_recipe(load_config(os.path.join(ROOT, "configs", "nft_flux_pickscore.yaml"), overrides)).card_data(REPO_ID)
    assert snippet.format(repo=REPO_ID) in data["usage"]
    compile(data["usage"], "<usage>", "exec")
    assert "diffusionnft" in data["tags"] and ("lora" in data["tags"]) == (not overrides)


def test_sd_unet_rl_settings_card_and_keys():
    from flowlab.errors import OptionError
    from flowlab.hub import REPO_ID
    from flowlab.nft.config import SDUNetRLConfig

    rl = SDUNetRLConfig(base="stable-diffusion-v1-5/stable-diffusion-v1-5", prompts=["a cat"], lora_rank=0)
    usage = rl.card_data(REPO_ID)["usage"]
    assert (f'unet = UNet2DConditionModel.from_pretrained("{REPO_ID}", subfolder="unet")\n'
            'pipe = DiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", unet=unet)') in usage
    compile(usage, "<usage>", "exec")
    # a UNet has no T5: the FLUX/SD3 key is refused, naming it
    with pytest.raises(OptionError, match="rl.max_sequence_length: not a key of rl.pipeline=sd_unet"):
        load_config(os.path.join(ROOT, "configs", "nft_flux_pickscore.yaml"), ["rl.pipeline=sd_unet"])
    with pytest.raises(ConfigError, match="rl.prompts: an sd_unet pipeline needs prompts"):
        SDUNetRLConfig(base="x").check(None)
