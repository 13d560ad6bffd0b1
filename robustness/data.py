"""Image datasets with a fine and a coarse label per image.

Every dataset is held in memory as uint8 images plus fine and coarse labels, and described by a
``DatasetInfo`` (class names, the fine-to-coarse map, normalisation constants, image size) that checkpoints
store so a model is never evaluated on a dataset it was not trained for. Images are served in [0, 1]:
normalisation belongs to the model adapter, not to the data.

Datasets: ``synthetic`` (generated, no files), ``cifar100``, ``cifar10`` and ``imagefolder`` (local files only;
nothing is ever downloaded).
"""
from __future__ import annotations

import logging
import math
import pickle
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from robustness.core.errors import ConfigError, DataError, UnknownNameError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")


# --------------------------------------------------------------------------------------------------------------
# Dataset description and container
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about its dataset: classes, label hierarchy, normalisation, image geometry."""

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
        if len(self.fine_to_coarse) != len(self.fine_classes):
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
        """Number of coarse classes."""
        return len(self.coarse_classes)

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
        self.coarse = torch.tensor(info.fine_to_coarse, dtype=torch.int64)[fine]
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


@dataclass(frozen=True)
class _Source:
    load: Callable[..., CoarseFineDataset]
    info: Callable[..., DatasetInfo]
    options: tuple[str, ...] = field(default=())
    needs_root: bool = True


def list_datasets() -> list[str]:
    """Names that ``load_dataset`` accepts."""
    return sorted(_SOURCES)


def load_dataset(name: str, split: str = "train", root: str | Path | None = None, **options: Any) -> CoarseFineDataset:
    """The ``split`` ("train" or "test") of dataset ``name``, read from ``root`` where the dataset lives on disk."""
    source = _source(name, options)
    if split not in SPLITS:
        raise ConfigError(f"{name}: unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if source.needs_root:
        dataset = source.load(split, _require_root(name, root), **options)
    else:
        dataset = source.load(split, **options)
    log.debug("loaded %r", dataset)
    return dataset


def dataset_info(name: str, root: str | Path | None = None, **options: Any) -> DatasetInfo:
    """The DatasetInfo of dataset ``name``, reading as little as the format allows."""
    source = _source(name, options)
    if source.needs_root:
        return source.info(_require_root(name, root), **options)
    return source.info(**options)


def _source(name: str, options: dict[str, Any]) -> _Source:
    if name not in _SOURCES:
        raise UnknownNameError("dataset", name, list_datasets())
    source = _SOURCES[name]
    unknown = sorted(set(options) - set(source.options))
    if unknown:
        known = ", ".join(source.options) or "none"
        raise ConfigError(f"{name}: unknown option(s) {', '.join(unknown)}; known options: {known}")
    return source


def _require_root(name: str, root: str | Path | None) -> Path:
    if root is None or str(root) == "":
        raise DataError(f"{name}: no data root given; pass --data-root pointing at the local copy "
                        f"(nothing is downloaded)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{name}: data root {path} does not exist or is not a folder")
    return path


def _int_option(dataset: str, option: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{dataset}: option {option} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ConfigError(f"{dataset}: option {option} must be {bound}, got {value}")
    return value


# --------------------------------------------------------------------------------------------------------------
# synthetic: shapes (coarse families) filled with textures (fine classes)
# --------------------------------------------------------------------------------------------------------------
# The family is the silhouette (high contrast against the background); the fine class is the texture inside it,
# drawn at lower contrast. Nuisances that defeat a linear model on pixels: position, scale, rotation, shape and
# background colours, a low-frequency background wave, small clutter blobs and pixel noise.

SYNTHETIC_SHAPES = ("disc", "bar", "triangle", "cross", "star", "crescent")
SYNTHETIC_TEXTURES = ("plain", "stripes", "checker", "dots", "rings", "grid")

# Per-channel mean/std of the default train split (seed 0, 10000 images, 32 px), measured once and fixed so that
# every split and option set shares one normalisation (other sizes and seeds differ by < 0.01).
_SYNTHETIC_MEAN = (0.4908, 0.4901, 0.4910)
_SYNTHETIC_STD = (0.2598, 0.2618, 0.2607)
_SYNTHETIC_CHUNK_PIXELS = 1024 * 32 * 32  # per generation chunk: 1024 images of 32 px, fewer larger ones
_SPLIT_CODE = {"train": 0, "test": 1}


def _synthetic_info(image_size: int = 32, n_coarse: int = 4, fine_per_coarse: int = 4, **_: Any) -> DatasetInfo:
    image_size, n_coarse, fine_per_coarse = _synthetic_geometry(image_size, n_coarse, fine_per_coarse)
    shapes = SYNTHETIC_SHAPES[:n_coarse]
    fine = tuple(f"{s}/{t}" for s in shapes for t in SYNTHETIC_TEXTURES[:fine_per_coarse])
    return DatasetInfo(
        name="synthetic",
        fine_classes=fine,
        coarse_classes=shapes,
        fine_to_coarse=tuple(i // fine_per_coarse for i in range(len(fine))),
        mean=_SYNTHETIC_MEAN,
        std=_SYNTHETIC_STD,
        image_size=image_size,
    )


def _synthetic_geometry(image_size: Any, n_coarse: Any, fine_per_coarse: Any) -> tuple[int, int, int]:
    return (_int_option("synthetic", "image_size", image_size, 16, 256),
            _int_option("synthetic", "n_coarse", n_coarse, 2, len(SYNTHETIC_SHAPES)),
            _int_option("synthetic", "fine_per_coarse", fine_per_coarse, 1, len(SYNTHETIC_TEXTURES)))


def _load_synthetic(split: str, n: int | None = None, image_size: int = 32, seed: int = 0,
                    n_coarse: int = 4, fine_per_coarse: int = 4) -> CoarseFineDataset:
    info = _synthetic_info(image_size, n_coarse, fine_per_coarse)
    if n is None:
        n = 10000 if split == "train" else 2000
    n = _int_option("synthetic", "n", n, 1)
    seed = _int_option("synthetic", "seed", seed, 0)
    images, fine = _generate_synthetic(n, info.image_size, seed, split, n_coarse, fine_per_coarse)
    return CoarseFineDataset(info, torch.from_numpy(images), torch.from_numpy(fine), split)


def _generate_synthetic(n: int, size: int, seed: int, split: str, n_coarse: int,
                        fine_per_coarse: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [n, 3, size, size] and int64 fine labels [n]; sample i depends only on (seed, split, i)."""
    chunk_size = max(16, _SYNTHETIC_CHUNK_PIXELS // (size * size))
    images, labels = [], []
    for chunk in range(math.ceil(n / chunk_size)):
        rng = np.random.default_rng([seed, _SPLIT_CODE[split], chunk])
        # Always draw a whole chunk so a smaller n yields a prefix of a larger one.
        img, fine = _synthetic_chunk(rng, chunk_size, size, n_coarse, fine_per_coarse)
        images.append(img)
        labels.append(fine)
    return np.concatenate(images)[:n], np.concatenate(labels)[:n]


def _synthetic_chunk(rng: np.random.Generator, m: int, size: int, n_coarse: int,
                     fine_per_coarse: int) -> tuple[np.ndarray, np.ndarray]:
    """m images with balanced, shuffled labels: a textured shape over a cluttered background, plus noise."""
    fine = rng.permutation(np.arange(m) % (n_coarse * fine_per_coarse)).astype(np.int64)
    shape, texture = fine // fine_per_coarse, fine % fine_per_coarse
    u, v, r = _shape_frames(rng, m, size)

    depth = -_per_class(shape, _SHAPE_SDFS, u / r, v / r) * r * size  # pixels inside the outline
    mask = np.clip(depth + 0.5, 0.0, 1.0)  # ~1 px anti-aliased edge
    # The texture stops short of the outline so the silhouette stays clean whatever the texture.
    interior = np.clip(depth + 0.5 - 1.5 * size / 32, 0.0, 1.0)
    tex = _textures(rng, texture, u, v, size) * interior

    bg, fg, fg2 = _synthetic_colours(rng, m)
    background = _background(rng, m, size, bg)
    foreground = fg[:, :, None, None] * (1 - tex[:, None]) + fg2[:, :, None, None] * tex[:, None]
    img = background * (1 - mask[:, None]) + foreground * mask[:, None]
    img += rng.normal(0.0, 0.03, img.shape).astype(np.float32)
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8), fine


