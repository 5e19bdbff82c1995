"""Reflow (``recipe: reflow``): the teacher pairs are the teacher pipeline's own ODE solutions and a function of the
seed, they are drawn once and reused by a resumed run (which then matches an uninterrupted one exactly), the loss on
a pair is flow matching's closed form on the straight path between its ends, the student starts from the teacher and
saves as an ordinary FlowPipeline that samples with Euler at 1 and 2 steps, and wrong settings fail naming their key."""
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from flowlab.errors import ConfigError
from flowlab.pipelines import FlowPipeline
from flowlab.recipes import Trainer, load_config
from flowlab.recipes.reflow import pairs as pairs_module
from flowlab.recipes.reflow.pairs import PAIRS_FILE, generate_pairs, load_teacher
from flowlab.recipes.reflow.recipe import ReflowRecipe
from flowlab.train.recipe import StepContext, get_recipe

TINY_MLP = ("model.type=mlp", "model.hidden_dim=32", "model.depth=2", "model.time_embed_dim=16")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A tiny class-conditional digits teacher, trained for 20 steps; its pipeline folder."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    Trainer(load_config(None, tiny_overrides(out, "model.class_conditional=true", "train.max_steps=20", "train.checkpoint_every=0"))).train()
    return str(out / "pipeline")


def _reflow_config(out, teacher, *extra):
    return load_config(None, tiny_overrides(
        out, "recipe=reflow", f"reflow.teacher={teacher}", "reflow.num_pairs=96", "reflow.teacher_steps=4",
        "reflow.generation_batch_size=40", "train.max_steps=20", "train.checkpoint_every=10", *TINY_MLP, *extra,
    ))


def _weights(pipeline_dir):
    return load_file(os.path.join(pipeline_dir, "velocity_model", "diffusion_pytorch_model.safetensors"))


# --------------------------------------------------------------------------- pairs


def test_pairs_are_the_teachers_ode_solutions_and_a_function_of_the_seed(teacher):
    pipe = load_teacher(teacher)
    a = generate_pairs(pipe, 50, seed=3, solver="heun", steps=4, batch_size=16, progress=False)
    # noise first, then labels, from the seed's generator
    g = torch.Generator().manual_seed(3)
    assert torch.equal(a.x0, torch.randn(50, 1, 8, 8, generator=g))
    assert torch.equal(a.labels, torch.randint(10, (50,), generator=g))
    assert a.num_classes == 10 and a.kind == "image" and a.sample_shape == (1, 8, 8)
    # x1: what the teacher pipeline itself draws from that noise and those labels (a fresh load of the folder)
    direct = FlowPipeline.from_pretrained(teacher)(
        latents=a.x0, class_labels=a.labels, solver="heun", num_inference_steps=4, output_type="latent"
    ).images
    assert torch.allclose(a.x, direct, atol=1e-6)
    assert (a.x - a.x0).abs().mean() > 0.1  # the ODE moved the noise
    # the same seed gives the same pairs, whatever the generation batch; another seed other pairs
    b = generate_pairs(pipe, 50, seed=3, solver="heun", steps=4, batch_size=50, progress=False)
    assert torch.equal(a.x0, b.x0) and torch.equal(a.labels, b.labels) and torch.allclose(a.x, b.x, atol=1e-6)
    c = generate_pairs(pipe, 50, seed=4, solver="heun", steps=4, batch_size=16, progress=False)
    assert not torch.equal(a.x0, c.x0)
    # another solver / guidance gives other samples from the same noise
    d = generate_pairs(pipe, 50, seed=3, solver="euler", steps=4, guidance_scale=2.0, batch_size=16, progress=False)
    assert torch.equal(a.x0, d.x0) and (a.x - d.x).abs().max() > 1e-3
    batch = a.get_batch(torch.tensor([4, 1]))
    assert torch.equal(batch["x0"], a.x0[[4, 1]]) and torch.equal(batch["x"], a.x[[4, 1]]) and torch.equal(batch["label"], a.labels[[4, 1]])


