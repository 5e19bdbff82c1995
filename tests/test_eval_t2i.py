"""eval/t2i.py on a tiny SD3 pipeline (CPU, no download): base, LoRA and run folder, JSON contents."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import load_eval_script
from helpers_sd3 import write_tiny_sd3

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "eval" / "t2i.py"
JPEG = '{"name": "jpeg_compressibility"}'


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SD3 pipeline folder, a LoRA (non-zero B) for it and a prompt file."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("t2i")
    base = write_tiny_sd3(str(root / "base"))
    pipe = StableDiffusion3Pipeline.from_pretrained(base, text_encoder_3=None, tokenizer_3=None)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    for name, p in pipe.transformer.named_parameters():
        if "lora_B" in name:  # peft starts B at zero (an identity LoRA): make it change the images
            p.data.normal_(0, 0.5)
    lora = root / "lora"
    StableDiffusion3Pipeline.save_lora_weights(str(lora), transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    prompts = root / "prompts.jsonl"
    rows = [{"prompt": "a red cube", "tag": "colors"}, {"prompt": "two dogs", "tag": "counting"},
            {"prompt": "a cat", "tag": "single_object"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"root": root, "base": base, "lora": str(lora), "prompts": str(prompts)}


COMMON = ("--steps", "2", "--resolution", "32", "--reward", JPEG, "--seed", "3", "--device", "cpu")


def test_base_and_lora_scores(tiny):
    out_base, out_b2, out_lora = (str(tiny["root"] / n) for n in ("base.json", "base_b2.json", "lora.json"))
    r = run_script("--base", tiny["base"], "--prompts", tiny["prompts"], *COMMON, "--batch-size", "3",
                   "--per-prompt", "--json", out_base)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(Path(out_base).read_text())
    assert res["n"] == 3 and res["num_prompts"] == 3
    assert res["settings"]["guidance_scale"] == 1.0 and res["settings"]["resolution"] == 32
    s = res["rewards"]["jpeg_compressibility"]
    per = [row["scores"]["jpeg_compressibility"] for row in res["per_prompt"]]
    assert [row["prompt"] for row in res["per_prompt"]] == ["a red cube", "two dogs", "a cat"]
    assert s["n"] == 3 and s["num_nan"] == 0
    assert s["mean"] == pytest.approx(sum(per) / 3, rel=1e-6)
    assert s["std"] == pytest.approx(float(torch.tensor(per, dtype=torch.float64).std()), rel=1e-6)
    assert all(x < 0 for x in per)  # minus the JPEG size in kB
    assert "categories" not in s  # the JPEG reward reports none

    # per-image generators: the batch size does not change the images, hence not the scores
    r = run_script("--base", tiny["base"], "--prompts", tiny["prompts"], *COMMON, "--batch-size", "2",
                   "--per-prompt", "--json", out_b2)
    assert r.returncode == 0, r.stderr[-3000:]
    per_b2 = [row["scores"]["jpeg_compressibility"] for row in json.loads(Path(out_b2).read_text())["per_prompt"]]
    assert per_b2 == pytest.approx(per, rel=1e-6)

    # the LoRA changes the images; CFG on runs the two-branch path
    r = run_script("--base", tiny["base"], "--lora", tiny["lora"], "--prompts", tiny["prompts"], *COMMON,
                   "--guidance-scale", "3.0", "--per-prompt", "--json", out_lora)
    assert r.returncode == 0, r.stderr[-3000:]
    res_l = json.loads(Path(out_lora).read_text())
    assert res_l["model"]["lora"] == tiny["lora"] and res_l["settings"]["guidance_scale"] == 3.0
    per_l = [row["scores"]["jpeg_compressibility"] for row in res_l["per_prompt"]]
    assert per_l != pytest.approx(per, rel=1e-6)


def test_run_folder_matches_base_plus_lora(tiny):
    """``--run`` reads config.yaml's rl.base and loads <run>/pipeline: same scores as --base + --lora."""
    import shutil

    run = tiny["root"] / "run"
    (run).mkdir()
    shutil.copytree(tiny["lora"], run / "pipeline")
    (run / "pipeline" / "flowlab_sd3.json").write_text(json.dumps({"resolution": 32, "max_sequence_length": 77}))
    (run / "config.yaml").write_text(yaml.safe_dump({"recipe": "nft", "rl": {"pipeline": "sd3", "base": tiny["base"]}}))
    out_run, out_lora = str(tiny["root"] / "run.json"), str(tiny["root"] / "lora2.json")
    args = ("--prompts", tiny["prompts"], "--steps", "2", "--reward", JPEG, "--per-prompt", "--device", "cpu")
    r = run_script("--run", str(run), *args, "--json", out_run)  # resolution from flowlab_sd3.json
    assert r.returncode == 0, r.stderr[-3000:]
    r2 = run_script("--base", tiny["base"], "--lora", tiny["lora"], *args, "--resolution", "32", "--json", out_lora)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = json.loads(Path(out_run).read_text()), json.loads(Path(out_lora).read_text())
    assert a["settings"]["resolution"] == 32 and a["model"]["run"] == str(run)
    assert [x["scores"] for x in a["per_prompt"]] == [x["scores"] for x in b["per_prompt"]]


