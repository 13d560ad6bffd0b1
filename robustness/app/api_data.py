"""Data and model handling of the Python API (:mod:`robustness.app.api`): a user's model as the suite's model
(:func:`suite_model`), and a user's data (a dataset name, a CoarseFineDataset, tensors, a DataLoader or a torch
Dataset) as the test samples of an :class:`attacks.runner.subject.Subject` (:func:`make_subject`), with the images
and labels validated against the model.

Pitfall recorded here: :class:`robustness.data.CoarseFineDataset` holds uint8 images, so a user's float tensors
would be rounded to steps of 1/255; they are held as given instead (:class:`TensorData`).
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from attacks.runner.subject import Subject, build_subject
from models.network import CoarseFineNet
from models.protocol import adapt
from robustness.core.errors import ConfigError, DataError
from robustness.data import CoarseFineDataset, DatasetInfo, load_dataset
from robustness.data.base import NO_COARSE_LABEL
from robustness.data.subset import given_subset, select_subset, take

log = logging.getLogger(__name__)

#: DatasetInfo name of data handed over as tensors, a DataLoader or a torch Dataset
TENSOR_DATASET = "tensors"
#: samples per batch when a torch Dataset (not a DataLoader) is read
_READ_BATCH = 256


def suite_model(model: nn.Module, *, name: str | None = None, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> CoarseFineNet:
    """``model`` as the suite's model: :func:`models.protocol.adapt` (a ConfigError for what is no nn.Module)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"evaluate(): model must be a torch.nn.Module, got {type(model).__name__}")
    return adapt(model, name=name, mean=mean, std=std)


