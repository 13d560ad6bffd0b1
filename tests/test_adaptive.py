"""Gate-aware attacks and controls: slowdown, path, frozen-path control, routing gradients, transfer."""
from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from attacks.adapters import evaluate
from attacks.base import Target, attack_class
from attacks.checks import zero_gradient_share
from attacks.records import conform
from attacks.runner import AttackConfig, Batch, EvalPlan, Scorer, load_run_checkpoint, run_attacks
from models.checkpoint import load_checkpoint, save_checkpoint
from robustness.core.runtime import derive_seed
from models.network import CoarseFineNet, ModelOutput
from robustness.data import load_dataset
from robustness.core.errors import ConfigError
from attack_helpers import copy_run, skipping_dsn, load_test_images

EPS = 8 / 255



@pytest.fixture(scope="module")
def gate_records(tiny_runs, tmp_path_factory) -> dict[str, pd.DataFrame]:
    """slowdown, path and PGD on the tiny dsn and dual (hard gates)."""
    root = tmp_path_factory.mktemp("adaptive")
    out = {}
    for name in ("dsn", "dual"):
        run = skipping_dsn(tiny_runs[name], root / name) if name == "dsn" else copy_run(tiny_runs[name], root / name)
        config = AttackConfig(attacks=["pgd", "path", "slowdown"], backends="torchattacks", eps=[EPS], n=64,
                              batch_size=64, steps=10, params={"pgd": {"restarts": 1}}, gate_grads=["none"], target="coarse",
                              seed=1)
        out[name] = run_attacks(run.root, config, progress=False).records
    return out


@pytest.fixture(scope="module")
def dsn(tiny_runs, tmp_path_factory):
    run = skipping_dsn(tiny_runs["dsn"], tmp_path_factory.mktemp("gated") / "dsn")
    model = load_run_checkpoint(run).build_model("cpu")
    x, fine, coarse = load_test_images(run, 64)
    return model, x, fine, coarse


def test_slowdown_raises_macs_on_dsn_only(gate_records):
    slow = gate_records["dsn"][gate_records["dsn"]["attack"] == "slowdown"]
    assert len(slow) == 64
    assert (slow["adv_macs"] >= slow["clean_macs"]).all()  # the clean input is the fallback
    assert slow["adv_macs"].mean() > slow["clean_macs"].mean() * 1.02
    assert (slow["adv_path"].str.count("1") >= slow["clean_path"].str.count("1")).any()
    static = gate_records["dual"][gate_records["dual"]["attack"] == "slowdown"]
    assert (static["adv_macs"] == static["clean_macs"]).all() and (static["linf"] == 0).all()
    assert (static["adv_pred_fine"] == static["clean_pred_fine"]).all()
    assert (static["adv_pred_coarse"] == static["clean_pred_coarse"]).all()


def test_path_attack_changes_more_gates_than_pgd(gate_records):
    df = gate_records["dsn"]
    ham = df.groupby("attack")["hamming"].mean()
    assert ham["path"] > ham["pgd"]
    assert (df.loc[df["attack"] == "path", "linf"] <= EPS + 1e-6).all()
    # on a model without gates the path term vanishes
    static = gate_records["dual"]
    assert (static["hamming"] == 0).all() and (static["clean_path"] == "").all()


def test_frozen_control_columns(gate_records):
    for name, df in gate_records.items():
        same = df["hamming"] == 0
        # with an unchanged path the frozen forward is the adversarial forward
        assert (df.loc[same, "frozen_pred_fine"] == df.loc[same, "adv_pred_fine"]).all()
        assert (df.loc[same, "frozen_pred_coarse"] == df.loc[same, "adv_pred_coarse"]).all()
        assert (df["frozen_correct"] == (df["frozen_pred_coarse"] == df["label_coarse"])).all()
    static = gate_records["dual"]
    assert (static["frozen_pred_fine"] == static["adv_pred_fine"]).all()
    assert (gate_records["dsn"]["hamming"] > 0).any()


