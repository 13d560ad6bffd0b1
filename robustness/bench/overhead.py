"""What the suite costs on top of the attack library: torchattacks PGD called directly vs through the runner.

(a) *direct*: ``torchattacks.PGD`` on a plain logits wrapper of the model (hard gates, as deployed), nothing else.
(b) *suite*: the same PGD (same eps, steps, step size, random start, seed) through what the runner does for every
    batch x evaluation: :class:`attacks.adapters.LogitsView`, the attack's budget sweep, the budget check, the
    deterministic clean and adversarial re-evaluation, the frozen-path control and building the records frame.
    Parquet I/O is *excluded* (it depends on the disk, not on the suite; a shard of 128 rows takes a few ms).

The runner evaluates the clean batch once and shares it between all evaluations of that batch, so ``ratio``
times (b) with the clean outcome already computed (the steady state of a run with several attacks) and
``ratio_single`` times it including the clean forward (a run with one attack). Each variant is timed ``repeats``
times after one warm-up, interleaved; the minimum of each is reported (the least disturbed by other load).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torchattacks as ta
from torch import nn

from attacks.base import Target, attack_class
from attacks.params import step_size
from attacks.runner import Batch, EvalPlan, Scorer
from models.network import CoarseFineNet
from robustness.core.runtime import derive_seed, seed_everything


class _PlainLogits(nn.Module):
    """The least a user would write: ``x -> model(x).fine`` (or ``.coarse``) with hard gates."""

    def __init__(self, model: CoarseFineNet, head: str):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, mode="hard", gate_grad="none").logits(self.head)


def sync(device: torch.device) -> None:
    """Wait for ``device`` to finish its queued work (CUDA only: a CPU runs synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_overhead(model: CoarseFineNet, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, steps: int = 10,
                     repeats: int = 5, head: str = "fine", seed: int = 0) -> dict[str, Any]:
    """Seconds per batch of (a) torchattacks PGD directly and (b) the suite's path for the same attack.

    ``y`` holds the labels of ``head``; the model is used in eval mode with hard gates. Returns plain numbers:
    ``seconds_direct``, ``seconds_suite``, ``ratio`` (suite / direct; the target is <= 1.10), ``seconds_suite_single``
    and ``ratio_single`` (clean forward included), plus ``repeats``, ``batch``, ``steps``, ``eps`` and ``includes``.
    """
    model.eval()
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    plain = _PlainLogits(model, head)
    alpha = step_size(None, eps, steps)
    attack = attack_class("pgd", "torchattacks")("linf", steps=steps, alpha=None, random_start=True, restarts=1)
    plan = EvalPlan(attack, [float(eps)], "hard", "none", head)
    scorer = Scorer(model, "overhead", getattr(model, "model_name", ""), seed)
    crafting = Target(model, head, "hard", "none", 8, device)
    labels_other = torch.zeros_like(y)

    def direct() -> None:
        seed_everything(seed)
        atk = ta.PGD(plain, eps=eps, alpha=alpha, steps=steps, random_start=True)
        atk.set_device(device)
        atk(x, y)

    def suite(shared_clean: bool) -> None:
        fine, coarse = (y, labels_other) if head == "fine" else (labels_other, y)
        batch = Batch(0, np.arange(len(x)), x, fine, coarse)
        if shared_clean:
            batch.clean["hard"] = clean
        unit_seed = derive_seed(seed, plan.id, 0)
        advs = plan.attack(crafting, batch.x, batch.labels(plan.target), plan.eps, unit_seed)
        scorer.score(plan, batch, advs, unit_seed)

    def timed(fn, *args) -> float:
        sync(device)
        t = time.perf_counter()
        fn(*args)
        sync(device)
        return time.perf_counter() - t

    # as in the runner, parameters do not require gradients (both variants run on the same model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        clean = scorer.clean(Batch(0, np.arange(len(x)), x, y, y), "hard")
        direct(), suite(False)  # warm-up
        t_direct, t_shared, t_single = [], [], []
        for k in range(max(int(repeats), 1)):
            runs = [(t_direct, direct, ()), (t_shared, suite, (True,)), (t_single, suite, (False,))]
            for times, fn, args in (runs if k % 2 == 0 else runs[::-1]):
                times.append(timed(fn, *args))
    finally:
        for p in trainable:
            p.requires_grad_(True)
    a, b, c = min(t_direct), min(t_shared), min(t_single)
    return {"seconds_direct": a, "seconds_suite": b, "ratio": b / a if a > 0 else float("inf"),
            "seconds_suite_single": c, "ratio_single": c / a if a > 0 else float("inf"),
            "repeats": int(repeats), "batch": int(len(x)), "steps": int(steps), "eps": float(eps),
            "includes": "adapter, budget sweep, budget check, adversarial and frozen-path evaluation, record frame; "
                        "the clean evaluation is shared by all evaluations of a batch (ratio_single counts it for "
                        "a lone evaluation); excludes parquet I/O"}
