"""The Python API (robustness.app.api): the CLI's records, numbers, report and verdict, reached from Python."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import robustness
from attacks.records import EVAL_KEYS
from attacks.runner import load_run_checkpoint
from robustness import Results, compare, evaluate, load_run
from robustness.app import cli
from robustness.app.api import attack_config
from robustness.app.commands.attack import config_from_args
from robustness.core.errors import ConfigError, DataError, UnknownNameError
from robustness.core.vocab import format_eps
from robustness.data import load_dataset
from robustness.data.base import NO_COARSE_LABEL
from attack_helpers import copy_run, skipping_dsn
from conftest import TINY_DATA

REPO = Path(__file__).resolve().parents[1]
#: one small attack setting, as evaluate() keywords and as `dsn-robust attack` flags
API = dict(attacks="fgsm,pgd", backends="torchattacks", eps="0.5/255,2/255", gate_grads="none,bpda", n=16,
           batch_size=16, steps=2, params={"pgd": {"restarts": 1}}, seed=5, device="cpu", progress=False)
FLAGS = ["--attacks", "fgsm,pgd", "--backend", "torchattacks", "--eps", "0.5/255,2/255", "--gate-grad", "none,bpda",
         "--n", "16", "--batch-size", "16", "--steps", "2", "--restarts", "1", "--seed", "5", "--device", "cpu",
         "--no-progress"]
#: what a run directory alone decides in a record
RUN_SPECIFIC = ["run"]
KEYS = [k for k in EVAL_KEYS if k not in RUN_SPECIFIC]


def _cli(*argv: str) -> None:
    assert cli.main(list(argv)) == 0


def _attacked(run, root: Path, name: str):
    """A copy of ``run`` attacked by the CLI with FLAGS."""
    copy = skipping_dsn(run, root / name) if name == "dsn" else copy_run(run, root / name)
    _cli("attack", str(copy.root), *FLAGS)
    return copy


@pytest.fixture(scope="module")
def dsn_cli(tiny_runs, tmp_path_factory):
    return _attacked(tiny_runs["dsn"], tmp_path_factory.mktemp("api"), "dsn")


@pytest.fixture(scope="module")
def resnet_cli(tiny_runs, tmp_path_factory):
    return _attacked(tiny_runs["resnet"], tmp_path_factory.mktemp("api"), "resnet")


def _frame(records: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    """``records`` in one order, without the run-specific columns (or with ``columns`` only)."""
    df = records.sort_values([*KEYS, "sample"]).reset_index(drop=True)
    return df.drop(columns=RUN_SPECIFIC) if columns is None else df[columns]


def _attacked_images(run, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The test images the CLI attacked in ``run`` (its manifest's subset), in sample order, then ``extra`` others."""
    chosen = load_run(run.root).manifest["subset"]["indices"]
    others = [i for i in range(len(chosen) + extra) if i not in set(chosen)][:extra]
    return load_dataset("synthetic", "test", **TINY_DATA).batch(torch.tensor(chosen + others))


# -- the CLI's records ------------------------------------------------------------------------------------------


def test_evaluate_on_the_tiny_dsn_gives_the_cli_records(dsn_cli, tmp_path):
    model = load_run_checkpoint(dsn_cli).build_model().train()
    res = evaluate(model, "synthetic", data_options=TINY_DATA, out=tmp_path / "api", **API)
    cli_records = load_run(dsn_cli.root).records
    assert res.records["gate_grad"].nunique() == 2  # a gated model: both routing gradients ran
    pd.testing.assert_frame_equal(_frame(res.records), _frame(cli_records))
    # the caller's model comes back as it was handed over
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert res.run_dir == tmp_path / "api" and res.manifest["checkpoint"] == ""
    assert res.manifest["subset"] == load_run(dsn_cli.root).manifest["subset"]  # the same images, recorded
    assert res.manifest["subset"]["rule"] == "stratified"


