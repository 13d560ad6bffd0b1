"""Attacks on the tiny trained runs: strength ordering, eps behaviour, budgets, backend agreement, CW scoring."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import attacks.base as base_mod
from attacks.adapters import LogitsView, evaluate
from attacks.base import COMPUTE, Attack, Target, attack_class
from attacks.backends import foolbox as fb_backend
from attacks.checks import check_budget
from attacks.records import RECORD_COLUMNS
from attacks.runner import AttackConfig, load_run_checkpoint, run_attacks
from robustness.core.errors import BudgetViolation
from robustness.core.rundir import RunDir
from attack_helpers import copy_run, robust_accuracy, skipping_dsn, load_test_images

N = 128
EPS = [0.0, 0.5 / 255, 1 / 255, 2 / 255]  # the tiny models are fragile: larger budgets fool everything



@pytest.fixture(scope="module")
def dsn_run(tiny_runs, tmp_path_factory) -> RunDir:
    return skipping_dsn(tiny_runs["dsn"], tmp_path_factory.mktemp("attacks") / "dsn")


@pytest.fixture(scope="module")
def dsn_records(dsn_run) -> pd.DataFrame:
    """FGSM and PGD from both libraries, CW (foolbox only) and its L2 PGD check, on the coarse head of the gated
    tiny DSN (hard gates)."""
    config = AttackConfig(attacks=["fgsm", "pgd", "cw"], backends="both", eps=EPS, cw_eps=[0.0, 0.1, 0.25, 0.5],
                          gate_grads=["none"], target="coarse", n=N, batch_size=64, steps=5,
                          params={"pgd": {"restarts": 1}, "cw": {"steps": 30, "initial_c": 1.0, "binary_steps": 3}},
                          seed=0)
    return run_attacks(dsn_run.root, config, progress=False).records


@pytest.fixture(scope="module")
def tiny_batch(dsn_run):
    model = load_run_checkpoint(dsn_run).build_model("cpu")
    x, fine, coarse = load_test_images(dsn_run, 64)
    return model, x, coarse


def test_records_follow_the_contract(dsn_records):
    df = dsn_records
    assert list(df.columns) == list(RECORD_COLUMNS)
    assert {str(t) for t in df.dtypes} >= {"string", "float64", "int64", "bool"}
    # one row per (evaluation, eps, sample), nothing duplicated
    keys = ["attack", "backend", "norm", "eps", "gate_mode", "gate_grad", "target", "source_run", "sample"]
    assert not df.duplicated(keys).any()
    counts = df.groupby(["attack", "backend", "norm", "eps"], observed=True).size()
    # fgsm and pgd in both libraries (linf), cw in foolbox only (L2, plus its unbounded row), and the L2 PGD that
    # checks cw (in the first listed backend that has pgd)
    assert (counts == N).all() and len(counts) == 2 * 2 * 4 + 5 + 4
    assert set(map(tuple, df[["attack", "backend", "norm"]].drop_duplicates().to_numpy())) == {
        ("fgsm", "torchattacks", "linf"), ("fgsm", "foolbox", "linf"), ("pgd", "torchattacks", "linf"),
        ("pgd", "foolbox", "linf"), ("cw", "foolbox", "l2"), ("pgd", "torchattacks", "l2")}
    # success is recomputed from model outputs, never taken from a library
    assert set(df["target"]) == {"coarse"}
    assert (df["adv_correct"] == (df["adv_pred_coarse"] == df["label_coarse"])).all()
    assert (df["clean_correct"] == (df["clean_pred_coarse"] == df["label_coarse"])).all()
    assert (df["success"] == (df["clean_correct"] & ~df["adv_correct"])).all()
    assert (df["robust"] == (df["clean_correct"] & df["adv_correct"])).all()
    assert set(df.loc[df["attack"] == "cw", "eps"]) == {0.0, 0.1, 0.25, 0.5, math.inf}
    assert set(df.loc[df["norm"] == "linf", "eps"]) == set(EPS)
    # paths are bit strings of the model's gates; MACs follow the executed path
    assert df["clean_path"].str.fullmatch("[01]{4}").all() and df["adv_path"].str.fullmatch("[01]{4}").all()
    assert (df["clean_path"].str.contains("0")).mean() > 0.3  # the gates do skip
    ham = [sum(a != b for a, b in zip(c, d)) for c, d in zip(df["clean_path"], df["adv_path"])]
    assert (df["hamming"] == ham).all()
    same_path = df["clean_path"] == df["adv_path"]
    assert (df.loc[same_path, "clean_macs"] == df.loc[same_path, "adv_macs"]).all()


def test_budgets_are_respected_in_records(dsn_records):
    df = dsn_records
    linf = df[df["norm"] == "linf"]
    assert (linf["linf"] <= linf["eps"] + 1e-6).all()
    l2 = df[df["norm"] == "l2"]
    assert (l2["l2"] <= l2["eps"] * (1 + 1e-5) + 1e-6).all()
    assert (df.loc[df["eps"] > 0, "linf"] > 0).any()


def test_eps_zero_is_exactly_clean(dsn_records):
    zero = dsn_records[dsn_records["eps"] == 0]
    assert len(zero) == 6 * N
    assert (zero["adv_pred_fine"] == zero["clean_pred_fine"]).all()
    assert (zero["adv_pred_coarse"] == zero["clean_pred_coarse"]).all()
    assert (zero["adv_correct"] == zero["clean_correct"]).all()
    assert not zero["success"].any()
    assert (zero["linf"] == 0).all() and (zero["l2"] == 0).all() and (zero["hamming"] == 0).all()
    assert (zero["adv_path"] == zero["clean_path"]).all()
    clean_acc = zero.drop_duplicates("sample")["clean_correct"].mean()
    assert clean_acc > 0.3  # above chance (4 coarse classes): there is something to attack


def test_pgd_at_least_as_strong_as_fgsm(dsn_records):
    acc = robust_accuracy(dsn_records[dsn_records["norm"] == "linf"], ["backend", "attack", "eps"])
    for backend in ("torchattacks", "foolbox"):
        for eps in EPS[1:]:
            assert acc[(backend, "pgd", eps)] <= acc[(backend, "fgsm", eps)] + 1 / N
    # and the attacks do something at the largest budget
    assert acc[("torchattacks", "pgd", EPS[-1])] < acc[("torchattacks", "pgd", 0.0)] - 0.1


def test_robust_accuracy_does_not_rise_with_eps(dsn_records):
    # monotone by construction, per sample: CW's example is used at every budget its norm fits, and a fixed-budget
    # attack's example found at a small budget is kept for every larger one (attacks.tracking)
    for key, g in dsn_records.groupby(["attack", "backend", "norm"], observed=True):
        robust = g.pivot_table(index="sample", columns="eps", values="robust").sort_index(axis=1).to_numpy(bool)
        assert not (robust[:, 1:] & ~robust[:, :-1]).any(), key


def test_torchattacks_and_foolbox_agree(dsn_records):
    acc = robust_accuracy(dsn_records[dsn_records["norm"] == "linf"], ["attack", "backend", "eps"])
    for attack in ("fgsm", "pgd"):
        for eps in EPS:
            gap = abs(acc[(attack, "torchattacks", eps)] - acc[(attack, "foolbox", eps)])
            assert gap <= 0.10, (attack, eps, gap)
    # FGSM is deterministic and identical in both libraries: the same samples fall
    fgsm = dsn_records[dsn_records["attack"] == "fgsm"].pivot_table(index=["eps", "sample"], columns="backend",
                                                                    values="adv_correct")
    assert (fgsm["torchattacks"] != fgsm["foolbox"]).mean() <= 0.03


def test_cw_failures_are_not_successes(dsn_records):
    cw = dsn_records[dsn_records["attack"] == "cw"]
    # an unperturbed sample (the clean image stands: CW failed or the norm exceeds eps) never counts
    untouched = cw[cw["l2"] == 0]
    assert len(untouched) > 0 and not untouched["success"].any()
    assert (untouched["adv_pred_coarse"] == untouched["clean_pred_coarse"]).all()
    # every success is a misclassification on the recomputed forward, within the L2 budget
    won = cw[cw["success"]]
    assert len(won) > 0
    assert (won["adv_pred_coarse"] != won["label_coarse"]).all() and (won["l2"] <= won["eps"] + 1e-6).all()
    # the unbounded row holds each sample's one minimal example: at a budget it counts iff its norm fits
    table = cw.pivot_table(index="sample", columns="eps", values=["success", "l2", "clean_correct"])
    found, norm = table[("success", math.inf)].astype(bool), table[("l2", math.inf)]
    correct = table[("clean_correct", 0.0)].astype(bool)
    assert found.any() and (norm[correct & ~found] == 0).all()
    for eps in (0.1, 0.25, 0.5):
        assert (table[("success", eps)].astype(bool) == (found & (norm <= eps))).all(), eps


def _fake_foolbox_cw(monkeypatch, raw: torch.Tensor) -> None:
    """foolbox's CW returning ``raw`` (as its minimal example for every sample) without running."""
    def call(self, model, inputs, criterion, *, epsilons, **kwargs):
        return raw.clone(), raw.clone(), torch.ones(len(raw), dtype=torch.bool)

    monkeypatch.setattr(fb_backend.fb.attacks.L2CarliniWagnerAttack, "__call__", call)


