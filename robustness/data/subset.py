"""Which test images an attack run attacks: a seeded, class-stratified selection (or the first n), recorded.

:func:`select_subset` chooses the samples and returns a :class:`Subset`: the rule, its seed, the chosen indices
into the test split (ascending: the attacked samples keep the split's order, and sample ``i`` of the records is
``indices[i]`` of the split), the number per fine class and a SHA-256 of the chosen images and labels. Two runs
attacked the same images, in the same order, with the same labels iff their hashes match; a comparison of models
or training seeds is meaningful only on one hash.

Rules (:data:`SUBSET_RULES`, what a user may ask for):

- ``stratified`` (the default): as many samples of every fine class as the split allows, ``n // k`` each for
  ``k`` classes present; the remainder, and what classes with fewer samples cannot give, goes one sample at a time
  to the classes that still have some, in an order drawn from the seed. Each class's members are a random
  permutation of its samples, drawn from the seed and the class alone: a larger ``n`` with the same seed keeps
  every member a smaller one chose (where the quotas grow).
- ``first``: the first ``n`` samples of the split, as published "first n" evaluations do (RobustBench's). On a
  split sorted by class that can be a few classes only. Its seed is None: it draws nothing.

``given`` (:data:`GIVEN`) is recorded, never chosen: images a caller handed over as tensors, attacked as given.
``n`` at least the split's size selects every sample, whatever the rule.
"""
from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from robustness.core.errors import ConfigError
from robustness.core.runtime import derive_seed
from robustness.data.base import CoarseFineDataset

__all__ = ["SUBSET_RULES", "GIVEN", "RECORDED_RULES", "MAX_SUBSET_SEED", "Subset", "select_subset", "take",
           "given_subset", "images_sha256", "check_seed"]

#: the rules a user may ask for (``AttackConfig.subset``, ``--subset``)
SUBSET_RULES = ("stratified", "first")
#: the rule recorded for images handed over as tensors (attacked as given, in the given order)
GIVEN = "given"
#: every rule a manifest may record
RECORDED_RULES = (*SUBSET_RULES, GIVEN)
#: subset seeds lie in [0, MAX_SUBSET_SEED)
MAX_SUBSET_SEED = 2 ** 63


@dataclass(frozen=True)
class Subset:
    """The attacked samples of a split: ``rule`` (:data:`RECORDED_RULES`), ``seed`` (None for a rule that draws
    nothing), ``indices`` (split indices in sample order), ``sha256`` (:func:`images_sha256` of those samples)
    and ``class_counts`` (fine label -> number of samples, every fine class of the dataset, zeros included)."""

    rule: str
    seed: int | None
    indices: tuple[int, ...]
    sha256: str
    class_counts: dict[int, int]

    @property
    def n(self) -> int:
        """The number of samples."""
        return len(self.indices)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: ``rule``, ``seed``, ``indices`` (a list), ``sha256``, ``class_counts`` (str keys)."""
        return {"rule": self.rule, "seed": self.seed, "indices": [int(i) for i in self.indices],
                "sha256": self.sha256, "class_counts": {str(k): int(v) for k, v in self.class_counts.items()}}


def images_sha256(images: torch.Tensor, fine: torch.Tensor) -> str:
    """SHA-256 of images (dtype, shape and bytes: uint8 for a dataset, float32 for images held as given) and their
    fine labels (int64), in sample order."""
    images = images.detach().cpu().contiguous()
    labels = torch.as_tensor(fine, dtype=torch.int64).detach().cpu().contiguous()
    digest = hashlib.sha256()
    digest.update(f"images|{images.dtype}|{tuple(images.shape)}|".encode())
    digest.update(images.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(f"|fine|{tuple(labels.shape)}|".encode())
    digest.update(labels.numpy().astype("<i8").tobytes())
    return digest.hexdigest()


def select_subset(dataset: CoarseFineDataset, n: int, rule: str = "stratified", seed: int = 0) -> Subset:
    """The ``n`` samples of ``dataset`` that ``rule`` chooses with ``seed`` (see the module docstring); every
    sample when ``n >= len(dataset)``. ConfigError for an unknown rule, an ``n`` below 1 or a bad seed."""
    if rule not in SUBSET_RULES:
        raise ConfigError(f"unknown subset rule {rule!r}; choose one of: {', '.join(SUBSET_RULES)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise ConfigError(f"subset size must be a positive integer, got {n!r}")
    check_seed(seed)
    n, size = int(n), len(dataset)
    labels = dataset.fine.numpy()
    if rule == "first" or n >= size:
        indices = np.arange(min(n, size))
    else:
        indices = _stratified(labels, n, int(seed))
    return _subset(dataset, rule, None if rule == "first" else int(seed), indices)


def given_subset(dataset: CoarseFineDataset) -> Subset:
    """Every sample of ``dataset`` in its order, recorded as rule ``given`` (images handed over as tensors)."""
    return _subset(dataset, GIVEN, None, np.arange(len(dataset)))


def take(dataset: CoarseFineDataset, indices: Sequence[int] | Subset) -> CoarseFineDataset:
    """The samples of ``dataset`` at ``indices`` (a Subset's), in that order: a dataset of the same class, info and
    split (a subclass that holds its images otherwise, e.g. as floats, keeps them so)."""
    chosen = indices.indices if isinstance(indices, Subset) else indices
    idx = torch.as_tensor(list(chosen), dtype=torch.int64)
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(dataset)):
        raise ConfigError(f"subset indices must lie in 0..{len(dataset) - 1}")
    out = copy.copy(dataset)
    out.images = dataset.images[idx].contiguous()
    out.fine = dataset.fine[idx]
    out.coarse = dataset.coarse[idx]
    return out


def check_seed(seed: Any, what: str = "subset seed") -> int:
    """``seed`` as an int in [0, 2**63); ConfigError otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < MAX_SUBSET_SEED:
        raise ConfigError(f"{what} must be a non-negative integer below 2**63, got {seed!r}")
    return int(seed)


def _subset(dataset: CoarseFineDataset, rule: str, seed: int | None, indices: np.ndarray) -> Subset:
    idx = torch.as_tensor(indices, dtype=torch.int64)
    fine = dataset.fine[idx]
    counts = np.bincount(fine.numpy(), minlength=dataset.info.num_fine)
    return Subset(rule, seed, tuple(int(i) for i in indices), images_sha256(dataset.images[idx], fine),
                  {int(c): int(k) for c, k in enumerate(counts)})


def _stratified(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` (< len(labels)) indices, as equal per label as the labels allow, ascending."""
    classes, available = np.unique(labels, return_counts=True)
    quota = np.zeros(len(classes), dtype=np.int64)
    order = np.random.default_rng(derive_seed(seed, "subset", "class-order")).permutation(len(classes))
    remaining = n
    while remaining:
        open_ = [c for c in order if quota[c] < available[c]]  # classes that can still give, in the seeded order
        share = remaining // len(open_)
        if share == 0:  # fewer left than classes that can give: one each to the first in the seeded order
            quota[open_[:remaining]] += 1
            break
        for c in open_:
            add = min(share, int(available[c] - quota[c]))
            quota[c] += add
            remaining -= add
    chosen = []
    for c, label in enumerate(classes):
        if quota[c]:
            members = np.flatnonzero(labels == label)
            rng = np.random.default_rng(derive_seed(seed, "subset", "members", int(label)))
            chosen.append(rng.permutation(members)[:quota[c]])
    return np.sort(np.concatenate(chosen))
