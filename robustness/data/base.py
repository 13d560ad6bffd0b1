"""What every dataset shares: ``DatasetInfo`` (the description checkpoints store), ``CoarseFineDataset`` (the
in-memory container) and the option helpers dataset modules validate their options with.

Images are held as uint8 and served in [0, 1]: normalisation belongs to the model adapter, not to the data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustness.core.config import brief_number
from robustness.core.errors import ConfigError, DataError
from robustness.core.runtime import check_memory

#: The splits every dataset serves.
SPLITS = ("train", "test")


#: The coarse label of a sample whose dataset has no label hierarchy (records keep their int64 columns).
NO_COARSE_LABEL = -1


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about its dataset: classes, label hierarchy, normalisation, image geometry.

    Single-head data (plain classification) has no coarse classes: ``coarse_classes = fine_to_coarse = ()``;
    its samples' coarse label is :data:`NO_COARSE_LABEL`, never an invented class.
    """

    name: str
    fine_classes: tuple[str, ...]
    coarse_classes: tuple[str, ...]
    fine_to_coarse: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    channels: int = 3

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON) but store tuples so the info stays hashable and comparable.
        for name in ("fine_classes", "coarse_classes"):
            object.__setattr__(self, name, tuple(str(c) for c in getattr(self, name)))
        object.__setattr__(self, "fine_to_coarse", tuple(int(c) for c in self.fine_to_coarse))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "channels", int(self.channels))
        self._validate()

    def _validate(self) -> None:
        if not self.coarse_classes and self.fine_to_coarse:
            raise DataError(f"{self.name}: fine_to_coarse is given but there are no coarse classes")
        if self.coarse_classes and len(self.fine_to_coarse) != len(self.fine_classes):
            raise DataError(f"{self.name}: fine_to_coarse has {len(self.fine_to_coarse)} entries "
                            f"for {len(self.fine_classes)} fine classes")
        if any(not 0 <= c < len(self.coarse_classes) for c in self.fine_to_coarse):
            raise DataError(f"{self.name}: fine_to_coarse refers to a coarse class outside 0..{self.num_coarse - 1}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise DataError(f"{self.name}: mean/std need one value per channel ({self.channels})")
        if any(s <= 0 for s in self.std):
            raise DataError(f"{self.name}: std values must be positive, got {self.std}")

    @property
    def num_fine(self) -> int:
        """Number of fine classes."""
        return len(self.fine_classes)

    @property
    def num_coarse(self) -> int:
        """Number of coarse classes (0 for single-head data)."""
        return len(self.coarse_classes)

    @property
    def has_coarse(self) -> bool:
        """Whether the data has a label hierarchy (coarse labels)."""
        return bool(self.coarse_classes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (lists, not tuples) that ``from_dict`` turns back into an equal info."""
        return {
            "name": self.name,
            "fine_classes": list(self.fine_classes),
            "coarse_classes": list(self.coarse_classes),
            "fine_to_coarse": list(self.fine_to_coarse),
            "mean": list(self.mean),
            "std": list(self.std),
            "image_size": self.image_size,
            "channels": self.channels,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetInfo:
        """The info that ``to_dict`` described; a DataError if keys are missing or unknown."""
        if not isinstance(d, dict):
            raise DataError(f"dataset info must be a dict, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        required = known - {"channels"}
        missing, extra = sorted(required - d.keys()), sorted(d.keys() - known)
        if missing or extra:
            raise DataError(f"malformed dataset info: missing keys {missing}, unknown keys {extra}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise DataError(f"malformed dataset info: {e}") from None

    def differences(self, other: DatasetInfo) -> list[str]:
        """Human-readable list of what differs from ``other`` (empty if they describe the same data)."""
        diffs: list[str] = []
        if self.name != other.name:
            diffs.append(f"dataset differs ({self.name} vs {other.name})")
        for label, mine, theirs in (("fine", self.fine_classes, other.fine_classes),
                                    ("coarse", self.coarse_classes, other.coarse_classes)):
            if len(mine) != len(theirs):
                diffs.append(f"{label} classes differ ({len(mine)} vs {len(theirs)})")
            elif mine != theirs:
                i = next(k for k, (a, b) in enumerate(zip(mine, theirs)) if a != b)
                diffs.append(f"{label} class names differ (#{i}: {mine[i]!r} vs {theirs[i]!r})")
        if len(self.fine_to_coarse) == len(other.fine_to_coarse) and self.fine_to_coarse != other.fine_to_coarse:
            n = sum(a != b for a, b in zip(self.fine_to_coarse, other.fine_to_coarse))
            diffs.append(f"fine-to-coarse map differs ({n} fine classes map elsewhere)")
        if not (_close(self.mean, other.mean) and _close(self.std, other.std)):
            diffs.append(f"normalisation differs (mean {_fmt(self.mean)} std {_fmt(self.std)} vs "
                         f"mean {_fmt(other.mean)} std {_fmt(other.std)})")
        if self.image_size != other.image_size:
            diffs.append(f"image size differs ({self.image_size} vs {other.image_size})")
        if self.channels != other.channels:
            diffs.append(f"channels differ ({self.channels} vs {other.channels})")
        return diffs


def _close(a: tuple[float, ...], b: tuple[float, ...], tol: float = 1e-4) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


class CoarseFineDataset(torch.utils.data.Dataset):
    """Images held in memory as uint8 [N, C, H, W] with int64 fine and coarse labels; served as floats in [0, 1]."""

    def __init__(self, info: DatasetInfo, images: torch.Tensor, fine: torch.Tensor, split: str):
        fine = torch.as_tensor(fine, dtype=torch.int64)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(f"{info.name}: images must be uint8 [N, C, H, W], got {images.dtype} {list(images.shape)}")
        expected = (info.channels, info.image_size, info.image_size)
        if tuple(images.shape[1:]) != expected or images.shape[0] != fine.shape[0]:
            raise DataError(f"{info.name}: {len(fine)} labels for images of shape {list(images.shape)}, "
                            f"expected [N, {', '.join(map(str, expected))}]")
        if fine.numel() and (fine.min() < 0 or fine.max() >= info.num_fine):
            raise DataError(f"{info.name}: fine labels outside 0..{info.num_fine - 1}")
        self.info = info
        self.images = images.contiguous()
        self.fine = fine
        self.coarse = (torch.tensor(info.fine_to_coarse, dtype=torch.int64)[fine] if info.has_coarse
                       else torch.full_like(fine, NO_COARSE_LABEL))
        self.split = split

    def __len__(self) -> int:
        return int(self.fine.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.images[i].float().div_(255.0), int(self.fine[i]), int(self.coarse[i])

    def batch(self, indices: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float images in [0, 1] [B, C, H, W], fine labels [B] and coarse labels [B] for ``indices``."""
        return self.images[indices].float().div_(255.0), self.fine[indices], self.coarse[indices]

    def subset(self, n: int) -> CoarseFineDataset:
        """The first ``n`` samples (all of them if there are fewer), with the same info."""
        if int(n) <= 0:
            raise ConfigError(f"subset size must be positive, got {n}")
        return CoarseFineDataset(self.info, self.images[:n], self.fine[:n], self.split)

    def __repr__(self) -> str:
        return (f"CoarseFineDataset({self.info.name!r}, split={self.split!r}, n={len(self)}, "
                f"fine={self.info.num_fine}, coarse={self.info.num_coarse}, size={self.info.image_size})")


# --------------------------------------------------------------------------------------------------------------
# Registry and public entry points
# --------------------------------------------------------------------------------------------------------------


#: the largest value of an integer dataset option (seeds included): what numpy and torch hold in an int64
MAX_OPTION = 2 ** 63 - 1


def int_option(dataset: str, option: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``low..high`` (``high`` None: up to :data:`MAX_OPTION`, an int64); a ConfigError
    naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{dataset}: option {option} must be an integer, got {value!r}")
    value = int(value)
    if value < low or value > (MAX_OPTION if high is None else high):
        bound = f"in {low}..{high}" if high is not None else f">= {low}" if value < low else f"at most {MAX_OPTION}"
        raise ConfigError(f"{dataset}: option {option} must be {bound}, got {brief_number(value)}")
    return value


def check_dataset_memory(dataset: str, split: str, n: int, channels: int, size: int, copies: int = 1,
                         working: int = 0) -> None:
    """ConfigError, one line, before ``n`` images are generated or read, when they cannot fit in the memory
    available (:func:`robustness.core.runtime.available_memory`): ``n x channels x size**2`` bytes of uint8 images
    (``copies`` of them at the peak of building them) plus 16 bytes of fine and coarse int64 labels per image, plus
    ``working`` bytes the loader needs on top."""
    needed = n * (channels * size * size * copies + 16) + working
    check_memory(f"{dataset}: n = {n} {split} images of {channels}x{size}x{size}", needed, "lower [data] n")


def file_version(path: Path) -> tuple[int, int]:
    """(size, mtime in ns) of ``path``: a cache key that changes when the file is rewritten."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns
