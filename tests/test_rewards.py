"""Tests for flowlab.rewards: closed forms and behaviour of every built-in reward, the config
builders, the combined (z-scored) reward and the async wrapper. No downloads: CLIP models,
tokenizers and image processors are tiny, random and written to a temporary folder."""
from __future__ import annotations

import io
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_clip import write_clip_tokenizer_files  # tests/ is on sys.path (pytest's rootdir import)
from flowlab.data.digits import load_digits_arrays, to_unit_range
from flowlab.rewards import (
    REWARDS,
    AsyncReward,
    CombinedReward,
    RewardError,
    RewardFunction,
    build_reward,
    build_rewards,
    register_reward,
)
from flowlab.rewards.combined import zscore
from flowlab.errors import ConfigError


def _uint8(images: torch.Tensor) -> np.ndarray:
    return (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _pil_jpeg_kb(arr: np.ndarray) -> float:
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="JPEG", quality=95)
    return buf.tell() / 1000.0


class MetaReward(RewardFunction):
    """Scores read from ``metadata[i][key]`` times ``scale`` (None -> NaN): lets tests choose raw scores."""

    def __init__(self, key: str, scale: float = 1.0):
        super().__init__()
        self.key, self.scale, self.name = key, scale, key

    def score(self, images, prompts, metadata):
        return [None if m[self.key] is None else m[self.key] * self.scale for m in metadata]


# --------------------------------------------------------------------------- protocol


def test_registry_has_builtins():
    for name in ("jpeg_compressibility", "jpeg_incompressibility", "digits_classifier", "clip_score", "pickscore", "aesthetic", "http", "python"):
        assert name in REWARDS


