"""Every failure a user can cause is one line and a non-zero exit, and leaves nothing behind (issue 14).

``test_bad_input_is_one_line_and_writes_nothing`` is the bad-input matrix over every command: each case runs
``cli.main`` in-process and checks the exit code, that stderr is exactly one ``dsn-robust <cmd>: error:`` line
naming the culprit, and that no file or folder appeared or vanished. OS failures are simulated: the tests may run
as root, for whom ``chmod`` forbids nothing, so a read-only folder, an unreadable file and a full disk are patched
in (``os.mkdir`` / ``os.open`` / ``Path.read_text`` / ``Path.write_*`` raise the OSError the kernel would).
The property tests (hypothesis) feed random values to the config validators and the CLI's string parsers: each
either gives a valid result or raises a DSNError, never anything else.
"""
from __future__ import annotations

import errno
import io
import logging
import os
import shutil
import textwrap
from importlib import metadata
from pathlib import Path

# matplotlib finds or builds its font cache now, under the real cache folder: a first `run` that imports it later
# must not look like a write of its own into a case's XDG_CACHE_HOME
import matplotlib.font_manager  # noqa: F401
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attacks.runner import AttackConfig
from models.registry import create_model, list_models, model_options
from models.training import TrainConfig
from robustness.app import cli
from robustness.app.commands.attack import parse_setting
from robustness.core.config import SECTIONS, apply_overrides, build, parse_override
from robustness.core.errors import DSNError
from robustness.core.progress import LineProgress, progress_bar
from robustness.core.runtime import package_version
from robustness.core.vocab import parse_eps

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN = """
[data]
name = "synthetic"
image_size = 16
train_limit = 64
test_limit = 32
[model]
depth_n = 2
width = 4
[train]
epochs = 1
batch_size = 32
"""
CONFIGS = {
    "tiny": TINY_TRAIN,
    "unreadable": TINY_TRAIN,
    "badtoml": "[train\nepochs = ",
    "depth_str": '[model]\ndepth_n = "3"\n',
    "width_float": "[model]\nwidth = 8.5\n",
    "badtable": "[training]\nepochs = 1\n",
    "train_typo": "[train]\nepoch = 3\n",
    "attack_device_int": "[attack]\ndevice = 1\n",
    "attack_eps_str": '[attack]\neps = ["8/255", "lots"]\n',
    "attack_flat_alias": "[attack]\npgd_restarts = 2\n",
}
T = ["train", "--no-progress", "--config", "{cfg:tiny}", "--out", "{tmp}/o"]
A = ["attack", "{run}", "--no-progress", "--attacks", "fgsm", "--eps", "8/255", "--n", "8", "--resume"]
R = ["run", "--no-progress", "--out", "{tmp}/o"]

