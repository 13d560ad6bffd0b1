"""Partial records are never reported as complete: a missing or short shard and an interrupted attack make the
headline (page, report.md, summary.json) say INCOMPLETE with the counts, `report` warn on stderr and `report
--strict` exit 2; a report during an attack is refused by the run's writer lock wherever --out points; a refused
`run --resume` leaves OUT/run.json as it was."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest

from attacks.records import read_records, shard_fingerprint, write_shard
from attacks.runner import AttackConfig, run_attacks
from reports.run_page import write_report
from robustness.app import cli
from robustness.core.errors import RunDirError
from robustness.core.rundir import RunDir
from robustness.results import load_run
from attack_helpers import copy_run
from test_pipeline import FULL, SHRINK, _merge, write_toml

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
N, BATCH = 16, 2  # 8 shards of one cheap evaluation
SETTINGS = dict(attacks=["fgsm"], backends="torchattacks", eps=["4/255"], gate_grads=["none"], target="fine", n=N,
                batch_size=BATCH, seed=2, threads=1)
CLI_SETTINGS = ["--attacks", "fgsm", "--backend", "torchattacks", "--eps", "4/255", "--gate-grad", "none",
                "--target", "fine", "--n", str(N), "--batch-size", str(BATCH), "--seed", "2", "--threads", "1",
                "--no-progress", "-q"]
EVALUATION = "fgsm__torchattacks__linf__hard__none__fine"


@pytest.fixture(scope="module")
def attacked(tiny_runs, tmp_path_factory) -> RunDir:
    """A copy of the tiny resnet run attacked completely: one FGSM evaluation over 8 batches (read-only: copy it)."""
    run = copy_run(tiny_runs["resnet"], tmp_path_factory.mktemp("partial") / "resnet")
    assert cli.main(["attack", str(run.root), *CLI_SETTINGS]) == 0
    assert [e["id"] for e in run.read_manifest()["evaluations"]] == [EVALUATION]
    assert len(list(run.records.rglob("*.parquet"))) == N // BATCH
    return run


def _report(run: RunDir, capsys, *extra: str) -> tuple[int, str, str]:
    code = cli.main(["report", str(run.root), "--bootstrap", "20", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def _headline_of(report_dir: Path) -> dict:
    return json.loads((report_dir / "summary.json").read_text())["headline"]


def test_a_complete_run_is_complete_and_reported_without_a_warning(attacked, tmp_path, capsys):
    loaded = load_run(attacked.root)
    assert loaded.complete and loaded.missing_shards == 0 and loaded.shortfalls == () and loaded.incomplete_line == ""
    code, _, err = _report(attacked, capsys, "--out", str(tmp_path / "rep"), "--strict")
    assert code == 0 and err == ""
    head = _headline_of(tmp_path / "rep")
    assert head["complete"] is True and head["incomplete"] == "" and head["missing_shards"] == 0
    assert head["nonfinite"] == 0  # no sample with non-finite logits (0 also for records without the column)
    page = (tmp_path / "rep" / "index.html").read_text()
    assert 'id="incomplete"' not in page and "INCOMPLETE" not in page


def test_a_missing_shard_makes_the_headline_say_incomplete_and_strict_exit_2(attacked, tmp_path, capsys):
    run = copy_run(attacked, tmp_path / "resnet")
    run.shard(EVALUATION, 3).unlink()
    assert len(read_records(run.records)) == N - BATCH  # what used to be reported as if it were everything

    loaded = load_run(run.root)
    assert not loaded.complete and loaded.missing_shards == 1
    [gap] = loaded.shortfalls
    assert (gap.evaluation, gap.shards, gap.n_batches, gap.samples, gap.n) == (EVALUATION, 7, 8, 14, 16)
    line = (f"INCOMPLETE: 7 of 8 shards of {EVALUATION} (14 of 16 samples); the numbers cover only the records "
            f"present (resume with `dsn-robust attack {run.root} --resume`)")
    assert loaded.incomplete_line == line

    code, out, err = _report(run, capsys)
    assert code == 0 and f"report: {run.report / 'index.html'}" in out
    assert err.splitlines() == [f"dsn-robust report: warning: {line}"]
    head = _headline_of(run.report)
    assert head["complete"] is False and head["incomplete"] == line and head["missing_shards"] == 1
    assert head["incomplete_evaluations"] == [{"evaluation": EVALUATION, "shards": 7, "n_batches": 8,
                                               "missing_shards": 1, "samples": 14, "n": 16, "short_shards": []}]
    page = (run.report / "index.html").read_text()
    top, _, rest = page.partition("<h2>Headline</h2>")
    assert 'id="incomplete"' in top and "7 of 8 shards" in top, "said at the top of the page"
    first_row = rest.split('<table class="headline" id="headline"><tbody>')[1].split("</tr>")[0]
    assert "<th>Records</th>" in first_row and "INCOMPLETE" in first_row, "and first in the headline box"
    markdown = (run.report / "report.md").read_text()
    assert markdown.index(f"> **{line}**") < markdown.index("## Headline")
    assert "| **Records** | INCOMPLETE |" in markdown

    code, _, err = _report(run, capsys, "--strict", "--out", str(tmp_path / "strict"))
    assert code == 2
    assert err.splitlines() == [f"dsn-robust report: error (--strict): {line}"]
    assert _headline_of(tmp_path / "strict")["complete"] is False  # still written, marked


def test_a_shard_short_of_samples_is_named(attacked, tmp_path, capsys):
    run = copy_run(attacked, tmp_path / "resnet")
    path = run.shard(EVALUATION, 5)
    frame, fingerprint = read_records(path), shard_fingerprint(path)
    write_shard(frame[frame["sample"] != frame["sample"].min()], path, fingerprint)  # same fingerprint, a row less

    loaded = load_run(run.root)
    assert not loaded.complete and loaded.missing_shards == 0
    assert loaded.incomplete_line == (
        f"INCOMPLETE: 8 of 8 shards of {EVALUATION} (15 of 16 samples; shard-00005.parquet short of samples); "
        f"the numbers cover only the records present (delete the short shards, then resume with `dsn-robust "
        f"attack {run.root} --resume`)")
    code, _, err = _report(run, capsys, "--strict")
    assert code == 2 and len(err.splitlines()) == 1 and "15 of 16 samples" in err
    assert _headline_of(run.report)["complete"] is False


class Killed(Exception):
    """Stands in for the kill -9 of an attack in the middle of its shards."""


def test_an_interrupted_attack_is_reported_incomplete_until_resumed(tiny_runs, tmp_path, capsys):
    run = copy_run(tiny_runs["resnet"], tmp_path / "resnet")
    written = []

    def die_after_three(path: Path) -> None:
        written.append(path)
        if len(written) == 3:
            raise Killed

    with pytest.raises(Killed):
        run_attacks(run.root, AttackConfig(**SETTINGS), progress=False, on_shard=die_after_three)
    assert [e["complete"] for e in run.read_manifest()["evaluations"]] == [False]

    code, _, err = _report(run, capsys)
    line = (f"INCOMPLETE: 3 of 8 shards of {EVALUATION} (6 of 16 samples); the numbers cover only the records "
            f"present (resume with `dsn-robust attack {run.root} --resume`)")
    assert code == 0 and err.splitlines() == [f"dsn-robust report: warning: {line}"]
    head = _headline_of(run.report)
    assert head["complete"] is False and head["incomplete"] == line and head["missing_shards"] == 5
    assert head["clean_acc"]["n"] == 6, "the numbers are those of the records present, and the headline says so"
    assert _report(run, capsys, "--strict")[0] == 2

    assert cli.main(["attack", str(run.root), "--resume", "--no-progress", "-q"]) == 0  # the fix the line names
    code, _, err = _report(run, capsys, "--strict")
    assert code == 0 and err == ""
    head = _headline_of(run.report)
    assert head["complete"] is True and head["clean_acc"]["n"] == N


def _hold_lock(run: RunDir, ready: Path) -> subprocess.Popen:
    """Another process (an attack, say) holding ``run``'s writer lock until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from robustness.core.rundir import RunDir
        with RunDir.at({str(run.root)!r}).writing("attack"):
            Path({str(ready)!r}).touch()
            time.sleep(600)
    """)], cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True)
    while not ready.exists():
        if holder.poll() is not None:
            raise AssertionError(f"the lock holder ended early: {holder.stderr.read()}")
        time.sleep(0.05)
    return holder


def test_a_report_while_another_process_writes_the_run_is_refused_and_writes_nothing(attacked, tmp_path, capsys):
    run = copy_run(attacked, tmp_path / "resnet")
    elsewhere = tmp_path / "elsewhere"
    holder = _hold_lock(run, tmp_path / "ready")
    try:
        for extra in (["--out", str(elsewhere)], []):
            code, out, err = _report(run, capsys, *extra)
            assert code == 2 and out == "" and len(err.splitlines()) == 1, err
            assert err.startswith(f"dsn-robust report: error: {run.root} is being written by another process "
                                  f"(pid {holder.pid}, attack"), err
            assert not elsewhere.exists() and not run.report.exists()
        loaded = load_run(run.root)  # the API: loading reads, writing a report takes the lock wherever it goes
        with pytest.raises(RunDirError, match="being written by another process"):
            write_report(loaded, elsewhere, n_boot=10)
        assert not elsewhere.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    code, _, err = _report(run, capsys, "--out", str(elsewhere))  # the holder is gone: the lock is taken over
    assert code == 0 and err == "" and (elsewhere / "index.html").is_file()
    assert not run.lock.exists()


def test_a_report_inside_the_writers_own_lock_goes_on(attacked, tmp_path):
    run = copy_run(attacked, tmp_path / "resnet")
    with run.writing("run"):  # what the pipeline does: it holds every run's lock for the whole job
        report = write_report(load_run(run.root), n_boot=10)
        write_report(load_run(run.root), tmp_path / "elsewhere", n_boot=10)
    assert report.index.is_file() and (tmp_path / "elsewhere" / "index.html").is_file()


def _cheap_pipeline(folder: Path) -> Path:
    """The synthetic pipeline cut to one model, one training epoch and two attacks at one eps."""
    tables = tomllib.loads(FULL.read_text())
    _merge(tables, SHRINK)
    _merge(tables, {"train": {"epochs": 1, "warmup_epochs": 1, "ramp_epochs": 0},
                    "attack": {"attacks": ["fgsm", "pgd"], "eps": ["4/255"], "gate_grads": ["none"], "n": 8,
                               "batch_size": 4},
                    "run": {"models": ["resnet"], "transfer": [], "open_mode": False, "workers": 1}})
    return write_toml(folder / "cheap.toml", tables)


def test_a_refused_resume_leaves_run_json_as_it_was(tmp_path, capsys):
    config, out = _cheap_pipeline(tmp_path), tmp_path / "out"
    assert cli.main(["run", "--no-progress", "-q", "--config", str(config), "--out", str(out)]) == 0
    before = (out / "run.json").read_bytes()
    assert json.loads(before)["attack"]["seed"] == 0
    capsys.readouterr()

    code = cli.main(["run", "--no-progress", "-q", "--config", str(config), "--out", str(out), "--resume",
                     "--set", "attack.seed=5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "seed=0" in err and "seed=5" in err, err
    assert (out / "run.json").read_bytes() == before, "the refused settings are not recorded as OUT's"

    code = cli.main(["run", "--no-progress", "-q", "--config", str(config), "--out", str(out), "--resume",
                     "--set", "attack.threads=2"])  # an accepted resume records its settings, once it has run
    assert code == 0
    assert json.loads((out / "run.json").read_text())["attack"]["threads"] == 2