def test_input_validation_and_nan_samples():
    r = build_reward({"name": "jpeg_incompressibility"})
    with pytest.raises(TypeError, match="divide uint8"):
        r(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        r(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        r(torch.zeros(2, 3, 8, 8), ["a", "b", "c"])
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x[1, 0, 2, 3] = float("nan")
    s = r(x)
    assert s.dtype == torch.float32 and s.device.type == "cpu" and s.shape == (3,)
    assert torch.isnan(s[1]) and torch.isfinite(s[[0, 2]]).all()
    assert r.info["num_nan"] == 1 and r.info["mean"] == pytest.approx(float(s[[0, 2]].double().mean()))
    assert r(torch.zeros(0, 3, 8, 8)).shape == (0,)


def test_inf_scores_become_nan():
    class Inf(RewardFunction):
        def score(self, images, prompts, metadata):
            return np.array([1.0, np.inf, -np.inf])

    s = Inf()(torch.zeros(3, 1, 4, 4))
    assert s[0] == 1 and torch.isnan(s[1:]).all()


# --------------------------------------------------------------------------- JPEG


def test_jpeg_matches_pil_and_orders_flat_above_noise():
    g = torch.Generator().manual_seed(0)
    flat = torch.full((1, 3, 64, 64), 0.4)
    noise = torch.rand(1, 3, 64, 64, generator=g)
    grey = torch.rand(1, 1, 32, 32, generator=g)
    x = torch.cat([flat, noise])
    comp = build_reward({"name": "jpeg_compressibility"})
    inc = build_reward({"name": "jpeg_incompressibility"})
    c, i = comp(x), inc(x)
    expected = torch.tensor([_pil_jpeg_kb(a) for a in _uint8(x)])
    assert torch.equal(i, expected.float()) and torch.equal(c, -expected.float())
    assert c[0] > c[1] and i[1] > i[0]  # flat is more compressible than noise
    assert inc(grey).item() == pytest.approx(_pil_jpeg_kb(_uint8(grey)[0]))


# --------------------------------------------------------------------------- digits


def test_digits_reward_on_real_digits():
    x, y = load_digits_arrays("test")
    images, y = to_unit_range(torch.from_numpy(x)), torch.from_numpy(y)
    r = build_reward({"name": "digits_classifier", "target": 3}, key="rl.rewards[0]")
    p = r(images)
    assert ((p >= 0) & (p <= 1)).all()
    assert p[y == 3].mean() > 0.9
    assert p[y != 3].mean() < 0.05
    # RGB 16x16 (each pixel a 2x2 block) is grayscaled and area-resized back to the same 8x8
    big = images[:20].repeat_interleave(2, dim=2).repeat_interleave(2, dim=3).repeat(1, 3, 1, 1)
    torch.testing.assert_close(r(big), p[:20], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="square"):
        r(torch.rand(2, 1, 8, 12))
    logp = build_reward({"name": "digits_classifier", "target": 3, "log_prob": True})(images[:10])
    torch.testing.assert_close(logp.exp(), p[:10], atol=1e-6, rtol=1e-5)
    with pytest.raises(ConfigError, match=r"rl\.rewards\[0\]\.target: must be a digit"):
        build_reward({"name": "digits_classifier", "target": 10}, key="rl.rewards[0]")


def test_digits_reward_prompted_target_reads_each_samples_class():
    x, y = load_digits_arrays("test")
    images, y = to_unit_range(torch.from_numpy(x)), torch.from_numpy(y)
    images, y = images[:200], y[:200]
    prompted = build_reward({"name": "digits_classifier", "target": "prompted"}, key="rl.rewards[0]")
    p = prompted(images, [str(int(c)) for c in y], [{"condition": int(c)} for c in y])
    # each sample scored exactly as the fixed-target reward of its own class scores it
    for c in range(10):
        fixed = build_reward({"name": "digits_classifier", "target": c})
        torch.testing.assert_close(p[y == c], fixed(images[y == c]), atol=0, rtol=0)
    assert p.mean() > 0.9
    # the wrong class (each label shifted by one) scores near zero: the label really is read per sample
    wrong = prompted(images, None, [{"condition": (int(c) + 1) % 10} for c in y])
    assert wrong.mean() < 0.05
    # another metadata field, e.g. a JSONL prompt set's {"label": 3}
    by_label = build_reward({"name": "digits_classifier", "target": "prompted", "label_key": "label"})
    torch.testing.assert_close(by_label(images, None, [{"label": int(c)} for c in y]), p, atol=0, rtol=0)
    logp = build_reward({"name": "digits_classifier", "target": "prompted", "log_prob": True})(images[:10], None, [{"condition": int(c)} for c in y[:10]])
    torch.testing.assert_close(logp.exp(), p[:10], atol=1e-6, rtol=1e-5)


def test_digits_reward_prompted_target_refuses_samples_without_a_class():
    images = torch.rand(2, 1, 8, 8)
    r = build_reward({"name": "digits_classifier", "target": "prompted"})
    with pytest.raises(RewardError, match=r"no metadata"):
        r(images)
    with pytest.raises(RewardError, match=r"sample 1 has None .*unconditional sample: set rl\.class_labels"):
        r(images, None, [{"condition": 3}, {"condition": None}])
    with pytest.raises(RewardError, match=r"sample 0 has None .*its metadata keys: \['tag'\]"):
        r(images, None, [{"tag": "x"}, {"condition": 1}])
    for bad in (10, -1, "3", 2.0, True):
        with pytest.raises(RewardError, match=r"needs metadata\['condition'\] = a digit 0\.\.9"):
            r(images, None, [{"condition": bad}, {"condition": 1}])
    with pytest.raises(ConfigError, match=r"rl\.rewards\[0\]\.target: expected an integer 0\.\.9 or 'prompted'"):
        build_reward({"name": "digits_classifier", "target": "prompt"}, key="rl.rewards[0]")
    with pytest.raises(ConfigError, match=r"k\.label_key: must name a metadata field"):
        build_reward({"name": "digits_classifier", "target": "prompted", "label_key": ""}, key="k")


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ({"target": 3}, r"k\.name: missing"),
        ({"name": "digit_classifier"}, r"k\.name: unknown reward 'digit_classifier' \(did you mean 'digits_classifier'\?\)"),
        ({"name": "digits_classifier"}, r"k\.target: required option"),
        ({"name": "digits_classifier", "target": "3"}, r"k\.target: expected an integer"),
        ({"name": "digits_classifier", "targer": 3}, r"k\.targer: unknown option .*did you mean 'target'"),
        ({"name": "jpeg_compressibility", "quality": 100}, r"k\.quality: must be in 1\.\.95"),
        ({"name": "http", "url": "localhost:8000"}, r"k\.url: must start with http"),
        ({"name": "http", "url": "http://x", "headers": {"a": 1}}, r"k\.headers"),
        ({"name": "clip_score", "model": "/no/such/folder"}, r"k\.model: '/no/such/folder' is not a folder"),
        ({"name": "aesthetic", "head": "/no/such/head.safetensors", "model": "/no/such"}, r"k\.head: .*not found"),
        ("jpeg_compressibility", r"k: expected a mapping"),
    ],
)
def test_build_reward_errors_name_key_and_field(spec, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_reward(spec, key="k")


def test_build_rewards_one_or_many():
    one = build_rewards([{"name": "jpeg_compressibility", "weight": 5.0}], key="rl.rewards")
    assert one.name == "jpeg_compressibility" and not isinstance(one, CombinedReward)
    many = build_rewards([{"name": "jpeg_compressibility"}, {"name": "jpeg_incompressibility", "weight": 0.5}], key="rl.rewards")
    assert isinstance(many, CombinedReward) and many.weights == [1.0, 0.5]
    with pytest.raises(ConfigError, match=r"rl\.rewards: at least one"):
        build_rewards([], key="rl.rewards")
    with pytest.raises(ConfigError, match=r"rl\.rewards\[1\]\.weight: expected a number"):
        build_rewards([{"name": "jpeg_compressibility"}, {"name": "jpeg_compressibility", "weight": "heavy"}], key="rl.rewards")
    with pytest.raises(ConfigError, match=r"rl\.rewards\[1\]\.name"):
        build_rewards([{"name": "jpeg_compressibility"}, {"name": "nope"}], key="rl.rewards")


def test_register_reward_decorator_and_options():
    @register_reward("test_brightness")
    class Brightness(RewardFunction):
        def __init__(self, *, target: float = 0.5):
            super().__init__()
            self.target = target

        def score(self, images, prompts, metadata):
            return -(images.mean(dim=(1, 2, 3)) - self.target).abs()

    try:
        r = build_reward({"name": "test_brightness", "target": 1})  # int accepted as float
        assert r.name == "test_brightness" and r.target == 1.0
        assert r(torch.zeros(2, 1, 4, 4)).tolist() == [-1.0, -1.0]
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_brightness", lambda: None)
    finally:
        REWARDS.pop("test_brightness")


# --------------------------------------------------------------------------- combined


def _meta(a, b):
    return [{"a": x, "b": y} for x, y in zip(a, b)]


def test_combined_is_scale_invariant_and_matches_zscores():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, generator=g).tolist(), torch.rand(16, generator=g).tolist()
    x = torch.zeros(16, 1, 4, 4)
    c1 = CombinedReward([MetaReward("a"), MetaReward("b")], [1.0, 0.5])
    c2 = CombinedReward([MetaReward("a"), MetaReward("b", scale=1000.0)], [1.0, 0.5])
    s1, s2 = c1(x, None, _meta(a, b)), c2(x, None, _meta(a, b))
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=0)

    def z(v):
        v = np.asarray(v, np.float64)
        return (v - v.mean()) / v.std()

    torch.testing.assert_close(s1, torch.tensor(z(a) + 0.5 * z(b), dtype=torch.float32), atol=1e-5, rtol=0)
    assert c2.info["b/mean"] == pytest.approx(1000 * np.mean(b), rel=1e-5)
    assert c1.info["a/mean"] == pytest.approx(np.mean(a), rel=1e-5, abs=1e-6)
    assert set(c1.last_components) == {"a", "b"}
    # raw sums would be dominated by the x1000 component; the z-scored total is not
    assert abs(np.corrcoef(s2.numpy(), z(a))[0, 1]) > 0.8


