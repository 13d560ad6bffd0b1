"""``--eps auto``: attack in two phases so the fixed-eps grid lands where the models differ.

A fixed grid chosen before anything is attacked (8/255 for CIFAR) can put every model at 0% robust accuracy, where
no comparison says anything. With ``eps = "auto"`` the minimal-perturbation attacks run first (they need no
budget: :func:`attacks.runner.plan.plan_evaluations` returns only them while the grid is ``auto``); the grid is
then the 25/50/75% quantiles of the reference model's minimal distances (its deployed ``hard`` forward, minimum over
routing gradients), rounded to quarters of 1/255, plus the median distance of any other model whose robustness
curve is outside 10-90% at all of those (:func:`robustness.analysis.distances.auto_eps_grid`); then every
fixed-budget attack runs at that grid. Both phases resume like any attack run: the minimal evaluations of phase 1
are the same evaluations in phase 2, and the grid is a function of their records, so a rerun picks the same one.
Under several ranks (torchrun, or the pipeline's attack workers) every rank computes the grid from the records on
disk, so all of them attack at the same one. Every run's writer lock is held across both phases, so no other writer
can slip in between them.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import pandas as pd

from attacks.base import MINIMAL, attack_kind
from attacks.records import read_records
from attacks.runner import AttackConfig, AttackResult, run_attacks
from attacks.runner.plan import plan_evaluations
from robustness.analysis.distances import auto_eps_grid, minimal_distances
from robustness.core.errors import ConfigError
from robustness.core.rundir import RunDir
from robustness.core.runtime import env_world
from robustness.core.vocab import format_eps

log = logging.getLogger(__name__)


def _distances(records: pd.DataFrame, norm: str, target: str) -> list[pd.DataFrame]:
    """One frame per gate mode (hard first) of a run's minimal distances in ``norm`` for head ``target``."""
    d = minimal_distances(records, fixed=False)  # phase 1's evidence only: a resume finds the same grid
    d = d[(d["norm"] == norm) & (d["target"] == target)]
    modes = sorted(d["gate_mode"].unique(), key=lambda m: (m != "hard", m))
    return [d[d["gate_mode"] == m] for m in modes]


def choose_grid(records: Mapping[str, pd.DataFrame], reference: str, config: AttackConfig) -> list[float]:
    """The grid from the phase-1 records of each run (``reference`` first); ConfigError when the reference has no
    minimal distance to place it by."""
    ref = _distances(records[reference], config.norm, config.target)
    if not ref or not len(ref[0]):
        raise ConfigError(f"eps = auto needs minimal distances of {reference} in {config.norm}: add a "
                          "minimal-perturbation attack (pgd-bisect, fmn, ddn) to the attacks")
    others = ref[1:] + [d for name, rec in records.items() if name != reference
                        for d in _distances(rec, config.norm, config.target)]
    grid = auto_eps_grid(ref[0], others, config.norm)
    if not grid:
        raise ConfigError(f"eps = auto: no attack fooled any sample of {reference}, so there is no distance to "
                          "place the grid by; give --eps explicitly")
    log.info("eps auto: grid %s (quantiles of %s's minimal %s distances)",
             ", ".join(format_eps(e, config.norm) for e in grid),
             reference, config.norm)
    return grid


def check_auto(config: AttackConfig, gated: bool) -> None:
    """ConfigError unless ``config`` (with ``eps = auto``) runs a minimal attack in its own norm."""
    minimal = [name for name in config.expanded_attacks() if attack_kind(name) == MINIMAL]
    # checked before planning: with no minimal attack an auto plan is empty, and the planner's error would mislead
    if not minimal or not any(p.attack.kind == MINIMAL and p.norm == config.norm
                              for p in plan_evaluations(config, gated)):
        raise ConfigError(f"eps = auto places the grid by minimal {config.norm} distances: add a minimal-perturbation "
                          f"attack in {config.norm} (pgd-bisect{', fmn' if config.norm == 'linf' else ', ddn'})")


def attack_runs(runs: Mapping[str, Path], configs: Mapping[str, AttackConfig], reference: str, *,
                resume: bool = False, force: bool = False, progress: bool = True) -> tuple[list[float] | None,
                                                                                       dict[str, AttackResult]]:
    """Attack every run with its config; with ``eps = auto`` in two phases (module docstring). Returns the grid
    (None when no config asked for ``auto``) and each run's result."""
    with ExitStack() as held:
        for path in runs.values():
            held.enter_context(RunDir.at(path).require().writing("attack"))
        return _attack_runs(runs, configs, reference, resume, force, progress)


def _attack_runs(runs: Mapping[str, Path], configs: Mapping[str, AttackConfig], reference: str, resume: bool,
                 force: bool, progress: bool) -> tuple[list[float] | None, dict[str, AttackResult]]:
    def attack(name: str, config: AttackConfig, resume: bool, force: bool) -> AttackResult:
        return run_attacks(runs[name], config, resume=resume, force=force, progress=progress)

    def grid_records(name: str, result: AttackResult) -> pd.DataFrame:
        if env_world()[1] != 0:  # run_attacks hands records to rank 0 only; every rank needs the same grid
            return read_records(RunDir.at(runs[name]).records)
        return result.records

    return attack_in_phases(attack, configs, reference, resume=resume, force=force, grid_records=grid_records)


#: ``attack(name, config, resume, force)``: one model's attack run, however its model is held
AttackOne = Callable[[str, AttackConfig, bool, bool], AttackResult]


def attack_in_phases(attack: AttackOne, configs: Mapping[str, AttackConfig], reference: str, *,
                     resume: bool = False, force: bool = False,
                     grid_records: Callable[[str, AttackResult], pd.DataFrame] = lambda name, result: result.records,
                     ) -> tuple[list[float] | None, dict[str, AttackResult]]:
    """The two phases (module docstring) over ``attack``: every model whose config asks for ``eps = auto`` runs its
    minimal attacks, the grid comes from their records (``grid_records``), then every model runs its fixed-budget
    attacks at it (a resume of phase 1's records). Shared by run directories (:func:`attack_runs`) and the Python
    API's in-memory models. Returns the grid (None without ``auto``) and each model's last result."""
    auto = [name for name, c in configs.items() if c.eps_auto]
    grid = None
    if auto:
        phase1 = {}
        for name in auto:
            log.info("== minimal distances %s (eps auto, phase 1) ==", name)
            phase1[name] = grid_records(name, attack(name, configs[name], resume, force))
        grid = choose_grid(phase1, reference if reference in auto else auto[0], configs[auto[0]])
    results = {}
    for name, config in configs.items():
        log.info("== attack %s ==", name)
        final = dataclasses.replace(config, eps=grid) if config.eps_auto else config
        results[name] = attack(name, final, resume or config.eps_auto, force and not config.eps_auto)
    return grid, results
