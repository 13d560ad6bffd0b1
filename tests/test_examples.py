"""The example networks of ``examples/`` (SkipNet, ConvNet-AIG) as suite models: loaded from their files, trained
on built-in data through their own ``forward``, then held to it.

What is checked, for each example: the adapted hard forward (real sub-batch skipping, a skipped downsampling block
taking its projection shortcut) is the module's own masked forward; its path really skips, downsampling blocks
included; sub-batch and masked execution agree, and soft mode mixes a downsampling block with its shortcut by
``sigmoid(s)``. For ConvNet-AIG: ``gumbel_at_test`` makes the deployed forward random, and only then.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from models.model_file import build_from_spec
from models.protocol import ScoreGated
from robustness.data import CoarseFineDataset, load_dataset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STEPS = 200
BATCH = 32
#: Test-only surgery: each gate's threshold at this quantile of its hard-mode scores on the calibration batch.
SKIP_SHARE = 0.3


@dataclass
class Trained:
    name: str
    model: ScoreGated
    options: dict
    test: CoarseFineDataset
    chance: float

    @property
    def net(self) -> nn.Module:
        return self.model.net


def _units(net: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(block, gate) of each gated block, in gate_names order."""
    net = getattr(net, "net", net)  # the SkipNet adapter holds the original network
    if hasattr(net, "blocks"):  # skipnet
        return list(zip(net.blocks, net.gates))
    return [(b, g) for blocks, gates in zip(net.stages, net.gates) for b, g in zip(blocks, gates)]


def _down(net: nn.Module) -> list[int]:
    """Indices of the gated downsampling blocks (those whose skip path is a projection shortcut)."""
    return [k for k, (block, _) in enumerate(_units(net)) if block.shortcut is not None]


def _set_thresholds(model: ScoreGated, x: torch.Tensor) -> None:
    """Test-only gate surgery, gate by gate in call order: unit-spread scores, the threshold at the SKIP_SHARE
    quantile of the *hard* scores (earlier gates already moved), so every gate skips about that share of ``x``."""
    with torch.no_grad():
        for k, (_, gate) in enumerate(_units(model.net)):
            scores = model(x).path_scores[:, k]
            spread = scores.std().clamp_min(1e-6)
            gate.decide.weight.div_(spread)
            gate.decide.bias.div_(spread)
            shift = scores.quantile(SKIP_SHARE) / spread
            if gate.decide.out_channels == 1:  # SkipNet: one logit is the score
                gate.decide.bias.sub_(shift)
            else:  # ConvNet-AIG: score = run - skip logit
                gate.decide.bias[1].sub_(shift)


def _train(name: str, options: dict) -> Trained:
    train, test = (load_dataset("digits", split, image_size=16, seed=0) for split in ("train", "test"))
    torch.manual_seed(0)
    model = build_from_spec(f"{EXAMPLES / name}.py:build", options=options,
                            derived={"num_classes": train.info.num_fine})
    net = model.net
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    net.train()
    for _ in range(STEPS):
        idx = torch.randint(len(train), (BATCH,))
        x, fine, _ = train.batch(idx)
        loss = nn.functional.cross_entropy(net(x), fine)  # the model's own forward, as a user trains it
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    _set_thresholds(model, train.batch(slice(0, 256))[0])
    model.requires_grad_(False)
    return Trained(name, model, options, test, 1.0 / train.info.num_fine)


_TRAINED: dict[str, Trained] = {}


def _trained(name: str) -> Trained:
    if name not in _TRAINED:  # trained once per session, whichever test asks first
        _TRAINED[name] = _train(name, {"width": 4, "depth": 1, "in_channels": 1})  # real digits: one channel
    return _TRAINED[name]


@pytest.fixture(params=["skipnet_adapter", "convnet_aig"])
def trained(request) -> Trained:
    return _trained(request.param)


def _batch(t: Trained, n: int = 128) -> torch.Tensor:
    return t.test.batch(slice(0, n))[0]


def test_examples_declare_a_gate_per_block_downsampling_ones_included():
    skipnet = build_from_spec(f"{EXAMPLES / 'skipnet_adapter'}.py:build", options={"width": 4, "depth": 2})
    assert skipnet.gate_names == ["s1.b1", "s1.b2", "s2.b1", "s2.b2", "s3.b1", "s3.b2"]
    assert _down(skipnet.net) == [2, 4]
    aig = build_from_spec(f"{EXAMPLES / 'convnet_aig'}.py:build", options={"width": 4, "depth": 2})
    assert aig.gate_names == ["s1.b1", "s1.b2", "s2.down", "s2.b1", "s2.b2"] and _down(aig.net) == [2]
    x = torch.rand(3, 3, 16, 16)
    for model in (skipnet, aig):  # untrained gates start open: every block runs
        assert isinstance(model, ScoreGated) and (model(x).path == 1).all()


