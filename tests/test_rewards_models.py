"""Rewards with optional heavy models (OCR, HPSv2, ImageReward) tested offline through injected
tiny models and a stub recogniser; their missing-extra errors; and the combination of several
rewards (z-scored or the reference's raw sum, over a global batch)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from flowlab.errors import ConfigError
from flowlab.rewards import CombinedReward, RewardFunction, build_reward, build_rewards, combine_scores, zscore
from flowlab.rewards.hps import HPSv2Reward, resize_max_pad
from flowlab.rewards.imagereward import ImageRewardReward
from flowlab.rewards.ocr import OCRReward, levenshtein, ocr_reward, quoted_text


# --------------------------------------------------------------------------- missing extras


@pytest.mark.parametrize("name, module, extra", [("ocr", "paddleocr", "ocr"), ("hpsv2", "hpsv2", "hps"), ("imagereward", "ImageReward", "imagereward")])
def test_missing_extra_stops_at_config_time(name, module, extra):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    with pytest.raises(ConfigError, match=rf"nft\.rewards\[0\]\.name: reward '{name}' needs the optional extra '{extra}'.*pip install 'flowlab\[{extra}\]'"):
        build_reward({"name": name}, key="nft.rewards[0]")


# --------------------------------------------------------------------------- OCR


def test_levenshtein_closed_forms():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("sitting", "kitten") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "") == 3 and levenshtein("abc", "abc") == 0
    assert levenshtein("flaw", "lawn") == 2 and levenshtein("abc", "cab") == 2
    rng = np.random.default_rng(0)
    for _ in range(30):  # metric axioms on random strings over a small alphabet
        a, b, c = ("".join(rng.choice(list("abc"), size=rng.integers(0, 7))) for _ in range(3))
        assert levenshtein(a, b) == levenshtein(b, a) <= max(len(a), len(b))
        assert levenshtein(a, c) <= levenshtein(a, b) + levenshtein(b, c)
        assert levenshtein(a, b) >= abs(len(a) - len(b))


def test_ocr_score_formula():
    assert ocr_reward("Hello World", "hello world") == 1.0  # spaces and case ignored
    assert ocr_reward("xx HELLO WORLD yy", "Hello World") == 1.0  # target found inside: distance 0
    assert ocr_reward("helo world", "Hello World") == pytest.approx(1 - 1 / 10)
    assert ocr_reward("", "Hello") == 0.0
    assert ocr_reward("qqqqqqqqqqqqqqqqqqqq", "Hello") == 0.0  # distance capped at the target's length
    assert ocr_reward("Hallo", "Hello") == pytest.approx(0.8)
    with pytest.raises(ValueError, match="empty"):
        ocr_reward("x", "  ")
    assert quoted_text('a sign saying "OPEN 24h" at night') == "OPEN 24h" and quoted_text('no "closing') is None


class StubRecogniser:
    """Returns scripted ``(text, confidence)`` lines per call and records the arrays it saw."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.seen = []

    def recognise(self, image):
        self.seen.append(image)
        a = self.answers[len(self.seen) - 1]
        if isinstance(a, Exception):
            raise a
        return a


def test_ocr_reward_through_a_stub_recogniser():
    stub = StubRecogniser([
        [("Hello", 0.9), ("World", 0.8)],  # exact
        [("Helo World", 0.9), ("junk", 0.0)],  # one deletion; a zero-confidence line is ignored
        RuntimeError("detector crashed"),  # the reference's failure path: maximum penalty
        [("OPEN", 0.99)],  # the metadata target takes precedence over the quotes
    ])
    reward = OCRReward(recogniser=stub)
    images = torch.rand(4, 1, 6, 5, generator=torch.Generator().manual_seed(0))
    prompts = ['fireworks spelling "Hello World"', 'a sign "Hello World"', 'a cake "Happy"', 'a door with "CLOSED"']
    meta = [{}, {}, {}, {"text": "open"}]
    s = reward(images, prompts, meta)
    torch.testing.assert_close(s, torch.tensor([1.0, 0.9, 0.0, 1.0]))
    assert reward.info["num_ocr_failed"] == 1
    first = stub.seen[0]  # an (H, W, 3) uint8 RGB array of the image, as PaddleOCR takes
    assert first.shape == (6, 5, 3) and first.dtype == np.uint8
    assert np.array_equal(first[..., 0], (images[0, 0] * 255).round().to(torch.uint8).numpy()) and np.array_equal(first[..., 0], first[..., 2])
    with pytest.raises(ValueError, match=r"sample 1 has neither: 'no quotes here'"):
        OCRReward(recogniser=StubRecogniser([[]] * 2))(images[:2], ['"a"', "no quotes here"])
    with pytest.raises(ConfigError, match=r"recogniser"):
        build_reward({"name": "ocr", "recogniser": object()}, key="r")