def test_cache_is_reused_and_redrawn_only_when_its_settings_change(teacher, tmp_path, monkeypatch):
    cfg = _reflow_config(tmp_path / "run", teacher)
    first = get_recipe(cfg).build_dataset()
    path = tmp_path / "run" / PAIRS_FILE
    assert path.is_file() and not [n for n in os.listdir(tmp_path / "run") if n.endswith(".tmp")]
    stamp = path.stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("the pairs were drawn again")

    monkeypatch.setattr("flowlab.recipes.reflow.recipe.generate_pairs", refuse)
    again = get_recipe(cfg).build_dataset()
    assert path.stat().st_mtime_ns == stamp
    for k in ("x0", "x", "labels"):
        assert torch.equal(getattr(first, k), getattr(again, k)), k
    # other settings: a resumed run refuses to change its data midway, a fresh one draws new pairs
    with pytest.raises(ConfigError, match=r"reflow: .*\(num_pairs\)"):
        get_recipe(_reflow_config(tmp_path / "run", teacher, "reflow.num_pairs=32", "train.resume=latest")).build_dataset()
    monkeypatch.setattr("flowlab.recipes.reflow.recipe.generate_pairs", pairs_module.generate_pairs)
    assert len(get_recipe(_reflow_config(tmp_path / "run", teacher, "reflow.num_pairs=32")).build_dataset()) == 32


# --------------------------------------------------------------------------- the loss


def test_step_loss_is_flow_matchings_closed_form_on_the_pairs_straight_path(teacher, tmp_path):
    recipe = get_recipe(_reflow_config(tmp_path / "run", teacher, "model.label_dropout=0.0"))
    data = recipe.build_dataset()
    recipe.build_model(data)
    batch = data.get_batch(torch.arange(16))
    seen = {}

    def model(x_t, t, labels):
        seen.update(x_t=x_t, t=t, labels=labels)
        return 2.0 * x_t

    ctx = StepContext(0, 0, torch.Generator().manual_seed(0), 16, 0, 16, torch.device("cpu"))
    loss = recipe.training_step(model, batch, ctx).loss
    t = seen["t"].reshape(-1, 1, 1, 1)
    x0, x1 = batch["x0"], batch["x"]
    assert torch.allclose(seen["x_t"], (1 - t) * x0 + t * x1, atol=1e-6)  # the pair's own noise, not fresh noise
    assert torch.equal(seen["labels"], batch["label"])
    assert torch.allclose(loss, (2.0 * seen["x_t"] - (x1 - x0)).pow(2).mean(), atol=1e-6)
    # one straight pair repeated: its constant velocity x1 - x0 is a zero-loss field
    one = {k: v[:1].expand(16, *v.shape[1:]) for k, v in batch.items()}
    exact = recipe.training_step(lambda x, tt, y: (one["x"] - one["x0"]), one, ctx).loss
    assert exact.item() == 0.0


# --------------------------------------------------------------------------- the run


class _CrashAt15(ReflowRecipe):
    def training_step(self, model, batch, ctx):
        if ctx.step == 15:
            raise RuntimeError("simulated crash")
        return super().training_step(model, batch, ctx)


