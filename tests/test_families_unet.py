"""Stable Diffusion UNets (SD1.5-style epsilon, SD2.1-style v-prediction, SDXL) through
:class:`flowlab.families.UNetAdapter`, on tiny pipelines built from configs.

Checks the adapter against the raw ``UNet2DConditionModel`` and against the already-verified
``ProbabilityFlow.from_diffusers`` reading of the same network (timestep map, epsilon and v
conversions), classifier-free guidance against the pipeline's own negative embeddings, SDXL's added
conditioning, the LoRA round trip through ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline.
load_lora_weights``, and WGF from the Python API (``ProbabilityFlow.from_family``: sampling,
likelihood, conservativity report) and from the CLI (``eval/conservativity.py --config``).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ROOT, load_eval_script, run_checked  # noqa: E402
from helpers_sd_unet import write_tiny_sd, write_tiny_sdxl  # noqa: E402

from flowlab.families import UNetAdapter  # noqa: E402
from flowlab.nft.family_policy import FamilyPolicy  # noqa: E402
from flowlab.nft.policy import LoraSpec  # noqa: E402
from flowlab.wgf import ProbabilityFlow  # noqa: E402
from flowlab.wgf.diagnostics import conservativity_report, noised_points  # noqa: E402

PROMPTS = ["a photo of the cat", "an apple on the table"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_sd(str(tmp_path_factory.mktemp("sd") / "tiny-sd"))


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory):
    return write_tiny_sdxl(str(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"))


def _pipe(path, xl=False):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if xl:
        return StableDiffusionXLPipeline.from_pretrained(path)
    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _inputs(shape, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g), torch.rand(n, generator=g) * 0.9 + 0.05


def _raw(unet, x, timestep, cond, added=None):
    with torch.no_grad():
        return unet(x, timestep, encoder_hidden_states=cond, added_cond_kwargs=added).sample


# --------------------------------------------------------------------------- conventions


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_velocity_matches_probability_flow_from_diffusers_and_the_raw_unet(tiny, prediction_type):
    adapter = UNetAdapter.from_pretrained(tiny, prediction_type=prediction_type)
    pipe = _pipe(tiny)
    assert adapter.sample_shape == (4, 8, 8) and adapter.resolution == 8 and adapter.t_range == (0.0, 0.999)
    pe, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    cond = adapter.encode(PROMPTS)
    torch.testing.assert_close(cond["prompt_embeds"], pe)
    x, t = _inputs(adapter.sample_shape)
    timestep = (1 - t) * 1000 - 1  # u(t) = (1 - t) N - 1, written out by hand on purpose
    raw = _raw(pipe.unet, x, timestep, pe)
    with torch.no_grad():
        pred = adapter.predict(x, t, cond, 1.0)
        if prediction_type == "epsilon":
            torch.testing.assert_close(pred, raw)
        else:  # eps = sigma x_t + alpha v on the VP path
            a, s = adapter.path.alpha(t).view(-1, 1, 1, 1), adapter.path.sigma(t).view(-1, 1, 1, 1)
            torch.testing.assert_close(pred, s * x + a * raw, rtol=1e-5, atol=1e-5)
        reference = ProbabilityFlow.from_diffusers(
            lambda z, u: pipe.unet(z, u, encoder_hidden_states=pe).sample, pipe.scheduler, prediction_type
        )
        torch.testing.assert_close(adapter.velocity(x, t, cond, 1.0), reference.velocity(x, t), rtol=1e-4, atol=1e-4)


def test_classifier_free_guidance_against_the_pipelines_negative_embeddings(tiny):
    adapter, pipe = UNetAdapter.from_pretrained(tiny), _pipe(tiny)
    assert adapter.guidance_default == 7.5 and not adapter.guidance_embedded
    pe, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=None)
    cond = adapter.encode(PROMPTS)
    x, t = _inputs(adapter.sample_shape)
    timestep = (1 - t) * 1000 - 1
    eps_c, eps_n = _raw(pipe.unet, x, timestep, pe), _raw(pipe.unet, x, timestep, neg)
    with torch.no_grad():
        torch.testing.assert_close(adapter.predict(x, t, cond, 4.0), eps_n + 4.0 * (eps_c - eps_n), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(adapter.predict(x, t, cond), eps_n + 7.5 * (eps_c - eps_n), rtol=1e-4, atol=1e-4)


def test_decode_as_the_sd_pipeline(tiny):
    adapter, pipe = UNetAdapter.from_pretrained(tiny), _pipe(tiny)
    x, _ = _inputs(adapter.sample_shape)
    images = adapter.decode(x)
    with torch.no_grad():
        by_hand = pipe.vae.decode(x / 0.18215, return_dict=False)[0]
    torch.testing.assert_close(images, (by_hand / 2 + 0.5).clamp(0, 1))


def test_sdxl_added_conditioning_and_cfg(tiny_xl):
    adapter, pipe = UNetAdapter.from_pretrained(tiny_xl), _pipe(tiny_xl, xl=True)
    assert adapter.is_sdxl and adapter.pipeline_class.__name__ == "StableDiffusionXLPipeline"
    pe, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, "cpu", 1, True, negative_prompt=None)
    time_ids = torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]] * 2)  # (H, W, crop top, crop left, H, W)
    cond = adapter.encode(PROMPTS)
    torch.testing.assert_close(cond["time_ids"], time_ids)
    x, t = _inputs(adapter.sample_shape)
    timestep = (1 - t) * 1000 - 1
    eps_c = _raw(pipe.unet, x, timestep, pe, {"text_embeds": pooled, "time_ids": time_ids})
    with torch.no_grad():
        torch.testing.assert_close(adapter.predict(x, t, cond, 1.0), eps_c)
    # SDXL's negative for an empty negative prompt: zero embeddings (force_zeros_for_empty_prompt), as the pipeline's
    assert adapter.force_zeros_for_empty_prompt and float(neg.abs().max()) == 0.0
    eps_n = _raw(pipe.unet, x, timestep, neg, {"text_embeds": neg_pooled, "time_ids": time_ids})
    with torch.no_grad():
        torch.testing.assert_close(adapter.predict(x, t, cond, 5.0), eps_n + 5.0 * (eps_c - eps_n), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("xl", [False, True], ids=["sd15", "sdxl"])
def test_lora_round_trip_through_load_lora_weights(tiny, tiny_xl, tmp_path, xl):
    base = tiny_xl if xl else tiny
    policy = FamilyPolicy(UNetAdapter.from_pretrained(base), lora=LoraSpec(4, 8, UNetAdapter.default_lora_targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.network.named_parameters():
            if ".default." in name and "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    cond = policy.encode(PROMPTS)
    x, t = _inputs(policy.sample_shape)
    with torch.no_grad():
        cur, ref = policy.velocity(x, t, cond, "current"), policy.velocity(x, t, cond, "ref")
        guided = policy.field(cond, "current", 3.0)(x, t)
    assert (cur - ref).abs().max() > 1e-3 and (guided - cur).abs().max() > 1e-4  # CFG only in the field
    policy.save(str(tmp_path / "lora"))
    pipe = _pipe(base, xl)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    tuned = UNetAdapter(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                        getattr(pipe, "text_encoder_2", None), getattr(pipe, "tokenizer_2", None))
    with torch.no_grad():
        torch.testing.assert_close(tuned.velocity(x, t, cond, 1.0), cur, rtol=1e-4, atol=1e-5)


def test_train_py_nft_two_steps_on_a_tiny_sd_unet_and_lora_loads(tiny, tmp_path):
    """RL on the same adapter (``rl.pipeline: sd_unet``): 2 NFT steps; the saved LoRA, loaded by
    ``StableDiffusionPipeline.load_lora_weights``, reproduces the trained policy's velocity."""
    from safetensors.torch import load_file

    out = tmp_path / "nft"
    log = run_checked([
        sys.executable, "train.py", "recipe=nft", f"output_dir={out}", "seed=0", "rl.pipeline=sd_unet", f"rl.base={tiny}",
        "rl.resolution=8", f"rl.prompts=[{', '.join(PROMPTS)}]", "rl.rewards=[{name: jpeg_compressibility}]", "rl.lora_rank=4",
        "rl.group_size=2", "rl.num_inference_steps=3", "rl.eval_steps=2", "rl.eval_samples=2", "train.batch_size=2",
        "train.max_steps=2", "train.lr=1e-2", "train.lr_scheduler=constant", "train.warmup_steps=0", "train.ema_decay=0",
        "train.report_to=none", "train.checkpoint_every=0", "train.log_every=1", "sample.every=0", "sample.num_images=2",
    ])
    assert "FamilyPolicy" in log and (out / "pipeline" / "pytorch_lora_weights.safetensors").is_file()
    policy = FamilyPolicy(UNetAdapter.from_pretrained(tiny), lora=LoraSpec(4, 8, UNetAdapter.default_lora_targets))
    policy.load_state_dict(load_file(str(out / "checkpoints" / "checkpoint-2" / "model.safetensors")))
    cond = policy.encode(PROMPTS)
    x, t = _inputs(policy.sample_shape, seed=3)
    pipe = _pipe(tiny)
    timestep = (1 - t) * 1000 - 1
    base = _raw(pipe.unet, x, timestep, cond["prompt_embeds"])
    pipe.load_lora_weights(str(out / "pipeline"))
    tuned = _raw(pipe.unet, x, timestep, cond["prompt_embeds"])
    assert (tuned - base).abs().max() > 1e-5  # training moved the adapter
    with torch.no_grad():
        torch.testing.assert_close(policy.adapter.predict(x, t, cond, 1.0, network=policy.network), tuned, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- WGF


def test_wgf_sampling_likelihood_and_conservativity_on_a_text_conditioned_unet(tiny):
    adapter = UNetAdapter.from_pretrained(tiny)
    flow = ProbabilityFlow.from_family(adapter, PROMPTS, guidance_scale=3.0)
    assert flow.prediction_type == "epsilon" and flow.t_range == adapter.t_range
    noise = torch.randn(4, *adapter.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = flow.sample(noise, num_inference_steps=4, solver="multistep")
    assert out.x.shape == noise.shape and torch.isfinite(out.x).all() and out.nfe == 4
    images = adapter.decode(out.x)
    assert images.shape == (4, 3, 8, 8)
    # the flow's score is -eps / sigma of the guided eps (sample i takes prompt i % 2)
    x, t = _inputs(adapter.sample_shape, n=4)
    with torch.no_grad():
        eps = adapter.predict(x, t, adapter.encode(PROMPTS * 2), 3.0)
        torch.testing.assert_close(flow.score(x, t), -eps / adapter.path.sigma(t).view(-1, 1, 1, 1), rtol=1e-4, atol=1e-4)
    ll = flow.log_likelihood(out.x[:2], solver="euler", num_steps=4, estimator="hutchinson", generator=torch.Generator().manual_seed(0))
    assert ll.log_prob.shape == (2,) and torch.isfinite(ll.log_prob).all()
    rep = conservativity_report(lambda z, s: flow.score(z, s), noised_points(flow.path, out.x), num_bins=2, num_points=4,
                                num_probes=2, num_nodes=8, generator=torch.Generator().manual_seed(0))
    assert len(rep.bins) == 2
    for row in rep.bins:  # a random UNet's guided score is not a gradient field
        assert 0 < row["asymmetry"]["mean"] and row["asymmetry"]["method"] == "2 probes"
        assert 0 <= row["loop"]["mean"] <= 1 and 0 <= row["path"]["mean"] <= 1


def test_conservativity_cli_with_the_wgf_sd15_config_file(tiny, tmp_path, capsys):
    mod = load_eval_script("conservativity")
    config = os.path.join(ROOT, "configs", "wgf", "sd15.yaml")
    res = mod.main(["--config", config, "--pipeline", tiny, "--resolution", "8", "--num-bins", "1", "--num-points", "2",
                    "--num-samples", "2", "--sample-steps", "2", "--num-probes", "1", "--no-plots",
                    "--json", str(tmp_path / "r.json")])
    assert res["sample_shape"] == [4, 8, 8] and res["field"] == "score"
    assert res["bins"][0]["asymmetry"]["method"] == "1 probes" and res["bins"][0]["asymmetry"]["mean"] > 0
    assert "conservativity of the score field" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline: x\nnum_pionts: 3\n")
    with pytest.raises(SystemExit):
        mod.main(["--config", str(bad)])
    assert "unknown key 'num_pionts'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="prompts: the StableDiffusionPipeline .* give at least one prompt"):
        mod.main(["--pipeline", tiny, "--no-plots", "--num-bins", "1"])
