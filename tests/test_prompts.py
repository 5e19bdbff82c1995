"""Prompt data sets: text, JSONL and Hugging Face forms, errors naming file/line/column, and the
deterministic per-step sampler."""
from __future__ import annotations

import json
import os

import pytest
import torch

from flowlab.data import DataError
from flowlab.data.prompts import PromptDataConfig, PromptSampler, PromptSet, load_prompts

GENEVAL_ROWS = [
    {"tag": "counting", "include": [{"class": "wine glass", "count": 2}], "exclude": [{"class": "wine glass", "count": 3}], "prompt": "a photo of two wine glasses"},
    {"tag": "color_attr", "include": [{"class": "handbag", "count": 1, "color": "pink"}], "prompt": "a photo of a pink handbag"},
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
]


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def test_text_file_one_prompt_per_line(tmp_path):
    f = tmp_path / "train.txt"
    f.write_text("a cat  \n\n  a dog on a \"sign\"\nlast line without newline", encoding="utf-8")
    ps = load_prompts(str(f))
    assert ps.prompts == ["a cat", 'a dog on a "sign"', "last line without newline"]
    assert ps.metadata == [{}, {}, {}]
    assert len(ps) == 3 and ps[1] == ('a dog on a "sign"', {})


def test_jsonl_other_fields_are_metadata(tmp_path):
    ps = load_prompts(_jsonl(tmp_path / "test_metadata.jsonl", GENEVAL_ROWS))
    assert ps.prompts == [r["prompt"] for r in GENEVAL_ROWS]
    assert ps.metadata == GENEVAL_ROWS  # the GenEval server reads tag/include/exclude and prompt
    prompts, meta = ps.select(torch.tensor([2, 0]))
    assert prompts == ["a photo of a bench", "a photo of two wine glasses"] and meta == [GENEVAL_ROWS[2], GENEVAL_ROWS[0]]
    meta[0]["tag"] = "changed"  # copies: a reward mutating its metadata does not alter the set
    assert ps.metadata[2]["tag"] == "single_object"


def test_jsonl_custom_column(tmp_path):
    ps = load_prompts(_jsonl(tmp_path / "p.jsonl", [{"caption": "x", "text": "OPEN"}]), column="caption")
    assert ps.prompts == ["x"] and ps.metadata == [{"caption": "x", "text": "OPEN"}]


@pytest.mark.parametrize(
    "content, pattern",
    [
        ('{"prompt": "a"}\n{"prompt": "b"\n', r"p\.jsonl:2: not valid JSON"),
        ('{"prompt": "a"}\n\n["x"]\n', r"p\.jsonl:3: expected a JSON object"),
        ('{"prompt": "a"}\n{"caption": "b"}\n', r"p\.jsonl:2: no 'prompt' field \(fields: \['caption'\]\)"),
        ('{"prompt": 3}\n', r"p\.jsonl:1: 'prompt' is a int"),
        ('{"prompt": "  "}\n', r"p\.jsonl:1: 'prompt' is an empty prompt"),
        ("\n\n", r"holds no prompts"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, pattern):
    f = tmp_path / "p.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=pattern):
        load_prompts(str(f))


def test_missing_file_and_bad_format(tmp_path):
    with pytest.raises(DataError, match=r"prompt file .*nope\.txt.* does not exist"):
        load_prompts(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match=r"format must be one of"):
        load_prompts(str(tmp_path / "x.txt"), format="csv")
    bad = tmp_path / "latin.txt"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match=r"latin\.txt.*not UTF-8"):
        load_prompts(str(bad))


def test_hf_saved_dataset_split_and_column(tmp_path):
    import datasets

    d = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"caption": ["a", "b", "c"], "text": ["A", "B", "C"]}),
            "test": datasets.Dataset.from_dict({"caption": ["t"], "text": ["T"]}),
        }
    )
    d.save_to_disk(str(tmp_path / "ds"))
    ps = load_prompts(str(tmp_path / "ds"), split="test", column="caption")
    assert ps.prompts == ["t"] and ps.metadata == [{"caption": "t", "text": "T"}]
    with pytest.raises(DataError, match=r"prompt column 'prompt' not found in split 'train'.*\['caption', 'text'\]"):
        load_prompts(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"split 'val' not found"):
        load_prompts(str(tmp_path / "ds"), split="val", column="caption")


def test_hf_folder_through_load_dataset(tmp_path):
    folder = tmp_path / "jsonfolder"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", [{"prompt": "p1", "text": "X"}, {"prompt": "p2", "text": "Y"}])
    ps = load_prompts(str(folder), format="hf")
    assert ps.prompts == ["p1", "p2"] and [m["text"] for m in ps.metadata] == ["X", "Y"]


