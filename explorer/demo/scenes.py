"""Seeded synthetic scenes with exact ground truth: coloured shapes on muted backgrounds.

The scenes are used to train tiny demo models (CLIP, SAM, a captioning VLM) and to score
saliency maps and token-pruning methods against object masks, so every scene carries exact
per-object masks and a caption in a small, perfectly regular language.

Conventions
-----------
* ``size`` is ``(H, W)``. Images are ``(H, W, 3) uint8`` RGB, masks ``(H, W) bool``.
* Pixel ``(row, col)`` covers the continuous square ``[col, col + 1) x [row, row + 1)``;
  points are ``(x, y)`` in these continuous coordinates and boxes are ``(x0, y0, x1, y1)``
  with ``x1``/``y1`` exclusive (the project-wide convention of :mod:`explorer.core.layout`).
  ``y`` grows downwards, so "above" means a smaller ``y``.
* Shapes are rasterised exactly at ``4 x 4`` supersamples per pixel (sample points at the
  sub-pixel centres). Each supersample belongs to the last-drawn object covering it, or to the
  background. The image pixel is the mean colour of its 16 supersamples (anti-aliasing), and
  an object's mask holds a pixel when at least 8 of its 16 supersamples (>= 50 %) are that
  object's: ``full_mask`` counts the object's own coverage ignoring other objects, ``mask``
  counts only the supersamples still visible after later objects are drawn (a tie of 8 / 8
  goes to the later object). Visible masks of different objects are therefore disjoint and a
  subset of their full masks, and they agree with the rendered colours.
* Object size: each shape is inscribed in a circle of diameter ``s = f * min(H, W)`` with
  ``f`` uniform in ``[min_size_frac, max_size_frac]`` (radius at least 3 px; rings and stars at
  least 5 px so that they stay recognisable on tiny images).

Captions
--------
One object: ``"a red circle"``. Several objects are chained in order of their visible-mask
centroids, left to right when the horizontal spread of the centroids is at least the vertical
one, else top to bottom; each consecutive pair ``(a, b)`` is joined by the relation of ``a`` to
``b`` along the dominant axis of their displacement: ``"a red circle left of a blue square
above an orange star"``. The article is ``"an"`` before a vowel (only ``"orange"``), otherwise
``"a"``. Captions are lower case without punctuation and use only :data:`WORDS`.

This module is numpy + Pillow + stdlib only.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "COLORS",
    "SHAPES",
    "RELATIONS",
    "BACKGROUNDS",
    "WORDS",
    "SceneObject",
    "Scene",
    "make_scene",
    "scene_caption",
    "spatial_relation",
    "object_phrase",
    "object_crop",
    "object_crop_box",
    "iter_scenes",
    "scene_seed",
]

#: RGB of each colour word. Chosen saturated/bright and pairwise far apart (>= 90 in RGB
#: distance) so that jitter and anti-aliasing never make one look like another.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 35),
    "green": (35, 190, 55),
    "blue": (35, 85, 235),
    "yellow": (245, 225, 35),
    "purple": (155, 45, 215),
    "orange": (250, 135, 20),
    "white": (248, 248, 248),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

BACKGROUNDS: tuple[str, ...] = ("flat", "gradient", "noise", "stripes", "checker")

_VOWELS = ("a", "e", "i", "o", "u")


def _article(color: str) -> str:
    return "an" if color[:1] in _VOWELS else "a"


#: Every word that can appear in a caption (articles, colours, shapes, relation words), sorted.
WORDS: tuple[str, ...] = tuple(
    sorted(
        {_article(c) for c in COLORS}
        | {"a"}
        | set(COLORS)
        | set(SHAPES)
        | {w for r in RELATIONS for w in r.split()}
    )
)

_SS = 4  # supersamples per pixel along each axis (_block_counts relies on it being 4)
_HALF = (_SS * _SS) // 2  # supersamples needed for a pixel to be "in" a mask (>= 50 %)
_COLOR_JITTER = 6  # max per-channel jitter of an object's colour
_RING_INNER = 0.55  # inner / outer radius of a ring
_STAR_INNER = 0.45  # inner / outer radius of a star
_MIN_RADIUS = {"circle": 3.0, "square": 3.0, "triangle": 3.0, "star": 5.0, "ring": 5.0}
# Background tones: HSV value range and saturation cap (muted, never near white), and the
# per-channel clip applied after noise. Every background pixel is >= ~85 away (RGB distance)
# from every object colour.
_BG_VALUE = (0.16, 0.46)
_BG_SAT = 0.22
_BG_CLIP = (18.0, 135.0)
_POSITION_TRIES = 40
_SIZE_TRIES = 3
_SHRINK = 0.8


# ----------------------------------------------------------------------------- data classes


@dataclass
class SceneObject:
    """One object of a :class:`Scene`.

    Attributes
    ----------
    color, shape : str
        Words from :data:`COLORS` and :data:`SHAPES`.
    mask : np.ndarray
        ``(H, W) bool``: the visible pixels (>= 50 % of the pixel shows this object after
        occlusion by later objects). Never empty.
    full_mask : np.ndarray
        ``(H, W) bool``: the whole object (>= 50 % coverage) as if nothing were drawn on top.
        ``mask`` is a subset of it. A ring's hole is in neither.
    box : tuple of int
        ``(x0, y0, x1, y1)``, ``x1``/``y1`` exclusive: tight bounding box of ``mask``.
    center : tuple of float
        ``(x, y)`` centroid of ``mask`` in continuous pixel coordinates (pixel ``(r, c)`` has
        its centre at ``(c + 0.5, r + 0.5)``).
    rgb : tuple of int
        The exact (jittered) colour the object was painted with; within a few units of
        ``COLORS[color]``.
    """

    color: str
    shape: str
    mask: np.ndarray
    full_mask: np.ndarray
    box: tuple[int, int, int, int]
    center: tuple[float, float]
    rgb: tuple[int, int, int] = (0, 0, 0)

    @property
    def name(self) -> str:
        """``"red circle"``."""
        return f"{self.color} {self.shape}"

    @property
    def caption(self) -> str:
        """``"a red circle"`` (``"an orange star"``)."""
        return object_phrase(self.color, self.shape)

    @property
    def visible_fraction(self) -> float:
        """``mask.sum() / full_mask.sum()``, in ``(0, 1]``."""
        full = int(self.full_mask.sum())
        return float(self.mask.sum()) / full if full else 0.0


@dataclass
class Scene:
    """A rendered scene and its ground truth.

    Attributes
    ----------
    image : np.ndarray
        ``(H, W, 3) uint8`` RGB.
    objects : list of SceneObject
        In drawing order (later ones on top); ``(color, shape)`` pairs are unique.
    background : str
        One of :data:`BACKGROUNDS`.
    caption : str
        :func:`scene_caption` of ``objects``.
    seed : int or None
        The integer seed that reproduces this scene with :func:`make_scene` (given the same
        keyword arguments); ``None`` when the scene was drawn from a caller's Generator.
    """

    image: np.ndarray
    objects: list[SceneObject]
    background: str
    caption: str
    seed: int | None

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)``."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    @property
    def instance_map(self) -> np.ndarray:
        """``(H, W) int16``: 0 = background, ``k`` = ``objects[k - 1]`` (visible masks)."""
        out = np.zeros(self.image.shape[:2], dtype=np.int16)
        for k, obj in enumerate(self.objects, start=1):
            out[obj.mask] = k
        return out


# ----------------------------------------------------------------------------- captions


def object_phrase(color: str, shape: str) -> str:
    """Noun phrase of one object: ``"a red circle"``, ``"an orange ring"``."""
    return f"{_article(color)} {color} {shape}"


def spatial_relation(subject: SceneObject, other: SceneObject) -> str:
    """Relation of ``subject`` to ``other`` by their centroids, one of :data:`RELATIONS`.

    The dominant axis of the displacement decides (ties go to the horizontal axis):
    horizontal gives ``"left of"`` / ``"right of"``, vertical ``"above"`` / ``"below"``
    (image ``y`` grows downwards).
    """
    dx = other.center[0] - subject.center[0]
    dy = other.center[1] - subject.center[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx >= 0 else "right of"
    return "above" if dy > 0 else "below"


def scene_caption(objects: Sequence[SceneObject]) -> str:
    """Caption naming every object once, chained with spatial relations.

    Parameters
    ----------
    objects : sequence of SceneObject
        At least one object; only ``color``, ``shape`` and ``center`` are used.

    Returns
    -------
    str
        ``"a red circle"`` for one object; otherwise the objects sorted left to right by
        centroid ``x`` (top to bottom by ``y`` if the vertical spread of the centroids is
        larger), each consecutive pair joined by :func:`spatial_relation` of the earlier one
        to the later one, e.g. ``"a red circle left of a blue square below a green star"``.
    """
    objs = list(objects)
    if not objs:
        raise ValueError("scene_caption needs at least one object")
    if len(objs) == 1:
        return objs[0].caption
    xs = [o.center[0] for o in objs]
    ys = [o.center[1] for o in objs]
    if max(xs) - min(xs) >= max(ys) - min(ys):
        order = sorted(objs, key=lambda o: (o.center[0], o.center[1]))
    else:
        order = sorted(objs, key=lambda o: (o.center[1], o.center[0]))
    parts = [order[0].caption]
    for a, b in zip(order, order[1:]):
        parts.append(spatial_relation(a, b))
        parts.append(b.caption)
    return " ".join(parts)


# ----------------------------------------------------------------------------- rasterising


def _convex_rows(verts: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample row ``y``, the closed x-interval ``[lo, hi]`` inside a convex polygon.

    ``verts`` is ``(n, 2)`` (either orientation); rows outside get ``lo > hi``.
    """
    p = verts
    q = np.roll(verts, -1, axis=0)
    area2 = float(np.sum(p[:, 0] * q[:, 1] - q[:, 0] * p[:, 1]))
    s = 1.0 if area2 > 0 else -1.0
    ex = q[:, 0] - p[:, 0]
    ey = q[:, 1] - p[:, 1]
    # inside: s * (ex * (Y - py) - ey * (X - px)) >= 0  <=>  a * X + b >= 0
    a = -s * ey  # (n,)
    b = s * (ex[None, :] * (ys[:, None] - p[None, :, 1]) + ey[None, :] * p[None, :, 0])  # (rows, n)
    eps = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = -b / a[None, :]
    lo = np.where(a[None, :] > eps, bound, -np.inf).max(axis=1)
    hi = np.where(a[None, :] < -eps, bound, np.inf).min(axis=1)
    flat_ok = np.where(np.abs(a)[None, :] <= eps, b >= 0, True).all(axis=1)
    lo = np.where(flat_ok, lo, np.inf)
    return lo, hi


