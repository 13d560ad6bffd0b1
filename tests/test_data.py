"""Tests for robustness.data: the built-in synthetic data, CIFAR folders (fake copies in the real file format),
image folders, safe unpickling and the errors a user sees for missing or malformed data."""
from __future__ import annotations

import builtins
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustness.data import (
    CoarseFineDataset,
    DatasetInfo,
    dataset_info,
    list_datasets,
    load_dataset,
)
from robustness.core.errors import ConfigError, DataError, UnknownNameError

# ------------------------------------------------------------------------------------------------------------------
# helpers: fake dataset folders in the real on-disk formats
# ------------------------------------------------------------------------------------------------------------------

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _dump(path: Path, obj: object, protocol: int = 2) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def _random_pixels(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def _cifar100_mapping() -> list[int]:
    """A fake fine->coarse map in the real shape: 100 fine classes, 5 per coarse class, not in order."""
    return [int(c) for c in np.random.default_rng(1).permutation(np.arange(100) % 20)]


def write_fake_cifar100(parent: Path, protocol: int = 2, n_train: int = 200, n_test: int = 100) -> Path:
    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    mapping = _cifar100_mapping()
    _dump(folder / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, protocol)
    for split, n in (("train", n_train), ("test", n_test)):
        fine = [i % 100 for i in range(n)]
        _dump(folder / split, {b"filenames": [f"{i}.png".encode() for i in range(n)], b"data": _random_pixels(rng, n),
                               b"fine_labels": fine, b"coarse_labels": [mapping[f] for f in fine]}, protocol)
    return folder


def write_fake_cifar10(parent: Path, per_batch: int = 10) -> Path:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _dump(folder / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072})
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _dump(folder / name, {b"data": _random_pixels(rng, per_batch),
                              b"labels": [int(x) for x in rng.integers(0, 10, per_batch)]})
    return folder


def _colour(fine_index: int, k: int) -> tuple[int, int, int]:
    return (10 * fine_index + k, 100 + 20 * k, 200 - 30 * fine_index)


def write_image_tree(root: Path, classes: dict[str, list[str]], per_class: int = 5, suffix: str = ".png") -> None:
    """root/<coarse>/<fine>/<k><suffix>, each a solid colour that encodes (fine index, k)."""
    fine_index = 0
    for coarse in sorted(classes):
        for fine in sorted(classes[coarse]):
            folder = root / coarse / fine
            folder.mkdir(parents=True)
            for k in range(per_class):
                Image.new("RGB", (11, 7), _colour(fine_index, k)).save(folder / f"{k}{suffix}")
            fine_index += 1


class _SystemCall:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _EvalCall:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.fixture(scope="module")
def synthetic_train() -> CoarseFineDataset:
    return load_dataset("synthetic", "train", n=3000)


@pytest.fixture(scope="module")
def synthetic_test() -> CoarseFineDataset:
    return load_dataset("synthetic", "test", n=1000)


def _check_dataset(ds: CoarseFineDataset, n: int, size: int) -> None:
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (n, 3, size, size)
    assert ds.fine.dtype == torch.int64 and ds.coarse.dtype == torch.int64 and len(ds) == n
    mapping = torch.tensor(ds.info.fine_to_coarse)
    assert torch.equal(ds.coarse, mapping[ds.fine])
    x, f, c = ds[n - 1]
    assert x.dtype == torch.float32 and x.shape == (3, size, size) and 0.0 <= x.min() and x.max() <= 1.0
    assert torch.allclose(x * 255, ds.images[n - 1].float())
    assert (f, c) == (int(ds.fine[n - 1]), int(ds.coarse[n - 1])) and isinstance(f, int) and isinstance(c, int)


# ------------------------------------------------------------------------------------------------------------------
# registry and option errors
# ------------------------------------------------------------------------------------------------------------------


def test_list_datasets_names_every_dataset():
    assert list_datasets() == ["cifar10", "cifar100", "digits", "imagefolder", "synthetic"]


