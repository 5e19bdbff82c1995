"""The independent judge of the digits reward-hacking check (flowlab.metrics.classifier.JUDGE_RECIPE)
and the quality figures built on it (flowlab.nft.quality). The judge and the reward classifier are
trained once per session into a temporary cache."""
from __future__ import annotations

import pytest
import torch

from flowlab.data.digits import load_digits_arrays, to_unit_range
from flowlab.metrics import classifier as C
from flowlab.metrics import digits as D
from flowlab.metrics.frechet import fd_from_features
from flowlab.nft.quality import digits_quality, hacking_bar, judge_evaluator, real_digits_of_class


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("judge_cache")


@pytest.fixture(scope="session")
def judge(cache_dir):
    return judge_evaluator(cache_dir)


@pytest.fixture(scope="session")
def reward_ev(cache_dir):
    return D.DigitsEvaluator.load(cache_dir)


def _class_split(split: str, c: int) -> torch.Tensor:
    x, y = load_digits_arrays(split)
    return to_unit_range(torch.from_numpy(x[y == c]))


def test_judge_is_trained_accurate_and_cached(judge, cache_dir):
    assert judge.info["from_cache"] is False
    acc = C.classifier_accuracy(judge.model, "test")
    assert acc >= 0.95, acc
    assert judge.info["test_accuracy"] == pytest.approx(acc)
    path = C.classifier_path(cache_dir, C.JUDGE_RECIPE)
    assert judge.info["path"] == str(path) and path.is_file()
    assert C.JUDGE_VERSION in path.name and C.JUDGE_RECIPE["version"] in path.name
    # a second load comes from the cache, with identical weights and features
    again, info = C.load_judge(cache_dir)
    assert info["from_cache"] is True and info["test_accuracy"] == pytest.approx(acc)
    for a, b in zip(judge.model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    # judge_evaluator hands back the same object within a process (loaded once)
    assert judge_evaluator(cache_dir) is judge


def test_judge_training_is_deterministic():
    torch.manual_seed(5)
    r = dict(C.JUDGE_RECIPE, epochs=2)
    m1, _ = C.train_classifier(r)
    torch.manual_seed(77)  # the global seed must not matter
    m2, _ = C.train_classifier(r)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


def test_judge_differs_from_the_reward_classifier(judge, reward_ev, cache_dir):
    assert isinstance(judge.model, C.DigitsMLPClassifier) and isinstance(reward_ev.model, C.DigitsClassifier)
    assert C.JUDGE_RECIPE["seed"] != C.CLASSIFIER_RECIPE["seed"]
    assert C.JUDGE_VERSION != C.CLASSIFIER_VERSION
    assert C.classifier_path(cache_dir, C.JUDGE_RECIPE) != C.classifier_path(cache_dir)
    x = _class_split("test", 3)
    fj, fr = judge.features(x, value_range="unit"), reward_ev.features(x, value_range="unit")
    assert fj.shape == (x.shape[0], 64) and fr.shape == (x.shape[0], 128)
    # the judge's features are not a linear function of the reward CNN's: a least-squares map from the
    # CNN features (test digits of every class) leaves a large part of the judge's variance unexplained
    xa, _ = load_digits_arrays("test")
    fj, fr = judge.features(xa), reward_ev.features(xa)
    a = torch.cat([fr, torch.ones(len(fr), 1)], 1).double()
    coef = torch.linalg.lstsq(a, fj.double()).solution
    resid = fj.double() - a @ coef
    unexplained = float(resid.var(0).sum() / fj.double().var(0).sum())
    assert unexplained > 0.01, unexplained


def test_judge_fd_separates_classes(judge):
    f = {(s, c): judge.features(_class_split(s, c), value_range="unit") for s in ("train", "test") for c in (3, 8)}
    same = fd_from_features(f["test", 3], f["train", 3])
    other = fd_from_features(f["test", 3], f["train", 8])
    assert other > 10 * same, (same, other)


def test_digits_quality_reports_judge_fd(judge, reward_ev):
    real3 = real_digits_of_class(3)
    q = digits_quality(real3, 3, reward_ev, judge)
    assert set(q) == {"fd_target", "fd_judge", "diversity", "diversity_real"}
    assert q["fd_judge"] == pytest.approx(0.0, abs=1e-6) and q["fd_target"] == pytest.approx(0.0, abs=1e-6)
    q8 = digits_quality(real_digits_of_class(8), 3, reward_ev, judge)
    assert q8["fd_judge"] > 50 and q8["fd_target"] > 50
    # judge FD of the real 3s alone, computed by hand
    assert q8["fd_judge"] == pytest.approx(
        fd_from_features(judge.features(real_digits_of_class(8), "unit"), judge.features(real3, "unit"))
    )


def test_hacking_bar():
    ok = hacking_bar(29.9, 10.0, 0.95)
    assert ok["passes"] and ok["fd_ratio"] == pytest.approx(2.99)
    far = hacking_bar(30.1, 10.0, 0.99)
    assert not far["passes"] and not far["fd_ok"] and far["reward_ok"]
    low = hacking_bar(5.0, 10.0, 0.89)
    assert not low["passes"] and low["fd_ok"] and not low["reward_ok"]
    assert hacking_bar(40.0, 10.0, 0.9, fd_multiple=4.0)["passes"]
    with pytest.raises(ValueError, match="base_fd_judge"):
        hacking_bar(1.0, 0.0, 1.0)
