"""Reliability: `--force` deletes only what the suite wrote, and no writer follows a symbolic link (issue 24,
items 1-3, 15). Each case fails with one line and a non-zero exit and leaves the user's files as they were."""
from __future__ import annotations

import json
import os

import pytest

from attack_helpers import copy_run
from robustness.app import cli
from robustness.core.errors import RunDirError
from robustness.core.lock import writer_lock
from robustness.core.rundir import RunDir
from robustness.app.pipeline import _check_out_dir

TINY = '[data]\nname = "synthetic"\nimage_size = 16\ntrain_limit = 64\ntest_limit = 32\n[train]\nepochs = 1\n'


def _main(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err
    return code, err


def _finished_output(out):
    """What `run` leaves in OUT: run.json, a run directory per model, the comparison."""
    (out / "dsn" / "checkpoints").mkdir(parents=True)
    (out / "dsn" / "config.json").write_text("{}")
    (out / "dsn" / "checkpoints" / "last.pt").write_bytes(b"weights")
    (out / "seed-1" / "dual" / "attacks").mkdir(parents=True)
    (out / "seed-1" / "dual" / ".lock").write_text("")  # left behind by a kill -9
    (out / "compare" / "figures").mkdir(parents=True)
    (out / "compare" / "index.html").write_text("<html>")
    (out / "run.json").write_text(json.dumps({"run": {}}))
    return out


def test_force_refuses_a_folder_the_suite_did_not_write(tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    (out / "thesis.txt").write_text("three years of work")
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    code, err = _main(["run", "--no-progress", "--config", str(config), "--out", str(out), "--force"], capsys)
    assert code != 0 and "deletes only what dsn-robust wrote" in err and "thesis.txt" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (out / "thesis.txt").read_text() == "three years of work" and sorted(os.listdir(out)) == ["thesis.txt"]


def test_force_removes_the_suites_outputs_and_refuses_when_a_foreign_file_hides_among_them(tmp_path):
    out = _finished_output(tmp_path / "out")
    (out / "dsn" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"also holds dsn"):
        _check_out_dir(out, resume=False, force=True)
    assert (out / "dsn" / "notes.txt").is_file() and (out / "run.json").is_file(), "nothing deleted"
    (out / "dsn" / "notes.txt").unlink()
    _check_out_dir(out, resume=False, force=True)
    assert out.is_dir() and list(out.iterdir()) == []


def test_force_never_deletes_through_a_symbolic_link(tmp_path, capsys):
    target = _finished_output(tmp_path / "finished")
    before = sorted(str(p.relative_to(target)) for p in target.rglob("*"))
    link = tmp_path / "link"
    link.symlink_to(target)
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    code, err = _main(["run", "--no-progress", "--config", str(config), "--out", str(link), "--force"], capsys)
    assert code != 0 and "symbolic link" in err and "unexpected" not in err and len(err.strip().splitlines()) == 1
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == before
    (target / "victim").write_text("keep")
    (target / "compare" / "elsewhere").symlink_to(target / "victim")
    with pytest.raises(RunDirError, match="elsewhere"):
        _check_out_dir(target, resume=False, force=True)
    assert (target / "victim").read_text() == "keep"


def test_the_lock_never_follows_a_symbolic_link_nor_opens_a_directory(tiny_runs, tmp_path, capsys):
    run = copy_run(tiny_runs["dsn"], tmp_path / "dsn")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run.lock.symlink_to(victim)
    code, err = _main(["attack", str(run.root), "--no-progress", "--attacks", "fgsm", "--eps", "8/255",
                       "--n", "4"], capsys)
    assert code != 0 and "symbolic link" in err and len(err.strip().splitlines()) == 1
    assert victim.read_text() == "precious" and not run.attacks.exists(), "nothing written, the victim untouched"
    run.lock.unlink()
    run.lock.mkdir()
    with pytest.raises(RunDirError, match="is a directory, not the suite's lock file"):
        with writer_lock(run.lock, "attack"):
            pass
    assert run.lock.is_dir()


def test_a_run_directory_is_recognised_only_by_what_the_suite_writes(tmp_path):
    run = RunDir.at(tmp_path / "r")
    (run.root / "checkpoints").mkdir(parents=True)
    (run.root / ".config.json.abc.tmp").write_text("")  # an atomic write's leftover
    assert run.looks_like_run() and run.foreign_entries() == []
    (run.root / "data.csv").write_text("x")
    assert not run.looks_like_run() and run.foreign_entries() == [run.root / "data.csv"]