def test_cw_ignores_what_the_library_returns_for_failures(tiny_batch, monkeypatch):
    model, x, y = tiny_batch
    target = Target(model, "coarse", "hard", "none")
    cw = attack_class("cw", "foolbox")("l2", steps=5)
    budgets = [0.5, 1.0, math.inf]
    # foolbox's CW hands back an all-zero image for every sample it fails on: that is no adversarial example (even
    # where the model happens to misclassify a black image), so the clean image stands at every budget, inf too
    _fake_foolbox_cw(monkeypatch, torch.zeros_like(x))
    assert int((evaluate(model, torch.zeros_like(x)).coarse != y).sum()) > 0  # the black image "fools" some
    out = cw(target, x, y, budgets, seed=0)
    assert torch.equal(out[0], x) and torch.equal(out[1], x)  # a black image is far outside these budgets
    black_found = ((out[2] - x).flatten(1).abs().amax(1) > 0) & (evaluate(model, out[2]).coarse != y)
    assert int(black_found.sum()) == 0, "foolbox's failure value (a black image) counted as a CW example at eps=inf"
    # a perturbed image that mostly does not fool the model: only what the recomputed forward misclassifies is
    # kept, everything else falls back to the clean image
    noise = 1e-3 * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(1)))
    perturbed = (x + noise).clamp(0, 1)
    _fake_foolbox_cw(monkeypatch, perturbed)
    out = cw(target, x, y, budgets, seed=0)
    wrong = (evaluate(model, perturbed).coarse != y).view(-1, 1, 1, 1)
    assert 0 < int(wrong.sum()) < len(x)
    for o in out:
        assert torch.equal(o, torch.where(wrong, perturbed, x))
    # at a budget below the example's norm the clean image stands
    tight = cw(target, x, y, [0.01], seed=0)[0]
    assert torch.equal(tight, x)


