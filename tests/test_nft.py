"""DiffusionNFT / FlowGRPO: advantages, losses, the SDE, policies, and the recipes through train.py."""
import json
import math
import os
import sys

import pytest
import torch

from conftest import launch_two_cpu_processes
from flowlab.flow.paths import LinearPath
from flowlab.flow.sde import flow_sde_step, gaussian_log_prob, sample_flow_sde
from flowlab.flow.solvers import time_grid
from flowlab.nft.advantages import group_advantages, optimality_probability
from flowlab.nft.losses import grpo_loss, implicit_policies, nft_loss


# ----------------------------------------------------------------------------- advantages
def test_group_advantages_closed_form():
    r = torch.tensor([1.0, 3.0, 0.0, 4.0])
    g = torch.tensor([0, 0, 1, 1])
    a = group_advantages(r, g, clip=0.0, eps=0.0)
    std = r.std(unbiased=False)  # global std of the raw rewards
    expect = torch.tensor([-1.0, 1.0, -2.0, 2.0]) / std
    assert torch.allclose(a.advantages, expect, atol=1e-6)
    assert a.num_nonfinite == 0 and a.num_zero_variance_groups == 0 and a.num_groups == 2
    clipped = group_advantages(r * 100, g, clip=0.5).advantages
    assert clipped.abs().max() == pytest.approx(0.5)


def test_group_advantages_drop_nonfinite_and_count_flat_groups():
    r = torch.tensor([1.0, float("nan"), 2.0, 0.5, 0.5, float("inf")])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    a = group_advantages(r, g, clip=5.0)
    assert a.valid.tolist() == [True, False, True, True, True, False]
    assert a.num_nonfinite == 2
    assert a.num_zero_variance_groups == 1  # group 1: finite rewards all equal
    assert a.advantages[3:].abs().sum() == 0 and a.advantages[1] == 0
    assert a.advantages[0] < 0 < a.advantages[2]


def test_std_floor_keeps_saturated_rewards_from_being_amplified():
    r = torch.tensor([0.999, 0.998, 0.9995, 0.997])  # a saturated reward: std ~ 8e-4
    g = torch.zeros(4, dtype=torch.long)
    plain = group_advantages(r, g, clip=5.0).advantages
    floored = group_advantages(r, g, clip=5.0, std_floor=0.1).advantages
    assert plain.abs().max() > 1.0  # public code: 1e-3 differences become advantages of order 1
    assert torch.allclose(floored, (r - r.mean()) / (0.1 + 1e-4), atol=1e-6)
    assert floored.abs().max() < 0.02
    wide = torch.tensor([0.0, 1.0, 0.2, 0.9])  # std above the floor: unchanged
    assert torch.allclose(group_advantages(wide, g, std_floor=0.1).advantages, group_advantages(wide, g).advantages)


def test_optimality_probability_matches_public_code():
    A = torch.linspace(-7, 7, 15)
    public = (A.clamp(-5, 5) / 10 + 0.5).clamp(0, 1)
    assert torch.allclose(optimality_probability(A.clamp(-5, 5), clip=5.0), public)
    assert optimality_probability(torch.zeros(1)).item() == 0.5


# ----------------------------------------------------------------------------- losses
def test_implicit_policies_average_to_old():
    u, uo = torch.randn(4, 3), torch.randn(4, 3)
    p, n = implicit_policies(u, uo, beta=0.3)
    assert torch.allclose((p + n) / 2, uo)
    assert torch.allclose(p - n, 2 * 0.3 * (u - uo))


def test_nft_velocity_loss_gradient_at_old_policy_is_signed_regression():
    """At u_theta = u_old the gradient is 2 beta (2r - 1)(u_old - u) / D: positives pulled to the target,
    negatives pushed away -- the negative term matters."""
    torch.manual_seed(0)
    uo, target = torch.randn(3, 5), torch.randn(3, 5)
    r = torch.tensor([1.0, 0.0, 0.25])
    beta = 0.7
    u = uo.clone().requires_grad_(True)
    nft_loss(u, uo, target, r, beta).sum().backward()
    expect = 2 * beta * (2 * r[:, None] - 1) * (uo - target) / 5
    assert torch.allclose(u.grad, expect, atol=1e-6)


