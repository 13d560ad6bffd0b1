"""One writer per run, records that cannot mix: the writer lock, fingerprints, `attack --resume` with the stored
settings, corrupt shards and unwritable run directories (each a one-line error)."""
from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from attacks.records import read_records, shard_fingerprint
from attacks.runner import AttackConfig, run_attacks
from models.checkpoint import load_checkpoint, save_checkpoint
from attacks.runner.config import EXECUTION_KEYS
from robustness.app.commands.attack import config_from_args, register
from robustness.core.config import default_config_path
from robustness.core.errors import RunDirError
from robustness.core.rundir import RunDir
from robustness.app.pipeline import PipelineConfig
from robustness.results import load_run
from attack_helpers import copy_run

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
TINY = dict(attacks=["pgd"], backends="torchattacks", eps=["4/255"], gate_grads=["none"], target="coarse", n=8,
            batch_size=4, steps=2, seed=2, threads=1)
CLI_TINY = ["--attacks", "fgsm", "--backend", "torchattacks", "--eps", "4/255", "--gate-grad", "none", "--target",
            "coarse", "--n", "8", "--batch-size", "4", "--seed", "2", "--threads", "1", "--no-progress"]


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    import robustness.app.cli as cli
    code = cli.main(argv)
    return code, capsys.readouterr().err.strip()


def _wait_for(path: Path, proc: subprocess.Popen, what: str) -> None:
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"{what} ended early: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)