def test_unknown_dataset_lists_known_names():
    with pytest.raises(UnknownNameError) as err:
        load_dataset("imagenet")
    assert err.value.known == list_datasets()
    assert "imagenet" in str(err.value) and "cifar100" in str(err.value) and "synthetic" in str(err.value)
    with pytest.raises(UnknownNameError):
        dataset_info("imagenet")


def test_bad_split_and_options_are_config_errors():
    with pytest.raises(ConfigError, match="split"):
        load_dataset("synthetic", "validation", n=10)
    with pytest.raises(ConfigError, match="colour"):
        load_dataset("synthetic", "train", n=10, colour=1)
    with pytest.raises(ConfigError, match="n_coarse"):
        dataset_info("synthetic", n_coarse=99)
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("synthetic", "train", n=10, image_size="big")
    with pytest.raises(ConfigError, match="option"):
        load_dataset("cifar100", "train", root="/nonexistent", image_size=32)


# ------------------------------------------------------------------------------------------------------------------
# synthetic
# ------------------------------------------------------------------------------------------------------------------


def test_synthetic_shapes_labels_and_classes(synthetic_train):
    _check_dataset(synthetic_train, 3000, 32)
    info = synthetic_train.info
    assert (info.name, info.num_fine, info.num_coarse, info.image_size, info.channels) == ("synthetic", 16, 4, 32, 3)
    assert info.fine_classes[:2] == ("disc/plain", "disc/stripes")
    assert all(f.split("/")[0] == info.coarse_classes[c] for f, c in zip(info.fine_classes, info.fine_to_coarse))
    counts = torch.bincount(synthetic_train.fine, minlength=16)
    assert counts.min() >= 3000 // 16 - 5 and counts.max() <= 3000 // 16 + 5  # balanced classes


def test_synthetic_default_sizes():
    # The default train/test sizes (10000 / 2000) without paying for generating them here.
    info = dataset_info("synthetic")
    assert info == load_dataset("synthetic", "test", n=5).info
    assert len(load_dataset("synthetic", "test", image_size=16)) == 2000


def test_synthetic_is_deterministic_per_seed(synthetic_train):
    again = load_dataset("synthetic", "train", n=3000)
    assert torch.equal(again.images, synthetic_train.images) and torch.equal(again.fine, synthetic_train.fine)
    other = load_dataset("synthetic", "train", n=3000, seed=1)
    assert not torch.equal(other.images, synthetic_train.images)
    # A smaller n is a prefix of a larger one.
    small = load_dataset("synthetic", "train", n=1500)
    assert torch.equal(small.images, synthetic_train.images[:1500])


def test_synthetic_train_and_test_do_not_overlap(synthetic_train, synthetic_test):
    assert synthetic_test.info == synthetic_train.info
    train = {bytes(img.numpy()) for img in synthetic_train.images}
    assert not any(bytes(img.numpy()) in train for img in synthetic_test.images)
    assert len(train) == len(synthetic_train)  # no duplicate images inside a split either


def test_synthetic_normalisation_constants_match_the_data(synthetic_train):
    pixels = synthetic_train.images.float().div(255).transpose(0, 1).reshape(3, -1)
    assert torch.allclose(pixels.mean(1), torch.tensor(synthetic_train.info.mean), atol=0.02)
    assert torch.allclose(pixels.std(1), torch.tensor(synthetic_train.info.std), atol=0.02)


def test_synthetic_is_not_solvable_by_class_mean_templates(synthetic_train, synthetic_test):
    # Nuisance variation (position, rotation, scale, colour) must defeat a nearest-class-mean classifier on pixels.
    x, fine, _ = synthetic_train.batch(slice(None))
    means = torch.stack([x[fine == k].flatten(1).mean(0) for k in range(16)])
    xt, fine_t, coarse_t = synthetic_test.batch(slice(None))
    pred = torch.cdist(xt.flatten(1), means).argmin(1)
    assert (pred == fine_t).float().mean() < 0.2  # 16 classes: chance is 0.0625
    mapping = torch.tensor(synthetic_train.info.fine_to_coarse)
    assert (mapping[pred] == coarse_t).float().mean() < 0.45  # 4 families: chance is 0.25


