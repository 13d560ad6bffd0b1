"""Image datasets with a fine and a coarse label per image.

Every dataset is held in memory as uint8 images plus fine and coarse labels, and described by a
``DatasetInfo`` (class names, the fine-to-coarse map, normalisation constants, image size) that checkpoints
store so a model is never evaluated on a dataset it was not trained for. Images are served in [0, 1]:
normalisation belongs to the model adapter, not to the data.

Datasets: ``synthetic`` (generated, no files), ``digits`` (scikit-learn's bundled 8x8 handwritten digits, no
files), ``cifar100``, ``cifar10`` and ``imagefolder`` (local files only; nothing is ever downloaded). One module
per dataset registers itself with ``@register_dataset``; adding a dataset is one new module (see ``registry``).
Importing this package imports the built-in ones.
"""
from __future__ import annotations

from robustness.data import cifar, digits, imagefolder, synthetic  # noqa: F401  (importing registers them)
from robustness.data.base import CoarseFineDataset, DatasetInfo
from robustness.data.registry import (
    dataset_info,
    dataset_options,
    list_datasets,
    load_dataset,
    register_dataset,
    unregister_dataset,
)

__all__ = [
    "CoarseFineDataset",
    "DatasetInfo",
    "dataset_info",
    "dataset_options",
    "list_datasets",
    "load_dataset",
    "register_dataset",
    "unregister_dataset",
]
