"""The run: batches x evaluations (:mod:`attacks.runner.plan`) -> records (:mod:`attacks.runner.scoring`) in a
run directory; resumable; shardable under torchrun.

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
The run holds its directory's writer lock (:meth:`robustness.core.rundir.RunDir.writing`) throughout.

Every shard is written atomically, so an interrupted run resumes (``resume=True``) by skipping the shards that
exist. Shards are keyed by batch index, so a resumed run must cut the data as before: ``batch_size = "auto"``
reuses the manifest's batch size, and a different fixed one is refused. Every batch x evaluation draws its
randomness from a seed derived from (seed, evaluation id, batch), so a resumed or a multi-process run gives the
same records as an uninterrupted single-process one. Under ``torchrun`` (``WORLD_SIZE > 1``) rank r takes the
batches with ``index % world == r``; rank 0 writes the manifest.

Paths and JSON files of the run directory are :class:`robustness.core.rundir.RunDir`'s; the training config is
read as a :class:`models.training.TrainConfig`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.multiprocessing as mp

from attacks.base import ITERATIVE, MINIMAL, Target, attack_kind
from attacks.checks import zero_gradient_share
from attacks.records import (RECORD_COLUMNS, accuracy_rows, conform, read_records, shard_fingerprint, worst_case,
                             write_shard)
from attacks.runner import cascade
from attacks.runner.config import AttackConfig, dedupe
from attacks.runner.growth import grown
from attacks.runner.plan import EvalPlan, plan_evaluations
from attacks.runner.scoring import Batch, Scorer
from attacks.runner.sizing import resolve_batch_size
from models.checkpoint import Checkpoint, load_checkpoint
from models.network import CoarseFineNet
from models.surrogates import calibrate_temperature, surrogate_fidelity
from models.training import TrainConfig
from robustness.core.errors import CheckpointError, ConfigError, RunDirError
from robustness.core.progress import heartbeat, progress_bar
from robustness.core.rundir import RunDir, atomic_write, atomic_write_json, file_sha256
from robustness.core.runtime import (Distributed, derive_seed, distributed, env_world, float32_state, free_port,
                                     join_as_rank, jsonable, package_versions, process_device, resolve_device,
                                     seed_everything, torch_threads, true_float32)
from robustness.core.vocab import format_eps
from robustness.data import CoarseFineDataset, DatasetInfo, load_dataset
from robustness.data.subset import Subset, given_subset, select_subset, take

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = "dsn-robustness/attacks/v1"
#: A minimal-norm attack has converged when it finds an adversarial example for this share of clean-correct samples.
MIN_FOUND_SHARE = 0.99


@dataclass
class AttackResult:
    """What :func:`run_attacks` did: the manifest it wrote and every record now in the run (rank 0 only)."""

    run_dir: Path
    manifest: dict[str, Any]
    records: pd.DataFrame


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def load_run_checkpoint(run: RunDir) -> Checkpoint:
    """The run's best checkpoint, else its last; CheckpointError when it has neither."""
    run.require()
    for path in (run.best_checkpoint, run.last_checkpoint):
        if path.is_file():
            return load_checkpoint(path)
    raise CheckpointError(f"{run.root} has no checkpoint (looked for {run.best_checkpoint.relative_to(run.root)} "
                          f"and {run.last_checkpoint.relative_to(run.root)}); train it first with "
                          f"`dsn-robust train`")


def load_eval_data(run: RunDir, checkpoint: Checkpoint, n: int, rule: str = "stratified",
                   seed: int = 0) -> tuple[CoarseFineDataset, dict[str, Any]]:
    """The ``n`` test samples that ``rule`` and ``seed`` choose (:func:`robustness.data.subset.select_subset`) of
    the data the run was trained on (from its ``config.json``), and where that data came from."""
    data, source, _ = eval_data(run, checkpoint, n, rule, seed)
    return data, source


def eval_data(run: RunDir, checkpoint: Checkpoint, n: int, rule: str = "stratified",
              seed: int = 0) -> tuple[CoarseFineDataset, dict[str, Any], Subset]:
    """:func:`load_eval_data` and the :class:`robustness.data.subset.Subset` it took (what the manifest
    records)."""
    train = TrainConfig.from_dict(run.read_config(), where=str(run.config))
    data = {"dataset": train.dataset, "data_root": train.data_root, "data_options": train.data_options,
            "split": "test"}
    test = load_dataset(train.dataset, "test", root=train.data_root, **train.data_options)
    problems = test.info.differences(checkpoint.dataset)
    if problems:
        raise CheckpointError(f"{checkpoint.path}: the run's test data does not match its checkpoint: "
                              f"{'; '.join(problems)}")
    if len(test) < n:
        log.info("the test split has %d samples; evaluating all of them (asked for %d)", len(test), n)
    subset = select_subset(test, n, rule, seed)
    return take(test, subset), data, subset


