"""SD3 as a family adapter (:class:`flowlab.families.SD3Adapter`), and the deep-copy rule every family shares.

* the adapter's Euler ODE with classifier-free guidance, on its scheduler's grid, is
  ``StableDiffusion3Pipeline``'s own sampling loop; WGF reads an SD3 folder through the adapter;
* a LoRA saved by the SD3 policy loads with ``StableDiffusion3Pipeline.load_lora_weights`` and
  reproduces the policy's velocity, and ``flowlab_sd3.json`` keeps its settings;
* SD3, FLUX and the SD UNet policies deep-copy the same way (one ``FamilyAdapter.__deepcopy__``): the
  frozen encoders, VAE, tokenizers and prompt caches are the same objects in the copy, the trained
  network (and full fine-tuning's ``old`` / ``ref``) are distinct copies.

(That the SD3 recipes give the numbers they gave before SD3 moved onto the adapter is checked in
``test_rl_sd3_fidelity.py``.)
"""
import copy
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers_flux import T5_LENGTH, write_tiny_flux  # noqa: E402
from helpers_sd3 import write_tiny_sd3  # noqa: E402
from helpers_sd_unet import write_tiny_sd  # noqa: E402

from flowlab.families import FamilyAdapter, FluxAdapter, SD3Adapter, UNetAdapter, load_family  # noqa: E402
from flowlab.flow.sampling import sample  # noqa: E402
from flowlab.nft.family_policy import FamilyPolicy, FluxPolicy, SD3Policy  # noqa: E402
from flowlab.nft.policy import LoraSpec, Policy  # noqa: E402