def test_frozen_control_matches_a_full_frozen_forward(dsn):
    model, x, fine, coarse = dsn
    target = Target(model, "fine", "hard", "none")
    adv = attack_class("path", "native")("linf", lam=5.0, steps=10).perturb(target, x, fine, [EPS], seed=0)[0]
    scorer = Scorer(model, "dsn", "dsn", 0)
    batch = Batch(0, torch.arange(64).numpy(), x, fine, coarse)
    clean = scorer.clean(batch, "hard")
    outcome = evaluate(model, adv, "hard")
    assert (outcome.path != clean.path).any()
    frozen_fine, frozen_coarse = scorer.frozen(adv, outcome, clean)
    full = evaluate(model, adv, "frozen", path=clean.path)
    assert torch.equal(frozen_fine, full.fine) and torch.equal(frozen_coarse, full.coarse)
    assert torch.equal(full.path, clean.path)
    # the records frame carries the same numbers, already in the contract's columns and dtypes
    plan = EvalPlan(attack_class("pgd", "torchattacks")("linf"), [0.0, EPS], "hard", "none", "fine")
    frame = scorer.score(plan, batch, [x.clone(), adv], unit_seed=0)
    pd.testing.assert_frame_equal(frame, conform(frame))
    at = frame[frame["eps"] == EPS]
    assert (at["frozen_pred_fine"].to_numpy() == full.fine.numpy()).all()
    assert (at["adv_pred_fine"].to_numpy() == outcome.fine.numpy()).all()
    assert (at["hamming"].to_numpy() == (outcome.path != clean.path).sum(1).numpy()).all()


