"""The Python API: evaluate a model from a notebook or a script, load a CLI run, compare two results.

``from robustness import evaluate, load_run, compare, Results`` (the package exposes them lazily). The API is a thin
face over the CLI's code path, not a second implementation:

- :func:`evaluate` turns the model into the suite's model (:func:`models.protocol.adapt`), the data into the test
  samples of a :class:`attacks.runner.subject.Subject`, the options into the :class:`attacks.runner.AttackConfig`
  that ``dsn-robust attack`` would build from the same flags (:func:`attack_config`: on top of the CLI's default
  table), and runs :func:`attacks.runner.run.attack_subject`, the function ``dsn-robust attack`` ends in, on a run
  directory (``out``, or a new temporary directory). The same model, data and seed therefore give the same
  records as the CLI.
- :class:`Results` is a loaded run (:func:`robustness.results.load_run`); its numbers are the report's, read
  from the same :class:`robustness.findings.run.RunAnalysis` (the headline of :func:`robustness.findings.headline.
  run_headline` over the checks of :func:`robustness.sanity.run_checks`), and :meth:`Results.write_report` is
  :func:`reports.run_page.write_report`, what ``dsn-robust report`` writes.
- :func:`compare` is :func:`robustness.findings.compare.compare_runs`, what ``dsn-robust compare`` prints and
  renders.

Pitfalls recorded here: :class:`robustness.data.CoarseFineDataset` holds uint8 images, so a user's float tensors
would be rounded to steps of 1/255; they are held as given instead (:class:`robustness.app.api_data.TensorData`: the
data and model handling is :mod:`robustness.app.api_data`). The attacks need input gradients only: during
:func:`evaluate` the model is in eval mode with parameter gradients off (as a checkpoint is loaded for the CLI),
and both are restored afterwards; the model is moved to the attack device and stays there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from attacks.runner import AttackConfig, AttackResult
from attacks.runner.config import default_attack_table
from attacks.runner.run import attack_subject
from attacks.runner.subject import Subject
from models.fidelity import verify
from models.network import CoarseFineNet
from reports.compare_page import write_comparison
from reports.run_page import write_report
from robustness.findings.compare import Comparison, compare_runs
from robustness.findings.headline import RunHeadline
from robustness.findings.run import RunAnalysis, analyse
from robustness.analysis.stats import Interval
from robustness.app.api_data import FIDELITY_IMAGES, TensorData, make_subject, suite_draws, suite_model
from robustness.core.errors import ConfigError
from robustness.core.rundir import RunDir
from robustness.core.runtime import process_device, resolve_device
from robustness.core.vocab import format_distance, format_eps
from robustness.data import CoarseFineDataset
from robustness.app.eps_grid import attack_in_phases, check_auto
from robustness.results import RunResults, load_run as load_run_results
from robustness.sanity import Check

__all__ = ["evaluate", "load_run", "compare", "Results", "TensorData"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------


class Results:
    """One attacked run: its per-sample records, clean and robust accuracy with intervals, the sanity checks.

    Every number is the per-model report's (``dsn-robust report``): :attr:`headline` is
    :func:`robustness.findings.headline.run_headline` over :attr:`checks`, with ``n_boot`` bootstrap resamples
    seeded by ``seed`` (the intervals of the median distances; accuracy intervals are Wilson intervals).

    Example::

        >>> res = load_run("runs/quickstart/dsn")           # doctest: +SKIP
        >>> res.clean_accuracy.estimate, res.robust_accuracy  # doctest: +SKIP
        >>> res.write_report("report/")                     # doctest: +SKIP
    """

    def __init__(self, run: RunResults, *, n_boot: int = 1000, seed: int = 0):
        self.run = run
        self.n_boot = n_boot
        self.seed = seed

    @property
    def records(self) -> pd.DataFrame:
        """One row per (attack, backend, eps, gate mode, routing gradient, target, sample): ``attacks.records``."""
        return self.run.records

    @property
    def manifest(self) -> dict[str, Any]:
        """The attack manifest (what was run, on which data, with which config and package versions)."""
        return self.run.manifest

    @property
    def run_dir(self) -> Path:
        """The run directory that holds the records (for :func:`evaluate` without ``out``: a temporary one)."""
        return self.run.path

    @property
    def analysis(self) -> RunAnalysis:
        """The run's analysis (:func:`robustness.findings.run.analyse`): the one the report and :func:`compare`
        read too, made once per run in a process."""
        return analyse(self.run)

    @cached_property
    def checks(self) -> list[Check]:
        """The gradient-masking sanity checks, as the report runs them."""
        return list(self.analysis.checks)

    @cached_property
    def headline(self) -> RunHeadline:
        """The numbers the report opens with, for the deployed model (hard gates; fine head when attacked)."""
        return self.analysis.headline(self.n_boot, self.seed)

    @property
    def clean_accuracy(self) -> Interval:
        """Clean accuracy of the deployed model on the attacked samples, with its Wilson interval."""
        return self.headline.clean

    @property
    def robust_accuracy(self) -> pd.DataFrame:
        """Worst-case robust accuracy per fixed budget (norm, eps, estimate, low, high, n, attacks): a sample is
        robust at eps only if it is classified right and no accuracy attack or routing gradient fooled it."""
        columns = ["norm", "eps", "estimate", "low", "high", "n", "attacks"]
        return pd.DataFrame([r.as_dict() for r in self.headline.robust], columns=columns)

    @property
    def masking(self) -> str:
        """``pass``, ``warn`` or ``skip``: the worst status of :attr:`checks`."""
        return self.headline.masking

    def write_report(self, out: str | os.PathLike[str] | None = None, *, n_boot: int | None = None,
                     seed: int | None = None) -> Path:
        """Write the HTML + Markdown report that ``dsn-robust report`` writes into ``out`` (default:
        ``RUN_DIR/report``) and return its ``index.html``.

        Example::

            >>> index = res.write_report("report/")   # doctest: +SKIP
        """
        report = write_report(self.run, out, n_boot=self.n_boot if n_boot is None else n_boot,
                              seed=self.seed if seed is None else seed)
        return report.index

    def __repr__(self) -> str:
        h = self.headline
        where = f"{h.target} head, {h.gate_mode} gates" if h.gated else f"{h.target} head"
        lines = [f"Results({self.run.model or '?'} on {self.run.dataset_name or '?'}, n={self.run.n}, {where}; "
                 f"run dir {self.run_dir})"]
        rows = [("clean accuracy", _interval_text(h.clean), "")]
        rows += [(f"robust {r.norm} {format_eps(r.eps, r.norm)}", _interval_text(r.accuracy), r.attacks) for r in h.robust]
        for d in h.distances:
            text = (f"{format_distance(d.median.estimate, d.norm)} ({d.found}/{d.clean_correct} fooled)"
                    if d.median is not None else "-")
            rows.append((f"median minimal {d.norm} distance", text, d.reason))
        if h.gated:
            saved = "-" if math.isnan(h.compute_saved) else f"{100 * h.compute_saved:.1f}%"
            rows.append(("compute saved", saved, h.compute_reason))
        warned = f"warn: {', '.join(h.masking_warnings)}" if h.masking_warnings else ""
        rows.append(("masking checks", h.masking, warned))
        width = max(len(r[0]) for r in rows)
        value_width = max(len(r[1]) for r in rows)
        lines += [f"  {a:<{width}}  {b:<{value_width}}  {c}".rstrip() for a, b, c in rows]
        return "\n".join(lines)


def _interval_text(iv: Interval) -> str:
    if math.isnan(iv.estimate):
        return "-"
    return f"{100 * iv.estimate:.1f}% [{100 * iv.low:.1f}, {100 * iv.high:.1f}]"


def load_run(run_dir: str | os.PathLike[str], *, n_boot: int = 1000, seed: int = 0) -> Results:
    """A CLI run directory that holds attack records, as :class:`Results` (RunDirError when it holds none).

    Example::

        >>> from robustness import load_run
        >>> res = load_run("runs/quickstart/dsn")   # doctest: +SKIP
        >>> res.records.groupby("attack")["robust"].mean()   # doctest: +SKIP
    """
    return Results(load_run_results(run_dir), n_boot=n_boot, seed=seed)


def compare(*results: Results | str | os.PathLike[str], labels: Sequence[str] | None = None, n_boot: int = 1000,
            seed: int = 0, out: str | os.PathLike[str] | None = None) -> Comparison:
    """Skip vs no-skip on the samples the runs share: the :class:`robustness.findings.compare.Comparison` that
    ``dsn-robust compare`` prints (``.verdict``) and renders; with ``out``, its comparison page is written there.

    Each argument is a :class:`Results` or a run directory. Example::

        >>> from robustness import compare
        >>> print(compare(dsn_results, "runs/quickstart/dual").verdict)   # doctest: +SKIP
    """
    runs = [r.run if isinstance(r, Results) else load_run_results(r) for r in results]
    if len(runs) < 2:
        raise ConfigError(f"compare() needs at least two results, got {len(runs)}")
    comparison = compare_runs(runs, list(labels) if labels is not None else None, n_boot=n_boot, seed=seed)
    if out is not None:
        log.info("comparison: %s", write_comparison(comparison, out) / "index.html")
    return comparison


# --------------------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------------------


def evaluate(model: nn.Module, data: Any, *, attacks: Sequence[str] | str | None = None,
             eps: Sequence[float | str] | float | str | None = None, norm: str | None = None,
             gate_grads: Sequence[str] | str | None = None, n: int | None = None, device: str | None = None,
             seed: int | None = None, subset: str | None = None, subset_seed: int | None = None,
             out: str | os.PathLike[str] | None = None, name: str | None = None,
             mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
             data_root: str | os.PathLike[str] | None = None, data_options: Mapping[str, Any] | None = None,
             resume: bool = False, force: bool = False, progress: bool = True, allow_unfaithful: bool = False,
             **more: Any) -> Results:
    """Attack ``model`` on ``data`` as ``dsn-robust attack`` would and return the :class:`Results`.

    ``model``: any ``torch.nn.Module`` that maps [0, 1] images to logits (``mean``/``std``: its input
    normalisation, applied inside), a gated model, or a suite model (:func:`models.protocol.adapt` decides; ``name``
    is its name in the records). ``data``: a dataset name of :mod:`robustness.data` (its test split, with
    ``data_root`` and ``data_options``), ``(x, y)`` or ``(x, y_fine, y_coarse)`` tensors (images [N, C, H, W] in
    [0, 1], float or uint8; without ``y_coarse`` the data is single-head), a DataLoader yielding such tuples, or a
    torch Dataset.

    Which ``n`` samples are attacked: of a dataset name or a :class:`robustness.data.CoarseFineDataset`, those
    ``subset`` chooses (:mod:`robustness.data.subset`): ``"stratified"`` (the default: as equal per fine class as
    the data allows, drawn with ``subset_seed``, default 0: keep it for every model and seed you compare) or
    ``"first"`` (the first ``n``); tensors, a DataLoader or a torch Dataset are attacked as given, the first ``n``
    (recorded as rule ``given``; ``subset=`` is a ConfigError there: select them yourself). The manifest's
    ``subset`` records the rule, seed, indices and a hash of the attacked images.

    ``attacks``, ``eps``, ``norm``, ``gate_grads``, ``n``, ``device``, ``seed`` and ``more`` are
    :class:`attacks.runner.AttackConfig` fields or its flat aliases (``params={"pgd": {"restarts": 2}}``: per-attack
    parameters), read as ``dsn-robust attack`` reads its flags (:func:`attack_config`): what is not given is what
    the CLI uses without flags, the ``[attack]`` table ``dsn-robust run`` attacks with (its ``eps = "auto"`` runs
    the minimal attacks first and places the grid at their distances: :mod:`robustness.app.eps_grid`).

    ``out`` is the run directory the records go to; without it a new temporary directory is made
    (``Results.run_dir`` and ``repr(results)`` say where). ``resume``/``force`` act as the CLI's
    ``--resume``/``--force`` on an ``out`` that already holds records.

    Before any attack the model is checked on the first images (:func:`models.fidelity.verify`): an adapted
    model's deployed forward must reproduce the module's own ``forward`` (else a ConfigError, unless
    ``allow_unfaithful``), and a model random at test time is scored by the majority over several draws and
    attacked through the mean over them; the check is in the manifest's ``model_check`` and at the top of the
    report.

    Every problem with the inputs is one typed error (ConfigError, DataError) before anything is attacked.

    Example::

        >>> import torch, torchvision
        >>> from robustness import evaluate
        >>> net = torchvision.models.resnet18(num_classes=10).eval()
        >>> x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
        >>> res = evaluate(net, (x, y), attacks="fgsm,pgd", eps="2/255,8/255", n=16)   # doctest: +SKIP
        >>> res.robust_accuracy   # doctest: +SKIP
    """
    given = {"attacks": attacks, "eps": eps, "norm": norm, "gate_grads": gate_grads, "n": n, "device": device,
             "seed": seed, "subset": subset, "subset_seed": subset_seed}
    chosen = [k for k in ("subset", "subset_seed") if given[k] is not None]
    if chosen and not isinstance(data, (str, os.PathLike, CoarseFineDataset)):
        raise ConfigError(f"evaluate(): {'/'.join(chosen)} selects samples of a dataset (a name or a "
                          f"CoarseFineDataset); tensors, a DataLoader or a torch Dataset are attacked as given (the "
                          f"first n): select the images yourself, or leave {'/'.join(chosen)} out")
    config = attack_config(**{k: v for k, v in given.items() if v is not None}, **more)
    return run_evaluation(suite_model(model, name=name, mean=mean, std=std), data, config, out=out, name=name,
                          data_root=data_root, data_options=data_options, resume=resume, force=force,
                          progress=progress, allow_unfaithful=allow_unfaithful)


def run_evaluation(suite: CoarseFineNet, data: Any, config: AttackConfig, *,
                   out: str | os.PathLike[str] | None = None, name: str | None = None,
                   data_root: str | os.PathLike[str] | None = None, data_options: Mapping[str, Any] | None = None,
                   resume: bool = False, force: bool = False, progress: bool = True,
                   allow_unfaithful: bool = False) -> Results:
    """:func:`evaluate` for a suite model and a resolved :class:`AttackConfig`: what ``evaluate`` and
    ``dsn-robust attack --model-file`` run."""
    device_used = process_device(resolve_device(config.device))
    with _attack_ready(suite.to(device_used)):
        subject = make_subject(suite, data, config.n, name=name, data_root=data_root,
                               data_options=data_options or {}, rule=config.subset, seed=config.subset_seed)
        first = subject.data.batch(slice(0, min(FIDELITY_IMAGES, len(subject.data))))[0].to(device_used)
        check = verify(suite, first, allow_unfaithful=allow_unfaithful)
        subject = dataclasses.replace(subject, model_check={**check.to_dict(), "draws": suite_draws(suite)})
        if config.target == "coarse" and not (suite.has_coarse and subject.dataset.has_coarse):
            raise ConfigError("target coarse needs a model with a coarse head and data with coarse labels "
                              "((x, y_fine, y_coarse) or a dataset with a label hierarchy); use target='fine'")
        if config.eps_auto:
            check_auto(config, suite.is_gated)
        run = RunDir.at(out if out is not None else tempfile.mkdtemp(prefix="dsn-robust-"))
        if out is None:
            log.info("evaluate: records go to %s", run.root)
        _attack(run, subject, config, resume=resume, force=force, progress=progress)
    return load_run(run.root)


def _attack(run: RunDir, subject: Subject, config: AttackConfig, *, resume: bool, force: bool,
            progress: bool) -> None:
    """``attack_subject``; with ``eps = "auto"`` in the two phases of :mod:`robustness.app.eps_grid` (minimal
    attacks, then the fixed-budget ones at the grid their distances place)."""
    def attack(name: str, config: AttackConfig, resume: bool, force: bool) -> AttackResult:
        return attack_subject(run, subject, config, resume=resume, force=force, progress=progress)

    with run.writing("attack"):  # both phases: no other writer between them
        attack_in_phases(attack, {run.name: config}, run.name, resume=resume, force=force)


def attack_config(**options: Any) -> AttackConfig:
    """The :class:`AttackConfig` that ``dsn-robust attack`` builds from flags ``options``: on top of the CLI's
    default ``[attack]`` table (:func:`attacks.runner.config.default_attack_table`), validated as that table is (an
    unknown name or a wrong type is a ConfigError). ``options`` are AttackConfig fields and ``params`` (attack name
    -> parameters, merged into the table's per attack)."""
    params = options.pop("params", None) or {}
    if not isinstance(params, Mapping) or not all(isinstance(v, Mapping) for v in params.values()):
        raise ConfigError(f"evaluate(): params must map attack names to tables of parameters, got {params!r}")
    table = {**default_attack_table(), **options}
    for attack, values in params.items():
        table[str(attack)] = {**(table.get(str(attack)) or {}), **values}
    return AttackConfig.from_table(table, where="evaluate()")


@contextlib.contextmanager
def _attack_ready(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode without parameter gradients (the attacks need input gradients only), restored afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    training = model.training
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(training)
