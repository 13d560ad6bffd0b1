"""Constants cached from parameters (models/folding.py): a gate's folded BatchNorm and the FiLM of the open path
give the outputs of the computation they replace, follow every change of the weights, and step aside wherever a
gradient must reach the parameters."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from models.gates import Decision, Gate, run_block
from models.registry import create_model


def _trained_gate(seed: int = 0) -> Gate:
    torch.manual_seed(seed)
    gate = Gate(8, hidden=16)
    gate.bn.momentum = 0.5
    gate.fc2.weight.data.normal_(0, 1.0)
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics and a non-trivial affine BatchNorm
            gate.train()(torch.randn(32, 8, 4, 4) * 3 + 1)
        gate.bn.weight.uniform_(0.5, 2.0)
        gate.bn.bias.normal_()
    return gate.eval()


def _reference(gate: Gate, x: torch.Tensor) -> torch.Tensor:
    """The unfolded head written out: mean, fc1, BatchNorm with the running statistics, ReLU, fc2."""
    bn = gate.bn
    h = F.batch_norm(gate.fc1(x.mean(dim=(2, 3))), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                     training=False, eps=bn.eps)
    return gate.fc2(torch.relu(h)).squeeze(1)


def _bn_forbidden(gate: Gate, monkeypatch) -> None:
    def fail(*_):
        raise AssertionError("the folded head must not run the BatchNorm")
    monkeypatch.setattr(gate.bn, "forward", fail)


def test_folded_gate_scores_equal_the_batchnorm_head_and_follow_every_change(monkeypatch):
    gate, other = _trained_gate(0), _trained_gate(1)
    x = torch.randn(16, 8, 4, 4)

    def check() -> None:
        with torch.no_grad():
            expected = _reference(gate, x)
            with monkeypatch.context() as m:
                _bn_forbidden(gate, m)
                torch.testing.assert_close(gate(x), expected, atol=1e-5, rtol=1e-5)

    check()
    with torch.no_grad():
        gate.train()(torch.randn(32, 8, 4, 4) * 5)  # running statistics move (no version bump: see folding.py)
    gate.eval()
    check()
    with torch.no_grad():
        gate.bn.running_var.mul_(4.0)  # in place while in eval mode: caught by the version counter
        gate.fc1.weight.add_(0.3)
    check()
    gate.load_state_dict(other.state_dict())
    check()
    gate.bn.weight.data.mul_(-1.0)  # through .data: no version bump, so eval() again drops the constant
    gate.eval()
    check()


def test_a_submodule_in_training_mode_runs_the_batchnorm_itself():
    gate = _trained_gate()
    gate.bn.train()
    x = torch.randn(16, 8, 4, 4)
    with torch.no_grad():
        batch_stats = gate.fc2(torch.relu(F.batch_norm(gate.fc1(x.mean(dim=(2, 3))), None, None, gate.bn.weight,
                                                       gate.bn.bias, training=True, eps=gate.bn.eps))).squeeze(1)
        torch.testing.assert_close(gate(x), batch_stats, atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_parameters_unless_they_are_frozen():
    gate = _trained_gate()
    x = torch.randn(16, 8, 4, 4, requires_grad=True)
    scores = gate(x)  # eval mode with trainable weights: the fold recomputed with autograd, nothing cached
    assert gate._folded._key is None
    scores.sum().backward()
    assert gate.bn.weight.grad is not None and gate.bn.weight.grad.abs().sum() > 0
    assert gate.fc1.weight.grad is not None and gate.fc1.weight.grad.abs().sum() > 0
    expected_input_grad = x.grad.clone()
    with torch.no_grad():
        assert torch.equal(gate(x), scores.detach()), "with and without autograd: the same bits"

    gate.requires_grad_(False)  # an attack: frozen weights, gradient with respect to the input only
    x.grad = None
    gate(x).sum().backward()
    torch.testing.assert_close(x.grad, expected_input_grad, atol=1e-5, rtol=1e-5)
    assert gate._folded._key is not None, "frozen weights should use the folded head"


def test_open_path_film_constant_equals_the_film_network(monkeypatch):
    torch.manual_seed(0)
    model = create_model("dsn", num_fine=8, num_coarse=2, depth_n=3, width=4, image_size=16).eval()
    with torch.no_grad():
        for p in model.film.parameters():
            p.normal_(0, 0.5)  # the zero-initialised FiLM would hide a wrong constant
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def uncached():
        with torch.enable_grad():  # trainable weights: computed with autograd, not taken from the cache
            return model(x, mode="open").fine.detach()

    with torch.no_grad():
        first = model(x, mode="open").fine
        assert torch.equal(first, uncached()), "with and without autograd: the same bits"
        model.film[0].weight.mul_(-1.0)  # an in-place change the constant must follow
        changed = model(x, mode="open").fine
    assert not torch.allclose(changed, first, atol=1e-3), "the change should move the logits"
    assert torch.equal(changed, uncached())


@pytest.mark.parametrize("requires_grad", [False, True])
def test_run_block_writes_in_place_only_when_asked_and_nothing_differentiates(requires_grad):
    block = torch.nn.Conv2d(2, 2, 1)
    x = torch.randn(4, 2, 3, 3, requires_grad=requires_grad)
    d = Decision(executed=torch.tensor([True, False, True, False]), value=torch.ones(4), mask=False)
    before = x.detach().clone()
    out = run_block(block, x, d)
    assert torch.equal(x.detach(), before), "without inplace the caller's tensor is never written"
    out_inplace = run_block(block, x, d, inplace=True)
    torch.testing.assert_close(out_inplace, out)
    assert (out_inplace.data_ptr() == x.data_ptr()) is (not requires_grad)
    assert torch.equal(out[1::2].detach(), before[1::2])  # skipped samples pass through unchanged