def test_category_tally_weights_by_count():
    """GenEval's per-batch per-category accuracies combine into count-weighted accuracies."""
    mod = load_eval_script("t2i")
    tally = mod.CategoryTally()
    tally.add({"mean": 0.5, "colors/count": 2, "colors/strict_accuracy": 0.5, "colors/accuracy": 1.0})
    tally.add({"colors/count": 1, "colors/strict_accuracy": 1.0, "colors/accuracy": 1.0,
               "counting/count": 3, "counting/strict_accuracy": 0.0})
    res = tally.result()
    assert res["colors"] == {"count": 3, "strict_accuracy": pytest.approx(2 / 3), "accuracy": pytest.approx(1.0)}
    assert res["counting"] == {"count": 3, "strict_accuracy": 0.0}
    s = mod.summarise(torch.tensor([1.0, float("nan"), 3.0]))
    assert s == {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "n": 2, "num_nan": 1}


def test_bad_inputs_name_the_culprit(tiny, tmp_path):
    r = run_script("--base", tiny["base"], "--prompts", str(tmp_path / "none.txt"), "--reward", JPEG)
    assert r.returncode != 0 and "none.txt" in r.stderr
    r = run_script("--base", tiny["base"], "--prompts", tiny["prompts"], "--reward", "{not json")
    assert r.returncode != 0 and "--reward #1" in r.stderr
    r = run_script("--run", str(tmp_path), "--prompts", tiny["prompts"], "--reward", JPEG)
    assert r.returncode != 0 and "config.yaml" in r.stderr


def test_scores_a_run_trained_by_train_py(tiny):
    """End to end: ``train.py`` NFT on the tiny pipeline (1 step), then ``eval/t2i.py --run`` on its folder."""
    out = tiny["root"] / "nft_run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    train = subprocess.run([
        sys.executable, "train.py", "recipe=nft", f"output_dir={out}", "seed=0", "rl.pipeline=sd3", f"rl.base={tiny['base']}",
        "rl.resolution=32", "rl.prompts=[a cat, a dog]", "rl.rewards=[{name: jpeg_compressibility}]", "rl.lora_rank=4",
        "rl.group_size=2", "rl.num_inference_steps=2", "rl.eval_steps=2", "rl.eval_samples=2", "train.batch_size=2",
        "train.max_steps=1", "train.lr=1e-2", "train.warmup_steps=0", "train.ema_decay=0", "train.report_to=none",
        "train.checkpoint_every=0", "sample.every=0", "sample.num_images=2",
    ], cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    assert (out / "pipeline" / "pytorch_lora_weights.safetensors").is_file()
    result = str(tiny["root"] / "nft_run.json")
    r = run_script("--run", str(out), "--prompts", tiny["prompts"], "--steps", "2", "--reward", JPEG, "--device", "cpu",
                   "--json", result)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(Path(result).read_text())
    assert res["model"]["base"] == tiny["base"] and res["model"]["lora"] == str(out / "pipeline")
    assert res["settings"]["resolution"] == 32  # the run's, from pipeline/flowlab_sd3.json
    assert res["rewards"]["jpeg_compressibility"]["n"] == 3


