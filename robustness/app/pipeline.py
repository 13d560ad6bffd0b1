"""``dsn-robust run``: the whole answer in one command.

Trains every model of the ``[run]`` table (default dsn, dual, resnet), attacks each (white-box; the dsn also in
``open`` mode, its no-skip view), adds the transfer pairs, writes each run's report and the comparison, and
returns a short summary. Every step is resumable, so ``--resume`` after an interruption continues where it stopped.
Each run's results are loaded once (``robustness.results.load_run``) and analysed once
(``robustness.findings.run.analyse``): its report, the comparison and the summary read that one analysis; nothing
written here is read back.

Layout of ``OUT``::

    OUT/run.json            the resolved pipeline config (train, attack, run) and package versions (a resume
                            rewrites it only once every stage has accepted its settings)
    OUT/<model>/            one run directory per model (config.json, checkpoints, metrics.csv, attacks, report)
    OUT/compare/            the skip vs no-skip comparison (index.html, compare.md, compare.csv, compare.json)

With ``[run] seeds`` (or ``--seeds``) naming several training seeds, every model is trained and attacked once per
seed, each in ``OUT/seed-<s>/<model>/``, all on the same attacked images (the subset's seed is the ``[attack]``
table's, not the training seed) and at one eps grid (placed by the first seed's reference model); ``OUT/compare/``
then pools the seeds (:func:`robustness.findings.compare.compare_seeds`: per-seed verdicts side by side and one
interval that resamples seeds, then samples).

One writer: the pipeline holds ``.<OUT name>.lock`` beside ``OUT`` (beside, because ``--force`` deletes ``OUT``) and
each model's run-directory lock for the whole job; its training and attack worker processes work under them
(:mod:`robustness.core.lock`), and a second ``run``, ``train`` or ``attack`` on any of it gets one line.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from attacks.runner import AttackConfig, load_run_checkpoint, run_attacks
from models.registry import check_options, create_model, own_options
from models.training import TrainConfig, train
from models.training.config import model_kwargs
from reports.compare_page import write_comparison
from reports.run_page import write_report
from robustness.findings.compare import compare_runs
from robustness.findings.seeds import compare_seeds
from robustness.findings.headline import RunHeadline
from robustness.findings.run import analyse
from robustness.core.config import apply_overrides, build, load_config_file
from robustness.core.errors import ConfigError, RunDirError
from robustness.core.files import atomic_write_json, is_temporary
from robustness.core.lock import writer_lock
from robustness.core.norms import LINF
from robustness.core.processes import in_processes
from robustness.core.rundir import RunDir
from robustness.core.runtime import distributed, env_world, free_port, join_as_rank, package_versions, resolve_device
from robustness.core.vocab import format_distance
from robustness.data import dataset_info
from robustness.app.eps_grid import attack_runs, check_auto
from robustness.results import load_run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    """The ``[run]`` table: which models, which transfer pairs (``"source->target"``), and what to add."""

    models: list[str] = field(default_factory=lambda: ["dsn", "dual", "resnet"])
    transfer: list[str] = field(default_factory=lambda: ["dual->dsn", "dsn->dual", "resnet->dsn"])
    transfer_attack: str = "pgd"
    open_mode: bool = True  # also attack every gated model with all blocks open (its no-skip view)
    workers: int = 1  # CPU processes that train the models side by side (the attacks' own is [attack] workers)
    seeds: list[int] = field(default_factory=list)  # training seeds, one run per model each; []: [train] seed only

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("[run] models must name at least one model")
        if any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2 ** 63 for s in self.seeds):
            raise ConfigError(f"[run] seeds must be integers in 0..2^63-1, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"[run] seeds must not repeat, got {self.seeds!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"[run] workers must be a positive integer, got {self.workers!r}")
        for pair in self.transfer:
            source, sep, target = pair.partition("->")
            if not sep or source not in self.models or target not in self.models or source == target:
                raise ConfigError(f"[run] transfer pair {pair!r} must read 'source->target' with two different "
                                  f"models from {self.models}")

    def pairs(self) -> list[tuple[str, str]]:
        return [tuple(p.split("->")) for p in self.transfer]  # type: ignore[misc]

    def training_seeds(self, train_seed: int) -> list[int]:
        """The seeds each model is trained with: ``seeds``, else the ``[train]`` table's one seed."""
        return list(self.seeds) or [train_seed]

    def run_dirs(self, out: Path, train_seed: int) -> dict[int, dict[str, Path]]:
        """``{seed: {model: run directory}}``: ``OUT/<model>`` for one seed, ``OUT/seed-<s>/<model>`` for several."""
        seeds = self.training_seeds(train_seed)
        if len(seeds) == 1:
            return {seeds[0]: {name: out / name for name in self.models}}
        return {seed: {name: out / f"seed-{seed}" / name for name in self.models} for seed in seeds}