def test_tensors_and_a_dataloader_give_the_records_of_the_dataset(dsn_cli, tmp_path):
    model = load_run_checkpoint(dsn_cli).build_model()
    x, fine, coarse = _attacked_images(dsn_cli, extra=4)  # more than n: the first n are attacked, as given
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, fine, coarse), batch_size=5)
    records = load_run(dsn_cli.root).records
    # one evaluation of the CLI run's (records of an evaluation do not depend on what else ran)
    columns = ["sample", *KEYS, "label_fine", "label_coarse", "adv_pred_fine", "adv_pred_coarse", "adv_path", "linf"]
    expected = _frame(records[(records["attack"] == "pgd") & (records["gate_grad"] == "bpda")], columns)
    for i, data in enumerate([(x, fine, coarse), loader]):
        res = evaluate(model, data, out=tmp_path / str(i), **{**API, "attacks": "pgd", "gate_grads": "bpda"})
        pd.testing.assert_frame_equal(_frame(res.records, columns), expected)
        assert res.manifest["dataset"]["name"] == "tensors"
        assert res.manifest["subset"]["rule"] == "given" and res.manifest["subset"]["indices"] == list(range(16))


def test_a_plain_classifier_gives_the_static_models_fine_head_records(resnet_cli, tmp_path, monkeypatch):
    class Plain(nn.Module):  # what a user brings: [0, 1] images -> logits, nothing of the suite
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x).fine

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    x, fine, _ = _attacked_images(resnet_cli)
    res = evaluate(Plain(load_run_checkpoint(resnet_cli).build_model()), (x, fine), name="plain", **API)
    assert res.run_dir.parent == tmp_path and str(res.run_dir) in repr(res)  # out=None: a temp dir, and it says so
    columns = ["sample", "attack", "norm", "eps", "gate_grad", "label_fine", "clean_pred_fine", "adv_pred_fine",
               "clean_correct", "adv_correct", "success", "robust", "linf", "l2"]
    cli_records = load_run(resnet_cli.root).records
    pd.testing.assert_frame_equal(_frame(res.records, columns), _frame(cli_records, columns))
    assert set(res.records["model"]) == {"plain"}
    # single-head data: no coarse class is invented
    assert (res.records["label_coarse"] == NO_COARSE_LABEL).all() and res.manifest["dataset"]["coarse_classes"] == []


def test_eps_auto_runs_both_phases_as_the_cli_does(tiny_runs, tmp_path):
    run = copy_run(tiny_runs["resnet"], tmp_path / "cli")
    _cli("attack", str(run.root), *FLAGS, "--eps", "auto", "--attacks", "fgsm,fmn", "--backend", "torchattacks,foolbox",
         "--set", "fmn.steps=10")
    auto = {**API, "eps": "auto", "attacks": "fgsm,fmn", "backends": "torchattacks,foolbox",
            "params": {**API["params"], "fmn": {"steps": 10}}}
    res = evaluate(load_run_checkpoint(run).build_model(), "synthetic", data_options=TINY_DATA,
                   out=tmp_path / "api", **auto)
    fixed = res.records[res.records["attack"] == "fgsm"]
    assert fixed["eps"].nunique() > 1  # phase 2 ran FGSM at the grid phase 1's distances placed
    pd.testing.assert_frame_equal(_frame(res.records), _frame(load_run(run.root).records))


# -- Results: the report's numbers ------------------------------------------------------------------------------


def test_results_accuracy_is_the_records_worst_case(dsn_cli):
    res = load_run(dsn_cli.root)
    df = res.records
    deployed = df[(df["gate_mode"] == "hard") & (df["target"] == "fine")]
    assert res.clean_accuracy.estimate == deployed.groupby("sample")["clean_correct"].all().mean()
    assert set(res.robust_accuracy["eps"]) == set(deployed["eps"])
    for _, row in res.robust_accuracy.iterrows():
        at = deployed[(deployed["eps"] == row["eps"]) & (deployed["norm"] == row["norm"])]
        robust = at.groupby("sample")["robust"].all()  # robust only if no attack and no routing gradient fooled it
        assert row["estimate"] == robust.mean() and row["n"] == len(robust)
        assert row["low"] <= row["estimate"] <= row["high"]
        line = next(t for t in repr(res).splitlines() if t.split()[:3] == ["robust", row["norm"],
                                                                         format_eps(row["eps"])])
        assert line.split()[3] == f"{100 * row['estimate']:.1f}%"
    assert res.masking in {"pass", "warn", "skip"} and {c.name for c in res.checks}