def test_nft_x0_loss_closed_form():
    torch.manual_seed(1)
    path = LinearPath()
    x, eps = torch.randn(4, 6), torch.randn(4, 6)
    t = torch.rand(4) * 0.9
    ps = path.sample(eps, x, t)
    u, uo = torch.randn(4, 6), torch.randn(4, 6)
    r = torch.rand(4)
    beta = 1.0
    got = nft_loss(u, uo, ps.dx_t, r, beta, "x0_normalized", path, ps.x_t, t, x, scale=5.0)
    x_pos = ps.x_t + (1 - t[:, None]) * u  # beta = 1: u+ = u_theta, u- = 2 u_old - u_theta
    x_neg = ps.x_t + (1 - t[:, None]) * (2 * uo - u)
    w_pos = (x_pos - x).abs().mean(1)
    w_neg = (x_neg - x).abs().mean(1)
    expect = 5 * (r * ((x_pos - x) ** 2).mean(1) / w_pos + (1 - r) * ((x_neg - x) ** 2).mean(1) / w_neg)
    assert torch.allclose(got, expect, atol=1e-5)
    with pytest.raises(ValueError, match="x0_normalized loss needs"):
        nft_loss(u, uo, ps.dx_t, r, beta, "x0_normalized")


def test_grpo_loss_on_policy_gradient_and_clipping():
    lp = torch.tensor([0.1, -0.2], requires_grad=True)
    A = torch.tensor([2.0, -1.0])
    loss, ratio = grpo_loss(lp, lp.detach(), A, clip_range=0.2)
    assert torch.allclose(ratio, torch.ones(2))
    loss.sum().backward()
    assert torch.allclose(lp.grad, -A)  # on-policy: the REINFORCE gradient
    # far outside the clip range with a positive advantage: the clipped branch is flat
    lp2 = torch.tensor([1.0], requires_grad=True)
    loss2, _ = grpo_loss(lp2, torch.tensor([0.0]), torch.tensor([1.0]), clip_range=0.2)
    loss2.sum().backward()
    assert loss2.item() == pytest.approx(-1.2) and lp2.grad.abs().item() == 0.0


# ----------------------------------------------------------------------------- the SDE
def test_sde_step_without_noise_is_euler_and_log_prob_is_gaussian():
    x, u = torch.randn(3, 4), torch.randn(3, 4)
    s = flow_sde_step(x, u, 0.3, 0.5, noise_level=0.0, t_cap=0.1, noise=torch.zeros_like(x))
    assert torch.allclose(s.x_next, x + 0.2 * u, atol=1e-6)
    s = flow_sde_step(x, u, 0.3, 0.5, noise_level=0.7, t_cap=0.1)
    normal = torch.distributions.Normal(s.mean, s.std.reshape(-1, 1).expand_as(x))
    assert torch.allclose(s.log_prob, normal.log_prob(s.x_next).mean(1), atol=1e-5)
    assert torch.allclose(gaussian_log_prob(s.x_next, s.mean, s.std), s.log_prob)


def test_sde_preserves_the_flow_marginals():
    """Data N(m, s^2) in 1-D: the exact velocity of the linear path is known in closed form; the SDE
    sampler driven by it must land on N(m, s^2) (the ODE's marginal), and its intermediate state at
    t has the path's marginal N(t m, t^2 s^2 + (1 - t)^2)."""
    m, s = 1.5, 0.5

    def field(x, t):
        tt = t[:, None].double()
        V = tt**2 * s**2 + (1 - tt) ** 2
        e1 = m + tt * s**2 / V * (x.double() - tt * m)
        e0 = (1 - tt) / V * (x.double() - tt * m)
        return (e1 - e0).to(x.dtype)

    g = torch.Generator().manual_seed(0)
    n = 40000
    times = time_grid(200)
    traj = sample_flow_sde(field, torch.randn(n, 1, generator=g, dtype=torch.float64), times, noise_level=0.7, generator=g)
    x = traj.x
    assert abs(x.mean().item() - m) < 0.02 and abs(x.std().item() - s) < 0.02
    k = 100
    t = float(times[k])
    mid = traj.states[k]
    assert abs(mid.mean().item() - t * m) < 0.03
    assert abs(mid.var().item() - (t**2 * s**2 + (1 - t) ** 2)) < 0.03
    assert traj.log_probs.shape == (200, n) and torch.isfinite(traj.log_probs).all()


# ----------------------------------------------------------------------------- policies
def _tiny_net(num_classes=10):
    from flowlab.models import MLPVelocity

    torch.manual_seed(0)
    return MLPVelocity(sample_shape=(1, 8, 8), hidden_dim=32, depth=2, time_embed_dim=16, num_classes=num_classes)