@dataclass(frozen=True)
class PipelineConfig:
    train: TrainConfig
    attack: AttackConfig
    plan: RunPlan

    @classmethod
    def from_file(cls, path: str | Path | None, device: str | None = None, data_root: str | None = None,
                  overrides: Sequence[str] = (), seeds: Sequence[int] | None = None,
                  subset: str | None = None, unset: Sequence[str] = ()) -> "PipelineConfig":
        """Read a config file's tables, apply ``overrides`` (``--set TABLE.KEY=VALUE``,
        :func:`robustness.core.config.apply_overrides`); ``device`` and ``data_root`` (when given) override both;
        ``seeds`` (``--seeds``) replaces ``[run] seeds`` and ``subset`` (``--subset``) ``[attack] subset``;
        ``unset`` (``--unset TABLE.KEY``) removes keys of the file first."""
        tables = apply_overrides(load_config_file(path), list(overrides), unset=list(unset))
        if seeds is not None:
            tables = {**tables, "run": {**tables.get("run", {}), "seeds": list(seeds)}}
        if subset is not None:
            tables = {**tables, "attack": {**tables.get("attack", {}), "subset": subset}}
        where = f"config file {path}" if path else "built-in defaults"
        if overrides or unset:
            where += " with --set"
        train_config = TrainConfig.from_tables(tables, where=where).replace(device=device, data_root=data_root)
        attack = AttackConfig.from_table(tables.get("attack", {}), where=f"[attack] in {where}")
        if device is not None:
            attack = dataclasses.replace(attack, device=device)
        plan = build(RunPlan, tables.get("run", {}), where=f"[run] in {where}")
        for name in plan.models:  # every model's option types, now, not when it is trained (TrainConfig checks its own)
            check_options(name, own_options(name, train_config.model_options))
        return cls(train_config, attack, plan)

    def to_dict(self) -> dict[str, Any]:
        return {"train": self.train.to_dict(), "attack": self.attack.to_dict(), "run": dataclasses.asdict(self.plan)}

    def check_machine(self) -> None:
        """What this machine must offer, checked before anything is written: the devices (``cuda`` where there is
        none is a ConfigError), the dataset's local files (a DataError naming the missing path) and every model's option
        values (each model is built once on the meta device)."""
        resolve_device(self.train.device)
        resolve_device(self.attack.device)
        info = dataset_info(self.train.dataset, self.train.data_root, **self.train.data_options)
        for name in self.plan.models:  # an option value a model refuses (dsn's depth_n = 1) fails here, not later
            with torch.device("meta"):  # shapes only: nothing allocated, whatever the model's size
                create_model(name, **model_kwargs(self.train.replace(model=name), info))


@dataclass
class ModelSummary:
    """Headline numbers of one model (fractions; ``None`` where not measured)."""

    model: str
    clean_acc: float
    robust: dict[float, float]  # linf eps of the grid -> worst-case robust accuracy (hard gates, fine head)
    compute_saved: float | None
    report: Path
    median_distance: float = float("nan")  # median minimal linf distance of the clean-correct samples
    subset: str = ""  # how the attacked images were chosen, one line (headline.SubsetSummary.line)
    incomplete: str = ""  # what records are missing (headline.incomplete), "" when complete


@dataclass
class PipelineResult:
    out: Path
    models: list[ModelSummary]
    sanity: dict[str, list[dict[str, str]]]
    verdict: str  # the long form (every pair's test, band and curves; also in compare/compare.json)
    compare: Path | None
    seconds: float
    answer: str = ""  # the short answer the summary ends with (robustness.findings.answer)


