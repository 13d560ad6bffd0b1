"""``batch_size = "auto"`` (attacks.runner.sizing) and true float32 during attacks (robustness.core.runtime).

CUDA sizing runs here without a GPU: the memory a batch takes comes from a fake probe (a fixed cost plus a cost
per image, an out-of-memory error above a capacity), so the tests check the search and its limits, not a device.
"""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from attacks.runner import AttackConfig, plan_evaluations, run_attacks
from attacks.runner import sizing
from attacks.runner.sizing import CPU_MAX, ROUND, cpu_batch_size, fitting_batch_size, resolve_batch_size
from models.checkpoint import load_checkpoint
from robustness.app.commands.attack import config_from_args, register
from robustness.core.errors import ConfigError, RunDirError
from robustness.core.runtime import _precision_backends, float32_state, true_float32
from robustness.data import load_dataset
from attack_helpers import copy_run
from conftest import TINY_DATA

GIB = 1 << 30
FGSM = dict(attacks=["fgsm"], backends="torchattacks", eps=["2/255"], gate_grads=["none"], target="coarse",
            n=64, seed=1)


class FakeMemory:
    """Peak bytes of a batch: ``fixed + per_image * b`` (times ``networks``); OOM above ``capacity``."""

    def __init__(self, fixed: float, per_image: float, capacity: float = math.inf):
        self.fixed, self.per_image, self.capacity = fixed, per_image, capacity
        self.asked: list[int] = []

    def peak(self, b: int, networks: int = 1) -> int:
        return int(self.fixed + networks * self.per_image * b)

    def __call__(self, b: int, networks: int = 1) -> int:
        self.asked.append(b)
        if self.peak(b, networks) > self.capacity:
            raise torch.cuda.OutOfMemoryError("fake: out of memory")
        return self.peak(b, networks)


# -- the rules ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 31, 64, 96, 128, 129, 300, 1000, 4097])
@pytest.mark.parametrize("processes", [1, 2, 3, 8])
def test_cpu_rule_fits_the_data_and_feeds_every_process(n, processes):
    size = cpu_batch_size(n, processes)
    batches = math.ceil(n / size)
    assert 1 <= size <= min(n, CPU_MAX)
    assert batches >= min(n, processes)  # no process without a batch (when there are enough samples)
    assert n - (batches - 1) * size >= size - batches  # equal batches: the last no more than one a batch short


def test_cpu_rule_examples():
    assert cpu_batch_size(1000, 1) == 125  # 8 batches of 125, not 7 x 128 + 104
    assert cpu_batch_size(300, 2) == 75  # 4 batches: 2 per worker
    assert cpu_batch_size(64, 4) == 16 and cpu_batch_size(3, 8) == 1


@pytest.mark.parametrize("n", [1, 20, 100, 1000, 100_000])
@pytest.mark.parametrize("fixed,per_image,budget", [(1e8, 1e6, 8e8), (1e8, 1e6, 8e9), (0, 3e5, 1e9),
                                                   (2e9, 5e6, 6e9), (1e6, 1e9, 2e10)])
def test_cuda_search_never_exceeds_the_data_or_the_memory_and_leaves_little(n, fixed, per_image, budget):
    memory = FakeMemory(fixed, per_image)
    size, peak, at = fitting_batch_size(n, memory, budget)
    assert 1 <= size <= n
    assert memory.peak(size) <= budget
    assert max(memory.asked) <= n and peak == memory.peak(at) and at <= size
    step = ROUND if size >= ROUND else 1  # the next rounded size would not fit (or exceeds the data)
    assert size + step > n or memory.peak(size + step) > budget


def test_cuda_search_trusts_an_out_of_memory_error_over_the_reported_free_memory():
    memory = FakeMemory(1e8, 1e6, capacity=3e9)  # the budget says 8 GB, the device fails above 3 GB
    size, _, _ = fitting_batch_size(100_000, memory, 8e9)
    assert memory.peak(size) <= 3e9 and size >= 1024


def test_cuda_search_when_nothing_fits_is_one():
    assert fitting_batch_size(1000, FakeMemory(5e9, 1e6), 1e9)[0] == 1
    assert fitting_batch_size(1000, FakeMemory(0, 1e6, capacity=0), 1e9)[0] == 1


# -- resolving a run's batch size ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dsn(tiny_runs):
    return tiny_runs["dsn"]  # read-only: tests copy it before attacking


