"""A run's results, loaded once: attack records, attack manifest, training metrics and config.

:func:`load_run` is the one place that reads them (through :class:`robustness.core.rundir.RunDir` and
``attacks.records``); analysis, reports, the comparison and the pipeline are handed the :class:`RunResults`. It
refuses records that are not the run's model's or that mix settings (:func:`attacks.runner.run.verify_records`
says why refusing beats flagging) and names a corrupt shard with its fix.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from attacks.base import GRADIENT_FREE
from attacks.records import RECORD_COLUMNS, conform, read_records
from attacks.runner.run import verify_records
from robustness.core.errors import RunDirError
from robustness.core.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass
class RunResults:
    """Everything a report needs from one run directory."""

    path: Path
    name: str
    records: pd.DataFrame
    manifest: dict[str, Any] = field(default_factory=dict)
    metrics: pd.DataFrame | None = None
    config: dict[str, Any] | None = None

    @property
    def model(self) -> str:
        """Model name from the manifest, else from the records, else ''."""
        if self.manifest.get("model"):
            return str(self.manifest["model"])
        return str(self.records["model"].iloc[0]) if len(self.records) else ""

    @property
    def dataset_name(self) -> str:
        """The attacked dataset's name from the manifest ('' when unknown)."""
        dataset = self.manifest.get("dataset")
        return str(dataset.get("name", "")) if isinstance(dataset, dict) else str(dataset or "")

    @property
    def eps(self) -> list[float]:
        """The eps values the records hold, ascending."""
        return sorted(float(e) for e in self.records["eps"].unique()) if len(self.records) else []

    @property
    def path_names(self) -> list[str]:
        """Names of the gated blocks, in path-bit order ([] when unknown or ungated)."""
        return [str(p) for p in self.manifest.get("path_names") or []]

    @property
    def full_macs(self) -> float | None:
        """Per-sample MACs with every block executed, or None when the manifest lacks it."""
        value = self.manifest.get("full_macs")
        return float(value) if value else None

    @property
    def evaluations(self) -> list[dict[str, Any]]:
        """The manifest's evaluation entries (what was attacked, how), [] when unknown."""
        return list(self.manifest.get("evaluations") or [])

    @property
    def zero_grad_share(self) -> dict[str, float] | None:
        """Share of all-zero input gradients per ``gate_mode/gate_grad``, as the attack run measured it."""
        return self.manifest.get("zero_grad_share")

    @property
    def surrogate_fidelity(self) -> dict[str, float]:
        """Per ``gate_mode/gate_grad``: how often the attacker's surrogate predicts what the deployed model does."""
        return {str(k): float(v) for k, v in (self.manifest.get("surrogate_fidelity") or {}).items()}

    @property
    def gradient_free_queries(self) -> int | None:
        """Queries per sample of the run's gradient-free attack (queries x restarts; the largest if several),
        None when none ran or the manifest does not say."""
        budgets = [int(e["config"].get("queries", 0)) * int(e["config"].get("restarts", 1))
                   for e in self.evaluations
                   if e.get("kind") == GRADIENT_FREE and isinstance(e.get("config"), dict)
                   and e["config"].get("queries")]
        return max(budgets) if budgets else None

    @property
    def seed(self) -> int | None:
        """The attack run's seed (from the manifest, else from the records)."""
        if self.manifest.get("seed") is not None:
            return int(self.manifest["seed"])
        return int(self.records["seed"].iloc[0]) if len(self.records) else None

    @property
    def n(self) -> int:
        """Samples attacked (from the manifest, else counted in the records)."""
        if self.manifest.get("n") is not None:
            return int(self.manifest["n"])
        return int(self.records["sample"].nunique()) if len(self.records) else 0

    @property
    def dataset(self) -> Any:
        """The manifest's dataset entry (DatasetInfo as a dict), or '' when unknown."""
        return self.manifest.get("dataset", "")

    @property
    def versions(self) -> dict[str, str]:
        """Package versions that produced the records."""
        return dict(self.manifest.get("versions") or {})

    @property
    def fine_to_coarse(self) -> list[int] | None:
        """Superclass of each fine class, when the manifest's dataset entry gives it."""
        dataset = self.manifest.get("dataset")
        mapping = dataset.get("fine_to_coarse") if isinstance(dataset, dict) else None
        return [int(c) for c in mapping] if mapping else None

    @property
    def subset(self) -> dict[str, Any]:
        """How the attacked samples were chosen, as the attack run recorded it (manifest ``subset``: ``rule``
        (``stratified`` or ``first``), ``seed``, ``indices`` (test-split indices in sample order), ``sha256`` (of
        the attacked images and labels) and ``class_counts`` (fine label -> count)); {} for older runs."""
        subset = self.manifest.get("subset")
        return dict(subset) if isinstance(subset, dict) else {}

    @property
    def final_test_accuracy(self) -> dict[str, float]:
        """The last training epoch's test accuracy per head (``{"fine": ..., "coarse": ...}``, fractions) from
        ``metrics.csv``; {} when the run has no training metrics (a model handed over from outside)."""
        if self.metrics is None or not len(self.metrics):
            return {}
        last = self.metrics.iloc[-1]
        return {head: float(last[f"test_acc_{head}"]) for head in ("fine", "coarse")
                if f"test_acc_{head}" in self.metrics.columns and pd.notna(last[f"test_acc_{head}"])}

    @property
    def chance_accuracy(self) -> float | None:
        """1 / number of fine classes of the attacked dataset, None when the manifest does not say."""
        dataset = self.manifest.get("dataset")
        classes = dataset.get("fine_classes") if isinstance(dataset, dict) else None
        return 1.0 / len(classes) if classes else None


def load_run(run_dir: str | Path, require_records: bool = True) -> RunResults:
    """Load ``run_dir``'s attack records, manifest, metrics and config.

    Raises ``RunDirError`` when the directory does not exist, (with ``require_records``) holds no attack records,
    or holds records of another model or of mixed settings, or a corrupt shard.
    """
    rd = RunDir.at(run_dir).require()
    has_records = rd.has_records()
    if require_records and not has_records:
        raise RunDirError(f"no attack records under {rd.root}; run `dsn-robust attack {rd.root}` first")
    manifest = rd.read_manifest() or {}
    if has_records:
        verify_records(rd, manifest)
    try:
        records = read_records(rd.records) if has_records else conform(pd.DataFrame(columns=list(RECORD_COLUMNS)))
    except (OSError, ValueError) as err:
        raise RunDirError(f"cannot read attack records under {rd.records}: {err}") from None
    metrics = None
    if rd.metrics.is_file():
        try:
            metrics = pd.read_csv(rd.metrics)
        except (OSError, ValueError) as err:
            log.warning("ignoring unreadable %s: %s", rd.metrics, err)
    name = str(manifest.get("run") or rd.name)
    config = rd.read_config() if rd.config.is_file() else None
    return RunResults(path=rd.root, name=name, records=records, manifest=manifest, metrics=metrics, config=config)
