"""Routing gradient ``sharp`` and the surrogates attackers differentiate: hard values, fixed surrogate, fidelity."""
from __future__ import annotations

import pytest
import torch

from models.checkpoint import load_checkpoint
from models.gates import GateState
from models.surrogates import (calibrate_temperature, gradient_cosine, input_gradient, surrogate_fidelity,
                               surrogate_logits)
from robustness.core.errors import ConfigError
from robustness.data import load_dataset
from conftest import TINY_DATA
from test_models import OPTS, mixed_gates_dsn


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def labels(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, OPTS["num_fine"], (n,), generator=torch.Generator().manual_seed(seed))


def gate_modules(model) -> list[torch.nn.Module]:
    """The gates in path order (coarse branch, then fine; stage by stage)."""
    return [g for branch in (model.coarse, model.fine) for stage in branch.gates for g in stage]


@pytest.fixture(scope="module")
def tiny_test_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, fine, coarse = load_dataset("synthetic", "test", n=400, **TINY_DATA).batch(slice(0, 64))
    return x, fine, coarse


def load_tiny(tiny_runs, name: str):
    return load_checkpoint(tiny_runs[name].best_checkpoint).build_model(torch.device("cpu")).eval()


@pytest.mark.parametrize("grad", ["bpda", "sharp"])
def test_routed_forward_values_are_the_hard_network_exactly(grad):
    model, x = mixed_gates_dsn(), images(32, 1)
    hard = model(x, mode="hard")
    for temperature in (None, calibrate_temperature(model, images(32, 2))):
        routed = model(x.clone().requires_grad_(True), mode="hard", gate_grad=grad, temperature=temperature)
        assert torch.equal(routed.fine, hard.fine) and torch.equal(routed.coarse, hard.coarse)
        assert torch.equal(routed.path, hard.path) and torch.equal(routed.macs, hard.macs)
        assert routed.fine.requires_grad


def test_soft_mode_ignores_the_temperature_and_sharpened_values_are_near_binary():
    model, x = mixed_gates_dsn(), images(32, 1)
    t = calibrate_temperature(model, x)
    assert t.shape == (model.n_gates,) and bool((t > 0).all())
    with model.gating(temperature=t):
        soft = model(x, mode="soft")
    torch.testing.assert_close(soft.path_scores.sigmoid(), torch.cat(list(soft.values.values()), 1))
    sharp = model(x, mode="sharpened", temperature=t)
    near = lambda v: ((v < 0.05) | (v > 0.95)).float().mean()  # noqa: E731
    assert near(torch.cat(list(sharp.values.values()), 1)) > near(torch.cat(list(soft.values.values()), 1))


def test_sharp_input_gradient_is_nonzero_and_differs_from_bpda_and_none():
    model, x, y = mixed_gates_dsn(), images(16, 1), labels(16, 1)
    t = calibrate_temperature(model, x)
    sharp = input_gradient(model, x, y, "fine", "sharp", t)
    assert bool((sharp.flatten(1).abs().sum(1) > 0).all())
    for other in ("bpda", "none"):
        assert not torch.allclose(sharp, input_gradient(model, x, y, "fine", other), rtol=1e-3, atol=1e-6)
    cos = gradient_cosine(model, x, y, "fine", "sharp", "sharp", t)
    torch.testing.assert_close(cos, torch.ones(16))