def test_full_finetuning_policy_roles_and_soft_update():
    from flowlab.nft.policy import FlowPolicy
    from flowlab.pipelines import FlowScheduler

    p = FlowPolicy(_tiny_net(), FlowScheduler(), reference=True)
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    c = p.encode([None, 1, 2])
    assert c.tolist() == [10, 1, 2]
    with torch.no_grad():
        for q in p.current.parameters():
            q.add_(0.1)
        old0 = [q.clone() for q in p.old.parameters()]
        p.update_old(0.25)
        for q0, q, cur in zip(old0, p.old.parameters(), p.current.parameters()):
            assert torch.allclose(q, 0.25 * q0 + 0.75 * cur)
        ref = p.velocity(x, t, c, "ref")
    assert not torch.allclose(ref, p(x, t, c))
    assert sorted(n.split(".")[0] for n, q in p.named_parameters() if q.requires_grad) == ["current"] * len(list(p.current.parameters()))


def test_lora_policy_roles_merge_and_save(tmp_path):
    from flowlab import FlowPipeline
    from flowlab.nft.policy import FlowPolicy, LoraSpec
    from flowlab.pipelines import FlowScheduler

    p = FlowPolicy(_tiny_net(), FlowScheduler(), lora=LoraSpec(4, 8, ["inp", "out", "net.0", "net.3", "mod"]))
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    c = p.encode([None, 1, 2])
    trainable = [n for n, q in p.named_parameters() if q.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    with torch.no_grad():
        base = p(x, t, c)
        for n, q in p.named_parameters():
            if "lora_B.default" in n:
                q.normal_()
        cur = p(x, t, c)
        assert not torch.allclose(cur, base)
        assert torch.allclose(p.velocity(x, t, c, "old"), base, atol=1e-6)  # old adapter still zero
        assert torch.allclose(p.velocity(x, t, c, "ref"), base, atol=1e-6)
        p.update_old(0.0)
        assert torch.allclose(p.velocity(x, t, c, "old"), cur, atol=1e-6)
    assert [n for n, q in p.named_parameters() if q.requires_grad] == trainable  # role switches restore flags
    p.save(str(tmp_path / "pipe"))
    loaded = FlowPipeline.from_pretrained(str(tmp_path / "pipe")).velocity_model
    assert torch.allclose(loaded(x, t, c), cur, atol=1e-5)
    assert (tmp_path / "pipe" / "lora" / "pytorch_lora_weights.safetensors").exists()


# ----------------------------------------------------------------------------- recipes end to end
def train(*args):
    """``train.py`` in this process (fast); fails the test on a non-zero exit code."""
    from flowlab.cli import train_main

    assert train_main(list(args)) == 0


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    train("--config", "configs/quickstart.yaml", f"output_dir={out}", "model.hidden_dim=32", "model.depth=2",
          "model.time_embed_dim=16", "train.max_steps=20", "train.report_to=none", "eval.enabled=false",
          "sample.every=0", "train.checkpoint_every=0")
    return str(out / "pipeline")


def _rl_args(recipe, out, base, *extra):
    return [f"--config", f"configs/{recipe}_digits.yaml", f"output_dir={out}", f"rl.base={base}", "train.batch_size=2",
            "rl.group_size=4", "train.max_steps=4", "train.log_every=1", "train.checkpoint_every=2", "train.report_to=none",
            "rl.num_inference_steps=4", "rl.eval_samples=8", "rl.eval_steps=2", "sample.num_images=4", "sample.every=0",
            "eval.every=0", *extra]


def _weights(pipe_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(pipe_dir, "velocity_model", "diffusion_pytorch_model.safetensors"))


def _metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.parametrize("recipe", ["nft", "flowgrpo"])
def test_recipe_trains_logs_rewards_and_resumes_exactly(recipe, tiny_base, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(*_rl_args(recipe, full, tiny_base))
    rec = [r for r in _metrics(full) if "reward_mean" in r]
    assert [r["step"] for r in rec] == [1, 2, 3, 4]
    assert all(0.0 <= r["reward_mean"] <= 1.0 for r in rec)
    final_eval = [r for r in _metrics(full) if "eval/reward" in r][-1]
    assert {"eval/fd_target", "eval/diversity", "eval/diversity_real"} <= set(final_eval)
    if recipe == "nft":
        assert [r["old_decay"] for r in rec] == pytest.approx([0.0, 0.001, 0.002, 0.003])
    # stop after step 2 (the checkpoint), resume to 4: identical weights, old policy included
    train(*_rl_args(recipe, cut, tiny_base, "train.max_steps=2"))
    train(*_rl_args(recipe, cut, tiny_base, "train.resume=latest"))
    a, b = _weights(full / "pipeline"), _weights(cut / "pipeline")
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = _weights(tiny_base)
    assert any(not torch.equal(a[k], base[k]) for k in a)  # it trained


def test_nonfinite_rewards_are_dropped_and_counted(tiny_base, tmp_path, monkeypatch):
    mod = tmp_path / "halfnan_reward.py"
    mod.write_text(
        "import torch\n"
        "def score(images, prompts, metadata):\n"
        "    s = images.flatten(1).mean(1)\n"
        "    s[::2] = float('nan')\n"
        "    return s\n"
    )
    out = tmp_path / "nan"
    monkeypatch.syspath_prepend(str(tmp_path))
    train(*_rl_args("nft", out, tiny_base, "train.max_steps=2", "rl.rewards=[{name: python, function: 'halfnan_reward:score'}]"))
    rec = [r for r in _metrics(out) if "reward_mean" in r]
    assert rec and all(r["reward_nonfinite"] == 4 for r in rec)  # half of 2 x 4 samples
    assert all(math.isfinite(r["loss"]) for r in rec)
    assert not any(r.get("nonfinite_loss") for r in _metrics(out))


def test_bad_rl_config_is_a_clear_error(tiny_base, tmp_path, capsys):
    from flowlab.cli import train_main

    assert train_main(_rl_args("nft", tmp_path / "x", tiny_base, "rl.class_labels=[12]")) == 2
    err = capsys.readouterr().err
    assert "rl.class_labels" in err and "Traceback" not in err
    assert train_main(_rl_args("nft", tmp_path / "y", str(tmp_path / "nope"), "rl.base_config=null")) == 2
    err = capsys.readouterr().err
    assert "rl.base" in err and "Traceback" not in err
    assert train_main(_rl_args("nft", tmp_path / "z", tiny_base, "nft.loss=x1")) == 2
    assert "nft.loss" in capsys.readouterr().err


def test_missing_base_is_trained_first_by_the_command_line(tmp_path, capsys):
    """rl.base names a folder that does not exist: train.py trains rl.base_config into it, then fine-tunes
    (the recipes layer does this; the engine never builds a nested Trainer)."""
    base_cfg = tmp_path / "base.yaml"
    base_cfg.write_text(
        "recipe: flow_matching\ndata: {name: digits}\nmodel: {type: mlp, hidden_dim: 16, depth: 1, time_embed_dim: 8}\n"
        "train: {max_steps: 2, report_to: none, checkpoint_every: 0, warmup_steps: 0}\nsample: {every: 0, num_images: 4}\n"
        "eval: {enabled: false}\n"
    )
    base = tmp_path / "base_run" / "pipeline"
    train(*_rl_args("nft", tmp_path / "rl", base, f"rl.base_config={base_cfg}", "train.max_steps=1", "eval.enabled=false"))
    assert (base / "velocity_model").is_dir() and (tmp_path / "rl" / "pipeline").is_dir()
    assert f"training it (recipe flow_matching)" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", ["nft", pytest.param("flowgrpo", marks=pytest.mark.slow)])
def test_two_processes_match_one(recipe, tiny_base, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ("train.max_steps=2", "train.checkpoint_every=0")
    train(*_rl_args(recipe, one, tiny_base, *args))
    log = launch_two_cpu_processes(*_rl_args(recipe, two, tiny_base, *args))
    assert "2 process(es)" in log
    a, b = _weights(one / "pipeline"), _weights(two / "pipeline")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    ra = [r["reward_mean"] for r in _metrics(one) if "reward_mean" in r]
    rb = [r["reward_mean"] for r in _metrics(two) if "reward_mean" in r]
    assert ra == pytest.approx(rb, abs=1e-6)  # rewards gathered from both processes


def test_asynchronous_chunked_rewards_match_synchronous(tiny_base, tmp_path):
    sync, asyn = tmp_path / "sync", tmp_path / "async"
    train(*_rl_args("nft", sync, tiny_base, "train.max_steps=2"))
    train(*_rl_args("nft", asyn, tiny_base, "train.max_steps=2", "rl.reward_workers=2", "rl.micro_batch=3"))
    ra = [r["reward_mean"] for r in _metrics(sync) if "reward_mean" in r]
    rb = [r["reward_mean"] for r in _metrics(asyn) if "reward_mean" in r]
    assert ra == pytest.approx(rb, abs=1e-5)
    a, b = _weights(sync / "pipeline"), _weights(asyn / "pipeline")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_bench_nft_writes_the_promised_json(tiny_base, tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "eval"))
    import bench_nft

    out = tmp_path / "bench.json"
    rc = bench_nft.main(["--base", tiny_base, "--budget", "16", "--lrs", "1e-4", "--seeds", "0", "1", "--eval-samples", "16",
                         "--workdir", str(tmp_path / "w"), "--json", str(out), "--override", "train.batch_size=2",
                         "rl.group_size=4", "rl.num_inference_steps=2", "rl.eval_steps=2"])
    assert rc == 0
    res = json.loads(out.read_text())
    for m in ("nft", "flowgrpo"):
        assert res[m]["rollouts"] == [8, 16] and len(res[m]["reward"]) == 2
        assert res[m]["seeds"] == [0, 1] and res[m]["lr"] == 1e-4
        assert all(k in res[m] for k in ("fd", "diversity", "rollouts_to_threshold", "seconds"))
    assert set(res["base"]) >= {"fd", "fd_judge", "diversity"}
    assert "rollout_ratio" in res and "time_ratio" in res
    for m in ("nft", "flowgrpo"):  # the reward-hacking bar, per method and per seed, in the judge's feature space
        bar = res[m]["hacking_bar"]
        assert bar["base_fd_judge"] == res["base"]["fd_judge"] and bar["num_seeds"] == 2
        per_seed = [r["hacking_bar"] for r in res[m]["runs"]]
        assert [b["fd_judge"] for b in per_seed] == [r["fd_judge"] for r in res[m]["runs"]]
        assert bar["passes"] == all(b["passes"] for b in per_seed)
        assert all(b["passes"] == (b["fd_judge"] <= 3.0 * b["base_fd_judge"] and b["reward"] >= 0.9) for b in per_seed)


@pytest.mark.slow
def test_two_process_run_resumes_exactly(tiny_base, tmp_path):
    """A 2-process NFT run stopped at its checkpoint and resumed with 2 processes equals an uninterrupted one
    (old policy and per-process RNG included)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    launch_two_cpu_processes(*_rl_args("nft", full, tiny_base))
    launch_two_cpu_processes(*_rl_args("nft", cut, tiny_base, "train.max_steps=2"))
    launch_two_cpu_processes(*_rl_args("nft", cut, tiny_base, "train.resume=latest"))
    a, b = _weights(full / "pipeline"), _weights(cut / "pipeline")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_card_data_for_the_hub():
    from flowlab.recipes import load_config
    from flowlab.recipes import get_recipe

    digits = get_recipe(load_config("configs/nft_digits.yaml")).card_data("me/nft-digits")
    assert 'FlowPipeline.from_pretrained("me/nft-digits")' in digits["usage"] and "class_labels" not in digits["usage"]
    assert "diffusionnft" in digits["tags"] and "base_model" not in digits  # a local base is not a Hub id
    sd3 = get_recipe(load_config("configs/flowgrpo_sd35_pickscore.yaml")).card_data("me/x")
    assert sd3["base_model"] == "stabilityai/stable-diffusion-3.5-medium" and "flowgrpo" in sd3["tags"]


def test_lora_recipe_trains_adapters_and_resumes_exactly(tiny_base, tmp_path):
    """`rl.lora_rank > 0` through train.py: the LoRA adapter (default targets: every linear layer) is saved
    beside the merged pipeline, and a resumed run (old adapter included) equals an uninterrupted one."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(*_rl_args("nft", full, tiny_base, "rl.lora_rank=4"))
    train(*_rl_args("nft", cut, tiny_base, "rl.lora_rank=4", "train.max_steps=2"))
    train(*_rl_args("nft", cut, tiny_base, "rl.lora_rank=4", "train.resume=latest"))
    a, b, base = _weights(full / "pipeline"), _weights(cut / "pipeline"), _weights(tiny_base)
    diff = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not diff, diff
    assert set(a) == set(base) and any(not torch.equal(a[k], base[k]) for k in a)  # merged, plain keys
    from safetensors.torch import load_file

    lora = load_file(str(full / "pipeline" / "lora" / "pytorch_lora_weights.safetensors"))
    assert lora and all("lora_A" in k or "lora_B" in k for k in lora)
