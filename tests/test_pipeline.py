"""`dsn-robust run` end to end on a shrunken copy of configs/synthetic-full.toml (every attack, three models); the
quickstart and the paper-scale config are checked for what they promise."""
from __future__ import annotations

import dataclasses
import json
import shutil
import tomllib
from pathlib import Path
from typing import Callable

import pandas as pd
import numpy as np
import pytest
import torch

from attacks.records import read_records
from robustness.app import cli, eps_grid, pipeline
from robustness.app.pipeline import PipelineConfig
from robustness.findings.headline import run_headline
from robustness.results import RunResults
from test_analysis import make_records
from test_data import write_fake_cifar100

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.toml"
FULL = REPO / "configs" / "synthetic-full.toml"
CIFAR100 = REPO / "configs" / "cifar100.toml"

#: what shrinks the full synthetic job to seconds (two eps, one L2 budget); everything else (attack list, gate gradients,
#: transfer) stays
SHRINK = {
    "data": {"n": 400, "image_size": 16, "test_limit": 48},
    "model": {"depth_n": 2, "width": 4},
    "train": {"epochs": 2, "warmup_epochs": 1, "ramp_epochs": 1, "batch_size": 64},
    "attack": {"n": 16, "batch_size": 8, "steps": 2, "eot_samples": 2, "cw_eps": [0.5], "workers": 1,
               "gate_grads": ["none", "bpda"],
               "pgd": {"steps": 2, "restarts": 1}, "apgd": {"steps": 2}, "ddn": {"steps": 5}, "fmn": {"steps": 5},
               "pgd-bisect": {"search_steps": 1},
               "square": {"queries": 10}, "path": {"steps": 2}, "slowdown": {"steps": 2}},
}


def write_toml(path: Path, tables: dict) -> Path:
    lines = []

    def table(name: str, values: dict) -> None:
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items() if not isinstance(value, dict))
        for key, value in values.items():
            if isinstance(value, dict):
                table(f'{name}."{key}"', value)

    for name, values in tables.items():
        table(name, values)
    path.write_text("\n".join(lines) + "\n")
    return path


def _merge(base: dict, changes: dict) -> None:
    for key, value in changes.items():
        if isinstance(value, dict):
            _merge(base.setdefault(key, {}), value)
        else:
            base[key] = value