def test_config_loads_train_and_held_out_sets(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("a\nb\nc\n")
    cfg = PromptDataConfig(path=str(train), eval_path=_jsonl(tmp_path / "test_metadata.jsonl", GENEVAL_ROWS), eval_max_prompts=2)
    assert cfg.load_train().prompts == ["a", "b", "c"]
    held_out = cfg.load_eval()
    assert held_out.prompts == [r["prompt"] for r in GENEVAL_ROWS[:2]]
    assert PromptDataConfig(path=str(train)).load_eval() is None
    with pytest.raises(DataError, match=r"prompts\.path: empty"):
        PromptDataConfig().load_train()


def test_prompt_set_lengths_must_match():
    with pytest.raises(DataError, match=r"2 prompts but 1 metadata"):
        PromptSet(["a", "b"], [{}], "x")


def test_sampler_is_a_function_of_seed_and_step():
    s = PromptSampler(num_prompts=50, prompts_per_step=8, seed=3)
    a = s.indices(7)
    assert a.dtype == torch.int64 and a.shape == (8,) and len(set(a.tolist())) == 8  # distinct
    assert bool(((a >= 0) & (a < 50)).all())
    assert torch.equal(a, PromptSampler(50, 8, seed=3).indices(7))  # a resumed run draws the same
    assert not torch.equal(a, s.indices(8)) and not torch.equal(a, PromptSampler(50, 8, seed=4).indices(7))
    # the same generator as the trainer's StepContext for (seed, step)
    g = torch.Generator().manual_seed(3 * 1_000_003 + 7)
    assert torch.equal(a, torch.randperm(50, generator=g)[:8])
    # each process takes its contiguous share of the same global draw
    parts = [s.local(7, r, 4) for r in range(4)]
    assert torch.equal(torch.cat(parts), a)
    with pytest.raises(DataError, match=r"do not split over 3 processes"):
        s.local(7, 0, 3)


def test_sampler_draw_repeats_each_prompt_group_size_times(tmp_path):
    ps = load_prompts(_jsonl(tmp_path / "m.jsonl", GENEVAL_ROWS))
    s = PromptSampler(len(ps), 2, seed=1)
    prompts, meta = s.draw(ps, step=5, repeat=3)
    idx = s.indices(5).tolist()
    assert prompts == [ps.prompts[i] for i in idx for _ in range(3)] and meta == [ps.metadata[i] for i in idx for _ in range(3)]
    assert meta[0] is not meta[1]  # one dict per entry
    with pytest.raises(DataError, match=r"built for 5 prompts"):
        PromptSampler(5, 2).draw(ps, 0)


def test_sampler_covers_the_set_uniformly():
    s = PromptSampler(num_prompts=10, prompts_per_step=5, seed=0)
    counts = torch.bincount(torch.cat([s.indices(k) for k in range(2000)]), minlength=10).double()
    assert counts.sum() == 10_000
    assert float((counts - 1000).abs().max()) < 5 * (1000 * 0.5) ** 0.5  # binomial(2000, 1/2): 5 sigma


def test_sampler_rejects_more_prompts_per_step_than_the_set_has():
    with pytest.raises(DataError, match=r"has 4 prompts but each step draws 6 distinct"):
        PromptSampler(4, 6)


def test_shipped_geneval_train_sample_is_geneval_metadata_disjoint_from_the_test_set():
    """The GenEval config's training sample carries the metadata the GenEval server scores with, in
    the reference test set's format, and no prompt of the held-out set (no training on the test)."""
    root = os.path.join(os.path.dirname(__file__), "..", "data", "prompts")
    train = load_prompts(os.path.join(root, "geneval_train_metadata.jsonl"))
    test = load_prompts(os.path.join(root, "geneval_test_metadata.jsonl"))
    assert len(train.prompts) >= 20 and not set(train.prompts) & set(test.prompts)
    test_classes = {i["class"] for m in test.metadata for i in m["include"]}
    for prompt, meta in zip(train.prompts, train.metadata):
        assert meta["tag"] in {"single_object", "two_object", "counting", "colors", "position", "color_attr"}, prompt
        assert meta["include"] and all(i["class"] in test_classes and i["count"] >= 1 for i in meta["include"]), prompt
        if meta["tag"] == "counting":  # GenEval's rule: exactly N, so N + 1 is excluded
            assert meta["exclude"] == [{"class": meta["include"][0]["class"], "count": meta["include"][0]["count"] + 1}]
        if meta["tag"] == "position":  # the second object is placed relative to the first
            assert meta["include"][1]["position"][1] == 0
            assert meta["include"][0]["class"] in prompt.split(meta["include"][1]["position"][0])[1]
