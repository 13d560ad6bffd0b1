"""Non-finite logits and gradients: detected where they occur, recorded per row (``nonfinite``), never counted as
correct, robust or a successful attack, and flagged by the ``finite-logits`` sanity check.

Each test hands a tiny user model (an ``nn.Module`` returning logits) to :func:`robustness.evaluate`, as a
researcher would, on 16 random 8x8 images whose pixels are multiples of 1/255 and whose labels are the model's
own clean predictions (so that every sample with finite clean logits is clean-correct).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from attacks.records import NONFINITE_PRED, conform, worst_case
from robustness import evaluate
from robustness import sanity

N = 16
EPS = "0,1.5/255,2.5/255"  # steps of these sizes leave the 1/255 pixel grid
RUN = dict(attacks="fgsm,pgd", backends="torchattacks", eps=EPS, n=N, batch_size=N, steps=3,
           params={"pgd": {"restarts": 1}}, seed=3, device="cpu", progress=False)


class Linear(nn.Module):
    """[0, 1] images [B, 3, 8, 8] -> 4 logits; ``broken(x, z)`` says per sample which logits go bad."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * self.fc(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)


def _images(first: list[float] | None = None) -> torch.Tensor:
    """N images on the 1/255 grid; ``first`` sets pixel (0, 0, 0) per sample (also on the grid)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (N, 3, 8, 8), generator=g).float() / 255
    if first is not None:
        x[:, 0, 0, 0] = torch.round(torch.tensor(first) * 255) / 255
    return x


def _data(model: Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        z = model.logits(x)
    return x, z.argmax(1)  # finite clean logits are always right


def _evaluate(model: nn.Module, data, tmp_path, **options):
    return evaluate(model, data, out=tmp_path / "run", **{**RUN, **options})


def _finite_check(res) -> sanity.Check:
    return next(c for c in res.checks if c.name == "finite-logits")


# -- clean logits -------------------------------------------------------------------------------------------------


class AllNaN(Linear):
    def forward(self, x):
        return self.logits(x) * math.nan


def test_all_nan_logits_are_never_correct_and_fail_the_check(tmp_path):
    model = AllNaN()
    x = _images()
    y = torch.arange(N) % 4  # class 0 among them: argmax(NaN) = 0 used to count them right
    res = _evaluate(model, (x, y), tmp_path)
    df = res.records
    assert len(df) and df["nonfinite"].all()
    assert not df["clean_correct"].any() and not df["robust"].any() and not df["success"].any()
    assert (df["clean_pred_fine"] == NONFINITE_PRED).all() and (df["adv_pred_fine"] == NONFINITE_PRED).all()
    assert res.clean_accuracy.estimate == 0
    assert (res.robust_accuracy["estimate"] == 0).all()
    check = _finite_check(res)
    assert check.status == "fail" and f"{N} of {N} samples" in check.evidence
    # the masking checks say nothing about a model that does not compute: skipped, never "pass"
    others = [c for c in res.checks if c.name not in ("finite-logits", "Coarse-head analyses")]
    assert others and all(c.status == "skip" and "non-finite" in c.evidence for c in others)
    assert res.masking == "fail" and sanity.worst_status(res.checks) == "fail"
    assert np.isfinite(df["linf"]).all()  # NaN gradients never became a recorded example


class HalfNaN(Linear):
    """NaN logits for samples whose pixel (0, 0, 0) is dark (< 0.5): half of each batch."""

    def forward(self, x):
        z = self.logits(x)
        return torch.where((x[:, 0, 0, 0] < 0.5)[:, None], z * math.nan, z)


def test_nan_for_half_the_batch_marks_exactly_those_samples(tmp_path):
    model = HalfNaN()
    x = _images([0.2, 0.8] * (N // 2))
    res = _evaluate(model, _data(model, x), tmp_path)
    df = res.records
    dark = set(range(0, N, 2))
    assert set(df.loc[df["nonfinite"], "sample"]) == dark
    marked = df[df["nonfinite"]]
    assert (marked["clean_pred_fine"] == NONFINITE_PRED).all()
    assert not marked[["clean_correct", "adv_correct", "success", "robust"]].any().any()
    fine = df[~df["nonfinite"]]
    assert fine["clean_correct"].all() and (fine["clean_pred_fine"] >= 0).all()
    assert res.clean_accuracy.estimate == 0.5
    assert (res.robust_accuracy["estimate"] <= 0.5).all()
    check = _finite_check(res)
    assert check.status == "fail" and f"{N // 2} of {N} samples" in check.evidence
    assert all(c.status != "skip" or "non-finite" not in c.evidence for c in res.checks)  # half: still checked


class Infinite(Linear):
    """+inf in class 0 for samples with a dark pixel (0, 0, 0), -inf in class 1 for bright ones, finite between."""

    def forward(self, x):
        z = self.logits(x)
        p = x[:, 0, 0, 0]
        plus = torch.zeros_like(z)
        plus[:, 0] = torch.where(p < 0.3, math.inf, 0.0)
        minus = torch.zeros_like(z)
        minus[:, 1] = torch.where(p > 0.7, -math.inf, 0.0)
        return z + plus + minus


def test_infinite_logits_are_not_a_prediction(tmp_path):
    model = Infinite()
    x = _images([0.1, 0.5, 0.9, 0.5] * (N // 4))
    data = (x, torch.zeros(N, dtype=torch.long))  # argmax(+inf in class 0) = 0 would be "right"
    res = _evaluate(model, data, tmp_path)
    df = res.records
    assert set(df.loc[df["nonfinite"], "sample"]) == {s for s in range(N) if s % 4 in (0, 2)}
    assert not df.loc[df["nonfinite"], ["clean_correct", "robust", "success"]].any().any()
    assert (df.loc[df["nonfinite"], "clean_pred_fine"] == NONFINITE_PRED).all()
    assert _finite_check(res).status == "fail"


# -- adversarial logits ---------------------------------------------------------------------------------------------


class OffGrid(Linear):
    """Finite on images whose pixels are all multiples of 1/255 (the clean data), NaN on any other input."""

    def forward(self, x):
        grid = x.detach() * 255
        off = ((grid - torch.round(grid)).abs() > 1e-3).flatten(1).any(1)
        # a constant NaN where off the grid: the clean inputs' gradients stay finite (torch.where would not)
        return self.logits(x) + torch.where(off, math.nan, 0.0)[:, None]


def test_nan_on_perturbed_inputs_is_not_a_successful_attack(tmp_path, caplog):
    model = OffGrid()
    x = _images()
    with caplog.at_level(logging.WARNING):
        res = _evaluate(model, _data(model, x), tmp_path)
    df = res.records
    clean, attacked = df[df["eps"] == 0], df[df["eps"] > 0]
    assert len(clean) and len(attacked) and not clean["nonfinite"].any() and clean["clean_correct"].all()
    # every perturbed input breaks the model, none is a finite adversarial example: all rows marked, none a success
    assert attacked["nonfinite"].all()
    assert (attacked["adv_pred_fine"] == NONFINITE_PRED).all() and (attacked["clean_pred_fine"] >= 0).all()
    assert attacked["clean_correct"].all()
    assert not attacked["success"].any() and not attacked["robust"].any() and not attacked["adv_correct"].any()
    assert res.clean_accuracy.estimate == 1.0
    assert (res.robust_accuracy["estimate"] == 0).all()
    check = _finite_check(res)
    assert check.status == "warn" and f"{len(attacked)} of {len(attacked)} attacked rows" in check.evidence
    assert "nonfinite=True" in caplog.text


def test_worst_case_never_counts_a_nonfinite_row_robust():
    base = dict(run="r", model="m", attack="pgd", backend="native", norm="linf", eps=0.1, gate_mode="hard",
                gate_grad="none", target="fine", source_run="", sample=0, seed=0, label_fine=1, label_coarse=-1,
                clean_pred_fine=1, clean_pred_coarse=-1, adv_pred_fine=1, adv_pred_coarse=-1, clean_correct=True,
                adv_correct=True, success=False, robust=True, linf=0.1, l2=0.2, clean_path="", adv_path="",
                hamming=0, clean_macs=1.0, adv_macs=1.0, frozen_pred_fine=1, frozen_pred_coarse=-1,
                frozen_correct=True)
    # a row that claims robust with non-finite logits (hand-made), beside a finite robust one and an old record
    rows = pd.DataFrame([{**base, "nonfinite": False}, {**base, "attack": "fgsm", "nonfinite": True}])
    worst = worst_case(rows)
    assert len(worst) == 1 and not worst["robust"].iloc[0] and worst["nonfinite"].iloc[0]
    old = conform(pd.DataFrame([base]))  # written before the column existed
    assert old["nonfinite"].dtype == bool and not old["nonfinite"].iloc[0]
    assert worst_case(old)["robust"].iloc[0]


# -- input gradients ------------------------------------------------------------------------------------------------


class _NaNBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


class NaNGradient(Linear):
    """Finite logits, NaN input gradients."""

    def forward(self, x):
        return self.logits(_NaNBackward.apply(x))


@pytest.mark.parametrize("backends, attacks, norm, eps", [
    ("torchattacks", "fgsm,pgd", "linf", EPS),  # sign(NaN) = 0: no step, the gradient hook sees it
    ("torchattacks", "pgd", "l2", "0.1,0.3"),  # NaN / ||NaN||: PGDL2 returns NaN images, rejected
    ("native", "pgd", "l2", "0.1,0.3"),
])
def test_nan_input_gradients_never_make_an_example_and_are_reported(backends, attacks, norm, eps, tmp_path, caplog):
    model = NaNGradient()
    x = _images()
    with caplog.at_level(logging.WARNING, logger="attacks.base"):
        res = _evaluate(model, _data(model, x), tmp_path, backends=backends, attacks=attacks, norm=norm, eps=eps)
    df = res.records
    assert len(df) and np.isfinite(df["linf"]).all() and np.isfinite(df["l2"]).all()
    assert (df["linf"] <= df["eps"] + 1e-6).all()
    assert not df["nonfinite"].any()  # the forward is finite on every recorded example
    warnings = [r for r in caplog.records if r.name == "attacks.base" and "non-finite input gradients" in r.message]
    assert warnings, caplog.text
    # once per evaluation (attack x routing gradient), naming how many samples
    assert len(warnings) == df[df["eps"] > 0]["attack"].nunique()
    assert all(f"of {N} samples" in r.message for r in warnings)
    if norm == "l2":  # the NaN steps made NaN images: rejected, and said so
        assert all("non-finite pixels" in r.message for r in warnings)
    assert _finite_check(res).status == "pass"
