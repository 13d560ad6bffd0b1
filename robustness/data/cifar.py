"""``cifar100`` and ``cifar10``: torchvision's python-format folders, read from a local copy (nothing is downloaded).

torchvision.datasets.CIFAR100/CIFAR10 cannot be used: they verify the md5 sums of the original files (a test copy
or a re-pickled copy fails) and unpickle with the unrestricted pickle module. We read the same files ourselves,
through ``safe_pickle``. The root may be the folder that holds ``cifar-100-python`` / ``cifar-10-batches-py`` or
that folder itself. cifar10's coarse classes are vehicle / animal.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustness.core.errors import DataError
from robustness.data.base import CoarseFineDataset, DatasetInfo, file_version
from robustness.data.registry import register_dataset
from robustness.data.safe_pickle import read_pickle

_CIFAR100_DIR, _CIFAR100_FILES = "cifar-100-python", ("train", "test", "meta")
_CIFAR100_MEAN, _CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_FILES = (*_CIFAR10_TRAIN, "test_batch", "batches.meta")
_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_CIFAR10_VEHICLES = frozenset({"airplane", "automobile", "ship", "truck"})


def cifar100_info(root: Path) -> DatasetInfo:
    """Class names from ``meta``; the fine-to-coarse map that the train split's labels define."""
    folder = _cifar_folder("cifar100", root, _CIFAR100_DIR, _CIFAR100_FILES)
    meta_path = folder / "meta"
    meta = read_pickle("cifar100", meta_path)
    fine = _names("cifar100", meta_path, meta, "fine_label_names")
    coarse = _names("cifar100", meta_path, meta, "coarse_label_names")
    mapping = _cifar100_mapping(str(folder / "train"), file_version(folder / "train"), fine, coarse)
    return DatasetInfo("cifar100", fine, coarse, mapping, _CIFAR100_MEAN, _CIFAR100_STD, image_size=32)


@lru_cache(maxsize=4)
def _cifar100_mapping(train_path: str, _stat: tuple[int, int], fine: tuple[str, ...],
                      coarse: tuple[str, ...]) -> tuple[int, ...]:
    """The fine-to-coarse map that the train split's labels define (cached per file version)."""
    path = Path(train_path)
    record = read_pickle("cifar100", path)
    n = len(_field("cifar100", path, record, "fine_labels"))
    fine_labels = _labels("cifar100", path, record, "fine_labels", n, len(fine))
    coarse_labels = _labels("cifar100", path, record, "coarse_labels", n, len(coarse))
    mapping = []
    for f, name in enumerate(fine):
        parents = np.unique(coarse_labels[fine_labels == f])
        if len(parents) != 1:
            found = "no samples" if not len(parents) else f"coarse labels {parents.tolist()}"
            raise DataError(f"cifar100: {path}: fine class {name!r} has {found}; expected exactly one coarse class")
        mapping.append(int(parents[0]))
    return tuple(mapping)


@register_dataset("cifar100", info=cifar100_info)
def load_cifar100(split: str, root: Path) -> CoarseFineDataset:
    """The 50000 / 10000 images of ``split``; a DataError if a coarse label contradicts the map."""
    info = cifar100_info(root)
    path = _cifar_folder("cifar100", root, _CIFAR100_DIR, _CIFAR100_FILES) / split
    record = read_pickle("cifar100", path)
    images = _pixels("cifar100", path, record)
    fine = _labels("cifar100", path, record, "fine_labels", len(images), info.num_fine)
    coarse = _labels("cifar100", path, record, "coarse_labels", len(images), info.num_coarse)
    _check_coarse("cifar100", path, info, fine, coarse)
    return CoarseFineDataset(info, torch.from_numpy(images), torch.from_numpy(fine), split)


def _check_coarse(dataset: str, path: Path, info: DatasetInfo, fine: np.ndarray, coarse: np.ndarray) -> None:
    expected = np.asarray(info.fine_to_coarse, dtype=np.int64)[fine]
    bad = np.flatnonzero(expected != coarse)
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{dataset}: {path}: {len(bad)} coarse labels contradict the fine-to-coarse map "
                        f"(sample {i}: fine {info.fine_classes[fine[i]]!r} belongs to "
                        f"{info.coarse_classes[expected[i]]!r}, labelled {int(coarse[i])})")


