"""Image datasets through Hugging Face ``datasets``: a local image folder, a Hub dataset or a saved one.

Images are decoded lazily with PIL (never by ``datasets``), so a broken file raises
:class:`~flowlab.data.base.DataError` naming that file instead of a PIL traceback.
Each item is ``{"x": Tensor (C, R, R) float32 in [-1, 1], "label": int}`` where ``R`` is
``resolution`` and ``label`` is ``-1`` when no label column is used.
"""
from __future__ import annotations

import io
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import DataError

__all__ = ["ImageDataset", "SOURCES"]

SOURCES = ("auto", "imagefolder", "hf")
_MODES = {1: "L", 3: "RGB"}


def _image_extensions() -> frozenset[str]:
    """Lower-case file extensions (with dot) that the ``imagefolder`` builder picks up."""
    try:
        from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

        return frozenset(e.lower() for e in ImageFolder.EXTENSIONS)
    except Exception:  # pragma: no cover - layout of datasets changed
        from PIL import Image

        return frozenset(e.lower() for e in Image.registered_extensions())


def _has_image_files(path: str) -> bool:
    """Whether the folder ``path`` holds at least one image file (searched recursively)."""
    exts = _image_extensions()
    for _root, _dirs, files in os.walk(path):
        if any(os.path.splitext(f)[1].lower() in exts for f in files):
            return True
    return False


def _is_saved_dataset(path: str) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
    return has("dataset_dict.json") or (has("state.json") and has("dataset_info.json"))


def _looks_local(path: str) -> bool:
    """A path that cannot be a Hub id (``name`` or ``owner/name``)."""
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path


