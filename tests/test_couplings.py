"""Minibatch OT coupling: a permutation of the noise that minimises the total squared cost."""
import itertools

import pytest
import torch

from flowlab.flow import IndependentCoupling, MinibatchOTCoupling, build_coupling


def _cost(x0, x1):
    return (x0 - x1).pow(2).flatten(1).sum(1).sum().item()


def _batch(n, shape=(2,), seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    x1 = torch.randn(n, *shape, generator=g, dtype=torch.float64) * 0.5 + 1.0
    return x0, x1


@pytest.mark.parametrize("shape", [(2,), (2, 3, 3)])
def test_ot_output_is_permutation_of_noise(shape):
    """The coupled x0 has the same rows as x0 (same multiset) and x1 is returned unchanged, in order."""
    x0, x1 = _batch(16, shape)
    ot = MinibatchOTCoupling()
    x0_c, x1_c = ot(x0, x1)
    perm = ot.permutation(x0, x1)
    assert sorted(perm.tolist()) == list(range(16))
    assert torch.equal(x0_c, x0[perm])
    assert torch.equal(x1_c, x1)
    # same multiset of rows, checked without the permutation
    rows = lambda x: sorted(map(tuple, x.flatten(1).tolist()))  # noqa: E731
    assert rows(x0_c) == rows(x0)


@pytest.mark.parametrize("seed", range(5))
def test_ot_cost_not_worse_than_independent(seed):
    """The OT pairing's total squared cost is <= that of the pairing as drawn."""
    x0, x1 = _batch(32, (3,), seed)
    x0_c, _ = MinibatchOTCoupling()(x0, x1)
    assert _cost(x0_c, x1) <= _cost(x0, x1) + 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_ot_matches_brute_force_optimum(seed):
    """For a batch of 6, the OT cost equals the minimum over all 720 permutations."""
    x0, x1 = _batch(6, (2, 2), seed)
    x0_c, _ = MinibatchOTCoupling()(x0, x1)
    best = min(_cost(x0[list(p)], x1) for p in itertools.permutations(range(6)))
    assert _cost(x0_c, x1) == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_ot_recovers_known_matching():
    """When x1 is a shuffled copy of x0 plus a tiny offset, OT undoes the shuffle."""
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(10, 4, generator=g, dtype=torch.float64) * 3
    shuffle = torch.randperm(10, generator=g)
    x1 = x0[shuffle] + 1e-3
    x0_c, _ = MinibatchOTCoupling()(x0, x1)
    assert torch.equal(x0_c, x0[shuffle])


def test_independent_and_builder():
    """Independent coupling is the identity; build_coupling maps names; bad input raises."""
    x0, x1 = _batch(4)
    a, b = IndependentCoupling()(x0, x1)
    assert a is x0 and b is x1
    assert isinstance(build_coupling("independent"), IndependentCoupling)
    assert isinstance(build_coupling("ot"), MinibatchOTCoupling)
    assert isinstance(build_coupling("minibatch_ot"), MinibatchOTCoupling)
    with pytest.raises(ValueError):
        build_coupling("sinkhorn")
    with pytest.raises(ValueError):
        MinibatchOTCoupling()(x0, x1[:3])


@pytest.mark.parametrize("seed", range(3))
def test_grouped_ot_pairs_only_within_a_group_and_is_optimal_there(seed):
    """With groups (class labels after dropout), noise moves only among rows of the same group, and each
    group's pairing is that group's own exact OT optimum (brute force over its permutations)."""
    x0, x1 = _batch(12, (2,), seed)
    groups = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 3, 1])  # group 3 has one row: it keeps its noise
    x0_c, x1_c = MinibatchOTCoupling()(x0, x1, groups)
    assert torch.equal(x1_c, x1)
    for g in groups.unique():
        rows = (groups == g).nonzero().flatten()
        # the group's coupled noise is a permutation of its own noise
        assert sorted(map(tuple, x0_c[rows].tolist())) == sorted(map(tuple, x0[rows].tolist()))
        best = min(_cost(x0[rows][list(p)], x1[rows]) for p in itertools.permutations(range(len(rows))))
        assert _cost(x0_c[rows], x1[rows]) == pytest.approx(best, rel=1e-12, abs=1e-12)
    assert torch.equal(x0_c[10], x0[10])


def test_grouped_ot_keeps_each_class_noise_standard_normal():
    """Why groups matter: with two far-apart classes, class-blind OT gives each class the noise on its
    side (per-class noise mean far from 0), while grouped OT leaves each class's noise as drawn in law."""
    g = torch.Generator().manual_seed(0)
    n = 512
    labels = torch.arange(n) % 2
    x1 = torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.1 + torch.where(labels[:, None] == 0, -3.0, 3.0)
    x0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    blind, _ = MinibatchOTCoupling()(x0, x1)
    grouped, _ = MinibatchOTCoupling()(x0, x1, labels)
    # class 1 sits at +3: blind OT hands it the positive half of the noise (mean ~ +0.8 in each coordinate)
    assert blind[labels == 1].mean(0).min() > 0.5
    assert grouped[labels == 1].mean(0).abs().max() < 0.15  # 256 standard-normal rows: sd of the mean 0.0625
    with pytest.raises(ValueError, match="groups must have shape"):
        MinibatchOTCoupling()(x0, x1, labels[:10])


def test_the_loss_passes_groups_to_the_coupling():
    """FlowMatchingLoss and MeanFlowLoss hand their ``groups`` to the coupling."""
    from flowlab.flow import Coupling, FlowMatchingLoss, LinearPath, MeanFlowLoss, UniformTimeSampler

    seen = []

    class Recording(Coupling):
        def __call__(self, x_0, x_1, groups=None):
            seen.append(groups)
            return x_0, x_1

    x1, labels = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    FlowMatchingLoss(path=LinearPath(), time_sampler=UniformTimeSampler(), coupling=Recording())(lambda x, t: x, x1, groups=labels)
    MeanFlowLoss(path=LinearPath(), time_sampler=UniformTimeSampler(), coupling=Recording())(lambda x, t, r: x, x1, groups=labels)
    assert len(seen) == 2 and all(s is labels for s in seen)


def test_a_coupling_written_before_groups_still_works_without_labels():
    """A user coupling with the old two-argument ``__call__`` still serves an unconditional loss."""
    from flowlab.flow import FlowMatchingLoss, LinearPath, UniformTimeSampler

    class Reversed(IndependentCoupling):
        def __call__(self, x_0, x_1):  # the signature before groups existed
            return x_0.flip(0), x_1

    x1 = torch.randn(4, 2)
    out = FlowMatchingLoss(path=LinearPath(), time_sampler=UniformTimeSampler(), coupling=Reversed())(lambda x, t: x, x1)
    assert torch.isfinite(out.loss)