# --------------------------------------------------------------------------- HPSv2


class TinyOpenCLIP(nn.Module):
    """The open_clip interface HPSv2Reward uses, at toy size: ``visual.image_size``, and
    ``encode_image``/``encode_text`` with ``normalize``."""

    def __init__(self, image_size=8, dim=6, vocab=300):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.visual = nn.Module()
        self.visual.image_size = image_size
        self.image_proj = nn.Parameter(torch.randn(3 * image_size * image_size, dim, generator=g) * 0.1)
        self.token_embedding = nn.Parameter(torch.randn(vocab, dim, generator=g))

    def encode_image(self, x, normalize=False):
        f = x.flatten(1) @ self.image_proj
        return f / f.norm(dim=-1, keepdim=True) if normalize else f

    def encode_text(self, tokens, normalize=False):
        f = self.token_embedding[tokens].mean(dim=1)
        return f / f.norm(dim=-1, keepdim=True) if normalize else f


def tiny_tokenize(texts):
    """Byte codes padded with 0 to 77, like open_clip's tokenize shape."""
    out = torch.zeros(len(texts), 77, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = list(t.encode("utf-8"))[:77]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def test_resize_max_pad_closed_forms():
    x = torch.rand(2, 3, 8, 8)
    assert resize_max_pad(x, 8) is x  # already the size: unchanged (the reference's scale == 1 branch)
    wide = torch.full((1, 3, 4, 8), 0.7)
    y = resize_max_pad(wide, 16)  # 4x8 -> 8x16, then 4 rows of padding above and below
    assert y.shape == (1, 3, 16, 16)
    assert torch.equal(y[:, :, :4], torch.zeros(1, 3, 4, 16)) and torch.equal(y[:, :, 12:], torch.zeros(1, 3, 4, 16))
    torch.testing.assert_close(y[:, :, 4:12], torch.full((1, 3, 8, 16), 0.7))  # a constant image stays constant
    tall = resize_max_pad(torch.ones(1, 1, 10, 5), 4)  # 10x5 -> 4x2, columns padded 1 left, 1 right
    assert tall.shape == (1, 1, 4, 4) and torch.equal(tall[..., 0], torch.zeros(1, 1, 4)) and torch.equal(tall[..., 3], torch.zeros(1, 1, 4))


def test_hps_scores_are_cosines_of_the_reference_preprocessing():
    model = TinyOpenCLIP()
    reward = HPSv2Reward(model=model, tokenizer=tiny_tokenize, batch_size=2)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 12, 6, generator=g)
    prompts = ["a red apple", "a cat", "the sea at night"]
    s = reward(images, prompts)
    # by hand: resize the longer side to 8 (bicubic), pad to a square, normalise with OpenAI CLIP's mean/std
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    resized = torch.nn.functional.interpolate(images, size=(8, 4), mode="bicubic", antialias=True, align_corners=False)
    x = (torch.nn.functional.pad(resized, (2, 2, 0, 0)) - mean) / std
    img = model.encode_image(x, normalize=True)
    txt = model.encode_text(tiny_tokenize(prompts), normalize=True)
    torch.testing.assert_close(s, (img @ txt.T).diagonal(), atol=1e-5, rtol=0)
    assert bool((s.abs() <= 1 + 1e-6).all())
    # each image is scored against its own prompt: permuting the pairs permutes the scores
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(reward(images[perm], [prompts[i] for i in perm]), s[perm], atol=1e-6, rtol=0)
    grey = reward(images[:, :1], prompts)  # grey images are repeated to 3 channels
    torch.testing.assert_close(grey, reward(images[:, :1].expand(-1, 3, -1, -1), prompts))
    with pytest.raises(ValueError, match="needs prompts"):
        reward(images)


