"""A run's results, loaded once: attack records, attack manifest, training metrics and config.

:func:`load_run` is the one place that reads them (through :class:`robustness.core.rundir.RunDir` and
``attacks.records``); analysis, reports, the comparison and the pipeline are handed the :class:`RunResults`. It
refuses records that are not the run's model's or that mix settings (:func:`attacks.runner.provenance.verify_records`
says why refusing beats flagging) and names a corrupt shard with its fix.

Completeness has one owner, :class:`RunResults`: when a run is loaded, every evaluation of its manifest is checked
against the disk (a shard per batch, ``RunDir.shard(evaluation id, batch)`` for batch < the manifest's
``n_batches``) and against the records (every one of the manifest's ``n`` samples present). Records that an
interrupted or damaged attack left short still load (a report of them is useful), but ``RunResults.complete`` is
False and ``RunResults.incomplete_line`` says what is missing and how to finish it; the report shows that line at
the top and ``dsn-robust report --strict`` refuses to pass it.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attacks.base import GRADIENT_FREE
from attacks.records import RECORD_COLUMNS, conform, read_records
from attacks.runner.provenance import verify_records
from robustness.core.errors import RunDirError
from robustness.core.rundir import RunDir

log = logging.getLogger(__name__)

#: the record columns that name an evaluation (its manifest entry's fields of the same names)
EVALUATION_KEYS = ("attack", "backend", "norm", "gate_mode", "gate_grad", "target", "source_run")
#: evaluations named one by one in :attr:`RunResults.incomplete_line`, before "k more evaluations"
SHORTFALLS_LISTED = 3


@dataclass(frozen=True)
class Shortfall:
    """One evaluation of the manifest whose records are not all there: ``shards`` of its ``n_batches`` shards
    exist (``n_batches`` 0: the manifest does not say how many it needs), its records hold ``samples`` of the
    ``n`` samples attacked, and ``short`` names the shards that exist but lack some of their batch's samples."""

    evaluation: str
    shards: int
    n_batches: int
    samples: int
    n: int
    short: tuple[str, ...] = ()

    @property
    def missing_shards(self) -> int:
        return max(self.n_batches - self.shards, 0)

    @property
    def clause(self) -> str:
        """``3 of 8 shards of pgd__… (6 of 16 samples)``, naming the shards that exist but lack samples."""
        shards = f"{self.shards} of {self.n_batches} shards" if self.n_batches else "records"
        short = f"; {', '.join(self.short)} short of samples" if self.short else ""
        return f"{shards} of {self.evaluation} ({self.samples} of {self.n} samples{short})"

    def as_dict(self) -> dict[str, Any]:
        return {"evaluation": self.evaluation, "shards": self.shards, "n_batches": self.n_batches,
                "missing_shards": self.missing_shards, "samples": self.samples, "n": self.n,
                "short_shards": list(self.short)}


@dataclass
class RunResults:
    """Everything a report needs from one run directory."""

    path: Path
    name: str
    records: pd.DataFrame
    manifest: dict[str, Any] = field(default_factory=dict)
    metrics: pd.DataFrame | None = None
    config: dict[str, Any] | None = None
    shortfalls: tuple[Shortfall, ...] = ()  # evaluations whose records are not all there (load_run finds them)

    @property
    def complete(self) -> bool:
        """Whether every evaluation of the manifest has all its shards and all its samples (see the module
        docstring); True for results handed over without a manifest to check them against."""
        return not self.shortfalls

    @property
    def missing_shards(self) -> int:
        """Shards the manifest's evaluations need that are not on disk."""
        return sum(s.missing_shards for s in self.shortfalls)

    @property
    def incomplete_line(self) -> str:
        """'' for a complete run, else one line: ``INCOMPLETE: 3 of 8 shards of pgd__… (6 of 16 samples); …
        (resume with `dsn-robust attack RUN --resume`)``."""
        if not self.shortfalls:
            return ""
        listed = [s.clause for s in self.shortfalls[:SHORTFALLS_LISTED]]
        more = len(self.shortfalls) - len(listed)
        if more:
            listed.append(f"{more} more evaluation{'s' if more > 1 else ''}")
        fix = f"resume with `dsn-robust attack {self.path} --resume`"
        if any(s.short for s in self.shortfalls):
            fix = "delete the short shards, then " + fix
        return (f"INCOMPLETE: {'; '.join(listed)}; the numbers cover only the records present ({fix})")

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
    def model_check(self) -> dict[str, Any]:
        """The manifest's check of an adapted model (``models.fidelity.ModelCheck.to_dict`` and ``draws``), {} when
        the run's model was not checked (the suite's own models)."""
        check = self.manifest.get("model_check")
        return dict(check) if isinstance(check, dict) else {}

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
    return RunResults(path=rd.root, name=name, records=records, manifest=manifest, metrics=metrics, config=config,
                      shortfalls=shortfalls(rd, manifest, records))


def shortfalls(rd: RunDir, manifest: dict[str, Any], records: pd.DataFrame) -> tuple[Shortfall, ...]:
    """The evaluations of ``manifest`` whose shards (one per batch, ``n_batches`` of them; when the manifest
    lacks it, ``ceil(n / batch_size)``; unknown without either) or samples (``n``) are not all in ``rd`` and
    ``records``, in manifest order."""
    try:
        n = int(manifest.get("n") or 0)
        batch_size = int(manifest.get("batch_size") or 0)
        n_batches = int(manifest.get("n_batches") or (math.ceil(n / batch_size) if n and batch_size else 0))
    except (TypeError, ValueError):
        raise RunDirError(f"{rd.manifest}: n, batch_size or n_batches is not a number; rerun the attack with "
                          f"--force to start over") from None
    evaluations = [e for e in manifest.get("evaluations") or [] if isinstance(e, dict) and e.get("id")]
    if not n or not evaluations:
        return ()
    present: dict[tuple[str, ...], np.ndarray] = {}
    if len(records):
        keyed = records[list(EVALUATION_KEYS)].astype(str).assign(sample=records["sample"].to_numpy())
        for key, group in keyed.groupby(list(EVALUATION_KEYS), sort=False):
            present[tuple(key)] = np.unique(group["sample"].to_numpy())
    out = []
    for entry in evaluations:
        eval_id = str(entry["id"])
        key = tuple("" if entry.get(k) is None else str(entry.get(k)) for k in EVALUATION_KEYS)
        samples = present.get(key, np.empty(0, dtype=np.int64))
        samples = samples[(samples >= 0) & (samples < n)]
        on_disk = {b for b in range(n_batches) if rd.shard(eval_id, b).is_file()}
        short: tuple[str, ...] = ()
        if batch_size and len(samples) < n:  # the shards that exist but lack samples of their batch
            lacking = np.unique(np.setdiff1d(np.arange(n), samples) // batch_size)
            short = tuple(rd.shard(eval_id, int(b)).name for b in lacking if int(b) in on_disk)
        if len(on_disk) < n_batches or len(samples) < n:
            out.append(Shortfall(eval_id, len(on_disk), n_batches, int(len(samples)), n, short))
    return tuple(out)