def _fill_rows(xs: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (xs[None, :] >= lo[:, None]) & (xs[None, :] <= hi[:, None])


def _shape_vertices(shape: str, r: float, theta: float) -> np.ndarray | None:
    """Polygon vertices ``(n, 2)`` around the origin, or None for round shapes."""
    if shape == "square":
        ang = theta + np.pi / 4 + np.arange(4) * (np.pi / 2)
        rad = np.full(4, r)
    elif shape == "triangle":
        ang = theta - np.pi / 2 + np.arange(3) * (2 * np.pi / 3)
        rad = np.full(3, r)
    elif shape == "star":
        ang = theta - np.pi / 2 + np.arange(10) * (np.pi / 5)
        rad = np.where(np.arange(10) % 2 == 0, r, r * _STAR_INNER)
    else:
        return None
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)


@dataclass
class _Sprite:
    """An object rendered on its own local pixel grid (before placement)."""

    h: int
    w: int
    ss: np.ndarray  # (h*SS, w*SS) bool supersampled coverage
    full: np.ndarray  # (h, w) bool: >= 50 % covered
    any_cov: np.ndarray  # (h, w) bool: any supersample covered
    hole: np.ndarray | None  # (h, w) bool: ring hole pixels (>= 50 % inside inner disc)
    center_px: tuple[int, int] | None  # (row, col) local pixel containing a ring's centre