def test_combined_nan_propagation_and_zero_spread():
    x = torch.zeros(5, 1, 4, 4)
    a = [1.0, None, 3.0, 4.0, 10.0]
    b = [2.0, 2.0, None, 2.0, 2.0]  # no spread: contributes 0
    c = CombinedReward([MetaReward("a"), MetaReward("b")], [1.0, 3.0])
    s = c(x, None, _meta(a, b))
    assert torch.isnan(s[[1, 2]]).all() and torch.isfinite(s[[0, 3, 4]]).all()
    ok = np.array([1.0, 3.0, 4.0, 10.0])  # a's z-score uses a's own non-NaN samples
    za = (ok - ok.mean()) / ok.std()
    torch.testing.assert_close(s[[0, 3, 4]], torch.tensor(za[[0, 2, 3]], dtype=torch.float32), atol=1e-6, rtol=0)
    assert c.info["num_nan"] == 2 and c.info["a/num_nan"] == 1 and c.info["b/num_nan"] == 1
    assert torch.equal(zscore(torch.tensor([float("nan"), 2.0])).isnan(), torch.tensor([True, False]))


def test_combined_duplicate_names_are_made_unique():
    c = build_rewards([{"name": "jpeg_compressibility"}, {"name": "jpeg_compressibility", "quality": 50}])
    assert c.names == ["jpeg_compressibility_0", "jpeg_compressibility_1"]


