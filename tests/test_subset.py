"""The attacked subset: a seeded, class-stratified selection (or the first n), recorded in the run (indices and a
hash of the images), the same for every model, refused on resume when the images changed; its headline line."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from attacks.records import shard_fingerprint, write_shard
from attacks.runner import AttackConfig, run_attacks
from robustness.app import cli
from robustness.findings.headline import NOT_RECORDED, SubsetSummary, run_headline
from robustness.core.errors import ConfigError, RunDirError, UnknownNameError
from robustness.data import CoarseFineDataset, DatasetInfo, load_dataset
from robustness.data.subset import SUBSET_RULES, images_sha256, select_subset, take
from robustness.results import load_run
from attack_helpers import copy_run
from conftest import TINY_DATA

#: one cheap attack on a few images
FAST = dict(attacks=["fgsm"], backends="torchattacks", eps=["4/255"], gate_grads=["none"], target="coarse", n=20,
            batch_size=20, seed=1, threads=1)


def dataset(sizes: list[int], seed: int = 0) -> CoarseFineDataset:
    """A small dataset with ``sizes[c]`` samples of fine class c, in a shuffled order, random 4x4 images."""
    gen = torch.Generator().manual_seed(seed)
    fine = torch.tensor(np.repeat(np.arange(len(sizes)), sizes))[torch.randperm(sum(sizes), generator=gen)]
    info = DatasetInfo("toy", tuple(map(str, range(len(sizes)))), ("a",), (0,) * len(sizes), (0.5,), (0.25,), 4, 1)
    images = torch.randint(0, 256, (len(fine), 1, 4, 4), dtype=torch.uint8, generator=gen)
    return CoarseFineDataset(info, images, fine, "test")


def counts(subset) -> list[int]:
    return [subset.class_counts[c] for c in sorted(subset.class_counts)]


# -- the selection ------------------------------------------------------------------------------------------------


def test_stratified_is_balanced_seeded_and_never_repeats():
    data = dataset([30] * 10)
    for n in (10, 25, 47, 120):
        s = select_subset(data, n, seed=3)
        assert s.rule == "stratified" and s.seed == 3 and s.n == n == sum(counts(s))
        assert min(counts(s)) >= 1 and max(counts(s)) - min(counts(s)) <= 1  # every class, as equal as possible
        assert len(set(s.indices)) == n and list(s.indices) == sorted(s.indices)
        assert [int(data.fine[i]) for i in s.indices].count(0) == s.class_counts[0]
        assert select_subset(data, n, seed=3) == s  # deterministic for a seed
        assert select_subset(data, n, seed=4).indices != s.indices
    assert select_subset(data, 25, seed=3).sha256 != select_subset(data, 25, seed=4).sha256
    # where every quota grows, a larger n keeps what a smaller one chose
    assert set(select_subset(data, 20, seed=3).indices) <= set(select_subset(data, 40, seed=3).indices)


def test_small_classes_give_what_they_have_and_the_rest_goes_elsewhere():
    data = dataset([1, 5, 20, 20])
    s = select_subset(data, 20, seed=0)
    assert counts(s) == [1, 5, 7, 7]
    odd = select_subset(data, 21, seed=0)
    assert sorted(counts(odd)[2:]) == [7, 8] and counts(odd)[:2] == [1, 5]
    # fewer samples than classes: one each for a seeded choice of classes
    few = [select_subset(dataset([30] * 10), 4, seed=seed) for seed in range(6)]
    assert all(sorted(set(counts(s))) == [0, 1] and s.n == 4 for s in few)
    assert len({tuple(counts(s)) for s in few}) > 1


def test_first_all_and_unknown_rules():
    data = dataset([30] * 10)
    first = select_subset(data, 12, "first", seed=9)
    assert first.indices == tuple(range(12)) and first.rule == "first" and first.seed is None
    for rule in SUBSET_RULES:
        every = select_subset(data, 10 ** 6, rule)
        assert every.indices == tuple(range(len(data)))
    with pytest.raises(ConfigError, match="unknown subset rule 'random'; choose one of: stratified, first"):
        select_subset(data, 5, "random")
    with pytest.raises(ConfigError, match="positive"):
        select_subset(data, 0)
    with pytest.raises(ConfigError, match="below 2\\*\\*63"):
        select_subset(data, 5, seed=-1)


def test_the_hash_covers_every_pixel_and_label_and_take_gives_the_samples():
    data = dataset([30] * 10)
    s = select_subset(data, 25, seed=1)
    taken = take(data, s)
    assert len(taken) == 25 and torch.equal(taken.images, data.images[list(s.indices)])
    assert torch.equal(taken.coarse, data.coarse[list(s.indices)]) and taken.info == data.info
    assert s.sha256 == images_sha256(taken.images, taken.fine)
    i = s.indices[7]
    pixel = CoarseFineDataset(data.info, data.images.clone(), data.fine.clone(), "test")
    pixel.images[i, 0, 2, 1] ^= 1
    label = CoarseFineDataset(data.info, data.images.clone(), data.fine.clone(), "test")
    label.fine[i] = (label.fine[i] + 1) % 10
    assert select_subset(pixel, 25, seed=1).indices == s.indices  # the same samples chosen ...
    assert select_subset(pixel, 25, seed=1).sha256 != s.sha256     # ... one pixel differs
    for changed in (pixel, label):
        assert images_sha256(take(changed, s).images, take(changed, s).fine) != s.sha256
    assert select_subset(data, 25, seed=1).sha256 == s.sha256
    record = s.to_dict()
    assert json.loads(json.dumps(record)) == record and set(record) == {"rule", "seed", "indices", "sha256",
                                                                         "class_counts"}
    assert record["class_counts"]["0"] == s.class_counts[0]


def test_attack_config_carries_the_subset():
    c = AttackConfig(subset="First", subset_seed=7)
    assert (c.subset, c.subset_seed) == ("first", 7)
    assert c.to_dict()["subset"] == "first" and c.to_dict()["subset_seed"] == 7
    assert AttackConfig.from_table({"subset": "stratified", "subset_seed": 2}).subset_seed == 2
    with pytest.raises(UnknownNameError, match="unknown subset rule 'given'"):
        AttackConfig(subset="given")  # recorded for tensors, never chosen
    for bad in (-1, 2 ** 63, True, 1.5):
        with pytest.raises(ConfigError, match="subset_seed"):
            AttackConfig(subset_seed=bad)


# -- through the runner -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attacked(tiny_runs, tmp_path_factory):
    """The tiny dsn and resnet, each attacked on the default (stratified) subset."""
    root = tmp_path_factory.mktemp("subset")
    runs = {name: copy_run(tiny_runs[name], root / name) for name in ("dsn", "resnet")}
    return {name: (run, run_attacks(run.root, AttackConfig(**FAST), progress=False)) for name, run in runs.items()}


def test_two_models_are_attacked_on_the_same_recorded_images(attacked):
    (_, dsn), (_, resnet) = attacked["dsn"], attacked["resnet"]
    a, b = dsn.manifest["subset"], resnet.manifest["subset"]
    assert a == b and a["rule"] == "stratified" and a["seed"] == 0 and len(a["indices"]) == FAST["n"]
    test = load_dataset("synthetic", "test", **TINY_DATA)
    assert a == select_subset(test, FAST["n"]).to_dict()
    fingerprints = dsn.manifest["fingerprint"], resnet.manifest["fingerprint"]
    assert fingerprints[0]["subset_sha256"] == a["sha256"] == fingerprints[1]["subset_sha256"]
    # record sample i is test sample indices[i]
    labels = dsn.records.drop_duplicates("sample").sort_values("sample")["label_fine"].to_numpy()
    assert labels.tolist() == test.fine[a["indices"]].tolist()
    assert sorted(set(labels.tolist())) == list(range(test.info.num_fine))  # every class of 16 in 20 images


def test_a_resume_on_other_images_is_refused(attacked, tmp_path):
    run = copy_run(attacked["resnet"][0], tmp_path / "resnet")
    config = json.loads(run.config.read_text())
    config["data_options"] = dict(config["data_options"], seed=1)  # another test split, same classes
    run.config.write_text(json.dumps(config))
    changed = (r"the attacked images changed since these records \(subset sha256 [0-9a-f]{12}… -> [0-9a-f]{12}…: "
               r"the test data or its selection differs\); pass --force")
    with pytest.raises(RunDirError, match=changed):
        run_attacks(run.root, AttackConfig(**FAST), resume=True, progress=False)
    with pytest.raises(RunDirError, match="subset_seed=0, this run asks for subset_seed=5"):
        run_attacks(run.root, AttackConfig(**dict(FAST, subset_seed=5)), resume=True, progress=False)
    fresh = run_attacks(run.root, AttackConfig(**FAST), force=True, progress=False)
    assert fresh.manifest["subset"]["sha256"] != attacked["resnet"][1].manifest["subset"]["sha256"]


def test_the_cli_keeps_the_stored_rule_on_resume(tiny_runs, tmp_path, capsys):
    run = copy_run(tiny_runs["resnet"], tmp_path / "resnet")
    flags = ["--attacks", "fgsm", "--backend", "torchattacks", "--eps", "4/255", "--target", "coarse", "--n", "8",
             "--batch-size", "4", "--threads", "1", "--no-progress"]
    assert cli.main(["attack", str(run.root), *flags, "--subset", "first"]) == 0
    manifest = json.loads(run.manifest.read_text())
    assert manifest["subset"]["rule"] == "first" and manifest["subset"]["indices"] == list(range(8))
    missing = next(run.records.rglob("shard-00001.parquet"))
    missing.unlink()
    assert cli.main(["attack", str(run.root), "--resume", "--no-progress"]) == 0  # first n again, not stratified
    assert missing.is_file()
    assert json.loads(run.manifest.read_text())["subset"] == manifest["subset"]
    capsys.readouterr()
    assert cli.main(["attack", str(run.root), "--resume", "--subset", "stratified", "--no-progress"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "subset 'first' -> 'stratified'" in err and "--force" in err
    # the first transfer into these records (no transfer config stored yet) attacks their images too
    source = copy_run(tiny_runs["dual"], tmp_path / "dual")
    assert cli.main(["attack", str(run.root), "--resume", "--transfer-from", str(source.root), *flags]) == 0
    manifest = json.loads(run.manifest.read_text())
    assert manifest["subset"]["rule"] == "first" and manifest["transfer_configs"]["dual"]["subset"] == "first"


def test_records_of_an_older_version_load_but_are_not_resumed(attacked, tmp_path):
    run = copy_run(attacked["dsn"][0], tmp_path / "dsn")
    old = ("subset", "subset_seed", "subset_sha256")
    for shard in run.records.rglob("*.parquet"):  # as a version before recorded subsets wrote them
        fp = {k: v for k, v in shard_fingerprint(shard).items() if k not in old}
        write_shard(pd.read_parquet(shard), shard, fp)
    manifest = json.loads(run.manifest.read_text())
    del manifest["subset"]
    manifest["fingerprint"] = {k: v for k, v in manifest["fingerprint"].items() if k not in old}
    run.manifest.write_text(json.dumps(manifest))
    with pytest.raises(RunDirError, match="older version, which attacked the first n test images without recording "
                                          "which images.*--force"):
        run_attacks(run.root, AttackConfig(**FAST), resume=True, progress=False)
    loaded = load_run(run.root)  # a report still reads them
    assert loaded.subset == {} and run_headline(loaded, [], n_boot=20).subset_line == NOT_RECORDED


# -- the headline -------------------------------------------------------------------------------------------------


def test_the_headline_says_how_the_images_were_chosen(attacked, monkeypatch, tmp_path):
    even = SubsetSummary.of({"rule": "stratified", "seed": 0, "indices": list(range(100)),
                             "class_counts": {str(c): 10 for c in range(10)}})
    assert even.line == "100 test images, stratified by fine class (seed 0): 10 per class"
    uneven = SubsetSummary.of({"rule": "stratified", "seed": 2, "indices": list(range(31)),
                               "class_counts": {"0": 10, "1": 11, "2": 10}})
    assert uneven.line == ("31 test images, stratified by fine class (seed 2): 10–11 per class (classes 0: 10, "
                           "1: 11, 2: 10)")
    first = SubsetSummary.of({"rule": "first", "seed": None, "indices": list(range(100)),
                              "class_counts": {str(c): (34 if c == 1 else 33 if c < 3 else 0) for c in range(12)}})
    assert first.line == ("the first 100 test images: 0–34 per class, 3 of 12 classes present (classes 0: 33, 1: 34, "
                          "2: 33, 3: 0, 4: 0, 5: 0, 6: 0, 7: 0, 8: 0, 9: 0, …)")
    assert SubsetSummary.of({}, 100).line == "subset not recorded (first n test images)"

    run, _ = attacked["dsn"]
    loaded = load_run(run.root)
    h = run_headline(loaded, [], n_boot=20)
    assert (h.subset.rule, h.subset.seed, h.subset.n) == ("stratified", 0, FAST["n"])
    assert h.subset_line.startswith("20 test images, stratified by fine class (seed 0): 1–2 per class (classes 0: ")
    assert json.loads(json.dumps(h.as_dict()["subset"]))["class_counts"] == loaded.subset["class_counts"]
    # the page's headline box closes with it where the report's context carries the headline's subset
    from reports import run_page
    render = run_page._render
    monkeypatch.setattr(run_page, "_render", lambda name, context: render(name, {**context, "subset": h.subset}))
    out = run_page.write_report(loaded, tmp_path / "report", n_boot=20).out
    page, md = (out / "index.html").read_text(), (out / "report.md").read_text()
    box = page[page.index('id="headline"'):page.index("</table>", page.index('id="headline"'))]
    row = f'<tr><th>Attacked images</th><td class="value">20</td><td class="detail">{h.subset_line}</td></tr>'
    assert row in box
    assert f"| **Attacked images** | 20 | {h.subset_line} |" in md
