"""Which adversarial example an attack returns (attacks.tracking), the native PGD, presets and minimal-norm plans.

Most tests use a toy model whose decision is one pixel, so that which candidate fools, by how much and where it lies
is set by hand; a plug-in attack then offers scripted candidates the way libraries (the model view) and the native
loops (``Target.offer`` with sample indices) do. The rest run on the tiny trained runs of conftest.py.
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from attacks import base
from attacks.backends.native import project, start_point
from attacks.base import ITERATIVE, Attack, Target, attack_class, register
from attacks.checks import check_budget
from attacks.params import step_size
from attacks.records import worst_case
from attacks.runner import AttackConfig, Batch, EvalPlan, Scorer, load_run_checkpoint, plan_evaluations, run_attacks
from attacks.runner.presets import PRESETS
from attacks.tracking import BestAdversarial, deployed_margin
from models.network import CoarseFineNet, ModelOutput
from robustness.app.commands.attack import config_from_args
from robustness.core.errors import ConfigError, UnknownNameError
from robustness.core.runtime import seed_everything
from attack_helpers import copy_run, load_test_images, robust_accuracy

# -- a toy model and a scripted plug-in attack ----------------------------------------------------------------------


class _Pixel(CoarseFineNet):
    """Two classes decided by pixel (0, 0, 0) alone: logits ``[0, 100 (p - 0.5)]``, so label 0 is predicted iff
    ``p < 0.5`` and its deployed margin is ``100 (0.5 - p)``."""

    def __init__(self):
        super().__init__((0.0,), (1.0,))
        self.unused = nn.Parameter(torch.zeros(1))

    def _run(self, x, state):
        z = 100.0 * (x[:, 0, 0, 0] - 0.5)
        logits = torch.stack([torch.zeros_like(z), z], 1) + 0 * self.unused
        return ModelOutput(fine=logits, coarse=logits, macs=torch.zeros(x.shape[0]))


def _images(*pixels: float, background: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B, 1, 2, 2] with the deciding pixel set per sample, all labelled 0."""
    x = torch.full((len(pixels), 1, 2, 2), background)
    return _at(x, *pixels), torch.zeros(len(pixels), dtype=torch.long)


def _at(x: torch.Tensor, *pixels: float) -> torch.Tensor:
    """A copy of ``x`` with the deciding pixel of each sample set to ``pixels``."""
    out = x.clone()
    out[:, 0, 0, 0] = torch.tensor(pixels)
    return out


def _pixels(x: torch.Tensor) -> list[float]:
    return [round(float(v), 4) for v in x[:, 0, 0, 0]]


class Scripted(Attack):
    """Test attack: ``run`` is whatever ``Scripted.script(target, x, y, eps)`` does (offers, then returns)."""

    name, backend, kind = "scripted", "native", ITERATIVE
    script = None

    def run(self, target, x, y, eps, seed):
        return type(self).script(target, x, y, eps)


@pytest.fixture
def scripted():
    register(Scripted)
    try:
        yield Scripted
    finally:
        base.unregister("scripted")
        Scripted.script = None


# -- the rule: the first fooling candidate, else the lowest margin, within the budget ---------------------------------


def test_a_later_iterate_that_unfools_does_not_win(scripted):
    x, y = _images(0.45, 0.45, 0.45)
    target = Target(_Pixel().eval(), "fine")

    def script(target, x, y, eps):
        view = target.view()
        # restart 1, through the model view (as a library calls it): sample 2 is fooled first here
        view(_at(x, 0.48, 0.48, 0.52))
        view(_at(x, 0.47, 0.49, 0.46))
        # restart 2, offered as the native loops do (the samples still attacked, with their indices): sample 0 is
        # fooled, then fooled by more; sample 2 is fooled by more too, but it was fooled before
        index = torch.tensor([0, 2])
        target.offer(_at(x, 0.53, 0.45, 0.56)[index], None, index)
        target.offer(_at(x, 0.58, 0.45, 0.59)[index], None, index)
        # ... and the run ends on an iterate that fools nobody
        return _at(x, 0.47, 0.46, 0.45)

    scripted.script = script
    attack = scripted("linf")
    clean, adv = attack(target, x, y, [0.0, 0.2], seed=0)  # every candidate lies in the budget
    assert torch.equal(clean, x)
    # per sample the first fooling candidate, else (sample 1) the one of lowest margin; never the last iterate
    assert _pixels(adv) == [0.53, 0.49, 0.52]
    # outside Attack.__call__ (perturb directly) nothing is tracked: the last iterate comes back
    assert _pixels(attack.perturb(target, x, y, [0.2], seed=0)[0]) == [0.47, 0.46, 0.45]


