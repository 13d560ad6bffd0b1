"""Any dynamic network, faithfully (issue 25): gates over projection blocks, measured compute, the fidelity check,
randomised networks, and an ``adapt`` that never guesses."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from models.fidelity import check_model, verify
from models.network import GatedOutput
from models.protocol import GatedNet, ScoreGated, StaticNet, adapt
from models.registry import create_model
from robustness.core.errors import ConfigError


class DownGated(nn.Module):
    """One gated residual block and one gated downsampling block whose skip path is its projection shortcut."""

    gate_names = ["b1", "down"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())
        self.shortcut = nn.Conv2d(4, 8, 1, stride=2)
        self.score1 = nn.Linear(4, 1)
        self.score2 = nn.Linear(4, 1)
        self.head = nn.Linear(8, 5)

    def forward_scored(self, x, gate):
        h = self.stem(x)
        h = gate(self.score1(h.mean((2, 3))).squeeze(1), self.block, h)
        h = gate(self.score2(h.mean((2, 3))).squeeze(1), self.down, h, skip=self.shortcut)
        return self.head(h.mean((2, 3)))

    def reference(self, x, mix):
        """The masked form: ``mix(score)`` of each block, the rest its skip path."""
        h = self.stem(x)
        v = mix(self.score1(h.mean((2, 3))).squeeze(1)).view(-1, 1, 1, 1)
        h = h + v * (self.block(h) - h)
        v = mix(self.score2(h.mean((2, 3))).squeeze(1)).view(-1, 1, 1, 1)
        s = self.shortcut(h)
        h = s + v * (self.down(h) - s)
        return self.head(h.mean((2, 3)))

    def forward(self, x):
        return self.reference(x, lambda s: (s > 0).float())


@pytest.fixture()
def down_gated() -> ScoreGated:
    net = DownGated()
    with torch.no_grad():  # scores spread around 0: some samples run each block, some skip it
        net.score1.weight.mul_(40)
        net.score2.weight.mul_(40)
        x = torch.rand(32, 3, 8, 8)
        h = net.stem(x)
        net.score1.bias.sub_(net.score1(h.mean((2, 3))).median())
        h = net.block(h)
        net.score2.bias.sub_(net.score2(h.mean((2, 3))).median())
    return adapt(net.eval()).eval()


def test_a_gated_projection_block_equals_its_masked_form_in_every_mode(down_gated):
    net, x = down_gated.net, torch.rand(32, 3, 8, 8)
    with torch.no_grad():
        hard = down_gated(x)
        bits = hard.path
        assert 0 < bits[:, 1].sum() < 32 and 0 < bits[:, 0].sum() < 32  # both branches of both gates taken
        torch.testing.assert_close(hard.fine, net.reference(x, lambda s: (s > 0).float()))
        torch.testing.assert_close(down_gated(x, execution="mask").fine, hard.fine)
        torch.testing.assert_close(down_gated(x, mode="soft").fine, net.reference(x, torch.sigmoid))
        torch.testing.assert_close(down_gated(x, mode="open").fine, net.reference(x, torch.ones_like))
        frozen = down_gated(x, mode="frozen", path=1 - bits)
        assert torch.equal(frozen.path, 1 - bits)


def test_skipping_a_projection_block_saves_its_block_less_its_shortcut(down_gated):
    x = torch.rand(8, 3, 8, 8)
    with torch.no_grad():
        out = down_gated(x)
    costs = down_gated.costs
    block_macs = 8 * 4 * 9 * 4 * 4   # conv 4->8, 3x3, stride 2 on 8x8: a 4x4 output
    shortcut_macs = 8 * 4 * 4 * 4    # conv 4->8, 1x1, stride 2
    assert costs.gated_blocks[1] == block_macs - shortcut_macs
    assert costs.gated_blocks[0] == 4 * 4 * 9 * 8 * 8
    expected = costs.always_on + out.path.double() @ torch.tensor(costs.gated_blocks, dtype=torch.float64)
    torch.testing.assert_close(out.macs, expected)
    assert costs.always_on >= shortcut_macs  # the shortcut runs whatever the gate decides


def test_a_block_and_skip_path_of_different_shapes_are_one_clear_error():
    class Bad(DownGated):
        gate_names = ["down"]

        def forward_scored(self, x, gate):
            h = self.stem(x)
            return self.head(gate(self.score1(h.mean((2, 3))).squeeze(1) * 0 + torch.arange(x.shape[0]) % 2 - 0.5,
                                  self.down, h).mean((2, 3)))

    model = adapt(Bad()).eval()
    with pytest.raises(ConfigError, match=r"turns shape \(4, 8, 8\) into \(8, 4, 4\).*skip=shortcut"):
        model(torch.rand(4, 3, 8, 8), mode="hard")


class Squeezing(nn.Module):
    """A SkipNet-style gate that squeezes: a batch of one loses its batch dimension."""

    gate_names = ["g"]

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.score = nn.Conv2d(3, 1, 1)
        self.head = nn.Linear(3, 4)

    def forward_scored(self, x, gate):
        s = self.score(x).mean((2, 3)).squeeze()
        if s.dim() != 1:
            raise IndexError("a batch of one squeezed away")
        return self.head(gate(s, self.conv, x).mean((2, 3)))


def test_costs_are_measured_on_two_samples_so_a_squeezing_model_works_with_a_batch_of_one():
    model = adapt(Squeezing()).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 8, 8))  # the first forward measures: never on one sample
    assert model.costs.gated_blocks == (3 * 3 * 9 * 8 * 8,)
    assert out.macs.shape == (2,)


# -- the general protocol: MACs measured on its own frozen forward -------------------------------------------------


class Delegating(nn.Module):
    """The repo's dsn seen only through the general protocol (gate_names and forward_gated)."""

    def __init__(self, dsn):
        super().__init__()
        self.dsn = dsn
        self.gate_names = list(dsn.gate_names)

    def forward_gated(self, x, mode, path=None):
        out = self.dsn(x, mode=mode, path=path)  # dsn normalises inside; the adapter adds no normalisation
        return GatedOutput(out.fine, out.path, scores=out.path_scores, macs=out.macs * 0 + 1)


