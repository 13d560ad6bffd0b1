"""The native PGD's opt-in adaptive budget (``max_steps``, ``stall_tol``): off by default and then exactly the
fixed-step PGD; on, a run goes on past ``steps`` in windows of ``steps`` while the deployed margin still falls.

Toy models on two pixels whose decision and gradients are set by hand; gradient steps are counted by a hook on the
model's output (it fires once per backward pass, never on the no-grad forwards of the tracker).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from attacks.backends.native import project, start_point
from attacks.backends.native_bisect import BisectParams
from attacks.backends.native_pgd import DEFAULT_STALL_TOL, PGD, NativePGDParams
from robustness.core.norms import norm_for
from attacks.base import Target, attack_class
from attacks.runner import AttackConfig, plan_evaluations
from robustness.core.errors import ConfigError

EPS = 0.1


class _Counting(nn.Module):
    """Base of the toy models: ``backward`` counts the gradient steps taken through the model."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))  # a parameter, so that the model has a device
        self.backward = 0

    def _count(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.requires_grad:
            logits.register_hook(self._hook)
        return logits

    def _hook(self, grad: torch.Tensor) -> None:
        self.backward += 1


class _Valley(_Counting):
    """Two classes, label 0 robust at the clean image (both pixels 0.5); with ``s``, ``t`` the offsets of the two
    pixels in units of ``EPS``, the deployed margin is ``m = 2.19 - 2 s + t (s - 0.8)``: fooled only
    near the corner (s, t) = (1, -1). Sign steps first push both pixels up (towards (1, 1), where m = 0.2), then
    t has to walk back across the whole ball: at the default step 2.5 eps / steps that takes more than ``steps``."""

    def forward(self, x):
        s = (x[:, 0, 0, 0] - 0.5) / EPS
        t = (x[:, 0, 0, 1] - 0.5) / EPS
        m = 2.19 - 2 * s + t * (s - 0.8)
        return self._count(torch.stack([m * self.weight, torch.zeros_like(m)], 1))


class _Slope(_Counting):
    """Two classes, never fooled in the ball: margin ``5 - drop * s`` (``s`` as in :class:`_Valley`), so from the
    clean image the whole ball lowers the margin by ``drop`` at most, and nothing once ``s`` reached 1."""

    def __init__(self, drop: float = 1.0):
        super().__init__()
        self.drop = drop

    def forward(self, x):
        s = (x[:, 0, 0, 0] - 0.5) / EPS
        m = 5.0 - self.drop * s
        return self._count(torch.stack([m * self.weight, torch.zeros_like(m)], 1))


class _Constant(_Counting):
    """Logits that do not depend on the input (a zero input gradient): the margin never moves."""

    def forward(self, x):
        z = torch.tensor([3.0, 0.0]).expand(x.shape[0], 2) + 0 * x.flatten(1).sum(1, keepdim=True)
        return self._count(z * self.weight)


def _clean(n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((n, 1, 1, 2), 0.5), torch.zeros(n, dtype=torch.long)


def _fooled(model: nn.Module, adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(adv).argmax(1) != y


class _FixedStepPGD(PGD):
    """The native PGD's run as it was before ``max_steps`` (the reference the default must equal bit for bit)."""

    def _one_run(self, target, x, y, index, eps, alpha, loss_fn):
        tracker, k = target.tracker, target.tracker.budget_index(eps)
        xs, ys = x.index_select(0, index), y.index_select(0, index)
        adv = start_point(xs, eps, self.norm) if self.params.random_start else xs.clone()
        for _ in range(self.params.steps):
            adv = adv.detach().requires_grad_(True)
            logits = target.forward(adv).logits(target.head)
            target.offer(adv, logits if target.deployed_logits else None, index)
            grad, = torch.autograd.grad(loss_fn(logits, ys).sum(), adv, allow_unused=True)
            with torch.no_grad():
                step = torch.zeros_like(adv) if grad is None else norm_for(self.norm).ascent(grad)
                adv = project(adv + alpha * step, xs, eps, self.norm)
            alive = ~tracker.fooled(k).index_select(0, index)
            if not alive.all():
                index, xs, ys, adv = index[alive], xs[alive], ys[alive], adv[alive]
                if index.numel() == 0:
                    return
        target.offer(adv, None, index)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_without_max_steps_the_run_is_the_fixed_step_pgd_bit_for_bit(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10)).eval()
    x = torch.rand(32, 3, 4, 4)
    y = model(x).argmax(1).detach()
    eps = [0.02, 0.05] if norm == "linf" else [0.1, 0.3]
    target = Target(model, "fine")
    options = dict(steps=4, restarts=2)
    reference = _FixedStepPGD(norm, **options)(target, x, y, eps, seed=3)
    fooled = _fooled(model, reference[-1], y)
    assert 0 < int(fooled.sum()) < len(y)  # the drop-out of fooled samples is exercised, and some runs go to the end
    for pgd in (attack_class("pgd", "native")(norm, **options),
                attack_class("pgd", "native")(norm, max_steps=None, **options),
                attack_class("pgd", "native")(norm, max_steps=4, **options)):  # max_steps = steps: no window added
        ours = pgd(target, x, y, eps, seed=3)
        assert all(torch.equal(a, b) for a, b in zip(ours, reference))


def test_without_max_steps_every_run_takes_exactly_steps_steps():
    model = _Slope()
    x, y = _clean(3)
    steps, restarts, losses = 6, 2, ("ce", "margin")
    attack_class("pgd", "native")("linf", steps=steps, restarts=restarts, losses=losses)(Target(model, "fine"), x,
                                                                                          y, [EPS], seed=0)
    assert model.backward == steps * restarts * len(losses)


@pytest.mark.parametrize("deployed", [True, False])
def test_max_steps_fools_what_steps_alone_cannot(deployed, monkeypatch):
    if not deployed:  # the margin then comes from the no-grad deployed forward, not the attacker's logits
        monkeypatch.setattr(Target, "deployed_logits", property(lambda self: False))
    x, y = _clean()
    steps, max_steps = 4, 12
    options = dict(steps=steps, restarts=1, losses=["ce"], random_start=False)

    fixed = _Valley()
    adv = attack_class("pgd", "native")("linf", **options)(Target(fixed, "fine"), x, y, [EPS], seed=0)[0]
    assert not _fooled(fixed, adv, y).any() and fixed.backward == steps

    model = _Valley()
    adv = attack_class("pgd", "native")("linf", max_steps=max_steps, **options)(Target(model, "fine"), x, y, [EPS],
                                                                                seed=0)[0]
    assert _fooled(model, adv, y).all()
    assert float((adv - x).abs().max()) <= EPS + 1e-6
    # more than the base window, and the run ended when its last sample was fooled, before max_steps
    assert steps < model.backward < max_steps


class _Guarded(_Valley):
    """:class:`_Valley` on pixels 0 and 1 plus ``100 x`` on pixel 2: a sample whose pixel 2 is 1 is never fooled in
    the ball (the term stays >= 90), one whose pixel 2 is 0 is the valley's. Records the batch size of every
    forward that a gradient step goes through."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, x):
        z = super().forward(x)
        if z.requires_grad:
            self.sizes.append(x.shape[0])
        return z + torch.stack([100 * x[:, 0, 0, 2], torch.zeros_like(x[:, 0, 0, 2])], 1)


def test_a_fooled_sample_leaves_at_once_while_the_others_go_on():
    model = _Guarded()
    x = torch.full((2, 1, 1, 3), 0.5)
    x[:, 0, 0, 2] = torch.tensor([0.0, 1.0])
    y = torch.zeros(2, dtype=torch.long)
    steps, max_steps = 4, 40
    adv = attack_class("pgd", "native")("linf", steps=steps, max_steps=max_steps, restarts=1, losses=["ce"],
                                        random_start=False)(Target(model, "fine"), x, y, [EPS], seed=0)[0]
    assert _fooled(model, adv, y).tolist() == [True, False]
    # both samples while sample 0 is robust, after that sample 1 alone; past the base window, and stopped by the
    # stall of sample 1 (pinned at the ball's edge), not by max_steps
    sizes = model.sizes
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 2 and sizes[-1] == 1
    assert sizes.count(2) > steps and len(sizes) < max_steps


@pytest.mark.parametrize("model", [_Constant(), _Slope(drop=0.0)], ids=["constant", "flat"])
def test_a_run_whose_margin_does_not_move_stops_after_steps(model):
    x, y = _clean(2)
    steps = 5
    attack_class("pgd", "native")("linf", steps=steps, max_steps=50, restarts=1, losses=["margin"])(
        Target(model, "fine"), x, y, [EPS], seed=0)
    assert model.backward == steps  # the base window made no progress on the start point: no window is added


def test_a_run_stops_one_window_after_the_margin_stalls_and_stall_tol_sets_what_counts():
    x, y = _clean()
    steps, options = 5, dict(restarts=1, losses=["margin"], random_start=False)
    # the base window walks s from 0 to 1 (the margin falls by 1.0), the next one cannot move: 2 windows
    model = _Slope(drop=1.0)
    attack_class("pgd", "native")("linf", steps=steps, max_steps=50, stall_tol=0.5, **options)(
        Target(model, "fine"), x, y, [EPS], seed=0)
    assert model.backward == 2 * steps
    # a fall of 1.0 is less than the tolerance: the base window counts as stalled already
    model = _Slope(drop=1.0)
    attack_class("pgd", "native")("linf", steps=steps, max_steps=50, stall_tol=2.0, **options)(
        Target(model, "fine"), x, y, [EPS], seed=0)
    assert model.backward == steps


def test_max_steps_caps_a_run_that_keeps_improving():
    # alpha tiny: the margin falls a little at every step and never reaches the ball's edge within max_steps
    model = _Slope(drop=10.0)
    x, y = _clean()
    attack_class("pgd", "native")("linf", steps=4, max_steps=10, alpha=1e-4, restarts=1, losses=["margin"],
                                  random_start=False)(Target(model, "fine"), x, y, [EPS], seed=0)
    assert model.backward == 10  # windows of 4, the last one cut to 2


def test_bad_max_steps_or_stall_tol_is_one_line_config_error_naming_the_field():
    pgd = attack_class("pgd", "native")
    with pytest.raises(ConfigError, match=r"max_steps must be an integer >= steps \(20\).*got 10") as err:
        pgd("linf", steps=20, max_steps=10)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"stall_tol must be >= 0, got -0.1"):
        pgd("linf", max_steps=100, stall_tol=-0.1)
    with pytest.raises(ValueError, match="max_steps"):
        NativePGDParams(steps=50, max_steps=49)
    with pytest.raises(ConfigError, match=r"\[attack.pgd\].*max_steps must be an integer >= steps"):
        AttackConfig.from_table({"attacks": ["pgd"], "pgd": {"steps": 30, "max_steps": 20}})


def test_defaults_and_config_path():
    # a default PGD records no new values (stored runs of earlier versions resume); max_steps brings its tolerance
    assert {k: dataclasses.asdict(NativePGDParams())[k] for k in ("max_steps", "stall_tol")} == \
        {"max_steps": None, "stall_tol": None}
    assert NativePGDParams(max_steps=100).stall_tol == DEFAULT_STALL_TOL
    config = AttackConfig.from_table({"attacks": ["pgd", "pgd-bisect"], "backends": ["native"],
                                      "pgd": {"steps": 20, "max_steps": 100}})
    assert config.options_for("pgd") == {"steps": 20, "max_steps": 100}
    assert "max_steps" not in config.options_for("pgd-bisect")  # the bisection's probes keep the fixed budget
    planned = {p.name: p.attack.params for p in plan_evaluations(config, True)}
    assert (planned["pgd"].steps, planned["pgd"].max_steps, planned["pgd"].stall_tol) == (20, 100, DEFAULT_STALL_TOL)
    assert planned["pgd-bisect"].max_steps is None and isinstance(planned["pgd-bisect"], BisectParams)


def test_a_native_only_option_of_an_attack_left_out_does_not_refuse_another_backend(caplog):
    import logging

    from attacks.runner import AttackConfig
    from robustness.core.errors import ConfigError

    # the default config's [attack.pgd] max_steps is the native PGD's: `attack --attacks fgsm --backend
    # torchattacks` does not run pgd and must not be refused for it ...
    AttackConfig(attacks=["fgsm"], backends="torchattacks", params={"pgd": {"steps": 20, "max_steps": 100}})
    # ... and pgd itself in torchattacks, which cannot honour it, runs without it and says so ...
    from attacks.runner import config as config_module

    config_module._WARNED.clear()  # named once per process: another test may have seen it first
    with caplog.at_level(logging.WARNING):
        config = AttackConfig(attacks=["pgd"], backends="torchattacks",
                              params={"pgd": {"steps": 20, "max_steps": 100}})
    assert config.options_for("pgd") == {"steps": 20}
    assert "max_steps: an option of pgd's native backend only; pgd runs in torchattacks here" in caplog.text
    assert config.options_for("pgd", "native")["max_steps"] == 100
    # ... while a key no backend knows is refused either way
    with pytest.raises(ConfigError, match="stepz"):
        AttackConfig(attacks=["fgsm"], backends="torchattacks", params={"pgd": {"stepz": 3}})