def test_synthetic_options_change_geometry_and_classes():
    ds = load_dataset("synthetic", "test", n=60, image_size=20, n_coarse=3, fine_per_coarse=2, seed=5)
    _check_dataset(ds, 60, 20)
    assert ds.info.coarse_classes == ("disc", "bar", "triangle")
    assert ds.info.fine_classes == ("disc/plain", "disc/stripes", "bar/plain", "bar/stripes",
                                    "triangle/plain", "triangle/stripes")
    assert set(ds.fine.tolist()) == set(range(6))
    assert dataset_info("synthetic", image_size=20, n_coarse=3, fine_per_coarse=2) == ds.info


def test_synthetic_batch_matches_getitem(synthetic_test):
    idx = torch.tensor([5, 0, 999])
    x, fine, coarse = synthetic_test.batch(idx)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    for row, i in enumerate(idx.tolist()):
        xi, fi, ci = synthetic_test[i]
        assert torch.equal(x[row], xi) and (int(fine[row]), int(coarse[row])) == (fi, ci)


def test_subset_takes_the_first_samples(synthetic_test):
    sub = synthetic_test.subset(10)
    assert len(sub) == 10 and sub.info == synthetic_test.info and sub.split == "test"
    assert torch.equal(sub.images, synthetic_test.images[:10]) and torch.equal(sub.coarse, synthetic_test.coarse[:10])
    assert len(synthetic_test.subset(10**6)) == len(synthetic_test)
    with pytest.raises(ConfigError):
        synthetic_test.subset(0)


# ------------------------------------------------------------------------------------------------------------------
# DatasetInfo
# ------------------------------------------------------------------------------------------------------------------


def test_info_round_trips_through_json():
    info = dataset_info("synthetic", n_coarse=3)
    d = json.loads(json.dumps(info.to_dict()))
    assert isinstance(info.to_dict()["fine_classes"], list)
    back = DatasetInfo.from_dict(d)
    assert back == info and back.differences(info) == []
    with pytest.raises(DataError, match="fine_to_coarse"):
        DatasetInfo.from_dict({k: v for k, v in d.items() if k != "fine_to_coarse"})


def test_info_differences_name_what_changed():
    base = dataset_info("synthetic")
    smaller = dataset_info("synthetic", n_coarse=3, fine_per_coarse=2)
    diffs = base.differences(smaller)
    assert "fine classes differ (16 vs 6)" in diffs and "coarse classes differ (4 vs 3)" in diffs
    d = base.to_dict()
    d.update(mean=[0.4, 0.5, 0.5], image_size=16)
    changed = base.differences(DatasetInfo.from_dict(d))
    assert any(x.startswith("normalisation differs") for x in changed)
    assert "image size differs (32 vs 16)" in changed and len(changed) == 2
    renamed = dict(base.to_dict(), name="cifar100")
    assert base.differences(DatasetInfo.from_dict(renamed)) == ["dataset differs (synthetic vs cifar100)"]
    remapped = dict(base.to_dict(), fine_to_coarse=[0] * 16)
    assert any("fine-to-coarse" in x for x in base.differences(DatasetInfo.from_dict(remapped)))


def test_info_rejects_inconsistent_maps():
    d = dataset_info("synthetic").to_dict()
    with pytest.raises(DataError):
        DatasetInfo.from_dict(dict(d, fine_to_coarse=[9] * 16))
    with pytest.raises(DataError):
        DatasetInfo.from_dict(dict(d, fine_to_coarse=[0] * 3))


