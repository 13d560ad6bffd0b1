"""Helpers shared by the attack tests: copies of the tiny runs, their test images, a dsn with controlled skipping."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import torch

from models.checkpoint import load_checkpoint, save_checkpoint
from robustness.data import load_dataset
from robustness.core.rundir import RunDir

def copy_run(run: RunDir, dst: Path) -> RunDir:
    shutil.copytree(run.root, dst)
    return RunDir.at(dst)


def load_test_images(run: RunDir, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = run.read_config()
    return load_dataset(cfg["dataset"], "test", **cfg.get("data_options", {})).batch(slice(0, n))


def skipping_dsn(run: RunDir, dst: Path, skip: float = 0.3) -> RunDir:
    """A copy of the tiny dsn run whose gates skip about ``skip`` of the test inputs each.

    Test-only surgery, so that gate tests do not depend on what the few tiny training epochs happened to learn:
    each gate's score is rescaled to unit spread and its threshold moved to the ``skip`` quantile.
    """
    shutil.copytree(run.root, dst)
    out = RunDir.at(dst)
    ckpt = load_checkpoint(out.best_checkpoint)
    model = ckpt.build_model("cpu")
    x = load_test_images(out, 256)[0]
    with torch.no_grad():
        scores = model(x, mode="open").path_scores
        gates = [g for branch in (model.coarse, model.fine) for stage in branch.gates for g in stage]
        assert len(gates) == scores.shape[1] == model.n_gates
        for k, gate in enumerate(gates):
            gate.fc2.weight.div_(scores[:, k].std().clamp_min(1e-6))
            gate.fc2.bias.sub_(scores[:, k].quantile(skip)).div_(scores[:, k].std().clamp_min(1e-6))
        model.gate_rate.copy_(model(x, mode="hard").path.mean(0))
    for path in (out.best_checkpoint, out.last_checkpoint):
        save_checkpoint(path, model, ckpt.dataset, metrics=ckpt.metrics)
    return out


def robust_accuracy(df: pd.DataFrame, keys: list[str]) -> pd.Series:
    """Robust accuracy per ``keys``: the mean of ``robust`` (clean and adversarial prediction right), never of
    ``adv_correct`` (a misclassified sample pushed to the right class is not robust)."""
    return df.groupby(keys, observed=True)["robust"].mean()