def test_budget_violation_is_an_error_and_writes_nothing(tiny_runs, tmp_path, monkeypatch):
    # a compute attack (not tracked: a fixed-budget attack's tracker never keeps an over-budget candidate, see
    # test_tracking.py) whose examples leave the budget
    class OverBudget(Attack):
        name, backend, kind = "slowdown", "native", COMPUTE

        def perturb(self, target, x, y, eps, seed):
            return [(x + 2 * e * torch.sign(torch.randn_like(x))).clamp(0, 1) for e in eps]

    monkeypatch.setitem(base_mod._REGISTRY["slowdown"], "native", OverBudget)
    run = copy_run(tiny_runs["dual"], tmp_path / "dual")
    config = AttackConfig(attacks=["slowdown"], backends="torchattacks", eps=[4 / 255], n=32, batch_size=32)
    with pytest.raises(BudgetViolation, match=r"'slowdown' \(backend native\) at eps=0.0156863 \(linf\) exceeded "
                                              r"its budget in \d+ of 32 samples \(worst linf norm 0.031"):
        run_attacks(run.root, config, progress=False)
    assert not list(run.attacks.rglob("*.parquet"))


def test_budget_check_catches_range_and_l2():
    clean = torch.full((4, 3, 8, 8), 0.5)
    check_budget(clean, clean + 0.01, 0.01, "linf")  # exactly on the budget is fine
    with pytest.raises(BudgetViolation, match="left \\[0, 1\\] in 1 of 4"):
        bad = clean.clone()
        bad[2, 0, 0, 0] = 1.5
        check_budget(clean, bad, 1.0, "linf")
    delta = torch.zeros_like(clean)
    delta[1, 0, 0, 0] = 0.3
    with pytest.raises(BudgetViolation, match="1 of 4 samples \\(worst l2 norm 0.3 > 0.2\\)"):
        check_budget(clean, clean + delta, 0.2, "l2")
    check_budget(clean, clean + delta, 0.3, "l2")
    with pytest.raises(BudgetViolation, match="NaN"):
        check_budget(clean, clean * float("nan"), 0.3, "l2")


