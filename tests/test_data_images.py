"""ImageDataset over tiny local image folders and saved datasets (offline, fast)."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch

pytest.importorskip("datasets")
PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from flowlab.data.base import DataError  # noqa: E402
from flowlab.data.images import ImageDataset  # noqa: E402

# (class folder, file name, size (w, h), RGB colour)
FILES = [
    ("cat", "c0.png", (40, 30), (255, 0, 0)),
    ("cat", "c1.png", (20, 50), (0, 255, 0)),
    ("cat", "c2.jpg", (33, 33), (0, 0, 255)),
    ("dog", "d0.png", (64, 48), (255, 255, 255)),
    ("dog", "d1.png", (17, 70), (0, 0, 0)),
    ("dog", "d2.png", (50, 16), (128, 128, 128)),
]


def _make_folder(root, files=FILES):
    for cls, name, size, colour in files:
        os.makedirs(root / cls, exist_ok=True)
        Image.new("RGB", size, colour).save(root / cls / name)
    return root


def _cache(tmp_path):
    return str(tmp_path / "hf_cache")


@pytest.fixture
def folder(tmp_path):
    return _make_folder(tmp_path / "imgs")


def _by_file(ds):
    """Map file name -> row index via the raw (undecoded) image column."""
    return {os.path.basename(ds._ds[i][ds.image_column]["path"]): i for i in range(len(ds))}


def test_imagefolder_shapes_range_and_colours(folder, tmp_path):
    ds = ImageDataset(str(folder), resolution=16, cache_dir=_cache(tmp_path))
    assert ds.source == "imagefolder" and ds.kind == "image"
    assert len(ds) == 6 and ds.sample_shape == (3, 16, 16)
    assert ds.num_classes == 0  # imagefolder's automatic label column is ignored unless asked for
    for i in range(len(ds)):
        item = ds[i]
        assert item["x"].shape == (3, 16, 16) and item["x"].dtype == torch.float32
        assert item["x"].min() >= -1 and item["x"].max() <= 1
        assert item["label"] == -1
    rows = _by_file(ds)
    red = ds[rows["c0.png"]]["x"]
    assert torch.allclose(red[0], torch.ones(16, 16)) and torch.allclose(red[1:], -torch.ones(2, 16, 16))
    assert torch.allclose(ds[rows["d0.png"]]["x"], torch.ones(3, 16, 16))
    assert torch.allclose(ds[rows["d1.png"]]["x"], -torch.ones(3, 16, 16))
    assert torch.allclose(ds[rows["d2.png"]]["x"], torch.full((3, 16, 16), 128 / 127.5 - 1), atol=1e-6)
    assert ds[-1]["x"].shape == (3, 16, 16)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_labels_from_class_folders(folder, tmp_path):
    ds = ImageDataset(str(folder), label_column="label", resolution=8, source="imagefolder", cache_dir=_cache(tmp_path))
    assert ds.num_classes == 2
    rows = _by_file(ds)
    assert ds[rows["c1.png"]]["label"] == 0 and ds[rows["d2.png"]]["label"] == 1
    assert sorted(ds[i]["label"] for i in range(len(ds))) == [0, 0, 0, 1, 1, 1]


def test_grey_resize_and_crop(tmp_path):
    root = tmp_path / "g"
    root.mkdir()
    # left half black, right half white, 60x20: short side 20 -> 8 gives 24x8, centre crop keeps the middle
    arr = np.zeros((20, 60), dtype=np.uint8)
    arr[:, 30:] = 255
    Image.fromarray(arr, "L").save(root / "stripe.png")
    ds = ImageDataset(str(root), resolution=8, channels=1, cache_dir=_cache(tmp_path))
    x = ds[0]["x"]
    assert ds.sample_shape == (1, 8, 8) and x.shape == (1, 8, 8)
    assert x[0, :, 0].max() < -0.9 and x[0, :, -1].min() > 0.9  # edge at the centre column

    flipped = ImageDataset(str(root), resolution=8, channels=1, random_flip=True, cache_dir=_cache(tmp_path))
    torch.manual_seed(0)
    seen = {bool(flipped[0]["x"][0, 0, 0] > 0) for _ in range(20)}
    assert seen == {True, False}  # both orientations occur

    rand = ImageDataset(str(root), resolution=8, channels=1, center_crop=False, cache_dir=_cache(tmp_path))
    torch.manual_seed(0)
    means = {round(float(rand[0]["x"].mean()), 3) for _ in range(30)}
    assert len(means) > 1 and all(-1 <= m <= 1 for m in means)


def test_corrupted_image_names_the_file(tmp_path):
    root = _make_folder(tmp_path / "bad", FILES[:2])
    (root / "cat" / "broken_img.png").write_bytes(os.urandom(256))
    ds = ImageDataset(str(root), resolution=8, cache_dir=_cache(tmp_path))
    assert len(ds) == 3  # listing does not decode anything
    bad = _by_file(ds)["broken_img.png"]
    with pytest.raises(DataError, match="broken_img.png"):
        ds[bad]
    ds[_by_file(ds)["c0.png"]]  # good files still load


def test_wrong_label_column(folder, tmp_path):
    with pytest.raises(DataError, match="'species'") as e:
        ImageDataset(str(folder), label_column="species", cache_dir=_cache(tmp_path))
    assert "image" in str(e.value) and "label" in str(e.value)  # lists the available columns


def test_wrong_image_column_and_split(folder, tmp_path):
    with pytest.raises(DataError, match="'img'"):
        ImageDataset(str(folder), image_column="img", cache_dir=_cache(tmp_path))
    with pytest.raises(DataError, match="'validation'"):
        ImageDataset(str(folder), split="validation", cache_dir=_cache(tmp_path))


def test_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no image files found"):
        ImageDataset(str(empty), source="imagefolder", cache_dir=_cache(tmp_path))
    with pytest.raises(DataError, match="no data files"):
        ImageDataset(str(empty), cache_dir=_cache(tmp_path))  # auto: neither images nor a saved dataset
    with pytest.raises(DataError, match="does not exist"):
        ImageDataset(str(tmp_path / "missing"), cache_dir=_cache(tmp_path))


def test_unlabelled_flat_folder_has_no_label_column(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    Image.new("RGB", (9, 9), (255, 0, 0)).save(root / "a.png")
    ds = ImageDataset(str(root), resolution=4, cache_dir=_cache(tmp_path))
    assert ds[0]["label"] == -1 and ds.num_classes == 0
    with pytest.raises(DataError, match="sub-folders"):
        ImageDataset(str(root), label_column="label", cache_dir=_cache(tmp_path))


def _png_bytes(colour, size=(12, 10), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_saved_dataset_via_auto_and_hf(tmp_path):
    import datasets

    d = datasets.Dataset.from_dict(
        {
            "img": [{"bytes": _png_bytes((255, 0, 0)), "path": None}, {"bytes": b"not an image", "path": None}],
            "y": [2, 5],
        }
    ).cast_column("img", datasets.Image())
    d.save_to_disk(str(tmp_path / "saved"))
    for source in ("auto", "hf"):
        ds = ImageDataset(str(tmp_path / "saved"), image_column="img", label_column="y", resolution=4, source=source)
        assert len(ds) == 2 and ds.num_classes == 6  # no ClassLabel: max + 1
        item = ds[0]
        assert item["x"].shape == (3, 4, 4) and item["label"] == 2
        assert torch.allclose(item["x"][0], torch.ones(4, 4))
        with pytest.raises(DataError, match="row 1"):
            ds[1]
    with pytest.raises(DataError, match="'test'"):
        ImageDataset(str(tmp_path / "saved"), split="test", image_column="img")


def test_saved_dataset_dict_with_classlabel_and_grey(tmp_path):
    import datasets

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    d = datasets.Dataset.from_dict({"image": [{"bytes": _png_bytes(255, mode="L"), "path": None}], "label": [0]}, features=feats)
    datasets.DatasetDict({"train": d, "test": d}).save_to_disk(str(tmp_path / "dd"))
    ds = ImageDataset(str(tmp_path / "dd"), split="test", label_column="label", channels=1, resolution=5)
    assert ds.num_classes == 3 and ds.sample_shape == (1, 5, 5)
    assert torch.allclose(ds[0]["x"], torch.ones(1, 5, 5)) and ds[0]["label"] == 0
    rgb = ImageDataset(str(tmp_path / "dd"), channels=3, resolution=5)
    assert rgb[0]["x"].shape == (3, 5, 5) and rgb[0]["label"] == -1
    with pytest.raises(DataError, match="'val'.*train"):
        ImageDataset(str(tmp_path / "dd"), split="val")


def test_bad_arguments(folder, tmp_path):
    with pytest.raises(DataError, match="channels"):
        ImageDataset(str(folder), channels=4)
    with pytest.raises(DataError, match="source"):
        ImageDataset(str(folder), source="zip")


def test_dataloader_batches(folder, tmp_path):
    ds = ImageDataset(str(folder), label_column="label", resolution=8, cache_dir=_cache(tmp_path))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)))
    assert batch["x"].shape == (4, 3, 8, 8) and batch["label"].shape == (4,)