def _gate_param_grad(model: CoarseFineNet, x, y, grad: str) -> float:
    model.zero_grad(set_to_none=True)
    with model.gating(mode="hard", gate_grad=grad, eot_samples=4):
        loss = F.cross_entropy(model(x.clone().requires_grad_()).fine, y)
    loss.backward()
    gates = [p for name, p in model.named_parameters() if ".gates." in name]
    assert gates
    total = sum(float(p.grad.abs().sum()) for p in gates if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return total


def test_routing_gradient_modes(dsn):
    model, x, fine, _ = dsn
    torch.manual_seed(0)
    # 'none': the hard threshold passes no gradient to the gates; the relaxations do
    assert _gate_param_grad(model, x, fine, "none") == 0.0
    for grad in ("ste", "bpda", "sharp", "eot"):
        assert _gate_param_grad(model, x, fine, grad) > 0.0, grad
    # and the attacker's examples differ accordingly
    pgd = attack_class("pgd", "torchattacks")("linf", steps=5, restarts=1, random_start=False)
    advs = {g: pgd.perturb(Target(model, "fine", "hard", g), x, fine, [EPS], seed=0)[0] for g in ("none", "bpda")}
    assert not torch.equal(advs["none"], advs["bpda"])
    # hard forward values are the same in every routing mode (only gradients differ)
    with torch.no_grad():
        ref = model(x, mode="hard", gate_grad="none").fine
        assert torch.allclose(model(x, mode="hard", gate_grad="bpda").fine, ref, atol=1e-5)


class _Constant(CoarseFineNet):
    """Logits that do not depend on the input: every input gradient is exactly zero."""

    def __init__(self):
        super().__init__((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        self.w = torch.nn.Parameter(torch.randn(4))

    def _run(self, x, state):
        logits = self.w.expand(x.shape[0], 4) + 0 * x.flatten(1)[:, :1].detach()
        return ModelOutput(fine=logits, coarse=logits, macs=torch.zeros(x.shape[0]))


def test_zero_gradient_share(dsn):
    model, x, fine, _ = dsn
    assert zero_gradient_share(model, x, fine, "hard", "none") == 0.0
    assert zero_gradient_share(model, x, fine, "hard", "bpda") == 0.0
    assert zero_gradient_share(_Constant().eval(), x, torch.zeros(64, dtype=torch.long)) == 1.0


def test_transfer_from_static_to_dsn(tiny_runs, tmp_path):
    dsn_run = copy_run(tiny_runs["dsn"], tmp_path / "dsn")
    config = AttackConfig(attacks=["pgd"], backends="torchattacks", eps=[0.0, EPS], n=32, batch_size=32, steps=5,
                          params={"pgd": {"restarts": 1}}, gate_grads="none,bpda", subset="first")  # compared with the first 32 below
    result = run_attacks(dsn_run.root, config, transfer_from=tiny_runs["dual"].root, progress=False)
    df = result.records
    assert set(df["source_run"]) == {"dual"} and set(df["attack"]) == {"pgd"} and set(df["run"]) == {"dsn"}
    assert set(df["gate_grad"]) == {"none"}  # the source has no gates to differentiate through
    assert [e["id"] for e in result.manifest["evaluations"]] == ["pgd__torchattacks__linf__hard__none__fine__from-dual"]
    # clean predictions are the attacked (dsn) model's, the examples come from the dual model
    model = load_run_checkpoint(dsn_run).build_model("cpu")
    x, fine, _ = load_dataset("synthetic", "test", image_size=16, seed=0).batch(slice(0, 32))
    clean = evaluate(model, x)
    first = df[df["eps"] == EPS].sort_values("sample")
    assert (first["clean_pred_fine"].to_numpy() == clean.fine.numpy()).all()
    assert (first["linf"] > 0).all() and (df.loc[df["eps"] == 0, "success"] == False).all()  # noqa: E712
    # the examples are exactly what PGD crafts on the dual model with this evaluation's derived seed, keeping per
    # sample its most confident candidate on the source (keep_first=False: the first fooling one rarely transfers)
    dual = load_run_checkpoint(tiny_runs["dual"]).build_model("cpu")
    unit_seed = derive_seed(0, result.manifest["evaluations"][0]["id"], 0)
    pgd = attack_class("pgd", "torchattacks")("linf", steps=5, restarts=1)
    adv = pgd(Target(dual, "fine", keep_first=False), x, fine, [0.0, EPS], unit_seed)[1]
    first_fooling = pgd(Target(dual, "fine"), x, fine, [0.0, EPS], unit_seed)[1]
    assert not torch.equal(adv, first_fooling)  # the transfer rule is in force, not the white-box one
    assert (first["adv_pred_fine"].to_numpy() == evaluate(model, adv).fine.numpy()).all()
    assert torch.allclose(torch.tensor(first["linf"].to_numpy()), (adv - x).abs().flatten(1).amax(1).double())


def test_transfer_needs_the_same_dataset(tiny_runs, tmp_path):
    other = copy_run(tiny_runs["dual"], tmp_path / "other")
    ckpt = load_checkpoint(other.best_checkpoint)
    model = ckpt.build_model("cpu")
    info = dataclasses.replace(ckpt.dataset, name="cifar100")
    for path in (other.best_checkpoint, other.last_checkpoint):
        save_checkpoint(path, model, info)
    dsn_run = copy_run(tiny_runs["dsn"], tmp_path / "dsn")
    with pytest.raises(ConfigError, match="cannot transfer attacks from run 'other' to run 'dsn': dataset differs"):
        run_attacks(dsn_run.root, AttackConfig(attacks=["fgsm"], n=8), transfer_from=other.root, progress=False)
    assert not dsn_run.attacks.exists()


def test_open_and_random_gate_modes(tiny_runs, tmp_path):
    run = skipping_dsn(tiny_runs["dsn"], tmp_path / "dsn")
    config = AttackConfig(attacks=["fgsm", "pgd"], backends="torchattacks", eps=[0.0, 1 / 255], target="coarse",
                          gate_modes="hard,open,random", gate_grads="none,ste", n=32, batch_size=32, steps=3,
                          params={"pgd": {"restarts": 1}})
    result = run_attacks(run.root, config, progress=False)
    df = result.records
    # routing gradients exist only in hard mode
    modes = df.groupby("gate_mode")["gate_grad"].unique().map(sorted).to_dict()
    assert modes == {"hard": ["none", "ste"], "open": ["none"], "random": ["none"]}
    full = result.manifest["full_macs"]
    opened = df[df["gate_mode"] == "open"]
    assert (opened["clean_path"] == "1111").all() and (opened["adv_path"] == "1111").all()
    assert (opened["clean_macs"] == full).all() and (opened["adv_macs"] == full).all()
    hard = df[df["gate_mode"] == "hard"]
    assert (hard["clean_macs"] < full).any()
    rnd = df[df["gate_mode"] == "random"]
    assert rnd["clean_path"].nunique() > 1
    # eps 0 is the clean input in every mode, random draws included
    zero = df[df["eps"] == 0]
    assert (zero["adv_pred_coarse"] == zero["clean_pred_coarse"]).all() and (zero["hamming"] == 0).all()
    # the clean outcome is one per (sample, mode), shared by every evaluation
    assert (df.groupby(["gate_mode", "sample"])["clean_path"].nunique() == 1).all() and len(df) == 8 * 2 * 32
    assert (df.groupby(["gate_mode", "sample"])["clean_pred_coarse"].nunique() == 1).all()
    assert set(result.manifest["zero_grad_share"]) == {"hard/none", "hard/ste", "open/none", "random/none"}
