"""``imagefolder``: local images in ``root/<coarse>/<fine>/*.png|jpg``, optionally under ``root/train`` and
``root/test``.

Without train/test folders the split is seeded per class (each class with >= 2 images keeps one on each side).
Images are resized to ``image_size`` squares; normalisation constants are measured on the train split.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from robustness.core.errors import ConfigError, DataError
from robustness.data.base import CoarseFineDataset, DatasetInfo, file_version, int_option
from robustness.data.registry import register_dataset

_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_IMAGEFOLDER_LAYOUT = "root/<coarse>/<fine>/*.png|jpg, optionally split into root/train and root/test"


@dataclass(frozen=True)
class _FolderPlan:
    """Class hierarchy and the files of each split: split -> ((path, fine index), ...)."""

    fine: tuple[str, ...]
    coarse: tuple[str, ...]
    fine_to_coarse: tuple[int, ...]
    files: dict[str, tuple[tuple[Path, int], ...]]


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith("."))


def _scan_classes(folder: Path) -> dict[tuple[str, str], list[Path]]:
    """(coarse, fine) -> image files under ``folder``; fine names must be unique across coarse folders."""
    classes: dict[tuple[str, str], list[Path]] = {}
    owner: dict[str, Path] = {}
    coarse_dirs = _subdirs(folder)
    if not coarse_dirs:
        raise DataError(f"imagefolder: no class folders under {folder} (expected {_IMAGEFOLDER_LAYOUT})")
    for coarse_dir in coarse_dirs:
        fine_dirs = _subdirs(coarse_dir)
        if not fine_dirs:
            raise DataError(f"imagefolder: coarse folder {coarse_dir} has no fine-class subfolders "
                            f"(expected {_IMAGEFOLDER_LAYOUT})")
        for fine_dir in fine_dirs:
            if fine_dir.name in owner:
                raise DataError(f"imagefolder: fine class {fine_dir.name!r} appears under two coarse folders "
                                f"({owner[fine_dir.name]} and {fine_dir}); fine class names must be unique")
            owner[fine_dir.name] = fine_dir
            files = _image_files(fine_dir)
            if not files:
                raise DataError(f"imagefolder: no .png/.jpg images in {fine_dir}")
            classes[(coarse_dir.name, fine_dir.name)] = files
    return classes


def _imagefolder_plan(root: Path, seed: int, test_fraction: float) -> _FolderPlan:
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_train != has_test:
        raise DataError(f"imagefolder: {root} has a '{'train' if has_train else 'test'}' folder but no "
                        f"'{'test' if has_train else 'train'}' folder (expected both, or {_IMAGEFOLDER_LAYOUT})")
    train = _scan_classes(root / "train" if has_train else root)
    keys = list(train)  # sorted by coarse, then fine
    coarse = tuple(dict.fromkeys(c for c, _ in keys))
    fine = tuple(f for _, f in keys)
    mapping = tuple(coarse.index(c) for c, _ in keys)
    if has_train:
        test = _scan_classes(root / "test")
        unknown = [f"{c}/{f}" for c, f in test if (c, f) not in train]
        if unknown:
            raise DataError(f"imagefolder: {root / 'test'} has classes missing from {root / 'train'}: "
                            f"{', '.join(unknown[:5])}")
        files = {"train": _indexed(train, keys), "test": _indexed(test, keys)}
    else:
        files = _random_split(train, keys, seed, test_fraction)
    return _FolderPlan(fine, coarse, mapping, files)


def _indexed(classes: dict[tuple[str, str], list[Path]], keys: list[tuple[str, str]]) -> tuple[tuple[Path, int], ...]:
    return tuple((path, keys.index(key)) for key, paths in classes.items() for path in paths)


def _random_split(classes: dict[tuple[str, str], list[Path]], keys: list[tuple[str, str]], seed: int,
                  test_fraction: float) -> dict[str, tuple[tuple[Path, int], ...]]:
    """A seeded per-class split; each class with >= 2 images keeps at least one image on each side."""
    train: list[tuple[Path, int]] = []
    test: list[tuple[Path, int]] = []
    for index, key in enumerate(keys):
        paths = classes[key]
        # Seed per class name so one class's split does not change when other classes are added.
        order = np.random.default_rng([seed, zlib.crc32(key[1].encode())]).permutation(len(paths))
        n_test = 0 if len(paths) < 2 else min(len(paths) - 1, max(1, round(test_fraction * len(paths))))
        test += [(paths[i], index) for i in sorted(order[:n_test])]
        train += [(paths[i], index) for i in sorted(order[n_test:])]
    return {"train": tuple(train), "test": tuple(test)}


def _read_images(files: tuple[tuple[Path, int], ...], size: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((len(files), 3, size, size), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB").resize((size, size), Image.BILINEAR)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"imagefolder: cannot read image {path} ({e})") from None
        images[i] = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    return images, np.fromiter((f for _, f in files), dtype=np.int64, count=len(files))


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pixels = images.transpose(1, 0, 2, 3).reshape(images.shape[1], -1).astype(np.float64) / 255.0
    # A floor keeps normalisation finite for a degenerate (constant-colour) train split.
    return tuple(pixels.mean(1).tolist()), tuple(np.maximum(pixels.std(1), 1e-3).tolist())


@lru_cache(maxsize=4)
def _imagefolder_train_stats(files: tuple[tuple[Path, int], ...], _stats: tuple[tuple[int, int], ...],
                             size: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation constants of the train files (cached per file list and file versions)."""
    return _channel_stats(_read_images(files, size)[0])