def _block_counts(ss: np.ndarray) -> np.ndarray:
    """``(h*SS, w*SS) bool`` -> ``(h, w) uint8`` number of true supersamples per pixel."""
    # Sum each run of 4 bool bytes by reading it as one uint32 and multiplying by 0x01010101:
    # the top byte then holds the byte sum (<= 4, so no carries), whatever the endianness.
    v = np.ascontiguousarray(ss).view(np.uint32)
    s4 = ((v * np.uint32(0x01010101)) >> np.uint32(24)).astype(np.uint8)
    return s4[0::4] + s4[1::4] + s4[2::4] + s4[3::4]


def _render_sprite(shape: str, r: float, theta: float, fx: float, fy: float) -> _Sprite:
    verts = _shape_vertices(shape, r, theta)
    if verts is None:
        xmin = ymin = -r
        xmax = ymax = r
    else:
        xmin, ymin = verts.min(axis=0)
        xmax, ymax = verts.max(axis=0)
    cx = -xmin + fx
    cy = -ymin + fy
    w = max(1, int(math.ceil(cx + xmax)))
    h = max(1, int(math.ceil(cy + ymax)))
    xs = (np.arange(w * _SS) + 0.5) / _SS - cx
    ys = (np.arange(h * _SS) + 0.5) / _SS - cy
    hole = None
    center_px = None
    if verts is None:
        d2 = ys[:, None] ** 2 + xs[None, :] ** 2
        ss = d2 <= r * r
        if shape == "ring":
            inner = d2 < (r * _RING_INNER) ** 2
            ss &= ~inner
            hole = _block_counts(inner) >= _HALF
            center_px = (int(math.floor(cy)), int(math.floor(cx)))
    elif shape == "star":
        ss = np.zeros((h * _SS, w * _SS), dtype=bool)
        for i in range(0, 10, 2):  # union of 5 convex kites: centre, inner, outer, inner
            quad = np.stack([np.zeros(2), verts[(i - 1) % 10], verts[i], verts[i + 1]])
            lo, hi = _convex_rows(quad, ys)
            ss |= _fill_rows(xs, lo, hi)
    else:
        lo, hi = _convex_rows(verts, ys)
        ss = _fill_rows(xs, lo, hi)
    counts = _block_counts(ss)
    return _Sprite(h, w, ss, counts >= _HALF, counts > 0, hole, center_px)