# (argv, what the one line must contain, simulated condition)
CASES = [
    # train: config files, option types and values, names, places to write, the machine
    (["train", "--no-progress", "--config", "{cfg:unreadable}", "--out", "{tmp}/o"], "permission denied", "unreadable"),
    (["train", "--no-progress", "--config", "{tmp}/missing.toml", "--out", "{tmp}/o"], "does not exist", None),
    (["train", "--no-progress", "--config", "{cfg:badtoml}", "--out", "{tmp}/o"], "not valid TOML", None),
    (["train", "--no-progress", "--config", "{cfg:depth_str}", "--out", "{tmp}/o"], "depth_n must be an int, got '3'",
     None),
    (["train", "--no-progress", "--config", "{cfg:width_float}", "--out", "{tmp}/o"], "width must be an int, got 8.5",
     None),
    (["train", "--no-progress", "--config", "{cfg:badtable}", "--out", "{tmp}/o"], "unknown table(s) training", None),
    (["train", "--no-progress", "--config", "{cfg:train_typo}", "--out", "{tmp}/o"], "epoch", None),
    (T + ["--model", "nonet"], "unknown model 'nonet'", None),
    (T + ["--dataset", "nodata"], "unknown dataset 'nodata'", None),
    (T + ["--epochs", "-1"], "epochs must be >= 1", None),
    (T + ["--epochs", "x"], "invalid int value: 'x'", None),
    (T + ["--batch-size", "1"], "batch_size must be >= 2", None),
    (T + ["--lr", "-0.1"], "lr must be a finite number > 0", None),
    (T + ["--lr", "nan"], "lr must be a finite number > 0", None),
    (T + ["--seed", "-1"], "seed must be >= 0", None),
    (T + ["--depth-n", "0"], "depth_n", None),
    (T + ["--width", "0"], "width", None),
    (T + ["--gate-fn", "nope"], "invalid choice: 'nope'", None),
    (T + ["--resume", "--force"], "not allowed with argument", None),
    (T + ["--device", "tpu"], "invalid choice: 'tpu'", None),
    (T + ["--device", "cuda"], "CUDA is not available", "nocuda"),
    (T + ["--dataset", "cifar100", "--data-root", "{tmp}/nodata"], "nodata does not exist", None),
    (["train", "--no-progress", "--config", "{cfg:tiny}", "--out", "{file}/o"], "a file stands", None),
    (["train", "--no-progress", "--config", "{cfg:tiny}", "--out", "{ro}/o"], "permission denied", "readonly"),
    (T, "no space left on device", "diskfull"),
    (["train", "--no-progress", "--config", "{cfg:tiny}"], "required: --out", None),
    # attack
    (A + ["--eps", "1e400"], "1e400", None),
    (A + ["--eps", "1/1e-400"], "1/1e-400", None),
    (A + ["--eps", "8"], "eps 8 is outside [0, 1]", None),
    (A + ["--eps", "nan"], "nan", None),
    (A + ["--eps", "1/0"], "1/0", None),
    (A + ["--eps=-1/255"], "is negative", None),
    (A + ["--attacks", "fgsm,pgdd"], "unknown attack 'pgdd'", None),
    (A + ["--n", "-5"], "n", None),
    (A + ["--n", "0"], "n", None),
    (A + ["--batch-size", "0"], "batch", None),
    (A + ["--batch-size", "lots"], "lots", None),
    (A + ["--gate-grad", "teleport"], "teleport", None),
    (A + ["--gate-mode", "sideways"], "unknown gate mode 'sideways'", None),
    (A + ["--backend", "cleverhans"], "unknown backend 'cleverhans'", None),
    (A + ["--norm", "l3"], "invalid choice: 'l3'", None),
    (A + ["--steps", "-1"], "steps", None),
    (A + ["--eot-samples", "0"], "eot", None),
    (A + ["--set", "fgsm.bogus=1"], "bogus", None),
    (A + ["--set", "nodot"], "ATTACK.KEY=VALUE", None),
    (A + ["--config", "{cfg:attack_device_int}"], "device must be a str, got 1", None),
    (A + ["--config", "{cfg:attack_eps_str}"], "lots", None),
    (A + ["--config", "{cfg:unreadable}"], "permission denied", "unreadable"),
    (A + ["--device", "cuda"], "CUDA is not available", "nocuda"),
    (A + ["--device", "abacus"], "abacus", None),
    (A + ["--seed", "x"], "invalid int value: 'x'", None),
    (A + ["--resume", "--force"], "--resume", None),
    (["attack", "{run}", "--no-progress", "--attacks", "fgsm", "--eps", "8/255", "--n", "8"],
     "already holds attack records", None),
    (["attack", "{tmp}/nothing", "--no-progress"], "nothing", None),
    (A + ["--transfer-from", "{tmp}/nothing"], "nothing", None),
    # report
    (["report", "{run}", "--out", "{file}/x"], "a file stands", None),
    (["report", "{run}", "--out", "{ro}/rep"], "permission denied", "readonly"),
    (["report", "{run}", "--out", "{tmp}/rep"], "no space left on device", "diskfull"),
    (["report", "{tmp}/nothing"], "nothing does not exist", None),
    (["report", "{trained}"], "no attack records", None),
    (["report", "{run}", "--bootstrap", "x"], "invalid int value: 'x'", None),
    # compare
    (["compare", "{run}", "{run}", "--out", "{file}/x"], "a file stands", None),
    (["compare", "{run}", "{run}", "--out", "{ro}/c"], "permission denied", "readonly"),
    (["compare", "{run}", "{run}", "--out", "{tmp}/c"], "no space left on device", "diskfull"),
    (["compare", "{run}", "{tmp}/nothing", "--out", "{tmp}/c"], "nothing", None),
    (["compare", "{run}", "{run}", "--out", "{tmp}/c", "--labels", "one"], "--labels", None),
    (["compare", "{run}", "{run}"], "required: --out", None),
    # bench
    (["bench", "--image-size", "0"], "image-size", None),
    (["bench", "--image-size", "-3"], "image-size", None),
    (["bench", "--width", "0"], "width", None),
    (["bench", "--depth-n", "1"], "depth-n", None),
    (["bench", "--batch-size", "0"], "--batch-size", None),
    (["bench", "--batch-size", "big"], "big", None),
    (["bench", "--repeats", "0"], "--repeats", None),
    (["bench", "--skip", "2"], "--skip", None),
    (["bench", "--threads", "-1"], "--threads", None),
    (["bench", "--device", "tpu"], "invalid choice: 'tpu'", None),
    (["bench", "--run", "{tmp}/nothing"], "nothing", None),
    (["bench", "reference", "{tmp}/nothing"], "nothing", None),
    (["bench", "reference", "{run}", "--eps", "abc"], "abc", None),
    (["bench", "reference", "{run}", "--max-gap", "-1"], "--max-gap", None),
    # run: the machine and the places are checked before --out is created
    (R + ["--device", "cuda"], "CUDA is not available", "nocuda"),
    (R + ["--config", str(REPO / "configs" / "cifar100.toml"), "--data-root", "{tmp}/nodata"],
     "nodata does not exist", None),
    (R + ["--config", "{cfg:unreadable}"], "permission denied", "unreadable"),
    (R + ["--config", "{cfg:width_float}"], "width must be an int, got 8.5", None),
    (R + ["--set", "attack.nn=1"], "unknown option(s) nn", None),
    (R + ["--set", "foo.x=1"], "unknown table 'foo'", None),
    (R + ["--set", "attack"], "TABLE.KEY=VALUE", None),
    # flat attack options of earlier versions: refused, naming the spelling that replaced them
    (R + ["--set", "attack.pgd_restarts=5"], "pgd_restarts is no longer an option; write [attack.pgd] restarts = 5",
     None),
    (["attack", "{run}", "--no-progress", "--config", "{cfg:attack_flat_alias}"],
     "write [attack.pgd] restarts = 2 (attack --set pgd.restarts=2, run --set attack.pgd.restarts=2)", None),
    (["attack", "{run}", "--no-progress", "--set", "pgd.restarts"], "write ATTACK.KEY=VALUE, e.g. pgd.restarts=5",
     None),
    (["attack", "{run}", "--no-progress", "--set", "pgd.=1"], "write ATTACK.KEY=VALUE", None),
    (R + ["--set", 'model.depth_n="3"'], "depth_n must be an int, got '3'", None),
    (R + ["--set", "attack.device=1"], "device must be a str, got 1", None),
    (R + ["--set", "attack.eps=[\"1e400\"]"], "1e400", None),
    (R + ["--set", "run.models=[]"], "at least one model", None),
    (R + ["--set", 'run.transfer=["a->b"]'], "transfer pair 'a->b'", None),
    (R + ["--set", "train.epochs=0"], "epochs must be >= 1", None),
    (R + ["--resume", "--force"], "not allowed with argument", None),
    (["run", "--no-progress", "--out", "{file}"], "is a file", None),
    (["run", "--no-progress", "--out", "{file}/x"], "a file stands", None),
    (["run", "--no-progress", "--out", "{ro}/o"], "permission denied", "readonly"),
    # the listings and the top level
    (["models", "--bogus"], "unrecognized arguments: --bogus", None),
    (["bench", "reference", "{run}", "--bogus"], "unrecognized arguments: --bogus", None),
    (["datasets", "extra"], "unrecognized arguments: extra", None),
    (["teleport"], "invalid choice: 'teleport'", None),
]