def _imagefolder_options(image_size: Any, seed: Any, test_fraction: Any) -> tuple[int, int, float]:
    size = int_option("imagefolder", "image_size", image_size, 8, 1024)
    seed = int_option("imagefolder", "seed", seed, 0)
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 <= test_fraction < 1:
        raise ConfigError(f"imagefolder: option test_fraction must be a number in [0, 1), got {test_fraction!r}")
    return size, seed, float(test_fraction)


def _imagefolder_info_from(plan: _FolderPlan, size: int, train_images: np.ndarray | None = None) -> DatasetInfo:
    if train_images is not None:
        mean, std = _channel_stats(train_images)
    else:
        files = plan.files["train"]
        mean, std = _imagefolder_train_stats(files, tuple(file_version(p) for p, _ in files), size)
    return DatasetInfo("imagefolder", plan.fine, plan.coarse, plan.fine_to_coarse, mean, std, image_size=size)


def imagefolder_info(root: Path, image_size: int = 32, seed: int = 0, test_fraction: float = 0.2) -> DatasetInfo:
    """Classes from the folder names; mean/std of the train split's images (cached per file version)."""
    size, seed, fraction = _imagefolder_options(image_size, seed, test_fraction)
    return _imagefolder_info_from(_imagefolder_plan(root, seed, fraction), size)


@register_dataset("imagefolder", info=imagefolder_info)
def load_imagefolder(split: str, root: Path, image_size: int = 32, seed: int = 0,
                     test_fraction: float = 0.2) -> CoarseFineDataset:
    """The images of ``split`` resized to ``image_size``; a DataError if that split is empty."""
    size, seed, fraction = _imagefolder_options(image_size, seed, test_fraction)
    plan = _imagefolder_plan(root, seed, fraction)
    if not plan.files[split]:
        raise DataError(f"imagefolder: the {split} split of {root} is empty (each class needs at least 2 images "
                        f"for a {split} split, or use root/train and root/test folders)")
    images, fine = _read_images(plan.files[split], size)
    info = _imagefolder_info_from(plan, size, images if split == "train" else None)
    return CoarseFineDataset(info, torch.from_numpy(images), torch.from_numpy(fine), split)
