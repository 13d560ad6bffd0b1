"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)`` so a pickle can never run code.

A checkpoint is a plain dict of tensors and JSON-like values::

    format        "dsn-robustness/checkpoint/v1"
    model         {"name": "dsn", "config": {...create_model options...}}; a model built from a model file or an
                  entry point (models.model_file) adds "source": {"kind", "location", "factory"} and is rebuilt from it
    dataset       DatasetInfo.to_dict()
    state_dict    model weights and buffers
    train_state   {"epoch": int, "optimizer": ..., "scheduler": ..., "scaler": ..., "rng": ...} (may be empty)
    metrics       last epoch's metrics (flat dict of numbers)
    versions      package versions that wrote it
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.model_file import ModelSource
from models.network import CoarseFineNet
from models.registry import create_model, list_models, model_options
from models.safe_load import load_torch_file
from robustness.data import DatasetInfo
from robustness.core.errors import CheckpointError, ConfigError, DSNError, first_line
from robustness.core.files import atomic_write
from robustness.core.runtime import package_versions

FORMAT = "dsn-robustness/checkpoint/v1"


@dataclass
class Checkpoint:
    """A loaded checkpoint (see the module docstring for the fields)."""

    model_name: str
    model_config: dict[str, Any]
    dataset: DatasetInfo
    state_dict: dict[str, torch.Tensor]
    train_state: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    #: where a model that is not in the registry came from (``models.model_file.ModelSource.to_dict()``)
    model_source: dict[str, str] | None = None

    def build_model(self, device: torch.device | str = "cpu") -> CoarseFineNet:
        """A model with this checkpoint's architecture and weights, in eval mode, on ``device``.

        A model from a model file or an entry point is rebuilt from that source; CheckpointError (one line) when
        it is gone."""
        try:
            model = self._rebuild()
            model.load_state_dict(self.state_dict)
        except CheckpointError:
            raise
        except DSNError as err:
            raise CheckpointError(f"{self.path}: cannot rebuild the model it describes: {err}") from None
        except (RuntimeError, TypeError) as err:
            raise CheckpointError(f"{self.path}: weights do not fit model {self.model_name!r}: "
                                  f"{first_line(err)}") from None
        return model.to(device).eval()

    def _rebuild(self) -> CoarseFineNet:
        if self.model_source is None:
            return create_model(self.model_name, **_creatable(self.model_name, self.model_config))
        source = ModelSource.from_dict(self.model_source)
        try:
            source.load_factory()
        except ConfigError as err:
            raise CheckpointError(f"{self.path}: its model comes from {source}, which cannot be loaded ({err}); "
                                  f"restore it or retrain") from None
        return source.build(self.model_config, name=self.model_name, mean=self._normalisation("mean"),
                            std=self._normalisation("std"))

    def _normalisation(self, key: str) -> list[float] | None:
        """The adapter's mean or std as saved (None when the wrapper normalised nothing)."""
        value = self.state_dict.get(key)
        return None if value is None else value.flatten().tolist()

    def check_matches(self, model_name: str, model_config: dict[str, Any] | None = None,
                      dataset: DatasetInfo | None = None) -> None:
        """Raise CheckpointError saying what differs if this checkpoint is not of ``model_name`` on ``dataset``."""
        problems = []
        if model_name != self.model_name:
            problems.append(f"model is {self.model_name!r}, expected {model_name!r}")
        for key, value in (model_config or {}).items():
            if key in self.model_config and self.model_config[key] != value:
                problems.append(f"model option {key}={self.model_config[key]!r}, expected {value!r}")
        if dataset is not None:
            problems += self.dataset.differences(dataset)
        if problems:
            raise CheckpointError(f"{self.path}: checkpoint does not match: {'; '.join(problems)}")


def _creatable(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """The part of a model's ``config`` that ``create_model(name, ...)`` accepts.

    A model's ``config`` may record derived entries (DSN records ``gated``) that are not constructor options;
    passing them back to ``create_model`` would fail, so checkpoints keep only the real options.
    """
    if name not in list_models():
        return dict(config)
    allowed = set(model_options(name))
    return {k: v for k, v in config.items() if k in allowed}


def save_checkpoint(path: str | Path, model: CoarseFineNet, dataset: DatasetInfo,
                    train_state: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> None:
    """Write a checkpoint atomically (a crash never leaves a truncated file at ``path``)."""
    module = getattr(model, "module", model)  # unwrap DDP
    source = getattr(module, "source", None)
    described = {"name": module.model_name, "config": _creatable(module.model_name, module.config)}
    if source is not None:
        described = {**described, "config": dict(module.config), "source": source.to_dict()}
    payload = {
        "format": FORMAT,
        "model": described,
        "dataset": dataset.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "train_state": train_state or {},
        "metrics": metrics or {},
        "versions": package_versions(),
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint safely. Missing, truncated, foreign or unsafe files raise CheckpointError (one line)."""
    path = Path(path)
    raw = load_torch_file(path, "checkpoint")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a dsn-robustness checkpoint (expected format {FORMAT!r})")
    try:
        return Checkpoint(model_name=raw["model"]["name"], model_config=dict(raw["model"]["config"]),
                          dataset=DatasetInfo.from_dict(raw["dataset"]), state_dict=raw["state_dict"],
                          train_state=raw.get("train_state", {}), metrics=raw.get("metrics", {}),
                          versions=raw.get("versions", {}), path=path,
                          model_source=dict(raw["model"]["source"]) if "source" in raw["model"] else None)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: checkpoint is missing or has a malformed field ({err})") from None
