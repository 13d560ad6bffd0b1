"""The attack cascade: later attacks skip what earlier ones broke, carry their rows, and leave the worst case as it is."""
from __future__ import annotations

from typing import ClassVar

import pandas as pd
import pytest
import torch

from attacks.base import ITERATIVE, Attack, Target, register, unregister
from attacks.records import read_records, worst_case
from attacks.runner import AttackConfig, run_attacks
from attacks.runner.cascade import CARRIED_COLUMNS
from attacks.runner.plan import plan_evaluations
from robustness.core.errors import RunDirError
from attack_helpers import copy_run, skipping_dsn

EPS = ["1/255", "4/255", "12/255"]
BASE = dict(eps=EPS, gate_grads=["none", "sharp"], target="fine", n=32, batch_size=16, seed=1,
            backends=["native", "torchattacks"], params={"pgd": {"steps": 4, "restarts": 1, "random_start": False}})


class Probe(Attack):
    """Returns the clean image and notes, per budget, which samples its tracker left it to attack."""

    name, backend, kind = "probe", "native", ITERATIVE
    seen: ClassVar[list[tuple[str, float, list[int]]]] = []

    def run(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
        Probe.seen.append((target.gate_grad, eps, target.tracker.pending(eps).tolist()))
        return x.clone()


@pytest.fixture
def probe():
    register(Probe)
    Probe.seen.clear()
    yield Probe
    unregister("probe", "native")


@pytest.fixture(scope="module")
def gated(tiny_runs, tmp_path_factory):
    return skipping_dsn(tiny_runs["dsn"], tmp_path_factory.mktemp("cascade") / "dsn")


def _rows(df: pd.DataFrame, attack: str, grad: str) -> pd.DataFrame:
    part = df[(df["attack"] == attack) & (df["gate_grad"] == grad) & (df["eps"] > 0)]
    return part.sort_values(["eps", "sample"]).reset_index(drop=True)


def test_a_later_attack_runs_only_on_what_the_earlier_ones_left_robust(gated, tmp_path, probe):
    run = copy_run(gated, tmp_path / "dsn")
    records = run_attacks(run.root, AttackConfig(attacks=["fgsm", "probe"], **BASE), progress=False).records
    assert Probe.seen, "the probe never ran"
    first = records[records["attack"] == "fgsm"]
    for grad in ("none", "sharp"):
        fgsm, probed = _rows(records, "fgsm", grad), _rows(records, "probe", grad)
        # what the probe was handed: per budget exactly the samples fgsm left robust in that routing gradient
        for eps in sorted(fgsm["eps"].unique()):
            at = fgsm[fgsm["eps"] == eps]
            left = sorted(at.loc[at["robust"], "sample"].tolist())
            handed = sorted(s + 16 * batch for batch, (g, e, index) in
                            enumerate(x for x in Probe.seen if x[0] == grad and x[1] == eps) for s in index)
            assert handed == left, (grad, eps)
        broken = (fgsm["clean_correct"] & ~fgsm["robust"]).to_numpy()
        assert broken.any() and (~broken & fgsm["clean_correct"]).any(), "the fixture needs both kinds of sample"
        # a settled sample's row is fgsm's, adversarial columns and all, and says who found it
        for column in CARRIED_COLUMNS:
            assert probed.loc[broken, column].tolist() == fgsm.loc[broken, column].tolist(), column
        assert set(probed.loc[broken, "found_by"]) == {"fgsm"}
        assert set(probed.loc[~broken, "found_by"]) == {"probe"}
        assert not probed.loc[~broken, "success"].any()  # the clean image fools nothing
    assert set(first["found_by"]) == {"fgsm"}


def test_the_cascade_leaves_the_worst_case_as_it_is_and_costs_less(gated, tmp_path):
    both = {}
    for cascade in (True, False):
        run = copy_run(gated, tmp_path / f"c{cascade}")
        both[cascade] = run_attacks(run.root, AttackConfig(attacks=["fgsm", "pgd"], cascade=cascade, **BASE),
                                    progress=False).records
    keys = ["gate_mode", "eps", "sample"]
    worst = {c: worst_case(df).sort_values(keys).reset_index(drop=True) for c, df in both.items()}
    assert worst[True]["robust"].tolist() == worst[False]["robust"].tolist()
    assert (~worst[True]["robust"]).sum() > 0
    for grad in ("none", "sharp"):
        on, off = _rows(both[True], "pgd", grad), _rows(both[False], "pgd", grad)
        # pgd's rows under the cascade are "robust after fgsm and pgd": never more robust than pgd alone
        assert (on["robust"].astype(int) <= off["robust"].astype(int)).all()
        carried = on["found_by"] == "fgsm"
        assert carried.any()
        # where pgd attacked, it did exactly what it does alone (deterministic start, per-sample computation)
        assert on.loc[~carried, "robust"].tolist() == off.loc[~carried, "robust"].tolist()


def test_a_resume_reads_the_earlier_attack_from_its_shard(gated, tmp_path):
    config = AttackConfig(attacks=["fgsm", "pgd"], **BASE)
    run = copy_run(gated, tmp_path / "dsn")
    whole = run_attacks(run.root, config, progress=False).records
    for shard in run.records.glob("pgd__*/shard-00001.parquet"):
        shard.unlink()
    resumed = run_attacks(run.root, config, resume=True, progress=False).records
    order = ["attack", "gate_grad", "eps", "sample"]
    pd.testing.assert_frame_equal(resumed.sort_values(order).reset_index(drop=True),
                                  whole.sort_values(order).reset_index(drop=True))
    with pytest.raises(RunDirError, match="after"):
        run_attacks(run.root, AttackConfig(attacks=["fgsm", "pgd"], cascade=False, **BASE), resume=True,
                    progress=False)


def test_the_plan_links_each_cascade_and_puts_refining_attacks_last():
    config = AttackConfig(attacks=["pgd-refine", "fgsm", "pgd", "fmn"], eps=EPS, gate_grads=["none", "sharp"],
                          distance_norms=["linf"], backends=["native", "torchattacks", "foolbox"])
    plans = plan_evaluations(config, gated=True)
    ids = {p.id: p for p in plans}
    assert [p.name for p in plans][-2:] == ["pgd-refine", "pgd-refine"]
    pgd_sharp = next(p for p in plans if p.name == "pgd" and p.gate_grad == "sharp")
    assert [ids[q].name for q in pgd_sharp.after] == ["fgsm"] and ids[pgd_sharp.after[0]].gate_grad == "sharp"
    assert all(not p.after for p in plans if p.name in ("fgsm", "fmn"))  # first of its group; minimal: none
    refine = plans[-1]
    assert {ids[q].name for q in refine.after} == {"fgsm", "pgd", "fmn"}
    assert {ids[q].gate_grad for q in refine.after} == {"none", "sharp"}  # bounds from every routing gradient
    independent = plan_evaluations(AttackConfig(attacks=["fgsm", "pgd"], eps=EPS, cascade=False), gated=True)
    assert all(not p.after for p in independent)
    auto = plan_evaluations(AttackConfig(attacks=["pgd-refine", "fgsm", "fmn"], eps="auto",
                                         distance_norms=["linf"]), gated=True)
    assert {p.name for p in auto} == {"fmn"}  # the refinement waits for the fixed-budget attacks
