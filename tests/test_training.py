"""Training: metrics and checkpoints, the staged schedule, determinism, exact resume, DDP, and the CLI's handling of
bad input (one line on stderr, non-zero exit, run directory untouched)."""
from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import models.training.trainer as trainer
from models.checkpoint import load_checkpoint
from models.network import CoarseFineNet
from models.training import METRIC_COLUMNS, TrainConfig, read_metrics, train
from models.training.optim import param_groups
from robustness.app import cli
from robustness.core.errors import ConfigError, RunDirError
from robustness.core.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]

#: A tiny but real run: 3 epochs (1 warm-up, 1 ramp), 16 px synthetic images, ResNet-14-ish with width 4.
TINY = dict(model="dsn", model_options={"depth_n": 2, "width": 4, "open_bias": 0.3},
            dataset="synthetic", data_options={"n": 320, "image_size": 16}, test_limit=160,
            epochs=3, batch_size=32, lr=0.05, warmup_epochs=1, ramp_epochs=1,
            slope_start=1.0, slope_growth=2.0, threads=1, seed=0)

TINY_TOML = """
[data]
name = "synthetic"
n = 320
image_size = 16
test_limit = 160

[model]
depth_n = 2
width = 4
open_bias = 0.3

[train]
epochs = 2
batch_size = 32
lr = 0.05
warmup_epochs = 1
ramp_epochs = 1
threads = 1
"""

#: TINY_TOML on fewer images for the DDP launch: one step per rank and epoch is all the test needs (each rank's
#: share of every epoch, rank 0 alone writing), and the processes' start-up is most of its time anyway
DDP_TOML = TINY_TOML.replace("n = 320", "n = 64").replace("test_limit = 160", "test_limit = 32")


def tiny(**changes) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, **changes})


def rows_without_seconds(path: Path) -> list[dict]:
    rows = read_metrics(path)
    for row in rows:
        row.pop("seconds")
    return rows


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (to prove a failed command left the run directory untouched)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class Recorder:
    """Spies on the training loop: the gate mode of every training forward and the gate weight of every loss."""

    def __init__(self, monkeypatch):
        self.modes: list[tuple[int, str]] = []
        self.gate_weights: list[tuple[int, float]] = []
        self.epoch = 1
        real_loss = trainer.dsn_loss
        real_forward = CoarseFineNet.forward
        recorder = self

        def loss_spy(out, fine, coarse, weights, gate_weight=1.0):
            recorder.gate_weights.append((recorder.epoch, gate_weight))
            return real_loss(out, fine, coarse, weights, gate_weight)

        def forward_spy(model, x, **kwargs):
            if model.training:
                recorder.modes.append((recorder.epoch, kwargs.get("mode")))
            return real_forward(model, x, **kwargs)

        monkeypatch.setattr(trainer, "dsn_loss", loss_spy)
        monkeypatch.setattr(CoarseFineNet, "forward", forward_spy)

    def callback(self, epoch: int, row: dict) -> None:
        self.epoch = epoch + 1


@pytest.fixture(scope="module")
def dsn_run(tmp_path_factory):
    """One tiny dsn run, trained while recording the schedule it followed."""
    mp = pytest.MonkeyPatch()
    try:
        recorder = Recorder(mp)
        out = tmp_path_factory.mktemp("train") / "dsn"
        result = train(tiny(), out, callbacks=[recorder.callback], progress=False)
    finally:
        mp.undo()
    return RunDir.at(out), result, recorder


# --------------------------------------------------------------------------------------------------------------
# What a run writes
# --------------------------------------------------------------------------------------------------------------


def test_run_writes_metrics_config_checkpoints_and_marker(dsn_run):
    run, result, _ = dsn_run
    lines = run.metrics.read_text().splitlines()
    assert lines[0].split(",") == list(METRIC_COLUMNS)
    rows = read_metrics(run.metrics)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert math.isclose(r["loss"], r["ce_fine"] + r["ce_coarse"], rel_tol=1e-6) or r["budget"] > 0
        for key in ("train_acc_fine", "train_acc_coarse", "test_acc_fine", "test_acc_coarse", "skip_coarse",
                    "skip_fine", "macs_saved", "gated_macs_saved"):
            assert 0.0 <= r[key] <= 1.0, (key, r[key])
        assert r["lr"] > 0 and r["seconds"] > 0
    # cosine decay: the learning rate falls from epoch to epoch, starting at the peak
    assert rows[0]["lr"] == pytest.approx(0.05) and rows[0]["lr"] > rows[1]["lr"] > rows[2]["lr"]
    assert json.loads(run.config.read_text()) == tiny().to_dict()
    assert run.train_done.is_file()
    last, best = load_checkpoint(run.last_checkpoint), load_checkpoint(run.best_checkpoint)
    assert last.model_name == "dsn" and last.train_state["epoch"] == 3
    assert {"optimizer", "scheduler", "rng", "history"} <= set(last.train_state)
    assert best.train_state["epoch"] == result.best_epoch >= 2  # warm-up epochs never count as best
    assert best.metrics["test_acc_fine"] == max(r["test_acc_fine"] for r in rows[1:])
    # MACs columns agree with the model's cost table
    model = last.build_model()
    final = rows[-1]
    assert final["macs_mean"] <= model.full_macs + 1e-3
    assert final["macs_saved"] == pytest.approx(1 - final["macs_mean"] / model.full_macs)


