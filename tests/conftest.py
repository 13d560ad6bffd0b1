"""Shared fixtures: tiny trained runs of dsn, dual and resnet on the built-in synthetic data.

The runs are trained once per test session with a plain loop (independent of ``models.training``, which has its
own tests) and saved in the run-directory layout, so attack, analysis and CLI tests work on real models.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch
from filelock import FileLock

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

def _registered() -> dict[str, object]:
    """What every registry of the suite holds now (a plug-in's entries included)."""
    from attacks import base
    from models.gates import list_gate_functions
    from models.registry import list_models
    from models.routing import GRAD_MODES
    from robustness.analysis.summary import SUMMARY_COLUMNS
    from robustness.data import list_datasets
    from robustness.sanity import registered_checks
    return {"attacks": {a: tuple(base.backends_for(a)) for a in base.known_attacks()}, "models": list_models(),
            "datasets": list_datasets(), "gate functions": list_gate_functions(), "routing gradients": list(GRAD_MODES),
            "sanity checks": [c.name for c in registered_checks()], "summary columns": list(SUMMARY_COLUMNS)}


@pytest.fixture(autouse=True)
def registries_left_as_found():
    """A test that registers a plug-in takes it out again: a left-over entry changes what later tests (and the help
    text they read) see, depending on which tests ran first in which process."""
    before = _registered()
    yield
    after = _registered()
    leaked = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not leaked, f"this test changed the registries: {leaked}"


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


def _train_tiny_runs(root: Path) -> None:
    """The dsn (the slowest) trains in a spawned process while dual and resnet train here, one per core: each run is
    seeded and single-threaded, so the weights are those of training all three here one after another."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        dsn = pool.submit(_train_tiny_alone, "dsn", root)
        for name in ("dual", "resnet"):
            train_tiny(name, root)
        dsn.result()


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> dict[str, RunDir]:
    """Read-only tiny trained runs ``{"dsn": RunDir, "dual": RunDir, "resnet": RunDir}``; copy before writing.

    Trained once per test session: under pytest-xdist the first worker to ask trains them into the session's
    shared temporary folder while the others wait on a file lock, then every worker reads the same files."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # one process
        root = tmp_path_factory.mktemp("tiny_runs")
        _train_tiny_runs(root)
    else:
        root = tmp_path_factory.getbasetemp().parent / "tiny_runs"
        with FileLock(str(root) + ".lock"):
            if not (root / "complete").is_file():
                shutil.rmtree(root, ignore_errors=True)  # a worker that died half-way
                root.mkdir()
                _train_tiny_runs(root)
                (root / "complete").write_text("done\n")
    return {name: RunDir.at(root / name) for name in ("dsn", "dual", "resnet")}
