"""The built-in ``digits`` dataset: scikit-learn's 8x8 handwritten digits, served as 1-channel uint8 images in a
loop/curve/stroke hierarchy, with a seeded stratified split, fixed normalisation and a lazy scikit-learn import."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sklearn.datasets
import torch

from robustness.core.errors import ConfigError
from robustness.data import dataset_info, dataset_options, list_datasets, load_dataset
from robustness.data.digits import digits_info, digits_split, load_digits

N_DIGITS = 1797
HIERARCHY = {"loop": {0, 6, 8, 9}, "curve": {2, 3, 5}, "stroke": {1, 4, 7}}


@pytest.fixture(scope="module")
def raw():
    """scikit-learn's own arrays: pixels 0..16 [N, 8, 8] and labels [N]."""
    bunch = sklearn.datasets.load_digits()
    return bunch.images.astype(np.int64), bunch.target.astype(np.int64)


def _raw_as_uint8(pixels: np.ndarray) -> np.ndarray:
    # round(v * 255 / 16) in integer arithmetic (half up; the one tie, v = 8 -> 127.5, is 128 either way).
    return ((pixels * 255 + 8) // 16).astype(np.uint8)


def test_digits_is_registered_with_its_options():
    assert "digits" in list_datasets()
    assert dataset_options("digits") == ["image_size", "seed", "test_fraction"]


@pytest.mark.parametrize("size", [8, 16])
def test_shapes_dtype_and_range(size):
    train, test = load_digits("train", image_size=size), load_digits("test", image_size=size)
    assert len(train) + len(test) == N_DIGITS and len(test) == pytest.approx(0.3 * N_DIGITS, abs=10)
    for ds in (train, test):
        assert ds.images.dtype == torch.uint8 and tuple(ds.images.shape[1:]) == (1, size, size)
        assert ds.info.channels == 1 and ds.info.image_size == size
        assert int(ds.images.min()) == 0 and int(ds.images.max()) == 255  # full range: 0 and 16 both occur
        x, fine, coarse = ds.batch(slice(0, 5))
        assert x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert set(ds.fine.tolist()) == set(range(10))


def test_hierarchy_is_the_documented_one():
    info = digits_info()
    assert info.name == "digits"
    assert info.fine_classes == tuple(str(d) for d in range(10))
    assert info.coarse_classes == ("loop", "curve", "stroke")
    for digit, coarse in enumerate(info.fine_to_coarse):
        assert digit in HIERARCHY[info.coarse_classes[coarse]]
    for split in ("train", "test"):
        ds = load_digits(split)
        mapping = torch.tensor(info.fine_to_coarse)
        assert torch.equal(ds.coarse, mapping[ds.fine])
        for name, digits in HIERARCHY.items():
            members = ds.fine[ds.coarse == info.coarse_classes.index(name)]
            assert set(members.tolist()) == digits


def test_split_is_disjoint_covers_everything_and_serves_the_raw_pixels(raw):
    pixels, labels = raw
    split = digits_split()
    train_idx, test_idx = split["train"], split["test"]
    assert len(np.intersect1d(train_idx, test_idx)) == 0
    assert np.array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(N_DIGITS))
    for name, idx in split.items():
        assert np.all(np.diff(idx) > 0)  # in load_digits order, not grouped by class
        ds = load_digits(name, image_size=8)
        assert np.array_equal(ds.images[:, 0].numpy(), _raw_as_uint8(pixels[idx]))
        assert np.array_equal(ds.fine.numpy(), labels[idx])
    # Stratified: each digit's share of the test split is its rounded 30 %.
    counts = np.bincount(labels, minlength=10)
    assert np.array_equal(np.bincount(labels[test_idx], minlength=10), np.round(0.3 * counts).astype(int))
    # The documented recipe: digit d's images permuted by default_rng([seed, d]), the first ones go to test.
    for digit in (0, 7):
        members = np.flatnonzero(labels == digit)
        chosen = members[np.random.default_rng([0, digit]).permutation(len(members))[:round(0.3 * len(members))]]
        assert np.array_equal(np.sort(chosen), test_idx[labels[test_idx] == digit])
    # Not grouped by class: the first images of a split mix digits.
    assert len(set(labels[test_idx[:30]].tolist())) > 3


