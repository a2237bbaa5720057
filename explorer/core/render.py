"""Colormaps and headless compositing (the CLI's PNG output; the window draws with pyqtgraph).

Colormaps come from the ``cmap`` package (numpy only): perceptually uniform sequential maps for
attention and similarity, a diverging map for signed relevance.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = [
    "SEQUENTIAL_COLORMAPS",
    "DIVERGING_COLORMAPS",
    "default_colormap",
    "lookup_table",
    "colorize",
    "overlay",
    "resize_nearest",
    "category_colors",
]

SEQUENTIAL_COLORMAPS = ("viridis", "magma", "inferno", "plasma", "cividis", "turbo", "gray")
DIVERGING_COLORMAPS = ("RdBu_r", "coolwarm", "PiYG")


def default_colormap(signed: bool) -> str:
    return "RdBu_r" if signed else "viridis"


@lru_cache(maxsize=64)
def lookup_table(name: str, n: int = 256) -> np.ndarray:
    """``(n, 4)`` uint8 RGBA lookup table of colormap ``name``."""
    import cmap  # numpy-only dependency

    try:
        cm = cmap.Colormap(name)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"unknown colormap {name!r}") from exc
    lut = np.clip(np.round(cm.lut(n) * 255.0), 0, 255).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def colorize(values: np.ndarray, colormap: str, vmin: float, vmax: float) -> np.ndarray:
    """Map ``values (H, W)`` to RGBA ``(H, W, 4)`` uint8; NaN becomes fully transparent."""
    lut = lookup_table(colormap)
    v = np.asarray(values, dtype=np.float64)
    span = (vmax - vmin) or 1.0
    idx = np.clip((v - vmin) / span * (len(lut) - 1), 0, len(lut) - 1)
    idx = np.where(np.isfinite(idx), idx, 0).round().astype(np.intp)
    rgba = lut[idx].copy()
    rgba[~np.isfinite(v), 3] = 0
    return rgba


def overlay(image_rgb: np.ndarray, values: np.ndarray, colormap: str, vmin: float, vmax: float,
            opacity: float = 0.6) -> np.ndarray:
    """Alpha-blend a colorized map over an image: ``(H, W, 3)`` uint8 out.

    ``values`` must be ``(H, W)`` like the image; NaN pixels leave the image untouched.
    """
    if values.shape != image_rgb.shape[:2]:
        raise ValueError(f"map {values.shape} and image {image_rgb.shape[:2]} differ in size")
    rgba = colorize(values, colormap, vmin, vmax)
    a = (rgba[..., 3:4].astype(np.float32) / 255.0) * float(opacity)
    out = image_rgb.astype(np.float32) * (1.0 - a) + rgba[..., :3].astype(np.float32) * a
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def resize_nearest(values: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D array to ``out_size = (H, W)`` (pixel-centre sampling)."""
    h, w = values.shape[:2]
    H, W = out_size
    rows = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.intp), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.intp), w - 1)
    return values[rows[:, None], cols[None, :]]


def category_colors(n: int, seed: int = 0) -> np.ndarray:
    """``(n, 3)`` uint8 distinct colours for labels and merge groups (golden-ratio hues)."""
    import colorsys

    out = np.zeros((max(n, 0), 3), dtype=np.uint8)
    h = (seed * 0.137) % 1.0
    for i in range(n):
        h = (h + 0.61803398875) % 1.0
        s = 0.65 + 0.25 * ((i // 7) % 2)
        v = 0.95 - 0.2 * ((i // 3) % 2)
        out[i] = np.round(np.array(colorsys.hsv_to_rgb(h, s, v)) * 255)
    return out
