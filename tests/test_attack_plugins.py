"""The attack base as an extension point: kinds, per-attack Params and their config, a plug-in attack end to end."""
from __future__ import annotations

import argparse
import dataclasses
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from attacks import base
from attacks.base import (COMPUTE, GRADIENT_FREE, ITERATIVE, KINDS, MINIMAL, SINGLE_STEP, Attack, Target,
                          attack_class, attack_kind, attacks_of_kind, backends_for, counts_for_accuracy,
                          known_attacks, register)
from attacks.backends.foolbox import CWParams
from attacks.backends.native_pgd import NativePGDParams
from attacks.params import PGDParams
from attacks.records import read_records
from attacks.runner import RETIRED_OPTIONS, AttackConfig, plan_evaluations, run_attacks
from robustness.app.commands.attack import config_from_args
from reports.run_page import write_report
from robustness.core.errors import ConfigError, UnknownNameError
from robustness.results import load_run
from robustness.sanity import run_checks
from attack_helpers import copy_run

EPS = 2 / 255


# -- a plug-in attack, defined and registered here only --------------------------------------------------------


@dataclass(frozen=True)
class TwiceParams:
    steps: int = 2
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


class SignTwice(Attack):
    """Test attack: ``steps`` sign-of-gradient steps of ``scale * eps / steps``, clipped to the ball and [0, 1]."""

    name, backend, kind = "sign-twice", "native", ITERATIVE
    Params = TwiceParams
    calls: list[tuple[int, list[float]]] = []

    def perturb(self, target, x, y, eps, seed):
        SignTwice.calls.append((self.params.steps, list(eps)))
        return super().perturb(target, x, y, eps, seed)

    def run(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
        view = target.view()
        adv = x.clone()
        for _ in range(self.params.steps):
            adv.requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(view(adv), y)
            grad, = torch.autograd.grad(loss, adv)
            with torch.no_grad():
                step = adv + self.params.scale * eps / self.params.steps * grad.sign()
                adv = torch.min(torch.max(step, x - eps), x + eps).clamp(0, 1)
        return adv.detach()


@pytest.fixture
def sign_twice():
    register(SignTwice)
    SignTwice.calls.clear()
    try:
        yield SignTwice
    finally:
        base.unregister("sign-twice")
    assert "sign-twice" not in known_attacks()


def test_a_registered_test_attack_is_planned_run_recorded_and_counted(sign_twice, tiny_runs, tmp_path):
    assert attack_kind("sign-twice") == ITERATIVE and "sign-twice" in attacks_of_kind(ITERATIVE)
    config = AttackConfig(attacks=["sign-twice", "slowdown", "fgsm"], backends="torchattacks", eps=[0.0, EPS],
                          gate_grads=["none"], n=32, batch_size=32, steps=3, seed=0)
    plans = plan_evaluations(config, gated=False)
    assert [(p.name, p.backend) for p in plans] == [("sign-twice", "native"), ("slowdown", "native"),
                                                    ("fgsm", "torchattacks")]
    assert plans[0].attack.params == TwiceParams(steps=3)  # the general steps reaches an iterative plug-in
    run = copy_run(tiny_runs["resnet"], tmp_path / "resnet")
    result = run_attacks(run.root, config, progress=False)
    assert SignTwice.calls == [(3, [EPS])]  # eps 0 never reaches the attack: the clean image stands
    df = result.records
    mine = df[df["attack"] == "sign-twice"]
    assert len(mine) == 2 * 32 and set(mine["backend"]) == {"native"}
    fooled = mine[(mine["eps"] == EPS) & mine["success"]]
    assert len(fooled) > 0 and (mine["linf"] <= mine["eps"] + 1e-6).all()
    worst = read_records(run.worst_case)
    at = worst[worst["eps"] == EPS].set_index("sample")
    # a sample the plug-in fools is non-robust in the worst case; slowdown (compute) never decides it
    assert not at.loc[fooled["sample"], "adv_correct"].any()
    assert (at["robust"] == mine[mine["eps"] == EPS].set_index("sample")["robust"]).all()
    assert {e["attack"] for e in result.manifest["evaluations"]} == {"sign-twice", "slowdown", "fgsm"}
    entry = next(e for e in result.manifest["evaluations"] if e["attack"] == "sign-twice")
    assert entry["config"] == {"norm": "linf", "steps": 3, "scale": 1.0}

    # the sanity checks read its kind: with fgsm as the only other accuracy attack, the iterative-vs-single-step
    # check has an iterative attack to compare only because the plug-in declared itself iterative
    loaded = load_run(run.root)
    checks = {c.name: c for c in run_checks(loaded.records)}
    assert checks["iterative-vs-single-step"].status != "skip"
    # and the report shows it: a row of the summary, a line of the robust-accuracy figure's data, the worst case
    report = write_report(loaded)
    summary = pd.read_csv(report.out / "summary.csv")
    assert "sign-twice" in set(summary["attack"]) and "sign-twice" in (report.out / "index.html").read_text()
    pooled = report.worst_case.loc[report.worst_case["eps"] == EPS, "attacks"].iloc[0].split(",")
    assert "sign-twice" in pooled and "slowdown" not in pooled


def test_plug_in_params_come_from_its_subtable(sign_twice):
    config = AttackConfig.from_table({"attacks": ["sign-twice"], "backends": ["torchattacks"],
                                      "sign-twice": {"steps": 5, "scale": 0.5}})
    attack = plan_evaluations(config, gated=True)[0].attack
    assert attack.params == TwiceParams(steps=5, scale=0.5)
    with pytest.raises(ConfigError, match=r"sign-twice.*steps must be >= 1, got 0"):
        AttackConfig.from_table({"sign-twice": {"steps": 0}})


def test_register_refuses_a_class_without_a_kind():
    class NoKind(Attack):
        name, backend = "no-kind", "native"

    with pytest.raises(TypeError, match="kind must be one of"):
        register(NoKind)
    assert "no-kind" not in known_attacks()


# -- the kind API -----------------------------------------------------------------------------------------------


def test_kinds_of_the_built_in_attacks():
    assert KINDS == (SINGLE_STEP, ITERATIVE, GRADIENT_FREE, MINIMAL, COMPUTE)
    kinds = {name: attack_kind(name) for name in ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "autoattack", "path",
                                                  "square", "cw", "ddn", "slowdown")}
    assert kinds == {"fgsm": "single-step", "pgd": "iterative", "apgd-ce": "iterative", "apgd-dlr": "iterative",
                     "autoattack": "iterative", "path": "iterative", "square": "gradient-free", "cw": "minimal",
                     "ddn": "minimal", "slowdown": "compute"}
    assert counts_for_accuracy("slowdown") is False
    assert all(counts_for_accuracy(n) for n in ("fgsm", "pgd", "path", "cw", "ddn", "square", "apgd-ce",
                                                "autoattack"))
    assert counts_for_accuracy("not-an-attack") is True and attack_kind("not-an-attack") is None
    assert attacks_of_kind(COMPUTE) == ["slowdown"]
    assert attacks_of_kind(ITERATIVE) == ["apgd-ce", "apgd-dlr", "autoattack", "path", "pgd"]
    assert attacks_of_kind(MINIMAL, GRADIENT_FREE) == ["cw", "ddn", "fmn", "pgd-bisect", "pgd-refine", "square"]
    with pytest.raises(UnknownNameError):
        attacks_of_kind("sideways")
    # the minimal-norm attacks are foolbox's (torchattacks' fixed-c CW is gone); pgd has three backends, in the
    # order of preference, sharing its kind and PGDParams (the native one adds its losses)
    assert backends_for("cw") == backends_for("ddn") == ["foolbox"]
    assert backends_for("pgd") == ["native", "torchattacks", "foolbox"]
    for name in ("fgsm", "pgd"):
        classes = [attack_class(name, b) for b in backends_for(name)]
        assert len({c.kind for c in classes}) == 1 and all(issubclass(c.Params, PGDParams if name == "pgd" else
                                                                      classes[0].Params) for c in classes)
    assert attack_class("pgd", "native").Params is NativePGDParams