def test_student_starts_as_the_teacher_trains_resumes_exactly_and_samples_in_one_and_two_euler_steps(teacher, tmp_path, monkeypatch):
    ref = _reflow_config(tmp_path / "ref", teacher)
    recipe = get_recipe(ref)
    student = recipe.build_model(recipe.build_dataset())
    t_weights = FlowPipeline.from_pretrained(teacher).velocity_model.state_dict()
    assert all(torch.equal(v, t_weights[k]) for k, v in student.state_dict().items())
    Trainer(ref).train()

    crashed = _reflow_config(tmp_path / "crashed", teacher)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(crashed, recipe=_CrashAt15(crashed)).train()
    monkeypatch.setattr("flowlab.recipes.reflow.recipe.generate_pairs", lambda *a, **k: pytest.fail("a resumed run drew its pairs again"))
    Trainer(_reflow_config(tmp_path / "crashed", teacher, "train.resume=latest")).train()
    a, b = _weights(tmp_path / "ref" / "pipeline"), _weights(tmp_path / "crashed" / "pipeline")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], t_weights[k]) for k in a)  # the student moved away from the teacher

    pipe = FlowPipeline.from_pretrained(str(tmp_path / "ref" / "pipeline"))
    assert (pipe.scheduler.config.solver, pipe.scheduler.config.num_inference_steps) == ("euler", 2)  # the sample section's
    g = torch.Generator().manual_seed(0)
    for steps in (1, 2):
        out = pipe(class_labels=list(range(10)), num_inference_steps=steps, generator=g, output_type="pt")
        assert out.nfe == steps and out.images.shape == (10, 1, 8, 8) and torch.isfinite(out.images).all()
    assert pipe(batch_size=4, generator=g, output_type="pt").nfe == 2  # the saved default


