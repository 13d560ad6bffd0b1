"""What a run attacks: the run's model and the test images chosen from the data it was trained on, and the hashes
that tie records to that model.

The checkpoint is the run's best, else its last (:func:`load_run_checkpoint`); the data is the test split of the
dataset the run's ``config.json`` trained on (read as a :class:`models.training.TrainConfig`), cut to the ``n``
samples a subset rule and seed choose (:func:`robustness.data.subset.select_subset`). A model is identified by the
SHA-256 of its checkpoint file, or of its state dict for a model handed over in memory (:func:`subject_sha256`).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

from models.checkpoint import Checkpoint, load_checkpoint
from models.network import CoarseFineNet
from models.training import TrainConfig
from robustness.core.errors import CheckpointError, ConfigError
from robustness.core.files import file_sha256
from robustness.core.rundir import RunDir
from robustness.data import CoarseFineDataset, DatasetInfo, load_dataset
from robustness.data.subset import Subset, given_subset, select_subset, take

log = logging.getLogger(__name__)


@dataclass
class Subject:
    """What an attack run attacks: the deployed model, its test data, and where both came from (for the manifest).

    ``checkpoint`` is the checkpoint's path relative to the run directory, "" for a model handed over in memory
    (:func:`attacks.runner.run.attack_subject` then runs in this process only).
    """

    model: CoarseFineNet
    model_name: str
    dataset: DatasetInfo
    data: CoarseFineDataset
    data_source: dict[str, Any]
    checkpoint: str = ""
    subset: Subset | None = None  # which samples of the split ``data`` holds; None: ``data`` as given
    #: an adapted model's fidelity and randomness check (models.fidelity.ModelCheck.to_dict), for the manifest
    model_check: dict[str, Any] | None = None

    @property
    def attacked(self) -> Subset:
        """The recorded subset: ``subset``, else every sample of ``data`` as given (rule ``given``)."""
        return self.subset if self.subset is not None else given_subset(self.data)


def build_subject(model: CoarseFineNet, data: CoarseFineDataset, data_source: dict[str, Any], *,
                  subset: Subset | None, model_name: str = "", dataset: DatasetInfo | None = None,
                  checkpoint: str = "") -> Subject:
    """The one constructor of a :class:`Subject`: a trained run's (:func:`load_subject`) and a model handed over in
    memory (``robustness.app.api_data.make_subject``). ``model_name`` defaults to the model's own ``model_name``, else
    its class name; ``dataset`` to ``data.info`` (a run passes its checkpoint's, which its test data was checked
    against); ``subset`` is which samples of the split ``data`` holds (None: ``data`` as given)."""
    name = model_name or getattr(model, "model_name", "") or type(model).__name__
    return Subject(model, name, data.info if dataset is None else dataset, data, data_source, checkpoint, subset)


def load_run_checkpoint(run: RunDir) -> Checkpoint:
    """The run's best checkpoint, else its last; CheckpointError when it has neither."""
    run.require()
    for path in (run.best_checkpoint, run.last_checkpoint):
        if path.is_file():
            return load_checkpoint(path)
    raise CheckpointError(f"{run.root} has no checkpoint (looked for {run.best_checkpoint.relative_to(run.root)} "
                          f"and {run.last_checkpoint.relative_to(run.root)}); train it first with "
                          f"`dsn-robust train`")


def load_eval_data(run: RunDir, checkpoint: Checkpoint, n: int, rule: str = "stratified",
                   seed: int = 0) -> tuple[CoarseFineDataset, dict[str, Any]]:
    """The ``n`` test samples that ``rule`` and ``seed`` choose (:func:`robustness.data.subset.select_subset`) of
    the data the run was trained on (from its ``config.json``), and where that data came from."""
    data, source, _ = eval_data(run, checkpoint, n, rule, seed)
    return data, source


def eval_data(run: RunDir, checkpoint: Checkpoint, n: int, rule: str = "stratified",
              seed: int = 0) -> tuple[CoarseFineDataset, dict[str, Any], Subset]:
    """:func:`load_eval_data` and the :class:`robustness.data.subset.Subset` it took (what the manifest
    records)."""
    train = TrainConfig.from_dict(run.read_config(), where=str(run.config))
    data = {"dataset": train.dataset, "data_root": train.data_root, "data_options": train.data_options,
            "split": "test"}
    test = load_dataset(train.dataset, "test", root=train.data_root, **train.data_options)
    problems = test.info.differences(checkpoint.dataset)
    if problems:
        raise CheckpointError(f"{checkpoint.path}: the run's test data does not match its checkpoint: "
                              f"{'; '.join(problems)}")
    if len(test) < n:
        log.info("the test split has %d samples; evaluating all of them (asked for %d)", len(test), n)
    subset = select_subset(test, n, rule, seed)
    return take(test, subset), data, subset


def check_transferable(source: DatasetInfo, target: DatasetInfo, source_name: str, target_name: str) -> None:
    """Raise ConfigError unless examples crafted for ``source`` can be evaluated on ``target`` (same dataset)."""
    problems = source.differences(target)
    if problems:
        raise ConfigError(f"cannot transfer attacks from run {source_name!r} to run {target_name!r}: "
                          f"{'; '.join(problems)}")


def load_subject(run: RunDir, n: int, device: torch.device, rule: str = "stratified", seed: int = 0) -> Subject:
    """The run's model (best checkpoint, else last) on ``device`` and the ``n`` samples of its test data that
    ``rule`` and ``seed`` choose (:func:`robustness.data.subset.select_subset`)."""
    checkpoint = load_run_checkpoint(run)
    model = checkpoint.build_model(device).requires_grad_(False)  # attacks need input gradients only
    data, data_source, subset = eval_data(run, checkpoint, n, rule, seed)
    return build_subject(model, data, data_source, subset=subset, model_name=checkpoint.model_name,
                         dataset=checkpoint.dataset,
                         checkpoint=str(checkpoint.path.relative_to(run.root)) if checkpoint.path else "")


def state_sha256(model: torch.nn.Module) -> str:
    """The SHA-256 of a model's state dict (names, dtypes, shapes, bytes): a model held in memory, unsaved."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def subject_sha256(run: RunDir, subject: Subject) -> str:
    """The hash that ties records to ``subject``'s model: its checkpoint file's, else its state dict's."""
    return file_sha256(run.root / subject.checkpoint) if subject.checkpoint else state_sha256(subject.model)
