"""The run: batches x evaluations (:mod:`attacks.runner.plan`) -> records (:mod:`attacks.runner.scoring`) in a
run directory; resumable; shardable under torchrun.

* :mod:`attacks.runner.subject`: what is attacked (the run's checkpoint and the chosen test images) and the hash
  that ties records to its model;
* :mod:`attacks.runner.provenance`: the run directory's layout, the manifest, the shards' fingerprints and the
  checks that refuse to resume (or report) records of another model, setting or set of images;
* :mod:`attacks.runner.probes`: what the manifest records of the first batch (zero gradients, surrogate fidelity,
  the ``sharp`` temperatures);
* this module: the orchestration (:func:`run_attacks`, :func:`attack_subject`), the worker processes and the
  loop over batches.

The run holds its directory's writer lock (:meth:`robustness.core.rundir.RunDir.writing`) throughout.

Every shard is written atomically, so an interrupted run resumes (``resume=True``) by skipping the shards that
exist. Shards are keyed by batch index, so a resumed run must cut the data as before: ``batch_size = "auto"``
reuses the manifest's batch size, and a different fixed one is refused. Every batch x evaluation draws its
randomness from a seed derived from (seed, evaluation id, batch), so a resumed or a multi-process run gives the
same records as an uninterrupted single-process one. Under ``torchrun`` (``WORLD_SIZE > 1``) rank r takes the
batches with ``index % world == r``; rank 0 writes the manifest.

Paths and JSON files of the run directory are :class:`robustness.core.rundir.RunDir`'s.
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

from attacks.base import MINIMAL, Target
from attacks.records import RECORD_COLUMNS, accuracy_rows, conform, read_records, worst_case, write_shard
from attacks.runner import cascade
from attacks.runner.config import AttackConfig
from attacks.runner.growth import grown
from attacks.runner.plan import EvalPlan, plan_evaluations
from attacks.runner.probes import first_batch_probes, sharp_temperature
from attacks.runner.provenance import (_check_resumable, _complete, _convergence, _manifest, run_fingerprint,
                                       shard_fingerprint_of)
from attacks.runner.scoring import Batch, Scorer
from attacks.runner.sizing import resolve_batch_size
from attacks.runner.subject import (Subject, check_transferable, load_run_checkpoint, load_subject, state_sha256,
                                    subject_sha256)
from models.network import CoarseFineNet
from models.routing import routing_gradient
from robustness.core.errors import ConfigError, RunDirError
from robustness.core.processes import in_processes
from robustness.core.progress import heartbeat, progress_bar
from robustness.core.files import atomic_write, atomic_write_json, file_sha256
from robustness.core.rundir import RunDir
from robustness.core.runtime import (Distributed, derive_seed, distributed, env_world, free_port, join_as_rank,
                                     jsonable, process_device, resolve_device, torch_threads, true_float32)
from robustness.data import CoarseFineDataset

log = logging.getLogger(__name__)


@dataclass
class AttackResult:
    """What :func:`run_attacks` did: the manifest it wrote and every record now in the run (rank 0 only)."""

    run_dir: Path
    manifest: dict[str, Any]
    records: pd.DataFrame


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
    crafting_model = model if crafting_model is None else crafting_model
    plans = _plans(config, crafting_model, subject, source_name)

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
        asked = config
        config, n_batches, setup, run_fp, fingerprints = _set_up(run, subject, config, plans, crafting_model, device,
                                                                 world, dist, previous, resuming, source_sha256)

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
                _delete_previous(run)
                previous = None
            kept = previous if resuming else None
            probes = first_batch_probes(model, data, config, plans, temperature, finished, kept)
            manifest = _manifest(run, subject, asked, setup, n_batches, probes, plans, kept, run_fp, source_name)
            atomic_write_json(run.manifest, manifest)
        dist.barrier()

        _attack_batches(run, subject.model_name, model, crafting_model, data, config, plans, n_batches, dist,
                        progress, on_shard, fingerprints, crafting_temperature)

        dist.barrier()
        if not dist.main:
            return AttackResult(run.root, {}, conform(pd.DataFrame(columns=list(RECORD_COLUMNS))))
        return _finish(run, n_batches)


def _plans(config: AttackConfig, crafting_model: CoarseFineNet, subject: Subject, source_name: str) -> list[EvalPlan]:
    """The evaluations ``config`` asks for, crafted on ``crafting_model``; ConfigError where the attacked head
    cannot take one."""
    plans = plan_evaluations(config, crafting_model.is_gated, source_name)
    if config.eps_auto:
        log.info("eps = auto: only the minimal-perturbation attacks run now; robustness.app.eps_grid chooses the grid "
                 "from their distances and runs the fixed-eps attacks at it")
    info = subject.dataset
    head_classes = info.num_fine if config.target == "fine" else info.num_coarse
    if head_classes < 3 and any(p.name == "apgd-dlr" for p in plans):
        raise ConfigError(f"apgd-dlr needs at least 3 classes; the {config.target} head has {head_classes}")
    return plans


def _set_up(run: RunDir, subject: Subject, config: AttackConfig, plans: Sequence[EvalPlan],
            crafting_model: CoarseFineNet, device: torch.device, world: int, dist: Distributed,
            previous: dict[str, Any] | None, resuming: bool, source_sha256: str
            ) -> tuple[AttackConfig, int, dict[str, Any], dict[str, Any], dict[str, dict[str, Any]]]:
    """``config`` with its batch size resolved (:mod:`attacks.runner.sizing`), the number of batches, the run's
    setup, its fingerprint and each plan's shard fingerprint; a resume is checked against the kept records
    (:mod:`attacks.runner.provenance`) before anything is attacked."""
    model, data = subject.model, subject.data
    n = len(data)
    sizing = resolve_batch_size(config, plans, crafting_model, data, device, world=world,
                                previous=previous if resuming else None, agree=dist.all_min)
    if sizing.auto and dist.main:
        log.info(sizing.log_line())
    config = dataclasses.replace(config, batch_size=sizing.size)
    n_batches = math.ceil(n / config.batch_size)
    setup = {"n": n, "batch_size": config.batch_size, "batch_size_auto": sizing.auto, "seed": config.seed,
             "subset": subject.attacked, "draws": int(getattr(model, "draws", 1))}
    run_fp = run_fingerprint(subject_sha256(run, subject), setup)
    fingerprints = {p.id: shard_fingerprint_of(run_fp, p, source_sha256) for p in plans}
    if resuming:
        _check_resumable(run, previous, run_fp, plans, fingerprints)
    return config, n_batches, setup, run_fp, fingerprints


def _delete_previous(run: RunDir) -> None:
    """``--force``: the previous attack results go before anything is written."""
    log.info("--force: deleting previous attack results in %s", run.attacks)
    shutil.rmtree(run.records, ignore_errors=True)
    for stale in (run.manifest, run.worst_case):
        stale.unlink(missing_ok=True)


def _finish(run: RunDir, n_batches: int) -> AttackResult:
    """Rank 0, once every rank has written its batches: each evaluation's ``complete`` (and a minimal attack's
    ``convergence``) into the manifest, the worst case over the records, and what the run holds now."""
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
    port, source = free_port(), None if transfer_from is None else str(transfer_from)
    in_processes(_worker, [(rank, config.workers, port, str(run.root), config, resume, source, progress, force, level)
                           for rank in range(config.workers)], config.workers)
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
                                  device, temperature=temperature if routing_gradient(plan.gate_grad).needs_temperature else None,
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
