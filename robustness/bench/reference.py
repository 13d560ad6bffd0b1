"""An independent reference L-inf PGD (``dsn-robust bench reference``): the yardstick the suite's worst case is held
to.

Why a second PGD: the suite's attacks go through adapters, attack libraries, budget sweeps and the runner; a bug
anywhere there (a gradient that does not reach the input, a step size that is too small, a last iterate that
undoes an earlier success) makes the suite *optimistic*, and nothing inside the suite can notice it. This module
is a plain-torch PGD that shares nothing with ``attacks/`` but loading (``attacks.runner.load_run_checkpoint``,
``load_eval_data``) and reading the records it is compared with (``attacks.records``). Acceptance rule: at every
eps the suite's worst case is within ``--max-gap`` points of this reference and never more optimistic than that.

The attack, per eps, for every routing gradient ``g`` x loss ``l`` x restart ``r``:

* model in eval mode; the gradient comes from ``model(x, mode=gate_mode, gate_grad=g).logits(head)`` (a gradient
  that ``needs_temperature``, such as ``sharp``: inside ``model.gating(gate_grad=g, temperature=T)`` with
  ``T = models.surrogates.calibrate_temperature(model, x)`` calibrated once on the clean inputs and held fixed);
  success is judged by the *deployed* forward ``model(x, mode=gate_mode, gate_grad="none")`` without gradient;
* random uniform start in the eps ball, ``steps`` sign-gradient steps of ``alpha = 2.5 * eps / steps``, projection
  onto the ball and [0, 1] after each step; losses ``ce`` (cross-entropy) and ``margin``
  (``max_{j != y} z_j - z_y``), both maximised;
* per sample the FIRST iterate (the start included) that the deployed forward misclassifies is kept and the sample
  leaves the batch: only the still-robust samples are attacked further, and a later restart of the same
  (gradient, loss) only attacks the samples it has not fooled yet;
* each (gradient, loss) is run on every clean-correct sample, so the per-gradient and per-loss columns are
  robust accuracies in their own right; a sample is robust only if it is clean-correct and no run fooled it;
* every kept example is budget-checked (``linf <= eps + 1e-6`` and inside [0, 1]; a violation raises
  BudgetViolation) and re-scored by one fresh deployed forward; the counts use the re-score.

Seeds: ``torch.manual_seed(derive_seed(seed, eps_index, grad_index, loss_index, restart))`` with integer parts
only (an arithmetic mix, no string hashing), indexes into ``GRAD_MODES`` (the registry's order, built-ins first: a
plug-in never moves them) and ``LOSSES``, so a run's
randomness does not depend on which other gradients or losses were asked for.

Pitfalls recorded here:

* A last-iterate PGD under-reports: with hard gates the loss surface jumps where a gate flips, and a later step
  can move a fooled sample back. Keeping the first fooling iterate is what "the attack found an example" means.
* A misclassified clean sample is not robust even if an attack happens to push it to the right class (the
  records' ``robust`` column follows the same rule); the reference never attacks it.
* ``gate_mode`` is ``hard`` or ``open``: under ``random`` routing the deployed prediction is itself random, and a
  first-fooling rule would count lucky draws.
* For a model without gates, or a gated one in ``open`` mode, every routing gradient is the plain gradient; only
  ``none`` is run.

The comparison with the suite's worst case and the command's result are in
:mod:`robustness.bench.reference_compare`; the records it joins into are :mod:`robustness.bench.reference_records`.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from attacks.records import read_records
from attacks.runner import load_eval_data, load_run_checkpoint
from attacks.runner.subject import eval_data
from robustness.bench.reference_compare import (DEFAULT_EPS, EpsReport, ReferenceResult, compare_with_suite,
                                                run_grid, suite_rows)
from robustness.bench.reference_records import REFERENCE_ATTACK, params_of, record_reference
from models.network import CoarseFineNet
from models.routing import GRAD_MODES, routing_gradient
from models.surrogates import calibrate_temperature
from robustness.core.errors import BudgetViolation, ConfigError
from robustness.core.rundir import RunDir
from robustness.core.runtime import derive_seed
from robustness.core.vocab import HEADS, format_eps

log = logging.getLogger(__name__)

#: Losses the reference maximises; the order fixes the seed derivation.
LOSSES = ("ce", "margin")
#: Forward modes the reference attacks (see the module docstring for why not ``random``).
REFERENCE_GATE_MODES = ("hard", "open")
#: ``alpha = STEP_FACTOR * eps / steps`` (Madry et al.'s 2.5: the steps can cross the ball and come back).
STEP_FACTOR = 2.5
#: Float slack of the budget check.
BUDGET_SLACK = 1e-6

Logits = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ReferenceConfig:
    """What the reference runs; validated on construction (ConfigError with one line)."""

    #: the L-inf budgets; empty: the run's own fixed-eps grid (:func:`run_grid`), else :data:`DEFAULT_EPS`
    eps: tuple[float, ...] = ()
    n: int | None = None  # None: every sample the run's records attacked (64 without records)
    steps: int = 50
    restarts: int = 5
    grads: tuple[str, ...] = ("none", "ste", "bpda", "sharp")
    losses: tuple[str, ...] = LOSSES
    gate_mode: str = "hard"
    head: str = "fine"
    seed: int = 0

    def __post_init__(self) -> None:
        if any(not (0 < e < math.inf) for e in self.eps):
            raise ConfigError(f"reference eps must be positive and finite, got {list(self.eps)}")
        for name, value in (("n", self.n), ("steps", self.steps), ("restarts", self.restarts)):
            if value is not None and value < 1:
                raise ConfigError(f"reference {name} must be >= 1, got {value}")
        _check_names("routing gradient", self.grads, GRAD_MODES)
        _check_names("loss", self.losses, LOSSES)
        _check_names("gate mode", (self.gate_mode,), REFERENCE_GATE_MODES)
        _check_names("head", (self.head,), HEADS)

    def alpha(self, eps: float) -> float:
        return STEP_FACTOR * eps / self.steps


def _check_names(kind: str, names: Sequence[str], known: Sequence[str]) -> None:
    if not names:
        raise ConfigError(f"choose at least one {kind}: {', '.join(known)}")
    for name in names:
        if name not in known:
            raise ConfigError(f"unknown {kind} {name!r} for the reference; choose from: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{kind}s given twice: {', '.join(names)}")


# --------------------------------------------------------------------------------------------------------------
# The attack
# --------------------------------------------------------------------------------------------------------------


def loss_per_sample(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """The loss the attacker maximises, one value per sample: ``ce`` or ``margin`` (``max_{j!=y} z_j - z_y``)."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -math.inf)
    return others.amax(1) - true