def check_transferable(source: DatasetInfo, target: DatasetInfo, source_name: str, target_name: str) -> None:
    """Raise ConfigError unless examples crafted for ``source`` can be evaluated on ``target`` (same dataset)."""
    problems = source.differences(target)
    if problems:
        raise ConfigError(f"cannot transfer attacks from run {source_name!r} to run {target_name!r}: "
                          f"{'; '.join(problems)}")


# --------------------------------------------------------------------------------------------------------------
# Manifest and resume
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


def state_sha256(model: torch.nn.Module) -> str:
    """The SHA-256 of a model's state dict (names, dtypes, shapes, bytes): a model held in memory, unsaved."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def subject_sha256(run: RunDir, subject: Subject) -> str:
    """The hash that ties records to ``subject``'s model: its checkpoint file's, else its state dict's."""
    return file_sha256(run.root / subject.checkpoint) if subject.checkpoint else state_sha256(subject.model)


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


def _zero_gradient_shares(model: CoarseFineNet, data: CoarseFineDataset, config: AttackConfig,
                          plans: Sequence[EvalPlan]) -> dict[str, float]:
    """Share of zero input gradients on the first batch, per (gate_mode, gate_grad) of the white-box plans."""
    x, y = _first_batch(model, data, config)
    shares: dict[str, float] = {}
    combos = dedupe([(p.gate_mode, p.gate_grad) for p in plans if not p.source_run])
    if not model.is_gated:
        combos = dedupe([(mode, "none") for mode, _ in combos])
    for mode, grad in combos:
        seed_everything(derive_seed(config.seed, "zero-grad", mode, grad))
        shares[f"{mode}/{grad}"] = zero_gradient_share(model, x, y, mode, grad, config.target, config.eot_samples)
    return shares


def _first_batch(model: CoarseFineNet, data: CoarseFineDataset, config: AttackConfig):
    x, fine, coarse = data.batch(slice(0, config.batch_size))
    device = next(model.parameters()).device
    return x.to(device), (fine if config.target == "fine" else coarse).to(device)


def sharp_temperature(model: CoarseFineNet, data: CoarseFineDataset, config: AttackConfig) -> torch.Tensor | None:
    """Temperatures of the ``sharp`` routing gradient, calibrated once on the first batch's clean images (so that
    every batch, resumed or sharded, attacks the same surrogate); None for a model without gates."""
    if not model.is_gated:
        return None
    return calibrate_temperature(model, _first_batch(model, data, config)[0])


def _surrogate_fidelities(model: CoarseFineNet, data: CoarseFineDataset, config: AttackConfig,
                          plans: Sequence[EvalPlan], temperature: torch.Tensor | None) -> dict[str, float]:
    """Per (gate_mode, gate_grad) of the white-box plans: how often the surrogate predicts what the deployed
    model does on the first batch (the attacker's gradient is only as good as its surrogate)."""
    if not model.is_gated:
        return {}
    x, _ = _first_batch(model, data, config)
    out: dict[str, float] = {}
    for mode, grad in dedupe([(p.gate_mode, p.gate_grad) for p in plans if not p.source_run]):
        if mode != "hard":
            continue
        seed_everything(derive_seed(config.seed, "fidelity", mode, grad))
        out[f"{mode}/{grad}"] = surrogate_fidelity(model, x, config.target, grad, temperature)
    return out


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


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Subject:
    """What an attack run attacks: the deployed model, its test data, and where both came from (for the manifest).

    ``checkpoint`` is the checkpoint's path relative to the run directory, "" for a model handed over in memory
    (:func:`attack_subject` then runs in this process only).
    """

    model: CoarseFineNet
    model_name: str
    dataset: DatasetInfo
    data: CoarseFineDataset
    data_source: dict[str, Any]
    checkpoint: str = ""
    subset: Subset | None = None  # which samples of the split ``data`` holds; None: ``data`` as given
    #: an adapted model's fidelity and randomness check (models.fidelity.ModelCheck.to_dict), for the manifest
    model_check: dict[str, Any] | None = None

    @property
    def attacked(self) -> Subset:
        """The recorded subset: ``subset``, else every sample of ``data`` as given (rule ``given``)."""
        return self.subset if self.subset is not None else given_subset(self.data)


