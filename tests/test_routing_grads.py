"""Routing gradients are a registry (models/routing.py): a contract every registered one keeps, and a plug-in
routing gradient, one file in a temporary folder, that reaches ``dsn-robust attack --help``, AttackConfig's
validation, the plan and a model's forward."""
from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch
from torch import nn

import models.routing as routing
from attacks.adapters import LogitsView, gives_deployed_logits
from attacks.runner import AttackConfig, plan_evaluations
from models.gates import GateState
from models.network import GatedOutput
from models.protocol import GatedNet, adapt
from models.registry import create_model
from models.routing import GRAD_MODES, ROUTING_GRADIENTS, routing_gradient
from models.surrogates import calibrate_temperature, surrogate_fidelity
from robustness.app import cli
from robustness.core.errors import ConfigError, UnknownNameError

BUILT_IN = ["none", "ste", "bpda", "eot", "sharp"]
PLUGIN = "halfsharp"
PLUGIN_SOURCE = '''
    """A routing gradient no library file knows: BPDA through sigmoid(2 s), a fixed temperature of 1/2."""
    import torch

    from models.routing import RoutingGradient, hard_values, register_routing_gradient


    @register_routing_gradient
    class HalfSharp(RoutingGradient):
        name = "halfsharp"
        summary = "BPDA through sigmoid(2 s)"
        exact_on_hard = True

        def forward(self, net, x, state):
            with torch.no_grad():
                hard = net._run(x, state.updated(gate_grad="none"))
            t = torch.full((net.n_gates,), 0.5, device=x.device)
            return hard_values(hard, net._run(x, state.updated(mode="sharpened", gate_grad="none", temperature=t)))
'''


