"""Contract tests over the registries: every registered attack, model, dataset, gate function and routing gradient
meets the suite's contract, so a plug-in is tested the moment it registers (foolbox's one-table attack test and
timm's test over ``list_models()`` are the model).

Each parametrisation is built at collection time by a ``*_cases()`` function below from its registry, never from a
list kept here; the contract itself is a ``check_*`` function, so the one-file plug-in test at the end runs the
same checks on plug-ins it writes into a temporary folder, and asserts that the same ``*_cases()`` pick them up.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import models  # noqa: F401  (registers the built-in models and gate functions)
import models.gates as gates
import models.registry as model_registry
from attacks import base
from attacks.base import MINIMAL, Target, attack_class, backends_for, known_attacks, unavailable_backends
from attacks.runner import Batch, EvalPlan, Scorer
from models.checkpoint import load_checkpoint, save_checkpoint
from models.gates import gate_function, list_gate_functions
from models.protocol import adapt
from models.registry import create_model, list_models, model_options
from robustness.app import cli
from robustness.core import vocab
from robustness.core.errors import BudgetViolation
from robustness.data import dataset_info, list_datasets, load_dataset, unregister_dataset
from robustness.data.base import NO_COARSE_LABEL, SPLITS
from robustness.data.registry import dataset_needs_root, dataset_options
from test_data import write_fake_cifar10, write_fake_cifar100, write_image_tree

N_IMAGES = 4
#: the synthetic images every attack and routing gradient is checked on (16 px, the smallest synthetic geometry)
DATA = dict(n=16, image_size=16, seed=0)
#: a small architecture every built-in model allows (dsn needs two blocks a stage); options a model lacks are left
#: out for it
SMALL_MODEL = dict(depth_n=2, width=4)
#: caps on an attack's effort for the contract: any Params field of these names whose default is a larger int
CHEAP = {"steps": 3, "restarts": 1, "queries": 30, "binary_steps": 2, "search_steps": 2, "binary_search_steps": 2}
#: datasets that read a local copy, and how to write a tiny one: any other such dataset is skipped, with the reason
LOCAL_COPIES = {"cifar100": write_fake_cifar100, "cifar10": write_fake_cifar10,
                "imagefolder": lambda root: write_image_tree(root, {"animal": ["cat", "dog"], "vehicle": ["car"]})}
#: the small value of a dataset option that sets the number of generated samples
SMALL_DATA = {"n": 32}


# -- the parametrisations: read from the registries at collection ----------------------------------------------


def attack_cases() -> list:
    """One case per registered (attack, backend); one skipped case per backend module whose library is missing."""
    cases = [pytest.param(name, backend, id=f"{name}-{backend}") for name in known_attacks()
             for backend in backends_for(name)]
    for module, why in sorted(unavailable_backends().items()):
        cases.append(pytest.param(None, module, id=module.rsplit(".", 1)[-1],
                                  marks=pytest.mark.skip(reason=f"attack backend {module} unavailable: {why}")))
    return cases


def model_cases() -> list:
    return [pytest.param(name, id=name) for name in list_models()]


def dataset_cases() -> list:
    """Every registered dataset; one that reads a local copy this file cannot write is skipped, saying so."""
    cases = []
    for name in list_datasets():
        local = dataset_needs_root(name) and name not in LOCAL_COPIES
        marks = [pytest.mark.skip(reason=f"{name} reads a local copy (--data-root) and nothing is downloaded; "
                                         f"no tiny copy of it can be written here")] if local else []
        cases.append(pytest.param(name, id=name, marks=marks))
    return cases


def gate_cases() -> list:
    return [pytest.param(name, id=name) for name in list_gate_functions()]


def routing_gradients() -> list[str]:
    """The registered routing gradients: ``models.routing.GRAD_MODES`` (the registry, a live view) where it exists,
    else the fixed ``robustness.core.vocab.GRAD_MODES`` of earlier versions."""
    try:
        from models.routing import GRAD_MODES as modes
    except ImportError:
        modes = getattr(vocab, "GRAD_MODES")
    return list(modes)


def grad_cases() -> list:
    return [pytest.param(name, id=name) for name in routing_gradients()]


def case_ids(cases: list) -> list[str]:
    return [case.id for case in cases]


# -- shared subjects ---------------------------------------------------------------------------------------------


def small_model(name: str, info, **options) -> torch.nn.Module:
    """Model ``name`` at a small size on data ``info`` (which sets what it sets in training), with ``options``."""
    derived = dict(num_fine=info.num_fine, num_coarse=info.num_coarse, image_size=info.image_size,
                   in_channels=info.channels, mean=tuple(info.mean), std=tuple(info.std))
    accepted = set(model_options(name))
    return create_model(name, **{k: v for k, v in {**SMALL_MODEL, **derived}.items() if k in accepted}, **options)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", "test", **DATA)


@pytest.fixture(scope="module")
def dsn(data):
    """An untrained gated DSN and 4 images labelled with its own clean predictions: every sample starts
    clean-correct, so success is something an attack has to earn."""
    torch.manual_seed(0)
    model = small_model("dsn", data.info).eval()
    x, _, coarse = data.batch(slice(0, N_IMAGES))
    with torch.no_grad():
        y = model(x, mode="hard").fine.argmax(1)
    return model, x, y, coarse


def _norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.detach().flatten(1).double()
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def _within(dist: torch.Tensor, eps: float, norm: str) -> bool:
    limit = eps + 1e-6 if norm == "linf" else eps * (1 + 1e-5) + 1e-6
    return math.isinf(eps) or bool((dist <= limit).all())


# -- attacks -----------------------------------------------------------------------------------------------------


def cheap_options(cls: type) -> dict:
    """The effort caps of :data:`CHEAP` that ``cls.Params`` has and that lower its default."""
    defaults = cls.Params()
    out = {}
    for f in dataclasses.fields(cls.Params):
        value = getattr(defaults, f.name)
        if f.name in CHEAP and isinstance(value, int) and not isinstance(value, bool) and value > CHEAP[f.name]:
            out[f.name] = CHEAP[f.name]
    return out


def check_attack_contract(name: str, backend: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                          coarse: torch.Tensor) -> None:
    """One batch per budget, each in its budget and in [0, 1] (eps 0: the clean image), and records whose success
    is the deployed hard forward's own verdict on the example."""
    cls = attack_class(name, backend)
    norm = cls.norms[0]
    budget = 8 / 255 if norm == "linf" else 0.5
    eps = [0.0, budget, math.inf] if cls.kind == MINIMAL else [0.0, budget]
    bound = torch.full((x.shape[0],), 2 * budget, dtype=torch.float64) if cls.refines else None
    attack = cls(norm, **cheap_options(cls))
    target = Target(model, head="fine", gate_mode="hard", gate_grad="none", upper_bound=bound)
    advs = attack(target, x, y, eps, seed=0)
    assert len(advs) == len(eps)
    for e, adv in zip(eps, advs):
        assert adv.shape == x.shape and adv.dtype == x.dtype and bool(torch.isfinite(adv).all())
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0, (name, backend, e)
        assert _within(_norms(adv - x, norm), e, norm), (name, backend, e, _norms(adv - x, norm))
        if e == 0:
            assert torch.equal(adv, x)
    plan = EvalPlan(attack, list(eps), "hard", "none", "fine")
    batch = Batch(0, np.arange(x.shape[0]), x, y, coarse)
    records = Scorer(model, "contract", name, seed=0).score(plan, batch, advs, unit_seed=0)
    assert len(records) == len(eps) * x.shape[0]
    for e, adv in zip(eps, advs):
        rows = records[records["eps"] == e].sort_values("sample")
        with torch.no_grad():
            pred = model(adv, mode="hard").fine.argmax(1).numpy()
        assert (rows["adv_pred_fine"].to_numpy() == pred).all()
        assert rows["clean_correct"].all()  # the labels are the model's own clean predictions
        assert (rows["success"].to_numpy() == (pred != y.numpy())).all(), (name, backend, e)
        assert (rows["robust"].to_numpy() == (pred == y.numpy())).all()
        assert _within(torch.tensor(rows[norm].to_numpy(dtype=float)), e, norm)
    assert not records.loc[records["eps"] == 0, "success"].any()