def _check_out_dir(out: Path, resume: bool, force: bool) -> None:
    if resume and force:
        raise ConfigError("--resume and --force exclude each other")
    if force and out.is_symlink():
        raise RunDirError(f"--out {out} is a symbolic link, and --force never deletes through links: pass the "
                          f"directory it points to ({out.resolve()}) or another place")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory; pick another place")
    if out.exists() and any(out.iterdir()) and not resume:
        if not force:
            raise RunDirError(f"{out} already holds results; pass --resume to continue them or --force to start over")
        foreign = _foreign_entries(out)
        if foreign:
            shown = ", ".join(str(p.relative_to(out)) for p in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise RunDirError(f"--force deletes only what dsn-robust wrote, and {out} also holds {shown}; move "
                              f"{'it' if len(foreign) == 1 else 'them'} away or pick another --out")
        log.info("--force: deleting the suite's outputs in %s", out)
        for entry in sorted(out.iterdir()):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _foreign_entries(out: Path) -> list[Path]:
    """What ``run`` did not write in ``out``: anything but its ``run.json``, its ``compare/`` folder, run
    directories (:meth:`RunDir.looks_like_run`) and ``seed-<s>/`` folders of them, or ``atomic_write``'s temporary
    files; a symbolic link anywhere there counts as foreign. ``run --force`` refuses to delete such an ``out``."""
    foreign = []
    for entry in sorted(out.iterdir()):
        if entry.is_symlink():
            foreign.append(entry)
        elif (entry.name == "run.json" and entry.is_file()) or is_temporary(entry.name):
            continue
        elif entry.name == "compare" and entry.is_dir():
            foreign += [p for p in entry.rglob("*") if p.is_symlink()]
        elif re.fullmatch(r"seed-\d+", entry.name) and entry.is_dir():
            foreign += [p for p in sorted(entry.iterdir()) if not RunDir.at(p).looks_like_run()]
        elif not RunDir.at(entry).looks_like_run():
            foreign.append(entry)
    return foreign


def run_pipeline(config: PipelineConfig, out: str | Path, resume: bool = False, force: bool = False,
                 progress: bool = True) -> PipelineResult:
    """Train, attack, report and compare as the config says; see the module docstring."""
    start = time.perf_counter()
    out = Path(out)
    with writer_lock(out.resolve().parent / f".{out.resolve().name}.lock", "run"):
        _check_out_dir(out, resume, force)
        with ExitStack() as held:
            for runs in config.plan.run_dirs(out, config.train.seed).values():
                for run_dir in runs.values():
                    held.enter_context(RunDir.at(run_dir).writing("run"))
            return _run_pipeline(config, out, progress, start)


def train_runs(config: PipelineConfig, out: Path, progress: bool = True) -> dict[str, tuple[str, int, Path]]:
    """Train every (model, seed) of ``config`` under ``out`` as :func:`run_pipeline` does (resuming what is there;
    no lock: the caller owns ``out``); returns ``{label: (model, seed, run directory)}``."""
    by_seed = config.plan.run_dirs(Path(out), config.train.seed)
    runs = {_run_label(name, seed, len(by_seed)): (name, seed, run_dir)
            for seed, dirs in by_seed.items() for name, run_dir in dirs.items()}
    _train_all(config, runs, progress)
    return runs


def _run_label(name: str, seed: int, seeds: int) -> str:
    """How a (model, seed) run is named in logs and summaries: the model alone when there is one seed."""
    return name if seeds == 1 else f"{name}/seed-{seed}"


def _run_pipeline(config: PipelineConfig, out: Path, progress: bool, start: float) -> PipelineResult:
    # run.json says what OUT was made with: a fresh run writes it first; a resume keeps the one there until every
    # stage has accepted the new settings (a refused resume, e.g. other attack settings, leaves it untouched)
    settings, resolved = out / "run.json", {**config.to_dict(), "versions": package_versions()}
    if not settings.is_file():
        atomic_write_json(settings, resolved)
    plan = config.plan
    by_seed = plan.run_dirs(out, config.train.seed)
    runs = train_runs(config, out, progress)

    configs, gated = {}, []
    for label, (_, _, run_dir) in runs.items():
        attack = config.attack
        if load_run_checkpoint(RunDir.at(run_dir)).build_model().is_gated:
            gated.append(label)
            if plan.open_mode:
                attack = dataclasses.replace(attack, gate_modes=list(dict.fromkeys([*attack.gate_modes, "open"])))
        if attack.eps_auto:
            check_auto(attack, label in gated)
        configs[label] = attack
    paths = {label: run_dir for label, (_, _, run_dir) in runs.items()}
    _attack_all(config, paths, configs, (gated or list(runs))[0], progress)

    loaded = {label: load_run(run_dir) for label, run_dir in paths.items()}
    summaries, sanity = [], {}
    for label, results in loaded.items():
        report = write_report(results)
        found = analyse(results)  # the report's analysis; the comparison reads it too
        sanity[label] = [{"name": c.name, "status": c.status, "evidence": c.evidence} for c in found.checks]
        summaries.append(_summary(label, found.headline(), report.index))

    compare_dir, verdict = None, "only one model: nothing to compare"
    answer = verdict
    if len(plan.models) > 1:
        if len(by_seed) == 1:
            comparison = compare_runs(list(loaded.values()), labels=list(loaded))
        else:
            comparison = compare_seeds({seed: [loaded[_run_label(name, seed, len(by_seed))] for name in plan.models]
                                        for seed in by_seed}, labels=plan.models)
        compare_dir = write_comparison(comparison, out / "compare")
        verdict, answer = comparison.verdict, comparison.answer
    atomic_write_json(settings, resolved)
    return PipelineResult(out, summaries, sanity, verdict, compare_dir, time.perf_counter() - start, answer)


def _train_one(name: str, config: TrainConfig, run_dir: Path, progress: bool, level: int | None = None) -> None:
    """Train one model; in a worker process (``level`` given) its log lines are prefixed with the model's name."""
    if level is not None:
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[{name}] %(message)s"))
        root.addHandler(handler)
        root.setLevel(level)
    log.info("== train %s ==", name)
    train(config, run_dir, resume=True, progress=progress)


def _train_all(config: PipelineConfig, runs: dict[str, tuple[str, int, Path]], progress: bool) -> None:
    """Every (model, seed)'s training (``runs``: label -> (model, training seed, run directory)): one after another,
    or ``[run] workers`` at a time in spawned processes on a CPU (the runs are independent and each is seeded by its
    own config, so the checkpoints are the same)."""
    jobs = [(label, config.train.replace(model=name, seed=seed), run_dir)
            for label, (name, seed, run_dir) in runs.items() if not RunDir.at(run_dir).train_done.is_file()]
    if not jobs:
        return  # every model is trained (a resume): no worker processes to start
    workers = min(config.plan.workers, len(jobs))
    if workers <= 1 or resolve_device(config.train.device).type != "cpu":
        for label, train_config, run_dir in jobs:
            _train_one(label, train_config, run_dir, progress)
        return
    level = logging.getLogger().getEffectiveLevel()
    in_processes(_train_one, [(label, train_config, run_dir, False, level) for label, train_config, run_dir in jobs],
                 workers)


def _transfer_pairs(plan: RunPlan, seeds: Sequence[int]) -> list[tuple[str, str]]:
    """The ``[run] transfer`` pairs as run labels: within each training seed (crafted on seed s, scored on seed s)."""
    return [(_run_label(source, seed, len(seeds)), _run_label(target, seed, len(seeds)))
            for seed in seeds for source, target in plan.pairs()]


def _attack_stage(config: PipelineConfig, runs: dict[str, Path], configs: dict[str, AttackConfig], reference: str,
                  progress: bool) -> None:
    """Every attack of the run: the white-box attacks (both phases of ``eps = auto``), then the transfer pairs."""
    grid, _ = attack_runs(runs, configs, reference=reference, resume=True, progress=progress)
    for source, target in _transfer_pairs(config.plan, config.plan.training_seeds(config.train.seed)):
        log.info("== transfer %s -> %s ==", source, target)
        transfer = dataclasses.replace(config.attack, attacks=[config.plan.transfer_attack], gate_modes=["hard"],
                                       eps=grid if grid is not None else config.attack.eps)
        run_attacks(runs[target], transfer, resume=True, transfer_from=runs[source], progress=progress)


def _attack_rank(rank: int, world: int, port: int, config: PipelineConfig, runs: dict[str, Path],
                 configs: dict[str, AttackConfig], reference: str, progress: bool, level: int) -> None:
    """One of the ``[attack] workers`` processes: joins their process group once and runs the whole attack stage
    as that rank (each ``run_attacks`` takes this rank's share of the batches, as under torchrun)."""
    join_as_rank(rank, world, port, level)
    with distributed(torch.device("cpu")):
        _attack_stage(config, runs, configs, reference, progress and rank == 0)


def _attack_all(config: PipelineConfig, runs: dict[str, Path], configs: dict[str, AttackConfig], reference: str,
                progress: bool) -> None:
    """The attack stage, on a CPU with ``[attack] workers`` > 1 in that many processes started once for all of it.

    ``run_attacks`` alone would start its workers afresh for each of its calls (two per model with ``eps = auto``,
    one per transfer pair); each start costs seconds (imports, the first flop count's import of torch's compiler),
    about a minute per quickstart. The records are the same: every call shards its batches by rank either way.
    """
    workers = config.attack.workers
    if workers <= 1 or env_world()[0] > 1 or resolve_device(config.attack.device).type != "cpu":
        _attack_stage(config, runs, configs, reference, progress)
        return
    level, port = logging.getLogger().getEffectiveLevel(), free_port()
    in_processes(_attack_rank, [(rank, workers, port, config, runs, configs, reference, progress, level)
                                for rank in range(workers)], workers)


def _summary(name: str, headline: RunHeadline, report: Path) -> ModelSummary:
    """The lines `run` ends with, from the model report's headline (:func:`robustness.findings.headline.run_headline`:
    deployed gate mode, fine head, worst case over accuracy attacks per L-inf eps, median minimal L-inf distance)."""
    linf = next((d for d in headline.distances if d.norm == LINF.name and d.median is not None), None)
    saved = headline.compute_saved if headline.gated and np.isfinite(headline.compute_saved) else None
    return ModelSummary(name, headline.clean.estimate,
                        {r.eps: r.accuracy.estimate for r in headline.robust if r.norm == LINF.name}, saved, report,
                        linf.median.estimate if linf is not None else float("nan"), headline.subset_line,
                        headline.incomplete)


def format_summary(result: PipelineResult) -> str:
    """The few lines ``dsn-robust run`` ends with."""
    width = max([8, *(len(m.model) + 1 for m in result.models)])
    lines = [f"done in {result.seconds / 60:.1f} min; reports:"]
    for m in result.models:
        lines.append(f"  {m.model:<{width}} {m.report}")
    if result.compare is not None:
        lines.append(f"  {'compare':<{width}} {result.compare / 'index.html'}")
    lines.append("")
    grid = sorted({e for m in result.models for e in m.robust})
    lines.append(f"{'model':<{width}}{'clean':>8}{'median dist':>13}"
                 + "".join(f"{format_distance(e, 'linf'):>11}" for e in grid) + f"{'compute saved':>15}")
    for m in result.models:
        saved = "-" if m.compute_saved is None else f"{m.compute_saved:.1%}"
        cells = "".join(f"{m.robust[e]:>11.1%}" if e in m.robust else f"{'-':>11}" for e in grid)
        lines.append(f"{m.model:<{width}}{m.clean_acc:>8.1%}{format_distance(m.median_distance, 'linf'):>13}{cells}"
                     f"{saved:>15}")
    lines.append("(clean and worst-case robust accuracy at each L-inf eps, hard gates, fine head; median minimal "
                 "L-inf distance of the correctly classified samples; L2 results are in the reports)")
    subsets = list(dict.fromkeys(m.subset for m in result.models if m.subset))
    if len(subsets) == 1:
        lines.append(f"attacked: {subsets[0]}")
    else:
        lines += [f"attacked by {m.model}: {m.subset}" for m in result.models if m.subset]
    lines += [f"{m.model}: {m.incomplete}" for m in result.models if m.incomplete]
    lines.append("")
    for model, checks in result.sanity.items():
        flagged = [c for c in checks if c["status"] in ("fail", "warn")]
        count = {k: sum(c["status"] == k for c in checks) for k in ("fail", "pass", "warn", "skip")}
        lines.append(f"sanity {model}: " + (f"{count['fail']} FAIL, " if count["fail"] else "")
                     + f"{count['pass']} pass, {count['warn']} warn, {count['skip']} skip")
        lines += [f"  {c['status']} {c['name']}: {c['evidence']}" for c in flagged]
    lines.append("")
    lines.append(f"Is skipping more robust here? {result.answer or result.verdict}")
    return "\n".join(lines)
