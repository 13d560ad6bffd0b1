"""``synthetic``: generated coarse/fine images, no files needed (the quickstart's data).

Shapes are the coarse families, textures inside them the fine classes. The family is the silhouette (high contrast
against the background); the fine class is the texture inside it, drawn at lower contrast. Nuisances that defeat a
linear model on pixels: position, scale, rotation, shape and background colours, a low-frequency background wave,
small clutter blobs and pixel noise. Sample i depends only on (seed, split, i): a smaller n is a prefix of a larger
one, and train and test never share an image.

Before generating, the memory the split takes (n x 3 x image_size**2 bytes of uint8 images, twice while the chunks
are joined, plus the labels and one chunk's float32 work) is compared with the memory available: an ``n`` that
cannot fit is one ConfigError line with the numbers, not a machine swapping until the kernel kills the job.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from robustness.data.base import CoarseFineDataset, DatasetInfo, check_dataset_memory, int_option
from robustness.data.registry import register_dataset

SYNTHETIC_SHAPES = ("disc", "bar", "triangle", "cross", "star", "crescent")
SYNTHETIC_TEXTURES = ("plain", "stripes", "checker", "dots", "rings", "grid")

# Per-channel mean/std of the default train split (seed 0, 10000 images, 32 px), measured once and fixed so that
# every split and option set shares one normalisation (other sizes and seeds differ by < 0.01).
_SYNTHETIC_MEAN = (0.4908, 0.4901, 0.4910)
_SYNTHETIC_STD = (0.2598, 0.2618, 0.2607)
_SYNTHETIC_CHUNK_PIXELS = 1024 * 32 * 32  # per generation chunk: 1024 images of 32 px, fewer larger ones
_CHUNK_FLOAT_ARRAYS = 8  # float32 arrays of a chunk's image size alive at once while it is drawn (an upper bound)
_SPLIT_CODE = {"train": 0, "test": 1}


def synthetic_info(image_size: int = 32, n_coarse: int = 4, fine_per_coarse: int = 4, n: int | None = None,
                   **_: Any) -> DatasetInfo:
    """The classes of the first ``n_coarse`` shapes x ``fine_per_coarse`` textures; n and seed do not change it,
    but an ``n`` whose images cannot fit in memory is refused here already (before a job writes anything)."""
    image_size, n_coarse, fine_per_coarse = _synthetic_geometry(image_size, n_coarse, fine_per_coarse)
    shapes = SYNTHETIC_SHAPES[:n_coarse]
    fine = tuple(f"{s}/{t}" for s in shapes for t in SYNTHETIC_TEXTURES[:fine_per_coarse])
    info = DatasetInfo(
        name="synthetic",
        fine_classes=fine,
        coarse_classes=shapes,
        fine_to_coarse=tuple(i // fine_per_coarse for i in range(len(fine))),
        mean=_SYNTHETIC_MEAN,
        std=_SYNTHETIC_STD,
        image_size=image_size,
    )
    if n is not None:
        _check_memory("train", int_option("synthetic", "n", n, 1), info)
    return info


def _synthetic_geometry(image_size: Any, n_coarse: Any, fine_per_coarse: Any) -> tuple[int, int, int]:
    return (int_option("synthetic", "image_size", image_size, 16, 256),
            int_option("synthetic", "n_coarse", n_coarse, 2, len(SYNTHETIC_SHAPES)),
            int_option("synthetic", "fine_per_coarse", fine_per_coarse, 1, len(SYNTHETIC_TEXTURES)))


@register_dataset("synthetic", info=synthetic_info)
def load_synthetic(split: str, n: int | None = None, image_size: int = 32, seed: int = 0,
                   n_coarse: int = 4, fine_per_coarse: int = 4) -> CoarseFineDataset:
    """``n`` generated images of ``split`` (default 10000 train / 2000 test)."""
    info = synthetic_info(image_size, n_coarse, fine_per_coarse)
    if n is None:
        n = 10000 if split == "train" else 2000
    n = int_option("synthetic", "n", n, 1)
    seed = int_option("synthetic", "seed", seed, 0)
    _check_memory(split, n, info)
    images, fine = _generate_synthetic(n, info.image_size, seed, split, n_coarse, fine_per_coarse)
    return CoarseFineDataset(info, torch.from_numpy(images), torch.from_numpy(fine), split)


def _check_memory(split: str, n: int, info: DatasetInfo) -> None:
    """ConfigError unless ``n`` images of ``split`` can be generated in the memory available (the module docstring)."""
    size = info.image_size
    chunk = max(16, _SYNTHETIC_CHUNK_PIXELS // (size * size))
    pixels = info.channels * size * size
    drawn = math.ceil(n / chunk) * chunk  # whole chunks are drawn (a smaller n is a prefix)
    check_dataset_memory("synthetic", split, n, info.channels, size, copies=2,
                         working=(drawn - n) * (2 * pixels + 8) + chunk * pixels * _CHUNK_FLOAT_ARRAYS * 4)


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