def test_candidates_outside_the_budget_or_the_box_are_never_kept(scripted):
    x, y = _images(0.47, 0.47, 0.47, background=0.98)
    target = Target(_Pixel().eval(), "fine")

    def script(target, x, y, eps):
        if eps == 0.05:
            view = target.view()
            view(_at(x, 0.62, 0.47, 0.47))  # sample 0 fooled at linf 0.15: outside 0.05, inside 0.2
            view(_at(x, 0.47, 0.51, 0.47))  # sample 1 fooled at linf 0.04: inside both
            box = _at(x, 0.47, 0.47, 0.51)
            box[2, 0, 1, 1] = 1.02  # sample 2 fooled within both budgets, but outside [0, 1]
            view(box)
            nan = _at(x, 0.47, 0.47, 0.51)
            nan[2, 0, 1, 0] = float("nan")
            view(nan)
            return _at(x, 0.48, 0.47, 0.49)  # fools nobody
        return x.clone()  # the larger budget's run finds nothing

    scripted.script = script
    small, large = scripted("linf")(target, x, y, [0.05, 0.2], seed=0)
    assert _pixels(small) == [0.48, 0.51, 0.49]
    # what the small budget's run found is kept at the larger budget (monotone), with the candidate outside the
    # small budget; the out-of-box and NaN candidates are never kept
    assert _pixels(large) == [0.62, 0.51, 0.49]
    for eps, adv in ((0.05, small), (0.2, large)):
        check_budget(x, adv, eps, "linf")
    wrong = [target.logits(adv).argmax(1) != y for adv in (small, large)]
    assert wrong[0].tolist() == [False, True, False] and wrong[1].tolist() == [True, True, False]


def test_clean_wrong_samples_never_count_robust(scripted):
    model = _Pixel().eval()
    x, y = _images(0.45, 0.55)  # sample 1 is misclassified clean
    scripted.script = lambda target, x, y, eps: _at(x, 0.45, 0.45)  # ... and pushed to the right class
    attack = scripted("linf")
    # deterministic gates: a misclassified sample is fooled from the start, the clean image stands
    hard = attack(Target(model, "fine", "hard"), x, y, [0.0, 0.2], seed=0)
    assert _pixels(hard[1]) == [0.45, 0.55]
    # random gates: nothing is decided up front, so the correctly classified input comes back ...
    advs = attack(Target(model, "fine", "random"), x, y, [0.0, 0.2], seed=0)
    assert _pixels(advs[1]) == [0.45, 0.45]
    # ... and the records still count sample 1 as not robust
    batch = Batch(0, np.arange(2), x, y, y)
    frame = Scorer(model, "toy", "toy", 0).score(EvalPlan(attack, [0.0, 0.2], "random", "none", "fine"), batch,
                                                 advs, unit_seed=0)
    at = frame[frame["eps"] == 0.2].set_index("sample")
    assert at["adv_correct"].tolist() == [True, True]
    assert at["robust"].tolist() == [True, False] and not at["success"].any()
    assert robust_accuracy(frame, ["eps"])[0.2] == 0.5
    assert worst_case(frame).set_index(["eps", "sample"]).sort_index()["robust"].tolist() == [True, False] * 2


def test_keep_first_false_keeps_the_lowest_margin_and_drops_nothing():
    model = _Pixel().eval()
    x, y = _images(0.45, 0.55)  # sample 1 is misclassified clean
    candidates = [_at(x, 0.52, 0.53), _at(x, 0.58, 0.60), _at(x, 0.54, 0.56), _at(x, 0.47, 0.45)]
    kept = {}
    for keep_first in (True, False):
        tracker = BestAdversarial(Target(model, "fine"), x, y, [0.15], "linf", keep_first=keep_first)
        for candidate in candidates:
            tracker.offer(candidate)
        kept[keep_first] = (_pixels(tracker.best(0)), tracker.fooled(0).tolist())
    # the first fooling candidate; the misclassified sample keeps its clean image and is never attacked
    assert kept[True] == ([0.52, 0.55], [True, True])
    # transfer crafting: the most confident misclassification (not the first, not the last), for the misclassified
    # sample too; nothing counts as done
    assert kept[False] == ([0.58, 0.6], [False, False])
    assert deployed_margin(model(_at(x, 0.58, 0.60)).fine, y).tolist() == pytest.approx([-8.0, -10.0])