# --------------------------------------------------------------------------- python rewards


USER_MODULE = '''
import numpy as np
import torch

def brightness(images, prompts, metadata, offset=0.0):
    return images.mean(dim=(1, 2, 3)).tolist()

def as_array(images, prompts, metadata, offset=0.0):
    return np.asarray([len(p) for p in prompts]) + offset

def ddpo_style(images, prompts, metadata):
    return torch.ones(images.shape[0]), {"called": True}

def wrong_count(images, prompts, metadata):
    return [1.0]

def broken(images, prompts, metadata):
    raise KeyError("boom")

class Scaled:
    def __init__(self, factor):
        self.factor = factor

    def __call__(self, images, prompts, metadata):
        return self.factor * images.mean(dim=(1, 2, 3))

NOT_CALLABLE = 3
'''


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    name = f"flowlab_user_rewards_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    (tmp_path / f"{name}_bad.py").write_text("import not_a_real_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_python_reward(user_module):
    x = torch.stack([torch.full((1, 4, 4), v) for v in (0.1, 0.5, 0.9)])
    r = build_reward({"name": "python", "function": f"{user_module}:brightness"})
    torch.testing.assert_close(r(x), torch.tensor([0.1, 0.5, 0.9]))
    r = build_reward({"name": "python", "function": f"{user_module}:as_array", "kwargs": {"offset": 0.5}, "label": "len"})
    assert r.name == "len" and r(x, ["a", "bb", "ccc"]).tolist() == [1.5, 2.5, 3.5]
    r = build_reward({"name": "python", "function": f"{user_module}:ddpo_style"})
    assert r(x).tolist() == [1, 1, 1] and r.info["user"] == {"called": True}
    r = build_reward({"name": "python", "function": f"{user_module}:Scaled", "kwargs": {"factor": 2.0}})
    torch.testing.assert_close(r(x), torch.tensor([0.2, 1.0, 1.8]))
    with pytest.raises(RewardError, match="returned \\(1,\\) scores for 3 images"):
        build_reward({"name": "python", "function": f"{user_module}:wrong_count"})(x)
    with pytest.raises(RewardError, match="raised KeyError"):
        build_reward({"name": "python", "function": f"{user_module}:broken"})(x)


