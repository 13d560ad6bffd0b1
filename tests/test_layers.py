"""The layered layout of DESIGN.md is a checked contract, not a hope: `lint-imports` reads pyproject.toml."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", script, "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_layer_contract_holds() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, imports", [
    ("robustness/core/upward.py", "models.registry"),  # the ground floor reaching up
    ("robustness/analysis/sideways.py", "robustness.results"),  # independent siblings of one floor
    ("robustness/sanity/upward.py", "robustness.findings.run"),  # the loop the findings floor removed
    ("robustness/app/api_data_upward.py", "robustness.app.cli"),  # inside the roof, the API's data reaching the CLI
], ids=["core-up", "analysis-results-sideways", "sanity-findings", "inside-the-roof"])
def test_layer_contract_catches_an_import_against_the_layers(tmp_path: Path, module: str, imports: str) -> None:
    """The same contract on a copy of the tree with one forbidden import added is broken, naming that import."""
    for name in ("robustness", "models", "attacks", "reports"):
        subprocess.run(["cp", "-r", str(ROOT / name), str(tmp_path / name)], check=True)
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    source = tmp_path / module
    if source.name == "api_data_upward.py":  # a module the roof's contract names: api_data itself
        source = source.with_name("api_data.py")
        source.write_text(source.read_text() + f"\nimport {imports}  # noqa\n")
    else:
        source.write_text(f"import {imports}\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    importer = ".".join(source.relative_to(tmp_path).with_suffix("").parts)
    assert f"{importer} -> {imports}" in result.stdout