def test_the_sweep_hands_positive_budgets_over_in_one_call():
    seen = []

    class Recorder(Attack):
        name, backend, kind = "recorder", "native", COMPUTE

        def perturb(self, target, x, y, eps, seed):
            seen.append(list(eps))
            return [x + 0.5 * e for e in eps]

    x = torch.zeros(2, 1, 2, 2)
    # a compute attack: the sweep is the same for every kind, and this one needs no model (fixed-budget kinds are
    # tracked against the deployed forward, see test_tracking.py)
    out = Recorder()(None, x, torch.zeros(2, dtype=torch.long), [0.0, 0.1, 0.0, 0.2], seed=1)
    assert seen == [[0.1, 0.2]]
    assert [float(o.max()) for o in out] == pytest.approx([0.0, 0.05, 0.0, 0.1])
    assert out[0] is not x and torch.equal(out[0], x)

    class Short(Recorder):
        def perturb(self, target, x, y, eps, seed):
            return []

    with pytest.raises(RuntimeError, match="returned 0 batches for 1 budgets"):
        Short()(None, x, torch.zeros(2, dtype=torch.long), [0.1], seed=1)


# -- per-attack parameters in the config --------------------------------------------------------------------------


def _pgd(config: AttackConfig, backend: str = "native"):
    return next(p.attack for p in plan_evaluations(config, gated=True) if p.name == "pgd" and p.backend == backend)