def test_trained_example_learns_and_its_hard_forward_is_its_own(trained):
    model, net, x = trained.model, trained.net, _batch(trained)
    labels = trained.test.batch(slice(0, 128))[1]
    open_acc = (model(x, mode="open").fine.argmax(1) == labels).float().mean()
    assert open_acc > 3 * trained.chance  # trained through its own forward (open = every block, pre-surgery)
    assert torch.equal(model.normalize(x), x)  # adapted without mean/std: the module sees the [0, 1] images
    out = model(x)
    assert 0 < out.path.mean() < 1  # the comparison below crosses real skips
    ref = net(x)
    assert (out.fine - ref).abs().max() < 1e-4
    assert torch.equal(out.fine.argmax(1), ref.argmax(1))
    assert torch.allclose(model(x[:1]).fine, ref[:1], atol=1e-4)  # a batch of one keeps its batch dimension


def test_trained_example_skips_blocks_downsampling_ones_included(trained):
    model, x = trained.model, _batch(trained)
    out = model(x)
    path = out.path
    assert torch.equal(path, (out.path_scores > 0).float())
    rate = path.mean(0)
    assert ((rate > 0) & (rate < 1)).all(), rate  # every gate skips for some samples, runs for others
    for k in _down(trained.net):
        assert 0 < rate[k] < 1
    blocks = torch.tensor(model.costs.gated_blocks, dtype=torch.float64)
    assert (blocks > 0).all()  # a downsampling block saves its convs less its projection shortcut
    assert torch.allclose(out.macs, model.costs.always_on + path.double() @ blocks)
    assert out.macs.min() < model.full_macs


def test_subbatch_execution_is_the_masked_form_and_soft_mixes_with_the_shortcut(trained):
    model, net, x = trained.model, trained.net, _batch(trained, 64)
    sub, mask = model(x), model(x, execution="mask")
    assert torch.equal(sub.path, mask.path) and 0 < sub.path.mean() < 1
    assert torch.allclose(sub.fine, mask.fine, atol=1e-5)

    units = _units(net)
    k = _down(net)[0]
    (block, gate), (_, after) = units[k], units[k + 1]
    seen = {}
    hooks = [gate.register_forward_hook(lambda m, args, out: seen.update(h=args[0], s=out)),
             after.register_forward_pre_hook(lambda m, args: seen.update(y=args[0]))]
    try:
        soft = model(x, mode="soft")
    finally:
        for hook in hooks:
            hook.remove()
    v = torch.sigmoid(seen["s"]).view(-1, 1, 1, 1)
    assert 0.05 < v.mean() < 0.95  # a real mixture, not an open gate
    expected = v * block(seen["h"]) + (1 - v) * block.shortcut(seen["h"])
    assert seen["y"].shape == expected.shape and torch.allclose(seen["y"], expected, atol=1e-5)
    assert torch.allclose(soft.values["path"], torch.sigmoid(soft.path_scores))


def _aig_twin(t: Trained, gumbel: bool) -> ScoreGated:
    twin = build_from_spec(f"{EXAMPLES / 'convnet_aig'}.py:build", options={**t.options, "gumbel_at_test": gumbel},
                           derived={"num_classes": t.test.info.num_fine})
    twin.net.load_state_dict(t.net.state_dict())
    return twin.eval().requires_grad_(False)


def test_convnet_aig_gumbel_at_test_makes_the_deployed_forward_random():
    trained = _trained("convnet_aig")
    x = _batch(trained)
    plain = _aig_twin(trained, gumbel=False)
    assert torch.equal(plain(x).path, plain(x).path) and torch.equal(plain(x).fine, trained.model(x).fine)
    noisy = _aig_twin(trained, gumbel=True)
    first, second = noisy(x), noisy(x)
    assert (first.path != second.path).any(1).any()  # two forwards of one batch route some samples differently
    assert not torch.equal(first.path_scores, second.path_scores)
    torch.manual_seed(1)
    adapted = noisy(x)
    torch.manual_seed(1)
    own = noisy.net(x)  # the same draws in the same order: the adapted forward is still the model's own
    assert torch.allclose(adapted.fine, own, atol=1e-4)
    gate, h = noisy.net.gates[0][0].train(), noisy.net.stem(x)
    assert torch.equal(gate(h), gate(h))  # the noise is a test-time option: training mode is not noisy here