# ----------------------------------------------------------------------------- backgrounds


def _muted(rng: np.random.Generator, value: float | None = None, hue: float | None = None) -> np.ndarray:
    h = rng.random() if hue is None else hue % 1.0
    s = rng.uniform(0.0, _BG_SAT)
    v = rng.uniform(*_BG_VALUE) if value is None else value
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255.0


def _muted_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two muted colours of similar hue with a visible difference in value."""
    lo, hi = _BG_VALUE
    v1 = rng.uniform(lo, hi)
    dv = rng.uniform(0.08, 0.16)
    v2 = v1 + dv if v1 + dv <= hi else v1 - dv
    hue = rng.random()
    return _muted(rng, v1, hue), _muted(rng, v2, hue + rng.uniform(-0.15, 0.15))


def _per_channel(H: int, W: int, fn) -> np.ndarray:
    """Build ``(H, W, 3) float32`` channel by channel (numpy is slow on a trailing axis of 3)."""
    out = np.empty((H, W, 3), dtype=np.float32)
    for ch in range(3):
        out[:, :, ch] = fn(ch)
    return out


def _two_tone(mask: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    H, W = mask.shape
    m = mask.astype(np.float32)
    return _per_channel(H, W, lambda ch: c0[ch] + m * (c1[ch] - c0[ch]))


def _background(kind: str, rng: np.random.Generator, H: int, W: int) -> np.ndarray:
    """``(H, W, 3) float32`` background with every channel in ``_BG_CLIP``."""
    if kind == "flat":
        c = _muted(rng)
        out = _per_channel(H, W, lambda ch: c[ch])
    elif kind == "gradient":
        c0, c1 = _muted_pair(rng)
        ang = rng.uniform(0.0, 2 * np.pi)
        yy = (np.arange(H, dtype=np.float32) + 0.5) / H - 0.5
        xx = (np.arange(W, dtype=np.float32) + 0.5) / W - 0.5
        t = np.float32(np.cos(ang)) * xx[None, :] + np.float32(np.sin(ang)) * yy[:, None]
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        out = _per_channel(H, W, lambda ch: c0[ch] + t * (c1[ch] - c0[ch]))
    elif kind == "noise":
        base = _muted(rng, value=rng.uniform(0.22, 0.40))
        grid = rng.normal(0.0, 12.0, size=(6, 6)).astype(np.float32)
        low = np.asarray(Image.fromarray(grid).resize((W, H), Image.Resampling.BILINEAR))
        grain = rng.integers(-5, 6, size=(3, H, W), dtype=np.int8)
        out = _per_channel(H, W, lambda ch: (base[ch] + low) + grain[ch])
    elif kind == "stripes":
        c0, c1 = _muted_pair(rng)
        period = max(4.0, rng.uniform(0.05, 0.14) * min(H, W))
        direction = int(rng.integers(0, 4))  # horizontal, vertical, diagonal, anti-diagonal
        yy = np.arange(H, dtype=np.float32)[:, None] + 0.5
        xx = np.arange(W, dtype=np.float32)[None, :] + 0.5
        if direction == 0:
            coord = np.broadcast_to(yy, (H, W))
        elif direction == 1:
            coord = np.broadcast_to(xx, (H, W))
        else:
            coord = (xx + yy if direction == 2 else xx - yy) / np.float32(np.sqrt(2.0))
        phase = np.float32(rng.uniform(0.0, period))
        band = np.floor((coord + phase) / np.float32(period / 2)).astype(np.int64) % 2 == 1
        out = _two_tone(band, c0, c1)
    elif kind == "checker":
        c0, c1 = _muted_pair(rng)
        cell = max(3.0, rng.uniform(0.06, 0.18) * min(H, W))
        oy, ox = rng.uniform(0.0, cell, size=2)
        iy = np.floor((np.arange(H) + oy) / cell).astype(np.int64)
        ix = np.floor((np.arange(W) + ox) / cell).astype(np.int64)
        out = _two_tone((iy[:, None] + ix[None, :]) % 2 == 1, c0, c1)
    else:  # pragma: no cover - validated earlier
        raise ValueError(f"unknown background {kind!r}")
    return np.clip(out, np.float32(_BG_CLIP[0]), np.float32(_BG_CLIP[1]), out=out)


# ----------------------------------------------------------------------------- scenes


def _validate_names(given: Sequence[str] | None, allowed: Sequence[str], what: str) -> list[str]:
    if given is None:
        return list(allowed)
    if isinstance(given, str):
        given = [given]
    out = list(dict.fromkeys(given))
    bad = [g for g in out if g not in allowed]
    if bad or not out:
        raise ValueError(f"{what} must be a non-empty subset of {tuple(allowed)}, got {given!r}")
    return out


def _dilate(mask: np.ndarray) -> np.ndarray:
    """8-neighbour binary dilation by one pixel, output one pixel larger on every side."""
    h, w = mask.shape
    out = np.zeros((h + 2, w + 2), dtype=bool)
    for dy in range(3):
        for dx in range(3):
            out[dy : dy + h, dx : dx + w] |= mask
    return out


@dataclass
class _Placed:
    color: str
    shape: str
    rgb: np.ndarray
    sprite: _Sprite
    y0: int
    x0: int


class _Canvas:
    """Ownership bookkeeping for placing objects (supersampled owner ids + pixel winners)."""

    def __init__(self, H: int, W: int):
        self.H, self.W = H, W
        self.owner = np.zeros((H * _SS, W * _SS), dtype=np.uint8)  # 0 = background
        self.winner = np.zeros((H, W), dtype=np.uint8)  # visible-mask id per pixel
        self.occupied = np.zeros((H + 2, W + 2), dtype=bool)  # dilated footprints (padded 1)
        self.placed: list[_Placed] = []
        self.full_counts: list[int] = []
        self.vis_counts = np.zeros(1, dtype=np.int64)  # visible pixels per id (index 0 unused)

    def _winner_region(self, owner_region: np.ndarray) -> np.ndarray:
        ids = np.flatnonzero(np.bincount(owner_region.ravel(), minlength=1))
        out = np.zeros((owner_region.shape[0] // _SS, owner_region.shape[1] // _SS), dtype=np.uint8)
        for i in ids:  # increasing id: a later object wins an 8/8 tie
            if i == 0:
                continue
            out[_block_counts(owner_region == i) >= _HALF] = i
        return out

    def try_place(
        self, sp: _Sprite, y0: int, x0: int, min_visible: float, allow_overlap: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Check placing ``sp`` with its top-left pixel at ``(y0, x0)``.

        Returns ``(owner region, winner region, new visible counts)`` when every rule still
        holds (visibility of earlier objects, ring holes, no-touch), else None. Only the
        candidate's bounding box changes, so all work is local to it.
        """
        k = len(self.placed) + 1
        y1, x1 = y0 + sp.h, x0 + sp.w
        if not allow_overlap and (self.occupied[y0 + 1 : y1 + 1, x0 + 1 : x1 + 1] & sp.any_cov).any():
            return None
        old_owner = self.owner[y0 * _SS : y1 * _SS, x0 * _SS : x1 * _SS]
        old_win = self.winner[y0:y1, x0:x1]
        if k > 1:
            # Cheap necessary condition: the candidate wins every pixel of its full mask (it is
            # on top and wins ties), so those pixels are certainly lost by earlier objects.
            lost = np.bincount(old_win[sp.full], minlength=k)[1:k]
            if (self.vis_counts[1:k] - lost < min_visible * np.asarray(self.full_counts)).any():
                return None
        new_owner = np.where(sp.ss, np.uint8(k), old_owner)
        if old_owner[sp.ss].any():
            new_win = self._winner_region(new_owner)
        else:  # only background under the shape: its full mask becomes visible (8/8 ties too)
            new_win = old_win.copy()
            new_win[sp.full] = k
        vis = np.zeros(k + 1, dtype=np.int64)
        vis[:k] = self.vis_counts
        vis += np.bincount(new_win.ravel(), minlength=k + 1)[: k + 1]
        vis -= np.bincount(old_win.ravel(), minlength=k + 1)[: k + 1]
        for j in range(1, k):
            if vis[j] <= 0 or vis[j] < min_visible * self.full_counts[j - 1]:
                return None
        # every ring's hole must keep showing background (centre pixel included)
        for p in [*self.placed, None]:
            rs, ry, rx = (sp, y0, x0) if p is None else (p.sprite, p.y0, p.x0)
            if rs.hole is None or rs.center_px is None:
                continue
            ty0, tx0, ty1, tx1 = max(ry, y0), max(rx, x0), min(ry + rs.h, y1), min(rx + rs.w, x1)
            if ty0 >= ty1 or tx0 >= tx1:
                continue  # untouched by the candidate
            region = self.winner[ry : ry + rs.h, rx : rx + rs.w].copy()
            region[ty0 - ry : ty1 - ry, tx0 - rx : tx1 - rx] = new_win[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0]
            if region[rs.center_px] != 0:
                return None
            if rs.hole.any() and (region[rs.hole] == 0).mean() < min_visible:
                return None
        return new_owner, new_win, vis

    def commit(self, p: _Placed, new_owner: np.ndarray, new_win: np.ndarray, vis: np.ndarray) -> None:
        sp = p.sprite
        self.owner[p.y0 * _SS : (p.y0 + sp.h) * _SS, p.x0 * _SS : (p.x0 + sp.w) * _SS] = new_owner
        self.winner[p.y0 : p.y0 + sp.h, p.x0 : p.x0 + sp.w] = new_win
        self.occupied[p.y0 : p.y0 + sp.h + 2, p.x0 : p.x0 + sp.w + 2] |= _dilate(sp.any_cov)
        self.placed.append(p)
        self.full_counts.append(int(sp.full.sum()))
        self.vis_counts = vis