def test_subtables_set_pgd_params_and_a_general_steps_reaches_every_iterative_attack():
    table = AttackConfig.from_table({"attacks": ["pgd", "path"], "steps": 7, "cross_check": True,
                                     "pgd": {"restarts": 5, "alpha": 0.01, "random_start": False}})
    want = PGDParams(steps=7, alpha=0.01, random_start=False, restarts=5)
    for backend in ("torchattacks", "foolbox"):
        assert _pgd(table, backend).params == want
    assert _pgd(table).params == NativePGDParams(**dataclasses.asdict(want))
    # pgd's subtable is pgd's own: path keeps its own alpha and random start, and takes the general steps
    path = next(p.attack for p in plan_evaluations(table, True) if p.name == "path").params
    assert (path.alpha, path.random_start, path.steps) == (None, True, 7)
    own = AttackConfig.from_table({"steps": 4, "pgd": {"steps": 9}})
    assert own.options_for("pgd")["steps"] == 9 and own.options_for("apgd-ce")["steps"] == 4


@pytest.mark.parametrize("option", sorted(RETIRED_OPTIONS))
def test_a_retired_flat_option_is_one_line_naming_the_spelling_that_replaced_it(option):
    (attack, param), *_ = RETIRED_OPTIONS[option]
    value = 0.5 if option in ("cw_c", "cw_lr", "cw_kappa", "square_p_init", "path_lambda", "pgd_alpha",
                              "slowdown_label_weight") else False if option == "pgd_random_start" else 3
    shown = "false" if value is False else repr(value)
    with pytest.raises(ConfigError) as err:
        AttackConfig.from_table({option: value}, where="[attack] in my.toml")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"[attack] in my.toml: {option} is no longer an option")
    assert f"[attack.{attack}] {param} = {shown}" in message and f"--set {attack}.{param}={shown}" in message
    # the spelling named is a real parameter: it is accepted and sets exactly that value
    config = AttackConfig.from_table({attack: {param: value}})
    members = {"apgd": ["apgd-ce", "apgd-dlr"]}.get(attack, [attack])
    assert all(config.options_for(m)[param] == value for m in members)
    with pytest.raises(TypeError):  # nor is it a constructor keyword any more
        AttackConfig(**{option: value})


