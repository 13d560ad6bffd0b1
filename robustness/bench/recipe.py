"""``dsn-robust bench recipe``: does a training recipe converge on every seed?

A recipe on a cliff lands on either side depending on the seed and on the machine's floating-point kernels (the
synthetic quickstart of earlier versions: 57% fine on seed 0, 94% on seed 1, bit-identical on rerun), so a config's
accuracy is quoted with the seeds it holds for. The command trains every model of the config once per seed exactly
as ``dsn-robust run`` does (:func:`robustness.app.pipeline.train_runs`), then this module reads each run's last epoch
from its ``metrics.csv`` and sets it against the targets.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from models.training.metrics import read_metrics
from robustness.core.rundir import RunDir


@dataclass(frozen=True)
class RecipeTargets:
    """What every (model, seed) must reach at its last epoch: test accuracies and, for gated models, the share of
    the gated blocks' MACs saved (fractions)."""

    fine: float = 0.9
    coarse: float = 0.95
    gated_saved: float = 0.3


@dataclass(frozen=True)
class RecipeRow:
    """One trained (model, seed): its last epoch's test figures (NaN where not measured) and training time."""

    model: str
    seed: int
    epochs: int
    fine: float
    coarse: float
    gated_saved: float
    gated: bool
    minutes: float

    def misses(self, targets: RecipeTargets) -> list[str]:
        """The targets this run misses, as short phrases (empty when it meets all of them)."""
        out = []
        if not self.fine >= targets.fine:
            out.append(f"fine {self.fine:.1%} < {targets.fine:.0%}")
        if not math.isnan(self.coarse) and not self.coarse >= targets.coarse:
            out.append(f"coarse {self.coarse:.1%} < {targets.coarse:.0%}")
        if self.gated and not self.gated_saved >= targets.gated_saved:
            out.append(f"gated MACs saved {self.gated_saved:.1%} < {targets.gated_saved:.0%}")
        return out


def recipe_row(model: str, seed: int, run_dir: Path, gated: bool) -> RecipeRow:
    """The last epoch of ``run_dir``'s training metrics (``gated``: whether the model skips blocks)."""
    rows = read_metrics(RunDir.at(run_dir).metrics)
    last: Mapping[str, Any] = rows[-1] if rows else {}
    value = lambda key: float(last.get(key, math.nan))  # noqa: E731
    saved = value("gated_macs_saved")
    return RecipeRow(model=model, seed=seed, epochs=int(last.get("epoch", 0)), fine=value("test_acc_fine"),
                     coarse=value("test_acc_coarse"), gated_saved=saved, gated=gated,
                     minutes=sum(float(r.get("seconds", 0.0)) for r in rows) / 60)


def recipe_payload(rows: list[RecipeRow], targets: RecipeTargets) -> dict[str, Any]:
    """JSON-safe: every row with what it misses, the targets, and whether every run met them."""
    return {"targets": asdict(targets), "passed": all(not r.misses(targets) for r in rows),
            "runs": [{**asdict(r), "misses": r.misses(targets)} for r in rows]}


def format_recipe(rows: list[RecipeRow], targets: RecipeTargets) -> str:
    """A table: one line per (model, seed), then one line per model with its worst seed."""
    pct = lambda v: "-" if math.isnan(v) else f"{v:.1%}"  # noqa: E731
    lines = [f"{'model':<10}{'seed':>6}{'epochs':>8}{'fine':>9}{'coarse':>9}{'gated saved':>13}{'minutes':>9}  misses"]
    for r in rows:
        lines.append(f"{r.model:<10}{r.seed:>6}{r.epochs:>8}{pct(r.fine):>9}{pct(r.coarse):>9}"
                     f"{pct(r.gated_saved) if r.gated else '-':>13}{r.minutes:>9.2f}  {'; '.join(r.misses(targets))}")
    lines.append("")
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model]
        seeds = ",".join(str(r.seed) for r in mine)
        lines.append(f"{model}: worst seed fine {pct(min(r.fine for r in mine))}, coarse "
                     f"{pct(min(r.coarse for r in mine))} over seeds {seeds}; "
                     f"{'meets' if not any(r.misses(targets) for r in mine) else 'MISSES'} the targets "
                     f"(fine >= {targets.fine:.0%}, coarse >= {targets.coarse:.0%}"
                     f"{f', gated MACs saved >= {targets.gated_saved:.0%}' if any(r.gated for r in mine) else ''})")
    return "\n".join(lines)