@pytest.mark.parametrize("name, backend", attack_cases())
def test_every_registered_attack_keeps_its_budget_and_is_scored_on_the_deployed_forward(name, backend, dsn):
    check_attack_contract(name, backend, *dsn)


# -- models ------------------------------------------------------------------------------------------------------


def check_model_contract(name: str, info, x: torch.Tensor, tmp_path: Path) -> None:
    """Builds with its options on the data, gives logits of the right shapes, survives a checkpoint round trip
    read with ``weights_only=True``."""
    torch.manual_seed(0)
    model = small_model(name, info).eval()
    assert model.model_name == name and set(model.config) == set(model_options(name))
    with torch.no_grad():
        out = adapt(model)(x)
    assert tuple(out.fine.shape) == (x.shape[0], info.num_fine) and bool(torch.isfinite(out.fine).all())
    if out.coarse is not None:
        assert tuple(out.coarse.shape) == (x.shape[0], info.num_coarse)
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, model, info)
    raw = torch.load(path, weights_only=True)  # no pickle runs code: plain tensors and containers only
    assert raw["model"]["name"] == name
    loaded = load_checkpoint(path)
    assert loaded.model_name == name and loaded.dataset == info
    again = loaded.build_model()
    assert again.config == model.config
    with torch.no_grad():
        assert torch.equal(adapt(again)(x).fine, out.fine)


