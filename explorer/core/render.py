"""Colormaps and headless compositing (the CLI's PNG output; the window draws with pyqtgraph).

Colormaps come from the ``cmap`` package (numpy only): perceptually uniform sequential maps for
attention and similarity, a diverging map for signed relevance.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterator

import numpy as np

__all__ = [
    "usage_histogram",
    "SEQUENTIAL_COLORMAPS",
    "DIVERGING_COLORMAPS",
    "default_colormap",
    "lookup_table",
    "colorize",
    "overlay",
    "heatmap_overlay",
    "heatmap_overlay_bands",
    "heatmap_overlay_image",
    "TILE_PIXELS",
    "resize_nearest",
    "category_colors",
    "selection_rgba",
    "paste_grid_overlay",
    "tile_grid",
    "selection_overlay",
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


#: Large images are drawn in bands of rows of about this many pixels, so the temporaries of
#: :func:`colorize` and the blend stay a few tens of MB whatever the image's size.
TILE_PIXELS = 1 << 20


def _bands(height: int, width: int, tile_pixels: int) -> Iterator[tuple[int, int]]:
    step = max(1, int(tile_pixels) // max(int(width), 1))
    for r0 in range(0, height, step):
        yield r0, min(height, r0 + step)


def colorize(values: np.ndarray, colormap: str, vmin: float, vmax: float) -> np.ndarray:
    """Map ``values (H, W)`` to RGBA ``(H, W, 4)`` uint8; NaN becomes fully transparent.

    The colour index is ``round((v - vmin) / (vmax - vmin) * (n - 1))`` in float64, clipped to
    the table (computed in place: one float64 and one index array of the map's size).
    """
    lut = lookup_table(colormap)
    v = np.asarray(values)
    idx = np.array(v, dtype=np.float64)  # a copy, worked on in place
    span = (vmax - vmin) or 1.0
    idx -= vmin
    idx /= span
    idx *= len(lut) - 1
    np.clip(idx, 0, len(lut) - 1, out=idx)
    idx[np.isnan(idx)] = 0  # NaN; +-inf were clipped to the ends (and made transparent below)
    idx.round(out=idx)
    rgba = lut[idx.astype(np.intp)]
    del idx
    rgba[~np.isfinite(v), 3] = 0
    return rgba


def _blend_band(image_rgb: np.ndarray, values: np.ndarray, colormap: str, vmin: float, vmax: float,
                opacity: float) -> np.ndarray:
    """One band of :func:`overlay`: ``(h, W, 3)`` uint8 (float32 blend)."""
    rgba = colorize(values, colormap, vmin, vmax)
    a = (rgba[..., 3:4].astype(np.float32) / 255.0) * float(opacity)
    out = image_rgb.astype(np.float32) * (1.0 - a) + rgba[..., :3].astype(np.float32) * a
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def overlay(image_rgb: np.ndarray, values: np.ndarray, colormap: str, vmin: float, vmax: float,
            opacity: float = 0.6, *, tile_pixels: int = TILE_PIXELS) -> np.ndarray:
    """Alpha-blend a colorized map over an image: ``(H, W, 3)`` uint8 out.

    ``values`` must be ``(H, W)`` like the image; NaN pixels leave the image untouched. The blend
    runs in bands of about ``tile_pixels`` pixels (the same pixels as in one piece).
    """
    if values.shape != image_rgb.shape[:2]:
        raise ValueError(f"map {values.shape} and image {image_rgb.shape[:2]} differ in size")
    H, W = values.shape
    out = np.empty((H, W, 3), dtype=np.uint8)
    for r0, r1 in _bands(H, W, tile_pixels):
        out[r0:r1] = _blend_band(image_rgb[r0:r1], values[r0:r1], colormap, vmin, vmax, opacity)
    return out


def heatmap_overlay_bands(image_rgb: np.ndarray, heatmap, colormap: str, vmin: float, vmax: float,
                          opacity: float = 0.6, *, mode: str = "bilinear",
                          tile_pixels: int = TILE_PIXELS) -> Iterator[tuple[int, np.ndarray]]:
    """A :class:`~explorer.core.results.Heatmap` over the image, band by band: yields
    ``(r0, rgb (h, W, 3) uint8)`` for consecutive bands of rows. Only one band of the map is
    ever rasterised, so a large image costs the image plus a few tens of MB; the pixels are those
    of ``overlay(image_rgb, heatmap.to_image(image size, mode), ...)``."""
    H, W = image_rgb.shape[:2]
    for r0, r1 in _bands(H, W, tile_pixels):
        values = heatmap.to_image((H, W), mode=mode, rows=(r0, r1))
        yield r0, _blend_band(image_rgb[r0:r1], values, colormap, vmin, vmax, opacity)


def heatmap_overlay(image_rgb: np.ndarray, heatmap, colormap: str, vmin: float, vmax: float,
                    opacity: float = 0.6, *, mode: str = "bilinear", tile_pixels: int = TILE_PIXELS) -> np.ndarray:
    """:func:`heatmap_overlay_bands` assembled: ``(H, W, 3)`` uint8."""
    out = np.empty(image_rgb.shape[:2] + (3,), dtype=np.uint8)
    for r0, band in heatmap_overlay_bands(image_rgb, heatmap, colormap, vmin, vmax, opacity, mode=mode,
                                          tile_pixels=tile_pixels):
        out[r0:r0 + band.shape[0]] = band
    return out


def heatmap_overlay_image(image_rgb: np.ndarray, heatmap, colormap: str, vmin: float, vmax: float,
                          opacity: float = 0.6, *, mode: str = "bilinear", tile_pixels: int = TILE_PIXELS):
    """:func:`heatmap_overlay_bands` pasted straight into a Pillow ``RGB`` image (for saving
    without a second full-size array)."""
    from PIL import Image

    H, W = image_rgb.shape[:2]
    canvas = Image.new("RGB", (W, H))
    for r0, band in heatmap_overlay_bands(image_rgb, heatmap, colormap, vmin, vmax, opacity, mode=mode,
                                          tile_pixels=tile_pixels):
        canvas.paste(Image.fromarray(band), (0, r0))
    return canvas


def resize_nearest(values: np.ndarray, out_size: tuple[int, int], rows: tuple[int, int] | None = None) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D array to ``out_size = (H, W)`` (pixel-centre sampling);
    with ``rows = (r0, r1)`` only those rows of the result."""
    h, w = values.shape[:2]
    H, W = out_size
    r = np.arange(H) if rows is None else np.arange(max(0, rows[0]), min(H, rows[1]))
    rows = np.minimum(((r + 0.5) * h / H).astype(np.intp), h - 1)
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


def selection_rgba(kept: np.ndarray, groups: np.ndarray | None = None, fused: np.ndarray | None = None,
                   scale: int = 8, dim: float = 0.72, seed: int = 0) -> np.ndarray:
    """Overlay of a token selection on one ``(rows, cols)`` grid, upsampled ``scale`` times:
    ``(rows*scale, cols*scale, 4)`` uint8.

    Pruning (``groups`` None): kept cells clear, dropped cells dark (alpha ``dim``), fused cells
    (EViT) tinted orange. Merging: every group a colour (semi-transparent) and a dark 1-pixel border
    wherever neighbouring cells belong to different groups.
    """
    kept = np.asarray(kept, dtype=bool)
    rows, cols = kept.shape
    out = np.zeros((rows, cols, 4), dtype=np.uint8)
    if groups is None:
        out[~kept, 3] = int(255 * dim)
        if fused is not None:
            f = np.asarray(fused, dtype=bool)
            out[f] = (232, 113, 10, int(255 * dim * 0.8))
        return np.repeat(np.repeat(out, scale, 0), scale, 1)
    g = np.asarray(groups, dtype=np.int64)
    ids = np.unique(g[g >= 0])
    colors = category_colors(len(ids), seed)
    lookup = {int(v): i for i, v in enumerate(ids)}
    for (r, c), v in np.ndenumerate(g):
        if v >= 0:
            out[r, c, :3] = colors[lookup[int(v)]]
            out[r, c, 3] = 110
        else:
            out[r, c, 3] = int(255 * dim)
    big = np.repeat(np.repeat(out, scale, 0), scale, 1)
    gg = np.repeat(np.repeat(g, scale, 0), scale, 1)
    border = np.zeros(gg.shape, dtype=bool)
    border[:, 1:] |= gg[:, 1:] != gg[:, :-1]
    border[1:, :] |= gg[1:, :] != gg[:-1, :]
    big[border] = (20, 20, 20, 230)
    return big


def paste_grid_overlay(image_rgb: np.ndarray, overlay_rgba: np.ndarray, rect) -> np.ndarray:
    """Alpha-composite an overlay made for one grid segment onto the image region ``rect``
    (a :class:`~explorer.core.layout.Box` in image pixels; the part outside the image is cut)."""
    from PIL import Image

    H, W = image_rgb.shape[:2]
    x0, y0 = int(round(rect.x0)), int(round(rect.y0))
    w, h = max(1, int(round(rect.width))), max(1, int(round(rect.height)))
    ov = np.asarray(Image.fromarray(overlay_rgba, "RGBA").resize((w, h), Image.NEAREST))
    out = image_rgb.astype(np.float32).copy()
    sx0, sy0 = max(0, -x0), max(0, -y0)
    dx0, dy0 = max(0, x0), max(0, y0)
    dx1, dy1 = min(W, x0 + w), min(H, y0 + h)
    if dx1 <= dx0 or dy1 <= dy0:
        return image_rgb.copy()
    patch = ov[sy0:sy0 + (dy1 - dy0), sx0:sx0 + (dx1 - dx0)].astype(np.float32)
    a = patch[..., 3:4] / 255.0
    out[dy0:dy1, dx0:dx1] = out[dy0:dy1, dx0:dx1] * (1 - a) + patch[..., :3] * a
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def tile_grid(tiles: list[tuple[str, str, np.ndarray]], cols: int | None = None, width: int = 320) -> np.ndarray:
    """Lay out ``(title, subtitle, rgb)`` tiles in a grid with captions: one ``(H, W, 3)`` image."""
    from PIL import Image, ImageDraw, ImageFont

    if not tiles:
        raise ValueError("no tiles")
    cols = cols or int(np.ceil(np.sqrt(len(tiles))))
    rows = int(np.ceil(len(tiles) / cols))
    h0, w0 = tiles[0][2].shape[:2]
    th = max(1, int(round(width * h0 / w0)))
    cap = 34
    sheet = Image.new("RGB", (cols * width, rows * (th + cap)), (32, 33, 36))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (title, subtitle, rgb) in enumerate(tiles):
        r, c = divmod(i, cols)
        img = Image.fromarray(rgb).resize((width, th), Image.BILINEAR)
        sheet.paste(img, (c * width, r * (th + cap) + cap))
        draw.text((c * width + 4, r * (th + cap) + 2), title, fill=(232, 234, 237), font=font)
        draw.text((c * width + 4, r * (th + cap) + 17), subtitle, fill=(189, 193, 198), font=font)
    return np.asarray(sheet)


def selection_overlay(image_rgb: np.ndarray, selection, scale: int = 8) -> np.ndarray:
    """The image with a :class:`~explorer.core.results.TokenSelection` drawn over each segment."""
    out = image_rgb
    layout = selection.layout
    kept = layout.split(selection.kept)
    groups = layout.split(selection.groups) if selection.groups is not None else [None] * len(layout.segments)
    fused_all = selection.meta.get("fused") if isinstance(selection.meta, dict) else None
    fused = layout.split(np.asarray(fused_all, dtype=bool)) if fused_all is not None else [None] * len(layout.segments)
    for seg, k, g, f in zip(layout.segments, kept, groups, fused):
        out = paste_grid_overlay(out, selection_rgba(k, g, f, scale=scale), seg.image_rect)
    return out


def labels_rgba(labels: np.ndarray, n_classes: int, alpha: int = 255) -> np.ndarray:
    """Colours of a label grid: ``labels`` ``(rows, cols)`` int (``-1`` background, clear) ->
    ``(rows, cols, 4)`` uint8, class ``k`` in ``category_colors(n_classes)[k]``."""
    labels = np.asarray(labels)
    colors = category_colors(n_classes)
    rgba = np.zeros(labels.shape + (4,), dtype=np.uint8)
    fg = labels >= 0
    rgba[fg, :3] = colors[labels[fg]]
    rgba[fg, 3] = alpha
    return rgba


def labels_overlay(image_rgb: np.ndarray, labels, opacity: float = 0.6) -> np.ndarray:
    """The image with a :class:`~explorer.core.results.LabelMap` drawn over each grid segment
    (or over every pixel when the map is per pixel)."""
    n = len(labels.class_names)
    alpha = int(round(255 * opacity))
    if labels.per_pixel:
        from .layout import Box

        h, w = image_rgb.shape[:2]
        return paste_grid_overlay(image_rgb, labels_rgba(labels.labels, n, alpha), Box(0, 0, w, h))
    out = image_rgb
    for seg, lab in zip(labels.layout.segments, labels.layout.split(labels.labels)):
        out = paste_grid_overlay(out, labels_rgba(lab, n, alpha), seg.image_rect)
    return out


def regions_rgba(image_size: tuple[int, int], regions, selected: int | None = None,
                 candidate: np.ndarray | None = None) -> np.ndarray:
    """The region layer: visible regions of a :class:`~explorer.core.regions.RegionSet` (iterable
    of regions with ``mask (H, W) bool``, ``visible``, ``id``) in distinct colours, the selected
    one more opaque, and a SAM candidate mask in blue. ``(H, W, 4)`` uint8 at ``image_size``."""
    H, W = image_size
    rgba = np.zeros((H, W, 4), dtype=np.uint8)
    regions = list(regions)
    colors = category_colors(max(1, len(regions)), seed=3)
    for k, r in enumerate(regions):
        if r.visible:
            rgba[r.mask, :3] = colors[k]
            rgba[r.mask, 3] = 150 if r.id == selected else 90
    if candidate is not None:
        rgba[candidate] = (66, 133, 244, 140)
    return rgba


def composite(image_rgb: np.ndarray, rgba: np.ndarray) -> np.ndarray:
    """Alpha-composite an ``(H, W, 4)`` layer of the image's size onto ``(H, W, 3)`` uint8."""
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    out = image_rgb.astype(np.float32) * (1 - a) + rgba[..., :3].astype(np.float32) * a
    return np.clip(np.round(out), 0, 255).astype(np.uint8)



def usage_histogram(counts: np.ndarray, highlight=(), size: tuple[int, int] = (120, 512),
                    log: bool = True) -> np.ndarray:
    """A bar chart of code usage, one column band per code in index order: ``(H, W, 3)`` uint8.

    ``counts (K,)``; bar heights are ``log(1 + count)`` (``log``) or the counts, scaled to the
    tallest; unused (dead) codes are a red tick on the baseline so they stay visible; codes in
    ``highlight`` (the current image's) are drawn orange, the others grey-blue.
    """
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    H, W = size
    K = len(counts)
    out = np.full((H, W, 3), (32, 33, 36), dtype=np.uint8)
    if K == 0:
        return out
    v = np.log1p(counts) if log else counts
    top = float(v.max()) or 1.0
    # a column shows the largest bar of the codes it covers (K > W) or its one code (K <= W)
    starts = (np.arange(W) * K) // W
    ends = np.maximum(starts + 1, ((np.arange(W) + 1) * K) // W)
    heights = np.array([v[s:e].max() for s, e in zip(starts, ends)])
    rows = np.round(heights / top * (H - 4)).astype(int)
    hl = np.zeros(K, dtype=bool)
    hl[[int(i) for i in highlight if 0 <= int(i) < K]] = True
    col_hl = np.array([hl[s:e].any() for s, e in zip(starts, ends)])
    col_dead = np.array([(counts[s:e] == 0).any() for s, e in zip(starts, ends)])
    yy = np.arange(H)[:, None]
    bar = yy >= (H - rows)[None, :]
    out[bar & ~col_hl[None, :]] = (138, 180, 248)
    out[bar & col_hl[None, :]] = (251, 140, 0)
    out[(yy >= H - 3) & col_dead[None, :] & ~bar] = (234, 67, 53)
    return out