def test_keep_first_false_runs_native_pgd_on_every_sample_to_the_end(tiny_runs, monkeypatch):
    model = load_run_checkpoint(tiny_runs["dsn"]).build_model("cpu")
    x, _, y = load_test_images(tiny_runs["dsn"], 32)
    correct = int((Target(model, "coarse").logits(x).argmax(1) == y).sum())
    pgd = attack_class("pgd", "native")("linf", steps=5, restarts=1, losses=["ce"])
    sizes: list[int] = []
    forward = Target.forward
    monkeypatch.setattr(Target, "forward", lambda self, adv: sizes.append(len(adv)) or forward(self, adv))
    out, margins = {}, {}
    for keep_first in (True, False):
        sizes.clear()
        target = Target(model, "coarse", keep_first=keep_first)
        out[keep_first] = adv = pgd(target, x, y, [2 / 255], seed=3)[0]
        margins[keep_first] = deployed_margin(target.logits(adv), y)
        check_budget(x, adv, 2 / 255, "linf")
        if keep_first:
            assert sizes[0] == correct > sizes[-1]  # misclassified samples never enter, fooled ones leave
        else:
            assert sizes == [32] * 5  # every sample, every step
    fooled = {k: m < 0 for k, m in margins.items()}
    assert 0 < int(fooled[True].sum()) < 32
    # the same single run (same seed): the lowest-margin iterate fools wherever the first fooling one exists, and
    # is at least as confident
    assert bool((fooled[False] | ~fooled[True]).all())
    assert float(margins[False].sum()) < float(margins[True].sum())


# -- the native PGD ------------------------------------------------------------------------------------------------


def _ce_last_iterate(target: Target, x, y, eps: float, steps: int, seed: int) -> torch.Tensor:
    """Plain PGD (Madry et al.): one cross-entropy run from a random start, its last iterate."""
    seed_everything(seed)
    alpha = step_size(None, eps, steps)
    adv = start_point(x, eps, "linf")
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        loss = F.cross_entropy(target.forward(adv).logits(target.head), y)
        grad, = torch.autograd.grad(loss, adv)
        adv = project(adv.detach() + alpha * grad.sign(), x, eps, "linf")
    return adv.detach()


def test_native_pgd_is_at_least_as_strong_as_one_ce_run(tiny_runs):
    model = load_run_checkpoint(tiny_runs["dsn"]).build_model("cpu")
    x, _, y = load_test_images(tiny_runs["dsn"], 32)
    target = Target(model, "coarse", "hard", "none")
    correct = target.logits(x).argmax(1) == y
    eps, steps, seed = 1 / 255, 5, 11
    plain = _ce_last_iterate(target, x, y, eps, steps, seed)
    ours = attack_class("pgd", "native")("linf", steps=steps, restarts=2)(target, x, y, [eps], seed)[0]
    check_budget(x, ours, eps, "linf", attack="pgd", backend="native")
    fooled_plain = int(((target.logits(plain).argmax(1) != y) & correct).sum())
    fooled_ours = int(((target.logits(ours).argmax(1) != y) & correct).sum())
    assert 0 < fooled_plain <= fooled_ours < int(correct.sum()), (fooled_plain, fooled_ours)


