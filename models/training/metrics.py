"""What a training run measures: the test metrics of an epoch, the ``metrics.csv`` file, the epoch's log line.

Evaluation runs in eval mode with the hard, deployed gates: test accuracy of both heads, the fraction of each
branch's gated blocks skipped, mean MACs per sample; the per-block execution rates on clean test data come back
too (the trainer stores them in the model's ``gate_rate`` buffer, used by the ``random`` control mode).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from models.network import CoarseFineNet
from models.training.runtime import autocast, to_device
from robustness.data import CoarseFineDataset

#: Columns of ``metrics.csv``, in order. ``skip_*``: fraction of that branch's gated blocks skipped on test data
#: (hard gates). ``macs_saved``: 1 - macs_mean / full MACs. ``gated_macs_saved``: the same relative to the MACs of
#: the gated blocks only (the part skipping can save).
METRIC_COLUMNS = ("epoch", "loss", "ce_fine", "ce_coarse", "budget", "rank", "train_acc_fine", "train_acc_coarse",
                  "test_acc_fine", "test_acc_coarse", "skip_coarse", "skip_fine", "macs_mean", "macs_saved",
                  "gated_macs_saved", "lr", "slope", "seconds")


@torch.no_grad()
def evaluate(model: CoarseFineNet, data: CoarseFineDataset, device: torch.device, batch_size: int = 500,
             mode: str = "hard", amp: bool = False, channels_last: bool = False,
             rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Test metrics of ``model`` (unwrapped) in eval mode and gate ``mode``: accuracies, skip ratios, MACs.

    Under DDP every rank evaluates its share and the sums are all-reduced. Returns ``test_acc_fine``,
    ``test_acc_coarse``, ``skip_coarse``, ``skip_fine``, ``macs_mean``, ``macs_saved``, ``gated_macs_saved`` and
    ``gate_rate`` (per-gate execution rate, path order).
    """
    was_training = model.training
    model.eval()
    names = model.gate_names
    sums = torch.zeros(4 + len(names), dtype=torch.float64)  # n, correct fine, correct coarse, MACs, per-gate runs
    idx = torch.arange(rank, len(data), world)
    for chunk in idx.split(batch_size):
        x, fine, coarse = data.batch(chunk)
        x = to_device(x, device, channels_last)
        with autocast(device, amp):
            out = model(x, mode=mode, gate_grad="none")
        sums[0] += len(chunk)
        sums[1] += (out.fine.argmax(1).cpu() == fine).sum().item()
        sums[2] += (out.coarse.argmax(1).cpu() == coarse).sum().item()
        sums[3] += out.macs.double().sum().item()
        if names:
            sums[4:] += out.path.double().sum(0).cpu()
    if world > 1:
        reduced = sums.to(device)
        torch.distributed.all_reduce(reduced)
        sums = reduced.cpu()
    model.train(was_training)
    return _summary(model, sums)


def _summary(model: CoarseFineNet, sums: torch.Tensor) -> dict[str, Any]:
    """The metrics of :func:`evaluate` from its sums."""
    names = model.gate_names
    n_coarse = sum(1 for g in names if g.startswith("coarse."))
    count = max(float(sums[0]), 1.0)
    rate = (sums[4:] / count).float()
    gated = model.costs.gated_blocks
    full = model.full_macs
    macs_mean = float(sums[3]) / count
    skip = {"coarse": 0.0, "fine": 0.0}
    if names:
        skip["coarse"] = float(1 - rate[:n_coarse].mean()) if n_coarse else 0.0
        skip["fine"] = float(1 - rate[n_coarse:].mean()) if len(names) > n_coarse else 0.0
    gated_total = float(sum(gated))
    return {
        "test_acc_fine": float(sums[1]) / count,
        "test_acc_coarse": float(sums[2]) / count,
        "skip_coarse": skip["coarse"],
        "skip_fine": skip["fine"],
        "macs_mean": macs_mean,
        "macs_saved": 1.0 - macs_mean / full if full > 0 else 0.0,
        "gated_macs_saved": (full - macs_mean) / gated_total if gated_total > 0 else 0.0,
        "gate_rate": rate,
    }


def _fmt_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def metrics_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The text of ``metrics.csv`` for ``rows``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(METRIC_COLUMNS)
    for row in rows:
        writer.writerow([_fmt_value(row.get(c)) for c in METRIC_COLUMNS])
    return buf.getvalue()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.csv`` (numbers as int / float, empty cells as NaN); [] if there is none."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="", encoding="utf-8") as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for key, text in raw.items():
                if key == "epoch":
                    row[key] = int(text)
                else:
                    try:
                        row[key] = float(text) if text != "" else float("nan")
                    except (TypeError, ValueError):
                        row[key] = text
            rows.append(row)
    return rows


def epoch_line(row: dict[str, Any], epochs: int, gated: bool) -> str:
    """The log line of one epoch's metrics ``row``."""
    line = (f"epoch {row['epoch']}/{epochs}  loss {row['loss']:.3f}  "
            f"train {row['train_acc_fine']:.1%}/{row['train_acc_coarse']:.1%}")
    if "test_acc_fine" in row:
        line += f"  test fine {row['test_acc_fine']:.1%} coarse {row['test_acc_coarse']:.1%}"
        if gated:
            line += (f"  skip coarse {row['skip_coarse']:.1%} fine {row['skip_fine']:.1%}"
                     f"  MACs saved {row['macs_saved']:.1%} (gated {row['gated_macs_saved']:.1%})")
    return line + f"  lr {row['lr']:.4f}  {row['seconds']:.1f}s"