def test_logits_view_is_plain_and_captures_gates(tiny_batch):
    model, x, y = tiny_batch
    view = LogitsView(model, head="coarse", gate_mode="hard")
    view.train()
    assert not model.training and not view.training
    logits = view(x)
    out = model(x, mode="hard")
    assert torch.allclose(logits, out.coarse)  # no second normalisation, the coarse head
    assert bool((out.path == 0).any())  # the hard forward skips here, so the view below must not
    # the view runs the model in its gate mode: 'open' executes every block
    opened = LogitsView(model, gate_mode="open")
    full = model(x, mode="open")
    assert bool((full.path == 1).all()) and bool((full.macs == model.full_macs).all())
    assert torch.equal(opened(x), full.fine) and not torch.allclose(opened(x), out.fine)


def test_apgd_and_square(dsn_run):
    config = AttackConfig(attacks=["apgd", "square", "fgsm"], backends="both", eps=[1 / 255], target="coarse",
                          gate_grads="none,bpda", n=64, batch_size=64, steps=5,
                          params={"square": {"queries": 100}}, seed=0)
    df = run_attacks(dsn_run.root, config, force=True, progress=False).records
    evals = set(map(tuple, df[["attack", "backend", "gate_grad"]].drop_duplicates().to_numpy()))
    # apgd expands to both losses; square is torchattacks-only and gradient-free (no routing gradient to vary)
    assert evals == {(a, "torchattacks", g) for a in ("apgd-ce", "apgd-dlr") for g in ("none", "bpda")} | \
        {("square", "torchattacks", "none")} | {("fgsm", b, g) for b in ("torchattacks", "foolbox")
                                                for g in ("none", "bpda")}
    assert (df["linf"] <= df["eps"] + 1e-6).all()
    acc = robust_accuracy(df, ["attack", "gate_grad"])
    clean = df.drop_duplicates("sample")["clean_correct"].mean()
    assert acc[("apgd-ce", "none")] < clean and acc[("square", "none")] < clean
    # APGD keeps the best iterate, so it is at least as strong as one FGSM step (up to one sample)
    assert acc[("apgd-ce", "none")] <= acc[("fgsm", "none")] + 1 / 64


def test_l2_threat_model_on_both_backends(dsn_run):
    config = AttackConfig(attacks=["fgsm", "pgd", "cw"], backends="both", norm="l2", eps=[0.1, 0.3], target="coarse",
                          gate_grads="none", n=64, batch_size=64, steps=5,
                          params={"pgd": {"restarts": 1}, "cw": {"steps": 20, "initial_c": 10.0, "binary_steps": 2}},
                          seed=0)
    df = run_attacks(dsn_run.root, config, force=True, progress=False).records
    # CW (foolbox only) uses the main L2 budgets plus its unbounded row; the L2 PGD that checks it is the main one
    assert set(df["norm"]) == {"l2"} and set(df["eps"]) == {0.1, 0.3, math.inf}
    assert set(map(tuple, df[["attack", "backend"]].drop_duplicates().to_numpy())) == {
        (a, b) for a in ("fgsm", "pgd") for b in ("torchattacks", "foolbox")} | {("cw", "foolbox")}
    assert set(df.loc[df["attack"] != "cw", "eps"]) == {0.1, 0.3}
    assert (df["l2"] <= df["eps"] * (1 + 1e-5) + 1e-6).all()
    acc = robust_accuracy(df, ["attack", "backend", "eps"])
    for attack in ("fgsm", "pgd"):
        for eps in (0.1, 0.3):
            assert abs(acc[(attack, "torchattacks", eps)] - acc[(attack, "foolbox", eps)]) <= 0.1
        assert acc[(attack, "torchattacks", 0.3)] <= acc[(attack, "torchattacks", 0.1)] + 1 / 64
    # where the L2 fast gradient step fools, the example is the step, which uses the whole budget wherever the box
    # allows it; a sample the step at 0.1 already fools keeps that example at 0.3 (the first fooling candidate)
    fgsm = df[df["attack"] == "fgsm"].pivot_table(index=["backend", "sample"], columns="eps",
                                                  values=["success", "l2"])
    small, large = fgsm[("success", 0.1)].astype(bool), fgsm[("success", 0.3)].astype(bool)
    assert small.sum() > 5 and (large & ~small).sum() > 5 and not (small & ~large).any()
    assert (fgsm.loc[small, ("l2", 0.1)] > 0.09).mean() > 0.9
    assert (fgsm.loc[small, ("l2", 0.3)] == fgsm.loc[small, ("l2", 0.1)]).all()
    assert (fgsm.loc[large & ~small, ("l2", 0.3)] > 0.27).mean() > 0.9