def cifar10_info(root: Path) -> DatasetInfo:
    """Class names from ``batches.meta``; vehicles and animals as the two coarse classes."""
    folder = _cifar_folder("cifar10", root, _CIFAR10_DIR, _CIFAR10_FILES)
    meta_path = folder / "batches.meta"
    fine = _names("cifar10", meta_path, read_pickle("cifar10", meta_path), "label_names")
    coarse = ("vehicle", "animal")
    mapping = tuple(0 if name in _CIFAR10_VEHICLES else 1 for name in fine)
    return DatasetInfo("cifar10", fine, coarse, mapping, _CIFAR10_MEAN, _CIFAR10_STD, image_size=32)


@register_dataset("cifar10", info=cifar10_info)
def load_cifar10(split: str, root: Path) -> CoarseFineDataset:
    """The five train batches or the test batch."""
    info = cifar10_info(root)
    folder = _cifar_folder("cifar10", root, _CIFAR10_DIR, _CIFAR10_FILES)
    images, labels = [], []
    for name in _CIFAR10_TRAIN if split == "train" else ("test_batch",):
        record = read_pickle("cifar10", folder / name)
        images.append(_pixels("cifar10", folder / name, record))
        labels.append(_labels("cifar10", folder / name, record, "labels", len(images[-1]), info.num_fine))
    return CoarseFineDataset(info, torch.from_numpy(np.concatenate(images)),
                             torch.from_numpy(np.concatenate(labels)), split)


def _field(dataset: str, path: Path, record: dict[str, Any], key: str) -> Any:
    if key not in record:
        raise DataError(f"{dataset}: {path} lacks the {key!r} entry (has: {', '.join(sorted(record)) or 'nothing'})")
    return record[key]


def _names(dataset: str, path: Path, record: dict[str, Any], key: str) -> tuple[str, ...]:
    values = _field(dataset, path, record, key)
    if not isinstance(values, (list, tuple)) or not values:
        raise DataError(f"{dataset}: {path}: {key!r} must be a non-empty list of names")
    return tuple(v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values)


def _pixels(dataset: str, path: Path, record: dict[str, Any], size: int = 32) -> np.ndarray:
    """The 'data' entry as uint8 [N, 3, size, size]."""
    data = _field(dataset, path, record, "data")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * size * size:
        shape = list(data.shape) if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{dataset}: {path}: 'data' must be an array [N, {3 * size * size}], got {shape}")
    if data.dtype != np.uint8:
        if data.dtype.kind not in "iu" or data.size and (data.min() < 0 or data.max() > 255):
            raise DataError(f"{dataset}: {path}: 'data' must hold uint8 pixels, got {data.dtype}")
        data = data.astype(np.uint8)
    return data.reshape(-1, 3, size, size)


def _labels(dataset: str, path: Path, record: dict[str, Any], key: str, n: int, num_classes: int) -> np.ndarray:
    values = _field(dataset, path, record, key)
    try:
        labels = np.asarray(values, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{dataset}: {path}: {key!r} must be a list of integers") from None
    if labels.shape != (n,):
        raise DataError(f"{dataset}: {path}: {key!r} has shape {list(labels.shape)}, expected [{n}] (one per image)")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{dataset}: {path}: {key!r} holds labels outside 0..{num_classes - 1}")
    return labels


def _cifar_folder(dataset: str, root: Path, subfolder: str, files: tuple[str, ...]) -> Path:
    """The folder holding ``files``: ``root/subfolder`` or ``root`` itself."""
    folder = root / subfolder if (root / subfolder).is_dir() else root
    for name in files:
        if not (folder / name).is_file():
            where = f"'{subfolder}/{name}' under {root}" if folder == root and root.name != subfolder \
                else f"'{name}' in {folder}"
            raise DataError(f"{dataset}: no {where} (expected the torchvision {subfolder} folder with files "
                            f"{', '.join(files)}; nothing is downloaded)")
    return folder