def test_hps_options_are_checked():
    with pytest.raises(ConfigError, match=r"r\.version: must be one of v2\.0, v2\.1"):
        build_reward({"name": "hpsv2", "version": "v3"}, key="r")
    with pytest.raises(ConfigError, match=r"r\.tokenizer: model and tokenizer are given together"):
        build_reward({"name": "hpsv2", "model": TinyOpenCLIP()}, key="r")


# --------------------------------------------------------------------------- ImageReward


def _bert_tokenizer(tmp_path):
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "red", "apple", "the", "sea"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizer(str(tmp_path / "vocab.txt"))
    assert len(tok) == len(words)
    return tok


class TinyImageReward(nn.Module):
    """ImageReward's interface at toy size: ``preprocess(pil)``, ``blip.tokenizer``, and
    ``score_gard(ids, mask, pixels) -> (N, 1)`` with the package's normalisation."""

    def __init__(self, tokenizer, size=4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.blip = nn.Module()
        self.blip.tokenizer = tokenizer
        self.size = size
        self.embed = nn.Parameter(torch.randn(len(tokenizer), 5, generator=g))
        self.image_w = nn.Parameter(torch.randn(3 * size * size, 5, generator=g) * 0.1)
        self.mlp = nn.Linear(5, 1)
        self.device = "cpu"
        self.seen_ids = []

    def preprocess(self, pil):
        arr = torch.from_numpy(np.asarray(pil.resize((self.size, self.size)), dtype=np.float32) / 255.0)
        return arr.permute(2, 0, 1)

    def score_gard(self, ids, mask, pixels):
        self.seen_ids.append(ids)
        text = (self.embed[ids] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        feat = torch.tanh(text + pixels.flatten(1) @ self.image_w)
        return (self.mlp(feat) - 0.16717362830052426) / 1.0333394966054072


def test_imagereward_scores_each_pair_batched(tmp_path):
    scorer = TinyImageReward(_bert_tokenizer(tmp_path))
    reward = ImageRewardReward(scorer=scorer, batch_size=2)
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    prompts = ["a red apple", "a cat", "the sea dog"]
    s = reward(images, prompts)
    assert scorer.seen_ids[0].shape == (2, 35)  # padded to ImageReward's 35 tokens
    one_by_one = torch.cat([ImageRewardReward(scorer=scorer, batch_size=1)(images[i : i + 1], prompts[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(s, one_by_one, atol=1e-6, rtol=0)
    perm = [1, 2, 0]
    torch.testing.assert_close(reward(images[perm], [prompts[i] for i in perm]), s[perm], atol=1e-6, rtol=0)
    assert not torch.allclose(reward(images, prompts[::-1]), s)  # the prompt matters
    with pytest.raises(ConfigError, match=r"r\.scorer: .* has no preprocess\(\)"):
        build_reward({"name": "imagereward", "scorer": nn.Linear(1, 1)}, key="r")


# --------------------------------------------------------------------------- combination


class MetaReward(RewardFunction):
    """Scores read from ``metadata[i][key]`` times ``scale`` plus ``shift`` (None -> NaN)."""

    def __init__(self, key, scale=1.0, shift=0.0):
        super().__init__()
        self.key, self.scale, self.shift, self.name = key, scale, shift, key

    def score(self, images, prompts, metadata):
        return [None if m[self.key] is None else m[self.key] * self.scale + self.shift for m in metadata]


def _batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, generator=g).tolist(), torch.rand(n, generator=g).tolist()
    return torch.zeros(n, 1, 4, 4), [{"a": x, "b": y} for x, y in zip(a, b)], np.array(a), np.array(b)


def test_combine_scores_zscore_is_scale_invariant_and_sum_is_the_reference():
    x, meta, a, b = _batch(12, 0)
    m = torch.tensor(np.stack([a, b], axis=1))
    z = lambda v: (v - v.mean()) / v.std()  # noqa: E731
    torch.testing.assert_close(combine_scores(m, [1.0, 0.5]), torch.tensor(z(a) + 0.5 * z(b)))
    rescaled = m * torch.tensor([[1.0, 1000.0]]) + torch.tensor([[0.0, -7.0]])
    torch.testing.assert_close(combine_scores(rescaled, [1.0, 0.5]), combine_scores(m, [1.0, 0.5]))
    torch.testing.assert_close(combine_scores(m, [1.0, 0.5], "sum"), torch.tensor(a + 0.5 * b))  # multi_score's total
    assert not torch.allclose(combine_scores(rescaled, [1.0, 0.5], "sum"), combine_scores(m, [1.0, 0.5], "sum"))
    with pytest.raises(ValueError, match="2 columns but 3 weights"):
        combine_scores(m, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="combine must be one of zscore, sum"):
        combine_scores(m, [1.0, 1.0], "mean")


def test_global_combination_equals_the_hand_computation_over_all_chunks():
    reward = CombinedReward([MetaReward("a"), MetaReward("b", scale=30.0)], [2.0, 1.0])
    chunks = [_batch(4, seed) for seed in (1, 2, 3)]  # e.g. three rollout chunks (or processes)
    raw = torch.cat([reward.raw_scores(x, None, meta) for x, meta, _, _ in chunks])
    assert raw.shape == (12, 2) and raw.dtype == torch.float32
    a = np.concatenate([c[2] for c in chunks])
    b = 30.0 * np.concatenate([c[3] for c in chunks])
    torch.testing.assert_close(raw, torch.tensor(np.stack([a, b], 1), dtype=torch.float32))
    z = lambda v: (v - v.mean()) / v.std()  # noqa: E731
    total = reward.combine_global(raw)
    torch.testing.assert_close(total, torch.tensor(2 * z(a) + z(b), dtype=torch.float32), atol=1e-5, rtol=0)
    per_chunk = torch.cat([reward(x, None, meta) for x, meta, _, _ in chunks])  # statistics of each chunk alone
    assert not torch.allclose(per_chunk, total, atol=1e-3)
    s = CombinedReward([MetaReward("a"), MetaReward("b", scale=30.0)], [2.0, 1.0], combine="sum")
    torch.testing.assert_close(s.combine_global(raw), torch.tensor(2 * a + b, dtype=torch.float32), atol=1e-5, rtol=0)
    torch.testing.assert_close(s(chunks[0][0], None, chunks[0][1]), torch.tensor(2 * chunks[0][2] + 30 * chunks[0][3], dtype=torch.float32))


def test_raw_scores_nan_rows_and_build_rewards_combine():
    x, meta, a, b = _batch(3, 4)
    x[1, 0, 0, 0] = float("nan")  # a non-finite image: its whole row is NaN
    meta[2]["b"] = None  # one component could not score sample 2
    raw = CombinedReward([MetaReward("a"), MetaReward("b")]).raw_scores(x, None, meta)
    assert torch.isnan(raw[1]).all() and torch.isnan(raw[2, 1]) and not torch.isnan(raw[2, 0]) and torch.isfinite(raw[0]).all()
    assert torch.isnan(combine_scores(raw, [1.0, 1.0])[[1, 2]]).all()
    r = build_rewards([{"name": "jpeg_compressibility", "weight": 2.0}, {"name": "jpeg_incompressibility"}], combine="sum")
    assert r.combine == "sum" and r.weights == [2.0, 1.0] and "combine='sum'" in repr(r)
    assert build_rewards([{"name": "jpeg_compressibility"}, {"name": "jpeg_incompressibility"}]).combine == "zscore"
    torch.testing.assert_close(zscore(torch.tensor([1.0, 3.0])), torch.tensor([-1.0, 1.0], dtype=torch.float64))
