"""Reliability of what the suite writes and of how it stops (issue 24, items 9-14, 16-19): a file-size limit or a
full disk during `train`, `attack` and `report`, names and paths longer than the system allows, SIGTERM, integer
options outside their range and data sets larger than memory. Each is one line on stderr naming the path or the
option and the cause, a non-zero exit, and nothing half-written: no temporary file, no partial checkpoint, shard or
report, no `.lock` left, the files that were there untouched.

OS failures are simulated the way the kernel reports them: ``torch.save`` raises the RuntimeError of its file writer
(``[enforce fail at inline_container.cc:...] . unexpected pos ...``), Python and pyarrow writes raise
``OSError(errno.EFBIG)`` / ``OSError(errno.ENOSPC)``; one test sets a real ``RLIMIT_FSIZE`` in a subprocess (with
SIGXFSZ ignored, which Python does anyway, so that the write fails with EFBIG instead of killing the process).
SIGTERM is sent to real subprocesses once they have written their first epoch or shard.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attacks.base import attack_class, backends_for, known_attacks
from attacks.runner import AttackConfig
from models.checkpoint import load_checkpoint
from models.training import TrainConfig
from models.training.trainer import model_memory
from robustness.app import cli
from robustness.app.commands.attack import config_from_args
from robustness.app.commands.train import resolve_config
from robustness.core import runtime, signals
from robustness.core.config import MAX_SEED
from robustness.core.errors import DSNError, Interrupted, RunDirError
from robustness.core.files import atomic_write, atomic_write_text, is_temporary
from robustness.core.lock import writer_lock
from robustness.core.rundir import RunDir
from robustness.data import load_dataset

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
#: the user's tiny.toml: a 2-epoch width-4 dsn on 256 synthetic images
TINY = """
[data]
name = "synthetic"
n = 256
image_size = 16
[model]
depth_n = 2
width = 4
[train]
epochs = 2
batch_size = 64
threads = 1
"""
FGSM = ["--attacks", "fgsm", "--backend", "torchattacks", "--eps", "8/255", "--gate-grad", "none", "--n", "32",
        "--threads", "1", "--no-progress"]
#: what torch.save's file writer raises when the kernel refuses a write (the file-size limit, a full disk)
TORCH_WRITER_ERROR = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
HUGE = str(2 ** 70)  # 1180591620717411303424, the user's seed


# -- fixtures and helpers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.toml"
    path.write_text(textwrap.dedent(TINY))
    return path


@pytest.fixture(scope="module")
def trained(tiny_config, tmp_path_factory) -> Path:
    """RUN: the tiny dsn trained by `dsn-robust train` (read-only: copy before writing)."""
    root = tmp_path_factory.mktemp("trained") / "run"
    assert cli.main(["train", "--config", str(tiny_config), "--out", str(root), "--no-progress", "-q"]) == 0
    return root


@pytest.fixture(scope="module")
def attacked(trained, tmp_path_factory) -> Path:
    """RUN with FGSM records on 32 images (read-only)."""
    root = tmp_path_factory.mktemp("attacked") / "run"
    shutil.copytree(trained, root)
    assert cli.main(["attack", str(root), *FGSM, "-q"]) == 0
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _tree(*roots: Path) -> dict[str, bytes | None]:
    """Every path under ``roots`` with its bytes (None for folders): what a failed command must leave as it was."""
    return {str(p): (p.read_bytes() if p.is_file() else None) for r in roots if r.exists()
            for p in [r, *r.rglob("*")]}


def _leftovers(*roots: Path) -> list[str]:
    """Temporary files of atomic_write and lock files anywhere under ``roots``: a clean stop leaves none."""
    return sorted(str(p) for r in roots if r.exists() for p in r.rglob(".*")
                  if is_temporary(p.name) or p.name.endswith(".lock"))


def _one_error_line(err: str, command: str, *culprits: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"dsn-robust {command}: error: "), err
    assert "unexpected" not in line and "Traceback" not in err and "a bug" not in line, err
    for culprit in culprits:
        assert culprit.lower() in line.lower(), (culprit, line)
    return line


def _main(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def _efbig(filename: str | os.PathLike[str] | None = None, strerror: str | None = None) -> OSError:
    return OSError(errno.EFBIG, strerror or os.strerror(errno.EFBIG), None if filename is None else str(filename))


def _enospc(filename: str | os.PathLike[str] | None = None) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), None if filename is None else str(filename))


def _file_size_limit(monkeypatch, limit: int) -> None:
    """getrlimit(RLIMIT_FSIZE) reports ``limit`` bytes, as under ``ulimit -f``."""
    real = resource.getrlimit
    monkeypatch.setattr(resource, "getrlimit",
                        lambda which: (limit, resource.RLIM_INFINITY) if which == resource.RLIMIT_FSIZE
                        else real(which))


def _full_disk(monkeypatch) -> None:
    """statvfs reports no free block, as on a full disk."""
    monkeypatch.setattr(os, "statvfs", lambda path: types.SimpleNamespace(f_bfree=0, f_bavail=0, f_frsize=4096))


def _torch_save_fails(monkeypatch, written: int = 4096) -> None:
    """torch.save writes ``written`` bytes of its file, then its file writer fails as it does on EFBIG / ENOSPC."""
    def save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"\0" * written)
        raise RuntimeError(TORCH_WRITER_ERROR)
    monkeypatch.setattr(torch, "save", save)


# -- atomic_write: every write failure keeps the old file and is one RunDirError naming the path ----------------


def _fails_with(error: BaseException, written: int = 100):
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"x" * written)  # a partial file, as a short write leaves it
        raise error
    return write


@pytest.mark.parametrize("make, cause", [
    (lambda tmp: _efbig(tmp), "file too large"),
    (lambda tmp: _enospc(tmp), "no space left on device"),
    (lambda tmp: OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tmp)), "quota exceeded"),
    (lambda tmp: OSError(errno.EFBIG, "Error writing bytes to file. Detail: [errno 27] File too large"),
     "file too large"),  # pyarrow's words: the system's are shown
], ids=["efbig", "enospc", "edquot", "pyarrow-efbig"])
def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, make, cause):
    target = tmp_path / "records" / "shard-00000.parquet"
    target.parent.mkdir()
    target.write_text("the previous, complete file")
    with pytest.raises(RunDirError) as caught:
        atomic_write(target, lambda tmp: _fails_with(make(tmp))(tmp))
    message = str(caught.value)
    assert message.startswith(f"cannot write {target}: ") and cause in message and "\n" not in message
    assert target.read_text() == "the previous, complete file"
    assert _leftovers(tmp_path) == []


def test_efbig_names_the_file_size_limit(tmp_path, monkeypatch):
    _file_size_limit(monkeypatch, 65536)
    with pytest.raises(RunDirError, match=r"file too large \(this process may write files of at most 65536 bytes: "
                                          r"raise ulimit -f\)"):
        atomic_write(tmp_path / "f", _fails_with(_efbig()))


@pytest.mark.parametrize("condition, cause", [
    ("limit", "file too large (this process may write files of at most 4096 bytes: raise ulimit -f)"),
    ("full", "no space left on device"),
    ("neither", "the write failed (" + TORCH_WRITER_ERROR + "): the disk may be full"),
])
def test_torch_file_writer_failure_is_told_by_its_cause(tmp_path, monkeypatch, condition, cause):
    """torch.save reports a short write as a RuntimeError without an errno: the cause is read from the partial
    file's size against the file-size limit, then from the free space."""
    target = tmp_path / "checkpoints" / "last.pt"
    if condition == "limit":
        _file_size_limit(monkeypatch, 4096)
    elif condition == "full":
        _full_disk(monkeypatch)
    with pytest.raises(RunDirError) as caught:
        atomic_write(target, _fails_with(RuntimeError(TORCH_WRITER_ERROR), written=4096))
    message = str(caught.value)
    assert message.startswith(f"cannot write {target}: {cause}") and "\n" not in message
    assert condition == "neither" or message == f"cannot write {target}: {cause}"
    assert not target.exists() and _leftovers(tmp_path) == []


