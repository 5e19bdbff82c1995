"""Embedded datasets: scikit-learn digits (fixed stratified split) and the 2-D toys."""
import math
import types

import numpy as np

import pytest
import torch

from flowlab.data import (
    TOY2D,
    DataError,
    DigitsDataset,
    InMemoryDataset,
    Toy2DDataset,
    build_dataset,
    from_unit_range,
    load_digits_arrays,
    sample_toy2d,
    to_unit_range,
)
from flowlab.recipes.flow_matching.config import DATA_CONFIG


@pytest.fixture(scope="module")
def digits():
    return {s: load_digits_arrays(s) for s in ("train", "test", "all")}


# --------------------------------------------------------------------------- digits


def test_digits_split_sizes_and_shapes(digits):
    sizes = {s: len(digits[s][0]) for s in digits}
    assert sizes == {"train": 1437, "test": 360, "all": 1797}
    for s, (x, y) in digits.items():
        assert x.shape == (sizes[s], 1, 8, 8) and x.dtype == np.float32
        assert y.shape == (sizes[s],) and y.dtype == np.int64


def test_digits_split_is_a_partition(digits):
    """train + test is exactly the whole dataset (as a multiset of (image, label) rows)."""

    def rows(x, y):
        return sorted(xi.tobytes() + bytes([int(yi)]) for xi, yi in zip(x, y))

    assert sorted(rows(*digits["train"]) + rows(*digits["test"])) == rows(*digits["all"])
    # and no example sits in both (a row shared by both splits must be a duplicate in the original data)
    tr = {xi.tobytes() for xi in digits["train"][0]}
    te = {xi.tobytes() for xi in digits["test"][0]}
    all_counts: dict = {}
    for xi in digits["all"][0]:
        all_counts[xi.tobytes()] = all_counts.get(xi.tobytes(), 0) + 1
    assert all(all_counts[k] > 1 for k in tr & te)


def test_digits_split_is_deterministic(digits):
    x, y = load_digits_arrays("train")
    np.testing.assert_array_equal(x, digits["train"][0])
    np.testing.assert_array_equal(y, digits["train"][1])


def test_digits_value_range(digits):
    for x, _ in digits.values():
        assert x.min() == -1.0 and x.max() == 1.0
    # pixels 0..16 map to x / 8 - 1: 17 evenly spaced levels
    levels = np.unique(digits["all"][0])
    np.testing.assert_allclose(levels, np.arange(17) / 8 - 1)


def test_digits_labels_all_present_and_stratified(digits):
    for split in ("train", "test"):
        _, y = digits[split]
        assert set(y.tolist()) == set(range(10))
    # stratified: each class has (about) the same share in both splits
    p_tr = np.bincount(digits["train"][1], minlength=10) / 1437
    p_te = np.bincount(digits["test"][1], minlength=10) / 360
    assert np.abs(p_tr - p_te).max() < 0.01


def test_digits_images_match_sklearn():
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = load_digits_arrays("all")
    np.testing.assert_array_equal(y, d.target)
    np.testing.assert_allclose((x[:, 0] + 1) * 8, d.images)


def test_digits_dataset(digits):
    ds = DigitsDataset("test")
    assert isinstance(ds, InMemoryDataset)
    assert len(ds) == 360 and ds.num_classes == 10 and ds.kind == "image" and ds.sample_shape == (1, 8, 8)
    item = ds[5]
    assert set(item) == {"x", "label"} and isinstance(item["label"], int)
    assert torch.equal(item["x"], torch.from_numpy(digits["test"][0][5]))
    assert item["label"] == int(digits["test"][1][5])
    batch = ds.get_batch(torch.tensor([0, 5, 7]))
    assert batch["x"].shape == (3, 1, 8, 8) and batch["label"].tolist() == digits["test"][1][[0, 5, 7]].tolist()


def test_digits_bad_split():
    with pytest.raises(DataError, match="data.split"):
        load_digits_arrays("validation")


def test_unit_range_round_trip():
    x = torch.linspace(-1, 1, 17)
    assert torch.allclose(from_unit_range(to_unit_range(x)), x)
    assert to_unit_range(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]