def test_two_attacking_processes_one_succeeds_and_records_come_from_one_setting(tiny_runs, tmp_path, capsys):
    run = copy_run(tiny_runs["dual"], tmp_path / "dual")
    started, go = tmp_path / "started", tmp_path / "go"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from attacks.runner import AttackConfig, run_attacks
        def hold(path):  # the first shard is written: keep the run busy until the test says go
            Path({str(started)!r}).touch()
            while not Path({str(go)!r}).exists():
                time.sleep(0.05)
        run_attacks({str(run.root)!r}, AttackConfig(**{TINY!r}), progress=False, on_shard=hold)
    """)], cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(started, holder, "the first attack")
        # the second attacker is this process: the holder's lock is the other process's either way
        code, err = _cli(["attack", str(run.root), *CLI_TINY, "--seed", "5"], capsys)
        before = sorted(p.name for p in run.records.rglob("*.parquet"))
    finally:
        go.touch()
        assert holder.wait(timeout=240) == 0, holder.stderr.read()
    assert code != 0 and "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert f"being written by another process (pid {holder.pid}, attack" in err
    assert before == ["shard-00000.parquet"]  # the refused writer added nothing
    records = read_records(run.records)
    assert len(records) == 8 and set(records["seed"]) == {2}
    prints = [shard_fingerprint(p) for p in run.records.rglob("*.parquet")]
    assert len(prints) == 2 and prints[0] == prints[1] and prints[0]["config"]["steps"] == 2
    assert not run.lock.exists()


def test_a_killed_holders_lock_is_taken_over(tmp_path):
    run = RunDir.at(tmp_path / "run")
    run.root.mkdir()
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from robustness.core.rundir import RunDir
        with RunDir.at({str(run.root)!r}).writing("train"):
            Path({str(ready)!r}).touch()
            time.sleep(600)
    """)], cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(ready, holder, "the lock holder")
        with pytest.raises(RunDirError, match=rf"being written by another process \(pid {holder.pid}, train"):
            with run.writing("attack"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert run.lock.exists()  # a kill -9 leaves the file; the kernel has dropped the lock itself
    with run.writing("attack"):
        assert json.loads(run.lock.read_text())["pid"] == os.getpid()
    assert not run.lock.exists() and run.root.is_dir()


def test_resume_refuses_changed_settings_and_a_retrained_checkpoint(tiny_runs, tmp_path):
    run = copy_run(tiny_runs["dsn"], tmp_path / "dsn")
    first = run_attacks(run.root, AttackConfig(**TINY), progress=False)
    assert first.manifest["fingerprint"]["checkpoint_sha256"] and first.manifest["fingerprint"]["n"] == 8
    with pytest.raises(RunDirError, match=r"pgd\.steps=2, this run asks for pgd\.steps=3; .*--force"):
        run_attacks(run.root, AttackConfig(**dict(TINY, steps=3)), resume=True, progress=False)
    # a shard of another setting (what a second writer without the lock would leave) is refused, not mixed in
    shard = next(run.records.rglob("shard-00001.parquet"))
    other = copy_run(tiny_runs["dsn"], tmp_path / "other")
    run_attacks(other.root, AttackConfig(**dict(TINY, steps=3)), progress=False)
    saved = shard.read_bytes()
    shard.write_bytes(next(other.records.rglob("shard-00001.parquet")).read_bytes())
    with pytest.raises(RunDirError, match=r"shard .*shard-00001.parquet was made with pgd\.steps=3"):
        run_attacks(run.root, AttackConfig(**TINY), resume=True, progress=False)
    with pytest.raises(RunDirError, match="mixed records"):
        load_run(run.root)
    shard.write_bytes(saved)
    # retrained since the records (what `train --force` does): resume and report both refuse
    ckpt = load_checkpoint(run.best_checkpoint)
    model = ckpt.build_model("cpu")
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    save_checkpoint(run.best_checkpoint, model, ckpt.dataset, metrics=ckpt.metrics)
    with pytest.raises(RunDirError, match=r"checkpoint changed since these records \(sha256 [0-9a-f]{12}… -> "):
        run_attacks(run.root, AttackConfig(**TINY), resume=True, progress=False)
    with pytest.raises(RunDirError, match="checkpoint changed since these records.*--force"):
        load_run(run.root)
    fresh = run_attacks(run.root, AttackConfig(**TINY), force=True, progress=False)
    assert fresh.manifest["fingerprint"]["checkpoint_sha256"] != first.manifest["fingerprint"]["checkpoint_sha256"]
    assert len(load_run(run.root).records) == 8


def test_attack_resume_reuses_the_stored_settings_and_refuses_other_flags(tiny_runs, tmp_path, capsys):
    run = copy_run(tiny_runs["dual"], tmp_path / "dual")
    code, err = _cli(["attack", str(run.root), *CLI_TINY], capsys)
    assert code == 0, err
    before = read_records(run.records)
    missing = next(run.records.rglob("shard-00001.parquet"))
    missing.unlink()
    code, err = _cli(["attack", str(run.root), "--resume", "--no-progress"], capsys)  # no attack flags at all
    assert code == 0, err
    assert missing.is_file()
    key = ["attack", "eps", "sample"]
    pd.testing.assert_frame_equal(read_records(run.records).sort_values(key).reset_index(drop=True),
                                  before.sort_values(key).reset_index(drop=True))
    code, err = _cli(["attack", str(run.root), "--resume", "--seed", "3", "--n", "6", "--no-progress"], capsys)
    assert code != 0 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "seed 2 -> 3" in err and "n 8 -> 6" in err and "--force" in err
    code, err = _cli(["attack", str(run.root), "--resume", "--threads", "2", "--no-progress"], capsys)
    assert code == 0, err  # how the machine runs it may change
    code, err = _cli(["attack", str(run.root), "--resume", "--attacks", "fgsm,pgd", "--set", "pgd.steps=2",
                      "--set", "pgd.restarts=1", "--no-progress"], capsys)
    assert code == 0, err  # an attack that has not run may be added, with its own parameters
    after = read_records(run.records)
    assert set(after["attack"]) == {"fgsm", "pgd"}
    pd.testing.assert_frame_equal(after[after["attack"] == "fgsm"].sort_values(key).reset_index(drop=True),
                                  before.sort_values(key).reset_index(drop=True))
    code, err = _cli(["attack", str(run.root), "--resume", "--set", "pgd.steps=3", "--no-progress"], capsys)
    assert code != 0 and "pgd.steps 2 -> 3" in err  # once it has run, its parameters are the records' own


def test_a_corrupt_shard_is_one_line_naming_the_file(tiny_runs, tmp_path, capsys):
    run = copy_run(tiny_runs["dual"], tmp_path / "dual")
    assert _cli(["attack", str(run.root), *CLI_TINY], capsys)[0] == 0
    shard = next(run.records.rglob("shard-00000.parquet"))
    shard.write_bytes(shard.read_bytes()[:50])
    for argv in (["attack", str(run.root), "--resume", "--no-progress"], ["report", str(run.root)]):
        code, err = _cli(argv, capsys)
        assert code != 0 and len(err.splitlines()) == 1 and "Traceback" not in err
        assert f"attack shard {shard} is unreadable" in err and "delete it" in err and "--force" in err
    shard.unlink()  # the fix the line gives
    assert _cli(["attack", str(run.root), "--resume", "--no-progress"], capsys)[0] == 0
    assert len(read_records(run.records)) == 8


def test_attack_on_an_unwritable_run_is_one_line(tiny_runs, tmp_path, capsys, monkeypatch):
    run = copy_run(tiny_runs["dual"], tmp_path / "dual")
    real_open = os.open

    def read_only(path, flags, *args):  # a read-only file system (chmod does not stop root, who runs CI here)
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    code, err = _cli(["attack", str(run.root), *CLI_TINY], capsys)
    assert code != 0 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"cannot write {run.root}: read-only file system" in err
    assert not run.attacks.exists()


def test_attack_defaults_are_those_of_run():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    attack = config_from_args(parser.parse_args(["attack", "RUN"])).to_dict()
    pipeline = PipelineConfig.from_file(default_config_path()).attack.to_dict()
    assert {k: v for k, v in attack.items() if k not in EXECUTION_KEYS} == \
        {k: v for k, v in pipeline.items() if k not in EXECUTION_KEYS}
    assert attack["device"] == "auto" and attack["workers"] == 1  # the machine's own, not the quickstart's
