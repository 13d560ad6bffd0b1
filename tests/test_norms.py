"""The threat models as objects (robustness/core/norms.py): a contract every registered norm keeps, and the texts
each one writes its budgets and distances in."""
from __future__ import annotations

import math

import pytest
import torch

from attacks.backends.native import project, start_point
from attacks.checks import budget_limit, check_budget, sample_norms
from robustness.core import vocab
from robustness.core.errors import ConfigError, UnknownNameError
from robustness.core.norms import LINF, L2_NORM, NORM_NAMES, norm_for, per_sample, title_of

NORMS = [norm_for(name) for name in NORM_NAMES]
EPS = {"linf": 8 / 255, "l2": 0.5}


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 3, 8, 8, generator=g)
    x[0] = 1.0  # an image at the top of the range: a projection that clipped would show here
    delta = torch.randn(16, 3, 8, 8, generator=g) * torch.logspace(-3, 0, 16).view(-1, 1, 1, 1)
    return x, delta


def test_every_norm_is_found_by_name_and_the_vocabulary_lists_them():
    assert vocab.NORMS == NORM_NAMES == ("linf", "l2")
    assert [n.name for n in NORMS] == list(NORM_NAMES) and norm_for("linf") is LINF and norm_for("l2") is L2_NORM


def test_an_unknown_norm_is_one_config_error_line_naming_the_known_ones():
    with pytest.raises(UnknownNameError) as err:
        norm_for("l3")
    assert isinstance(err.value, ConfigError)
    assert str(err.value) == "unknown norm 'l3'; choose one of: l2, linf"


@pytest.mark.parametrize("norm", NORMS, ids=NORM_NAMES)
@pytest.mark.parametrize("per_sample_eps", [False, True])
def test_projection_lands_in_the_ball_and_leaves_the_clipping_to_the_attack(norm, per_sample_eps):
    x, delta = _batch()
    eps = torch.linspace(0.0, 2 * EPS[norm.name], 16) if per_sample_eps else EPS[norm.name]
    limits = torch.tensor([norm.limit(float(e)) for e in (eps if per_sample_eps else [eps] * 16)],
                          dtype=torch.float64)
    inside = norm.project(delta, eps)
    assert (norm.distance(inside) <= limits).all()
    # a perturbation already inside the ball is left as it is
    small = delta * 1e-6
    torch.testing.assert_close(norm.project(small, EPS[norm.name]), small, rtol=0, atol=0)
    # projection is no clipping: x + delta may leave [0, 1]; the attack's project clips it after
    assert ((x + inside) > 1).any()
    clipped = project(x + delta, x, eps, norm.name)
    assert clipped.min() >= 0 and clipped.max() <= 1
    assert (norm.distance(clipped - x) <= limits).all()


@pytest.mark.parametrize("norm", NORMS, ids=NORM_NAMES)
def test_a_projected_point_passes_the_budget_check(norm):
    x, delta = _batch(1)
    adv = project(x + delta, x, EPS[norm.name], norm.name)
    linf, l2 = check_budget(x, adv, EPS[norm.name], norm.name)  # raises BudgetViolation otherwise
    assert torch.equal({"linf": linf, "l2": l2}[norm.name], sample_norms(adv.double() - x.double(), norm.name))
    assert budget_limit(EPS[norm.name], norm.name) == norm.limit(EPS[norm.name]) > EPS[norm.name]
    assert norm.limit(math.inf) == math.inf


@pytest.mark.parametrize("norm", NORMS, ids=NORM_NAMES)
def test_random_start_is_an_image_in_the_ball_and_moves(norm):
    x, _ = _batch(2)
    for eps in (EPS[norm.name], torch.full((16,), EPS[norm.name]).index_fill_(0, torch.tensor([3]), 0.0)):
        torch.manual_seed(0)
        start = start_point(x, eps, norm.name)
        assert start.min() >= 0 and start.max() <= 1
        d = norm.distance(start - x)
        assert (d <= norm.limit(EPS[norm.name])).all() and (d[4:] > 0).all()
        if torch.is_tensor(eps):
            assert torch.equal(start[3], x[3])  # a per-sample radius of 0 keeps that sample where it is
        torch.manual_seed(0)
        assert torch.equal(norm.random_start(x, eps), start)  # seeded: the same start


@pytest.mark.parametrize("norm", NORMS, ids=NORM_NAMES)
def test_ascent_is_the_steepest_unit_step(norm):
    _, grad = _batch(3)
    grad[5] = 0.0
    step = norm.ascent(grad)
    assert torch.isfinite(step).all() and (step[5] == 0).all()
    unit = norm.distance(step)
    torch.testing.assert_close(unit[torch.arange(16) != 5], torch.ones(15, dtype=torch.float64))
    # no other unit step gains more first-order increase: <step, g> is the dual norm of g
    gain = (step * grad).flatten(1).sum(1).double()
    dual = grad.flatten(1).abs().sum(1) if norm is LINF else grad.flatten(1).norm(dim=1)
    torch.testing.assert_close(gain, dual.double(), rtol=1e-5, atol=1e-6)
    other = norm.project(torch.randn_like(grad), 1.0)
    assert ((other * grad).flatten(1).sum(1).double() <= gain + 1e-5).all()


