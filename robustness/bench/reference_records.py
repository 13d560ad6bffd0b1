"""The reference PGD's finds as evidence: its examples become the run's records of attack ``reference-pgd``.

``dsn-robust bench reference`` checks the suite against an independent PGD; a sample that the reference fools
and the suite calls robust is not robust, whoever found the example. So after the comparison (which reads the
suite's own records only: earlier ``reference-pgd`` rows never compare the reference with itself) its examples
are scored like every attack's (:class:`attacks.runner.scoring.Scorer`: budget check, the deployed forward, the
frozen-path control) and written into the run as one evaluation: attack ``reference-pgd``, backend
``reference``, norm ``linf``, routing gradient ``any`` (the reference's examples come from every gradient it ran),
the reference's gate mode and head, at the eps of the run's own grid. They count for accuracy, so the run's worst
case takes them (``attacks/worst_case.parquet`` is rewritten), and the report lists what the reference found
beside every other attack.

The shards carry the run's fingerprint (model hash, seed, n, batch size, attacked images) and the reference's
settings as the evaluation's config, so a report refuses them if the model changes, and ``attack --force`` removes
them with the rest. Written only when the reference attacked every sample of the run's records (shards cover
whole batches) and only at eps the run already has; under the run's writer lock.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from attacks.base import ITERATIVE, Attack
from attacks.records import accuracy_rows, read_records, worst_case, write_shard
from attacks.runner.plan import EvalPlan
from attacks.runner.provenance import shard_fingerprint_of
from attacks.runner.scoring import Batch, Scorer
from models.network import CoarseFineNet
from robustness.core.errors import RunDirError
from robustness.core.files import atomic_write, atomic_write_json
from robustness.core.rundir import RunDir
from robustness.core.runtime import derive_seed, jsonable, package_versions

log = logging.getLogger(__name__)

#: The record name of the reference's examples, and its backend.
REFERENCE_ATTACK, REFERENCE_BACKEND = "reference-pgd", "reference"


@dataclass(frozen=True)
class ReferenceParams:
    """The reference's settings, recorded as the evaluation's config."""

    steps: int = 50
    restarts: int = 5
    step_factor: float = 2.5
    grads: tuple[str, ...] = ()
    losses: tuple[str, ...] = ()
    seed: int = 0


class ReferencePGD(Attack):
    """Not a registered attack: the shape the runner's plan and scorer need to record the reference's examples."""

    name, backend, kind = REFERENCE_ATTACK, REFERENCE_BACKEND, ITERATIVE
    norms: ClassVar[tuple[str, ...]] = ("linf",)
    Params = ReferenceParams


def reference_plan(params: dict[str, Any], eps: Sequence[float], gate_mode: str, head: str) -> EvalPlan:
    """The evaluation the reference's examples are recorded as."""
    return EvalPlan(ReferencePGD("linf", **params), [float(e) for e in eps], gate_mode, "any", head)


def record_reference(run: RunDir, model: CoarseFineNet, x: torch.Tensor, fine: torch.Tensor, coarse: torch.Tensor,
                     examples: dict[float, torch.Tensor], params: dict[str, Any], gate_mode: str,
                     head: str) -> int:
    """Write the reference's ``examples`` (eps -> [n, C, H, W], the clean image where it found nothing) of the run's
    attacked samples ``x`` as evaluation ``reference-pgd`` and rewrite the worst case. Returns the number of
    (sample, eps) it fooled that no attack of the run had (0 when nothing was written)."""
    with run.writing("bench reference"):
        manifest = run.read_manifest()
        stored = (manifest or {}).get("fingerprint")
        if not isinstance(stored, dict) or not run.has_records():
            log.info("%s has no fingerprinted attack records: the reference's finds are not recorded", run.root)
            return 0
        n, batch_size = int(manifest.get("n") or 0), int(manifest.get("batch_size") or 0)
        if len(x) != n or batch_size < 1:
            log.info("the reference attacked %d of the run's %d samples: its finds are recorded only when it "
                     "attacks all of them (leave --n out)", len(x), n)
            return 0
        records = read_records(run.records)
        own = records[records["attack"].astype(str) != REFERENCE_ATTACK]
        grid = set(own.loc[np.isfinite(own["eps"].to_numpy(float)), "eps"].astype(float))
        eps = [e for e in sorted(examples) if e in grid]
        if len(eps) < len(examples):
            log.info("the reference's finds are recorded at the run's own eps only (%d of %d)", len(eps),
                     len(examples))
        if not eps:
            return 0
        plan = reference_plan(params, eps, gate_mode, head)
        run_fp = {**stored, "versions": package_versions()}
        fingerprint = shard_fingerprint_of(run_fp, plan)
        scorer = Scorer(model, run.name, str(manifest.get("model") or ""), int(stored.get("seed") or 0))
        device = next(model.parameters()).device
        frames = []
        for b in range(math.ceil(n / batch_size)):
            lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
            batch = Batch(b, np.arange(lo, hi), x[lo:hi].to(device), fine[lo:hi].to(device),
                          coarse[lo:hi].to(device))
            advs = [examples[e][lo:hi].to(device) for e in eps]
            frame = scorer.score(plan, batch, advs, derive_seed(int(stored.get("seed") or 0), plan.id, b))
            atomic_write(run.shard(plan.id, b), lambda tmp: write_shard(frame, tmp, fingerprint))
            frames.append(frame)
        entries = [e for e in manifest.get("evaluations", []) if e.get("id") != plan.id]
        manifest["evaluations"] = entries + [plan.describe(complete=True)]
        atomic_write_json(run.manifest, jsonable(manifest))
        before = worst_case(accuracy_rows(own))
        everything = read_records(run.records)
        worst = worst_case(accuracy_rows(everything))
        atomic_write(run.worst_case, lambda tmp: worst.to_parquet(tmp, index=False))
        return _new_finds(before, worst)


def _new_finds(before, after) -> int:
    keys = ["run", "model", "norm", "eps", "gate_mode", "target", "source_run", "sample"]
    merged = before[keys + ["robust"]].merge(after[keys + ["robust"]], on=keys, suffixes=("_before", "_after"))
    return int((merged["robust_before"] & ~merged["robust_after"]).sum())


def params_of(config: Any, grads: Sequence[str]) -> dict[str, Any]:
    """The :class:`ReferenceParams` of a :class:`robustness.bench.reference.ReferenceConfig` run with ``grads``."""
    return dataclasses.asdict(ReferenceParams(steps=config.steps, restarts=config.restarts,
                                              grads=tuple(grads), losses=tuple(config.losses), seed=config.seed))