def _shape_frames(rng: np.random.Generator, m: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each pixel's coordinates (u, v) [m, S, S] in its shape's rotated frame, and the shape radius [m, 1, 1];
    all in image-side units."""
    radius = rng.uniform(0.25, 0.35, m).astype(np.float32)
    # Shapes reach up to ~1.2 radii from their centre: keep them (nearly) inside the frame.
    centre = rng.uniform(-1.0, 1.0, (2, m)).astype(np.float32) * (0.52 - 1.15 * radius)
    angle = rng.uniform(0.0, 2 * np.pi, m).astype(np.float32)
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    x = grid[None, None, :] - centre[0][:, None, None]
    y = grid[None, :, None] - centre[1][:, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    return cos * x + sin * y, cos * y - sin * x, radius[:, None, None]


def _textures(rng: np.random.Generator, texture: np.ndarray, u: np.ndarray, v: np.ndarray, size: int) -> np.ndarray:
    """Texture weights in [0, 1] [m, S, S]; the period is fixed in pixels, independent of the shape's scale."""
    period = max(3.0, 4.5 * size / 32) / size
    phase = rng.uniform(0.0, 1.0, (2, len(texture))).astype(np.float32)[:, :, None, None]
    return _per_class(texture, _TEXTURES, u / period + phase[0], v / period + phase[1])


def _per_class(labels: np.ndarray, fns: tuple[Callable[..., np.ndarray], ...], *coords: np.ndarray) -> np.ndarray:
    out = np.empty(coords[0].shape, dtype=np.float32)
    for k in np.unique(labels):
        idx = labels == k
        out[idx] = fns[k](*(c[idx] for c in coords))
    return out


def _sdf_disc(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.hypot(u, v) - 1.0


def _sdf_bar(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u) - 1.2, np.abs(v) - 0.48)


def _sdf_triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    normals = [(np.cos(a), np.sin(a)) for a in (np.pi / 2, np.pi * 7 / 6, np.pi * 11 / 6)]
    return np.max([nx * u + ny * v for nx, ny in normals], axis=0) - 0.62


def _sdf_cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return np.minimum(np.maximum(au - 1.0, av - 0.38), np.maximum(au - 0.38, av - 1.0))


def _sdf_star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.hypot(u, v) - (0.8 + 0.3 * np.cos(5 * np.arctan2(v, u)))


def _sdf_crescent(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.hypot(u, v) - 1.05, 0.8 - np.hypot(u - 0.6, v))


_SHAPE_SDFS = (_sdf_disc, _sdf_bar, _sdf_triangle, _sdf_cross, _sdf_star, _sdf_crescent)


def _square_wave(phase: np.ndarray, sharpness: float = 3.0) -> np.ndarray:
    """Soft 0/1 square wave of period 1."""
    return np.clip(sharpness * np.sin(2 * np.pi * phase), -1.0, 1.0) * 0.5 + 0.5


def _tex_plain(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.zeros_like(a)


def _tex_stripes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _square_wave(a)


def _tex_checker(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sa, sb = _square_wave(a / 1.4), _square_wave(b / 1.4)  # larger cells than the stripes
    return sa * sb + (1 - sa) * (1 - sb)


def _tex_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    da, db = a - np.round(a), b - np.round(b)
    return np.clip((0.3 - np.hypot(da, db)) * 8.0, 0.0, 1.0)


def _tex_rings(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _square_wave(np.hypot(a, b))


def _thin_lines(t: np.ndarray) -> np.ndarray:
    return np.clip((0.15 - np.abs(t - np.round(t))) * 8.0, 0.0, 1.0)


def _tex_grid(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum(_thin_lines(a), _thin_lines(b))


_TEXTURES = (_tex_plain, _tex_stripes, _tex_checker, _tex_dots, _tex_rings, _tex_grid)


def _synthetic_colours(rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Background, foreground and texture colours [m, 3] with a guaranteed shape/background contrast."""
    lum_bg = rng.uniform(0.1, 0.9, m)
    gap = rng.uniform(0.35, 0.6, m)
    up = np.where(lum_bg + gap > 0.95, False, np.where(lum_bg - gap < 0.05, True, rng.random(m) < 0.5))
    lum_fg = np.clip(np.where(up, lum_bg + gap, lum_bg - gap), 0.0, 1.0)
    bg = np.clip(lum_bg[:, None] + rng.uniform(-0.2, 0.2, (m, 3)), 0, 1)
    fg = np.clip(lum_fg[:, None] + rng.uniform(-0.2, 0.2, (m, 3)), 0, 1)
    towards_mid = np.where(fg.mean(1) < 0.5, 1.0, -1.0)[:, None]
    fg2 = np.clip(fg + towards_mid * rng.uniform(0.12, 0.22, (m, 1)), 0, 1)
    return bg.astype(np.float32), fg.astype(np.float32), fg2.astype(np.float32)


def _background(rng: np.random.Generator, m: int, size: int, colour: np.ndarray) -> np.ndarray:
    """Plain colour plus a low-frequency wave and a few small blobs of clutter: [m, 3, S, S]."""
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    freq = (rng.uniform(0.5, 2.0, (m, 2)) * rng.choice([-1, 1], (m, 2))).astype(np.float32)
    phase = rng.uniform(0, 1, (m, 1, 1)).astype(np.float32)
    wave = np.sin(2 * np.pi * (freq[:, 0, None, None] * grid[None, None, :]
                               + freq[:, 1, None, None] * grid[None, :, None] + phase))
    amp = rng.uniform(-0.08, 0.08, (m, 3, 1, 1)).astype(np.float32)
    img = colour[:, :, None, None] + amp * wave[:, None]
    for _ in range(2):
        centre = rng.uniform(0, 1, (m, 2)).astype(np.float32)
        rad = rng.uniform(0.03, 0.07, m).astype(np.float32)[:, None, None]
        dist = np.hypot(grid[None, None, :] - centre[:, 0, None, None],
                        grid[None, :, None] - centre[:, 1, None, None])
        blob = np.clip((rad - dist) * size + 0.5, 0, 1)[:, None]
        blob_colour = rng.uniform(0, 1, (m, 3, 1, 1)).astype(np.float32)
        img = img * (1 - blob) + blob_colour * blob
    return img


# --------------------------------------------------------------------------------------------------------------
# Safe pickle reading (CIFAR python-format files)
# --------------------------------------------------------------------------------------------------------------

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
    from numpy._core.numeric import _frombuffer as _np_frombuffer
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct  # type: ignore[no-redef]
    from numpy.core.numeric import _frombuffer as _np_frombuffer  # type: ignore[no-redef]


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 pickles of bytes use it (protocol <= 2), limited to latin-1."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    if not isinstance(text, str):
        raise pickle.UnpicklingError("refusing _codecs.encode of a non-string")
    return text.encode("latin-1")


# The globals that numpy arrays in CIFAR pickles need: the originals (Python 2, protocol 2) reference
# numpy.core.multiarray._reconstruct, ndarray and dtype; Python 3 rewrites add _codecs.encode (protocol 2) or
# numeric._frombuffer (protocol 5). Anything else is refused before it can be called.
_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _np_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _np_frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can build plain containers and numpy arrays and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _read_pickle(dataset: str, path: Path) -> dict[str, Any]:
    """The dict stored in the pickle at ``path``, with bytes keys decoded to str."""
    try:
        with path.open("rb") as f:
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise DataError(f"{dataset}: cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # truncated or garbage files fail in many ways inside pickle and numpy
        reason = (str(e).splitlines() or [""])[0][:200]
        raise DataError(f"{dataset}: {path} is not a valid dataset pickle ({type(e).__name__}: {reason})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{dataset}: {path} holds a {type(obj).__name__}, expected a dict")
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _field(dataset: str, path: Path, record: dict[str, Any], key: str) -> Any:
    if key not in record:
        raise DataError(f"{dataset}: {path} lacks the {key!r} entry (has: {', '.join(sorted(record)) or 'nothing'})")
    return record[key]


def _names(dataset: str, path: Path, record: dict[str, Any], key: str) -> tuple[str, ...]:
    values = _field(dataset, path, record, key)
    if not isinstance(values, (list, tuple)) or not values:
        raise DataError(f"{dataset}: {path}: {key!r} must be a non-empty list of names")
    return tuple(v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values)


def _pixels(dataset: str, path: Path, record: dict[str, Any], size: int = 32) -> np.ndarray:
    """The 'data' entry as uint8 [N, 3, size, size]."""
    data = _field(dataset, path, record, "data")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * size * size:
        shape = list(data.shape) if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{dataset}: {path}: 'data' must be an array [N, {3 * size * size}], got {shape}")
    if data.dtype != np.uint8:
        if data.dtype.kind not in "iu" or data.size and (data.min() < 0 or data.max() > 255):
            raise DataError(f"{dataset}: {path}: 'data' must hold uint8 pixels, got {data.dtype}")
        data = data.astype(np.uint8)
    return data.reshape(-1, 3, size, size)


def _labels(dataset: str, path: Path, record: dict[str, Any], key: str, n: int, num_classes: int) -> np.ndarray:
    values = _field(dataset, path, record, key)
    try:
        labels = np.asarray(values, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{dataset}: {path}: {key!r} must be a list of integers") from None
    if labels.shape != (n,):
        raise DataError(f"{dataset}: {path}: {key!r} has shape {list(labels.shape)}, expected [{n}] (one per image)")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{dataset}: {path}: {key!r} holds labels outside 0..{num_classes - 1}")
    return labels


def _cifar_folder(dataset: str, root: Path, subfolder: str, files: tuple[str, ...]) -> Path:
    """The folder holding ``files``: ``root/subfolder`` or ``root`` itself."""
    folder = root / subfolder if (root / subfolder).is_dir() else root
    for name in files:
        if not (folder / name).is_file():
            where = f"'{subfolder}/{name}' under {root}" if folder == root and root.name != subfolder \
                else f"'{name}' in {folder}"
            raise DataError(f"{dataset}: no {where} (expected the torchvision {subfolder} folder with files "
                            f"{', '.join(files)}; nothing is downloaded)")
    return folder


# --------------------------------------------------------------------------------------------------------------
# cifar100 / cifar10 (torchvision's python-format folders)
# --------------------------------------------------------------------------------------------------------------
# torchvision.datasets.CIFAR100/CIFAR10 cannot be used: they verify the md5 sums of the original files (a test copy
# or a re-pickled copy fails) and unpickle with the unrestricted pickle module. We read the same files ourselves.

_CIFAR100_DIR, _CIFAR100_FILES = "cifar-100-python", ("train", "test", "meta")
_CIFAR100_MEAN, _CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_FILES = (*_CIFAR10_TRAIN, "test_batch", "batches.meta")
_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_CIFAR10_VEHICLES = frozenset({"airplane", "automobile", "ship", "truck"})


def _cifar100_info(root: Path) -> DatasetInfo:
    folder = _cifar_folder("cifar100", root, _CIFAR100_DIR, _CIFAR100_FILES)
    meta_path = folder / "meta"
    meta = _read_pickle("cifar100", meta_path)
    fine = _names("cifar100", meta_path, meta, "fine_label_names")
    coarse = _names("cifar100", meta_path, meta, "coarse_label_names")
    mapping = _cifar100_mapping(str(folder / "train"), _stat_key(folder / "train"), fine, coarse)
    return DatasetInfo("cifar100", fine, coarse, mapping, _CIFAR100_MEAN, _CIFAR100_STD, image_size=32)


def _stat_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@lru_cache(maxsize=4)
def _cifar100_mapping(train_path: str, _stat: tuple[int, int], fine: tuple[str, ...],
                      coarse: tuple[str, ...]) -> tuple[int, ...]:
    """The fine-to-coarse map that the train split's labels define (cached per file version)."""
    path = Path(train_path)
    record = _read_pickle("cifar100", path)
    n = len(_field("cifar100", path, record, "fine_labels"))
    fine_labels = _labels("cifar100", path, record, "fine_labels", n, len(fine))
    coarse_labels = _labels("cifar100", path, record, "coarse_labels", n, len(coarse))
    mapping = []
    for f, name in enumerate(fine):
        parents = np.unique(coarse_labels[fine_labels == f])
        if len(parents) != 1:
            found = "no samples" if not len(parents) else f"coarse labels {parents.tolist()}"
            raise DataError(f"cifar100: {path}: fine class {name!r} has {found}; expected exactly one coarse class")
        mapping.append(int(parents[0]))
    return tuple(mapping)


def _load_cifar100(split: str, root: Path) -> CoarseFineDataset:
    info = _cifar100_info(root)
    path = _cifar_folder("cifar100", root, _CIFAR100_DIR, _CIFAR100_FILES) / split
    record = _read_pickle("cifar100", path)
    images = _pixels("cifar100", path, record)
    fine = _labels("cifar100", path, record, "fine_labels", len(images), info.num_fine)
    coarse = _labels("cifar100", path, record, "coarse_labels", len(images), info.num_coarse)
    _check_coarse("cifar100", path, info, fine, coarse)
    return CoarseFineDataset(info, torch.from_numpy(images), torch.from_numpy(fine), split)


def _check_coarse(dataset: str, path: Path, info: DatasetInfo, fine: np.ndarray, coarse: np.ndarray) -> None:
    expected = np.asarray(info.fine_to_coarse, dtype=np.int64)[fine]
    bad = np.flatnonzero(expected != coarse)
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{dataset}: {path}: {len(bad)} coarse labels contradict the fine-to-coarse map "
                        f"(sample {i}: fine {info.fine_classes[fine[i]]!r} belongs to "
                        f"{info.coarse_classes[expected[i]]!r}, labelled {int(coarse[i])})")


def _cifar10_info(root: Path) -> DatasetInfo:
    folder = _cifar_folder("cifar10", root, _CIFAR10_DIR, _CIFAR10_FILES)
    meta_path = folder / "batches.meta"
    fine = _names("cifar10", meta_path, _read_pickle("cifar10", meta_path), "label_names")
    coarse = ("vehicle", "animal")
    mapping = tuple(0 if name in _CIFAR10_VEHICLES else 1 for name in fine)
    return DatasetInfo("cifar10", fine, coarse, mapping, _CIFAR10_MEAN, _CIFAR10_STD, image_size=32)


def _load_cifar10(split: str, root: Path) -> CoarseFineDataset:
    info = _cifar10_info(root)
    folder = _cifar_folder("cifar10", root, _CIFAR10_DIR, _CIFAR10_FILES)
    images, labels = [], []
    for name in _CIFAR10_TRAIN if split == "train" else ("test_batch",):
        record = _read_pickle("cifar10", folder / name)
        images.append(_pixels("cifar10", folder / name, record))
        labels.append(_labels("cifar10", folder / name, record, "labels", len(images[-1]), info.num_fine))
    return CoarseFineDataset(info, torch.from_numpy(np.concatenate(images)),
                             torch.from_numpy(np.concatenate(labels)), split)


# --------------------------------------------------------------------------------------------------------------
# imagefolder: root/<coarse>/<fine>/*.png|jpg, optionally under root/train and root/test
# --------------------------------------------------------------------------------------------------------------

_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_IMAGEFOLDER_LAYOUT = "root/<coarse>/<fine>/*.png|jpg, optionally split into root/train and root/test"


@dataclass(frozen=True)
class _FolderPlan:
    """Class hierarchy and the files of each split: split -> ((path, fine index), ...)."""

    fine: tuple[str, ...]
    coarse: tuple[str, ...]
    fine_to_coarse: tuple[int, ...]
    files: dict[str, tuple[tuple[Path, int], ...]]


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith("."))


def _scan_classes(folder: Path) -> dict[tuple[str, str], list[Path]]:
    """(coarse, fine) -> image files under ``folder``; fine names must be unique across coarse folders."""
    classes: dict[tuple[str, str], list[Path]] = {}
    owner: dict[str, Path] = {}
    coarse_dirs = _subdirs(folder)
    if not coarse_dirs:
        raise DataError(f"imagefolder: no class folders under {folder} (expected {_IMAGEFOLDER_LAYOUT})")
    for coarse_dir in coarse_dirs:
        fine_dirs = _subdirs(coarse_dir)
        if not fine_dirs:
            raise DataError(f"imagefolder: coarse folder {coarse_dir} has no fine-class subfolders "
                            f"(expected {_IMAGEFOLDER_LAYOUT})")
        for fine_dir in fine_dirs:
            if fine_dir.name in owner:
                raise DataError(f"imagefolder: fine class {fine_dir.name!r} appears under two coarse folders "
                                f"({owner[fine_dir.name]} and {fine_dir}); fine class names must be unique")
            owner[fine_dir.name] = fine_dir
            files = _image_files(fine_dir)
            if not files:
                raise DataError(f"imagefolder: no .png/.jpg images in {fine_dir}")
            classes[(coarse_dir.name, fine_dir.name)] = files
    return classes


def _imagefolder_plan(root: Path, seed: int, test_fraction: float) -> _FolderPlan:
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_train != has_test:
        raise DataError(f"imagefolder: {root} has a '{'train' if has_train else 'test'}' folder but no "
                        f"'{'test' if has_train else 'train'}' folder (expected both, or {_IMAGEFOLDER_LAYOUT})")
    train = _scan_classes(root / "train" if has_train else root)
    keys = list(train)  # sorted by coarse, then fine
    coarse = tuple(dict.fromkeys(c for c, _ in keys))
    fine = tuple(f for _, f in keys)
    mapping = tuple(coarse.index(c) for c, _ in keys)
    if has_train:
        test = _scan_classes(root / "test")
        unknown = [f"{c}/{f}" for c, f in test if (c, f) not in train]
        if unknown:
            raise DataError(f"imagefolder: {root / 'test'} has classes missing from {root / 'train'}: "
                            f"{', '.join(unknown[:5])}")
        files = {"train": _indexed(train, keys), "test": _indexed(test, keys)}
    else:
        files = _random_split(train, keys, seed, test_fraction)
    return _FolderPlan(fine, coarse, mapping, files)


def _indexed(classes: dict[tuple[str, str], list[Path]], keys: list[tuple[str, str]]) -> tuple[tuple[Path, int], ...]:
    return tuple((path, keys.index(key)) for key, paths in classes.items() for path in paths)


def _random_split(classes: dict[tuple[str, str], list[Path]], keys: list[tuple[str, str]], seed: int,
                  test_fraction: float) -> dict[str, tuple[tuple[Path, int], ...]]:
    """A seeded per-class split; each class with >= 2 images keeps at least one image on each side."""
    train: list[tuple[Path, int]] = []
    test: list[tuple[Path, int]] = []
    for index, key in enumerate(keys):
        paths = classes[key]
        # Seed per class name so one class's split does not change when other classes are added.
        order = np.random.default_rng([seed, zlib.crc32(key[1].encode())]).permutation(len(paths))
        n_test = 0 if len(paths) < 2 else min(len(paths) - 1, max(1, round(test_fraction * len(paths))))
        test += [(paths[i], index) for i in sorted(order[:n_test])]
        train += [(paths[i], index) for i in sorted(order[n_test:])]
    return {"train": tuple(train), "test": tuple(test)}


def _read_images(files: tuple[tuple[Path, int], ...], size: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((len(files), 3, size, size), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB").resize((size, size), Image.BILINEAR)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"imagefolder: cannot read image {path} ({e})") from None
        images[i] = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    return images, np.fromiter((f for _, f in files), dtype=np.int64, count=len(files))


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pixels = images.transpose(1, 0, 2, 3).reshape(images.shape[1], -1).astype(np.float64) / 255.0
    # A floor keeps normalisation finite for a degenerate (constant-colour) train split.
    return tuple(pixels.mean(1).tolist()), tuple(np.maximum(pixels.std(1), 1e-3).tolist())


@lru_cache(maxsize=4)
def _imagefolder_train_stats(files: tuple[tuple[Path, int], ...], _stats: tuple[tuple[int, int], ...],
                             size: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation constants of the train files (cached per file list and file versions)."""
    return _channel_stats(_read_images(files, size)[0])


def _imagefolder_options(image_size: Any, seed: Any, test_fraction: Any) -> tuple[int, int, float]:
    size = _int_option("imagefolder", "image_size", image_size, 8, 1024)
    seed = _int_option("imagefolder", "seed", seed, 0)
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 <= test_fraction < 1:
        raise ConfigError(f"imagefolder: option test_fraction must be a number in [0, 1), got {test_fraction!r}")
    return size, seed, float(test_fraction)


def _imagefolder_info_from(plan: _FolderPlan, size: int, train_images: np.ndarray | None = None) -> DatasetInfo:
    if train_images is not None:
        mean, std = _channel_stats(train_images)
    else:
        files = plan.files["train"]
        mean, std = _imagefolder_train_stats(files, tuple(_stat_key(p) for p, _ in files), size)
    return DatasetInfo("imagefolder", plan.fine, plan.coarse, plan.fine_to_coarse, mean, std, image_size=size)


def _imagefolder_info(root: Path, image_size: int = 32, seed: int = 0, test_fraction: float = 0.2) -> DatasetInfo:
    size, seed, fraction = _imagefolder_options(image_size, seed, test_fraction)
    return _imagefolder_info_from(_imagefolder_plan(root, seed, fraction), size)


def _load_imagefolder(split: str, root: Path, image_size: int = 32, seed: int = 0,
                      test_fraction: float = 0.2) -> CoarseFineDataset:
    size, seed, fraction = _imagefolder_options(image_size, seed, test_fraction)
    plan = _imagefolder_plan(root, seed, fraction)
    if not plan.files[split]:
        raise DataError(f"imagefolder: the {split} split of {root} is empty (each class needs at least 2 images "
                        f"for a {split} split, or use root/train and root/test folders)")
    images, fine = _read_images(plan.files[split], size)
    info = _imagefolder_info_from(plan, size, images if split == "train" else None)
    return CoarseFineDataset(info, torch.from_numpy(images), torch.from_numpy(fine), split)


# --------------------------------------------------------------------------------------------------------------
# Registry table
# --------------------------------------------------------------------------------------------------------------

_SOURCES: dict[str, _Source] = {
    "synthetic": _Source(_load_synthetic, _synthetic_info,
                         ("n", "image_size", "seed", "n_coarse", "fine_per_coarse"), needs_root=False),
    "cifar100": _Source(_load_cifar100, _cifar100_info),
    "cifar10": _Source(_load_cifar10, _cifar10_info),
    "imagefolder": _Source(_load_imagefolder, _imagefolder_info, ("image_size", "seed", "test_fraction")),
}