# ------------------------------------------------------------------------------------------------------------------
# cifar100 / cifar10
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar100_reads_the_torchvision_layout(tmp_path, protocol):
    folder = write_fake_cifar100(tmp_path, protocol=protocol)
    train = load_dataset("cifar100", "train", root=tmp_path)
    _check_dataset(train, 200, 32)
    info = train.info
    assert (info.num_fine, info.num_coarse) == (100, 20)
    assert info.fine_classes[3] == "fine3" and info.coarse_classes[19] == "coarse19"
    assert list(info.fine_to_coarse) == _cifar100_mapping()
    assert info.mean == (0.5071, 0.4865, 0.4409) and info.std == (0.2673, 0.2564, 0.2762)
    raw = pickle.loads((folder / "train").read_bytes())[b"data"]
    # Rows are three 32x32 planes (R, G, B), each row-major.
    assert torch.equal(train.images[7, 1], torch.from_numpy(raw[7, 1024:2048].reshape(32, 32)))
    test = load_dataset("cifar100", "test", root=folder)  # the cifar-100-python folder itself also works
    _check_dataset(test, 100, 32)
    assert test.info == info == dataset_info("cifar100", root=tmp_path)


def test_cifar100_coarse_label_contradicting_the_map_is_a_data_error(tmp_path):
    folder = write_fake_cifar100(tmp_path)
    record = pickle.loads((folder / "test").read_bytes())
    record[b"coarse_labels"][4] = (record[b"coarse_labels"][4] + 1) % 20
    _dump(folder / "test", record)
    with pytest.raises(DataError, match="contradict"):
        load_dataset("cifar100", "test", root=tmp_path)


def test_cifar100_fine_class_with_two_coarse_classes_is_a_data_error(tmp_path):
    folder = write_fake_cifar100(tmp_path)
    record = pickle.loads((folder / "train").read_bytes())
    record[b"coarse_labels"][0] = (record[b"coarse_labels"][0] + 1) % 20
    _dump(folder / "train", record)
    with pytest.raises(DataError, match="fine0"):
        dataset_info("cifar100", root=tmp_path)


def test_cifar10_reads_batches_and_groups_vehicles(tmp_path):
    write_fake_cifar10(tmp_path)
    train = load_dataset("cifar10", "train", root=tmp_path)
    test = load_dataset("cifar10", "test", root=tmp_path / "cifar-10-batches-py")
    _check_dataset(train, 50, 32)
    _check_dataset(test, 10, 32)
    info = train.info
    assert info.fine_classes == tuple(CIFAR10_NAMES) and info.coarse_classes == ("vehicle", "animal")
    assert info.fine_to_coarse == (0, 0, 1, 1, 1, 1, 1, 1, 0, 0)
    assert info.mean == (0.4914, 0.4822, 0.4465) and test.info == info == dataset_info("cifar10", root=tmp_path)
    batch5 = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_5").read_bytes())
    assert train.fine[40:].tolist() == batch5[b"labels"]


