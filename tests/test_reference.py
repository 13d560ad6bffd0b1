"""The reference PGD (robustness/bench/reference.py, ``dsn-robust bench reference``): first fooling iterate kept,
examples within budget and re-scored, at least as strong as a plain PGD, the comparison with the suite's records,
the ``--max-gap`` exit code, and ``bench`` without a mode still timing skipping."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from attack_helpers import copy_run, skipping_dsn
from attacks.records import RECORD_COLUMNS, conform
from attacks.runner import load_eval_data, load_run_checkpoint
from robustness.app import cli
from robustness.bench.reference import ReferenceConfig, attack_at_eps, first_fooling_pgd, loss_per_sample, run_reference
from robustness.bench.reference_compare import compare_with_suite, suite_rows
from robustness.core.errors import ConfigError
from robustness.core.rundir import RunDir

N = 32
HEAD = "coarse"  # the tiny models' fine head is near chance; their coarse head is robust at small eps


@pytest.fixture(scope="module")
def gated_dsn(tiny_runs, tmp_path_factory) -> RunDir:
    """The tiny dsn with gates that skip about 30% of inputs (read-only here)."""
    return skipping_dsn(tiny_runs["dsn"], tmp_path_factory.mktemp("reference") / "dsn")


def _model_and_data(run: RunDir, n: int = N):
    ckpt = load_run_checkpoint(run)
    data, _ = load_eval_data(run, ckpt, n)
    x, _, coarse = data.batch(slice(None))
    return ckpt.build_model("cpu"), x, coarse


def _deployed(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x, mode="hard", gate_grad="none").logits(HEAD).argmax(1)


def _plain_pgd_robust(model, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 5) -> int:
    """Robust count under a single-restart PGD (CE, plain gradient) that keeps its last iterate."""
    torch.manual_seed(0)
    alpha = 2.5 * eps / steps
    adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv, mode="hard", gate_grad="none").logits(HEAD), y)
        (g,) = torch.autograd.grad(loss, adv)
        adv = torch.min(torch.max(adv.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return int(((_deployed(model, x) == y) & (_deployed(model, adv) == y)).sum())


# -- the attack --------------------------------------------------------------------------------------------------


def test_first_fooling_iterate_is_kept_where_a_later_iterate_unfools():
    # The gradient pushes x up all the way to the ball's edge 0.6; the deployed prediction is wrong only inside
    # (0.52, 0.56), so a last-iterate PGD finds nothing while the first fooling iterate is a valid example.
    def grad_logits(x):
        return torch.cat([torch.zeros_like(x), 10.0 * x], dim=1)

    def deployed(x):
        return ((x[:, 0] > 0.52) & (x[:, 0] < 0.56)).long()

    x, y, eps, steps = torch.full((64, 1), 0.5), torch.zeros(64, dtype=torch.long), 0.1, 50
    assert (deployed(torch.full((1, 1), 0.5 + eps)) == 0).all()  # where every trajectory ends: not fooled
    for loss in ("ce", "margin"):
        torch.manual_seed(0)
        fooled, adv = first_fooling_pgd(grad_logits, deployed, x, y, eps, steps, 2.5 * eps / steps, loss)
        # every start below 0.56 crosses the band in steps of 0.005 (about 80% of uniform starts in [0.4, 0.6])
        assert 32 < int(fooled.sum()) < 64
        assert (deployed(adv[fooled]) != 0).all()
        assert ((adv - x).abs() <= eps + 1e-6).all()
        assert torch.equal(adv[~fooled], x[~fooled])


def test_margin_loss_is_best_other_minus_true():
    z = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 4.0]])
    assert torch.allclose(loss_per_sample(z, torch.tensor([1, 0]), "margin"), torch.tensor([-1.0, -1.0]))
    assert torch.allclose(loss_per_sample(z, torch.tensor([2, 1]), "margin"), torch.tensor([1.0, 5.0]))


def test_reference_is_within_budget_rescored_and_stronger_than_plain_pgd(gated_dsn):
    model, x, y = _model_and_data(gated_dsn)
    clean = int((_deployed(model, x) == y).sum())
    # an eps where a plain 5-step last-iterate PGD leaves some but not all clean-correct samples robust
    eps, plain = next(((e, p) for e in (1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255)
                       for p in [_plain_pgd_robust(model, x, y, e)] if 0 < p < clean), (None, None))
    assert eps is not None, "the tiny dsn has no eps where plain PGD is partly successful"
    config = ReferenceConfig(eps=(eps,), n=N, steps=5, restarts=2, grads=("none", "bpda", "sharp"), head=HEAD)
    out = attack_at_eps(model, x, y, eps, 0, config)
    assert int(out.robust.sum()) <= plain
    fooled = out.clean_correct & ~out.robust
    assert fooled.any()
    linf = (out.examples - x).abs().flatten(1).amax(1)
    assert (linf[fooled] <= eps + 1e-6).all() and out.examples.min() >= 0 and out.examples.max() <= 1
    assert out.max_linf == pytest.approx(float(linf[fooled].max()))
    assert (_deployed(model, out.examples[fooled]) != y[fooled]).all()  # a fresh forward agrees
    assert torch.equal(out.examples[~fooled], x[~fooled])
    # the overall verdict is the conjunction of the per-(gradient, loss) ones
    assert torch.equal(out.robust, torch.stack(list(out.by_run.values())).all(0))
    assert set(out.by_run) == {(g, l) for g in ("none", "bpda", "sharp") for l in ("ce", "margin")}


def test_config_rejects_what_the_reference_cannot_run():
    with pytest.raises(ConfigError, match="gate mode"):
        ReferenceConfig(gate_mode="random")
    with pytest.raises(ConfigError, match="loss"):
        ReferenceConfig(losses=("dlr",))
    with pytest.raises(ConfigError, match="eps"):
        ReferenceConfig(eps=(0.0,))


# -- the suite's records -----------------------------------------------------------------------------------------


def _records(eps: float, robust: dict[int, bool], attack: str = "pgd", gate_grad: str = "none", gate_mode: str = "hard",
             target: str = "fine", source_run: str = "", norm: str = "linf") -> pd.DataFrame:
    n = len(robust)
    rows = {c: [0] * n for c in RECORD_COLUMNS}
    rows.update(run=["dsn"] * n, model=["dsn"] * n, attack=[attack] * n, backend=["torchattacks"] * n,
                norm=[norm] * n, eps=[eps] * n, gate_mode=[gate_mode] * n, gate_grad=[gate_grad] * n,
                target=[target] * n, source_run=[source_run] * n, sample=list(robust),
                clean_correct=[True] * n, adv_correct=list(robust.values()), success=[not r for r in robust.values()],
                robust=list(robust.values()), clean_path=[""] * n, adv_path=[""] * n)
    return conform(pd.DataFrame(rows))


def test_suite_worst_case_and_containment_use_only_comparable_rows():
    eps = 2 / 255
    ok = {s: True for s in range(4)}
    records = pd.concat([
        _records(eps, {0: True, 1: True, 2: False, 3: True}),
        _records(eps, {0: True, 1: False, 2: True, 3: True}, gate_grad="bpda"),
        # none of these may count: compute attack, transfer, other gate mode, other head, L2, sample beyond n
        _records(eps, {s: False for s in range(4)}, attack="slowdown"),
        _records(eps, {s: False for s in range(4)}, source_run="dual"),
        _records(eps, {s: False for s in range(4)}, gate_mode="open"),
        _records(eps, {s: False for s in range(4)}, target="coarse"),
        _records(eps, {s: False for s in range(4)}, norm="l2"),
        _records(eps, {4: False, **ok}),
    ], ignore_index=True)
    rows = suite_rows(records, "hard", "fine", n=4)
    reference = np.array([False, False, True, True])  # fooled 0 and 1, robust 2 and 3
    c = compare_with_suite(rows, eps * (1 + 1e-12), reference)  # eps from another parse: float rounding
    # suite: robust = {0, 3} (1 and 2 fall to one attack each)
    assert (c.n, c.robust, c.reference_robust) == (4, 2, 2)
    assert (c.suite_optimistic, c.reference_optimistic) == (1, 1)
    assert c.suite_optimistic_samples == [0]
    assert c.gap == pytest.approx(0.0)
    assert c.attacks == ["pgd/bpda", "pgd/none"]
    assert compare_with_suite(rows, 1 / 255, reference) is None


# -- the command -------------------------------------------------------------------------------------------------


def _write_records(run: RunDir, eps: float, robust: dict[int, bool], name: str) -> None:
    path = run.shard(name, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    _records(eps, robust, target=HEAD).to_parquet(path)


def _files(run: RunDir) -> dict[str, float]:
    return {str(p.relative_to(run.root)): p.stat().st_mtime for p in run.root.rglob("*") if p.is_file()}


def test_cli_compares_with_records_and_max_gap_sets_the_exit_code(gated_dsn, tmp_path, capsys):
    run = copy_run(gated_dsn, tmp_path / "dsn")
    n = 16
    # deliberately optimistic at 8/255 (every sample robust), pessimistic at 2/255 (none robust); no 1/255
    _write_records(run, 8 / 255, {s: True for s in range(n)}, "pgd__optimistic")
    _write_records(run, 2 / 255, {s: False for s in range(n)}, "pgd__pessimistic")
    before = _files(run)
    args = ["bench", "reference", str(run.root), "--eps", "1/255,2/255,8/255", "--n", str(n), "--steps", "3",
            "--restarts", "1", "--grads", "none", "--head", HEAD, "--device", "cpu"]

    code = cli.main([*args, "--json-only", "--max-gap", "0"])
    result = json.loads(capsys.readouterr().out)
    one, two, eight = result["eps"]
    assert one["suite"] is None
    assert eight["suite"]["accuracy"] == 100.0
    assert eight["suite"]["gap"] == pytest.approx(100.0 - eight["accuracy"])
    assert eight["suite"]["suite_optimistic"] == n - eight["robust"]
    assert two["suite"]["gap"] == pytest.approx(-two["accuracy"])
    assert two["suite"]["reference_optimistic"] == two["robust"]
    assert result["passed"] is False and code == 1
    assert _files(run) == before  # the reference writes nothing into the run

    code = cli.main([*args, "--max-gap", "100"])
    out = capsys.readouterr().out
    assert code == 0
    table = out[out.index("reference L-inf PGD"):].splitlines()
    row = next(line for line in table if line.startswith("1/255"))
    assert row.split("|")[1].split() == ["-", "-", "-", "-"]
    row = next(line for line in table if line.startswith("8/255"))
    assert row.split("|")[1].split()[:2] == ["100.0", f"{eight['suite']['gap']:+.1f}"]
    assert any(line.startswith("PASS") for line in table)


def test_max_gap_without_records_is_an_error(tiny_runs, capsys):
    code = cli.main(["bench", "reference", str(tiny_runs["dsn"].root), "--max-gap", "1"])
    assert code == ConfigError.exit_code
    assert "has none" in capsys.readouterr().err


def test_static_model_runs_the_plain_gradient_only(tiny_runs):
    result = run_reference(str(tiny_runs["resnet"].root),
                           ReferenceConfig(eps=(8 / 255,), n=8, steps=2, restarts=1, grads=("none", "bpda", "sharp")))
    assert result.grads == ["none"] and result.temperature is None
    assert list(result.eps[0].by_grad) == ["none"]


def test_open_mode_runs_the_plain_gradient_only(gated_dsn):
    config = ReferenceConfig(eps=(8 / 255,), n=8, steps=2, restarts=1, grads=("none", "bpda"), gate_mode="open",
                             head="coarse")
    result = run_reference(str(gated_dsn.root), config)
    assert result.grads == ["none"] and list(result.eps[0].by_grad) == ["none"]


def test_bench_without_a_mode_still_times_skipping():
    parser = cli.build_parser()
    old = parser.parse_args(["bench", "--run", "R", "--json-only", "--device", "cpu"])
    assert old.handler.__name__ == "run" and old.run == "R" and old.json_only
    new = parser.parse_args(["bench", "--device", "cpu", "reference", "R", "--eps", "2/255"])
    assert new.handler.__name__ == "run_reference_command" and new.run_dir == "R" and new.device == "cpu"
    assert not new.json_only and new.eps == "2/255"


def test_the_reference_runs_at_the_runs_own_grid_by_default():
    from robustness.bench.reference_compare import DEFAULT_EPS, run_grid

    grid = (0.47 / 255, 0.75 / 255, 1.5 / 255)  # the quickstart's auto grid
    records = pd.concat([_records(e, {0: True, 1: False}) for e in grid]
                        + [_records(float("inf"), {0: True, 1: False}, attack="pgd-bisect"),
                           _records(4 / 255, {0: True, 1: True}, gate_mode="open")], ignore_index=True)
    rows = suite_rows(records, "hard", "fine", n=2)
    assert run_grid(rows) == pytest.approx(grid)  # not the open mode's 4/255, not the minimal search's inf
    assert run_grid(None) == DEFAULT_EPS and run_grid(rows.iloc[:0]) == DEFAULT_EPS


def test_the_references_finds_join_the_runs_records_and_worst_case(gated_dsn, tmp_path):
    from attacks.records import read_records, worst_case, accuracy_rows
    from attacks.runner import AttackConfig, run_attacks
    from robustness.results import load_run

    run = copy_run(gated_dsn, tmp_path / "dsn")
    # a weak menu: one FGSM step leaves samples that a PGD with restarts breaks
    run_attacks(run.root, AttackConfig(attacks=["fgsm"], backends="torchattacks", eps=["4/255", "12/255"],
                                       gate_grads=["none"], target=HEAD, n=N, batch_size=10, seed=0), progress=False)
    before = pd.read_parquet(run.worst_case)
    config = ReferenceConfig(steps=5, restarts=2, grads=("none",), head=HEAD)
    result = run_reference(str(run.root), config, record=True)
    assert result.n == N  # every attacked sample, by default
    found = sum(e.suite.suite_optimistic for e in result.eps)
    assert found > 0 and result.joined == found  # each sample the suite called robust and the reference broke
    records = read_records(run.records)
    mine = records[records["attack"] == "reference-pgd"]
    assert len(mine) == N * 2 and set(mine["gate_grad"]) == {"any"} and set(mine["eps"]) == {4 / 255, 12 / 255}
    after = pd.read_parquet(run.worst_case)
    keys = ["eps", "sample"]
    pair = before.merge(after, on=keys, suffixes=("_b", "_a"))
    assert not (pair["robust_a"] & ~pair["robust_b"]).any()  # never more robust
    assert int((pair["robust_b"] & ~pair["robust_a"]).sum()) == found
    assert after.equals(worst_case(accuracy_rows(records)))
    # a report reads them (fingerprints checked), and a second reference compares with the suite's own rows only
    assert "reference-pgd" in set(load_run(run.root).records["attack"])
    again = run_reference(str(run.root), config, record=True)
    assert [e.suite.accuracy for e in again.eps] == [e.suite.accuracy for e in result.eps]
    assert len(read_records(run.records)) == len(records)  # replaced, not duplicated
    # attack --resume on the run keeps them and adds to them
    grown = run_attacks(run.root, AttackConfig(attacks=["fgsm"], backends="torchattacks", eps=["4/255", "12/255"],
                                               gate_grads=["none"], target=HEAD, n=N, batch_size=10, seed=0),
                        resume=True, progress=False)
    assert "reference-pgd" in set(grown.records["attack"])
