"""The run: batches x evaluations (:mod:`attacks.runner.plan`) -> records (:mod:`attacks.runner.scoring`) in a
run directory; resumable; shardable under torchrun.

Layout written into the run directory::

    attacks/manifest.json                                  what was run (below)
    attacks/records/<evaluation-id>/shard-<batch:05d>.parquet   rows of one batch, every eps (attacks.records)
    attacks/worst_case.parquet                             per-sample worst case at each eps over the attacks
                                                           that count for accuracy (attacks.records.accuracy_rows)

The manifest (``schema: dsn-robustness/attacks/v1``) holds: ``run``, ``model``, ``checkpoint`` (relative path),
``dataset`` (DatasetInfo.to_dict()), ``data`` (dataset name, root, options, split), ``seed``, ``n``,
``batch_size`` (the number used, also when ``"auto"`` chose it: :mod:`attacks.runner.sizing`),
``batch_size_auto`` (whether it did), ``n_batches``, ``float32`` (``{"tf32": false, "matmul_precision":
"highest"}``: the float32 arithmetic in force while attacking, which :func:`robustness.core.runtime.true_float32`
makes exact whatever the process's global TF32 flags say, so that records never depend on them), ``versions``
(package versions), ``path_names`` (gate names in path-bit order), ``full_macs``, ``gated_block_macs``,
``zero_grad_share`` (``{"<gate_mode>/<gate_grad>": share}`` of samples whose input gradient is exactly zero, on
the first batch), ``surrogate_fidelity`` (``{"<gate_mode>/<gate_grad>":
share}`` of first-batch samples whose surrogate network predicts what the deployed one does; 1 for ``none`` and
``ste``), ``sharp_temperature`` (the per-gate temperatures of the ``sharp`` routing gradient, calibrated on the
first batch's clean images and used for every batch), ``config`` (the AttackConfig of the last invocation) and
``evaluations``: one ``{id, attack, kind, backend, norm, eps, gate_mode, gate_grad, target, source_run, config,
complete}`` per evaluation (``config`` = the attack's parameters; ``complete`` = every shard exists), plus for a
minimal-norm attack ``convergence`` (``{clean_correct, found, share_found, median_norm, converged}`` from its
unbounded rows: a minimal attack that does not find an adversarial example for >= 99% of the clean-correct
samples has not converged, and its accuracies at the budgets are upper bounds).

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
from attacks.records import RECORD_COLUMNS, accuracy_rows, conform, read_records, worst_case
from attacks.runner.config import AttackConfig, dedupe
from attacks.runner.plan import EvalPlan, plan_evaluations
from attacks.runner.scoring import Batch, Scorer
from attacks.runner.sizing import resolve_batch_size
from models.checkpoint import Checkpoint, load_checkpoint
from models.network import CoarseFineNet
from models.surrogates import calibrate_temperature, surrogate_fidelity
from models.training import TrainConfig
from robustness.core.errors import CheckpointError, ConfigError, RunDirError
from robustness.core.rundir import RunDir, atomic_write, atomic_write_json
from robustness.core.runtime import (Distributed, derive_seed, distributed, env_world, float32_state, free_port,
                                     join_as_rank, jsonable, package_versions, process_device, resolve_device,
                                     seed_everything, torch_threads, true_float32)
from robustness.data import CoarseFineDataset, DatasetInfo, load_dataset

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


def load_eval_data(run: RunDir, checkpoint: Checkpoint, n: int) -> tuple[CoarseFineDataset, dict[str, Any]]:
    """The first ``n`` test samples of the data the run was trained on (from its ``config.json``)."""
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
    return test.subset(n), data


def check_transferable(source: DatasetInfo, target: DatasetInfo, source_name: str, target_name: str) -> None:
    """Raise ConfigError unless examples crafted for ``source`` can be evaluated on ``target`` (same dataset)."""
    problems = source.differences(target)
    if problems:
        raise ConfigError(f"cannot transfer attacks from run {source_name!r} to run {target_name!r}: "
                          f"{'; '.join(problems)}")


# --------------------------------------------------------------------------------------------------------------
# Manifest and resume
# --------------------------------------------------------------------------------------------------------------


def _check_resumable(run: RunDir, previous: dict[str, Any] | None, setup: dict[str, Any],
                     plans: Sequence[EvalPlan]) -> None:
    if previous is None:
        raise RunDirError(f"{run.root} holds attack records but no {run.manifest.name}; cannot tell how they were "
                          f"made: pass --force to replace them")
    for key in ("n", "batch_size", "seed"):
        if previous.get(key) != setup[key]:
            raise RunDirError(f"{run.root}: existing attack records were made with {key}={previous.get(key)!r}, "
                              f"this run asks for {key}={setup[key]!r}; use the same value or pass --force")
    before = {e.get("id"): e for e in previous.get("evaluations", [])}
    for plan in plans:
        old = before.get(plan.id)
        if old is None:
            continue
        new = plan.describe()
        for key in ("eps", "config"):
            if jsonable(old.get(key)) != jsonable(new[key]):
                raise RunDirError(f"{run.root}: evaluation {plan.id} was run with {key}={old.get(key)!r}, this run "
                                  f"asks for {new[key]!r}; use the same settings or pass --force")


def _complete(run: RunDir, eval_id: str, n_batches: int) -> bool:
    return all(run.shard(eval_id, b).is_file() for b in range(n_batches))


def _manifest(run: RunDir, subject: Subject, config: AttackConfig, setup: dict[str, Any], n_batches: int,
              probes: dict[str, Any], plans: Sequence[EvalPlan], previous: dict[str, Any] | None) -> dict[str, Any]:
    model = subject.model
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
        "seed": setup["seed"],
        "n": setup["n"],
        "batch_size": setup["batch_size"],
        "batch_size_auto": setup["batch_size_auto"],
        "n_batches": n_batches,
        "float32": float32_state(),
        "versions": package_versions(),
        "path_names": list(model.gate_names),
        "full_macs": float(model.full_macs),
        "gated_block_macs": [float(m) for m in model.costs.gated_blocks],
        **probes,
        "config": jsonable(config.to_dict()),
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


def load_subject(run: RunDir, n: int, device: torch.device) -> Subject:
    """The run's model (best checkpoint, else last) on ``device`` and the first ``n`` samples of its test data."""
    checkpoint = load_run_checkpoint(run)
    model = checkpoint.build_model(device).requires_grad_(False)  # attacks need input gradients only
    data, data_source = load_eval_data(run, checkpoint, n)
    return Subject(model, checkpoint.model_name, checkpoint.dataset, data, data_source,
                   str(checkpoint.path.relative_to(run.root)) if checkpoint.path else "")


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
    device = process_device(resolve_device(config.device))
    subject = load_subject(run, config.n, device)
    crafting_model, source_name = None, ""
    if transfer_from is not None:
        source_run = RunDir.at(transfer_from)
        source_ckpt = load_run_checkpoint(source_run)
        check_transferable(source_ckpt.dataset, subject.dataset, source_run.name, run.name)
        if source_run.root.resolve() == run.root.resolve():
            raise ConfigError("--transfer-from names the attacked run itself; transfer needs another run")
        crafting_model, source_name = source_ckpt.build_model(device).requires_grad_(False), source_run.name
    return attack_subject(run, subject, config, resume=resume, force=force, progress=progress, on_shard=on_shard,
                          crafting_model=crafting_model, source_name=source_name, transfer_from=transfer_from)