def first_fooling_pgd(grad_logits: Logits, deployed_pred: Logits, x: torch.Tensor, y: torch.Tensor, eps: float,
                      steps: int, alpha: float, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One restart of L-inf PGD on ``x`` (in [0, 1]) with labels ``y``.

    ``grad_logits(x)`` gives the logits the gradient is taken of; ``deployed_pred(x)`` the deployed predictions
    (called without gradient). Returns ``fooled`` [B] and ``adv`` (``x``'s shape): for a fooled sample the first
    iterate, the random start included, that ``deployed_pred`` misclassifies; ``x`` itself for the others. A sample
    leaves the batch as soon as it is fooled. Uses the global torch RNG for the start (seed it before).
    """
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    adv = x.detach().clone()
    active = torch.arange(len(x), device=x.device)
    origin = x.detach()
    xk = (origin + torch.empty_like(origin).uniform_(-eps, eps)).clamp(0.0, 1.0)
    for k in range(steps + 1):
        with torch.no_grad():
            hit = deployed_pred(xk) != y[active]
        if hit.any():
            adv[active[hit]] = xk[hit]
            fooled[active[hit]] = True
            active, xk, origin = active[~hit], xk[~hit], origin[~hit]
        if k == steps or len(active) == 0:
            break
        xk = xk.detach().requires_grad_(True)
        value = loss_per_sample(grad_logits(xk), y[active], loss).sum()
        (grad,) = torch.autograd.grad(value, xk)
        xk = xk.detach() + alpha * grad.sign()
        xk = torch.min(torch.max(xk, origin - eps), origin + eps).clamp(0.0, 1.0)
    return fooled, adv


def check_budget(adv: torch.Tensor, x: torch.Tensor, eps: float) -> float:
    """The largest L-inf distance of ``adv`` from ``x``; BudgetViolation when it exceeds ``eps`` or leaves [0, 1]."""
    if len(adv) == 0:
        return 0.0
    linf = float((adv - x).abs().flatten(1).amax(1).max())
    if linf > eps + BUDGET_SLACK or float(adv.min()) < 0.0 or float(adv.max()) > 1.0:
        raise BudgetViolation(f"reference PGD produced an example outside its budget (linf {linf:.3g} > eps "
                              f"{eps:.3g} or outside [0, 1]): a bug in robustness.bench.reference")
    return linf


@dataclass
class EpsOutcome:
    """Per-sample result of the reference at one eps (tensors on the CPU).

    ``robust`` [n]: clean-correct and fooled by no run. ``by_run[(grad, loss)]`` [n]: robust against that
    (gradient, loss) over all restarts. ``examples``: for every clean-correct non-robust sample the first confirmed
    fooling example (the clean input elsewhere). ``unconfirmed``: fooling iterates that the final re-score did not
    confirm (samples the in-loop forward and the fresh forward disagree on; normally 0).
    """

    eps: float
    clean_correct: torch.Tensor
    robust: torch.Tensor
    by_run: dict[tuple[str, str], torch.Tensor]
    examples: torch.Tensor
    max_linf: float
    unconfirmed: int
    seconds: float

    def robust_against(self, grad: str | None = None, loss: str | None = None) -> torch.Tensor:
        """Robust against every run of ``grad`` (all losses) or of ``loss`` (all gradients)."""
        masks = [m for (g, l), m in self.by_run.items() if grad in (None, g) and loss in (None, l)]
        return torch.stack(masks).all(0) if masks else self.clean_correct.clone()


@contextmanager
def _no_parameter_grads(model: torch.nn.Module) -> Iterator[None]:
    """Only the input needs a gradient: parameters stop requiring one for the duration (restored after)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _deployed(model: CoarseFineNet, gate_mode: str, head: str) -> Logits:
    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x, mode=gate_mode, gate_grad="none").logits(head).argmax(1)
    return predict


def _gradient_forward(model: CoarseFineNet, gate_mode: str, grad: str, head: str) -> Logits:
    return lambda x: model(x, mode=gate_mode, gate_grad=grad).logits(head)


def attack_at_eps(model: CoarseFineNet, x: torch.Tensor, y: torch.Tensor, eps: float, eps_index: int,
                  config: ReferenceConfig, grads: Sequence[str] | None = None,
                  temperature: torch.Tensor | None = None) -> EpsOutcome:
    """Run every (gradient, loss, restart) of the reference at ``eps`` on the whole batch ``x``, ``y``.

    ``grads`` overrides ``config.grads`` (e.g. ``("none",)`` for a model without gates); ``temperature`` is that
    of the gradients that need one (``sharp``; calibrated on ``x`` when None). Logs one line per gradient.
    """
    grads = tuple(grads or config.grads)
    if any(routing_gradient(g).needs_temperature for g in grads) and temperature is None:
        temperature = calibrate_temperature(model, x)
    start = time.perf_counter()
    deployed = _deployed(model, config.gate_mode, config.head)
    clean_correct = deployed(x) == y
    examples = x.detach().clone()
    confirmed = torch.zeros_like(clean_correct)
    by_run: dict[tuple[str, str], torch.Tensor] = {}
    max_linf, unconfirmed = 0.0, 0
    with _no_parameter_grads(model):
        for grad in grads:
            grad_start = time.perf_counter()
            with ExitStack() as stack:
                if routing_gradient(grad).needs_temperature:
                    stack.enter_context(model.gating(gate_grad=grad, temperature=temperature))
                forward = _gradient_forward(model, config.gate_mode, grad, config.head)
                for loss in config.losses:
                    found, adv = _restarts(forward, deployed, x, y, clean_correct, eps, eps_index, grad, loss,
                                           config)
                    max_linf = max(max_linf, check_budget(adv[found], x[found], eps))
                    fooled = found.clone()
                    if found.any():
                        fooled[found] = deployed(adv[found]) != y[found]  # the fresh re-score decides
                    unconfirmed += int((found & ~fooled).sum())
                    new = fooled & ~confirmed
                    examples[new] = adv[new]
                    confirmed |= fooled
                    by_run[(grad, loss)] = (clean_correct & ~fooled).cpu()
            robust_g = torch.stack([by_run[(grad, l)] for l in config.losses]).all(0)
            log.info("reference eps=%s grad=%s: %d/%d robust (%.1f%%), %s x %d restarts, %.1fs",
                     format_eps(eps, "linf"), grad, int(robust_g.sum()), len(x), 100.0 * float(robust_g.float().mean()),
                     ",".join(config.losses), config.restarts, time.perf_counter() - grad_start)
    robust = torch.stack(list(by_run.values())).all(0)
    return EpsOutcome(eps=eps, clean_correct=clean_correct.cpu(), robust=robust, by_run=by_run,
                      examples=examples.cpu(), max_linf=max_linf, unconfirmed=unconfirmed,
                      seconds=time.perf_counter() - start)


def _restarts(forward: Logits, deployed: Logits, x: torch.Tensor, y: torch.Tensor, clean_correct: torch.Tensor,
              eps: float, eps_index: int, grad: str, loss: str,
              config: ReferenceConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """All restarts of one (gradient, loss): which samples some restart fooled, and the first example of each."""
    found = torch.zeros_like(clean_correct)
    adv = x.detach().clone()
    for restart in range(config.restarts):
        idx = (clean_correct & ~found).nonzero().squeeze(1)
        if len(idx) == 0:
            break
        torch.manual_seed(derive_seed(config.seed, eps_index, GRAD_MODES.index(grad), LOSSES.index(loss), restart))
        fooled, run_adv = first_fooling_pgd(forward, deployed, x[idx], y[idx], eps, config.steps,
                                            config.alpha(eps), loss)
        adv[idx[fooled]] = run_adv[fooled]
        found[idx[fooled]] = True
    return found, adv


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------


def _percent(mask: torch.Tensor) -> float:
    return 100.0 * float(mask.float().mean())


def _attacked(run: RunDir) -> int:
    """How many samples the run's records attacked (64 without records)."""
    recorded = (run.read_manifest() or {}).get("subset") if run.has_records() else None
    indices = recorded.get("indices") if isinstance(recorded, dict) else None
    return len(indices) if indices else 64


def _reference_data(run: RunDir, checkpoint: Any, n: int) -> Any:
    """The first ``n`` of the run's attacked samples, so that sample ``i`` here is sample ``i`` of its records: the
    subset its manifest recorded (rule and seed; checked against its hash), else the default stratified draw."""
    recorded = (run.read_manifest() or {}).get("subset") if run.has_records() else None
    if not isinstance(recorded, dict) or not recorded.get("indices"):
        return load_eval_data(run, checkpoint, n)[0]
    data, _, subset = eval_data(run, checkpoint, len(recorded["indices"]), str(recorded.get("rule")),
                                int(recorded.get("seed") or 0))
    if subset.sha256 != recorded.get("sha256"):
        raise ConfigError(f"{run.root}: the attacked images changed since its records (the test data or its "
                          f"selection differs); rerun `dsn-robust attack --force` before comparing")
    return data.subset(n)


def run_reference(run_dir: str, config: ReferenceConfig, device: torch.device | str = "cpu",
                  max_gap: float | None = None, record: bool = False) -> ReferenceResult:
    """Attack the first ``config.n`` (None: all) of ``run_dir``'s attacked samples (:func:`_reference_data`) with its
    checkpoint and compare with its records (if any; the comparison never reads earlier ``reference-pgd`` rows).
    With ``record``, the reference's examples then join the run's records and worst case
    (:func:`robustness.bench.reference_records.record_reference`); otherwise nothing is written. ConfigError when
    ``max_gap`` is set and the run has no records to compare."""
    start = time.perf_counter()
    run = RunDir.at(run_dir).require()
    has_records = run.has_records()
    if max_gap is not None and not has_records:
        raise ConfigError(f"--max-gap compares with the suite's records, and {run.root} has none; run "
                          f"`dsn-robust attack` first or leave --max-gap out")
    checkpoint = load_run_checkpoint(run)
    model = checkpoint.build_model(device).eval()
    data = _reference_data(run, checkpoint, config.n if config.n is not None else _attacked(run))
    x, fine, coarse = data.batch(slice(None))
    x = x.to(device)
    y = (fine if config.head == "fine" else coarse).to(device)
    routed = model.is_gated and config.gate_mode == "hard"
    grads = config.grads if routed else ("none",)
    if grads != config.grads:
        why = "has no gates" if not model.is_gated else f"runs every block in gate mode {config.gate_mode!r}"
        log.info("%s %s: every routing gradient is the plain gradient; running 'none' only",
                 checkpoint.model_name, why)
    temperature = (calibrate_temperature(model, x) if any(routing_gradient(g).needs_temperature for g in grads)
                   else None)
    rows = None
    if has_records:
        records = read_records(run.records)
        rows = suite_rows(records[records["attack"].astype(str) != REFERENCE_ATTACK], config.gate_mode, config.head,
                          len(x))
    grid = config.eps or run_grid(rows)
    if not config.eps:
        log.info("reference eps: %s (%s)", ", ".join(format_eps(e, "linf") for e in grid),
                 "the run's fixed-eps grid" if rows is not None and grid != DEFAULT_EPS else "the default grid")
    reports = []
    examples: dict[float, torch.Tensor] = {}
    clean_correct = torch.zeros(0, dtype=torch.bool)
    for i, eps in enumerate(grid):
        outcome = attack_at_eps(model, x, y, eps, i, config, grads, temperature)
        clean_correct = outcome.clean_correct
        examples[float(eps)] = outcome.examples
        suite = compare_with_suite(rows, eps, outcome.robust.numpy()) if rows is not None else None
        reports.append(EpsReport(
            eps=eps, eps_label=format_eps(eps, "linf"), n=len(x), robust=int(outcome.robust.sum()),
            accuracy=_percent(outcome.robust),
            by_grad={g: _percent(outcome.robust_against(grad=g)) for g in grads},
            by_loss={l: _percent(outcome.robust_against(loss=l)) for l in config.losses},
            max_linf=outcome.max_linf, unconfirmed=outcome.unconfirmed, seconds=outcome.seconds, suite=suite))
    temps = None if temperature is None else [float(t) for t in torch.as_tensor(temperature).flatten()]
    joined = None
    if record and has_records:
        params = dict(params_of(config, grads), step_factor=STEP_FACTOR)
        joined = record_reference(run, model, x.cpu(), fine, coarse, examples, params, config.gate_mode, config.head)
    return ReferenceResult(
        run=run.name, model=checkpoint.model_name, device=str(device), n=len(x),
        clean_correct=int(clean_correct.sum()), clean_accuracy=_percent(clean_correct), gate_mode=config.gate_mode,
        head=config.head, steps=config.steps, restarts=config.restarts, step_factor=STEP_FACTOR, grads=list(grads),
        losses=list(config.losses), seed=config.seed, temperature=temps, has_records=has_records,
        seconds=time.perf_counter() - start, eps=reports, max_gap=max_gap, joined=joined)
