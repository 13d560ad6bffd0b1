"""Scoring: adversarial batches -> per-sample records, never trusting an attack library.

Each adversarial batch is budget-checked (:mod:`attacks.checks`), then re-evaluated with a deterministic no-grad
forward in the evaluation's gate mode (``hard`` = the model's real hard forward), and once more with the gates
frozen to the clean input's path (the frozen-path control). The frame is built directly with the record
contract's columns and dtypes (:data:`attacks.records.RECORD_COLUMNS`). A single-head model's coarse predictions
(clean, adversarial, frozen) are :data:`attacks.adapters.NO_HEAD`, as is ``label_coarse`` for data without coarse
labels: the int64 columns stay, no coarse label is invented.

Non-finite logits: every forward here (clean, adversarial, frozen) is :func:`attacks.adapters.evaluate` with its
logits looked at as well (:func:`deployed`); a head whose logits on a sample hold a NaN or an inf predicts
:data:`attacks.records.NONFINITE_PRED` there, so it is never correct, and a row whose clean or adversarial logits of
the attacked head are non-finite is ``nonfinite`` (never clean-correct, robust or a success: the record contract).
The first batch of each evaluation that has such rows logs a warning with the counts.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from attacks.adapters import Evaluation as Outcome
from attacks.adapters import evaluate
from attacks.checks import check_budget
from attacks.records import NONFINITE_PRED, RECORD_COLUMNS
from attacks.runner.plan import EvalPlan
from attacks.tracking import finite_rows
from models.network import CoarseFineNet
from models.protocol import adapt
from robustness.core.runtime import derive_seed, seed_everything

log = logging.getLogger(__name__)


def bit_strings(bits: torch.Tensor) -> list[str]:
    """Rows of a bool [B, n] tensor as '0101' strings ('' for n = 0)."""
    arr = bits.detach().cpu().numpy().astype(bool)
    if arr.shape[1] == 0:
        return [""] * arr.shape[0]
    chars = np.where(arr, "1", "0")
    return ["".join(row) for row in chars]


@contextmanager
def _outputs(model: torch.nn.Module) -> Iterator[list[Any]]:
    """The outputs of ``model``'s calls while the context is open (the outermost call last)."""
    outputs: list[Any] = []
    handle = model.register_forward_hook(lambda module, args, out: outputs.append(out))
    try:
        yield outputs
    finally:
        handle.remove()


