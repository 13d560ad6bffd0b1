"""The per-sample attack record: the contract between attacks, analysis and reports.

One row per (run, attack, backend, norm, eps, gate_mode, gate_grad, target, sample). Rows are stored as Parquet
shards under ``RUN_DIR/attacks/records/`` and read back with :func:`read_records`.

Columns (dtype):

===================  =======  =====================================================================================
run                  string   name of the run directory the model came from
model                string   registry name of the model (``dsn``, ``dual``, ``resnet``)
attack               string   attack name (``fgsm``, ``pgd``, ``apgd-ce``, ``apgd-dlr``, ``square``, ``fmn``,
                              ``pgd-bisect``, ``ddn``, ``cw``, ``path``, ``slowdown``); for transfer, the attack run
                              on ``source_run``
backend              string   ``torchattacks``, ``foolbox`` or ``native`` (our own gate-aware attacks)
norm                 string   ``linf`` or ``l2``
eps                  float64  the budget in [0, 1] pixel units (``inf`` for an unbounded attack)
gate_mode            string   forward mode the model was attacked *and* evaluated in (``hard``, ``open``, ...)
gate_grad            string   routing gradient the attacker saw (``none``, ``ste``, ``bpda``, ``sharp``, ``eot``)
target               string   head under attack: ``fine`` or ``coarse``
source_run           string   run the example was crafted on ('' for white-box; another run for transfer)
sample               int64    index of the sample in the evaluation split
seed                 int64    the seed of the evaluation
label_fine           int64    true fine label
label_coarse         int64    true coarse label
clean_pred_fine      int64    fine prediction on the clean input
clean_pred_coarse    int64    coarse prediction on the clean input
adv_pred_fine        int64    fine prediction on the adversarial input
adv_pred_coarse      int64    coarse prediction on the adversarial input
clean_correct        bool     clean prediction of the target head is right
adv_correct          bool     adversarial prediction of the target head is right
success              bool     ``clean_correct and not adv_correct`` (recomputed from model outputs)
robust               bool     ``clean_correct and adv_correct``: what robust accuracy counts (RobustBench's rule; a
                              misclassified sample that an attack pushes to the right class is not robust)
linf                 float64  L-inf norm of (adv - clean)
l2                   float64  L2 norm of (adv - clean)
clean_path           string   gate bits on the clean input, coarse-branch gates then fine-branch gates ('' if none)
adv_path             string   gate bits on the adversarial input, same order
hamming              int64    number of differing bits between clean_path and adv_path
clean_macs           float64  MACs the model executed on the clean input
adv_macs             float64  MACs the model executed on the adversarial input
frozen_pred_fine     int64    fine prediction on the adversarial input with gates frozen to ``clean_path``
frozen_pred_coarse   int64    coarse prediction, same
frozen_correct       bool     target-head prediction under the frozen clean path is right
===================  =======  =====================================================================================

For a model without gates, paths are '' and the frozen predictions equal the adversarial ones.

Minimal distances: a minimal-perturbation attack (kind ``minimal``: ``fmn``, ``pgd-bisect``, ``ddn``, ``cw``) has a
row per sample at ``eps = inf`` holding the smallest adversarial example it found (re-scored and [0, 1]-checked like
every row; the clean image where it found none, so ``success`` is False there). Its ``linf`` / ``l2`` column (the
one of its ``norm``) is the sample's distance under that attack and routing gradient;
``robustness.analysis.distances.minimal_distances`` takes the minimum over attacks and routing gradients (0 for a
sample misclassified clean, inf where none was found), and the robustness curve follows from it.

Fingerprints: every shard carries, in its Parquet key-value metadata under ``dsn_robustness.fingerprint``, a JSON
object saying what produced it (:func:`write_shard`, :func:`shard_fingerprint`; the runner defines the keys:
checkpoint SHA-256, seed, n, batch size, versions, the evaluation's resolved parameters). Metadata rather than a
column: it is the same for every row of a shard, the record contract above (and every frame built from it) stays
as it is, and it is read from the file footer alone, without the rows. pandas keeps schema metadata it does not
know when reading, and drops it on any write, so shards are written through pyarrow here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from attacks.base import counts_for_accuracy
from robustness.core.errors import RunDirError, first_line

RECORD_COLUMNS: dict[str, str] = {
    "run": "string",
    "model": "string",
    "attack": "string",
    "backend": "string",
    "norm": "string",
    "eps": "float64",
    "gate_mode": "string",
    "gate_grad": "string",
    "target": "string",
    "source_run": "string",
    "sample": "int64",
    "seed": "int64",
    "label_fine": "int64",
    "label_coarse": "int64",
    "clean_pred_fine": "int64",
    "clean_pred_coarse": "int64",
    "adv_pred_fine": "int64",
    "adv_pred_coarse": "int64",
    "clean_correct": "bool",
    "adv_correct": "bool",
    "success": "bool",
    "robust": "bool",
    "linf": "float64",
    "l2": "float64",
    "clean_path": "string",
    "adv_path": "string",
    "hamming": "int64",
    "clean_macs": "float64",
    "adv_macs": "float64",
    "frozen_pred_fine": "int64",
    "frozen_pred_coarse": "int64",
    "frozen_correct": "bool",
}

#: Columns that identify one evaluation (everything but the per-sample content).
EVAL_KEYS: list[str] = ["run", "model", "attack", "backend", "norm", "eps", "gate_mode", "gate_grad", "target",
                        "source_run"]


def conform(df: pd.DataFrame) -> pd.DataFrame:
    """Return ``df`` with exactly the contract's columns, in order, with the contract's dtypes.

    Records written before the ``robust`` column existed get it as ``clean_correct & adv_correct``. Raises
    ``ValueError`` naming any missing column.
    """
    if "robust" not in df.columns and {"clean_correct", "adv_correct"} <= set(df.columns):
        df = df.assign(robust=df["clean_correct"].astype(bool) & df["adv_correct"].astype(bool))
    missing = [c for c in RECORD_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"records lack column(s): {', '.join(missing)}")
    return df[list(RECORD_COLUMNS)].astype(RECORD_COLUMNS)


FINGERPRINT_KEY = b"dsn_robustness.fingerprint"


def write_shard(frame: pd.DataFrame, path: str | Path, fingerprint: dict[str, Any]) -> None:
    """Write ``frame`` as a Parquet file at ``path`` (a temporary path: callers rename it into place) with
    ``fingerprint`` in its key-value metadata."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    metadata = {**(table.schema.metadata or {}), FINGERPRINT_KEY: json.dumps(fingerprint, sort_keys=True).encode()}
    pq.write_table(table.replace_schema_metadata(metadata), path)


