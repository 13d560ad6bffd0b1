"""Models: real skipping, gate modes, routing gradients, measured MACs, registry errors, losses."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.losses import LossWeights, budget_loss, dsn_loss, ranking_loss
from models.registry import create_model, list_models, model_options
from robustness.core.errors import ConfigError, UnknownNameError

OPTS = dict(num_fine=8, num_coarse=2, depth_n=3, width=4, image_size=16)


def mixed_gates_dsn(seed: int = 0, **extra) -> torch.nn.Module:
    """A dsn whose gates are on for some samples and off for others.

    Random gate weights, zero bias, and BatchNorm statistics taken from one batch, so that scores vary between
    samples as they do in a trained model.
    """
    torch.manual_seed(seed)
    model = create_model("dsn", **{**OPTS, **extra})
    for name, p in model.named_parameters():
        if name.endswith("fc2.weight"):
            p.data.normal_(0, 1.0)
        if name.endswith("fc2.bias"):
            p.data.zero_()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.momentum = 1.0
    with torch.no_grad(), model.gating(mode="open"):
        model.train()(torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def block_batch_sizes(model, run) -> list[list[int]]:
    """Batch size each gated block saw during ``run()``, per block in path order."""
    blocks = model.coarse.gated_blocks() + model.fine.gated_blocks()
    seen: list[list[int]] = [[] for _ in blocks]
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: seen[k].append(i[0].shape[0]) and None)
             for k, b in enumerate(blocks)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_registry_lists_models_and_rejects_unknown_names():
    assert list_models() == ["dsn", "dual", "resnet"]
    assert list_models("d*") == ["dsn", "dual"]
    with pytest.raises(UnknownNameError, match="unknown model 'nope'.*dsn, dual, resnet"):
        create_model("nope")
    with pytest.raises(ConfigError, match="no option.*depth"):
        create_model("dsn", num_fine=4, num_coarse=2, depth=3)
    with pytest.raises(ConfigError, match="depth_n >= 2"):
        create_model("dsn", num_fine=4, num_coarse=2, depth_n=1)
    with pytest.raises(UnknownNameError, match="gate function"):
        create_model("dsn", num_fine=4, num_coarse=2, gate_fn="magic")
    assert "gate_fn" in model_options("dsn")


def test_output_structure_per_model(images):
    for name in list_models():
        model = create_model(name, **OPTS).eval()
        out = model(images)
        assert out.fine.shape == (32, 8) and out.coarse.shape == (32, 2) and out.macs.shape == (32,)
        expected_gates = 2 * 2 * (OPTS["depth_n"] - 1) if name == "dsn" else 0
        assert out.path.shape == (32, expected_gates) and model.n_gates == expected_gates
        assert len(model.gate_names) == expected_gates
    dsn = create_model("dsn", **OPTS)
    assert dsn.gate_names[0] == "coarse.s2.b1" and dsn.gate_names[-1] == "fine.s3.b2"
    assert set(dsn(images).gates) == {"coarse", "fine"} and dsn(images).gates["fine"].shape == (32, 4)


def test_hard_subbatch_equals_masked_execution(images):
    model = mixed_gates_dsn()
    with torch.no_grad():
        real = model(images, mode="hard")
        masked = model(images, mode="hard", execution="mask")
    rate = real.path.mean(0)
    assert ((rate > 0) & (rate < 1)).any(), "test needs gates that differ between samples"
    torch.testing.assert_close(real.fine, masked.fine, atol=1e-5, rtol=0)
    torch.testing.assert_close(real.coarse, masked.coarse, atol=1e-5, rtol=0)
    assert torch.equal(real.path, masked.path)


def test_hard_mode_computes_blocks_only_for_executing_samples(images):
    model = mixed_gates_dsn()
    with torch.no_grad():
        path = model(images).path
    seen = block_batch_sizes(model, lambda: model(images, mode="hard"))
    for k, sizes in enumerate(seen):
        executed = int(path[:, k].sum())
        assert sizes == ([executed] if executed else []), f"block {k}"


def test_open_mode_runs_every_block_for_every_sample(images):
    model = mixed_gates_dsn()
    seen = block_batch_sizes(model, lambda: model(images, mode="open"))
    assert seen == [[32]] * model.n_gates
    out = model(images, mode="open")
    assert torch.all(out.path == 1) and torch.allclose(out.macs, torch.full((32,), model.full_macs, dtype=torch.float64))


def test_macs_add_up_and_match_an_independent_count(images):
    model = mixed_gates_dsn()
    costs = model.costs
    assert costs.full == pytest.approx(costs.always_on + sum(costs.gated_blocks))
    # Every non-downsampling block of a stage costs the same; stage 3 blocks see a quarter of the pixels at
    # twice the width, so they cost the same as stage 2's.
    assert len(set(costs.gated_blocks)) == 1
    out = model(images)
    expected = costs.always_on + out.path.double() @ torch.tensor(costs.gated_blocks, dtype=torch.float64)
    torch.testing.assert_close(out.macs, expected)
    for i in range(4):  # the flop counter sees only what sub-batch execution really computed
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            single = model(images[i:i + 1])
        assert counter.get_total_flops() / 2 == pytest.approx(float(single.macs[0]), rel=1e-6)
        assert torch.equal(single.path[0], out.path[i])


@pytest.mark.parametrize("name,changes", [("dsn", dict(width=8)), ("dsn", dict(image_size=24)),
                                          ("dsn", dict(film=False)), ("dual", {}), ("resnet", dict(depth_n=2))])
def test_costs_measured_once_per_architecture_are_those_of_a_fresh_count(name, changes):
    from models.cost import measure_costs
    base = dict(OPTS)
    first, same = create_model(name, **{**base, **changes}), create_model(name, **{**base, **changes})
    assert same.costs is first.costs
    if name == "resnet":
        return  # a static model: its one number is checked by the flop-counter test below
    fresh = measure_costs(first, first.coarse.gated_blocks() + first.fine.gated_blocks(),
                          (3, first.config["image_size"], first.config["image_size"]),
                          lambda x: first._run(x, first.gate_state.updated(mode="open")))
    assert first.costs == fresh
    assert create_model(name, **base).costs != fresh or not changes, "another shape must be measured anew"


def test_frozen_mode_follows_the_given_path(images):
    model = mixed_gates_dsn()
    with torch.no_grad():
        clean = model(images)
        frozen_same = model(images, mode="frozen", path=clean.path)
        flipped = 1 - clean.path
        frozen_flipped = model(images, mode="frozen", path=flipped)
    torch.testing.assert_close(frozen_same.fine, clean.fine)
    assert torch.equal(frozen_flipped.path, flipped)
    assert not torch.allclose(frozen_flipped.fine, clean.fine)
    with pytest.raises(ConfigError, match="needs a path"):
        model(images, mode="frozen")


def test_random_mode_uses_the_recorded_rates(images):
    model = mixed_gates_dsn()
    model.gate_rate.zero_()
    assert model(images, mode="random").path.sum() == 0
    model.gate_rate.fill_(1.0)
    assert torch.all(model(images, mode="random").path == 1)
    model.gate_rate.fill_(0.5)
    torch.manual_seed(0)
    rate = float(model(images, mode="random").path.mean())
    assert 0.3 < rate < 0.7


def test_soft_mode_mixes_every_block_with_sigmoid_values(images):
    model = mixed_gates_dsn()
    out = model(images, mode="soft")
    values = torch.cat(list(out.values.values()), 1)
    torch.testing.assert_close(values, torch.sigmoid(out.path_scores))
    assert torch.all(out.path == 1)


def gate_param_grad(model, images, grad: str) -> tuple[float, float]:
    model.zero_grad()
    x = images.clone().requires_grad_(True)
    out = model(x, mode="hard", gate_grad=grad)
    out.fine.logsumexp(1).sum().backward()
    gate_grad = sum(float(p.grad.abs().sum()) for n, p in model.named_parameters()
                    if ".gates." in n and p.grad is not None)
    return gate_grad, float(x.grad.abs().sum())


def test_routing_gradient_zero_under_none_and_nonzero_under_ste_bpda_eot(images):
    model = mixed_gates_dsn()
    with model.gating(eot_samples=2):
        results = {g: gate_param_grad(model, images, g) for g in ("none", "ste", "bpda", "eot")}
    assert results["none"][0] == 0.0
    assert results["none"][1] > 0, "input gradient still flows through executed blocks"
    for g in ("ste", "bpda", "eot"):
        assert results[g][0] > 0, g


def test_bpda_forward_values_are_the_hard_network(images):
    model = mixed_gates_dsn()
    with torch.no_grad():
        hard = model(images, mode="hard")
    bpda = model(images, mode="hard", gate_grad="bpda")
    torch.testing.assert_close(bpda.fine, hard.fine, atol=1e-5, rtol=0)
    assert torch.equal(bpda.path, hard.path)


def test_gating_context_manager_restores_state(images):
    model = mixed_gates_dsn()
    with model.gating(mode="open"):
        assert torch.all(model(images).path == 1)
    assert model.gate_state.mode == "hard"
    with pytest.raises(ConfigError, match="unknown gate mode"):
        model(images, mode="sideways")


def test_static_models_ignore_gate_modes(images):
    for name in ("dual", "resnet"):
        model = create_model(name, **OPTS).eval()
        a = model(images, mode="hard", gate_grad="bpda")
        b = model(images, mode="open")
        torch.testing.assert_close(a.fine, b.fine)
        assert a.path.shape[1] == 0 and torch.all(a.macs == model.full_macs)


def test_training_relaxations_per_gate_function(images):
    for gate_fn in ("hardsig", "ste", "gumbel"):
        model = mixed_gates_dsn(gate_fn=gate_fn).train()
        out = model(images)
        values = torch.cat(list(out.values.values()), 1)
        assert values.requires_grad
        if gate_fn == "hardsig":
            assert ((values > 0) & (values < 1)).any()
        else:
            torch.testing.assert_close(values.detach(), values.detach().round())  # hard forward, soft backward


def test_budget_loss_is_zero_at_target_and_ranking_loss_orders_samples():
    w = LossWeights(target_coarse=0.25, target_fine=0.75, margin=0.1)
    at_target = {"coarse": torch.tensor([[0.0, 0.5], [0.5, 0.0], [0.5, 0.5], [0.0, 0.0]]),
                 "fine": torch.full((4, 2), 0.75)}
    assert float(budget_loss(at_target, w)) == pytest.approx(0.0)
    assert float(budget_loss({"coarse": torch.ones(4, 2), "fine": torch.ones(4, 2)}, w)) > 0
    difficulty = torch.tensor([3.0, 2.0, 1.0, 0.0])
    more_for_harder = {"coarse": torch.tensor([[1.0], [0.6], [0.3], [0.0]]), "fine": torch.ones(4, 1)}
    less_for_harder = {"coarse": torch.tensor([[0.0], [0.3], [0.6], [1.0]]), "fine": torch.ones(4, 1)}
    assert float(ranking_loss(less_for_harder, difficulty, 0.1)) > float(ranking_loss(more_for_harder, difficulty,
                                                                                      0.1))


def test_dsn_loss_adds_gate_terms_only_when_ramped_in(images):
    model = mixed_gates_dsn().train()
    out = model(images)
    fine, coarse = torch.randint(0, 8, (32,)), torch.randint(0, 2, (32,))
    _, off = dsn_loss(out, fine, coarse, LossWeights(), gate_weight=0.0)
    total, on = dsn_loss(out, fine, coarse, LossWeights(), gate_weight=1.0)
    off, on = off.to_dict(), on.to_dict()  # the parts are device tensors: read once, as floats
    assert off["total"] == pytest.approx(off["ce_fine"] + off["ce_coarse"], rel=1e-5)
    assert on["total"] > off["total"] and on["budget"] > 0
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".gates." in n)


def test_each_model_has_its_own_options():
    assert model_options("dsn") == ["num_fine", "num_coarse", "depth_n", "width", "gate_fn", "feedback", "film",
                                    "feedback_channels", "gate_hidden", "open_bias", "image_size", "in_channels",
                                    "mean", "std"]
    assert model_options("resnet") == ["num_fine", "num_coarse", "depth_n", "width", "image_size", "in_channels",
                                       "mean", "std"]
    assert not {"gate_fn", "film", "open_bias", "gate_hidden"} & set(model_options("dual"))
    assert "feedback" in model_options("dual")
    with pytest.raises(ConfigError, match="model 'resnet' has no option.*gate_fn"):
        create_model("resnet", num_fine=4, num_coarse=2, gate_fn="ste")
    with pytest.raises(ConfigError, match="model 'dsn' needs option.*num_coarse"):
        create_model("dsn", num_fine=4)
    with pytest.raises(ConfigError, match="depth_n and width must be >= 1"):
        create_model("resnet", num_fine=4, num_coarse=2, width=0)


def test_model_config_records_the_resolved_options():
    model = create_model("dual", **OPTS)
    assert model.model_name == "dual"
    assert model.config == {"num_fine": 8, "num_coarse": 2, "depth_n": 3, "width": 4, "feedback": True,
                            "feedback_channels": None, "image_size": 16, "in_channels": 3,
                            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    assert create_model("dsn", **OPTS).config["open_bias"] == 0.4


def test_a_model_registers_itself_with_its_keyword_parameters(monkeypatch):
    import models.registry as registry
    from models.baselines import ResNet

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @registry.register_model
    def thin(*, num_fine: int, num_coarse: int, image_size: int = 16) -> torch.nn.Module:
        return ResNet(num_fine=num_fine, num_coarse=num_coarse, depth_n=1, width=2, image_size=image_size,
                      in_channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)

    assert "thin" in list_models() and model_options("thin") == ["num_fine", "num_coarse", "image_size"]
    model = create_model("thin", num_fine=3, num_coarse=2)
    assert model.model_name == "thin" and model.config == {"num_fine": 3, "num_coarse": 2, "image_size": 16}
    assert registry.all_model_options() == sorted(set().union(*(model_options(n) for n in list_models())))
    registry.unregister_model("thin")
    assert "thin" not in list_models()
    with pytest.raises(UnknownNameError, match="'thin'"):
        registry.unregister_model("thin")


def test_registry_is_a_leaf_and_import_registers_the_builtin_models():
    import ast
    import subprocess
    import sys
    from pathlib import Path

    source = Path(__file__).resolve().parents[1] / "models" / "registry.py"
    imported = [n.module or "" for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.Import)
                 for a in n.names]
    assert not [m for m in imported if m == "models" or m.startswith("models.")]
    code = ("import models.registry as r; m = r.create_model('dsn', num_fine=4, num_coarse=2, depth_n=2, width=4, "
            "image_size=16); print(r.list_models(), type(m).__name__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=source.parents[1], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "['dsn', 'dual', 'resnet'] DSN"


def test_models_command_prints_each_models_own_options(capsys):
    import argparse

    from robustness.app.commands import models as models_command

    models_command.run(argparse.Namespace(pattern="*"))
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["resnet"] == ", ".join(model_options("resnet")) and "gate_fn" not in lines["resnet"]
    assert "gate_fn" in lines["dsn"] and "film" not in lines["dual"]
    assert lines["gate functions (option gate_fn)"] == "gumbel, hardsig, ste"


def test_macs_are_exact_under_autocast_where_float16_or_bfloat16_would_round_them(images):
    # ResNet-110-sized costs: ~1e8 MACs per block overflow float16 (max 65504) and round in bfloat16, which a
    # bits @ macs matmul under autocast would use (the H200 logged "MACs saved nan%" under AMP).
    from models.cost import CostTable
    table = CostTable(full=4e8 + 3, always_on=1e8 + 1, gated_blocks=(1e8 + 1, 2e8 + 1))
    bits = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        macs = table.per_sample(bits)
    assert macs.dtype == torch.float64 and macs.tolist() == [4e8 + 3, 3e8 + 2, 1e8 + 1]
    model = mixed_gates_dsn()
    with torch.no_grad():
        plain = model(images, mode="hard")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_amp = model(images, mode="hard")
    assert under_amp.macs.dtype == torch.float64
    expected = model.costs.always_on + under_amp.path.double() @ torch.tensor(model.costs.gated_blocks,
                                                                             dtype=torch.float64)
    assert torch.equal(under_amp.macs, expected) and torch.isfinite(under_amp.macs).all()
    assert plain.macs.dtype == torch.float64


def test_frozen_path_with_uniform_columns_runs_or_skips_whole_blocks_without_reading_decisions(images, monkeypatch):
    model = mixed_gates_dsn()
    path = torch.zeros(32, model.n_gates)
    path[:, ::2] = 1  # every even gate runs for every sample, every odd one for none
    seen = block_batch_sizes(model, lambda: model(images, mode="frozen", path=path))
    assert seen == [[32] if k % 2 == 0 else [] for k in range(model.n_gates)]
    calls = []
    original = torch.Tensor.nonzero
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    with torch.no_grad():
        frozen = model(images, mode="frozen", path=path)
        model(images, mode="open")
        model(images, mode="soft")
        model(images, mode="hard", execution="mask")
    assert calls == []  # none of these forwards asks the device which samples run a block
    with torch.no_grad():
        masked = model(images, mode="frozen", path=path, execution="mask")
        mixed = path.clone()
        mixed[0, 1] = 1  # one column varies per sample: only it is read back
        model(images, mode="frozen", path=mixed)
    assert len(calls) == 1
    torch.testing.assert_close(frozen.fine, masked.fine, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_subbatch_equals_masked_in_true_float32_and_open_mode_never_synchronises():
    model = mixed_gates_dsn().cuda()
    x = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(3)).cuda()
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            real, masked = model(x, mode="hard"), model(x, mode="hard", execution="mask")
            torch.testing.assert_close(real.fine, masked.fine, atol=1e-5, rtol=1e-5)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                model(x, mode="open")
                model(x, mode="hard", execution="mask")
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