def test_measured_macs_of_a_general_protocol_model_equal_the_dsn_cost_tables(caplog):
    dsn = create_model("dsn", num_fine=6, num_coarse=2, depth_n=2, width=4, image_size=16).eval()
    model = adapt(Delegating(dsn))
    assert isinstance(model, GatedNet)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        out = model(torch.rand(4, 3, 16, 16))
    assert model.costs.full == pytest.approx(dsn.costs.full)
    assert model.costs.gated_blocks == pytest.approx(dsn.costs.gated_blocks)
    assert model.costs.always_on == pytest.approx(dsn.costs.always_on)
    torch.testing.assert_close(out.macs, dsn.costs.per_sample(out.path))  # the measurement, not the declared 1
    assert "declares per-sample MACs" in caplog.text


class Masking(nn.Module):
    """Computes every block and masks it: skipping saves nothing it really spends."""

    gate_names = ["g1", "g2"]

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3 * 8 * 8, 8)
        self.steps = nn.ModuleList([nn.Linear(8, 8) for _ in self.gate_names])
        self.out = nn.Linear(8, 3)

    def forward_gated(self, x, mode, path=None):
        h = self.inp(x.flatten(1))
        bits = path if mode == "frozen" else (h[:, :2] > 0).float()
        for k, step in enumerate(self.steps):
            h = h + bits[:, k:k + 1] * step(h)
        return GatedOutput(self.out(h), bits)


def test_a_masking_model_is_measured_as_saving_nothing_and_says_so(caplog):
    model = adapt(Masking())
    with caplog.at_level(logging.WARNING), torch.no_grad():
        out = model(torch.rand(4, 3, 8, 8))
    assert model.costs.gated_blocks == (0.0, 0.0)
    assert (out.macs == model.costs.full).all()
    assert "whatever the path" in caplog.text


# -- adapt never guesses -----------------------------------------------------------------------------------------


def test_adapt_refuses_a_model_that_declares_gates_without_the_gated_methods():
    class Declared(nn.Module):
        gate_names = ["a", "b"]

        def forward(self, x):
            return x.flatten(1)[:, :3]

    with pytest.raises(ConfigError, match="declares gate_names but defines neither forward_scored"):
        adapt(Declared())


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(12, 5), nn.Linear(12, 2)

    def forward(self, x):
        return self.a(x.flatten(1)), self.b(x.flatten(1))


def test_a_tuple_output_needs_its_roles_named():
    x = torch.rand(3, 3, 2, 2)
    with pytest.raises(ConfigError, match=r"tuple of 2 values: say what each one is"):
        adapt(Pair())(x)
    as_gates = adapt(Pair(), outputs=("logits", "gates"))(x)
    assert as_gates.coarse is None and as_gates.fine.shape == (3, 5)
    two_heads = adapt(Pair(), outputs=("logits", "coarse"))(x)
    assert two_heads.coarse.shape == (3, 2)
    picked = adapt(Pair(), outputs=lambda out: out[1])(x)
    assert picked.fine.shape == (3, 2) and picked.coarse is None
    declared = Pair()
    declared.outputs = ("gates", "logits")  # a model file's way to say it
    assert adapt(declared)(x).fine.shape == (3, 2)
    with pytest.raises(ConfigError, match="outputs must name"):
        adapt(Pair(), outputs=("gates", "aux"))


def test_adapt_says_once_what_it_took_a_model_to_be(caplog):
    class Fresh(nn.Sequential):
        pass

    with caplog.at_level(logging.INFO, logger="models.protocol"):
        assert isinstance(adapt(Fresh(nn.Flatten(), nn.Linear(12, 3))), StaticNet)
        adapt(Fresh(nn.Flatten(), nn.Linear(12, 3)))
    assert caplog.text.count("Fresh has no gate_names: a static model") == 1


# -- fidelity and randomness ---------------------------------------------------------------------------------------