def shard_fingerprint(path: str | Path) -> dict[str, Any] | None:
    """The fingerprint a shard was written with (None for a shard written before fingerprints existed);
    RunDirError naming the file and the fix when it is not a readable Parquet file."""
    try:
        metadata = pq.read_schema(path).metadata or {}
        raw = metadata.get(FINGERPRINT_KEY)
        return None if raw is None else json.loads(raw)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise _unreadable(Path(path), err) from None


def _unreadable(path: Path, err: Exception) -> RunDirError:
    first = first_line(err)[:160]
    return RunDirError(f"attack shard {path} is unreadable ({first}); delete it (`attack --resume` recomputes it) "
                       f"or rerun the attack with --force")


def read_records(path: str | Path) -> pd.DataFrame:
    """Read one Parquet file or every ``*.parquet`` below a directory into one conformed frame; RunDirError naming
    the file when one is corrupt (e.g. truncated)."""
    path = Path(path)
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        return conform(pd.DataFrame({c: pd.Series(dtype=t) for c, t in RECORD_COLUMNS.items()}))
    return conform(pd.concat([_read_one(f) for f in files], ignore_index=True))


def _read_one(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise _unreadable(path, err) from None


def accuracy_mask(df: pd.DataFrame) -> np.ndarray:
    """Per row: whether its attack counts for robust accuracy and the worst case. The attack's registered kind
    decides (:func:`attacks.base.counts_for_accuracy`: every kind but compute; an unregistered name counts)."""
    names = df["attack"].astype(str)
    counts = {name: counts_for_accuracy(name) for name in names.unique()}
    return names.map(counts).to_numpy(bool)


def accuracy_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of attacks that count for accuracy (drops compute attacks such as ``slowdown``)."""
    return df[accuracy_mask(df)]


def worst_case(df: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """Per-sample worst case over attacks: a sample is robust only if it is robust (correct on clean and on
    adversarial) under *every* attack.

    Groups by ``by`` (default: run, model, norm, eps, gate_mode, target, source_run) plus ``sample``, and returns one
    row per group with ``attack='worst'``, ``backend='any'``, ``gate_grad='any'``; the row's adversarial fields
    are those of the first attack under which the sample is not robust (or of the first attack when none).
    """
    by = by or ["run", "model", "norm", "eps", "gate_mode", "target", "source_run"]
    if df.empty:
        return df.copy()
    ordered = df.sort_values([*by, "sample", "robust"], kind="stable")
    worst = ordered.groupby([*by, "sample"], sort=False, observed=True, dropna=False).head(1).copy()
    worst["attack"], worst["backend"], worst["gate_grad"] = "worst", "any", "any"
    return conform(worst.reset_index(drop=True))