def test_robust_accuracy_is_monotone_per_sample_in_an_evaluation(tiny_runs, tmp_path):
    run = copy_run(tiny_runs["dsn"], tmp_path / "dsn")
    config = AttackConfig(attacks=["pgd", "fgsm"], eps=[0.0, 0.5 / 255, 1 / 255, 2 / 255], target="coarse",
                          gate_grads="none,sharp", n=32, batch_size=32, steps=3,
                          params={"pgd": {"restarts": 1}})
    result = run_attacks(run.root, config, progress=False)
    df = result.records
    assert set(map(tuple, df[["attack", "backend"]].drop_duplicates().to_numpy())) == {("pgd", "native"),
                                                                                       ("fgsm", "torchattacks")}
    for key, g in df.groupby(["attack", "gate_grad"], observed=True):
        robust = g.pivot_table(index="sample", columns="eps", values="robust").sort_index(axis=1).to_numpy(bool)
        assert not (robust[:, 1:] & ~robust[:, :-1]).any(), key
        assert robust[:, -1].sum() < robust[:, 0].sum(), key  # and the attack does something
    assert set(result.manifest["surrogate_fidelity"]) == {"hard/none", "hard/sharp"}
    assert len(result.manifest["sharp_temperature"]) == load_run_checkpoint(run).build_model("cpu").n_gates


# -- presets ---------------------------------------------------------------------------------------------------------


def test_presets_fill_the_table_and_the_table_wins():
    config = AttackConfig.from_table({"preset": "autoattack", "n": 8})
    assert config.attacks == ["autoattack"] and config.gate_grads == ["none", "sharp"]
    assert config.backends == ["torchattacks"] and config.n == 8 and config.preset == "autoattack"
    assert config.to_dict()["preset"] == "autoattack"  # the manifest says how the run was made
    assert [(p.name, p.backend, p.gate_grad) for p in plan_evaluations(config, gated=True)] == [
        ("autoattack", "torchattacks", "none"), ("autoattack", "torchattacks", "sharp")]
    assert AttackConfig.from_table({"preset": "autoattack", "gate_grads": ["none"]}).gate_grads == ["none"]
    full = AttackConfig.from_table({"preset": "full", "eps": [4 / 255]})
    assert full.attacks == PRESETS["full"]["attacks"] and full.eps == [4 / 255]
    # on the command line a flag overrides the preset
    args = dict(config=None, preset="autoattack", attacks=None, eps=None, norm=None, cw_eps=None, gate_modes=None,
                gate_grads="none", target=None, n=None, batch_size=None, device=None, seed=None, steps=None,
                restarts=None, eot_samples=None, backend=None, set=[])
    cli = config_from_args(argparse.Namespace(**args))
    assert cli.attacks == ["autoattack"] and cli.gate_grads == ["none"] and cli.preset == "autoattack"


def test_an_unknown_preset_is_a_one_line_error():
    for make in (lambda: AttackConfig.from_table({"preset": "robustbench"}),
                 lambda: AttackConfig(preset="robustbench")):
        with pytest.raises(UnknownNameError, match="unknown attack preset 'robustbench'; choose one of: "
                                                   "autoattack, full") as err:
            make()
        assert isinstance(err.value, ConfigError) and "\n" not in str(err.value)


# -- minimal-norm attacks: the unbounded row, the L2 PGD check, convergence -----------------------------------------


def test_a_minimal_attack_plan_has_eps_inf_and_the_l2_pgd_check():
    def planned(**kw) -> list[tuple[str, str, str, list[float]]]:
        config = AttackConfig(attacks=["ddn"], gate_grads="none", **kw)
        return [(p.name, p.backend, p.norm, p.eps) for p in plan_evaluations(config, gated=True)]

    assert planned(eps=[1 / 255], cw_eps=[0.25, 0.5]) == [("ddn", "foolbox", "l2", [0.25, 0.5, math.inf]),
                                                          ("pgd", "native", "l2", [0.25, 0.5])]
    assert planned(eps=[1 / 255], cw_eps=[0.25], minimal_check=False) == [("ddn", "foolbox", "l2", [0.25, math.inf])]
    # in the threat model's own norm a minimal attack is scored at eps = inf only (its robustness curve gives every
    # budget, independently of the fixed-eps attacks it is checked against), and pgd is not added twice
    assert planned(norm="l2", eps=[0.25]) == [("ddn", "foolbox", "l2", [math.inf])]
    config = AttackConfig(attacks=["pgd", "ddn"], norm="l2", eps=[0.25], gate_grads="none")
    assert [(p.name, p.norm) for p in plan_evaluations(config, gated=True)] == [("pgd", "l2"), ("ddn", "l2")]