def load_subject(run: RunDir, n: int, device: torch.device, rule: str = "stratified", seed: int = 0) -> Subject:
    """The run's model (best checkpoint, else last) on ``device`` and the ``n`` samples of its test data that
    ``rule`` and ``seed`` choose (:func:`robustness.data.subset.select_subset`)."""
    checkpoint = load_run_checkpoint(run)
    model = checkpoint.build_model(device).requires_grad_(False)  # attacks need input gradients only
    data, data_source, subset = eval_data(run, checkpoint, n, rule, seed)
    return Subject(model, checkpoint.model_name, checkpoint.dataset, data, data_source,
                   str(checkpoint.path.relative_to(run.root)) if checkpoint.path else "", subset)


def run_attacks(run_dir: str | os.PathLike[str], config: AttackConfig, resume: bool = False,
                transfer_from: str | os.PathLike[str] | None = None, progress: bool = True, *, force: bool = False,
                on_shard: Callable[[Path], None] | None = None) -> AttackResult:
    """Attack the model of ``run_dir`` as ``config`` says and write records, manifest and worst case into it.

    ``resume`` skips shards that exist (never duplicating rows); ``force`` deletes previous attack results first;
    with neither, a run that already holds records is a RunDirError. ``transfer_from`` (another run directory)
    crafts the examples white-box on that run's model and scores them on this one (``source_run`` = its name).
    ``on_shard(path)`` is called after each shard is written.
    """
    if resume and force:
        raise ConfigError("--resume and --force exclude each other")
    run = RunDir.at(run_dir)
    run.require()  # the lock would create a missing directory
    with run.writing("attack"):
        device = process_device(resolve_device(config.device))
        subject = load_subject(run, config.n, device, config.subset, config.subset_seed)
        crafting_model, source_name, source_sha256 = None, "", ""
        if transfer_from is not None:
            source_run = RunDir.at(transfer_from)
            source_ckpt = load_run_checkpoint(source_run)
            check_transferable(source_ckpt.dataset, subject.dataset, source_run.name, run.name)
            if source_run.root.resolve() == run.root.resolve():
                raise ConfigError("--transfer-from names the attacked run itself; transfer needs another run")
            crafting_model, source_name = source_ckpt.build_model(device).requires_grad_(False), source_run.name
            source_sha256 = file_sha256(source_ckpt.path) if source_ckpt.path else state_sha256(crafting_model)
        return attack_subject(run, subject, config, resume=resume, force=force, progress=progress,
                              on_shard=on_shard, crafting_model=crafting_model, source_name=source_name,
                              transfer_from=transfer_from, source_sha256=source_sha256)


def attack_subject(run: RunDir, subject: Subject, config: AttackConfig, *, resume: bool = False,
                   force: bool = False, progress: bool = True, on_shard: Callable[[Path], None] | None = None,
                   crafting_model: CoarseFineNet | None = None, source_name: str = "",
                   transfer_from: str | os.PathLike[str] | None = None, source_sha256: str = "") -> AttackResult:
    """Attack ``subject`` as ``config`` says and write records, manifest and worst case into ``run``: the one code
    path of ``dsn-robust attack`` and of the Python API. ``crafting_model`` (named ``source_name``, its checkpoint
    hashing to ``source_sha256``) crafts the examples for a transfer evaluation; :func:`run_attacks` documents the
    rest. Holds the run's writer lock throughout."""
    if resume and force:
        raise ConfigError("--resume and --force exclude each other")
    with run.writing("attack"):
        return _attack_subject(run, subject, config, resume, force, progress, on_shard, crafting_model, source_name,
                               transfer_from, source_sha256)