@pytest.mark.parametrize("backend", ["native", "torchattacks", "foolbox"])
def test_pgd_restarts_keep_the_worst_case(tiny_batch, backend):
    model, x, y = tiny_batch
    target = Target(model, "coarse", "hard", "none")
    pgd = attack_class("pgd", backend)
    eps = [0.5 / 255]
    one = pgd("linf", steps=3, restarts=1)(target, x, y, eps, seed=5)[0]
    three = pgd("linf", steps=3, restarts=3)(target, x, y, eps, seed=5)[0]
    wrong_one = evaluate(model, one).coarse != y
    wrong_three = evaluate(model, three).coarse != y
    # the first restart is the single run (same seed): whatever it fooled stays fooled
    assert bool((wrong_three | ~wrong_one).all())
    assert int(wrong_three.sum()) >= int(wrong_one.sum())
    assert float((three - x).abs().max()) <= eps[0] + 1e-6


def test_suite_runs_the_library_attack_unchanged(tiny_batch):
    model, x, y = tiny_batch
    import torchattacks

    from robustness.bench.overhead import _PlainLogits, measure_overhead
    from robustness.core.runtime import seed_everything

    seed_everything(7)
    direct = torchattacks.PGD(_PlainLogits(model, "coarse"), eps=1 / 255, alpha=2.5 / 255 / 4, steps=4)(x, y)
    seed_everything(7)
    # perturb, not the attack object: the library's own last iterate, without the suite's best-candidate tracking
    ours = attack_class("pgd", "torchattacks")("linf", steps=4, restarts=1).perturb(Target(model, "coarse"), x, y,
                                                                                   [1 / 255], 7)
    assert torch.equal(direct, ours[0])  # the adapter adds nothing to what the library computes
    result = measure_overhead(model, x[:32], y[:32], eps=1 / 255, steps=2, repeats=1, head="coarse")
    assert result["seconds_direct"] > 0 and result["seconds_suite"] > 0
    assert result["ratio"] == pytest.approx(result["seconds_suite"] / result["seconds_direct"])
    assert all(p.requires_grad for p in model.parameters())  # restored after timing


def test_cw_works_on_negative_logits(tiny_batch):
    """CW must read the best other logit as the real maximum, also when every logit is negative.

    Under EOT the model outputs log-probabilities (all negative); torchattacks' CW took ``max((1 - onehot) * z)``,
    which is 0 there, and never saw a margin to push (why its CW was dropped). foolbox's CW must fool under EOT.
    """
    model, x, y = tiny_batch
    x, y = x[:32], y[:32]
    target = Target(model, "coarse", "hard", "eot", eot_samples=2)
    assert bool((target.view(observed=False)(x) < 0).all())  # the logits CW sees are all negative
    cw = attack_class("cw", "foolbox")("l2", initial_c=10.0, binary_steps=1, steps=20)
    correct = evaluate(model, x).coarse == y
    adv = cw(target, x, y, [1.0], seed=0)[0]
    fooled = (evaluate(model, adv).coarse != y) & correct
    assert int(fooled.sum()) >= max(1, int(correct.sum()) // 2)
    assert float((adv - x).flatten(1).norm(dim=1).max()) <= 1.0 + 1e-5