def test_gate_rate_is_set_from_test_data(dsn_run):
    run, _, _ = dsn_run
    final = read_metrics(run.metrics)[-1]
    model = load_checkpoint(run.last_checkpoint).build_model()
    rate = model.gate_rate
    n_coarse = sum(1 for g in model.gate_names if g.startswith("coarse."))
    assert float(1 - rate[:n_coarse].mean()) == pytest.approx(final["skip_coarse"], abs=1e-6)
    assert float(1 - rate[n_coarse:].mean()) == pytest.approx(final["skip_fine"], abs=1e-6)


def test_staged_schedule(dsn_run):
    run, _, recorder = dsn_run
    rows = read_metrics(run.metrics)
    # warm-up: every training forward runs with gates open, gate terms off, and the evaluated gates skip nothing
    assert {m for e, m in recorder.modes if e == 1} == {"open"}
    assert {m for e, m in recorder.modes if e > 1} == {"hard"}
    assert all(w == 0.0 for e, w in recorder.gate_weights if e == 1)
    assert rows[0]["budget"] == 0.0 and rows[0]["rank"] == 0.0
    assert rows[0]["skip_coarse"] == 0.0 and rows[0]["skip_fine"] == 0.0
    # then the budget and ranking terms are ramped in linearly over ramp_epochs (1) and stay at full weight
    ramp = [w for e, w in recorder.gate_weights if e == 2]
    assert 0 < ramp[0] < ramp[-1] == 1.0 and ramp == sorted(ramp)
    assert all(w == 1.0 for e, w in recorder.gate_weights if e == 3)
    assert rows[1]["budget"] > 0 and rows[2]["budget"] > 0
    # hard-sigmoid slope: slope_start during warm-up, then +slope_growth per gated epoch
    assert [r["slope"] for r in rows] == [1.0, 1.0, 3.0]
    assert float(load_checkpoint(run.last_checkpoint).state_dict["slope"]) == 3.0