@pytest.mark.parametrize("name", model_cases())
def test_every_registered_model_builds_runs_and_round_trips_a_checkpoint(name, data, tmp_path):
    check_model_contract(name, data.info, data.batch(slice(0, N_IMAGES))[0], tmp_path)


# -- datasets ----------------------------------------------------------------------------------------------------


def check_dataset_contract(name: str, root: Path | None) -> None:
    """Both splits: uint8-backed images served as floats in [0, 1] of the info's geometry, fine labels in range,
    coarse labels from the info's hierarchy (or the no-coarse marker), and the info the registry describes."""
    options = {k: v for k, v in SMALL_DATA.items() if k in dataset_options(name)}
    described = dataset_info(name, root, **options)
    for split in SPLITS:
        ds = load_dataset(name, split, root=root, **options)
        info = ds.info
        assert info == described and len(ds) > 0
        x, fine, coarse = ds.batch(slice(0, min(len(ds), 16)))
        assert x.dtype == torch.float32 and tuple(x.shape[1:]) == (info.channels, info.image_size, info.image_size)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert fine.dtype == torch.int64 and int(fine.min()) >= 0 and int(fine.max()) < info.num_fine
        if info.has_coarse:
            assert torch.equal(coarse, torch.tensor(info.fine_to_coarse)[fine])
        else:
            assert bool((coarse == NO_COARSE_LABEL).all())
        assert len(info.mean) == len(info.std) == info.channels and all(s > 0 for s in info.std)


@pytest.mark.parametrize("name", dataset_cases())
def test_every_registered_dataset_serves_images_in_range_with_labels_in_range(name, tmp_path):
    root = None
    if dataset_needs_root(name):
        LOCAL_COPIES[name](tmp_path)
        root = tmp_path
    check_dataset_contract(name, root)


# -- gate functions ----------------------------------------------------------------------------------------------