def shrunken_quickstart(folder: Path) -> Path:
    """configs/synthetic-full.toml (the quickstart's models under every attack) cut down to seconds."""
    tables = tomllib.loads(FULL.read_text())
    _merge(tables, SHRINK)
    return write_toml(folder / "tiny.toml", tables)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(["run", "--no-progress", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_quickstart_config_describes_the_main_job():
    config = PipelineConfig.from_file(QUICKSTART)
    assert config.plan.models == ["dsn", "dual"], "skipping against the same weights open and the static twin"
    assert config.plan.open_mode
    assert {"fgsm", "pgd", "fmn"} <= set(config.attack.attacks)
    assert {"none", "sharp"} <= set(config.attack.gate_grads), "naive and strongest routing gradient"
    assert config.attack.eps_auto, "the grid lands where the models differ"
    assert config.attack.n >= 97, "Wilson intervals at most +-10 points"
    assert config.train.dataset == "digits" and config.plan.transfer, "real images built in, a transfer control"
    assert config.attack.subset == "stratified", "a class-balanced attacked subset, not the first n images"


def test_full_synthetic_config_runs_every_attack_of_the_suite():
    full, quick = PipelineConfig.from_file(FULL), PipelineConfig.from_file(QUICKSTART)
    assert full.plan.models == ["dsn", "dual", "resnet"]
    assert {"fgsm", "pgd", "apgd", "fmn", "pgd-bisect", "ddn", "square", "path", "slowdown"} <= set(full.attack.attacks)
    assert {"none", "ste", "bpda", "sharp"} <= set(full.attack.gate_grads)
    assert full.train.dataset == "synthetic", "the generated data keeps a config of its own"
    assert full.attack.eps_auto and full.attack.n == quick.attack.n


def test_seeds_config_is_the_quickstart_over_three_training_seeds():
    seeds, quick = PipelineConfig.from_file(REPO / "configs" / "seeds.toml"), PipelineConfig.from_file(QUICKSTART)
    assert seeds.plan.seeds == [0, 1, 2]
    assert seeds.train.to_dict() == quick.train.to_dict() and seeds.attack.to_dict() == quick.attack.to_dict()
    assert dataclasses.replace(seeds.plan, seeds=[]) == quick.plan


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One shrunken quickstart run: (config path, output dir, stdout)."""
    folder = tmp_path_factory.mktemp("pipeline")
    config = shrunken_quickstart(folder)
    code = cli.main(["run", "--no-progress", "--config", str(config), "--out", str(folder / "out")])
    assert code == 0
    return config, folder / "out"


def test_run_writes_every_report_and_the_comparison(finished, capsys):
    config, out = finished
    for model in ("dsn", "dual", "resnet"):
        assert (out / model / "train.done").is_file()
        assert (out / model / "report" / "index.html").is_file()
        summary = json.loads((out / model / "report" / "summary.json").read_text())
        assert summary["sanity"], "sanity verdicts are part of every report"
    verdict = json.loads((out / "compare" / "compare.json").read_text())["verdict"]
    assert "median distance ratio" in verdict and "clean" in verdict, "the eps-free verdict, clean accuracy beside"
    grids = {name: json.loads((out / name / "attacks" / "manifest.json").read_text())["config"]["eps"]
             for name in ("dsn", "dual", "resnet")}
    assert len({tuple(g) for g in grids.values()}) == 1 and all(0 < e < 1 for e in grids["dsn"]), \
        "eps auto: one grid, chosen from the minimal distances, for every model"
    dsn = read_records(out / "dsn" / "attacks" / "records")
    assert set(dsn["gate_mode"]) == {"hard", "open"}, "the dsn is also attacked in open mode"
    assert {"none", "bpda"} <= set(dsn["gate_grad"]), "the config's routing gradients (shrunk to two here)"
    assert {"path", "slowdown", "square", "ddn", "fmn", "pgd-bisect", "fgsm", "pgd", "apgd-ce",
            "apgd-dlr"} <= set(dsn["attack"])
    assert np.isinf(dsn.loc[dsn["attack"] == "ddn", "eps"]).any(), "the minimal attack's unbounded row"
    manifest = json.loads((out / "dsn" / "attacks" / "manifest.json").read_text())
    assert set(manifest["surrogate_fidelity"]) == {"hard/none", "hard/bpda"}
    assert all(e["convergence"] is not None for e in manifest["evaluations"] if e["attack"] == "ddn")
    assert {"dual", "resnet"} == set(dsn.loc[dsn["source_run"] != "", "source_run"]), "transfer pairs into dsn"
    resolved = json.loads((out / "run.json").read_text())
    assert resolved["train"]["epochs"] == 2 and "versions" in resolved


def test_headline_counts_path_but_not_slowdown():
    records = pd.concat([make_records(10, attack="pgd", success=pd.Series(range(10)) < 4),
                         make_records(10, attack="path", success=pd.Series(range(10)) < 6),
                         make_records(10, attack="slowdown", success=True)], ignore_index=True)
    run = RunResults(Path("nowhere"), "dsn", records, {"full_macs": 6e6, "path_names": ["a", "b", "c", "d"]})
    head = pipeline._summary("dsn", run_headline(run, []), Path("nowhere/report/index.html"))
    assert head.robust == pytest.approx({8 / 255: 0.4})   # the worst case over pgd and path; slowdown not counted
    assert head.clean_acc == 1.0 and head.compute_saved == pytest.approx(0.0)


def _trained_like(reference: Path) -> Callable[..., None]:
    """A stand-in for ``pipeline._train_all`` that copies ``reference``'s trained models (checkpoints, config,
    metrics, marker) instead of training them again: the same weights, as
    test_models_trained_side_by_side_equal_those_trained_one_after_another shows a rerun of the training gives."""
    def copy(job: PipelineConfig, runs: dict[str, tuple[str, int, Path]], progress: bool) -> None:
        for name, _, run_dir in runs.values():
            shutil.copytree(reference / name, run_dir, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("attacks", "report", ".lock"))
    return copy


class _AttackStageDone(Exception):
    """Stops a resumed pipeline once its attack stage is over (what a test of the records alone needs)."""


def test_interrupted_run_resumes_to_the_same_records(finished, tmp_path, capsys, monkeypatch):
    config, reference = finished
    out = tmp_path / "out"
    real = eps_grid.run_attacks
    real_train = pipeline._train_all
    monkeypatch.setattr(pipeline, "_train_all", _trained_like(reference))  # the attack stage is what is cut here
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # eps auto: the three minimal-distance phases and the dsn done, during the dual
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(eps_grid, "run_attacks", interrupted)
    code, _, err = run_cli(["--config", str(config), "--out", str(out)], capsys)
    assert code == 130 and "--resume" in err and calls["n"] == 5
    assert not (out / "compare").exists()
    monkeypatch.setattr(eps_grid, "run_attacks", real)
    monkeypatch.setattr(pipeline, "_train_all", real_train)  # the resume finds every model trained
    # the rest in two attack workers started once for the whole stage (pipeline._attack_all): each rank takes its
    # batches of every evaluation, and the records are those of the one-process reference
    tables = tomllib.loads(Path(config).read_text())
    tables["attack"]["workers"] = 2
    two = write_toml(tmp_path / "two-workers.toml", tables)

    def attack_stage_done(*args, **kwargs):
        raise _AttackStageDone  # where the pipeline loads the runs for their reports: the records are complete

    monkeypatch.setattr(pipeline, "load_run", attack_stage_done)  # reports and comparison: the other tests' subject
    with pytest.raises(_AttackStageDone):
        pipeline.run_pipeline(PipelineConfig.from_file(two), out, resume=True, progress=False)
    assert not list(tmp_path.rglob("*.lock")), "the stop released every lock"
    for model in ("dsn", "dual", "resnet"):
        keys = ["attack", "backend", "eps", "gate_mode", "gate_grad", "source_run", "sample"]
        got = read_records(out / model / "attacks" / "records").drop(columns="run").sort_values(keys)
        want = read_records(reference / model / "attacks" / "records").drop(columns="run").sort_values(keys)
        pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))


def test_seeds_train_and_attack_every_model_per_seed_on_the_same_images_and_pool_the_verdict(tmp_path, capsys):
    tables = tomllib.loads(shrunken_quickstart(tmp_path).read_text())
    tables["run"].update({"models": ["dsn", "dual"], "transfer": ["dual->dsn"], "seeds": [3, 5], "workers": 1})
    tables["attack"].update({"attacks": ["fmn", "fgsm"], "gate_grads": ["none"], "n": 12, "batch_size": 12})
    config = write_toml(tmp_path / "seeds.toml", tables)
    out = tmp_path / "out"
    code, stdout, _ = run_cli(["--config", str(config), "--out", str(out)], capsys)
    assert code == 0
    manifests = {(s, m): json.loads((out / f"seed-{s}" / m / "attacks" / "manifest.json").read_text())
                 for s in (3, 5) for m in ("dsn", "dual")}
    assert {json.loads((out / f"seed-{s}" / "dsn" / "config.json").read_text())["seed"] for s in (3, 5)} == {3, 5}
    assert len({m["fingerprint"]["checkpoint_sha256"] for m in manifests.values()}) == 4, "four trained models"
    assert len({m["subset"]["sha256"] for m in manifests.values()}) == 1, "the same images for every model and seed"
    assert len({tuple(m["config"]["eps"]) for m in manifests.values()}) == 1, "one eps grid for every seed"
    transfer = read_records(out / "seed-5" / "dsn" / "attacks" / "records")
    assert set(transfer.loc[transfer["source_run"] != "", "source_run"]) == {"dual"}, "transfer within a seed"
    pooled = json.loads((out / "compare" / "compare.json").read_text())
    assert pooled["kind"] == "seeds" and sorted(pooled["per_seed"]) == ["3", "5"]
    assert "2 training seeds" in pooled["verdict"] and "one training seed" not in pooled["verdict"]
    assert stdout.rstrip().endswith(f"Is skipping more robust here? {pooled['answer']}")
    assert "(2 training seeds)" in pooled["answer"] or len(pooled["answer"]) > 180
    assert "dsn/seed-3" in stdout and "dual/seed-5" in stdout


def test_cifar100_config_trains_on_a_fake_miniature_copy(tmp_path, capsys):
    write_fake_cifar100(tmp_path / "data", n_train=100, n_test=100)  # one image per fine class at least
    tables = tomllib.loads(CIFAR100.read_text())
    assert tables["model"]["depth_n"] == 18 and tables["train"]["epochs"] == 200
    out = tmp_path / "c100"
    code = cli.main(["train", "--no-progress", "--config", str(CIFAR100), "--data-root", str(tmp_path / "data"),
                     "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--out", str(out)])
    assert code == 0
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["dataset"] == "cifar100" and resolved["model_options"]["depth_n"] == 18
    assert (out / "checkpoints" / "last.pt").is_file()
    metrics = pd.read_csv(out / "metrics.csv")
    assert len(metrics) == 1 and 0.0 <= metrics["test_acc_fine"].iloc[0] <= 1.0


def test_models_trained_side_by_side_equal_those_trained_one_after_another(finished, tmp_path):
    """The finished run trained its models with ``[run] workers = 2`` in spawned processes; each run is seeded by
    its own config, so the weights are those of the sequential job (here, in this process), tensor for tensor."""
    config_path, out = finished
    config = PipelineConfig.from_file(config_path)
    assert config.plan.workers == 2 and len(config.plan.models) == 3, "the finished run trained side by side"
    job = dataclasses.replace(config, plan=dataclasses.replace(config.plan, workers=1))
    pipeline._train_all(job, {m: (m, job.train.seed, tmp_path / m) for m in job.plan.models}, progress=False)
    for model in job.plan.models:
        one = torch.load(tmp_path / model / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
        two = torch.load(out / model / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
        assert one.keys() == two.keys()
        assert all(torch.equal(one[k], two[k]) for k in one), model


def test_a_rerun_refuses_without_resume_and_a_resume_with_a_new_budget_adds_only_it_loading_each_run_once(
        finished, tmp_path, capsys, monkeypatch):
    """One resume of a copy of the finished run: a plain rerun is refused; ``--resume`` with a new budget keeps every
    old shard bit for bit, adds the budget to every model (nothing else: no record of the old budgets is
    duplicated), loads each run once for its report and comparison, and prints the short answer once."""
    import hashlib

    config, done = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)

    def hashes() -> dict[str, str]:
        return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.glob("*/attacks/records/*/*.parquet"))}

    models = ("dsn", "dual", "resnet")
    before = hashes()
    counts = {m: len(read_records(out / m / "attacks" / "records")) for m in models}
    code, _, err = run_cli(["--config", str(config), "--out", str(out)], capsys)
    assert code != 0 and "already holds results" in err and "--resume" in err and "Traceback" not in err
    assert hashes() == before
    loads, reported = [], []
    real_load, real_report = pipeline.load_run, pipeline.write_report
    monkeypatch.setattr(pipeline, "load_run", lambda d, *a, **k: loads.append(Path(d)) or real_load(d, *a, **k))
    monkeypatch.setattr(pipeline, "write_report", lambda r, *a, **k: reported.append(r) or real_report(r, *a, **k))
    code, stdout, stderr = run_cli(["--config", str(config), "--out", str(out), "--resume", "--set",
                                    "attack.eps=[0.1]", "--set", 'attack.attacks=["fgsm"]'], capsys)
    assert code == 0, stderr
    after = hashes()
    assert {k: after[k] for k in before} == before  # bit for bit
    added = sorted({Path(k).parts[0] for k in after if k not in before})
    assert added == list(models)  # every model gained the budget
    for model in added:
        records = read_records(out / model / "attacks" / "records")
        new = records[records["eps"] == 0.1]
        assert set(new.loc[new["source_run"] == "", "attack"]) == {"fgsm"}  # transfer: the run's transfer attack
        assert len(records) - len(new) == counts[model], "the old budgets' records, each once"
        assert not records.duplicated(["attack", "backend", "norm", "eps", "gate_mode", "gate_grad", "target",
                                       "source_run", "sample"]).any()
    assert sorted(loads) == sorted(out / m for m in models)
    assert [type(r) for r in reported] == [RunResults] * 3 and [r.path for r in reported] == loads
    assert "Is skipping more robust here?" in stdout and str(out / "compare" / "index.html") in stdout
    saved = json.loads((out / "compare" / "compare.json").read_text())
    assert stdout.rstrip().endswith(f"Is skipping more robust here? {saved['answer']}")
    assert 0 < len(saved["answer"]) <= 200
    # printed once: the long form stays in the files, on neither stream
    assert saved["verdict"] not in stdout and saved["verdict"] not in stderr and stdout.count(saved["answer"]) == 1