def test_fixed_temperature_makes_each_samples_gradient_independent_of_its_batch():
    model, x = mixed_gates_dsn(), images(8, 1)
    others = images(8, 7) * 0.3  # dimmer images: other gate scores, another batch median
    batch_a, batch_b = x, torch.cat([x[:1], others[1:]])
    y = labels(8, 1)
    t = calibrate_temperature(model, images(32, 2))

    def first_sample_grad(batch: torch.Tensor, temperature) -> torch.Tensor:
        xr = batch.clone().requires_grad_(True)
        with model.gating(gate_grad="sharp", temperature=temperature):
            loss = torch.nn.functional.cross_entropy(model(xr).fine, y, reduction="sum")
        return torch.autograd.grad(loss, xr)[0][0]

    torch.testing.assert_close(first_sample_grad(batch_a, t), first_sample_grad(batch_b, t), rtol=1e-4, atol=1e-6)
    # the per-batch fallback is not one fixed function: the same sample's gradient moves with its batch
    assert not torch.allclose(first_sample_grad(batch_a, None), first_sample_grad(batch_b, None), rtol=1e-3)


def test_fidelity_is_one_where_the_surrogate_is_the_hard_network(tiny_runs, tiny_test_batch):
    x, fine, _ = tiny_test_batch
    dsn = load_tiny(tiny_runs, "dsn")
    for grad in ("none", "ste"):
        assert surrogate_fidelity(dsn, x, "fine", grad) == 1.0
        torch.testing.assert_close(surrogate_logits(dsn, x, "coarse", grad), dsn(x).coarse, rtol=0, atol=0)
    for name in ("dual", "resnet"):
        static = load_tiny(tiny_runs, name)
        for grad in ("none", "ste", "bpda", "sharp", "eot"):
            assert surrogate_fidelity(static, x, "fine", grad) == 1.0
    assert calibrate_temperature(load_tiny(tiny_runs, "dual"), x).shape == (0,)


def test_sharp_is_at_least_as_faithful_as_bpda_when_scores_sit_on_the_threshold(tiny_runs, tiny_test_batch):
    x, _, _ = tiny_test_batch
    model = load_tiny(tiny_runs, "dsn")
    gates = gate_modules(model)
    # centre each gate's clean scores on the threshold (halfway between the two middle samples, so that no score
    # is 0), then shrink them: the decisions keep their sign while |s| falls to ~1e-3
    with torch.no_grad():
        for k, gate in enumerate(gates):
            ordered = model(x).path_scores[:, k].sort().values
            gate.fc2.bias -= (ordered[len(x) // 2 - 1] + ordered[len(x) // 2]) / 2
        hard_before = model(x).fine.argmax(1)
        sharp_before = surrogate_logits(model, x, "fine", "sharp")
        for gate in gates:
            gate.fc2.weight *= 1e-3
            gate.fc2.bias *= 1e-3
        assert torch.equal(model(x).fine.argmax(1), hard_before)
        assert float(model(x).path_scores.abs().median()) < 1e-2
        # the sharpened surrogate is scale-free; the plain soft one is not
        torch.testing.assert_close(surrogate_logits(model, x, "fine", "sharp"), sharp_before, rtol=1e-3, atol=1e-3)
    bpda, sharp = (surrogate_fidelity(model, x, "fine", g) for g in ("bpda", "sharp"))
    assert sharp > bpda  # on this model about 0.73 against 0.47


def test_bad_names_and_shapes_are_config_errors():
    model, x = mixed_gates_dsn(), images(4, 1)
    with pytest.raises(ConfigError, match="unknown gate gradient 'magic'"):
        surrogate_logits(model, x, "fine", "magic")
    with pytest.raises(ConfigError, match="unknown gate gradient 'magic'"):
        surrogate_fidelity(model, x, "fine", "magic")
    with pytest.raises(ConfigError, match="unknown gate gradient 'magic'"):
        model(x, gate_grad="magic")
    with pytest.raises(ConfigError, match="unknown head"):
        surrogate_fidelity(model, x, "middle", "sharp")
    with pytest.raises(ConfigError, match="one value per gate"):
        GateState(temperature=torch.ones(2, 2))
    with pytest.raises(ConfigError, match="needs a temperature"):
        GateState(mode="sharpened")
    with pytest.raises(ConfigError, match=f"3 values, model has {model.n_gates} gates"):
        model(x, gate_grad="sharp", temperature=torch.ones(3))