def _attack_subject(run: RunDir, subject: Subject, config: AttackConfig, resume: bool, force: bool, progress: bool,
                    on_shard: Callable[[Path], None] | None, crafting_model: CoarseFineNet | None, source_name: str,
                    transfer_from: str | os.PathLike[str] | None, source_sha256: str) -> AttackResult:
    model, data = subject.model, subject.data
    device = next(model.parameters()).device
    n = len(data)
    crafting_model = model if crafting_model is None else crafting_model

    plans = plan_evaluations(config, crafting_model.is_gated, source_name)
    if config.eps_auto:
        log.info("eps = auto: only the minimal-perturbation attacks run now; robustness.eps_grid chooses the grid "
                 "from their distances and runs the fixed-eps attacks at it")
    info = subject.dataset
    head_classes = info.num_fine if config.target == "fine" else info.num_coarse
    if head_classes < 3 and any(p.name == "apgd-dlr" for p in plans):
        raise ConfigError(f"apgd-dlr needs at least 3 classes; the {config.target} head has {head_classes}")

    previous = run.read_manifest()
    existing = run.has_records()
    if existing and not force and not resume:
        raise RunDirError(f"{run.root} already holds attack records; pass --resume to continue (or add to) "
                          f"them or --force to replace them")
    resuming = bool(resume and existing)
    if resuming:
        plans = grown(plans, previous, config.cascade)  # budgets added to stored evaluations: their own evaluations
    launched = env_world()[0]
    world = launched if launched > 1 else config.workers if device.type == "cpu" else 1
    with torch_threads(config.threads), true_float32(), distributed(device) as dist:
        sizing = resolve_batch_size(config, plans, crafting_model, data, device, world=world,
                                    previous=previous if resuming else None, agree=dist.all_min)
        if sizing.auto and dist.main:
            log.info(sizing.log_line())
        asked, config = config, dataclasses.replace(config, batch_size=sizing.size)
        n_batches = math.ceil(n / config.batch_size)
        setup = {"n": n, "batch_size": config.batch_size, "batch_size_auto": sizing.auto, "seed": config.seed,
                 "subset": subject.attacked, "draws": int(getattr(model, "draws", 1))}
        run_fp = run_fingerprint(subject_sha256(run, subject), setup)
        fingerprints = {p.id: shard_fingerprint_of(run_fp, p, source_sha256) for p in plans}
        if resuming:
            _check_resumable(run, previous, run_fp, plans, fingerprints)

        # a resume with every shard written attacks nothing: no worker processes, no probes (the manifest keeps
        # them)
        finished = bool(resuming and previous) and all(_complete(run, p.id, n_batches) for p in plans)
        if config.workers > 1 and env_world()[0] == 1 and not finished:
            if device.type == "cpu":  # the workers size "auto" alike: the same rule for the same world
                if not subject.checkpoint:
                    raise ConfigError("an in-memory model is attacked in this process: use workers=1")
                return _run_in_workers(run, asked, n_batches, resume, transfer_from, progress, force, on_shard)
            log.info("workers=%d applies to CPU runs; on a GPU launch the attack under torchrun", config.workers)

        temperature = None if finished else sharp_temperature(model, data, config)
        crafting_temperature = (temperature if crafting_model is model or finished
                                else sharp_temperature(crafting_model, data, config))
        dist.barrier()
        if dist.main:
            if force and run.attacks.exists():
                log.info("--force: deleting previous attack results in %s", run.attacks)
                shutil.rmtree(run.records, ignore_errors=True)
                for stale in (run.manifest, run.worst_case):
                    stale.unlink(missing_ok=True)
                previous = None
            kept = previous if resuming else None
            if finished:
                probes = {key: (previous or {}).get(key) for key in
                          ("zero_grad_share", "surrogate_fidelity", "sharp_temperature")}
            else:
                probes = {"zero_grad_share": _zero_gradient_shares(model, data, config, plans),
                          "surrogate_fidelity": _surrogate_fidelities(model, data, config, plans, temperature),
                          "sharp_temperature": None if temperature is None else temperature.tolist()}
            if kept:
                for key in ("zero_grad_share", "surrogate_fidelity"):
                    probes[key] = {**(kept.get(key) or {}), **(probes[key] or {})}
            manifest = _manifest(run, subject, asked, setup, n_batches, probes, plans, kept, run_fp, source_name)
            atomic_write_json(run.manifest, manifest)
        dist.barrier()

        _attack_batches(run, subject.model_name, model, crafting_model, data, config, plans, n_batches, dist,
                        progress, on_shard, fingerprints, crafting_temperature)

        dist.barrier()
        if not dist.main:
            return AttackResult(run.root, {}, conform(pd.DataFrame(columns=list(RECORD_COLUMNS))))
        manifest = run.read_manifest() or {}
        records = read_records(run.records) if run.has_records() else conform(
            pd.DataFrame(columns=list(RECORD_COLUMNS)))
        for entry in manifest.get("evaluations", []):
            entry["complete"] = _complete(run, entry["id"], manifest.get("n_batches", n_batches))
            if entry.get("kind") == MINIMAL:
                entry["convergence"] = _convergence(records, entry)
        atomic_write_json(run.manifest, jsonable(manifest))
        worst = worst_case(accuracy_rows(records))
        atomic_write(run.worst_case, lambda tmp: worst.to_parquet(tmp, index=False))
        return AttackResult(run.root, manifest, records)


