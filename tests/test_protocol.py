"""The gated model protocol (models.protocol), single-head models, and models from a user's file (models.model_file).

The ConvNet-AIG-style network of ``examples/convnet_aig.py`` imports nothing of the suite: it goes through the
model-file loader, ``adapt`` and the attack runner unchanged, as a researcher's own network would.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from attacks.adapters import NO_HEAD, LogitsView, evaluate
from attacks.runner import AttackConfig
from attacks.runner.run import attack_subject
from attacks.runner.subject import Subject
from models.checkpoint import load_checkpoint, save_checkpoint
from models.model_file import build_from_spec, load_model_file, load_weights, parse_model_spec
from models.network import CoarseFineNet, GatedOutput
from models.protocol import GatedModel, GatedNet, ScoreGated, StaticNet, adapt
from models.registry import create_model
from reports.tables import summary_table
from robustness.analysis.metrics import has_coarse_head
from robustness.analysis.summary import summarize
from robustness.core.errors import CheckpointError, ConfigError, DataError
from robustness.core.rundir import RunDir
from robustness.data import CoarseFineDataset, DatasetInfo, load_dataset
from robustness.sanity import run_checks

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "convnet_aig.py"
DATA = dict(n=400, image_size=16, seed=0)
EPS = 4 / 255


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text
    return text


@pytest.fixture(scope="module")
def data() -> tuple[CoarseFineDataset, CoarseFineDataset]:
    return load_dataset("synthetic", "train", **DATA), load_dataset("synthetic", "test", **DATA)


@pytest.fixture(scope="module")
def aig(data) -> ScoreGated:
    """The example ConvNet-AIG, loaded from its file, trained a little, its gates set to skip ~30% of inputs."""
    train, _ = data
    torch.manual_seed(0)
    model = build_from_spec(f"{EXAMPLE}:build", options={"width": 4}, derived={"num_classes": train.info.num_fine})
    net = model.net
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    net.train()
    for _ in range(3):
        for idx in torch.randperm(len(train)).split(50):
            x, fine, _ = train.batch(idx)
            loss = nn.functional.cross_entropy(net(x), fine)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    x = train.batch(slice(0, 256))[0]
    with torch.no_grad():  # test-only surgery: unit-spread scores with the threshold at the 30% quantile
        scores = model(x, mode="open").path_scores
        gates = [g for stage in net.gates for g in stage]
        for k, gate in enumerate(gates):
            spread = scores[:, k].std().clamp_min(1e-6)
            gate.decide.weight[1].div_(spread)
            gate.decide.weight[0].div_(spread)
            gate.decide.bias.div_(spread)
            gate.decide.bias[1].sub_(scores[:, k].quantile(0.3) / spread)
        model.gate_rate.copy_(model(x).path.mean(0))
    return model.requires_grad_(False)


def _attack(tmp: Path, model: CoarseFineNet, data: CoarseFineDataset, **config):
    subject = Subject(model, model.model_name, data.info, data.subset(16), {"dataset": "synthetic"})
    settings = dict(n=16, batch_size=16, steps=3, seed=0, device="cpu", eps=[0.0, EPS], backends="native")
    return attack_subject(RunDir.at(tmp), subject, AttackConfig(**{**settings, **config}), progress=False)


# ---------------------------------------------------------------------------------------------------------------
# adapt and the protocol
# ---------------------------------------------------------------------------------------------------------------


class TinyGated(nn.Module):
    """A model written against the general protocol: two gated linear residual steps on a flattened image."""

    gate_names = ["g1", "g2"]

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3 * 16 * 16, 8)
        self.steps = nn.ModuleList([nn.Linear(8, 8) for _ in self.gate_names])
        self.scorers = nn.ModuleList([nn.Linear(8, 1) for _ in self.gate_names])
        self.out = nn.Linear(8, 5)

    def forward_gated(self, x, mode, path=None):
        h, bits, scores = self.inp(x.flatten(1)), [], []
        for k, (step, scorer) in enumerate(zip(self.steps, self.scorers)):
            s = scorer(h).squeeze(1)
            if mode == "soft":
                g = torch.sigmoid(s)
            elif mode == "sample":
                g = torch.bernoulli(torch.sigmoid(s).detach())
            elif mode == "frozen":
                g = path[:, k]
            else:
                g = (s > 0).float()
            h = h + g.unsqueeze(1) * torch.tanh(step(h))
            bits.append((g > 0.5).float())
            scores.append(s)
        return GatedOutput(self.out(h), torch.stack(bits, 1), scores=torch.stack(scores, 1))


def test_adapt_picks_the_wrapper_each_model_style_needs():
    dsn = create_model("dsn", num_fine=6, num_coarse=2, depth_n=2, width=4, image_size=16)
    assert adapt(dsn) is dsn and isinstance(dsn, GatedModel)
    assert isinstance(adapt(load_model_file(f"{EXAMPLE}:build")()), ScoreGated)
    assert isinstance(adapt(TinyGated()), GatedNet)
    assert isinstance(adapt(nn.Sequential(nn.Flatten(), nn.Linear(12, 3))), StaticNet)
    with pytest.raises(ConfigError) as err:
        adapt(lambda x: x)
    assert "nn.Module" in _one_line(err)


def test_dsn_answers_the_protocol_as_its_own_forward():
    torch.manual_seed(0)
    dsn = create_model("dsn", num_fine=6, num_coarse=2, depth_n=2, width=4, image_size=16).eval()
    x = torch.rand(4, 3, 16, 16)
    out, own = dsn.forward_gated(x, "hard"), dsn(x)
    assert torch.equal(out.logits, own.fine) and torch.equal(out.path, own.path) and torch.equal(out.macs, own.macs)
    frozen = dsn.forward_gated(x, "frozen", torch.zeros_like(own.path))
    assert (frozen.path == 0).all() and (frozen.macs < own.macs).all()


def test_score_gated_skips_blocks_for_real_and_counts_their_macs(aig, data):
    x = data[1].batch(slice(0, 16))[0]
    out = aig(x)
    assert torch.allclose(out.fine, aig.net(x), atol=1e-5)  # sub-batch skipping = the model's own masking
    assert torch.equal(out.path, (out.path_scores > 0).float())
    assert 0 < out.path.mean() < 1
    blocks = torch.tensor(aig.costs.gated_blocks, dtype=torch.float64)
    assert torch.allclose(out.macs, aig.costs.always_on + out.path.double() @ blocks)
    assert torch.equal(aig(x, mode="frozen", path=out.path).fine, out.fine)
    assert (aig(x, mode="open").macs == aig.full_macs).all() and aig.full_macs > out.macs.min()


@pytest.mark.parametrize("grad", ["ste", "bpda", "sharp", "eot"])
def test_score_gated_routing_gradients_reach_the_gates(aig, data, grad):
    x = data[1].batch(slice(0, 8))[0]
    hard = aig(x).fine
    xr = x.clone().requires_grad_(True)
    out = aig(xr, mode="hard", gate_grad=grad, temperature=torch.full((aig.n_gates,), 0.5))
    if grad in ("bpda", "sharp"):
        assert torch.equal(out.fine.detach(), hard)  # deployed values, surrogate gradient
    out.fine.logsumexp(1).sum().backward()
    assert xr.grad.abs().sum() > 0


def test_gated_protocol_model_gets_bpda_open_and_eot():
    torch.manual_seed(0)
    model = adapt(TinyGated(), name="tiny").eval()
    x = torch.rand(8, 3, 16, 16)
    hard = model(x)
    assert hard.path.shape == (8, 2) and model.gate_names == ["g1", "g2"]
    assert (model(x, mode="open").path == 1).all()
    xr = x.clone().requires_grad_(True)
    bpda = model(xr, mode="hard", gate_grad="bpda")
    assert torch.equal(bpda.fine.detach(), hard.fine)
    bpda.fine.sum().backward()
    assert xr.grad.abs().sum() > 0
    assert model(x, mode="hard", gate_grad="eot").fine.shape == hard.fine.shape


# ---------------------------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------------------------


def test_convnet_aig_goes_through_every_gate_aware_analysis(aig, data, tmp_path):
    result = _attack(tmp_path / "aig", aig, data[1], attacks=["pgd", "path", "slowdown"],
                     gate_grads=["none", "bpda", "sharp", "eot"], eot_samples=2)
    rec, manifest = result.records, result.manifest
    assert manifest["path_names"] == aig.gate_names and len(manifest["gated_block_macs"]) == aig.n_gates
    assert set(manifest["zero_grad_share"]) >= {"hard/none", "hard/bpda"} and "hard/bpda" in manifest[
        "surrogate_fidelity"]
    assert set(rec["gate_grad"]) == {"none", "bpda", "sharp", "eot"}
    assert (rec["clean_path"].str.len() == aig.n_gates).all()
    attacked = rec[rec["eps"] > 0]
    assert (attacked["hamming"] > 0).any()  # the attacks move paths
    same_path = attacked["clean_path"] == attacked["adv_path"]
    assert (attacked.loc[same_path, "frozen_pred_fine"] == attacked.loc[same_path, "adv_pred_fine"]).all()
    summary = summarize(rec, manifest["full_macs"], n_boot=50)
    assert summary["gated"].all() and (summary["n_gates"] == aig.n_gates).all()
    assert summary.loc[summary["eps"] > 0, "path_changed"].notna().all()
    checks = {c.name: c for c in run_checks(rec, zero_grad_share=manifest["zero_grad_share"])}
    routing = next(c for name, c in checks.items() if "outing" in name)
    assert routing.status in ("pass", "warn")  # compared, not skipped
    assert checks["Coarse-head analyses"].status == "skip"  # the example has one head
    assert (rec["adv_pred_coarse"] == NO_HEAD).all()


def test_plain_classifier_gets_single_head_records_and_analyses(data, tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, data[1].info.num_fine))
    x = data[1].batch(slice(0, 4))[0]
    assert torch.equal(LogitsView(net)(x), net(x))
    result = _attack(tmp_path / "plain", adapt(net, name="linear"), data[1], attacks=["pgd"])
    rec = result.records
    assert (rec["model"] == "linear").all() and (rec["clean_path"] == "").all()
    for column in ("clean_pred_coarse", "adv_pred_coarse", "frozen_pred_coarse"):
        assert (rec[column] == NO_HEAD).all()
    assert (rec["label_coarse"] >= 0).all()  # the data's own hierarchy is kept
    assert (rec["frozen_pred_fine"] == rec["adv_pred_fine"]).all()
    assert not has_coarse_head(rec)
    summary = summarize(rec, result.manifest["full_macs"], data[1].info.fine_to_coarse, n_boot=50)
    assert summary["clean_acc_coarse"].isna().all() and summary["clean_acc_fine"].notna().all()
    notes = [c for c in run_checks(rec) if c.name == "Coarse-head analyses"]
    assert len(notes) == 1 and notes[0].status == "skip" and "skipped" in notes[0].evidence
    with pytest.raises(ConfigError) as err:
        _attack(tmp_path / "coarse", adapt(net), data[1], attacks=["pgd"], target="coarse")
    assert "coarse" in _one_line(err)


def test_single_head_data_has_no_invented_coarse_label(tmp_path):
    with pytest.raises(DataError):
        DatasetInfo("flat", ("a", "b"), (), (0, 1), (0.5,) * 3, (0.25,) * 3, 8)
    info = DatasetInfo("flat", ("a", "b", "c"), (), (), (0.5,) * 3, (0.25,) * 3, 8)
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    data = CoarseFineDataset(info, images, torch.arange(12) % 3, "test")
    assert not info.has_coarse and (data.coarse == NO_HEAD).all()
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    rec = _attack(tmp_path / "flat", adapt(net), data, attacks=["pgd"], eps=[EPS]).records
    assert (rec["label_coarse"] == NO_HEAD).all()
    summary = summarize(rec, n_boot=50)
    assert summary["same_superclass"].isna().all()
    assert not any("superclass" in c for c in summary_table(summary).columns)


def test_two_head_dsn_keeps_its_coarse_columns(data):
    torch.manual_seed(0)
    info = data[1].info
    model = create_model("dsn", num_fine=info.num_fine, num_coarse=info.num_coarse, depth_n=2, width=4,
                         image_size=16).eval()
    x = data[1].batch(slice(0, 8))[0]
    ev = evaluate(model, x)
    assert model.heads == ("fine", "coarse")
    assert torch.equal(ev.coarse, model(x).coarse.argmax(1)) and (ev.coarse >= 0).all()


# ---------------------------------------------------------------------------------------------------------------
# model files
# ---------------------------------------------------------------------------------------------------------------


def test_model_file_builds_loads_weights_and_survives_a_checkpoint(tmp_path, data):
    nets = tmp_path / "nets.py"
    shutil.copy(EXAMPLE, nets)
    model = build_from_spec(f"{nets}:build", options={"width": 4}, derived={"num_classes": 6, "unused": 1})
    assert model.config == {"num_classes": 6, "width": 4} and model.model_name == "nets:build"
    torch.save(model.net.state_dict(), tmp_path / "w.pt")
    again = build_from_spec(str(nets), tmp_path / "w.pt", options={"width": 4, "num_classes": 6})
    x = data[1].batch(slice(0, 4))[0]
    assert torch.equal(again(x).fine, model(x).fine)
    save_checkpoint(tmp_path / "c.pt", again, data[1].info)
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt.model_source == parse_model_spec(f"{nets}:build").to_dict()
    assert torch.equal(ckpt.build_model()(x).fine, model(x).fine)

    nets.rename(tmp_path / "moved.py")
    with pytest.raises(CheckpointError) as err:
        ckpt.build_model()
    assert str(nets) in _one_line(err) and "c.pt" in str(err.value)


def test_model_file_mistakes_are_one_line(tmp_path):
    nets = tmp_path / "nets.py"
    nets.write_text("import torch\n\ndef build():\n    return torch.nn.Linear(2, 2)\n")
    with pytest.raises(ConfigError) as err:
        load_model_file(str(tmp_path / "missing.py") + ":build")
    assert "missing.py" in _one_line(err) and "does not exist" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_model_file(f"{nets}:make")
    assert "'make'" in _one_line(err) and "build" in str(err.value)
    with pytest.raises(ConfigError) as err:
        build_from_spec(f"{nets}:build", options={"width": 3})
    assert "width" in _one_line(err)
    with pytest.raises(ConfigError) as err:
        load_model_file("no_such_entry_point")
    assert "dsn_robustness.models" in _one_line(err)
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom\\nsecond line')\n")
    with pytest.raises(ConfigError) as err:
        load_model_file(f"{broken}:build")
    assert "boom" in _one_line(err)
    bad = tmp_path / "bad.pt"
    torch.save({"w": object()}, bad)
    with pytest.raises(CheckpointError) as err:
        load_weights(bad)
    assert "refused" in _one_line(err)


def test_entry_point_names_a_factory_of_an_installed_package(tmp_path, monkeypatch):
    import importlib.metadata

    import models.model_file as model_file

    shutil.copy(EXAMPLE, tmp_path / "aig_pkg_nets.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint("my_aig", "aig_pkg_nets:build", model_file.ENTRY_POINT_GROUP)
    monkeypatch.setattr(model_file.importlib.metadata, "entry_points",
                        lambda group: [ep] if group == model_file.ENTRY_POINT_GROUP else [])
    model = build_from_spec("my_aig", options={"width": 4})
    assert isinstance(model, ScoreGated) and model.source.kind == "entry_point" and model.model_name == "my_aig"


def test_attack_command_attacks_a_model_file_and_names_what_is_missing(tmp_path, capsys):
    from robustness.app.cli import main
    from robustness.results import load_run

    nets = tmp_path / "nets.py"
    shutil.copy(EXAMPLE, nets)
    model = build_from_spec(f"{nets}:build", derived={"num_classes": 16})  # synthetic's default: 4 x 4 classes
    torch.save(model.net.state_dict(), tmp_path / "w.pt")
    run_dir = tmp_path / "run"
    argv = ["attack", str(run_dir), "--model-file", f"{nets}:build", "--weights", str(tmp_path / "w.pt"),
            "--dataset", "synthetic", "--attacks", "fgsm", "--eps", "8/255", "--n", "8", "--gate-grad", "none,bpda",
            "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    records = load_run(run_dir).records
    assert set(records["model"]) == {"nets:build"} and set(records["gate_grad"]) == {"none", "bpda"}
    assert records["sample"].nunique() == 8 and (records["clean_path"].str.len() == len(model.gate_names)).all()
    capsys.readouterr()

    for missing, culprit in ((["--weights", str(tmp_path / "w.pt")], "--dataset"),
                             (["--dataset", "synthetic"], "--weights")):
        assert main(["attack", str(tmp_path / "other"), "--model-file", str(nets), *missing]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("dsn-robust attack: error:") and culprit in err
    assert main(["attack", str(tmp_path / "other"), "--model-file", str(tmp_path / "gone.py"), "--weights",
                 str(tmp_path / "w.pt"), "--dataset", "synthetic"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "gone.py" in err
    assert not (tmp_path / "other").exists()