def test_backends_are_an_ordered_preference():
    def chosen(**kw) -> list[tuple[str, str]]:
        config = AttackConfig(attacks=["pgd", "fgsm", "cw", "path"], gate_grads="none", **kw)
        return [(p.name, p.backend) for p in plan_evaluations(config, gated=True) if p.norm == "linf" or
                p.name != "pgd"]

    # each attack in the first listed backend that has it; the suite's own attacks even when native is not listed
    assert chosen() == [("pgd", "native"), ("fgsm", "torchattacks"), ("cw", "foolbox"), ("path", "native")]
    assert chosen(backends="foolbox,torchattacks") == [("pgd", "foolbox"), ("fgsm", "foolbox"), ("cw", "foolbox"),
                                                       ("path", "native")]
    assert chosen(backends="torchattacks") == [("pgd", "torchattacks"), ("fgsm", "torchattacks"), ("path", "native")]
    # cross_check (or "both", the two libraries) runs an attack in every listed backend that has it
    both = AttackConfig(backends="both")
    assert both.cross_check and both.backends == ["torchattacks", "foolbox"]
    assert chosen(backends="both") == [("pgd", "torchattacks"), ("pgd", "foolbox"), ("fgsm", "torchattacks"),
                                       ("fgsm", "foolbox"), ("cw", "foolbox"), ("path", "native")]
    assert chosen(cross_check=True)[:3] == [("pgd", "native"), ("pgd", "torchattacks"), ("pgd", "foolbox")]


def test_native_pgd_losses_are_a_pgd_parameter():
    # the native PGD's own parameter, set where pgd runs natively (the default), from a subtable or --set
    config = AttackConfig.from_table({"attacks": ["pgd"], "pgd": {"losses": ["ce"], "restarts": 2}})
    assert _pgd(config).params == NativePGDParams(losses=("ce",), restarts=2)
    flags = _args(attacks="pgd", eps="4/255", set=['pgd.losses=["margin"]'])
    assert _pgd(config_from_args(flags)).params.losses == ("margin",)
    with pytest.raises(ConfigError, match="losses must be some of ce, margin"):
        AttackConfig.from_table({"attacks": ["pgd"], "pgd": {"losses": ["hinge"]}})


def test_per_attack_subtables_reach_their_attacks_and_steps_is_general():
    c = AttackConfig(steps=6, params={"cw": {"initial_c": 1.0, "steps": 30, "binary_steps": 3, "lr": 0.05,
                                             "kappa": 1}, "apgd": {"restarts": 2},
                                      "square": {"queries": 100, "p_init": 0.5}, "path": {"lam": 2},
                                      "slowdown": {"steps": 4, "label_weight": 0.5}})
    assert c.options_for("cw") == {"initial_c": 1.0, "steps": 30, "binary_steps": 3, "lr": 0.05, "kappa": 1}
    assert c.options_for("apgd-ce") == c.options_for("apgd-dlr") == {"steps": 6, "restarts": 2}
    assert c.options_for("square") == {"queries": 100, "p_init": 0.5}
    assert c.options_for("path") == {"steps": 6, "lam": 2}
    assert c.options_for("slowdown") == {"steps": 4, "label_weight": 0.5}
    assert AttackConfig(params={"apgd": {"steps": 3}}).options_for("apgd-ce") == {"steps": 3}
    assert c.options_for("fgsm") == {}
    # without a general steps every attack keeps its own default
    defaults = AttackConfig()
    assert defaults.steps is None
    assert [defaults.options_for(n).get("steps") for n in ("pgd", "apgd-ce", "path", "slowdown", "cw")] == [None] * 5
    planned = {p.name: p.attack.params for p in plan_evaluations(AttackConfig(attacks=["pgd", "apgd-ce"]), True)}
    assert (planned["pgd"].steps, planned["pgd"].restarts, planned["apgd-ce"].steps) == (50, 5, 100)
    cw = attack_class("cw", "foolbox")("l2", **c.options_for("cw"))
    assert cw.params == CWParams(initial_c=1.0, binary_steps=3, steps=30, lr=0.05, kappa=1.0)
    assert cw.config() == {"norm": "l2", "initial_c": 1.0, "binary_steps": 3, "steps": 30, "lr": 0.05, "kappa": 1.0}
    # dataclasses.replace (what the pipeline and the CLI flags use) keeps the parameters
    again = dataclasses.replace(c, attacks=["pgd"], params={**c.params, "pgd": {"restarts": 4}})
    assert again.options_for("cw") == c.options_for("cw") and again.options_for("pgd")["restarts"] == 4


