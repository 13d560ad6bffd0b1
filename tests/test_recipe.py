"""`dsn-robust bench recipe` (robustness.bench.recipe): a config's final accuracy per training seed, against targets.

The rows come from each run's metrics.csv as training wrote it; the command trains through the pipeline's own
training stage, so what it prints is what `dsn-robust run` would train.
"""
from __future__ import annotations

import json
import math
import tomllib

import pytest

from models.training.metrics import metrics_csv
from robustness.bench.recipe import RecipeTargets, format_recipe, recipe_payload, recipe_row
from robustness.app.cli import main
from robustness.app.commands.run import seed_list
from robustness.core.errors import ConfigError
from robustness.app.pipeline import RunPlan
from test_pipeline import shrunken_quickstart, write_toml


def _metrics(folder, rows):
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text(metrics_csv(rows))
    return folder


def test_the_row_is_the_last_epoch_and_misses_name_each_target(tmp_path):
    run = _metrics(tmp_path / "dsn", [
        {"epoch": 1, "test_acc_fine": 0.97, "test_acc_coarse": 0.99, "gated_macs_saved": 0.5, "seconds": 30.0},
        {"epoch": 2, "test_acc_fine": 0.88, "test_acc_coarse": 0.96, "gated_macs_saved": 0.25, "seconds": 30.0}])
    row = recipe_row("dsn", 4, run, gated=True)
    assert (row.epochs, row.fine, row.coarse, row.gated_saved) == (2, 0.88, 0.96, 0.25)
    assert row.minutes == pytest.approx(1.0)
    assert row.misses(RecipeTargets()) == ["fine 88.0% < 90%", "gated MACs saved 25.0% < 30%"]
    assert row.misses(RecipeTargets(fine=0.8, gated_saved=0.2)) == []
    static = recipe_row("dual", 4, run, gated=False)
    assert static.misses(RecipeTargets(fine=0.8)) == [], "a static twin saves nothing and is not asked to"


def test_a_run_without_a_test_accuracy_misses_rather_than_passes(tmp_path):
    run = _metrics(tmp_path / "dual", [{"epoch": 1, "loss": 2.0, "seconds": 1.0}])
    row = recipe_row("dual", 0, run, gated=False)
    assert math.isnan(row.fine) and row.misses(RecipeTargets()) == ["fine nan% < 90%"]


def test_the_table_names_each_models_worst_seed_and_the_payload_says_whether_all_passed(tmp_path):
    rows = [recipe_row("dsn", s, _metrics(tmp_path / f"dsn{s}", [{"epoch": 5, "test_acc_fine": f,
                                                                  "test_acc_coarse": 0.99,
                                                                  "gated_macs_saved": 0.4}]), gated=True)
            for s, f in ((0, 0.95), (1, 0.91))]
    text = format_recipe(rows, RecipeTargets())
    assert "dsn: worst seed fine 91.0%" in text and "over seeds 0,1; meets the targets" in text
    assert recipe_payload(rows, RecipeTargets())["passed"]
    assert not recipe_payload(rows, RecipeTargets(fine=0.93))["passed"]


def test_seed_lists_and_run_seeds_are_checked():
    assert seed_list("0-4") == [0, 1, 2, 3, 4] and seed_list("0,3-5") == [0, 3, 4, 5]
    for bad in ("", "a", "1,1", "-1", "3-1"):
        with pytest.raises(Exception):
            seed_list(bad)
    for seeds in ([1, 1], [-2], [True], [2 ** 70]):
        with pytest.raises(ConfigError):
            RunPlan(models=["dsn"], transfer=[], seeds=seeds)
    assert RunPlan(models=["dsn"], transfer=[], seeds=[2, 7]).training_seeds(0) == [2, 7]
    assert RunPlan(models=["dsn"], transfer=[]).training_seeds(3) == [3]


def test_bench_recipe_trains_every_model_per_seed_and_exits_1_on_a_miss(tmp_path, capsys):
    tables = tomllib.loads(shrunken_quickstart(tmp_path).read_text())
    tables["run"].update({"models": ["dsn", "dual"], "transfer": [], "workers": 1})
    tables["train"].update({"epochs": 1})
    config = write_toml(tmp_path / "tiny.toml", tables)
    out = tmp_path / "recipe"
    code = main(["bench", "recipe", "--config", str(config), "--seeds", "0,1", "--out", str(out),
                 "--min-fine", "1.0", "--json-only"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 1 and not payload["passed"], "one epoch of a tiny model is no perfect classifier"
    assert [(r["model"], r["seed"]) for r in payload["runs"]] == [("dsn", 0), ("dual", 0), ("dsn", 1), ("dual", 1)]
    assert all(r["epochs"] == 1 and 0.0 <= r["fine"] <= 1.0 for r in payload["runs"])
    assert [r["gated"] for r in payload["runs"]] == [True, False, True, False]
    assert (out / "seed-1" / "dual" / "metrics.csv").is_file(), "--out keeps the runs"
    assert main(["bench", "recipe", "--config", str(config), "--min-fine", "1.5"]) == 2
    assert "--min-fine must be a fraction" in capsys.readouterr().err
