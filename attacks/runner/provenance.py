"""What a run writes into its run directory and how its records prove what made them: the layout, the manifest,
the fingerprints, and the checks that refuse to resume or report records of another model, setting or set of images.

Layout written into the run directory::

    attacks/manifest.json                                  what was run (below)
    attacks/records/<evaluation-id>/shard-<batch:05d>.parquet   rows of one batch, every eps (attacks.records)
    attacks/worst_case.parquet                             per-sample worst case at each eps over the attacks
                                                           that count for accuracy (attacks.records.accuracy_rows)

The manifest (``schema: dsn-robustness/attacks/v1``) holds: ``run``, ``model``, ``checkpoint`` (relative path),
``dataset`` (DatasetInfo.to_dict()), ``data`` (dataset name, root, options, split), ``subset`` (which test images
were attacked, :meth:`robustness.data.subset.Subset.to_dict`: ``rule`` (``stratified``, ``first``, or ``given`` for
images handed over as tensors), ``seed`` (the subset seed, not the attack seed; null for a rule that draws nothing),
``indices`` (record ``sample`` i is test-split sample ``indices[i]``), ``sha256`` (of the attacked images, their
shape and fine labels: two runs attacked the same images iff it matches) and ``class_counts`` (fine label ->
samples)), ``seed``, ``n``, ``batch_size``
(the number used, also when ``"auto"`` chose it: :mod:`attacks.runner.sizing`), ``batch_size_auto`` (whether it
did), ``n_batches``, ``float32`` (``{"tf32": false, "matmul_precision": "highest"}``: the float32 arithmetic in
force while attacking, which :func:`robustness.core.runtime.true_float32` makes exact whatever the process's global
TF32 flags say, so that records never depend on them), ``versions`` (package versions; ``earlier_versions``: those
of earlier invocations whose records were kept, when they differed), ``fingerprint`` (what every shard's fingerprint
shares, below), ``path_names`` (gate names in path-bit order), ``full_macs``, ``gated_block_macs``,
``zero_grad_share`` (``{"<gate_mode>/<gate_grad>": share}`` of samples whose input gradient is exactly zero, on the
first batch), ``surrogate_fidelity`` (``{"<gate_mode>/<gate_grad>": share}`` of first-batch samples whose surrogate
network predicts what the deployed one does; 1 for ``none`` and ``ste``), ``sharp_temperature`` (the per-gate
temperatures of the ``sharp`` routing gradient, calibrated on the first batch's clean images and used for every
batch), ``config`` (the AttackConfig of the last white-box invocation: what ``dsn-robust attack --resume`` continues
with), ``transfer_configs`` (``{source run: AttackConfig}`` of the transfer invocations) and ``evaluations``: one
``{id, attack, kind, backend, norm, eps, gate_mode, gate_grad, target, source_run, config, complete}`` per
evaluation (``config`` = the attack's parameters; ``complete`` = every shard exists), plus for a minimal-norm attack
``convergence`` (``{clean_correct, found, share_found, median_norm, converged}`` from its unbounded rows: a minimal
attack that does not find an adversarial example for >= 99% of the clean-correct samples has not converged, and its
accuracies at the budgets are upper bounds).

Fingerprints. Every shard carries in its Parquet metadata (:func:`attacks.records.write_shard`) what produced it:
``checkpoint_sha256`` (the SHA-256 of the checkpoint file, computed once per run; of the state dict for a model
handed over in memory), ``seed``, ``n``, ``batch_size``, ``subset``, ``subset_seed`` and ``subset_sha256`` (the
attacked images: the manifest's ``subset`` rule, seed and hash), ``versions``, and its evaluation's ``evaluation`` id,
``eps``, ``config`` (the attack's resolved parameters) and ``source_sha256`` (the crafting model's checkpoint for a
transfer evaluation). A resume continues only when the manifest's and every existing shard's fingerprint match this
run's; otherwise it is one RunDirError line naming the difference (``checkpoint changed since these records (sha256
1a2b… -> 9f8e…)``, ``the attacked images changed since these records (subset sha256 1a2b… -> 9f8e…: the test
data or its selection differs)`` after the data options of ``config.json`` changed the test split, ``pgd.steps=10
... pgd.steps=3``) with ``--force`` as the fix, so records of two models, two settings or two sets of images never
mix, whatever wrote them. Records of a version before recorded subsets (which attacked the first ``n`` test images
and kept no hash of them) are not resumed: nothing tells whether the test split is still the one they were made
on; ``--force`` (with ``--subset first`` for the same rule) redoes them, and they still load for a report.
Versions alone may differ: a resume after a routine upgrade warns and goes on (what is measured is the same model
under the same attack; a library bump moves floating-point details of a few samples at most, as another GPU
would), each shard keeps its own versions and the manifest lists the earlier ones.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import pandas as pd

from attacks.base import ITERATIVE, attack_kind
from attacks.records import shard_fingerprint
from attacks.runner.config import AttackConfig
from attacks.runner.plan import EvalPlan
from attacks.runner.subject import Subject
from robustness.core.errors import RunDirError
from robustness.core.files import file_sha256
from robustness.core.rundir import RunDir
from robustness.core.runtime import float32_state, jsonable, package_versions
from robustness.core.vocab import format_eps
from robustness.data.subset import Subset

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = "dsn-robustness/attacks/v1"
#: A minimal-norm attack has converged when it finds an adversarial example for this share of clean-correct samples.
MIN_FOUND_SHARE = 0.99


# --------------------------------------------------------------------------------------------------------------
# Fingerprints and resume
# --------------------------------------------------------------------------------------------------------------


#: the fingerprint keys shared by every shard of a run (the rest are per evaluation): the model, the attack seed,
#: the data cut, and the attacked images (their subset rule and seed, and the hash of the images and labels)
RUN_KEYS = ("checkpoint_sha256", "seed", "n", "batch_size", "subset", "subset_seed", "subset_sha256")


def run_fingerprint(checkpoint_sha256: str, setup: dict[str, Any]) -> dict[str, Any]:
    """What every shard of this invocation shares: the model's hash, seed, n, batch size, the attacked images
    (``setup["subset"]``, a :class:`robustness.data.subset.Subset`: its rule, seed and hash) and versions."""
    subset: Subset = setup["subset"]
    draws = setup.get("draws", 1)  # a model random at test time votes over draws (models.fidelity)
    return {"checkpoint_sha256": checkpoint_sha256, "seed": setup["seed"], "n": setup["n"],
            "batch_size": setup["batch_size"], "subset": subset.rule, "subset_seed": subset.seed,
            "subset_sha256": subset.sha256, **({"draws": draws} if draws > 1 else {}),
            "versions": package_versions()}


def shard_fingerprint_of(run_fp: dict[str, Any], plan: EvalPlan, source_sha256: str = "") -> dict[str, Any]:
    """The fingerprint of ``plan``'s shards: the run's plus the evaluation's resolved parameters."""
    entry = plan.describe()
    return jsonable({**run_fp, "evaluation": plan.id, "eps": entry["eps"], "config": entry["config"],
                     "after": entry.get("after", []), "source_sha256": source_sha256 if plan.source_run else ""})