def test_an_unrelated_runtime_error_stays_a_bug_and_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="a bug in the writer"):
        atomic_write(tmp_path / "f", _fails_with(RuntimeError("a bug in the writer")))
    assert list(tmp_path.iterdir()) == []


def test_a_long_name_still_gets_a_temporary_file_the_file_system_accepts(tmp_path):
    """A 250-byte name is valid; its temporary file (``.<name>.<8 random>.tmp``) would not be, unshortened."""
    target = tmp_path / ("n" * 250)
    atomic_write_text(target, "complete")
    assert target.read_text() == "complete" and sorted(os.listdir(tmp_path)) == [target.name]


# -- the commands: a file-size limit or a full disk is one line, and nothing is half-written ----------------------


def test_train_with_torch_save_hitting_the_file_size_limit(tiny_config, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _file_size_limit(monkeypatch, 4096)
    _torch_save_fails(monkeypatch, written=4096)
    code, err = _main(["train", "--config", str(tiny_config), "--out", str(out), "--no-progress", "-q"], capsys)
    monkeypatch.undo()
    line = _one_error_line(err, "train", f"cannot write {out / 'checkpoints'}", ".pt: file too large", "ulimit -f")
    assert code == 2, line
    assert _leftovers(tmp_path) == [] and not list(out.rglob("*.pt"))
    assert json.loads((out / "config.json").read_text())["epochs"] == 2  # what is there is complete


def test_train_with_torch_save_on_a_full_disk(tiny_config, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _full_disk(monkeypatch)
    _torch_save_fails(monkeypatch)
    code, err = _main(["train", "--config", str(tiny_config), "--out", str(out), "--no-progress", "-q"], capsys)
    monkeypatch.undo()
    _one_error_line(err, "train", ".pt: no space left on device")
    assert code == 2 and _leftovers(tmp_path) == [] and not list(out.rglob("*.pt"))


@pytest.mark.parametrize("error, cause", [(_efbig, "file too large"), (_enospc, "no space left on device")],
                         ids=["efbig", "enospc"])
def test_resumed_train_keeps_its_checkpoint_when_the_next_one_cannot_be_written(trained, tmp_path, monkeypatch,
                                                                               capsys, error, cause):
    run = _copy(trained, tmp_path / "run")
    (run / "train.done").unlink()  # an unfinished run: --resume trains epoch 3 and saves it
    before = _tree(run / "checkpoints")

    def save(obj, f, *args, **kwargs):
        raise error(f)
    monkeypatch.setattr(torch, "save", save)
    code, err = _main(["train", "--out", str(run), "--resume", "--epochs", "3", "--no-progress", "-q"], capsys)
    monkeypatch.undo()
    _one_error_line(err, "train", str(run / "checkpoints"), cause)
    assert code == 2 and _leftovers(tmp_path) == []
    assert _tree(run / "checkpoints") == before, "the checkpoints of the finished epochs are untouched"
    assert load_checkpoint(run / "checkpoints" / "last.pt").train_state["epoch"] == 2


@pytest.mark.parametrize("error, cause", [(_efbig, "file too large"), (_enospc, "no space left on device")],
                         ids=["efbig", "enospc"])
def test_attack_whose_shard_cannot_be_written(trained, tmp_path, monkeypatch, capsys, error, cause):
    import pyarrow.parquet as pq

    run = _copy(trained, tmp_path / "run")
    before = _tree(run / "checkpoints", run / "config.json")

    def write_table(table, where, *args, **kwargs):  # pyarrow's own EFBIG carries its words and errno 27
        raise error(None, "Error writing bytes to file. Detail: [errno 27] File too large") if error is _efbig \
            else error(None)
    monkeypatch.setattr(pq, "write_table", write_table)
    code, err = _main(["attack", str(run), *FGSM], capsys)
    monkeypatch.undo()
    _one_error_line(err, "attack", f"cannot write {run / 'attacks' / 'records'}", "shard-00000.parquet", cause)
    assert code == 2 and _leftovers(tmp_path) == [] and not list(run.rglob("*.parquet"))
    assert _tree(run / "checkpoints", run / "config.json") == before
    # once there is room again, --resume continues the same evaluation
    assert cli.main(["attack", str(run), *FGSM, "--resume", "-q"]) == 0
    assert len(list(run.rglob("shard-*.parquet"))) == 1


@pytest.mark.parametrize("error, cause", [(_efbig, "file too large"), (_enospc, "no space left on device")],
                         ids=["efbig", "enospc"])
def test_report_that_cannot_be_written_leaves_no_report(attacked, tmp_path, monkeypatch, capsys, error, cause):
    run = _copy(attacked, tmp_path / "run")
    before = _tree(run)

    def refuse(self, *args, **kwargs):
        raise error(self)
    monkeypatch.setattr(Path, "write_bytes", refuse)
    monkeypatch.setattr(Path, "write_text", refuse)
    code, err = _main(["report", str(run)], capsys)
    monkeypatch.undo()
    _one_error_line(err, "report", f"cannot write {run / 'report'}", cause)
    assert code == 2 and _tree(run) == before and _leftovers(tmp_path) == []


def test_an_environment_os_error_anywhere_is_one_line_and_another_stays_a_bug(tmp_path, monkeypatch, capsys):
    import robustness.app.commands.datasets as datasets_command

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets_command, "list_datasets", lambda: (_ for _ in ()).throw(_efbig("/data/big.bin")))
    code, err = _main(["datasets"], capsys)
    assert code == 2
    assert _one_error_line(err, "datasets") == ("dsn-robust datasets: error: /data/big.bin: file too large for this "
                                                "file system")  # no ulimit -f in force: the file system's limit
    monkeypatch.setattr(datasets_command, "list_datasets",
                        lambda: (_ for _ in ()).throw(OSError(errno.ENOENT, "No such file", "/x")))
    code, err = _main(["datasets"], capsys)
    assert code == 1 and "unexpected FileNotFoundError" in err  # not the environment's doing: a bug


#: ``dsn-robust`` commands, each under its own real RLIMIT_FSIZE, in one interpreter (one start-up, not one a
#: command): argv[1] is a JSON list of ``[limit, argv]``; prints a JSON list of ``[exit code, stderr]``
_UNDER_FILE_SIZE_LIMITS = textwrap.dedent("""
    import contextlib, io, json, logging, resource, signal, sys
    from robustness.app import cli
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of saying EFBIG
    results = []
    for limit, argv in json.loads(sys.argv[1]):
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        logging.getLogger().handlers.clear()  # each command logs to its own stderr, as in a process of its own
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli.main(argv)
        results.append([code, err.getvalue()])
    print(json.dumps(results))
""")


def test_a_real_ulimit_f_during_train_and_attack(tiny_config, trained, tmp_path):
    """``ulimit -f``: training's first checkpoint (~150 KB) exceeds 64 KiB, an attack shard (~20 KB) 8 KiB."""
    env = dict(ENV, XDG_CACHE_HOME=str(tmp_path / "cache"))
    out = tmp_path / "run"
    run = _copy(trained, tmp_path / "attacked")
    commands = [[64 * 1024, ["train", "--config", str(tiny_config), "--out", str(out), "--no-progress", "-q"]],
                [8 * 1024, ["attack", str(run), *FGSM, "-q"]]]
    done = subprocess.run([sys.executable, "-c", _UNDER_FILE_SIZE_LIMITS, json.dumps(commands)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    (train_code, train_err), (attack_code, attack_err) = json.loads(done.stdout)
    line = _one_error_line(train_err, "train", f"cannot write {out / 'checkpoints'}", "file too large",
                           "at most 65536 bytes: raise ulimit -f")
    assert train_code == 2, line
    assert not list(out.rglob("*.pt"))
    _one_error_line(attack_err, "attack", "shard-00000.parquet: file too large", "at most 8192 bytes")
    assert attack_code == 2 and _leftovers(tmp_path) == [] and not list(run.rglob("*.parquet"))


# -- names and paths longer than the system allows --------------------------------------------------------------

LONG_NAME = "a" * 300
DEEP = "/".join(["b" * 200] * 25)  # 5,000 characters: beyond PATH_MAX (4096)


@pytest.mark.parametrize("argv, what, problem", [
    (["train", "--config", "{cfg}", "--out", "{tmp}/" + LONG_NAME, "--no-progress"], "--out", "a name of 300 bytes"),
    (["train", "--config", "{cfg}", "--out", "{tmp}/" + DEEP, "--no-progress"], "--out", "path too long"),
    (["train", "--config", "{tmp}/" + LONG_NAME + ".toml", "--out", "{tmp}/o"], "--config", "a name of 305 bytes"),
    (["attack", "{tmp}/" + DEEP, "--attacks", "fgsm"], "RUN_DIR", "path too long"),
    (["attack", "{run}", "--transfer-from", "{tmp}/" + LONG_NAME], "--transfer-from", "a name of 300 bytes"),
    (["report", "{run}", "--out", "{tmp}/" + LONG_NAME], "--out", "a name of 300 bytes"),
    (["compare", "{run}", "{run}", "--out", "{tmp}/" + LONG_NAME], "--out", "a name of 300 bytes"),
    (["run", "--out", "{tmp}/" + LONG_NAME, "--no-progress"], "--out", "a name of 300 bytes"),
], ids=["train-name", "train-path", "train-config", "attack-path", "attack-transfer", "report", "compare", "run"])
def test_names_and_paths_too_long_are_one_line_before_any_work(argv, what, problem, attacked, tiny_config, tmp_path,
                                                               monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{run}", str(attacked)).replace("{cfg}", str(tiny_config))
            for a in argv]
    before = _tree(tmp_path, attacked)
    code, err = _main(argv, capsys)
    line = _one_error_line(err, argv[0], f": error: {what} ", problem, "; pick a shorter one")
    assert code == 2 and _tree(tmp_path, attacked) == before, line
    assert len(line) < 400  # the path is shown by its start and its end


def test_a_name_too_long_for_a_file_inside_is_one_line(tmp_path):
    """Where the kernel says ENAMETOOLONG (a derived name such as ``.OUT.lock`` beside a 252-byte ``OUT``)."""
    with pytest.raises(RunDirError, match=r"cannot write .*: file name too long \(a name of 256 bytes; this file "
                                          r"system allows at most 255\)"):
        with writer_lock(tmp_path / ("." + "c" * 250 + ".lock"), "run"):
            pass
    assert list(tmp_path.iterdir()) == []


# -- integer options: validated before any work, one line naming the option ------------------------------------

A = ["attack", "{run}", "--attacks", "fgsm", "--eps", "8/255", "--no-progress"]
T = ["train", "--config", "{cfg}", "--out", "{tmp}/o", "--no-progress"]


@pytest.mark.parametrize("argv, culprit", [
    (A + ["--seed", HUGE], "seed must be a non-negative integer below 2**63, got 1180591620717411303424"),
    (A + ["--seed", str(2 ** 63)], "seed must be a non-negative integer below 2**63"),
    (A + ["--subset-seed", HUGE], "subset_seed must be a non-negative integer below 2**63"),
    (A + ["--n", HUGE], "n must be at most 2147483647"),
    (A + ["--batch-size", HUGE], "batch_size must be a positive integer (at most 2147483647)"),
    (A + ["--steps", HUGE], "steps must be at most 2147483647"),
    (A + ["--attacks", "pgd", "--restarts", HUGE], "[attack.pgd] (native): restarts 1180591620717411303424 is out "
                                                   "of range"),
    (A + ["--workers", HUGE], "workers must be at most 256"),
    (A + ["--workers", "0"], "workers must be a positive integer, got 0"),
    (A + ["--threads", HUGE], "threads must be an integer in 0..1024"),
    (A + ["--threads", "-1"], "threads must be an integer in 0..1024"),
    (A + ["--eot-samples", HUGE], "eot_samples must be at most 2147483647"),
    (A + ["--set", "pgd.alpha=inf", "--attacks", "pgd"], "alpha must be a finite number, got inf"),
    (A + ["--set", "pgd.alpha=nan", "--attacks", "pgd"], "alpha must be a finite number, got nan"),
    (T + ["--seed", HUGE], "seed must be in 0..9223372036854775807, got 1180591620717411303424"),
    (T + ["--epochs", HUGE], "epochs must be in 1..100000"),
    (T + ["--batch-size", HUGE], "batch_size must be in 2..2147483647"),
    (T + ["--lr", "1e400"], "lr must be a finite number > 0, got inf"),
    (T + ["--width", HUGE], "model option width must be in 0..2147483647"),
    (T + ["--depth-n", HUGE], "model option depth_n must be in 0..2147483647"),
    (T + ["--width", "1000000"], "model dsn (depth_n=2, width=1000000, gate_hidden=16): needs about"),
    (["train", "--config", "{cfg:n}", "--out", "{tmp}/o", "--no-progress"],
     "synthetic: n = 1000000000000 train images of 3x16x16: needs about"),
    (["train", "--config", "{cfg:seed}", "--out", "{tmp}/o", "--no-progress"],
     "synthetic: option seed must be at most 9223372036854775807"),
    (["train", "--config", "{cfg:padding}", "--out", "{tmp}/o", "--no-progress"],
     "crop_padding 1000 is larger than the 16-pixel images"),
], ids=lambda v: " ".join(v[-2:]) if isinstance(v, list) else None)
def test_integer_options_out_of_range_are_one_line_before_any_work(argv, culprit, trained, tiny_config, tmp_path,
                                                                   monkeypatch, capsys):
    run = _copy(trained, tmp_path / "run")
    configs = {"n": "[data]\nn = 1000000000000\n", "seed": f"[data]\nseed = {HUGE}\n",
               "padding": "[train]\ncrop_padding = 1000\n"}
    for name, extra in configs.items():
        (tmp_path / f"{name}.toml").write_text(_with(TINY, extra))
    argv = [a.replace("{run}", str(run)).replace("{tmp}", str(tmp_path)).replace("{cfg}", str(tiny_config))
            for a in argv]
    argv = [str(tmp_path / f"{a[5:-1]}.toml") if a.startswith("{cfg:") else a for a in argv]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(runtime, "available_memory", lambda: 8 << 30, raising=False)  # an 8 GiB machine
    before = _tree(tmp_path)
    code, err = _main(argv, capsys)
    line = _one_error_line(err, argv[0], culprit)
    assert code == 2 and _tree(tmp_path) == before, line  # no attacks/manifest.json, no run directory


def _with(base: str, extra: str) -> str:
    """The TOML ``base`` with the keys of ``extra`` (``[table]\\nkey = value``) set in their table."""
    text = textwrap.dedent(base)
    table, line = extra.strip().split("\n")
    key = line.split("=")[0].strip()
    lines = [ln for ln in text.splitlines() if not ln.startswith(f"{key} =")]
    if table not in lines:
        lines += [table]
    lines.insert(lines.index(table) + 1, line)
    return "\n".join(lines) + "\n"


def test_the_largest_seeds_work_end_to_end(trained, tiny_config, tmp_path, capsys):
    """2**63 - 1 is accepted and runs: the records hold it, training seeds every generator with it."""
    run = _copy(trained, tmp_path / "run")
    assert cli.main(["attack", str(run), *FGSM, "--seed", str(MAX_SEED), "--subset-seed", str(MAX_SEED), "-q"]) == 0
    import pandas as pd
    seeds = pd.concat(pd.read_parquet(p) for p in run.rglob("shard-*.parquet"))["seed"]
    assert set(seeds) == {MAX_SEED}
    out = tmp_path / "trained"
    assert cli.main(["train", "--config", str(tiny_config), "--out", str(out), "--seed", str(MAX_SEED),
                     "--epochs", "1", "--no-progress", "-q"]) == 0
    assert json.loads((out / "config.json").read_text())["seed"] == MAX_SEED


def test_a_data_set_larger_than_memory_is_refused_before_it_is_generated(monkeypatch):
    import robustness.data.synthetic as synthetic

    monkeypatch.setattr(synthetic, "_generate_synthetic", lambda *a: pytest.fail("generated"))
    with pytest.raises(DSNError, match=r"^synthetic: n = 1000000000000 test images of 3x32x32: needs about 5\.5 "
                                       r"PiB of memory, more than the 1\.0 GiB available on this machine; lower "
                                       r"\[data\] n$"):
        monkeypatch.setattr(runtime, "available_memory", lambda: 1 << 30)
        load_dataset("synthetic", "test", n=10 ** 12)
    monkeypatch.setattr(runtime, "available_memory", lambda: None)  # unknown: nothing to compare with, no refusal
    with pytest.raises(pytest.fail.Exception, match="generated"):
        load_dataset("synthetic", "test", n=10 ** 12)


@pytest.mark.parametrize("setting, message", [
    ("data.n=1000000000000", r"synthetic: n = 1000000000000 train images .* needs about .* of memory"),
    ("model.depth_n=1", r"dsn needs depth_n >= 2"),
], ids=["data-too-large", "model-option-refused"])
def test_run_refuses_what_cannot_work_before_it_creates_its_out_folder(setting, message, tiny_config, tmp_path,
                                                                       monkeypatch, capsys):
    monkeypatch.setattr(runtime, "available_memory", lambda: 1 << 30)
    out = tmp_path / "out"
    assert cli.main(["run", "--config", str(tiny_config), "--out", str(out), "--set", setting, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not out.exists()  # not even run.json: nothing of a run that never started


def test_available_memory_reads_the_machine():
    available = runtime.available_memory()
    assert available is None or 0 < available < 1 << 50


# -- property tests: random bad numbers through every numeric option --------------------------------------------

BAD_INTS = st.one_of(st.sampled_from([0, -1, 1, 2, -2 ** 63, 2 ** 63 - 1, 2 ** 63, 2 ** 64, 2 ** 70, -2 ** 70,
                                      10 ** 400, 2 ** 31 - 1, 2 ** 31]),
                     st.integers(-10 ** 30, 10 ** 30))
BAD_FLOATS = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1e308, 5e-324]),
                       st.floats(allow_nan=True, allow_infinity=True))
NUMBERS = st.one_of(BAD_INTS, BAD_FLOATS)
#: Derandomized, so CI sees the same examples on every run (a failure is reproducible, never a lottery);
#: DSN_PROPERTY_EXAMPLES=2000 searches wider before a release.
PROPERTY = settings(max_examples=int(os.environ.get("DSN_PROPERTY_EXAMPLES", 40)), deadline=None,
                    derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _accepted_or_typed(make) -> None:
    """``make()`` returns a config whose every number can be used (:func:`_assert_usable`), raises a DSNError (one
    line), or is a usage error argparse printed as one line: never an OverflowError, a ValueError or a traceback,
    and never a value accepted now that fails later (the user's seed 2**70 passed validation and overflowed in the
    attack's records)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            result = make()
    except DSNError as err:
        assert str(err) and "\n" not in str(err).strip()
    except SystemExit as stop:
        assert stop.code == 2 and len(stderr.getvalue().strip().splitlines()) == 1, stderr.getvalue()
    else:
        _assert_usable(result)


def _assert_usable(value, where: str = "config") -> None:
    """Every int of ``value`` (a config, its tables and lists) fits an int64, as numpy, torch and the records hold
    it, and every float is finite."""
    import dataclasses
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        for key, item in value.items():
            _assert_usable(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for item in value:
            _assert_usable(item, where)
    elif isinstance(value, bool) or value is None or isinstance(value, str):
        return
    elif isinstance(value, int):
        assert -2 ** 63 <= value < 2 ** 63, f"{where} = {value} was accepted but fits no int64"
    elif isinstance(value, float):
        assert math.isfinite(value), f"{where} = {value} was accepted"


def _number_text(value: int | float) -> str:
    return repr(value) if isinstance(value, float) else str(value)


ATTACK_INT_FLAGS = ["--n", "--subset-seed", "--batch-size", "--seed", "--steps", "--restarts", "--threads",
                    "--workers", "--eot-samples"]
ATTACK_FLOAT_FLAGS = ["--eps", "--cw-eps"]
TRAIN_INT_FLAGS = ["--epochs", "--seed", "--batch-size", "--depth-n", "--width"]
TRAIN_FLOAT_FLAGS = ["--lr"]


@PROPERTY
@given(flag=st.sampled_from(ATTACK_INT_FLAGS + ATTACK_FLOAT_FLAGS), value=NUMBERS)
def test_attack_numeric_flags_are_accepted_or_one_typed_error(flag, value, trained):
    before = _tree(trained)
    args = lambda: cli.build_parser().parse_args(["attack", str(trained), "--attacks", "fgsm,pgd", "--eps", "8/255",
                                                  f"{flag}={_number_text(value)}"])
    _accepted_or_typed(lambda: config_from_args(args()))
    assert _tree(trained) == before  # validated before any work: nothing written


@PROPERTY
@given(flag=st.sampled_from(TRAIN_INT_FLAGS + TRAIN_FLOAT_FLAGS), value=NUMBERS)
def test_train_numeric_flags_are_accepted_or_one_typed_error(flag, value, tiny_config, tmp_path):
    out = tmp_path / "never-written"

    def validate() -> None:
        args = cli.build_parser().parse_args(["train", "--config", str(tiny_config), "--out", str(out),
                                              f"{flag}={_number_text(value)}"])
        config = resolve_config(args)
        runtime.check_memory("model", model_memory(config), "lower width")  # the trainer's check before work
        return config
    _accepted_or_typed(validate)
    assert not out.exists()


def _numeric_fields(cls) -> list[str]:
    import dataclasses
    import typing
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls)
            if any(t in (int, float) for t in (typing.get_args(hints[f.name]) or (hints[f.name],)))]


ATTACK_PARAMS = sorted({(name, key) for name in known_attacks() for backend in backends_for(name)
                        for key in _numeric_fields(attack_class(name, backend).Params)})


@PROPERTY
@given(data=st.data(), value=NUMBERS)
def test_attack_table_numbers_are_accepted_or_one_typed_error(data, value):
    if data.draw(st.booleans()):
        key = data.draw(st.sampled_from(_numeric_fields(AttackConfig)))
        _accepted_or_typed(lambda: AttackConfig.from_table({key: value}, where="[attack]"))
    else:
        name, key = data.draw(st.sampled_from(ATTACK_PARAMS))

        def validate() -> AttackConfig:
            config = AttackConfig.from_table({"attacks": [name], name: {key: value}}, where="[attack]")
            for backend in config.backends_of(name) or backends_for(name):  # what the attack is built with
                _assert_usable(config.options_for(name, backend), f"[attack.{name}]")
            return config
        _accepted_or_typed(validate)


@PROPERTY
@given(data=st.data(), value=NUMBERS)
def test_train_and_data_table_numbers_are_accepted_or_one_typed_error(data, value):
    table = data.draw(st.sampled_from(["train", "model", "data"]))
    key = data.draw(st.sampled_from({
        "train": _numeric_fields(TrainConfig),
        "model": ["depth_n", "width", "gate_hidden", "feedback_channels", "open_bias"],
        "data": ["n", "image_size", "seed", "n_coarse", "fine_per_coarse", "train_limit", "test_limit"],
    }[table]))
    import robustness.data.synthetic as synthetic

    def validate() -> None:
        config = TrainConfig.from_tables({table: {key: value}}, where="config file")
        runtime.check_memory("model", model_memory(config), "lower width")
        with pytest.MonkeyPatch.context() as mp:  # validated up to the generation, which is not run
            mp.setattr(synthetic, "_generate_synthetic", lambda *a: (_ for _ in ()).throw(_Generated()))
            try:
                load_dataset(config.dataset, "test", **config.data_options)
            except _Generated:
                pass
        return config
    _accepted_or_typed(validate)


@pytest.mark.parametrize("value", [1, 2 ** 63, 10 ** 300])
def test_an_integer_given_for_a_float_option_is_held_as_a_float(value):
    config = TrainConfig.from_tables({"train": {"lr": value}}, where="config file")
    assert type(config.lr) is float and config.lr == float(value)  # never an int the records cannot hold


def test_an_integer_no_float_can_hold_is_refused_for_a_float_option():
    with pytest.raises(DSNError, match=r"lr must be a finite number.*about 2\*\*1328"):
        TrainConfig.from_tables({"train": {"lr": 10 ** 400}}, where="config file")


class _Generated(Exception):
    """The data set's options passed every check: generation would start now."""


# -- SIGTERM: the same path as Ctrl-C ---------------------------------------------------------------------------


def test_sigterm_in_a_command_releases_the_lock_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    import robustness.app.commands.models as models_command

    run = RunDir.at(tmp_path / "run")
    (tmp_path / "run").mkdir()
    atomic_write_text(run.config, "{}")

    def terminated(pattern="*"):
        with run.writing("test"):
            assert run.lock.exists()
            atomic_write(run.metrics, lambda tmp: (tmp.write_text("half"), os.kill(os.getpid(), signal.SIGTERM),
                                                    time.sleep(5)))
        pytest.fail("SIGTERM did not interrupt")
    monkeypatch.setattr(models_command, "list_models", terminated)
    code, err = _main(["models"], capsys)
    assert code == 143
    assert err.strip() == ("dsn-robust models: interrupted by SIGTERM; finished work is saved, rerun with --resume "
                           "to continue")
    assert sorted(os.listdir(run.root)) == ["config.json"]  # no .lock, no half-written metrics
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler lives as long as the command


def test_a_second_sigterm_does_not_interrupt_the_clean_up():
    with signals.graceful_termination(reset=True):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Interrupted as stop:
            assert stop.exit_code == 143
            os.kill(os.getpid(), signal.SIGTERM)  # while unwinding: ignored
            time.sleep(0.2)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_worker_asked_twice_stops_once_its_clean_up_is_done(tmp_path):
    """A pool's terminate() after the forwarded SIGTERM must end the worker (its parent joins it), but only after
    the clean-up: the signal is re-delivered when the handler's scope ends."""
    code = textwrap.dedent("""
        import os, signal, time
        from robustness.core.errors import Interrupted
        from robustness.core.signals import graceful_termination
        with graceful_termination():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except Interrupted:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
                print("cleaned up", flush=True)
        print("not reached", flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == -signal.SIGTERM and result.stdout.split() == ["cleaned", "up"], result.stderr


def _terminate_once(argv: list[str], ready, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Start ``dsn-robust argv``, send it SIGTERM as soon as ``ready()`` holds, and wait for it."""
    env = dict(ENV, XDG_CACHE_HOME=str(cwd / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "robustness", *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                out, err = proc.communicate()
                raise AssertionError(f"ended before SIGTERM (exit {proc.returncode}): {err}")
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


HINT = "interrupted by SIGTERM; finished work is saved, rerun with --resume to continue"
SLOW_TRAIN = """
[data]
name = "synthetic"
n = 1024
image_size = 16
[model]
depth_n = 2
width = 8
[train]
epochs = 30
batch_size = 64
threads = 1
"""


def test_sigterm_during_train_exits_143_and_resume_continues(tmp_path, capsys):
    config = tmp_path / "slow.toml"
    config.write_text(textwrap.dedent(SLOW_TRAIN))
    out = tmp_path / "run"
    stopped = _terminate_once(["train", "--config", str(config), "--out", str(out), "--no-progress", "-q"],
                              lambda: (out / "metrics.csv").is_file(), tmp_path)
    assert stopped.returncode == 143, stopped.stderr
    assert stopped.stderr.strip().splitlines() == [f"dsn-robust train: {HINT}"]
    assert _leftovers(tmp_path) == [] and not (out / "train.done").exists()
    finished = load_checkpoint(out / "checkpoints" / "last.pt").train_state["epoch"]
    assert 1 <= finished < 30
    # the resume in this process: the stop is the subprocess's; continuing is the same code wherever it runs
    code = cli.main(["train", "--config", str(config), "--out", str(out), "--resume", "--epochs", str(finished + 1),
                     "--no-progress"])
    resumed = capsys.readouterr()
    assert code == 0, resumed.err
    assert f"resumed after epoch {finished}" in resumed.out and (out / "train.done").is_file()
    assert _leftovers(tmp_path) == []


def test_sigterm_during_a_multi_process_attack_stops_its_workers_and_resume_continues(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    argv = ["attack", str(run), "--attacks", "slowdown", "--eps", "8/255", "--gate-grad", "none", "--steps", "150",
            "--n", "16", "--batch-size", "4", "--threads", "1", "--no-progress", "-q"]
    stopped = _terminate_once(argv + ["--workers", "2"], lambda: any(run.rglob("shard-*.parquet")), tmp_path)
    assert stopped.returncode == 143, stopped.stderr
    assert stopped.stderr.strip().splitlines() == [f"dsn-robust attack: {HINT}"]
    assert _leftovers(tmp_path) == []
    shards = sorted(run.rglob("shard-*.parquet"))
    time.sleep(1.5)
    assert sorted(run.rglob("shard-*.parquet")) == shards, "a worker went on writing after its parent stopped"
    assert 1 <= len(shards) < 4
    code = cli.main([*argv, "--resume", "--workers", "1"])  # in this process, as the training resume above
    assert code == 0, capsys.readouterr().err
    assert len(list(run.rglob("shard-*.parquet"))) == 4 and _leftovers(tmp_path) == []


def test_sigterm_during_run_stops_the_training_workers(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(textwrap.dedent(SLOW_TRAIN) + textwrap.dedent("""
        [attack]
        attacks = ["fgsm"]
        eps = [0.03]
        n = 16
        [run]
        models = ["dsn", "resnet"]
        transfer = []
        workers = 2
        open_mode = false
    """))
    out = tmp_path / "out"
    stopped = _terminate_once(["run", "--config", str(config), "--out", str(out), "--no-progress", "-q"],
                              lambda: any(out.glob("*/metrics.csv")), tmp_path)
    assert stopped.returncode == 143, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == f"dsn-robust run: {HINT}"
    assert "Traceback" not in stopped.stderr
    assert _leftovers(tmp_path) == []  # neither the workers' run locks nor the output's lock
