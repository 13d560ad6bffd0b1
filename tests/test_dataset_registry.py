"""The dataset registry: a dataset defined outside the library (here, in this test module) registers itself, is
listed, loads, describes itself and trains end to end with no library file edited; options come from the loader's
signature; registration mistakes are typed errors; registrations made here never leak into other tests."""
from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_checkpoint
from models.training import TrainConfig, read_metrics, train
from robustness.core.errors import ConfigError, DataError, UnknownNameError
from robustness.core.rundir import RunDir
from robustness.data import (
    CoarseFineDataset,
    DatasetInfo,
    dataset_info,
    dataset_options,
    list_datasets,
    load_dataset,
    register_dataset,
    unregister_dataset,
)

BUILT_INS = ["cifar10", "cifar100", "digits", "imagefolder", "synthetic"]

# ------------------------------------------------------------------------------------------------------------------
# a tiny in-memory coarse/fine dataset: colour family (coarse) x brightness (fine)
# ------------------------------------------------------------------------------------------------------------------

TINY_NAME = "test-registry-tiny-colours"
TINY_FINE = ("red/light", "red/dark", "blue/light", "blue/dark")
TINY_COARSE = ("red", "blue")


def tiny_info(n: int = 64, seed: int = 0) -> DatasetInfo:
    return DatasetInfo(TINY_NAME, TINY_FINE, TINY_COARSE, (0, 0, 1, 1), mean=(0.3, 0.1, 0.3), std=(0.3, 0.1, 0.3),
                       image_size=16)


def load_tiny(split: str, n: int = 64, seed: int = 0) -> CoarseFineDataset:
    generator = torch.Generator().manual_seed(2 * seed + (split == "test"))
    fine = torch.arange(n) % len(TINY_FINE)
    images = torch.randint(0, 40, (n, 3, 16, 16), generator=generator, dtype=torch.uint8)
    channel = torch.where(fine < 2, 0, 2)  # red or blue family
    brightness = torch.where(fine % 2 == 0, 200, 100).to(torch.uint8)  # light or dark
    images[torch.arange(n), channel] += brightness[:, None, None]
    return CoarseFineDataset(tiny_info(n, seed), images, fine, split)


@pytest.fixture
def tiny_dataset():
    """TINY_NAME registered for one test, unregistered afterwards whatever the test did."""
    register_dataset(TINY_NAME, info=tiny_info)(load_tiny)
    try:
        yield TINY_NAME
    finally:
        if TINY_NAME in list_datasets():
            unregister_dataset(TINY_NAME)


# ------------------------------------------------------------------------------------------------------------------
# a dataset from outside the library
# ------------------------------------------------------------------------------------------------------------------


def test_registered_dataset_is_listed_loads_and_describes_itself(tiny_dataset):
    assert list_datasets() == sorted(BUILT_INS + [TINY_NAME])
    assert dataset_options(TINY_NAME) == ["n", "seed"]
    train_split = load_dataset(TINY_NAME, "train", n=40)
    test_split = load_dataset(TINY_NAME, "test", n=12, seed=0)
    assert isinstance(train_split, CoarseFineDataset) and (len(train_split), len(test_split)) == (40, 12)
    assert train_split.split == "train" and train_split.images.shape == (40, 3, 16, 16)
    assert train_split.coarse.tolist() == [0, 0, 1, 1] * 10  # derived from the info's fine-to-coarse map
    assert not torch.equal(train_split.images[:12], test_split.images)
    assert dataset_info(TINY_NAME) == train_split.info == tiny_info()
    # The registry applies the same checks to a plug-in as to a built-in, before the loader runs.
    with pytest.raises(ConfigError, match=r"unknown option\(s\) colour; known options: n, seed"):
        load_dataset(TINY_NAME, "train", colour="red")
    with pytest.raises(ConfigError, match="split"):
        load_dataset(TINY_NAME, "validation")


def test_registered_dataset_trains_end_to_end(tiny_dataset, tmp_path):
    config = TrainConfig(model="dsn", model_options={"depth_n": 2, "width": 4}, dataset=TINY_NAME,
                         data_options={"n": 64}, epochs=1, batch_size=32, lr=0.05, warmup_epochs=1, ramp_epochs=0,
                         threads=1, device="cpu", seed=0)
    result = train(config, tmp_path / "run", progress=False)
    run = RunDir.at(tmp_path / "run")
    assert result.epochs == 1 and run.train_done.is_file()
    rows = read_metrics(run.metrics)
    assert [r["epoch"] for r in rows] == [1] and math.isfinite(rows[0]["loss"])
    assert run.read_config()["dataset"] == TINY_NAME
    checkpoint = load_checkpoint(run.last_checkpoint)
    assert checkpoint.dataset == tiny_info()
    model = checkpoint.build_model()
    x, _, _ = load_dataset(TINY_NAME, "test", n=8).batch(slice(None))
    with torch.no_grad():
        out = model(x)
    assert out.fine.shape == (8, len(TINY_FINE)) and out.coarse.shape == (8, len(TINY_COARSE))