@pytest.fixture(scope="module")
def attacked(tiny_runs, tmp_path_factory) -> Path:
    """A copy of the tiny dsn run with a few FGSM records (read-only for the cases: they must not change it)."""
    root = tmp_path_factory.mktemp("attacked") / "dsn"
    shutil.copytree(tiny_runs["dsn"].root, root)
    code = cli.main(["attack", str(root), "--no-progress", "--attacks", "fgsm", "--backend", "torchattacks",
                     "--eps", "8/255", "--gate-grad", "none", "--n", "8", "--batch-size", "8", "--threads", "1",
                     "-q"])
    assert code == 0
    return root


def _tree(*roots: Path) -> set[tuple[str, int]]:
    """Every path under ``roots`` with its size (0 for folders): what a failed command must leave as it was."""
    return {(str(p), p.stat().st_size if p.is_file() else 0) for r in roots for p in [r, *r.rglob("*")]}


def _simulate(condition: str | None, tmp: Path, monkeypatch) -> None:
    """Patch in the OS failure ``condition`` names (see the module docstring)."""
    if condition == "nocuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    elif condition == "unreadable":
        target = tmp / "unreadable.toml"
        read_text = Path.read_text

        def refuse_read(self, *args, **kwargs):
            if Path(self) == target:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return read_text(self, *args, **kwargs)
        monkeypatch.setattr(Path, "read_text", refuse_read)
    elif condition == "readonly":
        ro = str(tmp / "ro")
        mkdir, open_ = os.mkdir, os.open

        def inside(path) -> bool:
            return os.path.abspath(os.fspath(path)).startswith(ro + os.sep)

        def refuse_mkdir(path, *args, **kwargs):
            if inside(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return mkdir(path, *args, **kwargs)

        def refuse_open(path, flags, *args, **kwargs):
            if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return open_(path, flags, *args, **kwargs)
        monkeypatch.setattr(os, "mkdir", refuse_mkdir)
        monkeypatch.setattr(os, "open", refuse_open)
    elif condition == "diskfull":
        def full(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        monkeypatch.setattr(Path, "write_text", full)
        monkeypatch.setattr(Path, "write_bytes", full)


def _argv(template: list[str], tmp: Path, run: Path, trained: Path) -> list[str]:
    def one(arg: str) -> str:
        if arg.startswith("{cfg:"):
            name = arg[5:-1]
            path = tmp / f"{name}.toml"
            path.write_text(textwrap.dedent(CONFIGS[name]))
            return str(path)
        return (arg.replace("{tmp}", str(tmp)).replace("{run}", str(run)).replace("{trained}", str(trained))
                .replace("{file}", str(tmp / "afile")).replace("{ro}", str(tmp / "ro")))
    return [one(a) for a in template]


@pytest.mark.parametrize("template, culprit, condition", CASES,
                         ids=[f"{i:02d}-{' '.join(c[0][:1] + c[0][-2:])}-{c[2] or ''}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_and_writes_nothing(template, culprit, condition, attacked, tiny_runs, tmp_path,
                                                  monkeypatch, capsys):
    (tmp_path / "afile").write_text("a regular file\n")
    (tmp_path / "ro").mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a crash report would show up as a new file
    monkeypatch.chdir(tmp_path)
    argv = _argv(template, tmp_path, attacked, tiny_runs["resnet"].root)
    before = _tree(tmp_path, attacked, tiny_runs["resnet"].root)
    _simulate(condition, tmp_path, monkeypatch)
    code = cli.main(argv)
    monkeypatch.undo()  # the tree is read with the real OS calls
    out, err = capsys.readouterr()
    command = template[0] if template[0] in cli.COMMANDS else ""
    if template[:2] == ["bench", "reference"]:
        command = "bench reference"
    lines = err.strip().splitlines()
    assert code != 0
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dsn-robust {command}: error: " if command else "dsn-robust: error: "), err
    assert culprit.lower() in lines[0].lower(), err
    assert "unexpected" not in lines[0] and "Traceback" not in err
    assert _tree(tmp_path, attacked, tiny_runs["resnet"].root) == before


# -- the catch-all ----------------------------------------------------------------------------------------------


def test_an_unexpected_error_is_one_line_and_a_saved_traceback(tmp_path, monkeypatch, capsys):
    import robustness.app.commands.datasets as datasets_command

    def broken(args):
        raise ZeroDivisionError("the bug under test")
    monkeypatch.setattr(datasets_command, "list_datasets", lambda: broken(None))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code = cli.main(["datasets"])
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("dsn-robust datasets: error: unexpected ZeroDivisionError: the bug under test")
    saved = list((tmp_path / "cache" / "dsn-robust").glob("crash-*.txt"))
    assert len(saved) == 1 and str(saved[0]) in err
    text = saved[0].read_text()
    assert "Traceback" in text and "the bug under test" in text and "broken" in text

    code = cli.main(["datasets", "-v"])  # a developer asks for the traceback on the terminal
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and "ZeroDivisionError: the bug under test" in err


def test_ctrl_c_keeps_its_resume_message(monkeypatch, capsys):
    import robustness.app.commands.models as models_command

    def interrupt(pattern="*"):
        raise KeyboardInterrupt
    monkeypatch.setattr(models_command, "list_models", interrupt)
    assert cli.main(["models"]) == 130
    assert "interrupted; finished work is saved, rerun with --resume" in capsys.readouterr().err


# -- CLI polish -------------------------------------------------------------------------------------------------


def test_version_is_the_package_metadata(capsys):
    assert package_version() == metadata.version("dsn-robustness")
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dsn-robust {metadata.version('dsn-robustness')}"


@pytest.mark.parametrize("argv", [["-q", "models"], ["models", "-q"], ["models", "--quiet"]])
def test_quiet_works_before_and_after_the_command(argv):
    args = cli.build_parser().parse_args(argv)
    assert args.quiet and not args.verbose


def test_verbose_after_a_mode_and_absent_flags_stay_off():
    parser = cli.build_parser()
    assert parser.parse_args(["bench", "reference", "RUN", "-v"]).verbose
    plain = parser.parse_args(["-v", "models"])
    assert plain.verbose and not plain.quiet  # the subcommand's own -v/-q must not reset the main parser's


def _all_help() -> dict[str, str]:
    parser = cli.build_parser()
    found = {"dsn-robust": parser.format_help()}
    for child in cli._subcommand_parsers(parser):
        found[child.prog] = child.format_help()
    return found


def test_help_shows_percent_signs_once():
    pages = _all_help()
    assert {"dsn-robust bench", "dsn-robust bench reference", "dsn-robust attack", "dsn-robust run"} <= set(pages)
    assert all("%%" not in text for text in pages.values()), [p for p, t in pages.items() if "%%" in t]
    assert "80% of its free memory" in " ".join(pages["dsn-robust attack"].split())


def test_models_lists_each_models_own_options(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    listed = {line.split(":")[0]: line.split(": ", 1)[1].split(", ") for line in out.splitlines()
              if line.split(":")[0] in list_models()}
    assert set(listed) == set(list_models())
    for name, options in listed.items():
        assert options == model_options(name)
    assert "gate_fn" in listed["dsn"] and "gate_fn" not in listed["resnet"]


def test_run_set_overrides_any_table(tmp_path):
    tables = apply_overrides({"attack": {"n": 64, "pgd": {"steps": 3}}},
                             ["attack.n=256", "attack.pgd.restarts=2", "train.lr=0.5", "attack.device=cpu",
                              'run.models=["dsn", "resnet"]'])
    assert tables == {"attack": {"n": 256, "device": "cpu", "pgd": {"steps": 3, "restarts": 2}},
                      "train": {"lr": 0.5}, "run": {"models": ["dsn", "resnet"]}}
    from robustness.app.pipeline import PipelineConfig
    config = PipelineConfig.from_file(REPO / "configs" / "quickstart.toml",
                                      overrides=["attack.n=24", "train.epochs=2", 'run.models=["dsn","resnet"]',
                                                 'run.transfer=["resnet->dsn"]'])
    assert config.attack.n == 24 and config.train.epochs == 2 and config.plan.models == ["dsn", "resnet"]


# -- progress ---------------------------------------------------------------------------------------------------


def test_progress_off_a_terminal_is_one_log_line_per_finished_step(caplog):
    stream = io.StringIO()  # not a terminal
    with caplog.at_level(logging.INFO, logger="robustness.core.progress"):
        with progress_bar(total=3, desc="attack dsn", unit="eval", stream=stream) as bar:
            assert isinstance(bar, LineProgress)
            for _ in range(3):
                bar.set_postfix(loss="0.5")
                bar.update(1)
    assert stream.getvalue() == ""  # no carriage-return bar in the log
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines] == ["attack dsn: 1/3 eval (33%)", "attack dsn: 2/3 eval (67%)",
                                                       "attack dsn: 3/3 eval (100%)"]
    assert all("loss=0.5" in line for line in lines)


def test_progress_every_n_steps_and_disabled(caplog):
    with caplog.at_level(logging.INFO, logger="robustness.core.progress"):
        bar = progress_bar(total=10, desc="epoch 1/2", unit="batch", every=4, stream=io.StringIO())
        for _ in range(10):
            bar.update(1)
        bar.close()
        quiet = progress_bar(total=5, disable=True, stream=io.StringIO())
        quiet.update(5)
        quiet.close()
    counts = [r.getMessage().split(" ")[2] for r in caplog.records]
    assert counts == ["4/10", "8/10", "10/10"]


def test_progress_on_a_terminal_is_a_tqdm_bar():
    from tqdm import tqdm

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True
    bar = progress_bar(total=2, desc="x", unit="it", stream=Terminal())
    try:
        assert isinstance(bar, tqdm)
    finally:
        bar.close()



@pytest.mark.parametrize("columns", [0, 120])
def test_progress_on_a_terminal_of_any_width_draws_the_count(columns):
    import fcntl
    import os
    import pty
    import struct
    import termios

    master, slave = pty.openpty()  # a real terminal, reporting the width under test
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    with os.fdopen(slave, "w") as stream:
        bar = progress_bar(total=3, desc="attack", unit="shard", stream=stream)
        bar.update(3)
        bar.close()
    chunks = []
    while True:  # everything written, to the end: the slave is closed, so the read ends (EIO or b"")
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    drawn = b"".join(chunks).decode()
    final = [part for part in drawn.split("\r") if part.strip()][-1]  # the last redraw (tqdm may add a bare "\r")
    assert "3/3 [" in final and final.endswith("shard/s]")  # at 0 columns tqdm cut the meter short: "3/3 [00:00<"


# -- property tests: every value either fits or is a DSNError -----------------------------------------------------

VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 12, 10 ** 12),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                   st.lists(st.one_of(st.integers(-5, 300), st.text(max_size=6), st.floats()), max_size=3),
                   st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _fits_or_dsn_error(make) -> None:
    try:
        make()
    except DSNError as err:
        assert str(err) and "\n" not in str(err).strip()


@FAST
@given(field=st.sampled_from([f for f in TrainConfig().to_dict()]), value=VALUES)
def test_train_config_values_parse_or_raise_a_dsn_error(field, value):
    _fits_or_dsn_error(lambda: TrainConfig.from_dict({**TrainConfig().to_dict(), field: value}, where="test"))


@FAST
@given(field=st.sampled_from(sorted(AttackConfig().to_dict())), value=VALUES)
def test_attack_config_values_parse_or_raise_a_dsn_error(field, value):
    _fits_or_dsn_error(lambda: AttackConfig.from_table({field: value}, where="test"))


SMALL = st.one_of(st.none(), st.booleans(), st.integers(-3, 9), st.floats(-3, 9), st.text(max_size=5),
                  st.lists(st.floats(0, 1), max_size=4))


@FAST
@given(name=st.sampled_from(["dsn", "dual", "resnet"]), data=st.data())
def test_model_options_build_or_raise_a_dsn_error(name, data):
    option = data.draw(st.sampled_from([o for o in model_options(name) if o not in ("num_fine", "num_coarse")]))
    value = data.draw(SMALL)
    base = dict(num_fine=4, num_coarse=2, depth_n=2, width=4, image_size=8)
    _fits_or_dsn_error(lambda: create_model(name, **{**base, option: value}))


@FAST
@given(text=st.one_of(st.text(max_size=20), st.from_regex(r"-?[0-9.e+-]{1,12}(/[0-9.e+-]{1,12})?", fullmatch=True)))
def test_eps_strings_parse_or_raise_a_dsn_error(text):
    try:
        eps = parse_eps(text)
    except DSNError:
        return
    assert eps == eps  # never NaN


@FAST
@given(eps=st.lists(st.text(max_size=10), min_size=1, max_size=3), attacks=st.lists(st.text(max_size=8), max_size=3),
       n=st.one_of(st.integers(), st.text(max_size=4)))
def test_attack_flags_parse_or_raise_a_dsn_error(eps, attacks, n):
    _fits_or_dsn_error(lambda: AttackConfig.from_table({"eps": eps, "attacks": attacks, "n": n}, where="test"))


@FAST
@given(text=st.text(max_size=30))
def test_set_overrides_parse_or_raise_a_dsn_error(text):
    try:
        parts, _ = parse_override(text)
    except DSNError:
        return
    assert parts[0] in SECTIONS and len(parts) >= 2


@FAST
@given(key=st.text(alphabet="ab._ ", max_size=6), raw=st.text(max_size=12))
def test_run_and_attack_read_set_with_one_grammar(key, raw):
    """``run --set attack.KEY=VALUE`` and ``attack --set ATTACK.KEY=VALUE`` are one parser: the same key parts
    and the same TOML value, or the same kind of one-line error."""
    try:
        parts, value = parse_override(f"attack.pgd.{key}={raw}")
    except DSNError as err:
        with pytest.raises(DSNError) as other:
            parse_setting(f"pgd.{key}={raw}")
        assert str(err).split(": write")[1].split(", e.g.")[0] == " TABLE.KEY=VALUE"
        assert str(other.value).split(": write")[1].split(", e.g.")[0] == " ATTACK.KEY=VALUE"
        return
    attack, sub, again = parse_setting(f"PGD.{key}={raw}")
    assert (attack, sub) == ("pgd", ".".join(parts[2:])) and again == value


@FAST
@given(values=st.dictionaries(st.sampled_from(["models", "transfer", "transfer_attack", "open_mode", "workers"]),
                              VALUES, max_size=3))
def test_run_table_values_parse_or_raise_a_dsn_error(values):
    from robustness.app.pipeline import RunPlan
    _fits_or_dsn_error(lambda: build(RunPlan, values, where="[run]"))


# -- one zero-input-gradient verdict on both pages ------------------------------------------------------------------


def test_report_and_comparison_show_the_same_zero_gradient_verdict(attacked, tmp_path):
    from reports.run_page import write_report
    from robustness.findings.compare import compare_runs
    from robustness.results import load_run

    run = load_run(attacked)
    run.manifest["zero_grad_share"] = {"hard/none": 0.4, "hard/sharp": 0.0}  # as an attack run measures it
    report = write_report(run, tmp_path / "report", n_boot=0)
    comparison = compare_runs([run, run], labels=["a", "b"], n_boot=0)
    on_report = next(c for c in report.checks if c.name == "zero-input-gradient")
    on_compare = next(c for c in comparison.sanity["a"] if c.name == "zero-input-gradient")
    assert on_report == on_compare and on_report.status == "warn" and "hard/none" in on_report.evidence
    page = (tmp_path / "report" / "index.html").read_text()
    assert on_report.evidence.split(" of samples")[0] in page


def test_progress_lines_estimate_the_time_left(caplog, monkeypatch):
    import logging

    from robustness.core import progress

    clock = iter([0.0, 10.0, 20.0, 30.0, 40.0])

    class Clock:  # the progress module's clock only: the real time module stays as it is for everyone else
        perf_counter = staticmethod(lambda: next(clock))

    monkeypatch.setattr(progress, "time", Clock)
    bar = progress.LineProgress(total=4, desc="attack dsn", unit="eval")
    with caplog.at_level(logging.INFO, logger=progress.log.name):
        bar.update(1)  # 10 s for 1 of 4: 30 s left
        bar.update(2)  # 20 s for 3 of 4: about 7 s left
        bar.update(1)  # done: nothing left to estimate
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["attack dsn: 1/4 eval (25%), 10.0s, about 30s left",
                     "attack dsn: 3/4 eval (75%), 20.0s, about 7s left", "attack dsn: 4/4 eval (100%), 30.0s"]


def test_a_long_step_logs_that_it_is_still_running_and_stops_when_it_ends(caplog):
    import logging
    import time

    from robustness.core import progress

    with caplog.at_level(logging.INFO, logger=progress.log.name):
        with progress.heartbeat("square__torchattacks on batch 1 of 2", every=0.05):
            time.sleep(0.28)
        beats = len(caplog.records)
        time.sleep(0.15)
    assert beats >= 3 and len(caplog.records) == beats  # silent once the step is over
    assert caplog.records[0].getMessage().startswith("square__torchattacks on batch 1 of 2: still running, 0s")
    with caplog.at_level(logging.INFO, logger=progress.log.name):
        caplog.clear()
        with progress.heartbeat("quick", every=0.05, disable=True):
            time.sleep(0.12)
    assert not caplog.records
