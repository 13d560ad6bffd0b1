"""pgd-refine: a short PGD bisection strictly below each sample's known adversarial distance (Target.upper_bound).

Every example it returns fools the deployed model, lies in [0, 1] and is strictly closer than the bound; on a linear
model (closed-form minimal distance) it lands within the bisection's precision above the true minimum and never
below it; samples without a bound (inf, None) or misclassified clean are neither attacked nor claimed."""
from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch

from attacks.base import MINIMAL, Target, attack_class, known_attacks
from attacks.checks import sample_norms
from models.network import ModelOutput
from robustness.core.errors import ConfigError
from robustness.core.runtime import seed_everything
from tests.test_distances import LinearNet, _linear_problem


def _refine(norm: str = "linf", **params):
    return attack_class("pgd-refine", "native")(norm, **{"steps": 20, "restarts": 1, **params})


def _exact(model, x, y, norm: str) -> torch.Tensor:
    """Closed-form minimal distance of each sample of the linear model to its nearest decision boundary
    (``gap / ||w_y - w_j||_1`` for linf, ``_2`` for l2; inside the box for these small margins)."""
    with torch.no_grad():
        z = model(x).fine
    w = model.weight
    gaps = z.gather(1, y[:, None]) - z
    dual = 1 if norm == "linf" else 2
    scale = (w[y][:, None, :] - w[None, :, :]).norm(p=dual, dim=-1)
    own = torch.arange(w.shape[0])[None, :] == y[:, None]
    return torch.where(own, torch.inf, gaps / scale).amin(1).double()


class _CountingLinear(LinearNet):
    """The linear model, noting the batch size of every forward the attacker differentiates through."""

    def __init__(self, weight, bias):
        super().__init__(weight, bias)
        self.grad_batches: list[int] = []

    def _run(self, x, state) -> ModelOutput:
        if torch.is_grad_enabled() and x.requires_grad:
            self.grad_batches.append(x.shape[0])
        return super()._run(x, state)


def _counting_problem(n: int = 12):
    model, x, y, _ = _linear_problem(n=n)
    counting = _CountingLinear(model.weight.detach().clone(), model.bias.detach().clone()).eval()
    return counting.requires_grad_(False), x, y


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_found_examples_fool_lie_in_the_box_and_are_strictly_below_the_bound(norm):
    # bounds as the runner makes them: the norms of a fixed-budget PGD's fooling examples at a large budget
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4)).eval().requires_grad_(False)
    target = Target(model)
    x = torch.rand(16, 1, 4, 4)
    y = target.logits(x).argmax(1)                              # all clean-correct
    eps = 0.5 if norm == "linf" else 3.0
    adv, = attack_class("pgd", "native")(norm, steps=10, restarts=1)(target, x, y, [eps], 0)
    fooled = target.logits(adv).argmax(1) != y
    assert fooled.sum() >= 12
    bound = torch.where(fooled, sample_norms(adv.double() - x.double(), norm), torch.tensor(math.inf))
    seed_everything(0)                                          # as Attack.__call__ does, for the comparison below
    best, found = _refine(norm, steps=10).minimize(dataclasses.replace(target, upper_bound=bound), x, y, seed=0)
    assert found.sum() >= fooled.sum() // 2                     # a probe at u/2 alone often fools
    assert not (found & ~fooled).any()
    dist = sample_norms(best.double() - x.double(), norm)
    assert (dist[found] < bound[found]).all()
    assert best.min() >= 0 and best.max() <= 1
    assert (target.logits(best[found]).argmax(1) != y[found]).all()
    assert torch.equal(best[~found], x[~found])
    # through Attack.__call__ (how the runner scores a minimal attack: at eps = inf, via within_budgets)
    row, = _refine(norm, steps=10)(dataclasses.replace(target, upper_bound=bound), x, y, [math.inf], 0)
    assert torch.equal(row, best)                               # same seed, same search


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_refined_distance_is_within_the_bisection_precision_of_the_true_minimum(norm):
    # a probe fools whenever its eps is at least the true minimum d only if PGD is exact there: L-inf sign steps
    # reach the optimal vertex of a linear model from anywhere; L2 steps do along one fixed direction, i.e. with
    # two classes and no random start (from a random start they only approach it, and the precision is PGD's)
    model, x, y, _ = _linear_problem(k=3 if norm == "linf" else 2)
    exact = _exact(model, x, y, norm)
    attack = _refine(norm) if norm == "linf" else _refine(norm, random_start=False)
    best, found = attack.minimize(Target(model, upper_bound=3 * exact), x, y, seed=0)
    assert found.all()
    dist = sample_norms(best.double() - x.double(), norm)
    assert (dist >= exact * (1 - 1e-4)).all()                   # never below the true minimum
    # u = 3 d: the probe at 1.5 d fools (hi <= 1.5 d), the one at hi / 2 <= 0.75 d cannot, so hi / lo <= 2 after
    # two probes, and each of the two geometric probes left takes its square root: hi <= 2 ** (1/4) lo < 1.19 d
    assert (dist <= exact * 2 ** 0.25 * (1 + 1e-4)).all()