def test_unregistered_dataset_is_gone():
    register_dataset(TINY_NAME, info=tiny_info)(load_tiny)
    unregister_dataset(TINY_NAME)
    assert list_datasets() == BUILT_INS
    with pytest.raises(UnknownNameError):
        load_dataset(TINY_NAME)
    with pytest.raises(UnknownNameError) as err:
        unregister_dataset(TINY_NAME)
    assert err.value.known == BUILT_INS


# ------------------------------------------------------------------------------------------------------------------
# registration rules
# ------------------------------------------------------------------------------------------------------------------


def test_a_name_cannot_be_registered_twice():
    with pytest.raises(ConfigError, match="'synthetic' is already registered"):
        register_dataset("synthetic", info=tiny_info)(load_tiny)
    assert load_dataset("synthetic", "test", n=4).info.name == "synthetic"  # the built-in is untouched


def _split_last(n: int, split: str) -> CoarseFineDataset:
    raise AssertionError("never called")


def _any_options(split: str, **options) -> CoarseFineDataset:
    raise AssertionError("never called")


@pytest.mark.parametrize("loader, needle", [(_split_last, "first parameter must be 'split'"),
                                            (_any_options, "named keyword parameters")])
def test_loader_signature_must_name_its_options(loader, needle):
    with pytest.raises(ConfigError, match=needle):
        register_dataset("test-registry-bad", info=tiny_info)(loader)
    assert "test-registry-bad" not in list_datasets()


def test_a_loader_with_a_root_gets_a_checked_path(tmp_path):
    seen: list[tuple[str, Path, int]] = []

    def folder_info(root: Path, size: int = 16) -> DatasetInfo:
        return tiny_info()

    def load_folder(split: str, root: Path, size: int = 16) -> CoarseFineDataset:
        seen.append((split, root, size))
        return load_tiny(split, n=4)

    register_dataset("test-registry-folder", info=folder_info)(load_folder)
    try:
        assert dataset_options("test-registry-folder") == ["size"]
        with pytest.raises(DataError, match="--data-root"):
            load_dataset("test-registry-folder", "train")
        with pytest.raises(DataError, match="does not exist"):
            dataset_info("test-registry-folder", root=tmp_path / "missing")
        assert len(load_dataset("test-registry-folder", "test", root=str(tmp_path), size=8)) == 4
        assert seen == [("test", tmp_path, 8)]  # a Path, never the string it was given
    finally:
        unregister_dataset("test-registry-folder")


def test_built_in_options_are_their_loaders_keyword_parameters():
    assert dataset_options("synthetic") == ["n", "image_size", "seed", "n_coarse", "fine_per_coarse"]
    assert dataset_options("imagefolder") == ["image_size", "seed", "test_fraction"]
    assert dataset_options("cifar100") == dataset_options("cifar10") == []
    with pytest.raises(UnknownNameError):
        dataset_options("imagenet")


def test_registry_is_a_leaf_inside_data():
    # The registry may import only the shared base of robustness.data (and the ground floor): datasets register
    # themselves with it, never the other way round.
    tree = ast.parse((Path(__file__).resolve().parents[1] / "robustness/data/registry.py").read_text())
    project = ("robustness", "models", "attacks", "reports")
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    ours = {m for m in imported if m.split(".")[0] in project}
    assert ours and all(m == "robustness.data.base" or m.startswith("robustness.core") for m in ours), ours


def test_the_datasets_listing_names_each_datasets_options_and_whether_it_reads_a_local_copy(tiny_dataset, capsys):
    from robustness.app import cli
    from robustness.data.registry import dataset_needs_root

    assert [dataset_needs_root(n) for n in BUILT_INS] == [True, True, False, True, False]
    assert cli.main(["datasets"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert set(lines) == set(BUILT_INS) | {tiny_dataset}  # the registry's, a plug-in's included
    assert lines[tiny_dataset] == "n, seed" and lines["synthetic"].split(", ") == dataset_options("synthetic")
    assert lines["cifar100"] == "no options (reads a local copy: --data-root)"
    with pytest.raises(UnknownNameError):
        dataset_needs_root("not-a-dataset")