def test_write_report_writes_what_the_report_command_writes(dsn_cli, tmp_path):
    index = load_run(dsn_cli.root).write_report(tmp_path / "api", n_boot=50)
    _cli("report", str(dsn_cli.root), "--out", str(tmp_path / "cli"), "--bootstrap", "50")
    files = {p.relative_to(tmp_path / "cli") for p in (tmp_path / "cli").rglob("*") if p.is_file()}
    assert index == tmp_path / "api" / "index.html"
    assert {p.relative_to(tmp_path / "api") for p in (tmp_path / "api").rglob("*") if p.is_file()} == files
    for name in ("summary.json", "summary.csv", "report.md", "index.html"):
        assert (tmp_path / "api" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name


def test_compare_gives_the_compare_commands_verdict(dsn_cli, resnet_cli, tmp_path, capsys):
    comparison = compare(load_run(dsn_cli.root), resnet_cli.root, n_boot=50, out=tmp_path / "api")
    capsys.readouterr()
    _cli("compare", str(dsn_cli.root), str(resnet_cli.root), "--out", str(tmp_path / "cli"), "--bootstrap", "50")
    printed = capsys.readouterr().out.splitlines()
    assert comparison.verdict and printed[-1] == comparison.answer and len(comparison.answer) <= 200
    assert (tmp_path / "api" / "index.html").read_bytes() == (tmp_path / "cli" / "index.html").read_bytes()


# -- inputs ----------------------------------------------------------------------------------------------------


def _linear() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))


@pytest.mark.parametrize("data, options, error, words", [
    ("cifar1000", {}, UnknownNameError, "unknown dataset 'cifar1000'"),
    ((torch.rand(6, 3, 8, 8), torch.zeros(5, dtype=torch.long)), {}, DataError, "one label per image"),
    ((2 * torch.rand(6, 3, 8, 8), torch.zeros(6, dtype=torch.long)), {}, DataError, "must lie in [0, 1]"),
    ((torch.rand(6, 3, 8, 8), torch.full((6,), 4)), {}, DataError, "outside the model's classes 0..3"),
    ((torch.rand(6, 3, 8, 8), torch.zeros(6, dtype=torch.long)), {"epsilon": 0.1}, ConfigError,
     "unknown option(s) epsilon"),
    ((torch.rand(6, 3, 8, 8), torch.zeros(6, dtype=torch.long)), {"attacks": "fgsm,pgdd"}, UnknownNameError,
     "unknown attack 'pgdd'"),
    ((torch.rand(6, 3, 8, 8), torch.zeros(6, dtype=torch.long)), {"target": "coarse", "eps": "1/255"}, ConfigError,
     "target coarse needs a model with a coarse head"),
    ((torch.rand(6, 3, 8, 8), torch.zeros(6, dtype=torch.long)), {"subset": "first"}, ConfigError,
     "tensors, a DataLoader or a torch Dataset are attacked as given"),
    ("synthetic", {"subset": "random"}, UnknownNameError, "unknown subset rule 'random'"),
])
def test_bad_inputs_are_one_typed_error_before_anything_is_written(data, options, error, words, tmp_path):
    with pytest.raises(error) as info:
        evaluate(_linear(), data, out=tmp_path / "out", progress=False, **options)
    assert words in str(info.value) and len(str(info.value).splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_options_are_read_as_the_attack_command_reads_its_flags():
    def from_flags(*flags: str) -> dict:
        return config_from_args(cli.build_parser().parse_args(["attack", "RUN_DIR", *flags])).to_dict()

    assert attack_config().to_dict() == from_flags()
    assert attack_config(n=16, params={"pgd": {"restarts": 2, "random_start": False}}).to_dict() == from_flags(
        "--n", "16", "--restarts", "2", "--set", "pgd.random_start=false")


def test_the_package_import_stays_light_and_knows_its_version():
    code = ("import sys, robustness; heavy = [m for m in ('torch', 'pandas', 'robustness.app.api') if m in sys.modules];"
            " print(heavy, robustness.__version__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", importlib.metadata.version("dsn-robustness")]
    assert robustness.Results is Results