def test_distance_is_per_sample_float64_and_zero_for_an_empty_image():
    _, delta = _batch(4)
    assert LINF.distance(delta).dtype == torch.float64
    torch.testing.assert_close(LINF.distance(delta), delta.double().flatten(1).abs().amax(1))
    torch.testing.assert_close(L2_NORM.distance(delta), delta.double().flatten(1).norm(dim=1))
    assert torch.equal(L2_NORM.distance(torch.zeros(3, 0)), torch.zeros(3, dtype=torch.float64))


def test_per_sample_broadcasts_a_value_per_image():
    x = torch.zeros(4, 3, 2, 2)
    assert per_sample(torch.arange(4.0), x).shape == (4, 1, 1, 1)
    assert per_sample(torch.arange(4.0), torch.zeros(4, 7)).shape == (4, 1)
    assert per_sample(0.25, x) == 0.25


@pytest.mark.parametrize("eps, linf, l2", [
    (8 / 255, "8/255", "0.03137"), (0.47 / 255, "0.47/255", "0.001843"), (17.5 / 255, "17.5/255", "0.06863"),
    (13.25 / 255, "13.25/255", "0.05196"), (0.5, "127.5/255", "0.5"), (1.0, "1", "1"), (math.inf, "inf", "inf"),
    (0.0, "0", "0")])
def test_budgets_are_written_in_the_runs_units(eps, linf, l2):
    assert LINF.format_eps(eps) == vocab.format_eps(eps, "linf") == linf
    assert L2_NORM.format_eps(eps) == vocab.format_eps(eps, "l2") == l2


def test_without_a_norm_a_budget_is_no_guess_at_the_unit_and_an_unknown_norm_a_decimal():
    assert vocab.format_eps(8 / 255) == "8/255" and vocab.format_eps(1.25 / 255) == "1.25/255"
    assert vocab.format_eps(0.47 / 255) == "0.001843" and vocab.format_eps(20.25 / 255) == "0.07941"
    assert vocab.format_eps(8 / 255, "l7") == "0.03137" and vocab.format_distance(0.5, "l7") == "0.5"


@pytest.mark.parametrize("value, linf, l2", [
    (1.6 / 255, "1.6/255", "0.00627"), (20.75 / 255, "20.75/255", "0.0814"), (0.3 / 255, "0.3/255", "0.00118"),
    (math.inf, "inf", "inf"), (math.nan, "-", "-"), (2.0, "510/255", "2")])
def test_distances_are_written_in_the_runs_units(value, linf, l2):
    assert LINF.format_distance(value) == vocab.format_distance(value, "linf") == linf
    assert L2_NORM.format_distance(value) == vocab.format_distance(value, "l2") == l2


@pytest.mark.parametrize("norm", NORMS, ids=NORM_NAMES)
def test_a_rounded_budget_is_stable_and_close(norm):
    for value in (0.0013, 0.2 / 255, 3.3 / 255, 7.9 / 255, 0.123, 0.77):
        rounded = norm.round_budget(value)
        assert norm.round_budget(rounded) == rounded
        assert abs(rounded - value) <= max(0.05 * value, 0.125 / 255)
    assert LINF.round_budget(3.3 / 255) == 3.25 / 255 and L2_NORM.round_budget(0.123) == 0.12


@pytest.mark.parametrize("norm, eps, message", [
    ("linf", "8", "eps 8 is outside [0, 1]: images are in [0, 1] (did you mean 8/255?)"),
    ("linf", "inf", "eps inf is outside [0, 1]: images are in [0, 1] (did you mean inf/255?)"),
    ("l2", "inf", "eps must be finite")])
def test_a_budget_its_norm_refuses_is_one_config_error_line(norm, eps, message):
    from attacks.runner import AttackConfig
    with pytest.raises(ConfigError) as err:
        AttackConfig(attacks="pgd", norm=norm, eps=eps)
    assert str(err.value) == message


def test_a_budget_over_one_is_an_l2_budget_and_one_an_linf_budget():
    from attacks.runner import AttackConfig
    assert AttackConfig(attacks="pgd", norm="l2", eps="8").eps == [8.0]
    assert AttackConfig(attacks="pgd", norm="linf", eps="1").eps == [1.0]
    assert LINF.budget_problem(1.0) is None and L2_NORM.budget_problem(1e6) is None


def test_reports_name_a_norm_by_its_title_and_keep_an_unknown_word():
    from reports import tables
    from robustness.findings.compare_text import distance_what
    assert [title_of(n) for n in NORM_NAMES] == ["L∞", "L2"]
    assert [title_of(n, plain=True) for n in NORM_NAMES] == ["L-inf", "L2"]  # plain text: no ∞ in a terminal line
    assert title_of("l7") == title_of("l7", plain=True) == "l7"
    assert distance_what("linf", ["ste"]).startswith("minimal L-inf distance per sample")
    assert tables._eps_column("linf", 8 / 255) == "8/255" and tables._eps_column("l2", 0.5) == "L2 0.5"
    assert tables._eps_column("l7", 0.25) == "l7 0.25"


@pytest.mark.parametrize("eps", [8 / 255, 0.47 / 255, 0.5, 1.0, 3.0, math.inf, -math.inf, 0.0])
def test_a_table_cell_and_a_tick_write_a_budget_in_its_norms_units(eps):
    from reports import plots, tables
    for norm in (*NORM_NAMES, "l7"):
        expected = (vocab.format_eps(eps, "linf") if norm == "linf" or not math.isfinite(eps) or eps == 0
                    else f"{eps:.4g}")  # L-inf in 1/255; L2 and a word this version does not know as decimals
        assert tables.eps_text(norm, eps) == plots._eps_label(eps, norm) == expected