@pytest.mark.parametrize(
    "function, pattern",
    [
        ("no_such_module_xyz:f", r"r\.function: cannot import module 'no_such_module_xyz'"),
        ("{m}:brightnes", r"r\.function: .* has no attribute 'brightnes'.*did you mean 'brightness'"),
        ("{m}:NOT_CALLABLE", r"r\.function: .* not a callable"),
        ("{m}_bad:f", r"r\.function: .*failed to import a dependency.*not_a_real_dependency_xyz"),
        ("{m}.brightness", r"r\.function: expected 'module:function'"),
        ("{m}:Scaled", r"r\.kwargs: constructing"),
    ],
)
def test_python_reward_config_errors(user_module, function, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_reward({"name": "python", "function": function.format(m=user_module)}, key="r")


# --------------------------------------------------------------------------- CLIP family


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random tiny CLIPModel + CLIPTokenizer (vocab/merges written here) + CLIPImageProcessor in one folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("tiny_clip")
    vocab = write_clip_tokenizer_files(d, merges=[("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("r", "e"), ("re", "d</w>")])
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77)
    assert len(tok) == len(vocab) == 520  # a real vocabulary, not transformers' empty fallback
    assert tok("a red cat").input_ids == [vocab["<|startoftext|>"], vocab["a</w>"], vocab["red</w>"], vocab["cat</w>"], vocab["<|endoftext|>"]]
    eos = vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30, patch_size=10),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(np.log(50.0))  # not 100, so the scaling is visible
    model.save_pretrained(d)
    tok.save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(d)
    return d


def _hand_embeddings(folder, images, prompts=None):
    """Normalised image (and text) embeddings computed here, straight from transformers."""
    from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(folder).eval()
    proc = AutoImageProcessor.from_pretrained(folder)
    pil = [Image.fromarray(a).convert("RGB") if a.shape[-1] == 3 else Image.fromarray(a[..., 0]).convert("RGB") for a in _uint8(images)]
    with torch.no_grad():
        out = model.get_image_features(pixel_values=proc(images=pil, return_tensors="pt")["pixel_values"])
        img = out if isinstance(out, torch.Tensor) else out.pooler_output
        img = img / img.norm(dim=-1, keepdim=True)
        if prompts is None:
            return model, img, None
        tok = CLIPTokenizer.from_pretrained(folder)(prompts, padding=True, return_tensors="pt")
        out = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        txt = out if isinstance(out, torch.Tensor) else out.pooler_output
        return model, img, txt / txt.norm(dim=-1, keepdim=True)


def test_clip_score_and_pickscore_equal_hand_computation(tiny_clip):
    g = torch.Generator().manual_seed(1)
    images = torch.cat([torch.rand(3, 3, 40, 48, generator=g), torch.full((1, 3, 40, 48), 0.3)])
    prompts = ["a red cat", "a dog", "a red cat", "cat dog red"]
    model, img, txt = _hand_embeddings(tiny_clip, images, prompts)
    cos = (img * txt).sum(-1)
    scale = model.logit_scale.exp().item()
    assert scale == pytest.approx(50.0)
    clip = build_reward({"name": "clip_score", "model": str(tiny_clip), "batch_size": 3}, key="rl.rewards[0]")
    torch.testing.assert_close(clip(images, prompts), (scale * cos / 100).float(), atol=1e-5, rtol=1e-5)
    pick = build_reward({"name": "pickscore", "model": str(tiny_clip)})  # processor: the model's folder
    torch.testing.assert_close(pick(images, prompts), (scale * cos / 26).float(), atol=1e-5, rtol=1e-5)
    assert len(pick.tokenizer) == 520 and pick.max_text_length == 77
    with pytest.raises(ValueError, match="needs prompts"):
        clip(images)
    # single-channel images are repeated to RGB
    grey = images[:2, :1]
    _, img_g, txt_g = _hand_embeddings(tiny_clip, grey, prompts[:2])
    torch.testing.assert_close(clip(grey, prompts[:2]), (scale * (img_g * txt_g).sum(-1) / 100).float(), atol=1e-5, rtol=1e-5)


def test_clip_rejects_folder_without_tokenizer(tiny_clip, tmp_path):
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"k\.processor: (cannot load a tokenizer|the tokenizer loaded .* has only)"):
        build_reward({"name": "clip_score", "model": str(tiny_clip), "processor": str(tmp_path)}, key="k")


def _random_head(input_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dims = [input_dim, 1024, 128, 64, 16, 1]
    idx = [0, 2, 4, 6, 7]
    state = {}
    for i, (a, b) in zip(idx, zip(dims[:-1], dims[1:])):
        state[f"layers.{i}.weight"] = torch.randn(b, a, generator=g) / a**0.5
        state[f"layers.{i}.bias"] = torch.randn(b, generator=g) * 0.1
    return state


def test_aesthetic_equals_hand_computation(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    state = _random_head(16)
    save_file(state, str(tmp_path / "head.safetensors"))
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, tmp_path / "head.pth")
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    _, img, _ = _hand_embeddings(tiny_clip, images)
    h = img
    for i in (0, 2, 4, 6, 7):  # linear layers only: the released predictor has no nonlinearity
        h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    expected = h[:, 0]
    for head in ("head.safetensors", "head.pth"):
        r = build_reward({"name": "aesthetic", "head": str(tmp_path / head), "model": str(tiny_clip)})
        torch.testing.assert_close(r(images), expected, atol=1e-5, rtol=1e-5)
    save_file(_random_head(768), str(tmp_path / "l14.safetensors"))
    with pytest.raises(ConfigError, match=r"k\.head: the head expects 768-d embeddings but .* gives 16-d"):
        build_reward({"name": "aesthetic", "head": str(tmp_path / "l14.safetensors"), "model": str(tiny_clip)}, key="k")
    save_file({"layers.0.weight": torch.zeros(1024, 16)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ConfigError, match=r"k\.head: .*does not match the LAION v2 layout"):
        build_reward({"name": "aesthetic", "head": str(tmp_path / "partial.safetensors"), "model": str(tiny_clip)}, key="k")


# --------------------------------------------------------------------------- async


class SlowReward(RewardFunction):
    name = "slow"

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay
        self.threads: set[str] = set()

    def score(self, images, prompts, metadata):
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        return images.mean(dim=(1, 2, 3))


def test_async_reward_overlaps_and_copies_inputs():
    reward = SlowReward(0.3)
    x = torch.rand(4, 1, 4, 4)
    expected = x.mean(dim=(1, 2, 3))
    with AsyncReward(reward, max_workers=2) as ar:
        t0 = time.perf_counter()
        f1, f2 = ar.submit(x), ar.submit(x * 0.5)
        x.zero_()  # the caller may reuse its buffer at once
        assert isinstance(f1, Future)
        torch.testing.assert_close(f1.result(timeout=10), expected)
        torch.testing.assert_close(f2.result(timeout=10), expected * 0.5)
        elapsed = time.perf_counter() - t0
    assert elapsed < 0.55, f"two 0.3 s calls on 2 workers took {elapsed:.2f} s: they did not overlap"
    assert all(t.startswith("reward-slow") for t in reward.threads) and threading.current_thread().name not in reward.threads
    with pytest.raises(RuntimeError, match="closed"):
        ar.submit(x)
    with pytest.raises(ValueError, match="prompts"):
        AsyncReward(reward).submit(x, ["only one"])


def test_async_reward_propagates_reward_errors(tmp_path):
    class Failing(RewardFunction):
        def score(self, images, prompts, metadata):
            raise RewardError("server down")

    with AsyncReward(Failing()) as ar:
        fut = ar.submit(torch.zeros(2, 1, 4, 4))
        with pytest.raises(RewardError, match="server down"):
            fut.result(timeout=10)