@pytest.fixture(scope="module")
def model_and_data(tiny_dsn):
    model = load_checkpoint(tiny_dsn.best_checkpoint).build_model("cpu").requires_grad_(False)
    data = load_dataset("synthetic", "test", n=1000, **TINY_DATA)
    assert len(data) == 1000
    return model, data


def test_resolve_fixed_manifest_and_cpu(model_and_data):
    model, data = model_and_data
    cpu = torch.device("cpu")
    auto = AttackConfig(**dict(FGSM, n=1000, batch_size="auto"))
    plans = plan_evaluations(auto, model.is_gated)
    fixed = resolve_batch_size(AttackConfig(**dict(FGSM, batch_size=48)), plans, model, data, cpu,
                               previous={"batch_size": 32})
    assert (fixed.size, fixed.auto) == (48, False)  # a fixed size is never replaced (resume refuses a mismatch)
    resumed = resolve_batch_size(auto, plans, model, data, cpu, previous={"batch_size": 40})
    assert (resumed.size, resumed.auto) == (40, True)
    assert resolve_batch_size(auto, plans, model, data, cpu, world=2).size == cpu_batch_size(1000, 2)
    assert resolve_batch_size(auto, plans, model, data, cpu, agree=lambda s: 17).size == 17  # the ranks' minimum
    small = load_dataset("synthetic", "test", **TINY_DATA).subset(5)
    assert resolve_batch_size(auto, plans, model, small, cpu, agree=lambda s: 10 ** 6).size == 5


def test_resolve_on_cuda_sizes_for_the_hungriest_evaluation(model_and_data, monkeypatch):
    """The CUDA path with a fake device: EOT (8 networks) must fit, though the plain evaluations would allow 8x
    more; the data and the torchrun world cap it."""
    model, data = model_and_data
    memory = FakeMemory(fixed=2e8, per_image=2e6)
    ways = []

    def fake_peak(model_, data_, size, head, way, eot_samples, device):
        ways.append(way)
        return memory(size, networks=eot_samples if way[1] == "eot" else 2 if way[1] == "bpda" else 1)

    monkeypatch.setattr(sizing, "peak_bytes", fake_peak)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GIB, 80 * GIB))
    config = AttackConfig(**dict(FGSM, attacks=["fgsm", "square"], gate_grads="none,bpda,eot", n=1000,
                                 batch_size="auto", eot_samples=8))
    plans = plan_evaluations(config, model.is_gated)
    budget = sizing.MEMORY_SHARE * 10 * GIB
    got = resolve_batch_size(config, plans, model, data, torch.device("cuda"))
    assert got.auto and got.size <= 1000 and "cuda" in got.how
    assert memory.peak(got.size, networks=8) <= budget < memory.peak(got.size + ROUND, networks=8)
    assert ("hard", "none", False) in ways  # square: forward only, measured too
    small = resolve_batch_size(config, plans, model, data, torch.device("cuda"), world=4)
    assert small.size <= 250  # each of 4 ranks gets a batch


def test_the_cuda_probe_measures_a_backward_for_gradient_attacks_only(model_and_data, monkeypatch):
    """peak_bytes on the CPU with CUDA's memory counters faked: a gradient attack's step is measured with
    autograd on (forward and backward), a gradient-free one's without, and the peak is reported above the
    memory allocated before."""
    model, data = model_and_data
    counters = {"allocated": 100, "peak": 100}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: counters.update(peak=100))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: counters["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: counters["peak"])
    grad_enabled = []

    def hook(module, inputs, output):
        grad_enabled.append(torch.is_grad_enabled())
        counters["peak"] += inputs[0].shape[0]  # "memory" grows with the batch

    handle = model.register_forward_hook(hook)
    try:
        for way, grads in ((("hard", "bpda", True), True), (("hard", "none", False), False)):
            grad_enabled.clear()
            peak = sizing.peak_bytes(model, data, 24, "fine", way, 2, torch.device("cpu"))
            assert grad_enabled and set(grad_enabled) == {grads}
            assert peak == 24 * len(grad_enabled)
    finally:
        handle.remove()


# -- configuration -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["0", "big", "64", 2.5, True, 0, -1])
def test_bad_batch_sizes_are_one_line_config_errors(bad):
    with pytest.raises(ConfigError, match=r'batch_size must be a positive integer .*or "auto"') as err:
        AttackConfig(batch_size=bad)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="batch_size"):
        AttackConfig.from_table({"batch_size": bad})


