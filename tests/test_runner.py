"""The runner: config validation, resume, refusal to overwrite, manifest, worst case, CLI errors, torchrun."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from attacks.records import EVAL_KEYS, read_records
from attacks.runner import AttackConfig, run_attacks
from robustness.core.errors import ConfigError, RunDirError, UnknownNameError
from robustness.core.vocab import parse_eps
from attack_helpers import copy_run, skipping_dsn

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(attacks=["fgsm", "pgd"], backends="torchattacks", eps=["1/255", "4/255"], gate_grads=["none", "bpda"],
             target="coarse", n=48, batch_size=16, steps=3, seed=3)
N_EVALS, N_BATCHES = 4, 3  # three batches: two ranks take uneven shares



def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(EVAL_KEYS + ["sample"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(tiny_runs, tmp_path_factory):
    """An uninterrupted single-process run of SMALL on the gated tiny DSN (one thread, as the torchrun workers)."""
    run = skipping_dsn(tiny_runs["dsn"], tmp_path_factory.mktemp("ref") / "dsn")
    return run, run_attacks(run.root, AttackConfig(**SMALL), progress=False)


# -- configuration ---------------------------------------------------------------------------------------------


def test_config_parses_and_validates():
    c = AttackConfig(attacks="fgsm,apgd", eps="0,1/255,0.03", backends="both", gate_grads="none,eot")
    assert c.eps == [0.0, 1 / 255, 0.03]
    assert c.expanded_attacks() == ["fgsm", "apgd-ce", "apgd-dlr"]
    assert c.backends == ["torchattacks", "foolbox"] and c.gate_grads == ["none", "eot"]
    assert parse_eps("8/255") == 8 / 255 and parse_eps(" 0.5 ") == 0.5
    with pytest.raises(ConfigError, match="outside \\[0, 1\\].*8/255"):
        AttackConfig(eps="8")
    with pytest.raises(ConfigError, match="negative"):
        AttackConfig(eps="-0.1")
    with pytest.raises(ConfigError, match="cannot read eps"):
        AttackConfig(eps="8/x")
    with pytest.raises(UnknownNameError, match="unknown attack 'pgdd'; choose one of: apgd, apgd-ce"):
        AttackConfig(attacks="pgdd")
    for bad in (dict(backends="cleverhans"), dict(gate_modes="soft"), dict(gate_grads="reinforce"),
                dict(target="medium"), dict(norm="l1")):
        with pytest.raises(UnknownNameError):
            AttackConfig(**bad)
    for bad in (dict(n=0), dict(batch_size=-1), dict(steps=0), dict(params={"cw": {"initial_c": 0.0}}), dict(seed=-1)):
        with pytest.raises(ConfigError):
            AttackConfig(**bad)
    # L2 budgets may exceed 1 (a norm over all pixels), Linf ones may not
    assert AttackConfig(norm="l2", eps=[0.5, 2.0]).eps == [0.5, 2.0]


# -- resume, refusal, force --------------------------------------------------------------------------------------


def test_resume_after_interruption_gives_identical_records(reference, tiny_runs, tmp_path):
    ref_run, ref = reference
    run = copy_run(ref_run, tmp_path / "dsn")
    shutil.rmtree(run.attacks)
    written = []

    def interrupt(path: Path) -> None:
        written.append(path)
        if len(written) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_attacks(run.root, AttackConfig(**SMALL), progress=False, on_shard=interrupt)
    assert len(list(run.records.rglob("*.parquet"))) == 3
    manifest = json.loads(run.manifest.read_text())
    assert not any(e["complete"] for e in manifest["evaluations"])
    with pytest.raises(RunDirError, match="already holds attack records; pass --resume"):
        run_attacks(run.root, AttackConfig(**SMALL), progress=False)
    before = {p: p.stat().st_mtime_ns for p in written}
    resumed = []
    result = run_attacks(run.root, AttackConfig(**SMALL), resume=True, progress=False, on_shard=resumed.append)
    assert len(resumed) == N_EVALS * N_BATCHES - 3  # only the missing shards were attacked
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    got, want = _sorted(result.records), _sorted(ref.records)
    assert len(got) == len(want) == N_EVALS * 2 * SMALL["n"]
    assert not got.duplicated(EVAL_KEYS + ["sample"]).any()
    pd.testing.assert_frame_equal(got, want)
    assert all(e["complete"] for e in result.manifest["evaluations"])


def test_resume_refuses_different_settings_and_force_replaces(reference, tmp_path):
    ref_run, _ = reference
    run = copy_run(ref_run, tmp_path / "dsn")
    with pytest.raises(RunDirError, match="seed=3, this run asks for seed=4"):
        run_attacks(run.root, AttackConfig(**dict(SMALL, seed=4)), resume=True, progress=False)
    with pytest.raises(RunDirError, match="was run with pgd.steps=3, this run asks for pgd.steps=4"):
        run_attacks(run.root, AttackConfig(**dict(SMALL, steps=4)), resume=True, progress=False)
    # fewer budgets than the records hold: they are all there already (new ones would be added: tests/test_growth)
    shards = sorted(run.records.rglob("*.parquet"))
    run_attacks(run.root, AttackConfig(**dict(SMALL, eps=["1/255"])), resume=True, progress=False)
    assert sorted(run.records.rglob("*.parquet")) == shards
    result = run_attacks(run.root, AttackConfig(**dict(SMALL, attacks=["fgsm"], eps=["1/255"], seed=4)),
                         force=True, progress=False)
    assert set(result.records["attack"]) == {"fgsm"} and set(result.records["eps"]) == {1 / 255}
    ids = ["fgsm__torchattacks__linf__hard__none__coarse", "fgsm__torchattacks__linf__hard__bpda__coarse"]
    assert [e["id"] for e in result.manifest["evaluations"]] == ids and result.manifest["seed"] == 4
    assert sorted(p.name for p in run.records.iterdir()) == sorted(ids)  # the old pgd records are gone


def test_manifest_and_worst_case(reference):
    run, result = reference
    m = json.loads(run.manifest.read_text())
    assert m == result.manifest
    assert m["schema"] == "dsn-robustness/attacks/v1" and m["run"] == "dsn" and m["model"] == "dsn"
    assert m["n"] == 48 and m["seed"] == 3 and m["batch_size"] == 16 and m["n_batches"] == N_BATCHES
    assert m["dataset"]["name"] == "synthetic" and m["path_names"] == ["coarse.s2.b1", "coarse.s3.b1",
                                                                       "fine.s2.b1", "fine.s3.b1"]
    assert m["full_macs"] > 0 and set(m["versions"]) >= {"torch", "torchattacks", "foolbox"}
    assert m["zero_grad_share"] == {"hard/none": 0.0, "hard/bpda": 0.0}
    ids = sorted(e["id"] for e in m["evaluations"])
    assert ids == [f"{a}__torchattacks__linf__hard__{g}__coarse" for a in ("fgsm", "pgd") for g in ("bpda", "none")]
    pgd = next(e for e in m["evaluations"] if e["attack"] == "pgd")
    assert pgd["eps"] == [1 / 255, 4 / 255] and pgd["config"]["steps"] == 3 and pgd["complete"]
    assert pgd["source_run"] == "" and pgd["target"] == "coarse" and pgd["config"]["random_start"] is True
    assert sorted(p.name for p in (run.records / pgd["id"]).iterdir()) == [f"shard-{b:05d}.parquet"
                                                                          for b in range(N_BATCHES)]
    worst = read_records(run.attacks / "worst_case.parquet")
    assert len(worst) == 2 * SMALL["n"] and set(worst["attack"]) == {"worst"}
    df = result.records
    for eps in (1 / 255, 4 / 255):
        at = df[df["eps"] == eps]
        per_sample = at.groupby("sample")["adv_correct"].all()
        worst_acc = worst.loc[worst["eps"] == eps, "adv_correct"].mean()
        assert worst_acc == per_sample.mean() <= at.groupby(["attack", "gate_grad"])["adv_correct"].mean().min()
        # the worst-case row of a sample fooled by any attack is a fooled row
        fooled = set(per_sample.index[~per_sample])
        assert set(worst.loc[(worst["eps"] == eps) & ~worst["adv_correct"], "sample"]) == fooled


def test_static_model_collapses_routing_gradients(tiny_runs, tmp_path):
    run = copy_run(tiny_runs["resnet"], tmp_path / "resnet")
    config = AttackConfig(attacks=["fgsm"], backends="torchattacks", eps=["4/255"], gate_grads="none,bpda,eot",
                          gate_modes="hard,open", n=32, batch_size=32)
    result = run_attacks(run.root, config, progress=False)
    df = result.records
    assert set(df["gate_grad"]) == {"none"} and set(df["gate_mode"]) == {"hard", "open"}
    assert (df["clean_path"] == "").all() and (df["hamming"] == 0).all()
    assert (df["frozen_pred_fine"] == df["adv_pred_fine"]).all()
    # a static model does the same in hard and open mode
    hard, opened = (df[df["gate_mode"] == m].sort_values("sample").reset_index(drop=True) for m in ("hard", "open"))
    assert (hard["adv_pred_fine"] == opened["adv_pred_fine"]).all()


# -- CLI ------------------------------------------------------------------------------------------------------


def _cli(argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    import robustness.app.cli as cli
    present = tuple(c for c in cli.COMMANDS if importlib.util.find_spec(f"robustness.app.commands.{c}") is not None)
    monkeypatch.setattr(cli, "COMMANDS", present)
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("extra, message", [
    (["--attacks", "fgsm,pgdd"], "unknown attack 'pgdd'; choose one of"),
    (["--eps", "8"], "eps 8 is outside [0, 1]"),
    (["--gate-mode", "sideways"], "unknown gate mode 'sideways'"),
    (["--backend", "cleverhans"], "unknown backend 'cleverhans'"),
])
def test_cli_rejects_bad_flags_in_one_line(extra, message, tiny_runs, monkeypatch, capsys):
    code, out, err = _cli(["attack", str(tiny_runs["dual"].root), "--no-progress", *extra], monkeypatch, capsys)
    assert code != 0 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_errors_for_missing_checkpoint_and_existing_records(tiny_runs, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "untrained"
    empty.mkdir()
    code, _, err = _cli(["attack", str(empty), "--no-progress"], monkeypatch, capsys)
    assert code != 0 and "has no checkpoint" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1

    run = copy_run(tiny_runs["dual"], tmp_path / "dual")
    argv = ["attack", str(run.root), "--attacks", "fgsm", "--backend", "torchattacks", "--eps", "0,4/255",
            "--n", "32", "--batch-size", "32", "--no-progress"]
    code, out, err = _cli(argv, monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err
    assert "clean accuracy" in out and "fgsm" in out and "worst case" in out
    clean = read_records(run.records)
    acc0 = clean.loc[clean["eps"] == 0, "clean_correct"].mean()
    assert f"clean accuracy {100 * acc0:.1f}%" in out
    code, _, err = _cli(argv, monkeypatch, capsys)
    assert code != 0 and "already holds attack records; pass --resume" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = _cli(argv + ["--resume"], monkeypatch, capsys)
    assert code == 0 and len(read_records(run.records)) == len(clean)


def test_cli_config_file_supplies_defaults(tiny_runs, tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "attack.toml"
    cfg.write_text(textwrap.dedent("""
        [attack]
        attacks = ["fgsm"]
        backends = ["foolbox"]
        eps = ["1/255", "3/255"]
        n = 16
        batch_size = 16
    """))
    run = copy_run(tiny_runs["resnet"], tmp_path / "resnet")
    code, out, err = _cli(["attack", str(run.root), "--config", str(cfg), "--eps", "2/255", "--no-progress"],
                          monkeypatch, capsys)
    assert code == 0, err
    df = read_records(run.records)
    assert set(df["backend"]) == {"foolbox"} and set(df["eps"]) == {2 / 255} and len(df) == 16
    bad = tmp_path / "bad.toml"
    bad.write_text("[attack]\nepsilon = 3\n")
    code, _, err = _cli(["attack", str(run.root), "--config", str(bad)], monkeypatch, capsys)
    assert code != 0 and "unknown option(s) epsilon" in err and "Traceback" not in err


# -- torchrun ---------------------------------------------------------------------------------------------------


def test_workers_spawned_by_the_runner_match_one_process(reference, tmp_path):
    """``workers=2``: the runner spawns the two ranks itself (no torchrun) and the records are those of one
    process; the returned result is read back from the run directory."""
    ref_run, ref = reference
    run = copy_run(ref_run, tmp_path / "dsn")
    shutil.rmtree(run.attacks)
    result = run_attacks(run.root, AttackConfig(**SMALL, workers=2, threads=1), progress=False)
    assert len(list(run.records.rglob("*.parquet"))) == N_EVALS * N_BATCHES
    pd.testing.assert_frame_equal(_sorted(result.records), _sorted(ref.records))
    assert all(e["complete"] for e in result.manifest["evaluations"])


def test_torchrun_two_processes_match_one(reference, tiny_runs, tmp_path):
    ref_run, ref = reference
    run = copy_run(ref_run, tmp_path / "dsn")
    shutil.rmtree(run.attacks)
    script = tmp_path / "attack_ddp.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from attacks.runner import AttackConfig, run_attacks
        run_attacks(sys.argv[1], AttackConfig(**{SMALL!r}), progress=False)
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(run.root)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = sorted(p.relative_to(run.records).as_posix() for p in run.records.rglob("*.parquet"))
    assert len(shards) == N_EVALS * N_BATCHES
    got, want = _sorted(read_records(run.records)), _sorted(ref.records)
    pd.testing.assert_frame_equal(got, want)
    manifest = json.loads(run.manifest.read_text())
    assert all(e["complete"] for e in manifest["evaluations"])
    pd.testing.assert_frame_equal(_sorted(read_records(run.attacks / "worst_case.parquet")),
                                  _sorted(read_records(ref_run.attacks / "worst_case.parquet")))
