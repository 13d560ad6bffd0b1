"""Switching datasets on the command line: ``--set data.name=OTHER`` drops the old dataset's ``[data]`` options
(``robustness.core.config.switch_dataset``), keeps the dataset-independent keys and the ``data.*`` given beside it;
``configs/cifar10.toml`` parses and validates without its files."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from models.training import TrainConfig
from robustness.app import cli
from robustness.core.config import DATA_TABLE_KEYS, apply_overrides, load_config_file
from robustness.core.errors import ConfigError
from robustness.data import dataset_info, dataset_options, list_datasets, load_dataset
from robustness.app.pipeline import PipelineConfig
from test_data import write_fake_cifar10

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.toml"
CIFAR10 = REPO / "configs" / "cifar10.toml"
CIFAR100 = REPO / "configs" / "cifar100.toml"
LOGGER = "robustness.core.config"


def _switch_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and "dropped" in r.getMessage()]


def test_quickstart_switched_to_synthetic_holds_no_digits_option_and_validates(caplog):
    assert load_config_file(QUICKSTART)["data"]["name"] == "digits"  # the default config's dataset
    with caplog.at_level(logging.INFO, logger=LOGGER):
        config = PipelineConfig.from_file(QUICKSTART, overrides=["data.name=synthetic"])
    assert config.train.dataset == "synthetic"
    assert config.train.data_options == {}
    digits_only = set(dataset_options("digits")) - set(dataset_options("synthetic"))
    assert digits_only == {"test_fraction"} and not digits_only & set(config.train.data_options)
    config.check_machine()  # the dataset's options (registry), the devices, every model built on the meta device
    info = dataset_info(config.train.dataset, config.train.data_root, **config.train.data_options)
    assert info.name == "synthetic"
    lines = _switch_lines(caplog)
    assert len(lines) == 1
    assert "image_size, seed, test_fraction" in lines[0] and "digits" in lines[0] and "synthetic" in lines[0]


def test_switched_dataset_is_constructed_with_the_options_set_beside_the_name():
    config = PipelineConfig.from_file(QUICKSTART, overrides=["data.name=synthetic", "data.n=64",
                                                             "data.image_size=20", "data.test_limit=16"])
    assert config.train.data_options == {"n": 64, "image_size": 20}
    assert config.train.test_limit == 16
    dataset = load_dataset(config.train.dataset, "test", config.train.data_root, **config.train.data_options)
    assert tuple(dataset.images.shape[-2:]) == (20, 20) and len(dataset) > 0


def test_a_data_option_set_before_the_name_is_kept_too(caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        tables = apply_overrides(load_config_file(QUICKSTART), ["data.image_size=24", "data.name=synthetic"])
    assert tables["data"] == {"name": "synthetic", "image_size": 24}
    assert "seed, test_fraction" in _switch_lines(caplog)[0] and "image_size" not in _switch_lines(caplog)[0]


def test_dataset_independent_keys_survive_the_switch_and_the_file_tables_are_untouched():
    original = {"data": {"name": "digits", "root": "r", "train_limit": 7, "test_limit": 5, "image_size": 8,
                         "seed": 3}, "train": {"epochs": 2}}
    tables = apply_overrides(original, ["data.name=synthetic"])
    assert tables == {"data": {"name": "synthetic", "root": "r", "train_limit": 7, "test_limit": 5},
                      "train": {"epochs": 2}}
    assert original["data"]["image_size"] == 8 and original["data"]["name"] == "digits"


@pytest.mark.parametrize("settings", [["data.name=digits"], ["data.image_size=8"], ["train.epochs=1"],
                                      ["data.name=cifar10", "data.name=digits"]])
def test_no_switch_no_drop(settings, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        tables = apply_overrides(load_config_file(QUICKSTART), settings)
    assert tables["data"]["name"] == "digits" and {"seed", "test_fraction"} <= set(tables["data"])
    assert not _switch_lines(caplog)


def test_a_table_without_a_name_is_left_for_the_registry_to_judge():
    tables = apply_overrides({"data": {"n": 64}}, ["data.name=digits"])
    assert tables["data"] == {"n": 64, "name": "digits"}
    with pytest.raises(ConfigError, match=r"digits: unknown option\(s\) n; known options: image_size"):
        PipelineConfig.from_file(None, overrides=["data.n=64", "data.name=digits"]).check_machine()


def test_generic_keys_are_the_ones_train_config_reads_itself():
    """DATA_TABLE_KEYS mirrors TrainConfig.from_tables: none of them becomes a dataset option."""
    values = {"root": "somewhere", "train_limit": 3, "test_limit": 2}
    assert set(DATA_TABLE_KEYS) == {"name", *values}
    config = TrainConfig.from_tables({"data": {"name": "synthetic", **values}})
    assert config.data_options == {} and config.data_root == "somewhere"
    assert (config.train_limit, config.test_limit) == (3, 2)
    assert not any(set(DATA_TABLE_KEYS) & set(dataset_options(name)) for name in list_datasets())


def test_an_unknown_option_of_the_new_dataset_is_one_config_error_naming_it():
    config = PipelineConfig.from_file(QUICKSTART, overrides=["data.name=synthetic", "data.test_fraction=0.5"])
    with pytest.raises(ConfigError) as err:
        config.check_machine()
    message = str(err.value)
    assert "\n" not in message and "unknown option(s) test_fraction" in message
    assert "known options: " + ", ".join(dataset_options("synthetic")) in message


@pytest.mark.parametrize("extra, expected", [
    ([], "cifar10: no data root given"),  # the digits options are gone: what is left is the missing data
    (["--set", "data.seed=1"], "cifar10: unknown option(s) seed; known options: none"),
])
def test_run_switched_to_cifar10_on_the_command_line(tmp_path, capsys, extra, expected):
    out = tmp_path / "out"
    code = cli.main(["run", "--out", str(out), "--set", "data.name=cifar10", *extra])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "image_size" not in err.split("error:")[-1]
    assert not out.exists()


def test_unset_removes_a_key_and_names_the_held_ones_when_missing():
    original = load_config_file(QUICKSTART)
    tables = apply_overrides(original, [], unset=["data.test_fraction", "attack.pgd.max_steps"])
    assert "test_fraction" not in tables["data"] and "max_steps" not in tables["attack"]["pgd"]
    assert "test_fraction" in original["data"] and "max_steps" in original["attack"]["pgd"]
    with pytest.raises(ConfigError, match=r"--unset 'data.nope'.*no data.nope \(keys there: image_size, name, "
                                          r"seed, test_fraction\)"):
        apply_overrides(original, [], unset=["data.nope"])
    for bad in ("data", "data.x=1", "foo.x"):
        with pytest.raises(ConfigError, match="--unset"):
            apply_overrides(original, [], unset=[bad])


def test_cifar10_config_parses_names_cifar10_and_validates_without_files():
    tables = load_config_file(CIFAR10)  # the loader `dsn-robust run --config` uses
    assert tables["data"]["name"] == "cifar10" and "cifar10" in list_datasets()
    config = PipelineConfig.from_file(CIFAR10)  # no data needed to build and validate the config
    assert config.train.dataset == "cifar10" and config.train.data_options == {}
    assert config.train.data_root == "data"
    cifar100 = load_config_file(CIFAR100)  # the same recipe; only the dataset differs
    assert {k: v for k, v in tables.items() if k != "data"} == {k: v for k, v in cifar100.items() if k != "data"}
    assert {k: v for k, v in tables["data"].items() if k != "name"} == \
        {k: v for k, v in cifar100["data"].items() if k != "name"}


def test_cifar10_config_checks_out_on_a_fake_copy(tmp_path):
    write_fake_cifar10(tmp_path / "data")
    config = PipelineConfig.from_file(CIFAR10, data_root=str(tmp_path / "data"), device="cpu")
    config.check_machine()  # reads batches.meta only, builds the ResNet-110-sized models on the meta device
    info = dataset_info("cifar10", config.train.data_root)
    assert info.coarse_classes == ("vehicle", "animal") and info.num_fine == 10


def test_cifar100_config_switched_to_cifar10_keeps_its_root():
    config = PipelineConfig.from_file(CIFAR100, overrides=["data.name=cifar10"])
    assert config.train.dataset == "cifar10" and config.train.data_root == "data"


def test_run_unset_on_the_command_line_drops_a_key_and_refuses_one_not_there(tmp_path, capsys):
    out = tmp_path / "out"
    # without image_size the digits dataset takes its own default; the run stops only at the seed check below
    code = cli.main(["run", "--out", str(out), "--unset", "data.nope"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "data.nope" in err and not out.exists()
    config = PipelineConfig.from_file(QUICKSTART, unset=["data.image_size"])
    assert "image_size" not in config.train.data_options