def test_auto_from_table_and_flag():
    assert AttackConfig.from_table({"batch_size": "auto"}).batch_auto
    assert AttackConfig(batch_size="Auto").batch_size == "auto" and not AttackConfig(batch_size=64).batch_auto
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert config_from_args(parser.parse_args(["attack", "RUN", "--batch-size", "auto"])).batch_auto
    assert config_from_args(parser.parse_args(["attack", "RUN", "--batch-size", "64"])).batch_size == 64
    with pytest.raises(ConfigError, match="got 'big'"):
        config_from_args(parser.parse_args(["attack", "RUN", "--batch-size", "big"]))


# -- the run -----------------------------------------------------------------------------------------------------


def test_auto_run_records_the_size_and_a_resume_reuses_it(tiny_dsn, tmp_path):
    run = copy_run(tiny_dsn, tmp_path / "dsn")
    fresh = run_attacks(run.root, AttackConfig(**dict(FGSM, batch_size="auto")), progress=False)
    m = fresh.manifest
    assert (m["batch_size"], m["batch_size_auto"], m["n_batches"]) == (64, True, 1)  # cpu rule: 64 <= 128
    assert m["config"]["batch_size"] == "auto"
    assert m["float32"] == {"tf32": False, "matmul_precision": "highest"}

    made = copy_run(tiny_dsn, tmp_path / "made")
    run_attacks(made.root, AttackConfig(**dict(FGSM, batch_size=16)), progress=False)
    shards = sorted(made.records.rglob("*.parquet"))
    written = []
    resumed = run_attacks(made.root, AttackConfig(**dict(FGSM, attacks=["fgsm", "pgd"], steps=2,
                                                         batch_size="auto")),
                          resume=True, progress=False, on_shard=written.append)
    assert resumed.manifest["batch_size"] == 16 and resumed.manifest["n_batches"] == 4
    assert sorted(p.name for p in written) == [f"shard-{b:05d}.parquet" for b in range(4)]  # pgd only
    assert sorted(made.records.rglob("*.parquet")) == sorted(shards + written)
    assert len(resumed.records) == 2 * 64 and not resumed.records.duplicated(["attack", "sample"]).any()
    with pytest.raises(RunDirError, match="batch_size=16, this run asks for batch_size=32"):
        run_attacks(made.root, AttackConfig(**dict(FGSM, batch_size=32)), resume=True, progress=False)


# -- true float32 ------------------------------------------------------------------------------------------------


@pytest.fixture
def restore_precision():
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32 = before[1]


def _legacy() -> tuple[bool, bool, str]:
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())


@pytest.mark.parametrize("start", ["highest", "high", "medium"])
def test_true_float32_turns_tf32_off_and_restores_it(start, restore_precision):
    torch.set_float32_matmul_precision(start)
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for cuDNN convolutions
    before = _legacy()
    with true_float32():
        assert _legacy() == (False, False, "highest")
        assert float32_state() == {"tf32": False, "matmul_precision": "highest"}
    assert _legacy() == before and float32_state()["tf32"]
    with pytest.raises(RuntimeError, match="boom"):
        with true_float32():
            raise RuntimeError("boom")
    assert _legacy() == before


def test_true_float32_restores_the_per_backend_precisions(restore_precision):
    """torch >= 2.9 refuses to read the legacy flags once the per-backend API set a state they cannot express."""
    backends = list(_precision_backends())
    if not backends:
        pytest.skip("this torch has no per-backend fp32_precision")
    saved = [b.fp32_precision for b in backends]
    try:
        torch.backends.cudnn.conv.fp32_precision = "ieee"  # cuDNN: conv exact, rnn TF32 (legacy-unreadable)
        before = [b.fp32_precision for b in backends]
        with true_float32():
            assert [b.fp32_precision for b in backends] == ["ieee"] * len(backends)
            assert not float32_state()["tf32"]
        assert [b.fp32_precision for b in backends] == before
    finally:
        for b, value in zip(backends, saved):
            b.fp32_precision = value


def test_manifest_records_exact_float32_whatever_the_global_flags(tiny_dsn, tmp_path, restore_precision):
    """The manifest says what was in force during the attack, not what the process had set globally."""
    torch.set_float32_matmul_precision("high")
    run = copy_run(tiny_dsn, tmp_path / "dsn")
    result = run_attacks(run.root, AttackConfig(**dict(FGSM, batch_size=32)), progress=False)
    assert json.loads(run.manifest.read_text())["float32"] == {"tf32": False, "matmul_precision": "highest"}
    assert result.manifest["batch_size_auto"] is False
    assert torch.get_float32_matmul_precision() == "high"