def test_convergence_reports_a_weak_minimal_attack(tiny_runs, tmp_path):
    run = copy_run(tiny_runs["dsn"], tmp_path / "dsn")
    config = AttackConfig(attacks=["ddn"], eps=[1 / 255], cw_eps=[0.1, 0.25, 0.5], target="coarse",
                          gate_grads="none", n=32, batch_size=32, steps=5,
                          params={"ddn": {"steps": 1}, "pgd": {"restarts": 1}})
    result = run_attacks(run.root, config, progress=False)
    entry = next(e for e in result.manifest["evaluations"] if e["attack"] == "ddn")
    conv = entry["convergence"]
    df = result.records
    inf = df[(df["attack"] == "ddn") & np.isinf(df["eps"])]
    assert len(inf) == 32
    # the unbounded rows: found = clean-correct and fooled; their norms are the minimal ones
    found = inf["clean_correct"] & ~inf["adv_correct"]
    assert conv["clean_correct"] == int(inf["clean_correct"].sum()) > 0 and conv["found"] == int(found.sum())
    assert conv["share_found"] == pytest.approx(conv["found"] / conv["clean_correct"])
    # one DDN step finds far less than the L2 PGD at the same budgets: it stopped short, and has not converged
    pgd = robust_accuracy(df[df["attack"] == "pgd"], ["eps"])
    ddn = robust_accuracy(df[df["attack"] == "ddn"], ["eps"])
    short = {s["eps"]: s for s in conv["stopped_short"]}
    assert conv["checked_against_fixed_budget"] and short and not conv["converged"]
    for eps, s in short.items():
        assert s["fixed_budget_attack"] == "pgd" and s["robust"] > s["fixed_budget_robust"] + 1
        assert (s["robust"], s["fixed_budget_robust"]) == (round(ddn[eps] * 32), round(pgd[eps] * 32))


# -- AutoAttack ------------------------------------------------------------------------------------------------------


def test_autoattack_preset_runs_and_is_budget_checked(tiny_runs, tmp_path):
    run = copy_run(tiny_runs["dsn"], tmp_path / "dsn")
    eps = 16 / 255  # large: APGD-CE fools everything first, so the rest of the ensemble has nothing left to do
    config = AttackConfig.from_table({"preset": "autoattack", "eps": [0.0, eps], "n": 16, "batch_size": 16,
                                      "target": "coarse"})
    result = run_attacks(run.root, config, progress=False)
    df = result.records
    assert set(map(tuple, df[["attack", "backend", "gate_grad"]].drop_duplicates().to_numpy())) == {
        ("autoattack", "torchattacks", "none"), ("autoattack", "torchattacks", "sharp")}
    assert (df["linf"] <= df["eps"] + 1e-6).all()  # the runner's budget check let every example through
    at = df[df["eps"] == eps]
    assert at["clean_correct"].any() and not at["robust"].any()
    assert (at.loc[at["clean_correct"], "linf"] > 0).all()
    assert result.manifest["config"]["preset"] == "autoattack"
    assert set(result.manifest["surrogate_fidelity"]) == {"hard/none", "hard/sharp"}


@pytest.mark.parametrize("mode,grad", [("hard", g) for g in ("none", "ste", "bpda", "sharp", "eot")]
                         + [("open", "none"), ("soft", "none"), ("random", "none")])
def test_an_attack_trusts_its_own_logits_only_where_they_are_the_deployed_forward_bit_for_bit(mode, grad):
    # bpda and sharp return the hard network's logits exactly, so an iterate is judged without a second forward;
    # ste (masked execution) and eot (averaged draws) are not the deployed forward and must be re-evaluated.
    from attacks.adapters import gives_deployed_logits
    from test_models import mixed_gates_dsn
    model = mixed_gates_dsn()
    x = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    target = Target(model, "fine", mode, grad, eot_samples=2)
    expected = {"none": True, "bpda": True, "sharp": True, "ste": False, "eot": False}[grad] and mode != "random"
    assert target.deployed_logits is expected is gives_deployed_logits(model, mode, grad)
    if expected:
        torch.manual_seed(0)
        assert torch.equal(target.forward(x.clone().requires_grad_(True)).logits("fine"), target.logits(x))