# --------------------------------------------------------------------------- 2-D toys


def test_toy_names():
    assert set(TOY2D) == {"moons", "8gaussians", "checkerboard"}


@pytest.mark.parametrize("name", TOY2D)
def test_toy_shape_determinism_and_scale(name):
    a = sample_toy2d(name, 5000, seed=0)
    assert a.shape == (5000, 2) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, sample_toy2d(name, 5000, seed=0))
    assert not torch.allclose(a, sample_toy2d(name, 5000, seed=1))
    # roughly unit scale, centred
    assert a.mean(0).abs().max() < 0.1
    assert ((a.std(0) > 0.8) & (a.std(0) < 1.2)).all()
    assert a.abs().max() < 3.0


def test_eight_gaussians_structure():
    x = sample_toy2d("8gaussians", 4000, seed=0).double()
    centers = torch.tensor([(math.cos(a), math.sin(a)) for a in np.arange(8) * math.pi / 4], dtype=torch.float64) * 2.0 / 1.42
    d = torch.cdist(x, centers)
    nearest = d.argmin(1)
    assert d.min(1).values.max() < 0.6  # every point sits next to a centre (sd 0.1 / 1.42)
    counts = torch.bincount(nearest, minlength=8)
    assert (counts > 400).all()  # all eight modes populated, about equally


def test_checkerboard_structure():
    x = sample_toy2d("checkerboard", 4000, seed=0) * 1.15
    assert (x.abs() <= 2.0 + 1e-5).all()
    cells = torch.floor(x).long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()  # only the "black" squares
    assert len({tuple(c) for c in cells.tolist()}) == 8


def test_moons_structure():
    x = sample_toy2d("moons", 4000, seed=0)
    raw = x * torch.tensor([0.87, 0.5]) + torch.tensor([0.5, 0.25])
    # sklearn's moons: upper moon centred (0, 0), lower (1, 0.5), both of radius 1 (noise 0.05)
    r_up = (raw - torch.tensor([0.0, 0.0])).norm(dim=1)
    r_lo = (raw - torch.tensor([1.0, 0.5])).norm(dim=1)
    assert (torch.minimum((r_up - 1).abs(), (r_lo - 1).abs()) < 0.25).all()


def test_unknown_toy_raises():
    with pytest.raises(DataError, match="spirals"):
        sample_toy2d("spirals", 10)
    with pytest.raises(DataError):
        Toy2DDataset("rings")


def test_toy_dataset():
    ds = Toy2DDataset("moons", num_samples=300, seed=3)
    assert len(ds) == 300 and ds.num_classes == 0 and ds.kind == "vector" and ds.sample_shape == (2,)
    assert torch.equal(ds.x, sample_toy2d("moons", 300, seed=3))
    assert ds[0]["label"] == -1
    assert ds.get_batch(torch.tensor([1, 2]))["label"].tolist() == [-1, -1]


# --------------------------------------------------------------------------- build_dataset


@pytest.mark.parametrize("name", ["digits", *TOY2D])
def test_build_dataset(name):
    ds = build_dataset(DATA_CONFIG(name=name) if name == "digits" else DATA_CONFIG(name=name, num_samples=123), seed=5)
    if name == "digits":
        assert isinstance(ds, DigitsDataset) and len(ds) == 1437 and ds.num_classes == 10
    else:
        assert isinstance(ds, Toy2DDataset) and len(ds) == 123 and ds.sample_shape == (2,)
        assert torch.equal(ds.x, sample_toy2d(name, 123, seed=5))  # the run seed seeds the toy


def test_build_dataset_digits_split():
    assert len(build_dataset(DATA_CONFIG(name="digits", split="test"))) == 360


def test_build_dataset_unknown_name():
    with pytest.raises(DataError, match="data.name"):
        build_dataset(types.SimpleNamespace(name="cifar"))  # the config refuses it first; the builder too


def test_in_memory_dataset_checks():
    with pytest.raises(DataError, match="empty"):
        InMemoryDataset(torch.zeros(0, 2))
    with pytest.raises(DataError, match="3 samples but 2 labels"):
        InMemoryDataset(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), 2)
