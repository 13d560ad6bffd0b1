"""``dsn-robust --version`` and ``--help`` start without the heavy libraries (issue "a fast CLI").

The main parser lists the commands from :data:`robustness.app.cli.COMMAND_HELP` and :func:`robustness.app.cli.main` builds
only the invoked command's parser, so the cheap answers import neither torch, pandas nor matplotlib. Each such check
runs in a fresh interpreter (this test process has long imported them); the speed itself is measured, not tested.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from robustness.app import cli

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "pandas", "matplotlib", "scipy")
COMMAND_NAMES = [name.replace("_", "-") for name in cli.COMMANDS]


def _fresh_main(argv: list[str]) -> dict:
    """``cli.main(argv)`` in a new interpreter: its exit code, stdout, and which heavy modules it imported."""
    script = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from robustness.app import cli
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                code = cli.main({argv!r})
            except SystemExit as stop:
                code = stop.code
        print(json.dumps({{"code": code, "out": out.getvalue(),
                          "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_version_imports_no_heavy_library():
    result = _fresh_main(["--version"])
    assert result["code"] == 0
    assert result["out"].strip() == f"dsn-robust {metadata.version('dsn-robustness')}"
    assert result["heavy"] == []


def test_help_lists_every_command_without_importing_one():
    result = _fresh_main(["--help"])
    assert result["code"] == 0
    assert result["heavy"] == []
    listed = " ".join(result["out"].split())
    for name in COMMAND_NAMES:
        assert f" {name} " in listed, name
    assert " ".join(cli.COMMAND_HELP["check_model"].split()) in listed


@pytest.mark.parametrize("command", ["report", "check-model"])
def test_a_light_commands_help_stays_light(command):
    result = _fresh_main([command, "--help"])
    assert result["code"] == 0 and f"usage: dsn-robust {command}" in result["out"]
    assert result["heavy"] == []


def test_the_lazy_main_parser_is_the_full_one():
    """The main parser lists each command with the same line whether it was built (tests, ``build_parser()``) or
    only listed (``main``), and one command built in full parses as in the full parser."""
    assert cli.build_parser([]).format_help() == cli.build_parser().format_help()
    full, lazy = cli.build_parser(), cli.build_parser(["bench"])
    argv = ["-q", "bench", "--device", "cpu", "reference", "R", "--eps", "2/255", "-v"]
    assert vars(lazy.parse_args(argv)) == vars(full.parse_args(argv))


@pytest.mark.parametrize("argv, command", [
    (["--version"], None), (["--help"], None), ([], None), (["teleport"], None),
    (["-v", "train", "--out", "x"], "train"), (["check-model", "m.py", "--dataset", "digits"], "check_model"),
    (["--quiet", "bench", "reference", "R"], "bench"), (["attack", "report"], "attack"),
])
def test_the_invoked_command_is_the_first_word(argv, command):
    assert cli.invoked_command(argv) == command


def test_attack_help_still_shows_its_options(capsys):
    assert cli.main(["attack", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dsn-robust attack") and "--eps" in out and "--preset" in out


@pytest.mark.parametrize("argv, start", [
    (["attack"], "dsn-robust attack: error: the following arguments are required: RUN_DIR"),
    (["-q", "report", "R", "--bogus"], "dsn-robust report: error: unrecognized arguments: --bogus"),
    (["bench", "reference"], "dsn-robust bench reference: error: the following arguments are required: RUN_DIR"),
    (["teleport"], "dsn-robust: error: argument COMMAND: invalid choice: 'teleport'"),
])
def test_a_usage_error_is_still_one_line(argv, start, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(start), err
    if argv == ["teleport"]:
        assert all(repr(name) in err for name in COMMAND_NAMES)