def check_gate_contract(name: str, data) -> None:
    """A training decision for every score: masked, executed where its value is non-zero and nowhere else, values
    in [0, 1] carrying a finite gradient to the scores, a float or a 0-dim tensor slope alike; and a DSN trains
    with it (finite gradients into its gates)."""
    fn = gate_function(name)
    for slope in (2.0, torch.tensor(2.0)):
        torch.manual_seed(0)
        score = torch.linspace(-3, 3, 13, requires_grad=True)
        d = fn(score, slope)
        assert d.mask is True and d.executed.dtype == torch.bool
        assert d.executed.shape == d.value.shape == score.shape
        assert bool(((d.value >= 0) & (d.value <= 1)).all())
        assert bool((d.value[~d.executed] == 0).all())
        grad, = torch.autograd.grad(d.value.sum(), score)
        assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    torch.manual_seed(0)
    model = small_model("dsn", data.info, gate_fn=name).train()
    x, fine, _ = data.batch(slice(0, 8))
    out = model(x)
    torch.nn.functional.cross_entropy(out.fine, fine).add(sum(v.sum() for v in out.values.values())).backward()
    gate_grads = [p.grad for n, p in model.named_parameters() if "gate" in n and p.requires_grad]
    assert gate_grads and all(g is not None and bool(torch.isfinite(g).all()) for g in gate_grads)
    assert any(float(g.abs().sum()) > 0 for g in gate_grads)


@pytest.mark.parametrize("name", gate_cases())
def test_every_registered_gate_function_decides_masked_with_a_gradient_and_trains(name, data):
    check_gate_contract(name, data)


# -- routing gradients -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate_grad", grad_cases())
def test_every_routing_gradient_gives_a_finite_input_gradient_and_says_when_it_is_the_deployed_forward(gate_grad,
                                                                                                         dsn):
    model, x, y, _ = dsn
    torch.manual_seed(0)
    target = Target(model, head="fine", gate_mode="hard", gate_grad=gate_grad)
    xs = x.clone().requires_grad_(True)
    logits = target.view(observed=False)(xs)
    assert logits.shape == target.logits(x).shape == (x.shape[0], model.fine_head.out_features)
    grad, = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y), xs)
    assert grad.shape == x.shape and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    if target.deployed_logits:  # a surrogate that claims the deployed values must give them
        assert torch.allclose(logits.detach(), target.logits(x), atol=1e-5)


# -- one-file plug-ins -------------------------------------------------------------------------------------------

PLUGIN_ATTACK = '''
    """A plug-in attack in one file: one signed-gradient step (a test of the registry, not a strong attack)."""
    import torch
    from attacks.base import SINGLE_STEP, Attack, register
    from attacks.params import NoParams


    @register
    class OneStep(Attack):
        name, backend, kind = "contract-one-step", "native", SINGLE_STEP
        Params = NoParams

        def run(self, target, x, y, eps, seed):
            def attack(view, xs, ys):
                xs = xs.clone().requires_grad_(True)
                grad, = torch.autograd.grad(torch.nn.functional.cross_entropy(view(xs), ys), xs)
                return (xs + eps * grad.sign()).clamp(0, 1).detach()
            return target.on_pending(x, y, eps, attack)
'''

PLUGIN_DATASET = '''
    """A plug-in dataset in one file: two classes of flat grey images, dark and light."""
    import torch
    from robustness.data import CoarseFineDataset, DatasetInfo, register_dataset


    def info(size: int = 16) -> DatasetInfo:
        return DatasetInfo(name="contract-grey", fine_classes=("dark", "light"), coarse_classes=(),
                           fine_to_coarse=(), mean=(0.5,), std=(0.25,), image_size=size, channels=1)


    @register_dataset("contract-grey", info=info)
    def load(split: str, size: int = 16) -> CoarseFineDataset:
        fine = torch.arange(20) % 2
        images = (60 + 120 * fine).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, size, size).contiguous()
        return CoarseFineDataset(info(size), images, fine, split)
'''

PLUGIN_GATE = '''
    """A plug-in gate function in one file: a sigmoid of a third of the slope, straight-through."""
    import torch
    from models.gates import Decision, register_gate_function


    @register_gate_function("contract-third")
    def third(score, slope):
        soft = torch.sigmoid(slope * score / 3)
        hard = (soft > 0.5).float()
        return Decision(executed=hard > 0, value=hard + soft - soft.detach(), mask=True)
'''