def test_student_from_scratch_and_unconditional(teacher, tmp_path):
    recipe = get_recipe(_reflow_config(tmp_path / "run", teacher, "reflow.init_from_teacher=false", "model.class_conditional=false"))
    model = recipe.build_model(recipe.build_dataset())
    assert recipe.num_classes == 0 and model.num_classes == 0
    t_weights = FlowPipeline.from_pretrained(teacher).velocity_model.state_dict()
    assert any(k not in t_weights or not torch.equal(v, t_weights[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- config errors


def test_config_errors_name_the_key(teacher, tmp_path):
    with pytest.raises(ConfigError, match=r"reflow\.teacher: required"):
        get_recipe(load_config(None, tiny_overrides(tmp_path / "a", "recipe=reflow")))
    with pytest.raises(ConfigError, match=r"reflow\.teacher: cannot load a FlowPipeline from .*nowhere.*train it first"):
        Trainer(_reflow_config(tmp_path / "b", str(tmp_path / "nowhere")))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model_index.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"reflow\.teacher: cannot load a FlowPipeline from .*junk.*lacks the key '_class_name'"):
        Trainer(_reflow_config(tmp_path / "c", str(tmp_path / "junk")))
    from flowlab.models import MLPVelocity
    from flowlab.pipelines import FlowScheduler

    mf = tmp_path / "meanflow"
    FlowPipeline(MLPVelocity(sample_shape=(1, 8, 8), hidden_dim=8, depth=1, time_embed_dim=4, mean_flow=True), FlowScheduler(mean_flow=True)).save_pretrained(mf)
    with pytest.raises(ConfigError, match=r"reflow\.teacher: .* holds a MeanFlow model"):
        Trainer(_reflow_config(tmp_path / "mf", str(mf)))
    with pytest.raises(ConfigError, match=r"reflow\.teacher: cannot load a FlowPipeline"):  # a run folder, not its pipeline
        Trainer(_reflow_config(tmp_path / "d", os.path.dirname(teacher)))
    with pytest.raises(ConfigError, match=r"flow\.coupling"):
        get_recipe(_reflow_config(tmp_path / "e", teacher, "flow.coupling=ot"))
    with pytest.raises(ConfigError, match=r"flow\.path"):
        get_recipe(_reflow_config(tmp_path / "f", teacher, "flow.path=cosine"))
    with pytest.raises(ConfigError, match=r"reflow\.teacher_solver"):
        _reflow_config(tmp_path / "g", teacher, "reflow.teacher_solver=meanflow")
    with pytest.raises(ConfigError, match=r"reflow\.num_pairs"):
        _reflow_config(tmp_path / "h", teacher, "reflow.num_pairs=0")
    recipe = get_recipe(_reflow_config(tmp_path / "i", teacher, "flow.prediction_type=x1"))
    with pytest.raises(ConfigError, match=r"flow\.prediction_type: .*teacher's weights, which predict 'velocity'"):
        recipe.build_model(recipe.build_dataset())


# --------------------------------------------------------------------------- the benchmark's opt-in reflow route


def test_bench_meanflow_reflow_route(tmp_path):
    """``eval/bench_meanflow.py --reflow-steps``: the student of each seed's standard model is scored at Euler-1/2/32 in
    the same JSON, with its extra cost (pairs + training CPU-s). FDs of the tiny models are not asserted."""
    import json
    import math
    from pathlib import Path

    from conftest import load_eval_script

    bench = load_eval_script("bench_meanflow")
    out = tmp_path / "mf.json"
    bench.main(["--quick", "--seeds", "0", "--num-samples", "100", "--probe-steps", "2", "--probe-repeats", "1", "--reflow-steps", "4",
                "--workdir", str(tmp_path / "runs"), "--json", str(out)])
    saved = json.loads(out.read_text())
    (run,) = saved["runs"]
    rf = run["reflow"]
    assert saved["reflow_steps"] == 4 and rf["steps"] == 4 and rf["pairs"]["num_pairs"] == 256
    assert {k: rf["fd"][k]["nfe"] for k in ("euler-1", "euler-2", "euler-32")} == {"euler-1": 1, "euler-2": 2, "euler-32": 32}
    assert run["reflow_euler2_fd"] == rf["fd"]["euler-2"]["fd"] and all(math.isfinite(c["fd"]) for c in rf["fd"].values())
    assert rf["pairs"]["cpu_seconds"] > 0 and rf["cpu_seconds"] > 0
    assert run["reflow_extra_cpu_seconds"] == pytest.approx(rf["pairs"]["cpu_seconds"] + rf["cpu_seconds"])
    # the student is the standard model of the same seed, distilled
    import yaml

    cfg = yaml.safe_load((Path(rf["pipeline"]).parent / "config.yaml").read_text())
    assert cfg["recipe"] == "reflow" and cfg["reflow"]["teacher"] == run["standard"]["pipeline"] and cfg["seed"] == 0
    assert {"reflow_euler1_fd", "reflow_euler2_fd", "reflow_euler32_fd", "reflow_extra_cpu_seconds"} <= set(saved["summary"])


def test_two_processes_draw_the_pairs_once_and_train_as_one(teacher, tmp_path):
    """Under two gloo processes the main process draws and writes the pairs, the other reads them; the run matches a
    one-process run (same pairs, same weights)."""
    import sys

    from conftest import launch_two_cpu_processes, run_checked

    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["recipe=reflow", f"reflow.teacher={teacher}", "reflow.num_pairs=64", "reflow.teacher_steps=4", "train.max_steps=6",
             "train.checkpoint_every=6", *TINY_MLP]
    run_checked([sys.executable, "train.py", *tiny_overrides(one, *extra)])
    log = launch_two_cpu_processes(*tiny_overrides(two, *extra))
    assert "2 process(es) [MULTI_CPU]" in log, log[-2000:]
    p1, p2 = load_file(one / PAIRS_FILE), load_file(two / PAIRS_FILE)
    assert p1.keys() == p2.keys() == {"x0", "x1", "labels"} and all(torch.equal(p1[k], p2[k]) for k in p1)
    w1, w2 = _weights(one / "pipeline"), _weights(two / "pipeline")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-4)


def test_card_names_a_hub_teacher_as_base_model(tmp_path):
    recipe = get_recipe(load_config(None, tiny_overrides(tmp_path / "run", "recipe=reflow", "reflow.teacher=someone/digits-flow", *TINY_MLP)))
    recipe.num_classes, recipe.kind = 10, "image"  # what build_model sets
    assert recipe.card_data("me/reflowed")["base_model"] == "someone/digits-flow"