def _dsn(seed: int = 0) -> nn.Module:
    """A small dsn whose gates are on for some samples and off for others (random gate weights, zero bias,
    BatchNorm statistics of one batch)."""
    torch.manual_seed(seed)
    model = create_model("dsn", num_fine=8, num_coarse=2, depth_n=3, width=4, image_size=16)
    for name, p in model.named_parameters():
        if name.endswith("fc2.weight"):
            p.data.normal_(0, 1.0)
        if name.endswith("fc2.bias"):
            p.data.zero_()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.momentum = 1.0
    with torch.no_grad(), model.gating(mode="open"):
        model.train()(torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return _dsn()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def check_contract(name: str, model: nn.Module, x: torch.Tensor) -> None:
    """What every registered routing gradient keeps on a gated model in ``hard`` mode."""
    entry = routing_gradient(name)
    assert entry.name == name and entry.summary and "\n" not in entry.summary
    deployed = model(x, mode="hard", gate_grad="none")
    assert 0 < float(deployed.path.mean()) < 1  # the gates do route: some samples skip, some run
    t = calibrate_temperature(model, x) if entry.needs_temperature else None
    model.zero_grad()
    xr = x.clone().requires_grad_(True)
    with model.gating(eot_samples=2):
        out = model(xr, mode="hard", gate_grad=name, temperature=t)
    # the executed routing and its cost are the deployed forward's, whatever the gradient
    assert torch.equal(out.path, deployed.path) and torch.equal(out.macs, deployed.macs)
    # exact on hard gates: the deployed logits bit for bit, so an attack may judge its iterate by them
    assert gives_deployed_logits(model, "hard", name) == entry.exact_on_hard
    if entry.exact_on_hard:
        assert torch.equal(out.fine.detach(), deployed.fine) and torch.equal(out.coarse.detach(), deployed.coarse)
    out.fine.logsumexp(1).sum().backward()
    assert torch.isfinite(xr.grad).all() and xr.grad.abs().sum() > 0
    gate_grad = sum(float(p.grad.abs().sum()) for n, p in model.named_parameters()
                    if ".gates." in n and p.grad is not None)
    # an adaptive routing gradient reaches the gates (through the routing); the naive one does not
    assert (gate_grad > 0) == entry.adaptive, (name, gate_grad)
    with model.gating(eot_samples=2):
        surrogate = entry.surrogate(model, x, t)
        fidelity = surrogate_fidelity(model, x, "fine", name, t)
    assert surrogate.fine.shape == deployed.fine.shape and torch.isfinite(surrogate.fine).all()
    assert 0.5 <= fidelity <= 1.0  # its prediction is mostly the deployed one's
    if entry.without_scores is not None:
        assert routing_gradient(entry.without_scores).without_scores is None  # a fallback does not fall back
    assert GateState(gate_grad=name).gate_grad == name


def test_the_built_ins_are_registered_in_their_seed_order():
    assert list(GRAD_MODES) == BUILT_IN and list(ROUTING_GRADIENTS) == BUILT_IN[1:]
    assert GRAD_MODES.index("sharp") == 4 and "eot" in GRAD_MODES and "magic" not in GRAD_MODES
    assert [routing_gradient(g).exact_on_hard for g in BUILT_IN] == [True, False, True, False, True]
    assert [g for g in BUILT_IN if routing_gradient(g).needs_temperature] == ["sharp"]


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_built_in_keeps_the_contract(name, model, x):
    check_contract(name, model, x)


def test_an_unknown_routing_gradient_is_one_config_error_line():
    for make in (lambda: routing_gradient("magic"), lambda: GateState(gate_grad="magic"),
                 lambda: AttackConfig(gate_grads="none,magic")):
        with pytest.raises(UnknownNameError) as err:
            make()
        assert isinstance(err.value, ConfigError) and "\n" not in str(err.value)
        assert "unknown gate gradient 'magic'" in str(err.value) and "sharp" in str(err.value)


def test_a_bad_name_cannot_be_registered():
    class Bad(routing.RoutingGradient):
        name = "a__b"
    with pytest.raises(ValueError, match="a__b"):
        routing.register_routing_gradient(Bad)
    assert "a__b" not in GRAD_MODES


class TwoSteps(nn.Module):
    """A model of the general gated protocol (``forward_gated``): it has no gate score to pass straight through."""

    gate_names = ["g1", "g2"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out = nn.Linear(3 * 16 * 16, 8), nn.Linear(8, 5)
        self.steps = nn.ModuleList([nn.Linear(8, 8) for _ in self.gate_names])
        self.scorers = nn.ModuleList([nn.Linear(8, 1) for _ in self.gate_names])

    def forward_gated(self, x, mode, path=None):
        h, bits = self.inp(x.flatten(1)), []
        for k, (step, scorer) in enumerate(zip(self.steps, self.scorers)):
            s = scorer(h).squeeze(1)
            g = {"soft": torch.sigmoid(s), "sample": torch.bernoulli(torch.sigmoid(s).detach()),
                 "frozen": path[:, k] if path is not None else None}.get(mode, (s > 0).float())
            h = h + g.unsqueeze(1) * torch.tanh(step(h))
            bits.append((g > 0.5).float())
        return GatedOutput(self.out(h), torch.stack(bits, 1))


def test_a_model_without_gate_scores_runs_the_fallback_of_ste(x):
    net = adapt(TwoSteps(), name="two").eval()
    assert isinstance(net, GatedNet)
    ste, bpda = net(x, mode="hard", gate_grad="ste"), net(x, mode="hard", gate_grad="bpda")
    assert routing_gradient("ste").without_scores == "bpda"
    assert torch.equal(ste.fine, bpda.fine) and torch.equal(ste.fine.detach(), net(x).fine)


# -- a plug-in routing gradient: one file, imported from a temporary folder ------------------------------------


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The plug-in module imported from ``tmp_path`` for one test; the registry and sys.modules restored after."""
    (tmp_path / "halfsharp_plugin.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert PLUGIN not in GRAD_MODES
    try:
        importlib.import_module("halfsharp_plugin")
        yield PLUGIN
    finally:
        if PLUGIN in GRAD_MODES:
            routing.unregister_routing_gradient(PLUGIN)
        sys.modules.pop("halfsharp_plugin", None)


def test_an_unregistered_routing_gradient_is_gone_and_unregistering_it_again_names_the_others(plugin):
    routing.unregister_routing_gradient(plugin)
    assert plugin not in GRAD_MODES and list(GRAD_MODES) == BUILT_IN
    with pytest.raises(UnknownNameError, match="unknown gate gradient 'halfsharp'; choose one of: bpda, eot, none, sharp, ste"):
        routing.unregister_routing_gradient(plugin)


def test_a_plugin_routing_gradient_is_in_the_attack_help(plugin, capsys):
    parser = cli.build_parser(["attack"])
    with pytest.raises(SystemExit):
        parser.parse_args(["attack", "--help"])
    squeezed = lambda text: "".join(text.split())  # noqa: E731  (argparse wraps lines, also after a hyphen)
    text = squeezed(capsys.readouterr().out)
    assert squeezed(f"{plugin} = BPDA through sigmoid(2 s)") in text
    assert all(squeezed(f"{g} = {routing_gradient(g).summary}") in text for g in BUILT_IN)


def test_a_plugin_routing_gradient_is_accepted_planned_and_run(plugin, model, x):
    config = AttackConfig(gate_grads=f"none,{plugin}", attacks="fgsm", eps="2/255", backends="native,torchattacks")
    assert config.gate_grads == ["none", plugin]
    plans = plan_evaluations(config, gated=True)
    assert {p.gate_grad for p in plans} == {"none", plugin} and any(f"__{plugin}__" in p.id for p in plans)
    assert list(GRAD_MODES) == [*BUILT_IN, plugin] and plugin in ROUTING_GRADIENTS  # appended: seeds stay put
    check_contract(plugin, model, x)
    # its gradient is its own (sigmoid(2 s)), not bpda's (sigmoid(s)) nor sharp's calibrated one
    grads = {}
    for g in ("bpda", plugin):
        xr = x.clone().requires_grad_(True)
        LogitsView(model, gate_grad=g)(xr).logsumexp(1).sum().backward()
        grads[g] = xr.grad
    assert not torch.allclose(grads["bpda"], grads[plugin])