def _differences(old: Any, new: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every leaf where two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in dict.fromkeys([*old, *new])
                for d in _differences(old.get(k), new.get(k), f"{key}.{k}" if key else str(k))]
    return [] if jsonable(old) == jsonable(new) else [(key, old, new)]


def checkpoint_change(old: str | None, new: str) -> str:
    """The clause that says a run's model is not the one its records were made on."""
    return f"checkpoint changed since these records (sha256 {str(old)[:12]}… -> {new[:12]}…)"


def images_change(old: str | None, new: str) -> str:
    """The clause that says a run attacks other images than its records were made on."""
    return (f"the attacked images changed since these records (subset sha256 {str(old)[:12]}… -> {new[:12]}…: "
            f"the test data or its selection differs)")


def _check_resumable(run: RunDir, previous: dict[str, Any] | None, run_fp: dict[str, Any],
                     plans: Sequence[EvalPlan], fingerprints: dict[str, dict[str, Any]]) -> None:
    """RunDirError (one line, ``--force`` as the fix) unless the stored records were made by what this run does."""
    if previous is None:
        raise RunDirError(f"{run.root} holds attack records but no {run.manifest.name}; cannot tell how they were "
                          f"made: pass --force to replace them")
    stored = previous.get("fingerprint")
    if not isinstance(stored, dict):
        raise RunDirError(f"{run.root}: its attack records were written by an older version, without the "
                          f"fingerprint that says which model and settings made them: pass --force to redo them")
    if stored.get("checkpoint_sha256") != run_fp["checkpoint_sha256"]:
        change = checkpoint_change(stored.get("checkpoint_sha256"), run_fp["checkpoint_sha256"])
        raise RunDirError(f"{run.root}: {change}: they belong to another model; pass --force to attack this one "
                          f"from scratch")
    if "subset_sha256" not in stored:
        raise RunDirError(f"{run.root}: its attack records were written by an older version, which attacked the "
                          f"first n test images without recording which images they were: a resume cannot tell "
                          f"whether it attacks the same ones; pass --force to redo them (--subset first for the "
                          f"first n again)")
    for key in ("n", "batch_size", "seed", "subset", "subset_seed"):
        if stored.get(key) != run_fp[key]:
            raise RunDirError(f"{run.root}: existing attack records were made with {key}={stored.get(key)!r}, "
                              f"this run asks for {key}={run_fp[key]!r}; use the same value or pass --force")
    if stored.get("subset_sha256") != run_fp["subset_sha256"]:
        raise RunDirError(f"{run.root}: {images_change(stored.get('subset_sha256'), run_fp['subset_sha256'])}; "
                          f"pass --force to attack the new images from scratch")
    changed = [f"{k} {o} -> {n}" for k, o, n in _differences(stored.get("versions"), run_fp["versions"])]
    if changed:
        log.warning("%s: resuming with other package versions than the kept records were made with (%s); each "
                    "shard records its own", run.root, ", ".join(changed))
    before = {e.get("id"): e for e in previous.get("evaluations", [])}
    for plan in plans:
        old = before.get(plan.id)
        if old is not None:
            new = plan.describe()
            _refuse_differences(run, f"evaluation {plan.id} was run with", old, new, plan.name)
    _check_shards(run, run_fp, fingerprints)


