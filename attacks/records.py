"""The per-sample attack record: the contract between attacks, analysis and reports.

One row per (run, attack, backend, norm, eps, gate_mode, gate_grad, target, sample). Rows are stored as Parquet
shards under ``RUN_DIR/attacks/records/`` and read back with :func:`read_records`.

Columns (dtype):

===================  =======  =====================================================================================
run                  string   name of the run directory the model came from
model                string   registry name of the model (``dsn``, ``dual``, ``resnet``)
attack               string   attack name (``fgsm``, ``pgd``, ``apgd-ce``, ``apgd-dlr``, ``square``, ``fmn``,
                              ``pgd-bisect``, ``pgd-refine``, ``ddn``, ``cw``, ``path``, ``slowdown``); for transfer, the attack run
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
nonfinite            bool     the clean or the adversarial logits of the ``target`` head hold a NaN or an inf for
                              this sample (below); False in records written before the column existed
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
found_by             string   the attack whose example the row's adversarial columns hold: ``attack`` itself, or,
                              under the attack cascade (:mod:`attacks.runner.cascade`), the earlier attack of the
                              same gate mode, routing gradient, head and norm that had already fooled the sample at
                              this eps (this attack then did not run on it); ``attack`` in records written before
                              the column existed
===================  =======  =====================================================================================

For a model without gates, paths are '' and the frozen predictions equal the adversarial ones.

Non-finite logits (``nonfinite``): a forward whose logits hold a NaN, ``+inf`` or ``-inf`` gives no usable
prediction. ``argmax`` would read an all-NaN row as class 0 and a ``+inf`` in one class as a confident vote for it;
neither is a prediction, so any non-finite value in a sample's logits of a head makes that head's prediction
:data:`NONFINITE_PRED` (-2, never a class and distinct from ``attacks.adapters.NO_HEAD`` = -1, "no such head") in
``clean_pred_*``, ``adv_pred_*`` and ``frozen_pred_*``, each on its own forward. ``nonfinite`` is True when the
clean or the adversarial logits of the attacked head (``target``) are non-finite; such a row is never
``clean_correct`` (clean logits non-finite), never ``adv_correct``, never ``robust`` and never a ``success`` (a
NaN is not an adversarial example: the attack did not find a wrong class, the model failed to compute one), and
``frozen_correct`` is False where the frozen forward's logits are non-finite. The other columns (labels, norms,
paths, MACs) hold what was measured. Which side broke is in the predictions: ``clean_pred_<target> ==
NONFINITE_PRED`` on the clean input, ``adv_pred_<target> == NONFINITE_PRED`` on the adversarial one (a non-finite
coarse head under a fine-head attack marks only the coarse predictions, not ``nonfinite``).
:func:`worst_case` counts a ``nonfinite`` row as not robust whatever its other columns say; the sanity check
``finite-logits`` (:mod:`robustness.sanity`) fails on non-finite clean logits and warns on non-finite adversarial
ones. Adversarial *images* are never non-finite: :meth:`attacks.base.Attack.__call__` rejects a candidate with a
non-finite pixel (the product of a NaN input gradient), keeps the clean image or another candidate for it, and
logs how many samples were affected.

Minimal distances: a minimal-perturbation attack (kind ``minimal``: ``fmn``, ``pgd-bisect``, ``pgd-refine``, ``ddn``, ``cw``) has a
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
    "nonfinite": "bool",
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
    "found_by": "string",
}

#: The prediction recorded for a head whose logits on that input hold a NaN or an inf (module docstring).
NONFINITE_PRED = -2

#: Columns that identify one evaluation (everything but the per-sample content).
EVAL_KEYS: list[str] = ["run", "model", "attack", "backend", "norm", "eps", "gate_mode", "gate_grad", "target",
                        "source_run"]


def conform(df: pd.DataFrame) -> pd.DataFrame:
    """Return ``df`` with exactly the contract's columns, in order, with the contract's dtypes.

    Records written before the ``robust`` column existed get it as ``clean_correct & adv_correct``; records
    written before the ``nonfinite`` column existed get it as False (their logits were never checked), and those
    written before ``found_by`` existed get their own ``attack`` there (no cascade ran then). Raises
    ``ValueError`` naming any missing column.
    """
    if "robust" not in df.columns and {"clean_correct", "adv_correct"} <= set(df.columns):
        df = df.assign(robust=df["clean_correct"].astype(bool) & df["adv_correct"].astype(bool))
    if "nonfinite" not in df.columns:
        df = df.assign(nonfinite=False)
    if "found_by" not in df.columns and "attack" in df.columns:
        df = df.assign(found_by=df["attack"])
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


def carried(df: pd.DataFrame) -> np.ndarray:
    """Bool per row: the row holds an example another attack found (``found_by != attack``: the attack cascade
    carried it over, :mod:`attacks.runner.cascade`)."""
    return (df["found_by"].astype(str) != df["attack"].astype(str)).to_numpy(bool)


def worst_case(df: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """Per-sample worst case over attacks: a sample is robust only if it is robust (correct on clean and on
    adversarial, with finite logits) under *every* attack, and no minimal-distance attack fooled it within the
    budget.

    Groups by ``by`` (default: run, model, norm, eps, gate_mode, target, source_run) plus ``sample``, and returns one
    row per group with ``attack='worst'``, ``backend='any'``, ``gate_grad='any'``; the row's adversarial fields
    are those of the first attack under which the sample is not robust, preferring one whose logits were
    non-finite (so ``nonfinite`` is True when it is True under any attack), or of the first attack when none. A
    ``nonfinite`` row is never robust here, whatever its ``robust`` column says. A minimal-distance success in
    ``df`` (eps = inf) counts at every fixed budget of its group that its distance fits under
    (:func:`minimal_at_budgets`), after the fixed-budget attacks' own examples.
    """
    by = by or ["run", "model", "norm", "eps", "gate_mode", "target", "source_run"]
    if df.empty:
        return df.copy()
    df = conform(df)
    if "eps" in by:
        df = pd.concat([df, minimal_at_budgets(df, [k for k in by if k != "eps"])], ignore_index=True)
    finite = ~df["nonfinite"].to_numpy(bool)
    df = df.assign(robust=df["robust"].to_numpy(bool) & finite, _finite=finite)
    ordered = df.sort_values([*by, "sample", "robust", "_finite"], kind="stable")
    worst = ordered.groupby([*by, "sample"], sort=False, observed=True, dropna=False).head(1).copy()
    worst["attack"], worst["backend"], worst["gate_grad"] = "worst", "any", "any"
    return conform(worst.drop(columns="_finite").reset_index(drop=True))


def minimal_at_budgets(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Each minimal-distance success of ``df`` (a row at eps = inf that fooled the deployed model with finite
    logits: its norm's column is the example's distance) copied to every fixed budget of the same ``keys`` and
    ``sample`` that the distance fits under, as a non-robust row at that budget.

    The example is a verified adversarial inside that budget, so the sample is not robust there: a minimal attack
    at 17.49/255 breaks the sample at 17.5/255 although no fixed-budget attack did. The rule is the one a minimal
    attack scored at a budget uses (norm <= eps, :func:`attacks.tracking.within_budgets`), so the worst case and
    the robustness curve of the same records agree."""
    eps = df["eps"].to_numpy(float)
    at_inf = np.isinf(eps)
    found = df[at_inf & df["success"].to_numpy(bool) & df["clean_correct"].to_numpy(bool)
               & ~df["nonfinite"].to_numpy(bool)]
    budgets = df.loc[~at_inf & (eps > 0), [*keys, "sample", "eps"]].drop_duplicates()
    if found.empty or budgets.empty:
        return df.iloc[:0]
    norms = found["norm"].astype(str).to_numpy()
    distance = np.full(len(found), np.inf)
    for name in np.unique(norms):
        distance[norms == name] = found.loc[norms == name, name].to_numpy(float)
    pairs = found.drop(columns="eps").assign(_distance=distance).merge(budgets, on=[*keys, "sample"])
    pairs = pairs[pairs["_distance"].to_numpy(float) <= pairs["eps"].to_numpy(float)]
    return conform(pairs.drop(columns="_distance").assign(robust=False)[list(df.columns)])