def test_weight_decay_spares_bn_biases_and_gates():
    from models.registry import create_model
    model = create_model("dsn", num_fine=4, num_coarse=2, depth_n=2, width=4, image_size=16)
    decay, no_decay = param_groups(model, 5e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed and all(".gates." not in n and not n.endswith("bias") and ".bn" not in n for n in decayed)
    assert any(".gates." in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# --------------------------------------------------------------------------------------------------------------
# Determinism and resume
# --------------------------------------------------------------------------------------------------------------


def test_same_seed_same_metrics_other_seed_differs(dsn_run, tmp_path):
    run, _, _ = dsn_run
    train(tiny(), tmp_path / "again", progress=False)
    assert rows_without_seconds(tmp_path / "again" / "metrics.csv") == rows_without_seconds(run.metrics)
    train(tiny(seed=1, epochs=1), tmp_path / "seed1", progress=False)
    assert rows_without_seconds(tmp_path / "seed1" / "metrics.csv")[0] != rows_without_seconds(run.metrics)[0]


def _interrupt_after(epoch: int):
    def callback(e: int, row: dict) -> None:
        if e == epoch:
            raise KeyboardInterrupt
    return callback


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path):
    # gumbel gates draw noise from the global torch generator once the warm-up (epoch 1) is over: cut after the
    # gated epoch 2, the resumed epoch 3 matches only if the generator's state was saved and restored
    config = tiny(model_options={"depth_n": 2, "width": 4, "gate_fn": "gumbel"})
    train(config, tmp_path / "whole", progress=False)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(config, out, callbacks=[_interrupt_after(2)], progress=False)
    assert [r["epoch"] for r in read_metrics(out / "metrics.csv")] == [1, 2]
    assert not (out / "train.done").exists()
    before = snapshot(out)
    with pytest.raises(RunDirError, match="--resume"):  # unfinished run: neither resumed nor overwritten silently
        train(config, out, progress=False)
    assert snapshot(out) == before
    result = train(config, out, resume=True, progress=False)
    assert result.resumed_from == 2
    resumed = rows_without_seconds(out / "metrics.csv")
    assert [r["epoch"] for r in resumed] == [1, 2, 3]  # no duplicate rows
    assert resumed == rows_without_seconds(tmp_path / "whole" / "metrics.csv")
    a = load_checkpoint(out / "checkpoints" / "last.pt").state_dict
    b = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finished_run_resume_is_a_no_op_and_force_starts_over(tmp_path):
    config = tiny(model="resnet", model_options={"depth_n": 2, "width": 4}, epochs=1)
    train(config, tmp_path / "r", progress=False)
    before = snapshot(tmp_path / "r")
    with pytest.raises(RunDirError, match="finished"):
        train(config, tmp_path / "r", progress=False)
    result = train(config, tmp_path / "r", resume=True, progress=False)
    assert result.nothing_to_do and result.last["epoch"] == 1
    assert snapshot(tmp_path / "r") == before
    result = train(config.replace(epochs=2), tmp_path / "r", force=True, progress=False)
    assert not result.nothing_to_do
    assert [r["epoch"] for r in read_metrics(tmp_path / "r" / "metrics.csv")] == [1, 2]


def test_config_validation():
    for bad in (dict(epochs=0), dict(epochs=-1), dict(batch_size=0), dict(lr=0.0), dict(lr=-0.1),
                dict(schedule="linear"), dict(target_fine=1.5), dict(model="vgg"), dict(dataset="mnist"),
                dict(model_options={"depth_n": 2, "colour": 1}), dict(epochs="3")):
        with pytest.raises(ConfigError):
            tiny(**bad)
    with pytest.raises(ConfigError, match="unknown option"):
        TrainConfig.from_tables({"train": {"epochz": 3}})
    config = TrainConfig.from_tables({"data": {"name": "synthetic", "n": 64, "test_limit": 8},
                                      "model": {"name": "dual", "width": 4}, "train": {"epochs": 5}})
    assert (config.model, config.model_options, config.data_options, config.test_limit, config.epochs) == \
        ("dual", {"width": 4}, {"n": 64}, 8, 5)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_lr_schedules():
    cos = tiny(epochs=10, lr=0.1)
    assert cos.lr_factor(0) == 1.0 and cos.lr_factor(5) == pytest.approx(0.5) and cos.lr_factor(10) < 1e-9
    step = tiny(epochs=10, schedule="step", milestones=[4, 8], gamma=0.1)
    assert [round(step.lr_factor(t), 6) for t in (0, 3.9, 4, 7.5, 8, 9.9)] == [1, 1, 0.1, 0.1, 0.01, 0.01]


def test_lr_warmup_ramps_from_its_start_to_the_peak():
    """He et al. 2016 warm ResNet-110 up at a tenth of the peak (the default start): the factor starts there,
    rises monotonically per iteration and meets the schedule at the end of the warm-up."""
    for start in (0.1, 0.25, 1.0):
        config = tiny(epochs=10, schedule="step", milestones=[6], lr_warmup_epochs=2, lr_warmup_start=start)
        ts = [i / 50 for i in range(0, 101)]  # 50 iterations an epoch over the 2 warm-up epochs
        factors = [config.lr_factor(t) for t in ts]
        assert factors[0] == pytest.approx(start)
        assert all(b >= a for a, b in zip(factors, factors[1:]))
        assert factors[-1] == 1.0 and config.lr_factor(1.98) == pytest.approx(1 - (1 - start) / 100)
    assert tiny(lr_warmup_epochs=1).lr_factor(0) == pytest.approx(0.1)  # the default start
    assert tiny(lr_warmup_epochs=0, lr_warmup_start=0.5).lr_factor(0) == 1.0  # no warm-up: the start is unused
    cifar100 = TrainConfig.from_tables(tomllib.loads((REPO / "configs/cifar100.toml").read_text()))
    assert cifar100.lr * cifar100.lr_factor(0) == pytest.approx(0.01)  # epoch 1 of ResNet-110 starts at 0.01


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), "0.1"])
def test_lr_warmup_start_must_be_a_factor_in_0_1(bad):
    with pytest.raises(ConfigError, match="lr_warmup_start"):
        tiny(lr_warmup_epochs=1, lr_warmup_start=bad)


# --------------------------------------------------------------------------------------------------------------
# DDP under torchrun
# --------------------------------------------------------------------------------------------------------------