def _resolve_rng(rng: np.random.Generator | int | None) -> tuple[np.random.Generator, int | None]:
    if isinstance(rng, np.random.Generator):
        return rng, None
    if rng is None:
        seed = int(np.random.SeedSequence().generate_state(1, dtype=np.uint32)[0])
    else:
        seed = int(rng)
    return np.random.default_rng(seed), seed


def make_scene(
    rng: np.random.Generator | int | None = None,
    size: tuple[int, int] = (224, 224),
    n_objects: int | tuple[int, int] = (1, 4),
    colors: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    backgrounds: Sequence[str] | None = None,
    min_visible: float = 0.6,
    min_size_frac: float = 0.15,
    max_size_frac: float = 0.45,
    allow_overlap: bool = True,
) -> Scene:
    """Render one random scene with exact masks and a caption.

    Parameters
    ----------
    rng : numpy.random.Generator, int or None
        Randomness. An int seed makes the scene reproducible (and is stored in
        :attr:`Scene.seed`); None draws a fresh seed (also stored); a Generator is used and
        advanced as is (``seed`` is None).
    size : (int, int)
        ``(H, W)`` of the image, each at least 16.
    n_objects : int or (int, int)
        Exact count, or inclusive range ``(lo, hi)`` to draw the count from uniformly; at least
        1. Capped at the number of distinct ``(color, shape)`` pairs. Fewer objects are placed
        when they cannot be fitted under the visibility rule after bounded retries (at least
        one always is).
    colors, shapes, backgrounds : sequence of str, optional
        Subsets of :data:`COLORS`, :data:`SHAPES`, :data:`BACKGROUNDS` to draw from (default:
        all).
    min_visible : float
        Every object keeps at least this fraction of its ``full_mask`` pixels visible; a ring's
        hole also shows background on at least this fraction of its pixels, centre included.
    min_size_frac, max_size_frac : float
        Range of the object size (diameter of the circle the shape is inscribed in) as a
        fraction of ``min(H, W)``.
    allow_overlap : bool
        If False, objects neither overlap nor touch: at least one clean background pixel
        (8-connectivity) separates any two objects' anti-aliased footprints.

    Returns
    -------
    Scene
        ``image`` ``(H, W, 3) uint8``; ``objects`` in drawing order with unique
        ``(color, shape)``; all objects lie fully inside the image.

    Notes
    -----
    Placement per object: up to 40 random positions at the drawn size, then the size is
    shrunk (x0.8, not below ``min_size_frac``, 3 sizes in all); if nothing fits, the object
    is dropped. Runtime is bounded.
    """
    gen, seed = _resolve_rng(rng)
    H, W = int(size[0]), int(size[1])
    if H < 16 or W < 16:
        raise ValueError(f"size must be at least (16, 16), got {size!r}")
    color_list = _validate_names(colors, tuple(COLORS), "colors")
    shape_list = _validate_names(shapes, SHAPES, "shapes")
    bg_list = _validate_names(backgrounds, BACKGROUNDS, "backgrounds")
    if not 0.0 <= min_visible <= 1.0:
        raise ValueError("min_visible must be in [0, 1]")
    if not 0.0 < min_size_frac <= max_size_frac:
        raise ValueError("need 0 < min_size_frac <= max_size_frac")
    if isinstance(n_objects, (tuple, list)):
        lo, hi = int(n_objects[0]), int(n_objects[1])
    else:
        lo = hi = int(n_objects)
    if lo < 1 or hi < lo:
        raise ValueError(f"n_objects must be >= 1 (or a range lo <= hi with lo >= 1), got {n_objects!r}")

    pairs = [(c, s) for c in color_list for s in shape_list]
    n = min(int(gen.integers(lo, hi + 1)), len(pairs))
    chosen = [pairs[i] for i in gen.choice(len(pairs), size=n, replace=False)]
    bg_kind = bg_list[int(gen.integers(len(bg_list)))]
    bg = _background(bg_kind, gen, H, W)

    short = min(H, W)
    max_diam = short - 2.0  # keep a pixel of slack for the sub-pixel offset
    canvas = _Canvas(H, W)
    for color, shape in chosen:
        rgb = np.clip(
            np.array(COLORS[color], dtype=np.int64) + gen.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=3), 0, 255
        )
        frac = gen.uniform(min_size_frac, max_size_frac)
        theta = {
            "square": gen.uniform(-np.pi / 12, np.pi / 12),
            "triangle": gen.uniform(0.0, 2 * np.pi / 3),
            "star": gen.uniform(0.0, 2 * np.pi / 5),
        }.get(shape, 0.0)
        fx, fy = gen.random(2)
        for size_try in range(_SIZE_TRIES):
            f = max(frac * _SHRINK**size_try, min_size_frac)
            r = min(max(f * short / 2.0, _MIN_RADIUS[shape]), max_diam / 2.0)
            sp = _render_sprite(shape, r, theta, fx, fy)
            if sp.h > H or sp.w > W or not sp.full.any():
                continue
            done = False
            for _ in range(_POSITION_TRIES):
                y0 = int(gen.integers(0, H - sp.h + 1))
                x0 = int(gen.integers(0, W - sp.w + 1))
                res = canvas.try_place(sp, y0, x0, min_visible, allow_overlap)
                if res is not None:
                    canvas.commit(_Placed(color, shape, rgb, sp, y0, x0), *res)
                    done = True
                    break
            if done or f <= min_size_frac:
                break

    if not canvas.placed:  # pragma: no cover - the first object always fits an empty canvas
        raise RuntimeError("could not place any object")

    # ---- composite: each pixel is the mean colour of its 16 supersamples
    image = bg.copy()
    objects: list[SceneObject] = []
    for k, p in enumerate(canvas.placed, start=1):
        sp = p.sprite
        ys, xs = slice(p.y0, p.y0 + sp.h), slice(p.x0, p.x0 + sp.w)
        owned = _block_counts(canvas.owner[p.y0 * _SS : (p.y0 + sp.h) * _SS, p.x0 * _SS : (p.x0 + sp.w) * _SS] == k)
        alpha = owned.astype(np.float32) * np.float32(1.0 / (_SS * _SS))
        for ch in range(3):
            plane = image[ys, xs, ch]
            plane += alpha * (np.float32(p.rgb[ch]) - bg[ys, xs, ch])
    image_u8 = np.rint(image, out=image).astype(np.uint8)  # already within [0, 255]

    for k, p in enumerate(canvas.placed, start=1):
        sp = p.sprite
        mask = canvas.winner == k
        full = np.zeros((H, W), dtype=bool)
        full[p.y0 : p.y0 + sp.h, p.x0 : p.x0 + sp.w] = sp.full
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        rr, cc = np.nonzero(mask)
        objects.append(
            SceneObject(
                color=p.color,
                shape=p.shape,
                mask=mask,
                full_mask=full,
                box=(int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1),
                center=(float(cc.mean()) + 0.5, float(rr.mean()) + 0.5),
                rgb=(int(p.rgb[0]), int(p.rgb[1]), int(p.rgb[2])),
            )
        )
    return Scene(image=image_u8, objects=objects, background=bg_kind, caption=scene_caption(objects), seed=seed)