class ImageDataset(Dataset):
    """Images from a Hugging Face ``datasets`` source, resized and cropped to a square.

    Args:
        path: a folder of image files (``imagefolder``), a Hub dataset name, a local dataset
            folder for ``datasets.load_dataset`` or a folder written by ``save_to_disk``.
        split: split to use (e.g. ``train``, ``test``; for ``load_dataset`` sources also
            slices such as ``train[:100]``). A saved single ``Dataset`` only has ``train``.
        image_column: column holding the images (an ``Image`` feature, file paths or bytes).
        label_column: integer / ``ClassLabel`` / string column with class labels, or ``None``
            for unlabelled data (label ``-1``). ``imagefolder``'s automatic ``label`` column
            (from sub-folder names) is used only when ``label_column="label"``.
        resolution: side ``R`` of the square output images.
        channels: ``3`` (RGB) or ``1`` (grey, ``L``).
        center_crop: crop the centre after resizing the short side to ``R``; if ``False``
            crop at a random position (``torch`` global RNG).
        random_flip: flip horizontally with probability 0.5 (``torch`` global RNG).
        source: ``imagefolder``, ``hf`` or ``auto`` (image folder if ``path`` is a folder
            containing image files, else ``load_from_disk`` if it is a saved dataset, else
            ``load_dataset(path)``).
        cache_dir: optional cache folder passed to ``datasets.load_dataset``.

    Attributes:
        num_classes: number of classes (from the ``ClassLabel`` feature, else ``max + 1``);
            ``0`` if unlabelled.
        kind: ``"image"``.
        sample_shape: ``(channels, resolution, resolution)``.

    Items are ``{"x": Tensor (channels, resolution, resolution) float32 in [-1, 1], "label": int}``.

    Raises:
        DataError: unknown source, missing path, split, image or label column, an empty
            split, or (on access) an image that cannot be decoded.
    """

    kind = "image"

    def __init__(
        self,
        path: str,
        split: str = "train",
        image_column: str = "image",
        label_column: str | None = None,
        resolution: int = 32,
        channels: int = 3,
        center_crop: bool = True,
        random_flip: bool = False,
        source: str = "auto",
        *,
        cache_dir: str | None = None,
    ):
        if source not in SOURCES:
            raise DataError(f"data.source must be one of {SOURCES}, got {source!r}")
        if channels not in _MODES:
            raise DataError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
        if int(resolution) < 1:
            raise DataError(f"resolution must be a positive integer, got {resolution!r}")
        path = os.fspath(path)
        self.path, self.split = path, split
        self.image_column, self.label_column = image_column, label_column
        self.resolution, self.channels = int(resolution), int(channels)
        self.center_crop, self.random_flip = bool(center_crop), bool(random_flip)
        self.mode = _MODES[self.channels]

        ds, self.source = self._load(path, split, source, cache_dir)
        self._where = f"split {split!r} of {path!r}"
        if len(ds) == 0:
            raise DataError(f"{self._where} is empty (0 rows)")
        columns = list(ds.column_names)
        if image_column not in columns:
            raise DataError(f"image column {image_column!r} not found in {self._where}; available columns: {columns}")
        if label_column is not None and label_column not in columns:
            hint = (
                " (imagefolder only makes a 'label' column when images sit in two or more class sub-folders)"
                if self.source == "imagefolder" and label_column == "label"
                else ""
            )
            raise DataError(
                f"label column {label_column!r} not found in {self._where}; available columns: {columns}{hint}"
            )
        keep = [image_column] + ([label_column] if label_column is not None and label_column != image_column else [])
        ds = ds.select_columns(keep)
        ds = self._prepare_image_column(ds)
        self.num_classes = 0
        if label_column is not None:
            ds = self._prepare_label_column(ds)
        self._ds = ds

    # ----------------------------------------------------------------- loading
    @staticmethod
    def _load(path: str, split: str, source: str, cache_dir: str | None):
        """Resolve ``source`` and return ``(datasets.Dataset for split, resolved source)``."""
        import datasets

        is_dir = os.path.isdir(path)
        if source == "auto":
            if is_dir and _has_image_files(path):
                source = "imagefolder"
            elif is_dir and _is_saved_dataset(path):
                source = "disk"
            elif not os.path.exists(path) and _looks_local(path):
                raise DataError(f"dataset path {path!r} does not exist")
            else:
                source = "hf"
        elif source == "imagefolder":
            if not is_dir:
                raise DataError(f"imagefolder path {path!r} is not a directory")
        elif source == "hf" and is_dir and _is_saved_dataset(path):
            source = "disk"

        if source == "disk":
            try:
                loaded = datasets.load_from_disk(path)
            except Exception as e:
                raise DataError(f"could not read the saved dataset at {path!r}: {type(e).__name__}: {e}") from e
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(
                        f"split {split!r} not found in saved dataset {path!r}; available splits: {list(loaded)}"
                    )
                return loaded[split], "hf"
            if split != "train":
                raise DataError(
                    f"split {split!r} not found in saved dataset {path!r}: it is a single Dataset without splits; "
                    "available splits: ['train']"
                )
            return loaded, "hf"

        if source == "imagefolder":
            args, kwargs = ("imagefolder",), {"data_dir": path}
        else:
            args, kwargs = (path,), {}
        try:
            ds = datasets.load_dataset(*args, split=split, cache_dir=cache_dir, **kwargs)
        except DataError:
            raise
        except FileNotFoundError as e:  # EmptyDatasetError is a FileNotFoundError
            what = f"no image files found in {path!r}" if source == "imagefolder" else f"no data files for {path!r}"
            raise DataError(f"{what}: {e}") from e
        except ValueError as e:
            if "split" in str(e).lower():
                raise DataError(f"split {split!r} not found in {path!r}: {e}") from e
            raise DataError(f"could not load dataset {path!r} ({source}): {e}") from e
        except Exception as e:
            raise DataError(f"could not load dataset {path!r} ({source}): {type(e).__name__}: {e}") from e
        if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)) or not isinstance(ds, datasets.Dataset):
            raise DataError(f"{path!r} split {split!r} did not give a map-style Dataset (got {type(ds).__name__})")
        return ds, source

    def _prepare_image_column(self, ds):
        """Make the image column yield raw ``{"path", "bytes"}`` (or a path / bytes) instead of PIL images."""
        import datasets

        col = self.image_column
        feat = ds.features[col]
        if isinstance(feat, datasets.Image):
            return ds.cast_column(col, datasets.Image(decode=False))
        if isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string", "binary", "large_binary"):
            return ds  # file paths or encoded bytes, decoded in __getitem__
        if isinstance(feat, dict) and {"path", "bytes"} <= set(feat):
            return ds
        raise DataError(
            f"column {col!r} in {self._where} does not hold images (feature {feat}); "
            f"available columns: {list(ds.column_names)}"
        )

    def _prepare_label_column(self, ds):
        """Check the label column, encode strings as classes and set ``num_classes``."""
        import datasets
        import pyarrow.compute as pc

        col = self.label_column
        feat = ds.features[col]
        if isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string"):
            ds = ds.class_encode_column(col)
            feat = ds.features[col]
        if isinstance(feat, datasets.ClassLabel):
            self.num_classes = int(feat.num_classes)
            return ds
        if not (isinstance(feat, datasets.Value) and (feat.dtype.startswith("int") or feat.dtype.startswith("uint"))):
            raise DataError(
                f"label column {col!r} in {self._where} must hold integer class labels, got feature {feat}"
            )
        values = ds.select_columns([col]).with_format("arrow")[:][col]  # honours any indices mapping
        if values.null_count:
            raise DataError(f"label column {col!r} in {self._where} has {values.null_count} missing labels")
        lo, hi = pc.min(values).as_py(), pc.max(values).as_py()
        if lo < 0:
            raise DataError(f"label column {col!r} in {self._where} has a negative label ({lo})")
        self.num_classes = int(hi) + 1
        return ds

    # ----------------------------------------------------------------- items
    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(channels, resolution, resolution)``."""
        return (self.channels, self.resolution, self.resolution)

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> dict:
        """Item ``i``: ``{"x": Tensor (C, R, R) float32 in [-1, 1], "label": int}``."""
        i = int(i)
        n = len(self._ds)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {self._where} with {n} rows")
        row = self._ds[i]
        image = self._decode(row[self.image_column], i)
        x = self._transform(image)
        label = -1
        if self.label_column is not None:
            value = row[self.label_column]
            if value is None:
                raise DataError(f"row {i} of {self._where} has no value in label column {self.label_column!r}")
            label = int(value)
        return {"x": x, "label": label}

    def _decode(self, value, i: int):
        """Decode a raw image cell (``{"path", "bytes"}``, a path or bytes) of row ``i`` with PIL."""
        from PIL import Image, ImageOps

        path, data = None, None
        if isinstance(value, dict):
            path, data = value.get("path"), value.get("bytes")
        elif isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
        elif isinstance(value, str):
            path = value
        name = f"image file {path!r} (row {i} of {self._where})" if path else f"image in row {i} of {self._where}"
        if data is None and not path:
            raise DataError(f"{name} is empty (no path and no bytes)")
        try:
            if data is not None:
                fh = io.BytesIO(data)
            elif "://" in path or "::" in path:
                from datasets.utils.file_utils import xopen

                with xopen(path, "rb") as remote:
                    fh = io.BytesIO(remote.read())
            else:
                fh = open(path, "rb")
            with fh:
                image = Image.open(fh)
                image.load()
            image = ImageOps.exif_transpose(image)
        except Exception as e:
            raise DataError(f"cannot decode {name}: {type(e).__name__}: {e}") from None
        return image

    def _transform(self, image) -> torch.Tensor:
        """PIL image -> mode by ``channels``, short side to ``R``, square crop, optional flip -> ``(C, R, R)`` in [-1, 1]."""
        from PIL import Image

        if image.mode in ("P", "PA"):  # palette (possibly with transparency): expand before converting
            image = image.convert("RGBA")
        if image.mode != self.mode:
            image = image.convert(self.mode)
        r = self.resolution
        w, h = image.size
        scale = r / min(w, h)
        nw, nh = max(r, round(w * scale)), max(r, round(h * scale))
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), resample=Image.Resampling.BICUBIC)
        if self.center_crop:
            left, top = (nw - r) // 2, (nh - r) // 2
        else:
            left = int(torch.randint(0, nw - r + 1, ()).item())
            top = int(torch.randint(0, nh - r + 1, ()).item())
        if (nw, nh) != (r, r):
            image = image.crop((left, top, left + r, top + r))
        if self.random_flip and torch.rand(()).item() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(image, dtype=np.float32)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
        return (x - 127.5) / 127.5  # exact at 0 and 255, no cancellation near mid-grey

    def __repr__(self) -> str:
        return (
            f"ImageDataset({self.path!r}, split={self.split!r}, source={self.source!r}, n={len(self)}, "
            f"shape={self.sample_shape}, num_classes={self.num_classes})"
        )
