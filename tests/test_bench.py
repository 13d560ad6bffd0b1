"""The skipping benchmark (robustness.bench.skipping) and its operator counts (robustness.bench.profile).

Only structure and counts are asserted: timings are benchmark numbers, never test conditions.
"""
from __future__ import annotations

import json

import pytest
import torch

from models.registry import create_model
from robustness.bench.profile import count_ops
from robustness.bench.skipping import ideal_saving, parse_batch_sizes, run_benchmark
from robustness.app.cli import main
from robustness.core.errors import ConfigError

TINY = dict(num_fine=10, num_coarse=4, depth_n=3, width=4, image_size=16)
TINY_FLAGS = ["--depth-n", "2", "--width", "4", "--image-size", "16", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def dsn() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("dsn", **TINY).eval()


def _forward(model, x, **kw):
    def call():
        with torch.no_grad():
            return model(x, **kw)
    return call


def test_open_and_masked_forwards_never_read_the_device(dsn, x):
    assert count_ops(_forward(dsn, x, mode="open")).host_syncs == 0
    dsn.gate_rate.fill_(0.5)
    try:
        assert count_ops(_forward(dsn, x, mode="random", execution="mask")).host_syncs == 0
    finally:
        dsn.gate_rate.fill_(1.0)


def test_hard_subbatch_syncs_at_most_once_per_gate(x):
    torch.manual_seed(1)
    model = create_model("dsn", **TINY).eval()
    gates = [g for branch in (model.coarse, model.fine) for stage in branch.gates for g in stage]  # path order
    with torch.no_grad():
        scores = model(x, mode="hard").path_scores
        for k, gate in enumerate(gates):  # centre each gate's scores on the batch: its decisions vary per sample
            gate.fc2.bias -= scores[:, k].median() + 1e-6
        path = model(x, mode="hard").path
    assert ((path > 0).any(0) & (path == 0).any(0)).any(), "some gate should vary across the batch"
    syncs = count_ops(_forward(model, x, mode="hard")).host_syncs
    assert 1 <= syncs <= model.n_gates


def test_static_twin_has_no_syncs_and_fewer_dispatched_ops(dsn, x):
    twin = create_model("dual", **TINY).eval()
    dual_ops = count_ops(_forward(twin, x))
    open_ops = count_ops(_forward(dsn, x, mode="open"))
    assert dual_ops.host_syncs == 0
    assert open_ops.aten_top > dual_ops.aten_top  # the gates and FiLM cost something
    assert open_ops.aten_ops >= open_ops.aten_top and dual_ops.kernels is None  # CPU: no kernel count


def test_open_mode_costs_four_operators_per_gate_beyond_the_static_twin(dsn, x):
    """A gate head is mean -> linear (BatchNorm folded in) -> ReLU -> linear; the rest of the open forward adds
    a constant handful (score columns, path bits, the cached FiLM): no decision or FiLM network per forward."""
    twin = create_model("dual", **TINY).eval()
    extra = count_ops(_forward(dsn, x, mode="open")).aten_top - count_ops(_forward(twin, x)).aten_top
    assert extra <= 4 * dsn.n_gates + 5, f"{extra} extra operators for {dsn.n_gates} gates"


def test_ideal_saving_formula():
    ideal = ideal_saving([0.002, 0.004], [0.5, 0.25], t_open=0.010, t_hard=0.0085)
    assert ideal.ideal_saving_s == pytest.approx(0.002)
    assert ideal.ideal_fraction == pytest.approx(0.2)
    assert ideal.achieved_saving_s == pytest.approx(0.0015)
    assert ideal.achieved_of_ideal == pytest.approx(0.75)
    assert ideal_saving([0.002], [0.0], t_open=0.01, t_hard=0.01).achieved_of_ideal is None
    with pytest.raises(ValueError):
        ideal_saving([0.1], [0.5, 0.5], 1.0, 1.0)


def _bench(skip: float):
    return run_benchmark(skip=skip, batch_sizes=(4,), repeats=1, depth_n=2, width=4, image_size=16,
                         attack_overhead=False)


def test_no_skip_has_no_ideal_saving():
    ideal = _bench(0.0).batches[0].ideal
    assert ideal.skip_share == [0.0] * 4
    assert ideal.ideal_saving_s == 0.0 and ideal.achieved_of_ideal is None


def test_full_skip_ideal_is_every_gated_block():
    batch = _bench(1.0).batches[0]
    ideal = batch.ideal
    assert ideal.skip_share == [1.0] * 4 and batch.skip == 1.0
    assert len(ideal.block_seconds) == 4 and all(t > 0 for t in ideal.block_seconds)
    assert ideal.ideal_saving_s == pytest.approx(sum(ideal.block_seconds))
    seconds = {t.variant: t.seconds_min for t in batch.timings}
    achieved = seconds["dsn open"] - seconds["dsn hard (sub-batch)"]
    assert ideal.achieved_saving_s == pytest.approx(achieved)
    assert ideal.achieved_of_ideal == pytest.approx(achieved / ideal.ideal_saving_s)
    assert batch.hard_vs_masked_time == pytest.approx(seconds["dsn hard (sub-batch)"] / seconds["dsn masked"])


def test_json_has_one_entry_per_batch_size(capsys):
    assert main(["bench", "--batch-size", "1,3", "--repeats", "1", "--no-attack-overhead", "--json-only",
                 *TINY_FLAGS]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [b["batch_size"] for b in result["batches"]] == [1, 3]
    assert result["model"]["n_gates"] == 4 and result["attack_overhead"] is None
    for b in result["batches"]:
        assert {"skip", "macs_saving", "time_saving", "efficiency", "ideal", "open_vs_dual_time",
                "open_vs_dual_aten_ops", "hard_vs_masked_time", "targets", "timings"} <= set(b)
        assert set(b["ideal"]) == {"block_seconds", "skip_share", "ideal_saving_s", "ideal_fraction",
                                   "achieved_saving_s", "achieved_of_ideal"}
        assert [t["variant"] for t in b["timings"]] == ["dsn hard (sub-batch)", "dsn masked", "dsn open", "dual",
                                                        "resnet"]
        for t in b["timings"]:
            assert {"seconds_min", "seconds_median", "spread", "aten_ops", "aten_top", "kernels",
                    "host_syncs"} <= set(t)
            assert t["seconds_min"] <= t["seconds_median"] and t["spread"] >= 1.0
        syncs = {t["variant"]: t["host_syncs"] for t in b["timings"]}
        assert syncs["dsn open"] == syncs["dsn masked"] == syncs["dual"] == syncs["resnet"] == 0


@pytest.mark.parametrize("flags", [["--batch-size", "0"], ["--batch-size", "abc"], ["--batch-size", ","],
                                   ["--batch-size", "4,-1"], ["--skip", "1.5"], ["--skip", "-0.1"],
                                   ["--image-size", "0"], ["--repeats", "0"], ["--threads", "-1"]])
def test_bad_values_are_one_line_errors(flags, capsys):
    assert main(["bench", "--no-attack-overhead", *TINY_FLAGS, *flags]) != 0
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("dsn-robust bench: error:")
    assert captured.out == ""


def test_batch_size_defaults_depend_on_the_device():
    assert parse_batch_sizes(None, torch.device("cpu")) == (1, 256)
    assert parse_batch_sizes(None, torch.device("cuda")) == (1, 256, 2048)
    assert parse_batch_sizes(" 8, 2,8", torch.device("cpu")) == (8, 2)
    with pytest.raises(ConfigError):
        parse_batch_sizes("2.5", torch.device("cpu"))
