"""The layered layout of DESIGN.md is a checked contract, not a hope: `lint-imports` reads pyproject.toml."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", script, "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_layer_contract_holds() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_layer_contract_catches_an_upward_import(tmp_path: Path) -> None:
    """The same contract on a copy of the tree with one upward import (core importing models) is broken."""
    for name in ("robustness", "models", "attacks", "reports"):
        subprocess.run(["cp", "-r", str(ROOT / name), str(tmp_path / name)], check=True)
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    (tmp_path / "robustness" / "core" / "upward.py").write_text("import models.registry\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "robustness.core.upward -> models.registry" in result.stdout
