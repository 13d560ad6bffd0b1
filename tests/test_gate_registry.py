"""Gate functions are a registry: one function registered in a test module trains and evaluates a DSN."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

import models.gates as gates
from models.checkpoint import load_checkpoint
from models.gates import Decision, gate_function, list_gate_functions, register_gate_function
from models.registry import create_model
from models.training import TrainConfig, read_metrics, train
from robustness.app.commands import train as train_command
from robustness.core.errors import ConfigError, UnknownNameError

CALLS: list[float] = []


def halfway(score: torch.Tensor, slope: float) -> Decision:
    """A gate function no library file knows: a sigmoid at half the slope, straight-through."""
    CALLS.append(slope)
    soft = torch.sigmoid(0.5 * slope * score)
    hard = (soft > 0.5).float()
    return Decision(executed=hard > 0, value=hard + soft - soft.detach(), mask=True)


@pytest.fixture
def registered(monkeypatch):
    """``halfway`` registered for one test only."""
    monkeypatch.setattr(gates, "_GATE_FUNCTIONS", dict(gates._GATE_FUNCTIONS))
    register_gate_function("halfway", halfway)
    CALLS.clear()
    yield "halfway"


def test_builtins_are_registered():
    assert list_gate_functions() == ["gumbel", "hardsig", "ste"]
    assert gate_function("hardsig") is gates.hardsig
    with pytest.raises(UnknownNameError, match="unknown gate function 'magic'.*gumbel, hardsig, ste"):
        gate_function("magic")


def test_decorator_form_registers_and_returns_the_function(monkeypatch):
    monkeypatch.setattr(gates, "_GATE_FUNCTIONS", dict(gates._GATE_FUNCTIONS))

    @register_gate_function("always")
    def always(score: torch.Tensor, slope: float) -> Decision:
        ones = torch.ones_like(score)
        return Decision(executed=ones > 0, value=ones, mask=True)

    assert callable(always) and gate_function("always") is always
    assert "always" in list_gate_functions()


def test_a_registered_gate_function_trains_a_dsn_and_is_recorded(registered, tmp_path):
    config = TrainConfig.from_dict(dict(
        model="dsn", model_options={"depth_n": 2, "width": 4, "gate_fn": registered}, dataset="synthetic",
        data_options={"n": 96, "image_size": 16}, test_limit=32, epochs=1, batch_size=32, lr=0.05,
        warmup_epochs=0, ramp_epochs=1, slope_start=2.0, threads=1, seed=0))
    train(config, tmp_path / "run", progress=False)
    # its decision function ran in every training step (4 gates x 3 batches), with the scheduled slope
    assert len(CALLS) == 4 * 3 and {float(s) for s in CALLS} == {2.0}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model_options"]["gate_fn"] == registered
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt.model_config["gate_fn"] == registered
    # evaluation: the model rebuilt from the checkpoint runs with hard gates (no gate function needed)
    model = ckpt.build_model()
    CALLS.clear()
    with torch.no_grad():
        out = model(torch.rand(4, 3, 16, 16))
    assert CALLS == [] and out.path.shape == (4, 4)
    assert read_metrics(tmp_path / "run" / "metrics.csv")[0]["epoch"] == 1


def test_unregistered_gate_function_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown gate function 'halfway'"):
        TrainConfig.from_dict({"model_options": {"gate_fn": "halfway"}})
    with pytest.raises(UnknownNameError, match="gate function"):
        create_model("dsn", num_fine=4, num_coarse=2, gate_fn="halfway")


def test_an_unregistered_gate_function_is_gone_from_the_listing_and_the_models(registered):
    gates.unregister_gate_function(registered)
    assert registered not in list_gate_functions()
    with pytest.raises(UnknownNameError, match="gate function 'halfway'.*gumbel, hardsig, ste"):
        gates.unregister_gate_function(registered)
    with pytest.raises(UnknownNameError, match="gate function"):
        create_model("dsn", num_fine=4, num_coarse=2, gate_fn=registered)


def test_cli_gate_fn_choices_come_from_the_registry(registered):
    parser = argparse.ArgumentParser()
    train_command.register(parser.add_subparsers())
    args = parser.parse_args(["train", "--out", "x", "--gate-fn", registered])
    assert args.gate_fn == registered
