"""Writing reports: the shared rendering of the one-run page (:mod:`reports.run_page`, ``write_report``) and the
skip vs no-skip comparison page (:mod:`reports.compare_page`, ``write_comparison``).

Rendering only: the run comes loaded (``robustness.results``), the verdict comes computed
(``robustness.findings.compare``). Each report is a self-contained ``index.html`` (figures as base64 ``data:``
URIs, inline CSS, no external references), a Markdown twin with figures under ``figures/``, a CSV and a versioned
JSON. Every file is written atomically; ``index.html`` is written last.
"""
from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from reports import tables
from robustness.core.files import atomic_write, atomic_write_text
from robustness.core.runtime import jsonable
from robustness.sanity import Check


@dataclass
class FigureItem:
    """A figure slot of a report: the PNG when produced, else the reason it is not."""

    name: str
    title: str
    caption: str
    png: bytes | None
    reason: str = ""

    @property
    def produced(self) -> bool:
        return self.png is not None

    @property
    def file(self) -> str:
        """Path relative to the report directory."""
        return f"figures/{self.name}.png"

    @property
    def png_b64(self) -> str | None:
        return base64.b64encode(self.png).decode("ascii") if self.png is not None else None


@dataclass
class TableItem:
    """A display table rendered once for HTML and once for Markdown."""

    title: str
    frame: pd.DataFrame
    note: str = ""
    collapsed: bool = False
    html: Markup = field(init=False)
    md: str = field(init=False)

    def __post_init__(self) -> None:
        quiet = self.frame.empty and bool(self.note)  # the note already says why there is nothing
        self.html = Markup("" if quiet else tables.to_html(self.frame))
        self.md = "" if quiet else tables.to_markdown(self.frame)


@lru_cache(maxsize=1)
def _env() -> Environment:
    return Environment(loader=FileSystemLoader(str(Path(__file__).parent / "templates")),
                       autoescape=select_autoescape(enabled_extensions=("html.j2",), default_for_string=False,
                                                    default=False),
                       undefined=StrictUndefined, trim_blocks=False, lstrip_blocks=False, keep_trailing_newline=True)


def _render(template: str, context: Mapping[str, Any]) -> str:
    return _env().get_template(template).render(**context)


def _json_text(payload: Mapping[str, Any]) -> str:
    return json.dumps(jsonable(payload), indent=2, allow_nan=False) + "\n"


def _sanity_rows(checks: Sequence[Check]) -> list[dict[str, str]]:
    """The checks as the JSON payloads list them (name, status, evidence)."""
    return [{"name": c.name, "status": c.status, "evidence": c.evidence} for c in checks]


def _write_outputs(out: Path, figures: Sequence[FigureItem], texts: Mapping[str, str], html: str) -> None:
    """Figures, then the text files, then ``index.html`` — each atomically; stale figures are removed. When a write
    fails (a folder that cannot be written, a full disk: one RunDirError line from ``atomic_write``) the folders
    this call created are removed again, so a failed report leaves no half-made output behind."""
    created = _first_missing(out)
    try:
        fig_dir = out / "figures"
        for f in figures:
            target = out / f.file
            if f.png is not None:
                atomic_write(target, lambda tmp, data=f.png: tmp.write_bytes(data))
            elif target.is_file():  # is_file, not unlink(missing_ok): under a regular file unlink is ENOTDIR
                target.unlink()
        for name, text in texts.items():
            atomic_write_text(out / name, text)
        atomic_write_text(out / "index.html", html)
        if fig_dir.is_dir() and not any(fig_dir.iterdir()):
            fig_dir.rmdir()
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet: what writing there creates."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing
