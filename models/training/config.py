"""``TrainConfig``: everything one training run needs, built from config tables or a stored ``config.json``.

Construction goes through ``robustness.core.config.build`` (unknown keys, the type of every value); ``validate()``
adds the range checks and the names (model, dataset, gate function, model options). The schedule a config
describes (learning rate, slope, gate-weight ramp) is computed in ``models.training.schedule``.
"""
from __future__ import annotations

import logging
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from models.gates import list_gate_functions
from models.losses import LossWeights
from models.registry import all_model_options, check_options, list_models, model_options, own_options
from models.training import schedule
from robustness.core.config import (MAX_COUNT, MAX_EPOCHS, MAX_SEED, MAX_THREADS, brief_number, build, check_finite,
                                    check_int, check_type, is_finite)
from robustness.core.errors import ConfigError
from robustness.core.runtime import DEVICE_CHOICES, jsonable
from robustness.data import DatasetInfo, list_datasets

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "step")
#: Fields that belong to the ``[data]`` and ``[model]`` tables, not to ``[train]``.
_NOT_TRAIN = ("model", "model_options", "dataset", "data_root", "data_options", "train_limit", "test_limit")


@dataclass
class TrainConfig:
    """Everything one training run needs. Written to ``RUN_DIR/config.json``; ``validate()`` checks it.

    ``model_options`` are ``create_model`` options (depth_n, width, gate_fn, feedback, film, open_bias, ...); the
    dataset supplies num_fine, num_coarse, image_size, in_channels, mean and std. One ``[model]`` table may serve
    several models (``dsn-robust run`` trains dsn, dual and resnet from it): an option that no registered model
    has is an error, one that only other models have is left out for this one. ``data_options`` go to
    ``load_dataset`` (for ``synthetic``: n, image_size, seed, n_coarse, fine_per_coarse). ``train_limit`` /
    ``test_limit`` keep only the first N samples of a split (0: all).
    """

    # what
    model: str = "dsn"
    model_options: dict[str, Any] = field(default_factory=dict)
    dataset: str = "synthetic"
    data_root: str | None = None
    data_options: dict[str, Any] = field(default_factory=dict)
    train_limit: int = 0
    test_limit: int = 0
    # optimisation
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)  # step schedule; empty: 50% and 75% of the epochs
    gamma: float = 0.1
    lr_warmup_epochs: int = 0
    lr_warmup_start: float = 0.1  # the LR factor at the start of the warm-up (He et al. 2016: 0.01 of 0.1)
    # DSN stages
    warmup_epochs: int = 2
    ramp_epochs: int = 3
    slope_start: float = 1.0
    slope_growth: float = 1.0
    slope_max: float = 50.0
    # loss (models.losses.LossWeights)
    coarse_weight: float = 1.0
    budget_weight: float = 2.0
    rank_weight: float = 0.5
    target_coarse: float = 0.4
    target_fine: float = 0.7
    rank_margin: float = 0.05
    # augmentation
    augment: bool = True
    crop_padding: int = -1  # -1: image_size // 8 (4 px on 32 px images, as on CIFAR)
    flip: bool = True
    # runtime
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # CUDA only
    channels_last: bool = True  # CUDA only
    deterministic: bool = True
    threads: int = 0  # CPU threads for torch ops; 0: torch's default. 1 is fastest for small models on a busy CPU
    eval_every: int = 1
    eval_batch_size: int = 500

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> "TrainConfig":
        """A config from a flat dict such as ``config.json``; unknown keys and bad values are ConfigErrors."""
        config = build(cls, dict(values) if isinstance(values, dict) else values, where)
        config.validate(where)
        return config

    @classmethod
    def from_tables(cls, tables: dict[str, dict[str, Any]], base: "TrainConfig | None" = None,
                    where: str = "config file") -> "TrainConfig":
        """Apply a config file's ``[data]``, ``[model]`` and ``[train]`` tables on top of ``base``.

        ``[data]``: ``name``, ``root``, ``train_limit``, ``test_limit``; every other key is a dataset option.
        ``[model]``: ``name``; every other key is a model option. ``[train]``: the remaining fields by name.
        """
        values = (base or cls()).to_dict()
        _apply_data_table(values, dict(tables.get("data", {})))
        model = dict(tables.get("model", {}))
        if "name" in model:
            values["model"] = model.pop("name")
        values["model_options"] = {**values["model_options"], **model}
        train = dict(tables.get("train", {}))
        reserved = sorted(set(train) & set(_NOT_TRAIN))
        if reserved:
            raise ConfigError(f"{where}: [train] cannot set {', '.join(reserved)}; use the [data] / [model] tables")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(train) - known)
        if unknown:
            raise ConfigError(f"{where}: [train] has unknown option(s) {', '.join(unknown)}; "
                              f"valid: {', '.join(sorted(known))}")
        values.update(train)
        return cls.from_dict(values, where)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict that ``from_dict`` turns back into an equal config."""
        d = asdict(self)
        d["model_options"] = jsonable(d["model_options"])
        d["data_options"] = jsonable(d["data_options"])
        return d

    def replace(self, **changes: Any) -> "TrainConfig":
        """A validated copy with ``changes`` (``None`` values are ignored)."""
        values = self.to_dict()
        values.update({k: v for k, v in changes.items() if v is not None})
        return TrainConfig.from_dict(values)

    # -- checks ------------------------------------------------------------------------------------------------
    def validate(self, where: str = "config") -> None:
        """Raise ConfigError naming the first invalid value."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            check_type(f.name, getattr(self, f.name), hints[f.name], where)
        self._check_names()
        for ok, message in self._range_checks():
            if not ok:
                raise ConfigError(message)
        self._check_numbers(where)

    def _check_numbers(self, where: str) -> None:
        """Every integer within its range (:data:`INT_RANGES`; a value below it already failed its own rule) and
        every number finite, the model options' too: one line naming the option, before anything uses a value (an
        int beyond int64 or an infinite float would fail deep inside numpy or torch, after the run directory was
        written)."""
        for name, (low, high) in INT_RANGES.items():
            check_int(name, getattr(self, name), low, high, where)
        for m in self.milestones:
            check_int("milestones", m, 1, MAX_EPOCHS, where)
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            if hints[f.name] is float:
                check_finite(f.name, getattr(self, f.name), where)
        for name, value in self.model_options.items():
            if isinstance(value, int) and not isinstance(value, bool):
                check_int(f"model option {name}", value, 0, MAX_COUNT, where)
            check_finite(f"model option {name}", value, where)

    def _check_names(self) -> None:
        if self.model not in list_models():
            raise ConfigError(f"unknown model {self.model!r}; choose one of: {', '.join(list_models())}")
        if self.dataset not in list_datasets():
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of: {', '.join(list_datasets())}")
        typos = sorted(set(self.model_options) - set(all_model_options()))
        if typos:
            raise ConfigError(f"model {self.model!r} has no option(s) {', '.join(typos)} (nor has any other model); "
                              f"valid: {', '.join(model_options(self.model))}")
        check_options(self.model, own_options(self.model, self.model_options))  # types, before any file exists
        gate_fn = self.model_options.get("gate_fn", "hardsig")
        if gate_fn not in list_gate_functions():
            raise ConfigError(f"unknown gate function {gate_fn!r}; choose one of: {', '.join(list_gate_functions())}")

    def _range_checks(self) -> list[tuple[bool, str]]:
        n = brief_number  # a huge int in a message as a power of two
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {n(self.epochs)}"),
            (self.batch_size >= 2, f"batch_size must be >= 2 (BatchNorm needs two samples), got {n(self.batch_size)}"),
            (self.lr > 0 and is_finite(self.lr), f"lr must be a finite number > 0, got {n(self.lr)}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {n(self.momentum)}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {n(self.weight_decay)}"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}"),
            (all(m >= 1 for m in self.milestones) and list(self.milestones) == sorted(self.milestones),
             f"milestones must be increasing epochs >= 1, got {n(self.milestones)}"),
            (0 < self.gamma <= 1, f"gamma must be in (0, 1], got {n(self.gamma)}"),
            (self.lr_warmup_epochs >= 0, f"lr_warmup_epochs must be >= 0, got {n(self.lr_warmup_epochs)}"),
            (0 < self.lr_warmup_start <= 1,
             f"lr_warmup_start must be in (0, 1] (a factor of lr), got {n(self.lr_warmup_start)}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {n(self.warmup_epochs)}"),
            (self.ramp_epochs >= 0, f"ramp_epochs must be >= 0, got {n(self.ramp_epochs)}"),
            (self.slope_start > 0, f"slope_start must be > 0, got {n(self.slope_start)}"),
            (self.slope_growth >= 0, f"slope_growth must be >= 0, got {n(self.slope_growth)}"),
            (self.slope_max >= self.slope_start, f"slope_max ({n(self.slope_max)}) must be >= slope_start "
                                                 f"({n(self.slope_start)})"),
            (self.nesterov is False or self.momentum > 0, "nesterov needs momentum > 0"),
            (self.crop_padding >= -1,
             f"crop_padding must be >= 0 (or -1 for image_size // 8), got {n(self.crop_padding)}"),
            (self.seed >= 0, f"seed must be >= 0, got {n(self.seed)}"),
            (self.device in DEVICE_CHOICES or self.device.startswith("cuda:"),
             f"unknown device {self.device!r}; choose one of: {', '.join(DEVICE_CHOICES)}"),
            (self.eval_every >= 1, f"eval_every must be >= 1, got {n(self.eval_every)}"),
            (self.threads >= 0, f"threads must be >= 0 (0: torch's default), got {n(self.threads)}"),
            (self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {n(self.eval_batch_size)}"),
            (self.train_limit >= 0 and self.test_limit >= 0, "train_limit and test_limit must be >= 0 (0: all)"),
        ]
        for name in ("coarse_weight", "budget_weight", "rank_weight", "rank_margin"):
            checks.append((getattr(self, name) >= 0, f"{name} must be >= 0, got {n(getattr(self, name))}"))
        for name in ("target_coarse", "target_fine"):
            checks.append((0 <= getattr(self, name) <= 1,
                           f"{name} must be in [0, 1], got {n(getattr(self, name))}"))
        return checks

    # -- derived -----------------------------------------------------------------------------------------------
    def loss_weights(self) -> LossWeights:
        return LossWeights(coarse=self.coarse_weight, budget=self.budget_weight, rank=self.rank_weight,
                           target_coarse=self.target_coarse, target_fine=self.target_fine, margin=self.rank_margin)

    def lr_factor(self, t: float) -> float:
        """Learning-rate multiplier at (fractional) epoch ``t`` from the start of training."""
        return schedule.lr_factor(self, t)

    def slope_at(self, epoch: int) -> float:
        """Hard-sigmoid slope of (0-based) ``epoch``: ``slope_start`` during warm-up, then annealed."""
        return schedule.slope_at(self, epoch)

    def gate_weight_at(self, epoch: int, fraction: float) -> float:
        """Weight in [0, 1] of the budget and ranking terms at ``fraction`` of (0-based) ``epoch``."""
        return schedule.gate_weight_at(self, epoch, fraction)


#: the range of every integer field (checked before the finer rules of ``_range_checks``, which name the reason)
INT_RANGES: dict[str, tuple[int, int]] = {
    "train_limit": (0, MAX_COUNT), "test_limit": (0, MAX_COUNT), "epochs": (1, MAX_EPOCHS),
    "batch_size": (2, MAX_COUNT), "lr_warmup_epochs": (0, MAX_EPOCHS), "warmup_epochs": (0, MAX_EPOCHS),
    "ramp_epochs": (0, MAX_EPOCHS), "crop_padding": (-1, MAX_COUNT), "seed": (0, MAX_SEED),
    "threads": (0, MAX_THREADS), "eval_every": (1, MAX_EPOCHS), "eval_batch_size": (1, MAX_COUNT),
}


def _apply_data_table(values: dict[str, Any], data: dict[str, Any]) -> None:
    """Merge a ``[data]`` table into flat config ``values`` (a new dataset name starts from no dataset options)."""
    if "name" in data:
        new = data.pop("name")
        if new != values["dataset"]:
            values["data_options"] = {}
        values["dataset"] = new
    if "root" in data:
        values["data_root"] = data.pop("root")
    for key in ("train_limit", "test_limit"):
        if key in data:
            values[key] = data.pop(key)
    values["data_options"] = {**values["data_options"], **data}


def model_kwargs(config: TrainConfig, info: DatasetInfo) -> dict[str, Any]:
    """The ``create_model`` options of ``config.model`` on dataset ``info``.

    The dataset sets num_fine, num_coarse, image_size, in_channels, mean and std (a contradicting option is a
    ConfigError); options only other models take are left out (``[model]`` tables are shared between models).
    """
    derived = dict(num_fine=info.num_fine, num_coarse=info.num_coarse, image_size=info.image_size,
                   in_channels=info.channels, mean=tuple(info.mean), std=tuple(info.std))
    opts = dict(config.model_options)
    for key, value in derived.items():
        if key in opts:
            given = tuple(opts[key]) if isinstance(opts[key], (list, tuple)) else opts[key]
            if given != value:
                raise ConfigError(f"model option {key}={opts[key]!r} contradicts dataset {info.name!r} "
                                  f"({key}={value!r}); leave it out, the dataset sets it")
    accepted = set(model_options(config.model))
    foreign = sorted(set(opts) - accepted)
    if foreign:
        log.debug("model %s takes no option(s) %s; left out for it", config.model, ", ".join(foreign))
    opts = {k: v for k, v in opts.items() if k in accepted}
    opts.update(derived)
    return opts
