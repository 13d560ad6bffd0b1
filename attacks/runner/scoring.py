"""Scoring: adversarial batches -> per-sample records, never trusting an attack library.

Each adversarial batch is budget-checked (:mod:`attacks.checks`), then re-evaluated with a deterministic no-grad
forward in the evaluation's gate mode (``hard`` = the model's real hard forward), and once more with the gates
frozen to the clean input's path (the frozen-path control). The frame is built directly with the record
contract's columns and dtypes (:data:`attacks.records.RECORD_COLUMNS`). A single-head model's coarse predictions
(clean, adversarial, frozen) are :data:`attacks.adapters.NO_HEAD`, as is ``label_coarse`` for data without coarse
labels: the int64 columns stay, no coarse label is invented.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from attacks.adapters import Evaluation as Outcome
from attacks.adapters import evaluate
from attacks.checks import check_budget
from attacks.records import RECORD_COLUMNS
from attacks.runner.plan import EvalPlan
from models.network import CoarseFineNet
from robustness.core.runtime import derive_seed, seed_everything


def bit_strings(bits: torch.Tensor) -> list[str]:
    """Rows of a bool [B, n] tensor as '0101' strings ('' for n = 0)."""
    arr = bits.detach().cpu().numpy().astype(bool)
    if arr.shape[1] == 0:
        return [""] * arr.shape[0]
    chars = np.where(arr, "1", "0")
    return ["".join(row) for row in chars]


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

    def clean(self, batch: Batch, gate_mode: str) -> Outcome:
        if gate_mode not in batch.clean:
            seed_everything(derive_seed(self.seed, "clean", gate_mode, batch.index))
            batch.clean[gate_mode] = evaluate(self.model, batch.x, gate_mode)
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
            frozen = evaluate(self.model, adv.index_select(0, idx), "frozen", path=clean.path.index_select(0, idx))
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
        clean_correct = (clean.pred(plan.target) == y).cpu().numpy()
        clean_path = bit_strings(clean.path)
        parts: list[dict[str, Any]] = []
        for k, (e, adv, (linf, l2)) in enumerate(zip(plan.eps, advs, norms)):
            if e == 0:
                outcome = clean  # the adversarial image is the clean image
                frozen_fine, frozen_coarse = clean.fine, clean.coarse
            else:
                seed_everything(derive_seed(unit_seed, "eval", k))
                outcome = evaluate(self.model, adv, plan.gate_mode)
                frozen_fine, frozen_coarse = self.frozen(adv, outcome, clean)
            adv_correct = (outcome.pred(plan.target) == y).cpu().numpy()
            frozen_pred = frozen_fine if plan.target == "fine" else frozen_coarse
            parts.append({
                "eps": np.full(b, float(e)), "sample": batch.samples,
                "label_fine": batch.fine.cpu().numpy(), "label_coarse": batch.coarse.cpu().numpy(),
                "clean_pred_fine": clean.fine.cpu().numpy(), "clean_pred_coarse": clean.coarse.cpu().numpy(),
                "adv_pred_fine": outcome.fine.cpu().numpy(), "adv_pred_coarse": outcome.coarse.cpu().numpy(),
                "clean_correct": clean_correct, "adv_correct": adv_correct, "success": clean_correct & ~adv_correct,
                "robust": clean_correct & adv_correct,
                "linf": linf.cpu().numpy(), "l2": l2.cpu().numpy(),
                "clean_path": clean_path, "adv_path": clean_path if outcome is clean else bit_strings(outcome.path),
                "hamming": (clean.path != outcome.path).sum(1).cpu().numpy(),
                "clean_macs": clean.macs.cpu().numpy(), "adv_macs": outcome.macs.cpu().numpy(),
                "frozen_pred_fine": frozen_fine.cpu().numpy(), "frozen_pred_coarse": frozen_coarse.cpu().numpy(),
                "frozen_correct": (frozen_pred == y).cpu().numpy(),
            })
        rows = b * len(parts)
        constant = {"run": self.run_name, "model": self.model_name, "attack": plan.name, "backend": plan.backend,
                    "norm": plan.norm, "gate_mode": plan.gate_mode, "gate_grad": plan.gate_grad,
                    "target": plan.target, "source_run": plan.source_run, "seed": self.seed}
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