def _refuse_differences(run: RunDir, what: str, old: dict[str, Any], new: dict[str, Any], attack: str,
                        asks: str = "this run asks for", fix: str = "use the same settings or pass --force") -> None:
    for key in ("eps", "config", "source_sha256", "after"):
        if key not in new:
            continue
        before = old.get(key, [] if key == "after" else None)  # records of a version before the cascade: none
        diffs = _differences(before, new[key], attack if key == "config" else key)
        if diffs:
            name, o, n = diffs[0]
            if key == "source_sha256":
                raise RunDirError(f"{run.root}: transfer source's {checkpoint_change(o, n)}; pass --force to start "
                                  f"over")
            if key == "after":
                raise RunDirError(f"{run.root}: {what} the attack cascade after {', '.join(o or []) or 'no attack'}; "
                                  f"{asks} it after {', '.join(n or []) or 'no attack'} (another attack order or "
                                  f"cascade setting); keep them, or pass --force")
            if key == "eps":  # in the run's units: 8/255, not 0.031372549019607843
                norm = str(new.get("norm") or (new.get("config") or {}).get("norm") or "linf")
                o, n = (", ".join(format_eps(e, norm) for e in v or []) for v in (o, n))
                raise RunDirError(f"{run.root}: {what} eps {o}, {asks} eps {n}; {fix}")
            raise RunDirError(f"{run.root}: {what} {name}={o!r}, {asks} {name}={n!r}; {fix}")