def attack_subject(run: RunDir, subject: Subject, config: AttackConfig, *, resume: bool = False,
                   force: bool = False, progress: bool = True, on_shard: Callable[[Path], None] | None = None,
                   crafting_model: CoarseFineNet | None = None, source_name: str = "",
                   transfer_from: str | os.PathLike[str] | None = None) -> AttackResult:
    """Attack ``subject`` as ``config`` says and write records, manifest and worst case into ``run``: the one code
    path of ``dsn-robust attack`` and of the Python API. ``crafting_model`` (named ``source_name``) crafts the
    examples for a transfer evaluation; :func:`run_attacks` documents the rest."""
    if resume and force:
        raise ConfigError("--resume and --force exclude each other")
    model, data, data_source = subject.model, subject.data, subject.data_source
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
    launched = env_world()[0]
    world = launched if launched > 1 else config.workers if device.type == "cpu" else 1
    with torch_threads(config.threads), true_float32(), distributed(device) as dist:
        sizing = resolve_batch_size(config, plans, crafting_model, data, device, world=world,
                                    previous=previous if resuming else None, agree=dist.all_min)
        if sizing.auto and dist.main:
            log.info(sizing.log_line())
        asked, config = config, dataclasses.replace(config, batch_size=sizing.size)
        n_batches = math.ceil(n / config.batch_size)
        setup = {"n": n, "batch_size": config.batch_size, "batch_size_auto": sizing.auto, "seed": config.seed}
        if resuming:
            _check_resumable(run, previous, setup, plans)

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
            manifest = _manifest(run, subject, asked, setup, n_batches, probes, plans, kept)
            atomic_write_json(run.manifest, manifest)
        dist.barrier()

        _attack_batches(run, subject.model_name, model, crafting_model, data, config, plans, n_batches, dist,
                        progress, on_shard, crafting_temperature)

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


def _attack_batches(run: RunDir, model_name: str, model: CoarseFineNet, crafting_model: CoarseFineNet,
                    data: CoarseFineDataset, config: AttackConfig, plans: Sequence[EvalPlan], n_batches: int,
                    dist: Distributed, progress: bool, on_shard: Callable[[Path], None] | None,
                    temperature: torch.Tensor | None = None) -> None:
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    scorer = Scorer(model, run.name, model_name, config.seed)
    mine = [b for b in range(n_batches) if b % dist.world == dist.rank]
    skipped = 0
    bar = tqdm(total=len(mine) * len(plans), desc=f"attack {run.name}", unit="eval", dynamic_ncols=True,
               disable=not progress or not dist.main)
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
            for plan in todo:
                unit_seed = derive_seed(config.seed, plan.id, b)
                crafting = Target(crafting_model, plan.target, plan.gate_mode, plan.gate_grad, config.eot_samples,
                                  device, temperature=temperature if plan.gate_grad == "sharp" else None,
                                  keep_first=not plan.source_run)
                advs = plan.attack(crafting, batch.x, batch.labels(plan.target), plan.eps, unit_seed)
                frame = scorer.score(plan, batch, advs, unit_seed)
                path = run.shard(plan.id, b)
                atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))
                bar.update(1)
                if on_shard is not None:
                    on_shard(path)
    finally:
        bar.close()
    if skipped:
        log.info("resume: %d finished shard(s) kept", skipped)