class AlwaysRunsDown(DownGated):
    """An adapter that leaves the downsampling gate out (runs the block always), as a hurried adapter does."""

    def forward_scored(self, x, gate):
        h = self.stem(x)
        h = gate(self.score1(h.mean((2, 3))).squeeze(1), self.block, h)
        h = gate(torch.ones(x.shape[0]), self.down, h, skip=self.shortcut)
        return self.head(h.mean((2, 3)))


def test_the_fidelity_check_catches_an_adapter_that_drops_a_gate(down_gated, caplog):
    x = torch.rand(32, 3, 8, 8)
    assert check_model(down_gated, x).faithful is True
    dropped = AlwaysRunsDown()
    dropped.load_state_dict(down_gated.net.state_dict())
    model = adapt(dropped.eval()).eval()
    check = check_model(model, x)
    assert check.faithful is False and check.max_logit_diff > 10 * check.tolerance
    with pytest.raises(ConfigError, match="not the network its own forward computes.*--allow-unfaithful"):
        verify(model, x)
    with caplog.at_level(logging.WARNING):
        assert verify(model, x, allow_unfaithful=True).faithful is False
    assert "attacking it anyway" in caplog.text


class Noisy(nn.Module):
    """Test-time dropout: a static model random at test time."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        return self.lin(nn.functional.dropout(x.flatten(1), 0.5, training=True))


def test_a_random_model_is_found_and_then_scored_by_the_majority_over_draws():
    model = adapt(Noisy()).eval()
    x = torch.rand(64, 3, 4, 4)
    check = verify(model, x)
    assert check.stochastic and 0 < check.disagreement <= 1 and model.draws > 1
    assert check.faithful is True  # the same draws on both sides: the adapter is its own forward
    torch.manual_seed(5)
    with torch.no_grad():
        voted = model(x).fine
    torch.manual_seed(5)
    with torch.no_grad():
        model.draws, k = 1, model.draws
        draws = torch.stack([model(x).fine for _ in range(k)])
        model.draws = k
    votes = nn.functional.one_hot(draws.argmax(2), 4).sum(0)
    majority = votes.max(1).values
    assert (votes.gather(1, voted.argmax(1, keepdim=True)).squeeze(1) == majority).all()
    torch.testing.assert_close(voted.exp().sum(1), torch.ones(64))  # log-probabilities


def test_a_deterministic_model_is_left_alone():
    model = adapt(nn.Sequential(nn.Flatten(), nn.Linear(48, 4))).eval()
    check = verify(model, torch.rand(16, 3, 4, 4))
    assert not check.stochastic and check.disagreement == 0 and model.draws == 1


# -- end to end: evaluate, the manifest, the report -----------------------------------------------------------------

EVAL = dict(attacks="fgsm,pgd", backends="native", eps="8/255", gate_grads="none", n=24, batch_size=24, steps=2,
            seed=0, device="cpu", progress=False)


def _data(n: int = 24, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_a_random_model_is_evaluated_as_one_and_the_report_opens_with_it(tmp_path):
    from robustness import evaluate

    res = evaluate(Noisy(), _data(), out=tmp_path / "noisy", **EVAL)
    check = res.manifest["model_check"]
    assert check["stochastic"] and check["draws"] > 1 and check["faithful"] is True
    assert res.manifest["fingerprint"]["draws"] == check["draws"]  # a resume cannot mix voted and single draws
    warning = res.headline.model_check.warning
    assert warning.startswith("RANDOM AT TEST TIME") and f"majority over {check['draws']} draws" in warning
    page = res.write_report(tmp_path / "report").read_text()
    assert 'id="model-warning"' in page and "RANDOM AT TEST TIME" in page
    assert "Model check" in page


def test_an_unfaithful_adapter_is_refused_before_anything_is_written_unless_allowed(down_gated, tmp_path):
    from robustness import evaluate

    dropped = AlwaysRunsDown()
    dropped.load_state_dict(down_gated.net.state_dict())
    x, y = _data(size=8)
    with pytest.raises(ConfigError, match="not the network its own forward computes"):
        evaluate(dropped.eval(), (x, y), out=tmp_path / "refused", **EVAL)
    assert not (tmp_path / "refused").exists()
    res = evaluate(dropped.eval(), (x, y), out=tmp_path / "allowed", allow_unfaithful=True, **EVAL)
    assert res.manifest["model_check"]["faithful"] is False
    assert res.headline.model_check.warning.startswith("MODEL NOT FAITHFUL")
    assert not res.manifest["model_check"]["stochastic"] and "draws" not in res.manifest["fingerprint"]


def test_costs_are_measured_once_per_input_shape(down_gated):
    with torch.no_grad():
        small = down_gated(torch.rand(4, 3, 8, 8)).macs
        table = down_gated.costs
        large = down_gated(torch.rand(4, 3, 16, 16)).macs
        assert down_gated.costs.full > 3.9 * table.full  # four times the pixels for every convolution
        assert large.min() > small.max()
        down_gated(torch.rand(4, 3, 8, 8))
    assert down_gated.costs is table  # measured once for that shape, then reused
