"""Runs grow: a finished run takes new budgets and new attacks by --resume, its old records untouched."""
from __future__ import annotations

import hashlib

import pytest

from attacks.records import EVAL_KEYS, read_records
from attacks.runner import AttackConfig, run_attacks
from robustness.app import cli
from attack_helpers import copy_run, skipping_dsn

BASE = dict(gate_grads=["none"], target="fine", n=24, batch_size=12, seed=2, backends=["native", "torchattacks"],
            params={"pgd": {"steps": 3, "restarts": 1}, "apgd-ce": {"steps": 5}})


@pytest.fixture(scope="module")
def gated(tiny_runs, tmp_path_factory):
    return skipping_dsn(tiny_runs["dsn"], tmp_path_factory.mktemp("growth") / "dsn")


def _hashes(run) -> dict[str, str]:
    return {str(p.relative_to(run.root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.records.rglob("*.parquet"))}


def test_a_finished_run_gains_a_budget_and_an_attack_with_its_records_untouched(gated, tmp_path, caplog):
    run = copy_run(gated, tmp_path / "dsn")
    first = run_attacks(run.root, AttackConfig(attacks=["fgsm", "pgd"], eps=["1/255", "4/255"], **BASE),
                        progress=False)
    before = _hashes(run)
    grown = AttackConfig(attacks=["fgsm", "pgd", "apgd-ce"], eps=["1/255", "4/255", "12/255"], **BASE)
    result = run_attacks(run.root, grown, resume=True, progress=False)
    after = _hashes(run)
    assert {k: after[k] for k in before} == before, "the old shards are bit for bit what they were"
    new = sorted({k.split("/")[2] for k in after if k not in before})
    assert [d.split("__")[0] for d in new] == ["apgd-ce", "fgsm", "pgd"]
    assert all("__eps-" in d for d in new if not d.startswith("apgd"))
    records = result.records
    assert not records.duplicated(EVAL_KEYS + ["sample"]).any()
    for attack in ("fgsm", "pgd", "apgd-ce"):
        eps = set(records.loc[records["attack"] == attack, "eps"].round(8))
        assert eps == {round(1 / 255, 8), round(4 / 255, 8), round(12 / 255, 8)}, attack
    old = first.records.sort_values(EVAL_KEYS + ["sample"]).reset_index(drop=True)
    kept = records[records["eps"] < 5 / 255].sort_values(EVAL_KEYS + ["sample"]).reset_index(drop=True)
    assert kept[kept["attack"] != "apgd-ce"].reset_index(drop=True).equals(old)
    # the grown budget's cascade: pgd at 12/255 follows fgsm at 12/255
    entries = {e["id"]: e for e in result.manifest["evaluations"]}
    pgd_new = next(e for i, e in entries.items() if i.startswith("pgd__") and "__eps-" in i)
    assert [entries[i]["eps"] for i in pgd_new["after"]] == [[12 / 255]]
    # the worst case covers the new budget, and a second resume adds nothing
    worst = read_records(run.records)
    assert len(worst) == len(records)
    again = run_attacks(run.root, grown, resume=True, progress=False)
    assert _hashes(run) == after and len(again.records) == len(records)


def test_attack_resume_with_a_new_eps_is_accepted_from_the_command_line(gated, tmp_path, capsys):
    run = copy_run(gated, tmp_path / "dsn")
    args = ["attack", str(run.root), "--attacks", "fgsm", "--backend", "torchattacks", "--gate-grad", "none",
            "--n", "12", "--batch-size", "12", "--eps", "2/255", "--device", "cpu"]
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main([*args[:-4], "--eps", "2/255,6/255", "--device", "cpu", "--resume"]) == 0
    records = read_records(run.records)
    assert sorted(set(records["eps"].round(8))) == [round(2 / 255, 8), round(6 / 255, 8)]