def test_ddp_two_gloo_processes(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(DDP_TOML)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "robustness", "train", "--config", str(cfg), "--out", str(out), "--no-progress",
         "--device", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # only rank 0 writes: one row per epoch, one summary, no stray temporary files
    rows = read_metrics(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert proc.stdout.count("last (epoch 2)") == 1
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == \
        ["checkpoints/best.pt", "checkpoints/last.pt", "config.json", "metrics.csv", "train.done"]
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt.train_state["epoch"] == 2
    assert proc.stderr.count("on cpu x2") == 1  # rank 0 trained in a group of two, and alone logged it


# --------------------------------------------------------------------------------------------------------------
# The CLI on bad input: one line, non-zero exit, no traceback, run directory untouched
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_dual(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "dual"
    train(tiny(model="dual", model_options={"depth_n": 2, "width": 4}, epochs=1), out, progress=False)
    return out


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(["train", "--no-progress", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def run_copy(finished_dual, tmp_path) -> Path:
    import shutil
    dst = tmp_path / "run"
    shutil.copytree(finished_dual, dst)
    return dst


@pytest.mark.parametrize("args, needles", [
    (["--model", "vgg"], ["unknown model 'vgg'", "dsn"]),
    (["--dataset", "mnist"], ["unknown dataset 'mnist'", "synthetic"]),
    (["--dataset", "cifar100"], ["cifar100", "root"]),
    (["--epochs", "0"], ["epochs must be >= 1"]),
])
def test_cli_bad_input_writes_nothing(tmp_path, capsys, args, needles):
    out = tmp_path / "new"
    code, _, err = run_cli(["--out", str(out), *args], capsys)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


@pytest.mark.parametrize("args, needles", [
    (["--model", "vgg"], ["unknown model 'vgg'", "dsn"]),
    (["--dataset", "mnist"], ["unknown dataset 'mnist'", "synthetic"]),
    (["--epochs", "0"], ["epochs must be >= 1"]),
    (["--epochs", "-3"], ["epochs must be >= 1"]),
    (["--lr", "0"], ["lr must be a finite number > 0"]),
    (["--batch-size", "0"], ["batch_size"]),
    ([], ["finished run", "--resume", "--force"]),
    (["--resume", "--model", "dsn"], ["does not match", "model is 'dual', expected 'dsn'"]),
])
def test_cli_bad_input_leaves_run_dir_untouched(run_copy, capsys, args, needles):
    before = snapshot(run_copy)
    code, _, err = run_cli(["--model", "dual", "--depth-n", "2", "--width", "4", "--out", str(run_copy), *args],
                           capsys)
    assert_one_line_error(code, err, *needles)
    assert snapshot(run_copy) == before


def _unfinish(run: Path) -> None:
    (run / "train.done").unlink()


def test_cli_resume_with_other_models_checkpoint(run_copy, capsys):
    _unfinish(run_copy)
    before = snapshot(run_copy)
    code, _, err = run_cli(["--model", "dsn", "--out", str(run_copy), "--resume"], capsys)
    assert_one_line_error(code, err, "does not match", "model is 'dual', expected 'dsn'")
    assert snapshot(run_copy) == before


def test_cli_resume_with_other_dataset_options(run_copy, capsys):
    _unfinish(run_copy)
    before = snapshot(run_copy)
    cfg = json.loads((run_copy / "config.json").read_text())
    code, _, err = run_cli(["--out", str(run_copy), "--resume", "--config", str(_toml(run_copy.parent, {
        "data": {**cfg["data_options"], "image_size": 24}}))], capsys)
    assert_one_line_error(code, err, "does not match", "image size differs")
    assert snapshot(run_copy) == before


def _toml(folder: Path, tables: dict) -> Path:
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    path = folder / "override.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_resume_with_truncated_checkpoint(run_copy, capsys):
    _unfinish(run_copy)
    last = run_copy / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = snapshot(run_copy)
    code, _, err = run_cli(["--out", str(run_copy), "--resume"], capsys)
    assert_one_line_error(code, err, "corrupt or truncated")
    assert snapshot(run_copy) == before


class _Exploit:
    """Unpickling this calls ``open(marker, "w")``, which creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_cli_refuses_malicious_pickle(run_copy, capsys, tmp_path):
    _unfinish(run_copy)
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Exploit(str(proof)))).close()
    assert proof.exists()  # a plain unpickler would run it
    marker = tmp_path / "pwned"
    with open(run_copy / "checkpoints" / "last.pt", "wb") as fh:
        pickle.dump({"format": "dsn-robustness/checkpoint/v1", "payload": _Exploit(str(marker))}, fh, protocol=2)
    torch.save({"x": _Exploit(str(marker))}, tmp_path / "zip.pt")  # the zip flavour too
    before = snapshot(run_copy)
    code, _, err = run_cli(["--out", str(run_copy), "--resume"], capsys)
    assert_one_line_error(code, err, "refused")
    assert not marker.exists()
    assert snapshot(run_copy) == before
    (run_copy / "checkpoints" / "last.pt").write_bytes((tmp_path / "zip.pt").read_bytes())
    code, _, err = run_cli(["--out", str(run_copy), "--resume"], capsys)
    assert_one_line_error(code, err, "refused")
    assert not marker.exists()


def test_cli_flags_override_config_file_and_resolve(tmp_path, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_TOML)
    out = tmp_path / "run"
    code, stdout, _ = run_cli(["--config", str(cfg), "--out", str(out), "--epochs", "1", "--model", "dsn",
                               "--gate-fn", "ste", "--no-film", "--no-feedback", "--seed", "5"], capsys)
    assert code == 0
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["epochs"] == 1 and resolved["seed"] == 5 and resolved["lr"] == 0.05
    assert resolved["model_options"] == {"depth_n": 2, "width": 4, "open_bias": 0.3, "gate_fn": "ste",
                                         "feedback": False, "film": False}
    assert resolved["data_options"] == {"n": 320, "image_size": 16}
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt.model_config["gate_fn"] == "ste" and ckpt.model_config["film"] is False
    assert "best (epoch" in stdout and "MACs saved" in stdout
    # --resume on the finished run: nothing to do, said so, exit 0
    code, stdout, _ = run_cli(["--out", str(out), "--resume"], capsys)
    assert code == 0 and "nothing to do" in stdout


# --------------------------------------------------------------------------------------------------------------
# Options shared between models; the hard-sigmoid saturation warning
# --------------------------------------------------------------------------------------------------------------

FAST = dict(dataset="synthetic", data_options={"n": 64, "image_size": 16}, test_limit=16, epochs=1, batch_size=32,
            threads=1, seed=0)


def test_an_option_no_model_has_is_an_error_listing_the_valid_ones():
    with pytest.raises(ConfigError, match=r"model 'resnet' has no option\(s\) colour.*valid: num_fine, num_coarse"):
        TrainConfig.from_dict(dict(model="resnet", model_options={"colour": 1}))


def test_an_option_of_another_model_is_left_out_for_this_one(tmp_path, caplog):
    from robustness.data import dataset_info

    from models.training.config import model_kwargs
    config = TrainConfig.from_dict(dict(FAST, model="resnet", model_options={"depth_n": 2, "width": 4,
                                                                             "gate_fn": "ste", "film": False}))
    info = dataset_info("synthetic", image_size=16)
    with caplog.at_level("DEBUG", logger="models.training.config"):
        kwargs = model_kwargs(config, info)
    assert "gate_fn" not in kwargs and "film" not in kwargs and kwargs["depth_n"] == 2
    assert "left out" in caplog.text and "film, gate_fn" in caplog.text
    result = train(config, tmp_path / "r", progress=False)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["model_options"]["gate_fn"] == "ste"
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert ckpt.model_config["depth_n"] == 2 and "gate_fn" not in ckpt.model_config and result.epochs == 1


def _saturation_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "saturates the hard sigmoid" in r.getMessage()]


def test_default_hardsig_dsn_logs_no_saturation_warning(tmp_path, caplog):
    config = TrainConfig.from_dict(dict(FAST, model="dsn", model_options={"depth_n": 2, "width": 4}))
    with caplog.at_level("WARNING"):
        train(config, tmp_path / "default", progress=False)
    assert load_checkpoint(tmp_path / "default" / "checkpoints" / "last.pt").model_config["open_bias"] == 0.4
    assert _saturation_warnings(caplog) == []


def test_saturating_open_bias_logs_the_warning(tmp_path, caplog):
    # open_bias * slope_start + 0.5 = 0.25 * 2 + 0.5 = 1.0 >= 1: saturated from the first step
    config = TrainConfig.from_dict(dict(FAST, model="dsn", model_options={"depth_n": 2, "width": 4,
                                                                          "open_bias": 0.25}, slope_start=2.0))
    with caplog.at_level("WARNING"):
        train(config, tmp_path / "saturated", progress=False)
    warnings = _saturation_warnings(caplog)
    assert len(warnings) == 1 and "open_bias 0.25 with slope_start 2.00" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING"):  # the same bias with the straight-through gate: no hard sigmoid to saturate
        train(config.replace(model_options={"depth_n": 2, "width": 4, "open_bias": 0.25, "gate_fn": "ste"}),
              tmp_path / "ste", progress=False)
    assert _saturation_warnings(caplog) == []