def _check_shards(run: RunDir, reference: dict[str, Any], expected: dict[str, dict[str, Any]], *,
                  asks: str = "this run asks for", fix: str = "use the same settings or pass --force") -> None:
    """Every existing shard must carry ``reference``'s run keys (:data:`RUN_KEYS`) and, where ``expected`` holds its
    evaluation, that evaluation's parameters: shards of another model or setting (two writers at once, an older
    run) are refused, never mixed in. ``asks`` names what the shard is compared with, ``fix`` ends the line."""
    for path in sorted(run.records.rglob("*.parquet")) if run.records.is_dir() else []:
        fp = shard_fingerprint(path)
        where = path.relative_to(run.root)
        if fp is None:
            raise RunDirError(f"{run.root}: shard {where} has no fingerprint (written by an older version); {fix}")
        if fp.get("checkpoint_sha256") != reference.get("checkpoint_sha256"):
            change = checkpoint_change(fp.get("checkpoint_sha256"), str(reference.get("checkpoint_sha256")))
            raise RunDirError(f"{run.root}: shard {where}: {change}; {fix}")
        for key in RUN_KEYS[1:]:
            if key == "subset_sha256" and fp.get(key) != reference.get(key):
                change = images_change(fp.get(key), str(reference.get(key)))
                raise RunDirError(f"{run.root}: shard {where}: {change}; {fix}")
            if fp.get(key) != reference.get(key):
                raise RunDirError(f"{run.root}: shard {where} was made with {key}={fp.get(key)!r}, {asks} "
                                  f"{key}={reference.get(key)!r}; {fix}")
        want = expected.get(path.parent.name)
        if want is not None:
            _refuse_differences(run, f"shard {where} was made with", fp, want, path.parent.name.split("__")[0],
                                asks=asks, fix=fix)


def verify_records(run: RunDir, manifest: dict[str, Any] | None) -> None:
    """RunDirError (one line) unless the run's attack records belong to its model and to one setting: the
    checkpoint the manifest names still hashes as its fingerprint says (``train --force`` since the attack makes
    them another model's records), and every shard carries the manifest's fingerprint and its evaluation's
    parameters. Refused rather than flagged: a report renders numbers that get quoted, and numbers of another model
    under this model's name are wrong however the page is marked. Records of a version before fingerprints, or a
    run whose checkpoint file is gone, are reported with a warning: there is nothing to check them against."""
    stored = (manifest or {}).get("fingerprint")
    if not isinstance(stored, dict):
        if manifest:
            log.warning("%s: attack records of an older version carry no fingerprint; cannot check that they "
                        "belong to the run's model", run.root)
        return
    redo = f"rerun `dsn-robust attack {run.root} --force`"
    relative = str((manifest or {}).get("checkpoint") or "")
    if relative and (run.root / relative).is_file():
        now = file_sha256(run.root / relative)
        if now != stored.get("checkpoint_sha256"):
            raise RunDirError(f"{run.root}: {relative}: {checkpoint_change(stored.get('checkpoint_sha256'), now)}; "
                              f"the attack records belong to the model trained before: {redo}")
    elif relative:
        log.warning("%s: %s is gone; cannot check that the attack records belong to the run's model", run.root,
                    relative)
    entries = {e.get("id"): e for e in (manifest or {}).get("evaluations", [])}
    _check_shards(run, stored, entries, asks="the manifest says", fix=f"mixed records; {redo}")


# --------------------------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------------------------


def _complete(run: RunDir, eval_id: str, n_batches: int) -> bool:
    return all(run.shard(eval_id, b).is_file() for b in range(n_batches))