def test_image_size_8_is_the_raw_pixels_rescaled(raw):
    pixels, _ = raw
    both = {s: load_digits(s, image_size=8) for s in ("train", "test")}
    images = torch.cat([both["train"].images, both["test"].images])[:, 0].numpy()
    order = np.concatenate([digits_split()["train"], digits_split()["test"]])
    expected = np.round(pixels[order] * 255 / 16)
    assert np.array_equal(images, expected.astype(np.uint8))
    assert 128 in images and 127 not in images  # the value 8 -> 127.5 rounds to 128


def _bilinear_weights(size: int, src: int = 8) -> np.ndarray:
    """[size, src] weights of align_corners=False bilinear upsampling (edge-clamped), independent of torch."""
    w = np.zeros((size, src))
    for i in range(size):
        pos = max((i + 0.5) * src / size - 0.5, 0.0)
        lo = min(int(np.floor(pos)), src - 1)
        hi = min(lo + 1, src - 1)
        w[i, lo] += 1 - (pos - lo)
        w[i, hi] += pos - lo
    return w


def test_image_size_16_is_the_bilinear_upsampling(raw):
    pixels, _ = raw
    idx = digits_split()["test"]
    small = _raw_as_uint8(pixels[idx]).astype(np.float64)
    w = _bilinear_weights(16)
    expected = np.round(np.einsum("ij,njk,lk->nil", w, small, w)).astype(np.uint8)
    got = load_digits("test", image_size=16).images[:, 0].numpy()
    assert np.array_equal(got, expected)


def test_split_depends_on_seed_and_fraction_not_image_size(raw):
    _, labels = raw
    base = digits_split(seed=0)
    again = digits_split(seed=0)
    other = digits_split(seed=1)
    assert all(np.array_equal(base[s], again[s]) for s in ("train", "test"))
    assert len(other["test"]) == len(base["test"]) and not np.array_equal(other["test"], base["test"])
    a, b = load_digits("test", image_size=8, seed=0), load_digits("test", image_size=8, seed=0)
    assert torch.equal(a.images, b.images) and torch.equal(a.fine, b.fine)
    assert not torch.equal(load_digits("test", image_size=8, seed=1).images, a.images)
    # image_size changes the pixels, not which images are in the split.
    assert torch.equal(load_digits("test", image_size=24).fine, load_digits("test", image_size=8).fine)
    counts = np.bincount(labels, minlength=10)
    for fraction in (0.1, 0.5):
        n_test = len(load_digits("test", image_size=8, test_fraction=fraction))
        assert n_test == int(np.round(fraction * counts).sum())
        assert len(load_digits("train", image_size=8, test_fraction=fraction)) == N_DIGITS - n_test
    # A tiny fraction still leaves one image of each digit in test, a huge one one in train.
    assert sorted(load_digits("test", image_size=8, test_fraction=0.001).fine.tolist()) == list(range(10))
    assert sorted(load_digits("train", image_size=8, test_fraction=0.999).fine.tolist()) == list(range(10))


@pytest.mark.parametrize("options, option", [
    ({"image_size": 4}, "image_size"),
    ({"image_size": 65}, "image_size"),
    ({"image_size": 16.0}, "image_size"),
    ({"test_fraction": 0}, "test_fraction"),
    ({"test_fraction": 1.5}, "test_fraction"),
    ({"test_fraction": 1}, "test_fraction"),
    ({"test_fraction": "0.3"}, "test_fraction"),
    ({"seed": -1}, "seed"),
    ({"colour": "red"}, "colour"),
])
def test_invalid_options_name_the_option(options, option):
    for call in (lambda: load_dataset("digits", "train", **options), lambda: dataset_info("digits", **options)):
        with pytest.raises(ConfigError, match=option):
            call()


def test_info_matches_the_loaded_data_and_normalisation_is_shared():
    assert dataset_info("digits") == load_digits("train").info == load_digits("test").info == digits_info()
    custom = dict(image_size=24, seed=3, test_fraction=0.2)
    info = dataset_info("digits", **custom)
    assert info == load_dataset("digits", "test", **custom).info and info.image_size == 24
    assert (info.mean, info.std) == (digits_info().mean, digits_info().std)
    # The fixed constants are the default train split's statistics (4 decimals).
    x = load_digits("train").images.double() / 255
    assert digits_info().mean[0] == pytest.approx(float(x.mean()), abs=1e-4)
    assert digits_info().std[0] == pytest.approx(float(x.std(unbiased=False)), abs=1e-4)


def test_module_does_not_import_sklearn_at_import_time():
    code = "import sys, robustness.data.digits; assert 'sklearn' not in sys.modules, 'sklearn imported'"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
