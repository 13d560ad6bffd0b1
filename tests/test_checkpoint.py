"""Checkpoints: exact round trip, identity checks, refusal of foreign / truncated / missing files, atomic writes."""
from __future__ import annotations

import pytest
import torch

import models.checkpoint as checkpoint
from models.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from models.registry import create_model
from robustness.data import dataset_info
from robustness.core.errors import CheckpointError

INFO = dataset_info("synthetic", image_size=16)


def tiny_model(name: str, **changes):
    opts = dict(num_fine=INFO.num_fine, num_coarse=INFO.num_coarse, image_size=16, depth_n=2, width=4,
                mean=INFO.mean, std=INFO.std)
    if name == "dsn":
        opts["open_bias"] = 0.1
    opts.update(changes)
    torch.manual_seed(0)
    model = create_model(name, **opts)
    # make every parameter and buffer non-default so that a missed one shows in the outputs
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        if model.is_gated:
            model.gate_rate.uniform_(0.2, 0.8)
            model.slope.fill_(7.0)
    return model.eval()


@pytest.mark.parametrize("name", ["dsn", "dual", "resnet"])
def test_round_trip_rebuilds_an_identical_model(tmp_path, name):
    model = tiny_model(name)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, INFO, {"epoch": 4}, {"test_acc_fine": 0.5})
    ckpt = load_checkpoint(path)
    assert ckpt.model_name == name and ckpt.dataset == INFO
    assert ckpt.train_state == {"epoch": 4} and ckpt.metrics == {"test_acc_fine": 0.5}
    assert torch.__version__.startswith(ckpt.versions["torch"])
    rebuilt = ckpt.build_model()
    assert not rebuilt.training
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for mode in (["hard", "open", "soft"] if model.is_gated else ["hard"]):
            a, b = model(x, mode=mode), rebuilt(x, mode=mode)
            assert torch.equal(a.fine, b.fine) and torch.equal(a.coarse, b.coarse), mode
            assert torch.equal(a.path, b.path) and torch.equal(a.macs, b.macs)
    for key, value in model.state_dict().items():
        assert torch.equal(value, rebuilt.state_dict()[key]), key
    if model.is_gated:  # the random control mode draws at the stored per-gate rates
        with torch.no_grad():
            torch.manual_seed(3)
            a = model(x, mode="random")
            torch.manual_seed(3)
            b = rebuilt(x, mode="random")
        assert torch.equal(a.path, b.path) and torch.equal(a.fine, b.fine)


def test_checkpoint_config_holds_only_constructor_options(tmp_path):
    save_checkpoint(tmp_path / "d.pt", tiny_model("dsn"), INFO)
    config = load_checkpoint(tmp_path / "d.pt").model_config
    assert "gated" not in config and config["depth_n"] == 2 and config["gate_fn"] == "hardsig"


def test_check_matches_names_model_and_dataset_differences(tmp_path):
    save_checkpoint(tmp_path / "d.pt", tiny_model("dsn"), INFO)
    ckpt = load_checkpoint(tmp_path / "d.pt")
    ckpt.check_matches("dsn", {"depth_n": 2, "width": 4}, INFO)  # itself: no error
    with pytest.raises(CheckpointError, match="model is 'dsn', expected 'dual'"):
        ckpt.check_matches("dual")
    with pytest.raises(CheckpointError, match="model option depth_n=2, expected 3"):
        ckpt.check_matches("dsn", {"depth_n": 3})
    other = dataset_info("synthetic", image_size=24)
    with pytest.raises(CheckpointError, match="image size differs"):
        ckpt.check_matches("dsn", None, other)
    fewer = dataset_info("synthetic", image_size=16, n_coarse=3)
    with pytest.raises(CheckpointError, match="classes differ"):
        ckpt.check_matches("dsn", None, fewer)


def test_foreign_missing_and_truncated_files_are_refused(tmp_path):
    model = tiny_model("resnet")
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a dsn-robustness checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a dsn-robustness checkpoint"):
        load_checkpoint(tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")
    save_checkpoint(tmp_path / "ok.pt", model, INFO)
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"format": FORMAT, "model": {"name": "resnet"}}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="missing or has a malformed field"):
        load_checkpoint(tmp_path / "partial.pt")


def test_weights_that_do_not_fit_the_model_are_a_checkpoint_error(tmp_path):
    save_checkpoint(tmp_path / "r.pt", tiny_model("resnet"), INFO)
    ckpt = load_checkpoint(tmp_path / "r.pt")
    ckpt.model_config["width"] = 8  # the file claims one architecture, holds weights of another
    with pytest.raises(CheckpointError, match="weights do not fit"):
        ckpt.build_model()


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, tiny_model("resnet"), INFO, {"epoch": 1})
    before = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, tiny_model("resnet"), INFO, {"epoch": 2})
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary file left behind
    monkeypatch.undo()
    assert load_checkpoint(path).train_state["epoch"] == 1