class TensorData(CoarseFineDataset):
    """Float images in [0, 1] held as given, with their fine and coarse labels (:class:`CoarseFineDataset` holds
    uint8, which would round a user's floats to steps of 1/255); serves what a CoarseFineDataset serves."""

    def __init__(self, info: DatasetInfo, images: torch.Tensor, fine: torch.Tensor, coarse: torch.Tensor,
                 split: str = "given"):
        torch.utils.data.Dataset.__init__(self)
        self.info, self.images, self.fine, self.coarse, self.split = info, images, fine, coarse, split

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.images[i].clone(), int(self.fine[i]), int(self.coarse[i])

    def batch(self, indices: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.images[indices].clone(), self.fine[indices], self.coarse[indices]

    def subset(self, n: int) -> TensorData:
        if int(n) <= 0:
            raise ConfigError(f"subset size must be positive, got {n}")
        return TensorData(self.info, self.images[:n], self.fine[:n], self.coarse[:n], self.split)


#: Images of the first batch the model check (models.fidelity.verify) runs on.
FIDELITY_IMAGES = 64


def suite_draws(model: CoarseFineNet) -> int:
    """Forwards each of ``model``'s predictions is the majority of (1 unless it is random at test time)."""
    return int(getattr(model, "draws", 1))


def make_subject(model: CoarseFineNet, data: Any, n: int, *, name: str | None = None,
                 data_root: str | os.PathLike[str] | None = None,
                 data_options: Mapping[str, Any] | None = None, rule: str = "stratified", seed: int = 0) -> Subject:
    """The :class:`Subject` of ``model`` (on its device) and ``n`` samples of ``data`` (see :func:`evaluate`): of a
    dataset name or a CoarseFineDataset those ``rule`` and ``seed`` choose (:func:`robustness.data.subset.
    select_subset`), of tensors the first ``n`` as given; DataError when the data does not fit the model."""
    if isinstance(data, (str, os.PathLike)):
        options = dict(data_options or {})
        full = load_dataset(str(data), "test", root=data_root, **options)
        chosen = select_subset(full, n, rule, seed)
        subset = take(full, chosen)
        source: dict[str, Any] = {"dataset": str(data), "data_root": None if data_root is None else str(data_root),
                                  "data_options": options, "split": "test"}
        _check_heads(model, subset)
    elif isinstance(data, CoarseFineDataset):
        full = data
        chosen = select_subset(data, n, rule, seed)
        subset = take(data, chosen)
        source = {"dataset": subset.info.name, "split": subset.split, "given": type(data).__name__}
        _check_heads(model, subset)
    else:
        x, fine, coarse, given = _tensors(data, n)
        full = subset = _tensor_data(model, x, fine, coarse).subset(n)
        chosen = given_subset(subset)
        digest = hashlib.sha256(subset.images.numpy().tobytes()).hexdigest()[:16]
        source = {"dataset": TENSOR_DATASET, "split": "given", "given": given, "shape": list(x.shape[1:]),
                  "sha256": digest}
    if len(full) < n:
        log.info("the data has %d samples; evaluating all of them (asked for %d)", len(full), n)
    return build_subject(model, subset, source, subset=chosen, model_name=name or "")


def _channels(model: CoarseFineNet) -> int | None:
    """The input channels ``model`` normalises, None when its normalisation is one value for every channel."""
    count = int(model.mean.numel())
    return count if count > 1 else None


def _head_sizes(model: CoarseFineNet, image: torch.Tensor) -> tuple[int, int | None]:
    """(fine classes, coarse classes or None for a single-head model), read from one forward of ``image``."""
    with torch.no_grad():
        out = model(image[None].to(model.mean.device))
    return int(out.fine.shape[1]), None if out.coarse is None else int(out.coarse.shape[1])


def _check_heads(model: CoarseFineNet, data: CoarseFineDataset) -> None:
    info, channels = data.info, _channels(model)
    if channels not in (None, info.channels):
        raise DataError(f"the model normalises {channels} channels; dataset {info.name} has {info.channels}")
    fine, coarse = _head_sizes(model, data.batch(slice(0, 1))[0][0])
    if fine != info.num_fine or (info.has_coarse and coarse not in (None, info.num_coarse)):
        heads = f"{fine} fine" + ("" if coarse is None else f" / {coarse} coarse")
        raise DataError(f"the model predicts {heads} classes; dataset {info.name} has {info.num_fine} fine / "
                        f"{info.num_coarse} coarse classes")


def _tensors(data: Any, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, str]:
    """(images, fine labels, coarse labels or None, what was given) from tuples, a DataLoader or a Dataset."""
    if isinstance(data, (tuple, list)):
        return (*_unpack(data, "data"), "tensors")
    if isinstance(data, torch.utils.data.DataLoader):
        return (*_read(data, n), "DataLoader")
    if isinstance(data, torch.utils.data.Dataset):
        return (*_read(torch.utils.data.DataLoader(data, batch_size=_READ_BATCH), n), type(data).__name__)
    raise DataError(f"evaluate(): data must be a dataset name, (x, y) or (x, y_fine, y_coarse) tensors, a "
                    f"DataLoader or a torch Dataset, got {type(data).__name__}")


def _unpack(items: Sequence[Any], what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if len(items) not in (2, 3):
        raise DataError(f"{what} must be (x, y) or (x, y_fine, y_coarse), got {len(items)} items")
    x, fine, coarse = (*items, None)[:3]
    return torch.as_tensor(x), torch.as_tensor(fine), None if coarse is None else torch.as_tensor(coarse)


def _read(loader: torch.utils.data.DataLoader, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The first ``n`` samples ``loader`` yields (a shuffling loader yields others each time)."""
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    count = 0
    for batch in loader:
        if not isinstance(batch, (tuple, list)):
            raise DataError(f"the DataLoader must yield (x, y) or (x, y_fine, y_coarse), got {type(batch).__name__}")
        parts.append(_unpack(batch, "a DataLoader batch"))
        count += len(parts[-1][0])
        if count >= n:
            break
    if not parts:
        raise DataError("the DataLoader yielded no samples")
    coarse = None if any(p[2] is None for p in parts) else torch.cat([p[2] for p in parts])[:n]
    return torch.cat([p[0] for p in parts])[:n], torch.cat([p[1] for p in parts])[:n], coarse


def _tensor_data(model: CoarseFineNet, x: torch.Tensor, fine: torch.Tensor,
                 coarse: torch.Tensor | None) -> TensorData:
    """Validated images and labels with a DatasetInfo that describes them; without coarse labels the data is
    single-head (:data:`robustness.data.base.NO_COARSE_LABEL`: nothing invents a coarse class)."""
    channels = _channels(model) or (int(x.shape[1]) if x.dim() == 4 else 0)
    images = _images(x, channels)
    if not len(images):
        raise DataError("the data holds no images")
    num_fine, num_coarse = _head_sizes(model, images[0])
    fine = _labels(fine, "y_fine" if coarse is not None else "y", len(images), num_fine)
    if coarse is None:
        coarse_classes: tuple[str, ...] = ()
        fine_to_coarse: tuple[int, ...] = ()
        coarse = torch.full_like(fine, NO_COARSE_LABEL)
    else:
        coarse = _labels(coarse, "y_coarse", len(images), num_coarse)
        coarse_classes = tuple(map(str, range(num_coarse or int(coarse.max()) + 1)))
        fine_to_coarse = _fine_to_coarse(fine, coarse, num_fine)
    mean, std = (tuple(t.flatten().tolist()) for t in (model.mean, model.std))
    info = DatasetInfo(name=TENSOR_DATASET, fine_classes=tuple(map(str, range(num_fine))),
                       coarse_classes=coarse_classes, fine_to_coarse=fine_to_coarse,
                       mean=mean * (channels // len(mean)), std=std * (channels // len(std)),
                       image_size=int(images.shape[2]), channels=channels)
    return TensorData(info, images, fine, coarse)


def _images(x: torch.Tensor, channels: int) -> torch.Tensor:
    """``x`` as contiguous float32 on the CPU; uint8 images are read as 0..255."""
    if x.dim() != 4 or x.shape[1] != channels:
        raise DataError(f"images must be [N, {channels}, H, W] for this model, got shape {list(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float().div(255.0).contiguous()
    if not x.is_floating_point():
        raise DataError(f"images must be float in [0, 1] or uint8, got {x.dtype}")
    images = x.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(images).all():
        raise DataError("images contain NaN or inf")
    low, high = float(images.min()), float(images.max())
    if low < 0 or high > 1:
        raise DataError(f"images must lie in [0, 1] (got {low:.3g}..{high:.3g}): attacks work in pixel space; "
                        f"give the model's normalisation as mean=/std= instead")
    return images


def _labels(y: torch.Tensor, what: str, n: int, classes: int | None) -> torch.Tensor:
    if y.dim() != 1 or len(y) != n:
        raise DataError(f"{what} must hold one label per image ({n}), got shape {list(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise DataError(f"{what} must hold integer class indices, got {y.dtype}")
    y = y.to("cpu", torch.int64)
    if len(y) and int(y.min()) < 0:
        raise DataError(f"{what} holds negative labels")
    if len(y) and classes is not None and int(y.max()) >= classes:
        raise DataError(f"{what} holds labels outside the model's classes 0..{classes - 1}")
    return y


def _fine_to_coarse(fine: torch.Tensor, coarse: torch.Tensor, num_fine: int) -> tuple[int, ...]:
    """Each fine class's coarse class, as the pairs say; a fine class absent from the data maps to coarse class 0
    (no sample says otherwise)."""
    mapping = [0] * num_fine
    pairs = torch.unique(torch.stack([fine, coarse], 1), dim=0).tolist()
    seen: dict[int, int] = {}
    for f, c in pairs:
        if f in seen:
            raise DataError(f"fine class {f} appears with coarse labels {seen[f]} and {c}: y_coarse must be a "
                            f"function of y_fine")
        seen[f] = mapping[f] = c
    return tuple(mapping)