PLUGIN_MODEL = '''
    """A plug-in model in one file: the suite's ResNet, one block per stage, under its own name."""
    from models.baselines import ResNet
    from models.registry import register_model


    @register_model
    def contract_thin(*, num_fine: int, num_coarse: int, image_size: int = 16, in_channels: int = 3,
                      mean: tuple = (0.5, 0.5, 0.5), std: tuple = (0.25, 0.25, 0.25)):
        return ResNet(num_fine=num_fine, num_coarse=num_coarse, depth_n=1, width=4, image_size=image_size,
                      in_channels=in_channels, mean=mean, std=std)
'''


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """Four plug-in modules written into a temporary folder and imported as a user's script imports its own
    modules (the folder on ``sys.path``); every registration is undone afterwards."""
    sources = {"contract_attack": PLUGIN_ATTACK, "contract_dataset": PLUGIN_DATASET, "contract_gate": PLUGIN_GATE,
               "contract_model": PLUGIN_MODEL}
    for module, text in sources.items():
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        for module in sources:
            importlib.import_module(module)
        yield {"attack": "contract-one-step", "dataset": "contract-grey", "gate": "contract-third",
               "model": "contract_thin"}
    finally:
        base.unregister("contract-one-step")
        if "contract-grey" in list_datasets():
            unregister_dataset("contract-grey")
        if "contract-third" in gates.list_gate_functions():
            gates.unregister_gate_function("contract-third")
        if "contract_thin" in model_registry.list_models():
            model_registry.unregister_model("contract_thin")
        for module in sources:
            sys.modules.pop(module, None)


def _help(command: str) -> str:
    parser = cli.build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return " ".join(re.sub(r"-\n\s+", "-", sub.format_help()).split())  # argparse wraps at hyphens


def test_a_one_file_plug_in_is_in_the_help_the_listings_and_the_contract_tests(plugins, data, dsn, tmp_path,
                                                                                capsys):
    names = plugins
    # --help and the listings read the registries
    assert names["attack"] in _help("attack").split("--attacks ATTACKS comma list of")[1].split("--preset")[0]
    train = _help("train")
    assert names["model"] in train.split("--model MODEL model name:")[1].split("(default")[0]
    assert names["gate"] in train.split("--gate-fn {")[1].split("}")[0]
    assert names["dataset"] in train.split("--dataset DATASET dataset name:")[1].split("(default")[0]
    assert cli.main(["datasets"]) == 0
    listed = capsys.readouterr().out
    assert f"{names['dataset']}: size" in listed
    assert cli.main(["models"]) == 0
    listed = capsys.readouterr().out
    assert names["gate"] in listed.split("gate functions (option gate_fn):")[1]
    assert f"{names['model']}: num_fine, num_coarse, image_size, in_channels, mean, std" in listed
    # the contract tests' parametrisations are built by these functions at collection: they include the plug-ins
    assert f"{names['attack']}-native" in case_ids(attack_cases())
    assert names["dataset"] in case_ids(dataset_cases()) and names["gate"] in case_ids(gate_cases())
    assert names["model"] in case_ids(model_cases())
    # and the plug-ins pass the same contracts the built-ins do
    check_attack_contract(names["attack"], "native", *dsn)
    check_dataset_contract(names["dataset"], None)
    check_gate_contract(names["gate"], data)
    check_model_contract(names["model"], data.info, data.batch(slice(0, N_IMAGES))[0], tmp_path)


def test_the_contract_checks_fail_on_a_plug_in_that_breaks_its_contract(plugins, dsn, data):
    """The checks are not vacuous: an attack leaving its budget and a gate that gives a skipped block a non-zero
    value each fail them."""
    over = type("Over", (attack_class(plugins["attack"], "native"),), {
        "run": lambda self, target, x, y, eps, seed: (x + 2 * eps).clamp(0, 1)})
    monkey = base._REGISTRY[plugins["attack"]]
    monkey["native"], original = over, monkey["native"]
    try:
        with pytest.raises(BudgetViolation):  # the suite refuses it before the contract's own budget check
            check_attack_contract(plugins["attack"], "native", *dsn)
    finally:
        monkey["native"] = original

    def leaky(score, slope):
        soft = torch.sigmoid(score)
        return gates.Decision(executed=score > 1, value=soft, mask=True)

    gates.register_gate_function("contract-leaky", leaky)
    try:
        with pytest.raises(AssertionError):
            check_gate_contract("contract-leaky", data)
    finally:
        gates.unregister_gate_function("contract-leaky")