# -- end to end: the CLI, the fidelity check, a randomised network ------------------------------------------------

ATTACK = ["--attacks", "pgd", "--eps", "8/255", "--gate-grad", "none,bpda", "--n", "32", "--batch-size", "32",
          "--steps", "2", "--backend", "native", "--device", "cpu", "--no-progress"]


def test_the_skipnet_adapter_is_attacked_from_its_file_faithfully_and_saves_compute(tmp_path, capsys):
    import json

    from robustness.app import cli

    t = _trained("skipnet_adapter")
    weights = tmp_path / "skipnet.pt"
    torch.save(t.net.state_dict(), weights)
    for name in ("skipnet.py", "skipnet_adapter.py"):  # the pair in a folder of their own, built at width 4
        text = (EXAMPLES / name).read_text()
        (tmp_path / name).write_text(text.replace("width: int = 8, depth: int = 1", "width: int = 4, depth: int = 1"))
    spec = f"{tmp_path / 'skipnet_adapter'}.py:build"  # imports its sibling skipnet.py
    assert cli.main(["check-model", spec, "--weights", str(weights), "--dataset", "digits"]) == 0
    printed = capsys.readouterr().out
    assert "faithful" in printed and "NOT" not in printed and "deterministic" in printed
    assert "skipping saves: s1.b1" in printed
    out = tmp_path / "run"
    assert cli.main(["attack", str(out), "--model-file", spec, "--weights", str(weights), "--dataset", "digits",
                     *ATTACK]) == 0
    manifest = json.loads((out / "attacks" / "manifest.json").read_text())
    check = manifest["model_check"]
    assert check["faithful"] is True and check["max_logit_diff"] < 1e-4 and not check["stochastic"]
    assert all(m > 0 for m in manifest["gated_block_macs"])
    from robustness import load_run

    res = load_run(out)
    macs = res.records.drop_duplicates("sample")["clean_macs"]
    assert (macs < manifest["full_macs"]).any() and res.headline.compute_saved > 0


def test_check_model_refuses_an_adapter_that_inverts_the_downsampling_gates(tmp_path, capsys):
    from robustness.app import cli

    (tmp_path / "skipnet.py").write_text((EXAMPLES / "skipnet.py").read_text())
    adapter = (EXAMPLES / "skipnet_adapter.py").read_text().replace(
        "h = gate(scorer(h), block, h, skip=block.shortcut)",
        "h = gate(scorer(h) if block.shortcut is None else -scorer(h), block, h, skip=block.shortcut)")
    (tmp_path / "bad_adapter.py").write_text(adapter)
    spec = f"{tmp_path / 'bad_adapter.py'}:build"
    assert cli.main(["check-model", spec, "--dataset", "digits"]) == 2
    assert "NOT FAITHFUL" in capsys.readouterr().out
    weights = tmp_path / "w.pt"
    torch.save(build_from_spec(spec, derived={"num_classes": 10, "in_channels": 1}).net.state_dict(), weights)
    attack = ["attack", str(tmp_path / "run"), "--model-file", spec, "--weights", str(weights), "--dataset", "digits",
              *ATTACK]
    assert cli.main(attack) == 2
    assert "not the network its own forward computes" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert cli.main([*attack, "--allow-unfaithful"]) == 0
    assert "MODEL NOT FAITHFUL" in capsys.readouterr().out  # the summary opens with it


def test_convnet_aig_with_test_time_gumbel_noise_is_evaluated_as_a_random_network(tmp_path):
    from robustness import evaluate

    t = _trained("convnet_aig")
    noisy = build_from_spec(f"{EXAMPLES / 'convnet_aig'}.py:build", options={**t.options, "gumbel_at_test": True},
                            derived={"num_classes": 10})
    noisy.net.load_state_dict(t.net.state_dict())
    res = evaluate(noisy.net.eval(), "digits", attacks="pgd", steps=2, eps="8/255", gate_grads="none", n=32,
                   batch_size=32, backends="native", device="cpu", progress=False, out=tmp_path / "aig")
    check = res.manifest["model_check"]
    assert check["stochastic"] and check["disagreement"] > 0 and check["draws"] > 1
    assert res.headline.model_check.warning.startswith("RANDOM AT TEST TIME")