def _mark(pred: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
    if logits is None:
        return pred
    return torch.where(finite_rows(logits).to(pred.device), pred, torch.full_like(pred, NONFINITE_PRED))


def deployed(model: torch.nn.Module, x: torch.Tensor, gate_mode: str = "hard",
             path: torch.Tensor | None = None) -> Outcome:
    """:func:`attacks.adapters.evaluate`, with the prediction of a head whose logits on a sample are not all finite
    (NaN, +inf or -inf) replaced by :data:`attacks.records.NONFINITE_PRED`: ``argmax`` of such a row is no
    prediction (NaN reads as class 0, one +inf as a certain vote)."""
    model = adapt(model)
    with _outputs(model) as outputs:
        outcome = evaluate(model, x, gate_mode, path=path)
    if not outputs:
        raise RuntimeError(f"{type(model).__name__}: the scoring forward was not seen (is __call__ overridden?)")
    out = outputs[-1]
    return Outcome(fine=_mark(outcome.fine, out.fine), coarse=_mark(outcome.coarse, out.coarse), path=outcome.path,
                   macs=outcome.macs)


@dataclass
class Batch:
    """One batch of evaluation data and the clean outcome per gate mode."""

    index: int
    samples: np.ndarray
    x: torch.Tensor
    fine: torch.Tensor
    coarse: torch.Tensor
    clean: dict[str, Outcome] = field(default_factory=dict)

    def labels(self, head: str) -> torch.Tensor:
        return self.fine if head == "fine" else self.coarse


@dataclass
class Scorer:
    """Turns adversarial batches into records: budget checks, deterministic re-evaluation, frozen-path control."""

    model: CoarseFineNet
    run_name: str
    model_name: str
    seed: int
    #: evaluations (plan ids) whose non-finite logits were already reported
    warned: set[str] = field(default_factory=set)

    def clean(self, batch: Batch, gate_mode: str) -> Outcome:
        if gate_mode not in batch.clean:
            seed_everything(derive_seed(self.seed, "clean", gate_mode, batch.index))
            batch.clean[gate_mode] = deployed(self.model, batch.x, gate_mode)
        return batch.clean[gate_mode]

    def frozen(self, adv: torch.Tensor, outcome: Outcome, clean: Outcome) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions on ``adv`` with the gates frozen to the clean path.

        Where the adversarial path equals the clean one the frozen forward *is* the adversarial forward, so only
        samples whose path changed are recomputed.
        """
        fine, coarse = outcome.fine.clone(), outcome.coarse.clone()
        changed = (outcome.path != clean.path).any(1) if clean.path.shape[1] else None
        if changed is not None and changed.any():
            idx = changed.nonzero().squeeze(1)
            frozen = deployed(self.model, adv.index_select(0, idx), "frozen", path=clean.path.index_select(0, idx))
            fine[idx], coarse[idx] = frozen.fine, frozen.coarse
        return fine, coarse

    def score(self, plan: EvalPlan, batch: Batch, advs: Sequence[torch.Tensor], unit_seed: int) -> pd.DataFrame:
        """Records of ``advs`` (one per eps of ``plan``) on ``batch``, built directly with the contract's columns and
        dtypes (:data:`attacks.records.RECORD_COLUMNS`); raises BudgetViolation before anything else."""
        norms = [check_budget(batch.x, adv, e, plan.norm, attack=plan.name, backend=plan.backend)
                 for e, adv in zip(plan.eps, advs)]
        clean = self.clean(batch, plan.gate_mode)
        y = batch.labels(plan.target)
        b = len(batch.samples)
        clean_broken = (clean.pred(plan.target) == NONFINITE_PRED).cpu().numpy()
        clean_correct = (clean.pred(plan.target) == y).cpu().numpy() & ~clean_broken
        clean_path = bit_strings(clean.path)
        parts: list[dict[str, Any]] = []
        adv_broken_at: dict[float, int] = {}
        for k, (e, adv, (linf, l2)) in enumerate(zip(plan.eps, advs, norms)):
            if e == 0:
                outcome = clean  # the adversarial image is the clean image
                frozen_fine, frozen_coarse = clean.fine, clean.coarse
            else:
                seed_everything(derive_seed(unit_seed, "eval", k))
                outcome = deployed(self.model, adv, plan.gate_mode)
                frozen_fine, frozen_coarse = self.frozen(adv, outcome, clean)
            adv_broken = (outcome.pred(plan.target) == NONFINITE_PRED).cpu().numpy()
            nonfinite = clean_broken | adv_broken
            if (adv_broken & ~clean_broken).any():
                adv_broken_at[float(e)] = int((adv_broken & ~clean_broken).sum())
            adv_correct = (outcome.pred(plan.target) == y).cpu().numpy() & ~adv_broken
            frozen_pred = frozen_fine if plan.target == "fine" else frozen_coarse
            parts.append({
                "eps": np.full(b, float(e)), "sample": batch.samples,
                "label_fine": batch.fine.cpu().numpy(), "label_coarse": batch.coarse.cpu().numpy(),
                "clean_pred_fine": clean.fine.cpu().numpy(), "clean_pred_coarse": clean.coarse.cpu().numpy(),
                "adv_pred_fine": outcome.fine.cpu().numpy(), "adv_pred_coarse": outcome.coarse.cpu().numpy(),
                "clean_correct": clean_correct, "adv_correct": adv_correct,
                "success": clean_correct & ~adv_correct & ~nonfinite,
                "robust": clean_correct & adv_correct & ~nonfinite, "nonfinite": nonfinite,
                "linf": linf.cpu().numpy(), "l2": l2.cpu().numpy(),
                "clean_path": clean_path, "adv_path": clean_path if outcome is clean else bit_strings(outcome.path),
                "hamming": (clean.path != outcome.path).sum(1).cpu().numpy(),
                "clean_macs": clean.macs.cpu().numpy(), "adv_macs": outcome.macs.cpu().numpy(),
                "frozen_pred_fine": frozen_fine.cpu().numpy(), "frozen_pred_coarse": frozen_coarse.cpu().numpy(),
                "frozen_correct": (frozen_pred == y).cpu().numpy(),
            })
        self._report(plan, batch, int(clean_broken.sum()), adv_broken_at)
        rows = b * len(parts)
        constant = {"run": self.run_name, "model": self.model_name, "attack": plan.name, "backend": plan.backend,
                    "norm": plan.norm, "gate_mode": plan.gate_mode, "gate_grad": plan.gate_grad,
                    "target": plan.target, "source_run": plan.source_run, "seed": self.seed, "found_by": plan.name}
        columns = {}
        for name, dtype in RECORD_COLUMNS.items():
            if name in constant:
                values = np.full(rows, constant[name], dtype=object if dtype == "string" else dtype)
            elif dtype == "string":
                values = np.concatenate([np.asarray(p[name], dtype=object) for p in parts]) if parts else []
            else:
                values = np.concatenate([np.asarray(p[name]) for p in parts]).astype(dtype, copy=False)
            columns[name] = pd.array(values, dtype="string") if dtype == "string" else values
        return pd.DataFrame(columns, copy=False)

    def _report(self, plan: EvalPlan, batch: Batch, clean_broken: int, adv_broken_at: dict[float, int]) -> None:
        """Warn once per evaluation (the first batch with non-finite logits) with this batch's counts."""
        if (not clean_broken and not adv_broken_at) or plan.id in self.warned:
            return
        self.warned.add(plan.id)
        b = len(batch.samples)
        parts = []
        if clean_broken:
            parts.append(f"clean logits of {clean_broken} of {b} samples")
        if adv_broken_at:
            eps, k = max(adv_broken_at.items(), key=lambda kv: kv[1])
            parts.append(f"adversarial logits of up to {k} of {b} samples (eps={eps:.6g})")
        log.warning("%s on %s: the %s head's %s are non-finite (NaN or inf) in batch %d; those rows are recorded with "
                    "nonfinite=True and count as neither correct, robust nor a successful attack (later batches of "
                    "this evaluation are not reported again)", plan.id, self.run_name, plan.target,
                    " and ".join(parts), batch.index)