def test_nothing_is_claimed_where_no_example_exists_below_the_bound():
    model, x, y, _ = _linear_problem()
    exact = _exact(model, x, y, "linf")
    best, found = _refine().minimize(Target(model, upper_bound=0.9 * exact), x, y, seed=0)
    assert not found.any() and torch.equal(best, x)


def test_unbounded_and_misclassified_samples_are_left_clean_and_not_attacked():
    model, x, y = _counting_problem(n=12)
    exact = _exact(model, x, y, "linf")
    y = y.clone()
    y[1] = (y[1] + 1) % 3                                       # misclassified clean, with a finite bound
    bound = 3 * exact
    bound[0] = math.inf                                         # no earlier attack fooled it
    bound[2] = 0.0                                              # nothing lies below a zero bound
    best, found = _refine().minimize(Target(model, upper_bound=bound), x, y, seed=0)
    assert found.tolist() == [False, False, False] + [True] * 9
    assert torch.equal(best[:3], x[:3])
    assert max(model.grad_batches) == 9                         # only the bounded, clean-correct samples
    # only one sample bounded: every PGD step is on that sample alone
    model.grad_batches.clear()
    only = torch.full_like(bound, math.inf)
    only[5] = bound[5]
    _, found = _refine().minimize(Target(model, upper_bound=only), x, y, seed=0)
    assert found.tolist() == [k == 5 for k in range(12)]
    assert model.grad_batches and set(model.grad_batches) == {1}


def test_without_bounds_nothing_is_attacked_or_found(caplog):
    model, x, y = _counting_problem(n=6)
    with caplog.at_level(logging.INFO):
        best, found = _refine().minimize(Target(model), x, y, seed=0)
        rows, = _refine()(Target(model), x, y, [math.inf], 0)
    assert not found.any() and torch.equal(best, x) and torch.equal(rows, x)
    assert model.grad_batches == []
    assert not [r for r in caplog.records if r.name.startswith("attacks")]
    _, found = _refine().minimize(Target(model, upper_bound=torch.full((6,), math.inf)), x, y, seed=0)
    assert not found.any() and model.grad_batches == []
    with pytest.raises(ValueError, match="upper_bound"):
        _refine().minimize(Target(model, upper_bound=torch.ones(5)), x, y, seed=0)


def test_registered_as_a_refining_minimal_attack_with_the_runs_pgd():
    from attacks.runner import AttackConfig
    assert "pgd-refine" in known_attacks()
    cls = attack_class("pgd-refine", "native")
    assert cls.refines is True and cls.kind == MINIMAL and cls.norms == ("linf", "l2")
    assert attack_class("pgd-bisect", "native").refines is False
    assert cls("linf").params.search_steps == 4 and cls("linf").params.restarts == 1
    config = AttackConfig(attacks=["pgd", "pgd-refine"], params={"pgd": {"steps": 7, "restarts": 2, "alpha": 0.01,
                                                                         "losses": ["margin"]}})
    options = config.options_for("pgd-refine")
    assert options == {"steps": 7, "restarts": 2, "losses": ["margin"]}  # alpha is per probe, not taken
    assert cls("linf", **options).params.steps == 7
    own = AttackConfig(attacks=["pgd-refine"], params={"pgd": {"steps": 7}, "pgd-refine": {"steps": 3,
                                                                                          "search_steps": 2}})
    assert own.options_for("pgd-refine") == {"steps": 3, "search_steps": 2}
    with pytest.raises(ConfigError):
        AttackConfig(attacks=["pgd-refine"], params={"pgd-refine": {"alpha": 0.01}})
    with pytest.raises(ConfigError):
        AttackConfig(attacks=["pgd-refine"], params={"pgd-refine": {"search_steps": 0}})