def _worker(rank: int, world: int, port: int, run_dir: str, config: AttackConfig, resume: bool,
            transfer_from: str | None, progress: bool, force: bool, level: int) -> None:
    """One spawned rank: the environment torchrun would set, then the ordinary (sharded) run."""
    join_as_rank(rank, world, port, level)
    run_attacks(run_dir, dataclasses.replace(config, workers=1), resume=resume, transfer_from=transfer_from,
                progress=progress and rank == 0, force=force)


def _run_in_workers(run: RunDir, config: AttackConfig, n_batches: int, resume: bool, transfer_from: Any,
                    progress: bool, force: bool, on_shard: Callable[[Path], None] | None) -> AttackResult:
    """``config.workers`` processes on this machine, each taking every ``workers``-th of the ``n_batches``
    batches (as under torchrun); everything is validated by the caller first, so a user's mistake is still one
    line from this process."""
    if on_shard is not None:
        raise ConfigError("on_shard cannot be observed across worker processes; use workers=1")
    if n_batches < config.workers:
        log.info("%d batch(es) for %d workers: lower batch_size to use them all", n_batches, config.workers)
    level = logging.getLogger().getEffectiveLevel()
    mp.start_processes(_worker, nprocs=config.workers, start_method="spawn", join=True,
                       args=(config.workers, free_port(), str(run.root), config, resume,
                             None if transfer_from is None else str(transfer_from), progress, force, level))
    records = read_records(run.records) if run.has_records() else conform(pd.DataFrame(columns=list(RECORD_COLUMNS)))
    return AttackResult(run.root, run.read_manifest() or {}, records)


def _batch_records(run: RunDir, eval_id: str, b: int, frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Batch ``b``'s records of evaluation ``eval_id``: made in this invocation, else read from its shard."""
    if eval_id not in frames:
        frames[eval_id] = read_records(run.shard(eval_id, b))
    return frames[eval_id]


def _attack_batches(run: RunDir, model_name: str, model: CoarseFineNet, crafting_model: CoarseFineNet,
                    data: CoarseFineDataset, config: AttackConfig, plans: Sequence[EvalPlan], n_batches: int,
                    dist: Distributed, progress: bool, on_shard: Callable[[Path], None] | None,
                    fingerprints: dict[str, dict[str, Any]], temperature: torch.Tensor | None = None) -> None:
    device = next(model.parameters()).device
    scorer = Scorer(model, run.name, model_name, config.seed)
    mine = [b for b in range(n_batches) if b % dist.world == dist.rank]
    skipped = 0
    bar = progress_bar(total=len(mine) * len(plans), desc=f"attack {run.name}", unit="eval",
                       disable=not progress or not dist.main, every=max(1, len(mine) * len(plans) // 20))
    try:
        for b in mine:
            todo = [p for p in plans if not run.shard(p.id, b).is_file()]
            skipped += len(plans) - len(todo)
            bar.update(len(plans) - len(todo))
            if not todo:
                continue
            lo = b * config.batch_size
            hi = min(lo + config.batch_size, len(data))
            x, fine, coarse = data.batch(slice(lo, hi))
            batch = Batch(b, np.arange(lo, hi), x.to(device), fine.to(device), coarse.to(device))
            frames: dict[str, pd.DataFrame] = {}
            for plan in todo:
                unit_seed = derive_seed(config.seed, plan.id, b)
                earlier = [_batch_records(run, q, b, frames) for q in plan.after]
                crafting = Target(crafting_model, plan.target, plan.gate_mode, plan.gate_grad, config.eot_samples,
                                  device, temperature=temperature if plan.gate_grad == "sharp" else None,
                                  keep_first=not plan.source_run)
                if plan.attack.refines:
                    bound = cascade.known_distances(earlier, batch.samples, plan.norm)
                    crafting.upper_bound = torch.from_numpy(bound).to(device)
                else:
                    crafting.settled = cascade.settled(plan, earlier, batch.samples, device)
                with heartbeat(f"{plan.id} on batch {b + 1} of {n_batches}", disable=not progress or not dist.main):
                    advs = plan.attack(crafting, batch.x, batch.labels(plan.target), plan.eps, unit_seed)
                frame = scorer.score(plan, batch, advs, unit_seed)
                if not plan.attack.refines:
                    frame = cascade.carry(frame, earlier)
                frames[plan.id] = frame
                path = run.shard(plan.id, b)
                atomic_write(path, lambda tmp: write_shard(frame, tmp, fingerprints[plan.id]))
                bar.update(1)
                if on_shard is not None:
                    on_shard(path)
    finally:
        bar.close()
    if skipped:
        log.info("resume: %d finished shard(s) kept", skipped)