def scene_seed(seed: int, index: int) -> int:
    """Seed of scene ``index`` of :func:`iter_scenes` ``(seed, ...)``: a hash of the pair."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


def iter_scenes(seed: int, count: int, **kwargs) -> Iterator[Scene]:
    """Reproducible stream of ``count`` scenes.

    Scene ``i`` is ``make_scene(scene_seed(seed, i), **kwargs)``: it depends only on
    ``(seed, i)`` and ``kwargs``, not on earlier calls or on how much of the stream was read.
    """
    for i in range(int(count)):
        yield make_scene(scene_seed(seed, i), **kwargs)


# ----------------------------------------------------------------------------- crops


def object_crop_box(scene: Scene, index: int, context: float = 0.25, square: bool = True) -> tuple[int, int, int, int]:
    """Box ``(x0, y0, x1, y1)`` (exclusive ends) of :func:`object_crop`.

    The object's visible box grown by ``context`` times its size on every side (a square of
    side ``max(w, h) * (1 + 2 * context)`` when ``square``), capped to the image and shifted
    to lie inside it. Always contains the object's box.
    """
    if context < 0:
        raise ValueError("context must be >= 0")
    H, W = scene.image.shape[:2]
    x0, y0, x1, y1 = scene.objects[index].box
    bw, bh = x1 - x0, y1 - y0
    if square:
        side = min(max(int(round(max(bw, bh) * (1 + 2 * context))), bw, bh), H, W)
        cw = ch = side
    else:
        cw = min(max(int(round(bw * (1 + 2 * context))), bw), W)
        ch = min(max(int(round(bh * (1 + 2 * context))), bh), H)

    def place(a0: int, a1: int, c: int, limit: int) -> int:
        start = int(round((a0 + a1) / 2 - c / 2))
        return min(max(start, a1 - c, 0), a0, limit - c)

    X0 = place(x0, x1, cw, W)
    Y0 = place(y0, y1, ch, H)
    return X0, Y0, X0 + cw, Y0 + ch


def object_crop(scene: Scene, index: int, context: float = 0.25, square: bool = True) -> np.ndarray:
    """Crop of ``scene.image`` around ``scene.objects[index]`` with some context.

    Returns
    -------
    np.ndarray
        ``(h, w, 3) uint8`` copy of the pixels in :func:`object_crop_box`; ``h == w`` when
        ``square`` (the side is capped at ``min(H, W)``, which still holds the object).
    """
    X0, Y0, X1, Y1 = object_crop_box(scene, index, context, square)
    return scene.image[Y0:Y1, X0:X1].copy()