RES = 16
PROMPTS = ["a photo of the cat", "an apple on the table", "two dogs", "a red car"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_sd3(str(tmp_path_factory.mktemp("sd3") / "tiny-sd3"))


def _pipe(path):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs(shape, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g), torch.rand(n, generator=g) * 0.9 + 0.05


def _perturb_lora(network, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if ".default." in name and "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------- the adapter


def test_cfg_euler_sampling_on_the_schedulers_grid_is_the_sd3_pipelines_loop(tiny):
    adapter, pipe = load_family("sd3", tiny, resolution=RES), _pipe(tiny)
    assert isinstance(adapter, SD3Adapter) and adapter.sample_shape == (4, RES, RES) and adapter.guidance_default == 7.0
    assert not adapter.guidance_embedded and adapter.default_lora_targets == FluxAdapter.default_lora_targets
    cond = adapter.encode(PROMPTS[:2])
    x, _ = _inputs(adapter.sample_shape)
    grid = adapter.time_grid(4)
    with torch.no_grad():
        ours = sample(lambda z, t: adapter.velocity(z, t, cond, 2.5), x, solver="euler", times=grid, path=adapter.path).x
        theirs = pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"], latents=x.clone(),
                      height=RES, width=RES, num_inference_steps=4, guidance_scale=2.5, max_sequence_length=77,
                      output_type="latent").images  # the pipeline encodes the negative prompt itself
    assert (ours - x).abs().max() > 0.1  # the loop moved the latents
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_wgf_reads_an_sd3_folder_through_the_adapter(tiny):
    from flowlab.wgf.loading import load_probability_flow

    flow, shape, adapter = load_probability_flow(tiny, prompts=PROMPTS[:2], guidance_scale=3.0, resolution=RES)
    assert isinstance(adapter, SD3Adapter) and shape == (4, RES, RES)
    x, t = _inputs(shape)
    with torch.no_grad():
        torch.testing.assert_close(flow.velocity(x, t), adapter.velocity(x, t, adapter.encode(PROMPTS[:2]), 3.0))


def test_lora_saved_by_the_sd3_policy_loads_in_the_sd3_pipeline(tiny, tmp_path):
    policy = SD3Policy.from_pretrained(tiny, lora=LoraSpec(4, 8, SD3Policy.default_lora_targets), resolution=RES)
    assert isinstance(policy.adapter, SD3Adapter) and policy.transformer is policy.adapter.transformer
    _perturb_lora(policy.transformer)
    cond = policy.encode(PROMPTS[:2])
    x, t = _inputs(policy.sample_shape, seed=3)
    with torch.no_grad():
        trained = policy.velocity(x, t, cond, "current")
        assert (trained - policy.velocity(x, t, cond, "ref")).abs().max() > 1e-3
    policy.save(str(tmp_path))
    info = json.loads((tmp_path / "flowlab_sd3.json").read_text())
    assert info["resolution"] == RES and info["max_sequence_length"] == 77 and info["lora"]["rank"] == 4
    pipe = _pipe(tiny)
    pipe.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        raw = pipe.transformer(hidden_states=x, timestep=(1.0 - t) * 1000.0, encoder_hidden_states=cond["prompt_embeds"],
                               pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
    torch.testing.assert_close(-raw, trained, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- one deep-copy rule


def _family_policy(kind, root, lora):
    spec = None
    if kind == "sd3":
        if lora:
            spec = LoraSpec(4, 8, SD3Policy.default_lora_targets)
        return SD3Policy.from_pretrained(write_tiny_sd3(str(root / "sd3")), lora=spec, reference=True, resolution=RES)
    if kind == "flux":
        if lora:
            spec = LoraSpec(4, 8, FluxAdapter.default_lora_targets)
        return FluxPolicy.from_pretrained(write_tiny_flux(str(root / "flux")), lora=spec, reference=True, resolution=RES,
                                          max_sequence_length=T5_LENGTH)
    if lora:
        spec = LoraSpec(4, 8, UNetAdapter.default_lora_targets)
    return FamilyPolicy(UNetAdapter.from_pretrained(write_tiny_sd(str(root / "sd"))), lora=spec, reference=True)


def _storages(module):
    return {p.data_ptr() for p in module.parameters()}


def test_no_policy_class_has_its_own_deepcopy():
    """The rule lives in one place: ``FamilyAdapter.__deepcopy__`` (policies copy by nn.Module's default)."""
    for cls in (Policy, FamilyPolicy, SD3Policy, FluxPolicy):
        assert "__deepcopy__" not in vars(cls), cls
    for cls in (SD3Adapter, FluxAdapter, UNetAdapter):
        assert cls.__deepcopy__ is FamilyAdapter.__deepcopy__


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("kind", ["sd3", "flux", "sd_unet"])
def test_every_family_deep_copies_the_trained_network_and_shares_the_frozen_components(kind, lora, tmp_path):
    policy = _family_policy(kind, tmp_path, lora)
    adapter = policy.adapter
    cond = policy.encode(PROMPTS[:2])  # fills the prompt cache
    clone = copy.deepcopy(policy)
    frozen = adapter.frozen_modules()
    assert {"text_encoder", "vae"} <= set(frozen)
    for name, module in frozen.items():  # the same objects: nothing copied
        assert getattr(clone.adapter, name) is module
    assert clone.adapter.tokenizer is adapter.tokenizer and clone.adapter._cache is adapter._cache
    # the trained network (and full fine-tuning's old / ref) are distinct copies, sharing no storage
    trained = [("network", policy.network, clone.network)]
    if not lora:
        trained += [("old", policy.old, clone.old), ("ref", policy.ref, clone.ref)]
    for role, mine, theirs in trained:
        assert theirs is not mine and not (_storages(mine) & _storages(theirs)), role
    assert clone.adapter is not adapter and clone.network is clone.adapter.network
    x, t = _inputs(policy.sample_shape)
    with torch.no_grad():
        before = policy.velocity(x, t, cond, "current")
        torch.testing.assert_close(clone.velocity(x, t, cond, "current"), before)
        for name, p in clone.network.named_parameters():  # move the copy's trained weights only
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        assert (clone.velocity(x, t, cond, "current") - before).abs().max() > 1e-4
        torch.testing.assert_close(policy.velocity(x, t, cond, "current"), before)


def test_pinned_prompt_embeddings_are_shared_by_the_copy(tiny, monkeypatch):
    policy = SD3Policy.from_pretrained(tiny, lora=LoraSpec(4, 8, SD3Policy.default_lora_targets), resolution=RES)
    plain = policy.encode(PROMPTS)
    assert policy.cache_prompt_embeddings(PROMPTS) > 0
    clone = copy.deepcopy(policy)

    def boom(*a, **k):
        raise AssertionError("text encoder called for a pinned prompt")

    monkeypatch.setattr(policy.text_encoder, "forward", boom)  # the same module in the copy
    cached = clone.encode(list(reversed(PROMPTS)) + [""])
    torch.testing.assert_close(cached["prompt_embeds"][:4], plain["prompt_embeds"].flip(0))