@pytest.mark.parametrize("payload", [_SystemCall, _EvalCall])
def test_malicious_pickle_is_refused_without_running(tmp_path, payload):
    folder = write_fake_cifar100(tmp_path)
    marker = tmp_path / "pwned"
    _dump(folder / "train", {b"data": payload(marker), b"fine_labels": [], b"coarse_labels": []})
    with pytest.raises(DataError, match="refusing"):
        load_dataset("cifar100", "train", root=tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_type", "wrong_shape"])
def test_damaged_cifar_files_are_data_errors_naming_the_file(tmp_path, damage):
    folder = write_fake_cifar10(tmp_path)
    path = folder / "data_batch_3"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:500])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a pickle at all" * 10)
    elif damage == "wrong_type":
        _dump(path, [1, 2, 3])
    else:
        _dump(path, {b"data": np.zeros((10, 100), np.uint8), b"labels": [0] * 10})
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", "train", root=tmp_path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_roots_and_files_are_data_errors_naming_the_path(tmp_path):
    with pytest.raises(DataError, match="--data-root"):
        load_dataset("cifar100", "train")
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=str(missing)):
        load_dataset("cifar10", "test", root=missing)
    with pytest.raises(DataError) as err:  # an existing folder that holds something else
        dataset_info("cifar100", root=tmp_path)
    assert "cifar-100-python/train" in str(err.value) and str(tmp_path) in str(err.value)
    folder = write_fake_cifar100(tmp_path)
    (folder / "test").unlink()
    with pytest.raises(DataError, match="'test'"):
        load_dataset("cifar100", "train", root=tmp_path)
    write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        load_dataset("cifar10", "test", root=tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# imagefolder
# ------------------------------------------------------------------------------------------------------------------

TREE = {"animal": ["cat", "dog"], "vehicle": ["car"]}


def test_imagefolder_split_resize_and_labels(tmp_path):
    write_image_tree(tmp_path, TREE)
    train = load_dataset("imagefolder", "train", root=tmp_path, image_size=8)
    test = load_dataset("imagefolder", "test", root=tmp_path, image_size=8)
    _check_dataset(train, 12, 8)
    _check_dataset(test, 3, 8)
    info = train.info
    assert info.coarse_classes == ("animal", "vehicle") and info.fine_classes == ("cat", "dog", "car")
    assert info.fine_to_coarse == (0, 0, 1) and test.info == info
    assert torch.bincount(test.fine).tolist() == [1, 1, 1]  # 80/20 per class
    # Solid images stay solid after resizing; their colour identifies (class, file): the splits are disjoint
    # and together hold every image.
    colours = {tuple(img[:, 0, 0].tolist()) for ds in (train, test) for img in ds.images}
    assert colours == {_colour(f, k) for f in range(3) for k in range(5)}
    pixels = train.images.float().div(255).transpose(0, 1).reshape(3, -1)
    assert torch.allclose(torch.tensor(info.mean), pixels.mean(1), atol=1e-5)
    again = load_dataset("imagefolder", "test", root=tmp_path, image_size=8)
    assert torch.equal(again.images, test.images)
    assert dataset_info("imagefolder", root=tmp_path, image_size=8) == info


def test_imagefolder_seed_changes_the_split(tmp_path):
    write_image_tree(tmp_path, {"a": ["x"]}, per_class=20, suffix=".jpg")
    splits = {tuple(load_dataset("imagefolder", "test", root=tmp_path, seed=s).images[:, 0, 0, 0].tolist())
              for s in range(4)}
    assert len(splits) > 1


def test_imagefolder_uses_train_and_test_folders(tmp_path):
    write_image_tree(tmp_path / "train", TREE, per_class=2)
    write_image_tree(tmp_path / "test", {"animal": ["dog"]}, per_class=3)
    train = load_dataset("imagefolder", "train", root=tmp_path, image_size=8)
    test = load_dataset("imagefolder", "test", root=tmp_path, image_size=8)
    assert len(train) == 6 and len(test) == 3 and test.info == train.info
    assert test.fine.tolist() == [1, 1, 1] and test.coarse.tolist() == [0, 0, 0]


@pytest.mark.parametrize("problem", ["duplicate_fine", "corrupt_image", "empty_root", "only_train"])
def test_imagefolder_problems_are_data_errors(tmp_path, problem):
    write_image_tree(tmp_path / "data", TREE)
    root = tmp_path / "data"
    expected = str(root)
    if problem == "duplicate_fine":
        (root / "vehicle" / "cat").mkdir()
        expected = "'cat'"
    elif problem == "corrupt_image":
        (root / "animal" / "dog" / "9.png").write_bytes(b"not a png")
        expected = "9.png"
    elif problem == "empty_root":
        root = tmp_path / "empty"
        root.mkdir()
        expected = str(root)
    else:
        (root / "train").mkdir()
        expected = "'test'"
    with pytest.raises(DataError) as err:
        load_dataset("imagefolder", "test", root=root)  # reads both splits: the test one and its train statistics
    assert expected in str(err.value)
