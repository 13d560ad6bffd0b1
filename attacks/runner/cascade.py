"""The attack cascade: each fixed-budget attack runs only on what the attacks before it left robust (AutoAttack's
rule, Croce & Hein 2020), and a refining attack starts below what they found.

Cascade groups. Fixed-budget white-box evaluations (kinds :data:`attacks.base.TRACKED_KINDS`, not transfer, not
the stochastic ``random`` gate mode) that share gate mode, routing gradient, head and norm form one group, in the
plan's order (the config's attack order). Per batch and budget, a sample that an earlier evaluation of its group
already fooled (``clean_correct`` and not ``robust``: a verified adversarial example of the deployed forward, or
non-finite logits) is *settled*: the later evaluation does not attack it (:attr:`attacks.base.Target.settled`; its
tracker counts the sample as done) and its row is the earlier row carried over, adversarial columns included, with
``found_by`` naming the attack that found the example. Each group's routing gradient keeps its own cascade, so the
report's routing-gradient check still compares complete evaluations; the worst case over the group is what it
would be without the cascade (a settled sample is not robust either way), at a fraction of the cost.

What a row means under the cascade: an evaluation's robust accuracy is the robust accuracy *after* it and every
attack before it in its group (AutoAttack prints the same running number); what the attack found by itself is its
rows with ``found_by == attack``. ``cascade = false`` attacks every sample with every attack (the per-attack
numbers are then each attack's own).

Resume: a settled mask and a carried row come from the earlier evaluation's records of the same batch (in memory,
or read from its shard), never from images, so an interrupted run resumes to the records an uninterrupted one
writes. An evaluation's predecessors are recorded (``after``: their ids) in the manifest and in its shards'
fingerprints: records made with another cascade are refused on resume, never mixed.

Refining attacks (``Attack.refines``, e.g. ``pgd-refine``) follow every other white-box evaluation of the same gate
mode, head and norm (every routing gradient): :func:`known_distances` gives each sample the smallest distance at
which any of them fooled it, the attack's :attr:`attacks.base.Target.upper_bound`.
"""
from __future__ import annotations

from typing import Protocol, Sequence, TypeVar

import numpy as np
import pandas as pd
import torch

from attacks.base import TRACKED_KINDS, Attack


class Linked(Protocol):
    """What the cascade reads and sets of an evaluation (:class:`attacks.runner.plan.EvalPlan` is one); a protocol,
    so this module does not import the planner that imports it."""

    attack: Attack
    eps: list[float]
    gate_mode: str
    gate_grad: str
    target: str
    source_run: str
    after: tuple[str, ...]

    @property
    def norm(self) -> str: ...

    @property
    def id(self) -> str: ...


Plan = TypeVar("Plan", bound=Linked)

#: The columns a carried row takes from the earlier row that settled its sample (the clean columns are the same).
CARRIED_COLUMNS = ("adv_pred_fine", "adv_pred_coarse", "adv_correct", "success", "robust", "nonfinite", "linf",
                   "l2", "adv_path", "hamming", "adv_macs", "frozen_pred_fine", "frozen_pred_coarse",
                   "frozen_correct", "found_by")


def cascade_group(plan: Linked) -> tuple[str, str, str, str] | None:
    """The cascade group of ``plan`` (gate mode, routing gradient, head, norm); None: it attacks every sample."""
    if plan.source_run or plan.attack.kind not in TRACKED_KINDS or plan.gate_mode == "random":
        return None
    return plan.gate_mode, plan.gate_grad, plan.target, plan.norm


def _evidence_group(plan: Linked) -> tuple[str, str, str] | None:
    if plan.source_run or plan.gate_mode == "random":
        return None
    return plan.gate_mode, plan.target, plan.norm


def link(plans: Sequence[Plan], cascade: bool = True) -> list[Plan]:
    """``plans`` with refining attacks moved last and each plan's ``after`` set: the ids of the earlier plans of its
    cascade group (``cascade``), or, for a refining attack, of every earlier white-box plan it takes bounds from."""
    ordered = [p for p in plans if not p.attack.refines] + [p for p in plans if p.attack.refines]
    for k, plan in enumerate(ordered):
        earlier = ordered[:k]
        if plan.attack.refines:
            group = _evidence_group(plan)
            plan.after = tuple(q.id for q in earlier if group is not None and _evidence_group(q) == group
                               and not q.attack.refines)
        elif cascade and cascade_group(plan) is not None:  # those that can settle one of its (sample, eps)
            plan.after = tuple(q.id for q in earlier if cascade_group(q) == cascade_group(plan)
                               and set(q.eps) & set(plan.eps))
        else:
            plan.after = ()
    return ordered


def settled(plan: Linked, earlier: Sequence[pd.DataFrame], samples: np.ndarray,
            device: torch.device) -> dict[float, torch.Tensor] | None:
    """Per positive budget of ``plan``: bool [B] over ``samples``, the samples an ``earlier`` frame (one batch of a
    predecessor's records) fooled at that budget. None when nothing is settled."""
    if not earlier:
        return None
    out: dict[float, torch.Tensor] = {}
    for eps in plan.eps:
        if eps <= 0:
            continue
        done = np.zeros(len(samples), dtype=bool)
        for frame in earlier:
            rows = frame[(frame["eps"] == eps) & frame["clean_correct"] & ~frame["robust"]]
            done |= np.isin(samples, rows["sample"].to_numpy())
        if done.any():
            out[float(eps)] = torch.from_numpy(done).to(device)
    return out or None


def carry(frame: pd.DataFrame, earlier: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """``frame`` (a plan's scored batch) with every settled row replaced by the first earlier row that settled it
    (:data:`CARRIED_COLUMNS`). The other columns (the evaluation's own names, clean predictions) stay."""
    if not earlier:
        return frame
    out = frame.copy()
    pending = np.ones(len(out), dtype=bool)
    key = pd.MultiIndex.from_arrays([out["sample"].to_numpy(), out["eps"].to_numpy()])
    for prior in earlier:
        fooled = prior[prior["clean_correct"] & ~prior["robust"]]
        if fooled.empty:
            continue
        source = fooled.set_index(["sample", "eps"])
        where = key.get_indexer(source.index)  # the rows of ``out`` that these settle
        hit = where >= 0
        where, source = where[hit], source[hit]
        take = pending[where]
        where, source = where[take], source[take]
        if not len(where):
            continue
        for column in CARRIED_COLUMNS:
            values = out[column].to_numpy(copy=True)
            values[where] = source[column].to_numpy()
            out[column] = pd.array(values, dtype=out[column].dtype) if out[column].dtype == "string" else values
        pending[where] = False
    return out


def known_distances(earlier: Sequence[pd.DataFrame], samples: np.ndarray, norm: str) -> np.ndarray:
    """float64 [B] over ``samples``: the smallest ``norm`` distance of a successful (verified, finite) adversarial
    row in ``earlier``, at any budget (inf where none)."""
    best = np.full(len(samples), np.inf)
    position = {int(s): i for i, s in enumerate(samples)}
    for frame in earlier:
        hits = frame[frame["success"] & ~frame["nonfinite"]]
        for sample, value in zip(hits["sample"].to_numpy(), hits[norm].to_numpy(dtype=float)):
            i = position.get(int(sample))
            if i is not None and value < best[i]:
                best[i] = value
    return best