def test_unknown_or_bad_per_attack_keys_are_one_line_config_errors():
    with pytest.raises(ConfigError, match=r"\[attack.pgd\].*unknown option\(s\) restart; valid: alpha, "
                                          r"(losses, )?(max_steps, )?random_start, restarts, (stall_tol, )?steps") as err:
        AttackConfig.from_table({"pgd": {"restart": 5}})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="restarts must be an int"):
        AttackConfig.from_table({"pgd": {"restarts": "five"}})
    with pytest.raises(ConfigError, match="restarts must be a positive integer, got 0"):
        AttackConfig(params={"pgd": {"restarts": 0}})
    with pytest.raises(ConfigError, match="initial_c must be positive, got 0.0"):
        AttackConfig(params={"cw": {"initial_c": 0.0}})
    with pytest.raises(UnknownNameError, match="'pgdd'"):
        AttackConfig.from_table({"pgdd": {"steps": 5}})
    with pytest.raises(ConfigError, match=r"attack 'pgd' \(torchattacks\): unknown option\(s\) foo; valid:"):
        attack_class("pgd", "torchattacks")("linf", foo=1)


def _args(**kw) -> argparse.Namespace:
    values = dict(config=None, preset=None, attacks=None, eps=None, norm=None, cw_eps=None, gate_modes=None,
                  gate_grads=None, target=None, n=None, batch_size=None, device=None, seed=None, steps=None,
                  restarts=None, eot_samples=None, backend=None, set=[])
    values.update(kw)
    return argparse.Namespace(**values)


def test_cli_set_flag_and_config_subtables(tmp_path):
    cfg = tmp_path / "attack.toml"
    cfg.write_text(textwrap.dedent("""
        [attack]
        attacks = ["pgd", "apgd"]

        [attack.cw]
        steps = 30

        [attack.pgd]
        restarts = 5
        alpha = 0.01
    """))
    config = config_from_args(_args(config=str(cfg), set=["pgd.steps=20", "apgd.rho=0.5", "cw.initial_c=0.5"]))
    assert config.options_for("pgd") == {"steps": 20, "restarts": 5, "alpha": 0.01}
    assert config.options_for("apgd-dlr") == {"rho": 0.5}
    assert config.options_for("cw") == {"steps": 30, "initial_c": 0.5}
    # --restarts writes pgd's own parameter, over the config's subtable
    assert config_from_args(_args(config=str(cfg), restarts=2)).options_for("pgd")["restarts"] == 2
    for bad, message in ((["pgd.restarts"], "write ATTACK.KEY=VALUE"), (["pgd.restart=2"], "unknown option"),
                         (["pgdd.steps=2"], "unknown attack")):
        with pytest.raises(ConfigError, match=message):
            config_from_args(_args(set=bad))
    with pytest.raises(ConfigError, match="--set pgd.restarts and --restarts both set pgd's restarts"):
        config_from_args(_args(set=["pgd.restarts=3"], restarts=2))


