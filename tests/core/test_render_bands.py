"""Overlays drawn in bands of rows: the same pixels as the one-piece drawing they replace, without
full-size float intermediates."""

import numpy as np
import pytest

from explorer.core.layout import Geometry, GridSegment, TokenLayout
from explorer.core.render import colorize, heatmap_overlay, heatmap_overlay_image, overlay
from explorer.core.results import Heatmap


def _benchmark():
    """``benchmarks/overlay_memory.py``: it keeps the one-piece drawing the banded one replaced."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "overlay_memory.py"
    spec = importlib.util.spec_from_file_location("overlay_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _benchmark()
_old_colorize, _old_overlay, _old_to_image = BENCH.old_colorize, BENCH.old_overlay, BENCH.old_to_image


def _clip_like(h, w, size=64):
    geo = Geometry.identity((h, w))
    nh, nw = (size, int(size * w / h)) if w > h else (int(size * h / w), size)
    geo = geo.resize((nh, nw))
    return geo.crop(int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0)), size, size)


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("tile_pixels", [1, 37, 1000, 1 << 20])
def test_overlay_in_bands_is_pixel_identical(tile_pixels):
    rng = np.random.default_rng(1)
    img = _image(53, 71)
    values = rng.normal(size=(53, 71)).astype(np.float32)
    values[3:9, 4:20] = np.nan
    values[10, 10], values[11, 11] = np.inf, -np.inf
    for cmap, lo, hi, op in [("viridis", -1.0, 1.5, 0.6), ("RdBu_r", -2.0, 2.0, 1.0), ("inferno", 0.3, 0.3, 0.25)]:
        np.testing.assert_array_equal(overlay(img, values, cmap, lo, hi, op, tile_pixels=tile_pixels),
                                      _old_overlay(img, values, cmap, lo, hi, op))
    np.testing.assert_array_equal(colorize(values, "magma", -1.0, 1.0), _old_colorize(values, "magma", -1.0, 1.0))


@pytest.mark.parametrize("size", [(123, 211), (64, 64), (211, 97)])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_heatmap_overlay_matches_the_full_raster(size, mode):
    h, w = size
    layout = TokenLayout.single_grid(_clip_like(h, w), 8, 8)
    values = np.random.default_rng(2).random(64).astype(np.float32)
    hm = Heatmap(layout=layout, token_values=values)
    img = _image(h, w, 3)
    lo, hi = hm.value_range
    full = _old_to_image(layout, values, (h, w), mode)
    np.testing.assert_array_equal(hm.to_image((h, w), mode=mode), full)
    expected = _old_overlay(img, full, "viridis", lo, hi, 0.6)
    for tile in (1, 500, 1 << 20):
        np.testing.assert_array_equal(heatmap_overlay(img, hm, "viridis", lo, hi, 0.6, mode=mode, tile_pixels=tile),
                                      expected)
    pil = heatmap_overlay_image(img, hm, "viridis", lo, hi, 0.6, mode=mode, tile_pixels=700)
    np.testing.assert_array_equal(np.asarray(pil), expected)


def test_bands_of_a_two_segment_layout_and_pixel_maps():
    geo = Geometry.identity((60, 90))
    base = GridSegment("base", 2, 3, seq_start=1, geometry=geo)
    tiles = GridSegment("tiles", 4, 6, seq_start=7, geometry=geo)
    layout = TokenLayout(n_tokens=31, original_size=(60, 90), segments=(base, tiles))
    values = np.random.default_rng(4).normal(size=30)
    whole = layout.to_image(values, mode="bilinear")
    np.testing.assert_array_equal(whole, _old_to_image(layout, values, (60, 90), "bilinear"))
    bands = np.concatenate([layout.to_image(values, mode="bilinear", rows=(r, min(60, r + 7))) for r in range(0, 60, 7)])
    np.testing.assert_array_equal(bands, whole)
    # a heatmap with pixel values, drawn at its own size and resized (nearest) to another, in bands
    pix = Heatmap(layout=layout, pixel_values=np.random.default_rng(5).random((60, 90)).astype(np.float32))
    for size in ((60, 90), (25, 37)):
        full = pix.to_image(size)
        bands = [pix.to_image(size, rows=(r, r + 11)) for r in range(0, size[0], 11)]
        np.testing.assert_array_equal(np.concatenate(bands), full)
        img = _image(*size)
        np.testing.assert_array_equal(heatmap_overlay(img, pix, "viridis", 0.0, 1.0, tile_pixels=200),
                                      _old_overlay(img, full, "viridis", 0.0, 1.0))


def test_overlay_memory_benchmark_runs_small():
    """``benchmarks/overlay_memory.py``: both drawings give the same pixels, and on an image of several
    bands (4 MP; a band is about 1 MP) the banded one allocates less than half of the one-piece one."""
    old, new = BENCH.child("old", 2000, 2000, 8), BENCH.child("new", 2000, 2000, 8)
    assert old["pixels_sha256"] == new["pixels_sha256"]
    assert new["tracemalloc_peak_mb"] < 0.5 * old["tracemalloc_peak_mb"], (new, old)