# -- the docs follow the registries ------------------------------------------------------------------------------
# The docs describe what ships: the registries as a fresh process holds them (no test's plug-in in them).

REPO = Path(__file__).resolve().parents[1]
SHIPPED = """
import importlib.util
import json
import models
from attacks.base import BACKENDS, backends_for, known_attacks, attack_kind
from attacks.runner import ATTACK_ALIASES
from models.gates import list_gate_functions
from models.registry import list_models
from robustness.data import list_datasets
try:
    from models.routing import GRAD_MODES as grads
except ImportError:
    from robustness.core.vocab import GRAD_MODES as grads
spec = importlib.util.spec_from_file_location("registry_tables", "scripts/registry_tables.py")
tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tables)
print(json.dumps({"attacks": {n: [backends_for(n), attack_kind(n)] for n in known_attacks()},
                  "aliases": ATTACK_ALIASES, "backends": list(BACKENDS), "models": list_models(),
                  "datasets": list_datasets(), "gates": list_gate_functions(), "grads": list(grads),
                  "table": tables.table()}))
"""


@pytest.fixture(scope="module")
def shipped() -> dict:
    import json
    import subprocess

    out = subprocess.run([sys.executable, "-c", SHIPPED], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_readme_table_of_registered_names_is_what_the_registries_hold(shipped):
    spec = importlib.util.spec_from_file_location("registry_tables", REPO / "scripts" / "registry_tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    block = tables.readme_block((REPO / "README.md").read_text(encoding="utf-8"))
    assert block, "README.md has no generated registry table"
    assert block == shipped["table"], \
        "README.md's registry table is stale: run python scripts/registry_tables.py --write"
    for key in ("attacks", "models", "datasets", "gates", "grads"):
        for name in shipped[key]:
            assert f"`{name}`" in block, name


def _readme_rows(heading: str) -> list[list[str]]:
    """The body rows of the first Markdown table after ``heading``, split into cells."""
    text = (REPO / "README.md").read_text(encoding="utf-8").split(heading, 1)[1]
    lines = [line for line in text.split("\n\n| ", 1)[1].splitlines()]
    rows = []
    for line in ["| " + lines[0], *lines[1:]]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows[2:]


def test_the_readme_attack_table_names_every_attack_with_its_backends_and_kind(shipped):
    rows = _readme_rows("### Attacks and their strength")
    named = {n: row for row in rows for n in re.findall(r"`([^`]+)`", row[0])}
    assert set(named) == set(shipped["attacks"]) | set(shipped["aliases"]), "README attack table vs the registry"
    for name, (backends, kind) in shipped["attacks"].items():
        row = named[name]
        assert all(b in row[1] for b in backends), (name, row[1])
        assert kind in row[2], (name, row[2])


def test_the_readme_cli_reference_lists_what_the_registries_hold(shipped):
    rows = {row[0].split()[1].strip("`"): row[0] for row in _readme_rows("## CLI reference") if row[0].count("`")}

    def listed(command: str, flag: str, sep: str = ",") -> set[str]:
        return set(re.search(rf"{flag} ([\w,|\\-]+)", rows[command]).group(1).replace("\\|", "|").split(sep))

    members = {m for ms in shipped["aliases"].values() for m in ms}
    assert listed("attack", "--attacks") == (set(shipped["attacks"]) - members) | set(shipped["aliases"])
    assert listed("attack", "--gate-grad") == set(shipped["grads"])
    backends = re.search(r"--backend ([\w,]+)\\\|both", rows["attack"]).group(1).split(",")
    assert backends == shipped["backends"]  # in the order of preference
    assert listed("train", "--gate-fn", "|") == set(shipped["gates"])
    assert listed("train", "--model", "|") == set(shipped["models"])