def test_run_with_a_fully_fine_tuned_transformer(tiny):
    """A run whose pipeline/ holds transformer/ (full fine-tuning) is scored with that transformer."""
    from diffusers import SD3Transformer2DModel

    scores = {}
    for name, scale in (("same", 1.0), ("moved", 1.5)):
        run = tiny["root"] / f"full_{name}"
        transformer = SD3Transformer2DModel.from_pretrained(tiny["base"], subfolder="transformer")
        with torch.no_grad():
            transformer.proj_out.weight.mul_(scale)
        transformer.save_pretrained(str(run / "pipeline" / "transformer"))
        (run / "config.yaml").write_text(yaml.safe_dump({"rl": {"pipeline": "sd3", "base": tiny["base"]}}))
        out = str(tiny["root"] / f"full_{name}.json")
        r = run_script("--run", str(run), "--prompts", tiny["prompts"], *COMMON, "--per-prompt", "--json", out)
        assert r.returncode == 0, r.stderr[-3000:]
        res = json.loads(Path(out).read_text())
        assert res["model"]["transformer"] == str(run / "pipeline" / "transformer") and res["model"]["lora"] is None
        scores[name] = [x["scores"]["jpeg_compressibility"] for x in res["per_prompt"]]
    base_out = str(tiny["root"] / "base_again.json")
    r = run_script("--base", tiny["base"], "--prompts", tiny["prompts"], *COMMON, "--per-prompt", "--json", base_out)
    assert r.returncode == 0, r.stderr[-3000:]
    base = [x["scores"]["jpeg_compressibility"] for x in json.loads(Path(base_out).read_text())["per_prompt"]]
    assert scores["same"] == pytest.approx(base, rel=1e-6)
    assert scores["moved"] != pytest.approx(base, rel=1e-6)


def test_geneval_per_category_accuracy_through_the_wire_format(tiny):
    """The GenEval reward against a fake reference server: per-prompt metadata reaches the server and the
    per-category accuracies in the JSON equal those recomputed from what the server saw, over several batches."""
    import io

    import numpy as np
    from PIL import Image
    from test_rewards_servers import FakeGenEvalServer  # tests/ is on sys.path

    tags = ["counting", "colors", "counting", "position", "colors"]
    rows = [{"prompt": f"a photo of dog {i}", "tag": t, "include": [{"class": "dog", "count": 1}], "exclude": [],
             "fake_score": 0.1 * (i + 1)} for i, t in enumerate(tags)]
    prompts = tiny["root"] / "geneval.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = str(tiny["root"] / "geneval.json")
    with FakeGenEvalServer() as srv:
        spec = json.dumps({"name": "geneval", "url": srv.url, "timeout": 30.0, "only_strict": False})
        r = run_script("--base", tiny["base"], "--prompts", str(prompts), "--steps", "2", "--resolution", "32",
                       "--reward", spec, "--batch-size", "2", "--per-prompt", "--device", "cpu", "--json", out)
        assert r.returncode == 0, r.stderr[-3000:]
        seen = [(m["tag"], np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), np.float64).mean() / 255 > 0.5)
                for req in srv.requests for b, m in zip(req["data"]["images"], req["data"]["meta_datas"])]
    res = json.loads(Path(out).read_text())["rewards"]["geneval"]
    assert [t for t, _ in seen] == tags  # metadata travelled in order
    expected = {t: [float(ok) for tag, ok in seen if tag == t] for t in dict.fromkeys(tags)}
    assert set(res["categories"]) == set(expected)
    for t, oks in expected.items():
        c = res["categories"][t]
        assert c["count"] == len(oks)
        assert c["strict_accuracy"] == pytest.approx(sum(oks) / len(oks)) and c["accuracy"] == pytest.approx(sum(oks) / len(oks))
    assert res["mean"] == pytest.approx(sum(r["fake_score"] for r in rows) / 5)  # score = the server's "scores"
