"""Shared fixtures: tiny trained runs of dsn, dual and resnet on the built-in synthetic data.

The runs are trained once per test session with a plain loop (independent of ``models.training``, which has its
own tests) and saved in the run-directory layout, so attack, analysis and CLI tests work on real models.
"""
from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

from models.checkpoint import save_checkpoint
from models.losses import LossWeights, dsn_loss
from models.registry import create_model
from robustness.data import load_dataset
from robustness.core.rundir import RunDir

TINY_DATA = dict(image_size=16, seed=0)


def pytest_configure(config) -> None:
    # Tiny models on a 2-core machine: one intra-op thread avoids thread contention that can make each step many
    # times slower than single-threaded execution.
    torch.set_num_threads(1)

TINY_MODEL = dict(depth_n=2, width=8)
TINY_EPOCHS = 6


def tiny_model_options(info) -> dict:
    return dict(TINY_MODEL, num_fine=info.num_fine, num_coarse=info.num_coarse, image_size=info.image_size,
                mean=tuple(info.mean), std=tuple(info.std))


def train_tiny(name: str, root: Path, seed: int = 0) -> RunDir:
    """Train a tiny ``name`` model for a few epochs on synthetic data and save it as a run directory."""
    torch.manual_seed(seed)
    train = load_dataset("synthetic", "train", n=2000, **TINY_DATA)
    test = load_dataset("synthetic", "test", n=400, **TINY_DATA)
    model = create_model(name, **tiny_model_options(train.info))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    weights = LossWeights(target_coarse=0.3, target_fine=0.6, budget=4.0)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(TINY_EPOCHS):
        model.train()
        for idx in torch.randperm(len(train), generator=generator).split(64):
            x, fine, coarse = train.batch(idx)
            with model.gating(mode="open" if epoch == 0 else "hard"):
                loss, _ = dsn_loss(model(x), fine, coarse, weights, gate_weight=0.0 if epoch == 0 else 1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if hasattr(model, "slope"):
            model.slope.fill_(1.0 + 2.0 * epoch)
    model.eval()
    x, fine, coarse = test.batch(slice(None))
    with torch.no_grad():
        out = model(x)
    if model.is_gated:
        model.gate_rate.copy_(out.path.mean(0))
    run = RunDir.at(root / name)
    acc = float((out.fine.argmax(1) == fine).float().mean())
    save_checkpoint(run.last_checkpoint, model, train.info, metrics={"test_acc_fine": acc})
    save_checkpoint(run.best_checkpoint, model, train.info, metrics={"test_acc_fine": acc})
    run.config.write_text(json.dumps({"model": name, "dataset": "synthetic", "data_options": TINY_DATA,
                                      "model_options": TINY_MODEL, "seed": seed}))
    run.train_done.write_text("done\n")
    return run


def _train_tiny_alone(name: str, root: Path) -> None:
    """``train_tiny`` in a spawned process, single-threaded as this process (pytest_configure does not run there)."""
    torch.set_num_threads(1)
    train_tiny(name, root)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> dict[str, RunDir]:
    """Read-only tiny trained runs ``{"dsn": RunDir, "dual": RunDir, "resnet": RunDir}``; copy before writing.

    The dsn (the slowest) trains in a spawned process while dual and resnet train here, one per core: each run is
    seeded and single-threaded, so the weights are those of training all three here one after another."""
    root = tmp_path_factory.mktemp("tiny_runs")
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        dsn = pool.submit(_train_tiny_alone, "dsn", root)
        static = {name: train_tiny(name, root) for name in ("dual", "resnet")}
        dsn.result()
    return {"dsn": RunDir.at(root / "dsn"), **static}