def _manifest(run: RunDir, subject: Subject, config: AttackConfig, setup: dict[str, Any], n_batches: int,
              probes: dict[str, Any], plans: Sequence[EvalPlan], previous: dict[str, Any] | None,
              run_fp: dict[str, Any], source_name: str = "") -> dict[str, Any]:
    model = subject.model
    configs = {"config": (previous or {}).get("config") or jsonable(config.to_dict()),
               "transfer_configs": dict((previous or {}).get("transfer_configs") or {})}
    if source_name:
        configs["transfer_configs"][source_name] = jsonable(config.to_dict())
    else:
        configs["config"] = jsonable(config.to_dict())
    earlier = list((previous or {}).get("earlier_versions") or [])
    if previous and previous.get("versions") and previous.get("versions") != run_fp["versions"]:
        earlier.append(previous["versions"])
    current = [p.describe(_complete(run, p.id, n_batches)) for p in plans]
    ids = {e["id"] for e in current}
    kept = [dict(e, complete=_complete(run, e["id"], n_batches))
            for e in (previous or {}).get("evaluations", []) if e.get("id") not in ids]
    return {
        "schema": MANIFEST_SCHEMA,
        "run": run.name,
        "model": subject.model_name,
        "checkpoint": subject.checkpoint,
        "dataset": subject.dataset.to_dict(),
        "data": jsonable(subject.data_source),
        "subset": setup["subset"].to_dict(),
        "seed": setup["seed"],
        "n": setup["n"],
        "batch_size": setup["batch_size"],
        "batch_size_auto": setup["batch_size_auto"],
        "n_batches": n_batches,
        "float32": float32_state(),
        "versions": run_fp["versions"],
        **({"earlier_versions": earlier} if earlier else {}),
        "fingerprint": run_fp,
        **({"model_check": jsonable(subject.model_check)} if subject.model_check else {}),
        "path_names": list(model.gate_names),
        "full_macs": float(model.full_macs),
        "gated_block_macs": [float(m) for m in model.costs.gated_blocks],
        **probes,
        **configs,
        "evaluations": kept + current,
    }


def _convergence(records: pd.DataFrame, entry: dict[str, Any]) -> dict[str, Any] | None:
    """A minimal-norm evaluation's convergence, from its unbounded (eps = inf) rows: for how many clean-correct
    samples it found an adversarial example at all, and, where a fixed-budget iterative attack ran at the same
    norm, gates and routing gradient, the budgets at which that attack left fewer samples robust (by more than one
    sample) than the minimal examples that fit the budget: there the minimal attack stopped short. None without
    inf rows."""
    same = records[(records["norm"] == entry["norm"]) & (records["gate_mode"] == entry["gate_mode"])
                   & (records["gate_grad"] == entry["gate_grad"]) & (records["target"] == entry["target"])
                   & (records["source_run"] == entry["source_run"])]
    own = same[(same["attack"] == entry["attack"]) & (same["backend"] == entry["backend"])]
    unbounded = own[np.isinf(own["eps"])]
    if unbounded.empty:
        return None
    correct = unbounded["clean_correct"].to_numpy(bool)
    found = correct & ~unbounded["adv_correct"].to_numpy(bool)
    distance = np.where(found, unbounded[entry["norm"]].to_numpy(float), np.inf)
    share = float(found.sum() / correct.sum()) if correct.any() else float("nan")
    fixed = same[same["attack"].map(lambda a: attack_kind(str(a)) == ITERATIVE).to_numpy(bool)]
    short: list[dict[str, Any]] = []
    for eps, theirs in fixed[np.isfinite(fixed["eps"])].groupby("eps"):
        robust_mine = int((correct & (distance > eps)).sum())
        robust_fixed = int(theirs.groupby("sample")["robust"].all().sum())
        if robust_mine > robust_fixed + 1:
            short.append({"eps": float(eps), "robust": robust_mine, "fixed_budget_robust": robust_fixed,
                          "fixed_budget_attack": ",".join(sorted(theirs["attack"].astype(str).unique()))})
    return {"clean_correct": int(correct.sum()), "found": int(found.sum()), "share_found": share,
            "median_norm": float(np.median(distance[found])) if found.any() else float("nan"),
            "checked_against_fixed_budget": not fixed.empty, "stopped_short": short,
            "converged": bool(correct.any() and share >= MIN_FOUND_SHARE and not short)}
