"""``digits``: real handwritten digits, 8x8 grey, from scikit-learn's bundled copy (no files, nothing downloaded).

The data is ``sklearn.datasets.load_digits``: 1,797 images of the digits 0..9, 8x8 pixels with values 0..16,
which scikit-learn ships inside its package. It is scikit-learn's copy of the test set of the UCI "Optical
Recognition of Handwritten Digits" data (32x32 bitmaps of handwriting by 43 writers, each 4x4 block counted into
one 0..16 pixel).

Images are served with 1 channel as uint8 ``round(value * 255 / 16)`` and resized from 8 px to ``image_size``
(8..64) with bilinear interpolation (``align_corners=False``), rounded back to uint8; at 8 px they are the raw
pixels. Rounding is half to even throughout (NumPy / torch ``round``).

Label hierarchy (our choice, by stroke structure; the data has no coarse labels of its own):
- ``loop``   = digits 0, 6, 8, 9 (closed loops),
- ``curve``  = digits 2, 3, 5 (open curves),
- ``stroke`` = digits 1, 4, 7 (straight strokes).
Fine classes are the digits "0".."9" in numeric order (fine label = the digit); coarse classes are in the order
(loop, curve, stroke).

Split: seeded and stratified per class. For each digit d its images are permuted with
``numpy.random.default_rng([seed, d])`` and the first ``round(test_fraction * count)`` of them (at least 1, at
most count - 1) go to test, the rest to train. Within each split the samples keep their order in
``load_digits`` (deterministic, not grouped by class). Train and test are disjoint and together hold all 1,797
images; the split depends only on (seed, test_fraction), never on ``image_size``.

What it is evidence of: real images of real handwriting, so a result here is not an artefact of generated data.
What it is not: the images are tiny (8x8 upsampled), grey and of 10 classes in a hand-made 3-way hierarchy, and
there are only ~1,260 training images; it is a quick real-data check, not CIFAR-scale evidence.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch

from robustness.core.errors import ConfigError, DataError
from robustness.data.base import CoarseFineDataset, DatasetInfo, int_option
from robustness.data.registry import register_dataset

DIGITS_FINE_CLASSES = tuple(str(d) for d in range(10))
DIGITS_COARSE_CLASSES = ("loop", "curve", "stroke")
#: Coarse class of each digit 0..9: loop {0, 6, 8, 9}, curve {2, 3, 5}, stroke {1, 4, 7}.
DIGITS_FINE_TO_COARSE = (0, 2, 1, 1, 2, 1, 0, 2, 0, 0)
#: Number of images in scikit-learn's digits data.
DIGITS_COUNT = 1797

# Mean/std (population std, over all pixels) of the default train split (image_size 16, seed 0, test_fraction 0.3;
# pixels in [0, 1]), measured once and fixed so that every split and option set shares one normalisation. The mean
# hardly moves with the options; the std does with image_size (about 0.376 at 8 px, 0.323 at 32 px).
_DIGITS_MEAN = (0.3045,)
_DIGITS_STD = (0.3184,)


def _digits_options(image_size: Any, seed: Any, test_fraction: Any) -> tuple[int, int, float]:
    size = int_option("digits", "image_size", image_size, 8, 64)
    seed = int_option("digits", "seed", seed, 0)
    if (isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float, np.integer, np.floating))
            or not 0 < test_fraction < 1):
        raise ConfigError(f"digits: option test_fraction must be a number strictly between 0 and 1, "
                          f"got {test_fraction!r}")
    return size, seed, float(test_fraction)


def digits_info(image_size: int = 16, seed: int = 0, test_fraction: float = 0.3) -> DatasetInfo:
    """The 10 digits in the loop/curve/stroke hierarchy; fixed normalisation, so nothing is read."""
    size, _, _ = _digits_options(image_size, seed, test_fraction)
    return DatasetInfo(
        name="digits",
        fine_classes=DIGITS_FINE_CLASSES,
        coarse_classes=DIGITS_COARSE_CLASSES,
        fine_to_coarse=DIGITS_FINE_TO_COARSE,
        mean=_DIGITS_MEAN,
        std=_DIGITS_STD,
        image_size=size,
        channels=1,
    )


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as read-only uint8 images [N, 1, 8, 8] (value * 255 / 16, rounded) and int64 labels."""
    from sklearn.datasets import load_digits as sklearn_load_digits  # lazy: keeps the CLI's start-up fast

    bunch = sklearn_load_digits()
    data, target = np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)
    if data.shape != (DIGITS_COUNT, 64) or target.shape != (DIGITS_COUNT,):
        raise DataError(f"digits: scikit-learn's digits have shape {list(data.shape)}, expected [{DIGITS_COUNT}, 64]")
    images = np.round(data * 255.0 / 16.0).clip(0, 255).astype(np.uint8).reshape(DIGITS_COUNT, 1, 8, 8)
    images.setflags(write=False)
    target.setflags(write=False)
    return images, target


def digits_split(seed: int = 0, test_fraction: float = 0.3) -> dict[str, np.ndarray]:
    """Indices into ``sklearn.datasets.load_digits()`` of each split ("train", "test"), each in increasing order."""
    _, seed, fraction = _digits_options(8, seed, test_fraction)
    labels = _raw_digits()[1]
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for digit in range(len(DIGITS_FINE_CLASSES)):
        members = np.flatnonzero(labels == digit)
        order = np.random.default_rng([seed, digit]).permutation(len(members))
        # At least one image of each class on each side (every digit has ~180 images).
        n_test = min(len(members) - 1, max(1, round(fraction * len(members))))
        test.append(members[order[:n_test]])
        train.append(members[order[n_test:]])
    return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, 1, 8, 8] resized to [N, 1, size, size] bilinearly, rounded back to uint8."""
    if size == images.shape[-1]:
        return images.copy()
    x = torch.from_numpy(images.astype(np.float32))
    y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                        antialias=False)
    return y.round_().clamp_(0, 255).to(torch.uint8).numpy()


@register_dataset("digits", info=digits_info)
def load_digits(split: str, image_size: int = 16, seed: int = 0, test_fraction: float = 0.3) -> CoarseFineDataset:
    """The ``split`` of scikit-learn's handwritten digits (1 channel), resized to ``image_size``."""
    info = digits_info(image_size, seed, test_fraction)
    indices = digits_split(seed, test_fraction)[split]
    images, labels = _raw_digits()
    pixels = _resize(images[indices], info.image_size)
    return CoarseFineDataset(info, torch.from_numpy(pixels), torch.from_numpy(labels[indices].copy()), split)