def test_a_registered_plug_in_appears_in_the_attack_commands_help_with_its_default_steps(sign_twice):
    from robustness.app import cli

    parser = cli.build_parser(["attack"])
    attack = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["attack"]
    text = " ".join(re.sub(r"-\n\s+", "-", attack.format_help()).split())  # argparse wraps at hyphens
    attacks = text.split("--attacks ATTACKS comma list of")[1].split("--preset {")[0]
    steps = text.split("--steps STEPS iterations")[1].split("--restarts N")[0]
    assert "sign-twice" in attacks and "sign-twice 2" in steps  # from its Params, not a copy
    for name in known_attacks():
        assert name in attacks, name


# -- backends are discovered: every module of attacks.backends, none listed by hand --------------------------------

DISCOVERED_BACKEND = '''
"""A backend module dropped into the package: one attack of a library of its own."""
from attacks.base import SINGLE_STEP, Attack, register
from attacks.params import NoParams


@register
class Nudge(Attack):
    name, backend, kind = "tmp-nudge", "tmplib", SINGLE_STEP
    Params = NoParams

    def run(self, target, x, y, eps, seed):
        return (x + eps).clamp(0, 1)
'''


@pytest.fixture
def dropped_backends(tmp_path, monkeypatch, caplog):
    """Two modules in a folder added to the backends package's path: one that registers an attack, one whose
    library is missing; the registry, the package and sys.modules are restored afterwards."""
    import sys

    import attacks.backends as package

    (tmp_path / "tmp_nudge.py").write_text(DISCOVERED_BACKEND)
    (tmp_path / "tmp_missing.py").write_text("import a_library_that_is_not_installed  # noqa: F401\n")
    (tmp_path / "_tmp_private.py").write_text("raise RuntimeError('a private helper is never imported')\n")
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    try:
        yield
    finally:
        base.unregister("tmp-nudge")
        base._UNAVAILABLE.pop("attacks.backends.tmp_missing", None)
        for module in ("attacks.backends.tmp_nudge", "attacks.backends.tmp_missing"):
            sys.modules.pop(module, None)


def test_backend_modules_are_discovered_from_the_package(dropped_backends, caplog):
    import attacks.backends as package

    modules = base.backend_modules()
    # every module file of the package, found on its path (the built-ins among them), private ones left out
    assert {f"attacks.backends.{p.stem}" for path in package.__path__ for p in Path(path).glob("*.py")
            if not p.stem.startswith("_")} == set(modules)
    with caplog.at_level("WARNING", logger="attacks.base"):
        names = known_attacks()
    # the dropped module's attack is registered, in its own backend; the built-ins are still all there
    assert "tmp-nudge" in names and backends_for("tmp-nudge") == ["tmplib"]
    assert {"fgsm", "pgd", "cw", "path"} <= set(names)
    assert "tmplib" in base.known_backends() and base.known_backends()[:3] == list(base.BACKENDS)
    # a module whose library is missing disables itself only, reported once with the import error
    assert "a_library_that_is_not_installed" in base.unavailable_backends()["attacks.backends.tmp_missing"]
    warned = [r.getMessage() for r in caplog.records if "tmp_missing" in r.getMessage()]
    assert len(warned) == 1 and "unavailable" in warned[0]
    known_attacks()
    assert len([r for r in caplog.records if "tmp_missing" in r.getMessage()]) == 1
    # the attack runs where it is asked for, and attack --help names it and its backend
    plans = plan_evaluations(AttackConfig(attacks=["tmp-nudge", "fgsm"], backends="tmplib,torchattacks",
                                          eps=[EPS], gate_grads="none"), gated=False)
    assert [(p.name, p.backend) for p in plans] == [("tmp-nudge", "tmplib"), ("fgsm", "torchattacks")]
    from robustness.app import cli

    parser = cli.build_parser(["attack"])
    attack = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["attack"]
    text = " ".join(re.sub(r"-\n\s+", "-", attack.format_help()).split())
    assert "tmp-nudge" in text.split("--attacks ATTACKS comma list of")[1].split("--preset {")[0]
    assert "tmplib" in text.split("--backend BACKEND comma list")[1].split("--gate-mode")[0]
