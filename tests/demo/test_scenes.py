"""Tests of the synthetic scene generator: ground truth must be exact."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest

from explorer.demo.scenes import (
    BACKGROUNDS,
    COLORS,
    RELATIONS,
    SHAPES,
    WORDS,
    Scene,
    SceneObject,
    _render_sprite,
    iter_scenes,
    make_scene,
    object_crop,
    object_crop_box,
    scene_caption,
    scene_seed,
)

SIZES = [(224, 224), (64, 64), (224, 320), (480, 200), (40, 96)]
_COLOR_ARR = {name: np.array(rgb, dtype=float) for name, rgb in COLORS.items()}


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    """A mixed bag: every size, 1-4 objects, all backgrounds."""
    out = []
    for i, size in enumerate(SIZES):
        out.extend(iter_scenes(1000 + i, 20, size=size))
    return out


@pytest.fixture(scope="module")
def crowded() -> list[Scene]:
    """Always 4 objects, so overlaps and occlusion are frequent."""
    return list(iter_scenes(7, 40, n_objects=4, max_size_frac=0.5, size=(160, 160)))


def _dilate(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    p = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for dy, dx in itertools.product(range(3), range(3)):
        out |= p[dy : dy + h, dx : dx + w]
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    return ~_dilate(~mask)


def _flat_bg_colour(scene: Scene) -> np.ndarray:
    assert scene.background == "flat"
    packed = scene.image.reshape(-1, 3).astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
    vals, counts = np.unique(packed, return_counts=True)
    mode = int(vals[counts.argmax()])
    return np.array([mode >> 16, (mode >> 8) & 255, mode & 255], dtype=float)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_scene_and_different_seed_different_scene():
    for size in [(224, 224), (64, 64), (120, 300)]:
        a = make_scene(123, size=size, n_objects=(2, 4))
        b = make_scene(123, size=size, n_objects=(2, 4))
        assert a.image.tobytes() == b.image.tobytes()
        assert a.caption == b.caption and a.background == b.background and a.seed == b.seed == 123
        assert len(a.objects) == len(b.objects)
        for oa, ob in zip(a.objects, b.objects):
            assert (oa.color, oa.shape, oa.box, oa.center, oa.rgb) == (ob.color, ob.shape, ob.box, ob.center, ob.rgb)
            assert np.array_equal(oa.mask, ob.mask) and np.array_equal(oa.full_mask, ob.full_mask)
        c = make_scene(124, size=size, n_objects=(2, 4))
        assert c.image.tobytes() != a.image.tobytes()
    # a Generator is used as is; equal states give equal scenes
    g1, g2 = np.random.default_rng(5), np.random.default_rng(5)
    s1, s2 = make_scene(g1), make_scene(g2)
    assert s1.seed is None and s1.image.tobytes() == s2.image.tobytes()
    # None draws a fresh seed but records it, so the scene can be reproduced
    s3 = make_scene(None, size=(64, 64))
    assert isinstance(s3.seed, int)
    assert make_scene(s3.seed, size=(64, 64)).image.tobytes() == s3.image.tobytes()


def test_iter_scenes_reproducible_and_independent_of_earlier_calls():
    first = [s.image.tobytes() for s in iter_scenes(42, 5, size=(64, 64))]
    np.random.seed(0)  # global numpy state must not matter
    make_scene(None)  # neither must unrelated draws
    again = [s.image.tobytes() for s in iter_scenes(42, 5, size=(64, 64))]
    assert first == again
    # scene i depends only on (seed, i): reading a longer stream or a single item agrees
    longer = [s.image.tobytes() for s in iter_scenes(42, 8, size=(64, 64))]
    assert longer[:5] == first
    single = make_scene(scene_seed(42, 3), size=(64, 64))
    assert single.image.tobytes() == first[3]
    assert len(set(first)) == 5
    assert [s.image.tobytes() for s in iter_scenes(43, 5, size=(64, 64))] != first


# ----------------------------------------------------------------------------- masks


def test_masks_shapes_nonempty_boxes_and_centroids(scenes):
    for s in scenes:
        H, W = s.image.shape[:2]
        assert s.image.dtype == np.uint8 and s.image.shape == (H, W, 3)
        assert 1 <= len(s.objects) <= 4
        assert s.background in BACKGROUNDS
        for o in s.objects:
            assert o.color in COLORS and o.shape in SHAPES
            assert o.mask.shape == (H, W) and o.mask.dtype == bool
            assert o.full_mask.shape == (H, W) and o.full_mask.dtype == bool
            assert o.mask.any()
            assert not (o.mask & ~o.full_mask).any(), "visible mask must be a subset of the full mask"
            rows, cols = np.nonzero(o.mask)
            assert o.box == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            assert o.center == pytest.approx((cols.mean() + 0.5, rows.mean() + 0.5))
            x0, y0, x1, y1 = o.box
            assert x0 <= o.center[0] <= x1 and y0 <= o.center[1] <= y1


def test_unique_color_shape_pairs(scenes, crowded):
    for s in scenes + crowded:
        names = [o.name for o in s.objects]
        assert len(names) == len(set(names))


@pytest.mark.parametrize("min_visible", [0.3, 0.6, 0.9])
def test_visible_fraction_at_least_min_visible(min_visible):
    n_occluded = 0
    for s in iter_scenes(3, 40, n_objects=4, max_size_frac=0.55, min_visible=min_visible, size=(96, 96)):
        for o in s.objects:
            frac = o.mask.sum() / o.full_mask.sum()
            assert frac >= min_visible - 1e-9
            assert o.visible_fraction == pytest.approx(frac)
            n_occluded += frac < 1
    assert n_occluded > 0, "the test should exercise occlusion"


def test_visible_masks_pairwise_disjoint_and_occlusion_order(scenes, crowded):
    for s in scenes + crowded:
        stack = np.stack([o.mask for o in s.objects])
        assert stack.sum(axis=0).max() <= 1
        # later objects are on top: where a later object covers >= 50 % of a pixel, no
        # earlier object is visible
        for i, j in itertools.combinations(range(len(s.objects)), 2):
            assert not (s.objects[i].mask & s.objects[j].full_mask).any()
        # the top object is never occluded
        assert np.array_equal(s.objects[-1].mask, s.objects[-1].full_mask)


def test_instance_map_matches_masks(scenes):
    for s in scenes:
        im = s.instance_map
        assert im.dtype == np.int16 and im.shape == s.image.shape[:2]
        assert set(np.unique(im)) <= set(range(len(s.objects) + 1))
        for k, o in enumerate(s.objects, start=1):
            assert np.array_equal(im == k, o.mask)
        assert np.array_equal(im == 0, ~np.any([o.mask for o in s.objects], axis=0))


def test_masks_agree_with_rendered_coverage():
    """On a flat background each pixel is bg + sum_k alpha_k (rgb_k - bg); solve for alpha.

    A pixel is in an object's visible mask iff >= 50 % of it shows the object.
    """
    checked = 0
    for s in iter_scenes(11, 60, backgrounds=["flat"], n_objects=(1, 2), size=(80, 80), max_size_frac=0.6):
        bg = _flat_bg_colour(s)
        A = np.stack([np.array(o.rgb, float) - bg for o in s.objects], axis=1)  # (3, n)
        sv = np.linalg.svd(A, compute_uv=False)
        if sv.min() < 40:  # badly conditioned (colours nearly collinear w.r.t. bg): skip
            continue
        px = s.image.reshape(-1, 3).astype(float) - bg
        alpha, *_ = np.linalg.lstsq(A, px.T, rcond=None)  # (n, H*W)
        assert alpha.min() > -0.03 and alpha.max() < 1.03
        assert alpha.sum(axis=0).max() < 1.03
        for k, o in enumerate(s.objects):
            a = alpha[k].reshape(s.image.shape[:2])
            assert (a[o.mask] >= 0.47).all()
            assert o.mask[a >= 0.53].all()
        top = s.objects[-1]
        a_top = alpha[-1].reshape(s.image.shape[:2])
        assert np.array_equal(top.full_mask, top.mask)
        assert np.array_equal(a_top >= 0.5 - 0.03, top.full_mask)
        checked += 1
    assert checked >= 40


def test_mask_colour_is_the_object_colour(scenes, crowded):
    for s in scenes + crowded:
        for o in s.objects:
            own = _COLOR_ARR[o.color]
            assert np.abs(np.array(o.rgb) - own).max() <= 8
            inner = _erode(o.mask)
            if inner.sum() >= 10:  # the interior is painted exactly in the object's colour
                median_inner = np.median(s.image[inner].astype(float), axis=0)
                assert np.array_equal(median_inner, np.array(o.rgb, float))
            mean_all = s.image[o.mask].astype(float).mean(axis=0)
            d = {name: np.linalg.norm(mean_all - c) for name, c in _COLOR_ARR.items()}
            nearest_other = min(v for name, v in d.items() if name != o.color)
            assert d[o.color] < 0.6 * nearest_other, (o.name, mean_all, d)


def test_background_never_looks_like_an_object_colour(scenes):
    for s in scenes:
        near = _dilate(_dilate(np.any([o.full_mask for o in s.objects], axis=0)))
        packed = np.unique(s.image[~near].astype(np.int64) @ np.array([1 << 16, 1 << 8, 1]))
        bg = np.stack([packed >> 16, (packed >> 8) & 255, packed & 255], axis=1).astype(np.float32)
        for name, c in _COLOR_ARR.items():
            d2 = ((bg - c.astype(np.float32)) ** 2).sum(axis=1)
            assert d2.min() > 70**2, (s.background, name)


def test_colour_restrictions_respected():
    for s in iter_scenes(5, 20, colors=["red", "white"], shapes=["ring", "star"], backgrounds=["noise"]):
        assert s.background == "noise"
        assert all(o.color in ("red", "white") and o.shape in ("ring", "star") for o in s.objects)
    with pytest.raises(ValueError):
        make_scene(0, colors=["pink"])
    with pytest.raises(ValueError):
        make_scene(0, n_objects=0)
    # n_objects larger than the number of distinct pairs is capped
    s = make_scene(0, colors=["red"], shapes=["circle", "square"], n_objects=5)
    assert 1 <= len(s.objects) <= 2


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("shape", SHAPES)
def test_rasterised_area_matches_geometry(shape):
    areas = {
        "circle": lambda r: math.pi * r * r,
        "square": lambda r: 2 * r * r,
        "triangle": lambda r: 3 * math.sqrt(3) / 4 * r * r,
        "star": lambda r: 10 * 0.5 * r * (0.45 * r) * math.sin(math.pi / 5),
        "ring": lambda r: math.pi * r * r * (1 - 0.55**2),
    }
    rng = np.random.default_rng(0)
    for r in (6.0, 17.3, 40.0):
        theta, fx, fy = rng.uniform(0, 1, 3)
        sp = _render_sprite(shape, r, theta, fx, fy)
        area = sp.ss.sum() / 16
        assert area == pytest.approx(areas[shape](r), rel=0.06 if r < 10 else 0.02)
        assert abs(sp.full.sum() - area) < 0.3 * area  # >= 50 % rule keeps about the area
        # the sprite grid is tight (up to the sub-pixel offset): the shape spans it
        counts = sp.ss.reshape(sp.h, 4, sp.w, 4).sum(axis=(1, 3))
        assert counts[:2].any() and counts[-2:].any() and counts[:, :2].any() and counts[:, -2:].any()
        assert sp.h <= 2 * r + 2 and sp.w <= 2 * r + 2
        ys, xs = np.nonzero(sp.ss)
        if shape in ("circle", "ring"):  # centred where it was asked to be
            assert ((xs + 0.5) / 4).mean() == pytest.approx(r + fx, abs=0.05)
            assert ((ys + 0.5) / 4).mean() == pytest.approx(r + fy, abs=0.05)


@pytest.mark.parametrize("shape", SHAPES)
def test_single_shape_fill_ratio(shape):
    """Fraction of the object's bounding box that its mask fills, typical per shape."""
    expected = {"circle": (0.72, 0.85), "square": (0.6, 1.0), "triangle": (0.4, 0.6), "star": (0.28, 0.5), "ring": (0.5, 0.65)}
    lo, hi = expected[shape]
    for s in iter_scenes(8, 15, n_objects=1, shapes=[shape], min_size_frac=0.3, size=(128, 128)):
        (o,) = s.objects
        x0, y0, x1, y1 = o.box
        ratio = o.mask.sum() / ((x1 - x0) * (y1 - y0))
        assert lo <= ratio <= hi, ratio


def test_ring_has_a_hole_showing_the_background():
    for s in iter_scenes(21, 30, n_objects=1, shapes=["ring"], backgrounds=["flat"], size=(96, 96)):
        (o,) = s.objects
        bg = _flat_bg_colour(s)
        cx, cy = o.center
        r, c = int(cy), int(cx)
        assert not o.mask[r, c] and not o.full_mask[r, c]
        assert s.instance_map[r, c] == 0
        assert np.abs(s.image[r, c].astype(float) - bg).max() <= 1
        # the hole is a sizeable background disc, surrounded by the ring
        x0, y0, x1, y1 = o.box
        rad = 0.55 * (x1 - x0) / 2 - 1.0  # hole radius minus a pixel
        yy, xx = np.mgrid[: s.image.shape[0], : s.image.shape[1]] + 0.5
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= rad**2
        assert not (o.full_mask & disc).any()
        assert (np.abs(s.image[disc].astype(float) - bg).max(axis=1) <= 1).all()
        for dx, dy in [(1, 0), (-1, 0), (0, 1), (0, -1)]:  # walking outwards hits the ring
            hits = [o.mask[int(cy + t * dy), int(cx + t * dx)] for t in range(1, int(0.5 * (x1 - x0)))]
            assert any(hits)
    # in cluttered scenes an unoccluded ring's hole still shows background at its centre
    n = 0
    for s in iter_scenes(22, 50, n_objects=4, shapes=["ring", "circle", "square"], size=(128, 128)):
        for o in s.objects:
            if o.shape == "ring" and o.visible_fraction == 1.0:
                assert s.instance_map[int(o.center[1]), int(o.center[0])] == 0
                n += 1
    assert n > 10


# ----------------------------------------------------------------------------- captions

_PHRASE = re.compile(r"^(a|an) (\w+) (\w+)$")


def _parse_caption(caption: str) -> tuple[list[str], list[str]]:
    """Split ``"a red circle left of a blue square ..."`` into names and relations."""
    rel_re = "|".join(re.escape(r) for r in RELATIONS)
    parts = re.split(rf" ({rel_re}) ", caption)
    phrases, rels = parts[0::2], parts[1::2]
    names = []
    for p in phrases:
        m = _PHRASE.match(p)
        assert m, p
        article, color, shape = m.groups()
        assert article == ("an" if color[0] in "aeiou" else "a")
        names.append(f"{color} {shape}")
    return names, rels


def _expected_relation(a: SceneObject, b: SceneObject) -> str:
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx >= 0 else "right of"
    return "above" if dy > 0 else "below"


def test_caption_names_every_object_once_with_correct_relations(scenes, crowded):
    for s in scenes + crowded:
        assert s.caption == s.caption.lower() and re.fullmatch(r"[a-z ]+", s.caption)
        assert s.caption == scene_caption(s.objects)
        names, rels = _parse_caption(s.caption)
        assert sorted(names) == sorted(o.name for o in s.objects)
        for o in s.objects:
            assert len(re.findall(rf"\b{o.name}\b", s.caption)) == 1
        by_name = {o.name: o for o in s.objects}
        chain = [by_name[n] for n in names]
        xs = [o.center[0] for o in s.objects]
        ys = [o.center[1] for o in s.objects]
        axis = 0 if max(xs) - min(xs) >= max(ys) - min(ys) else 1
        keys = [o.center[axis] for o in chain]
        assert keys == sorted(keys), "chain must run left to right / top to bottom"
        for (a, b), rel in zip(zip(chain, chain[1:]), rels):
            assert rel == _expected_relation(a, b)
            dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
            if rel == "left of":
                assert dx >= abs(dy)
            elif rel == "right of":
                assert -dx >= abs(dy)
            elif rel == "above":
                assert dy > abs(dx)
            else:
                assert -dy > abs(dx)
        if len(s.objects) == 1:
            assert s.caption == s.objects[0].caption


def _obj(color: str, shape: str, x: float, y: float) -> SceneObject:
    m = np.zeros((4, 4), bool)
    return SceneObject(color, shape, m, m, (0, 0, 1, 1), (x, y))


def test_scene_caption_grammar_examples():
    red, blue, green = _obj("red", "circle", 10, 50), _obj("blue", "square", 60, 55), _obj("green", "star", 120, 40)
    assert scene_caption([red]) == "a red circle"
    assert scene_caption([blue, red]) == "a red circle left of a blue square"
    assert scene_caption([green, red, blue]) == "a red circle left of a blue square left of a green star"
    top, mid, bot = _obj("orange", "ring", 50, 5), _obj("white", "triangle", 40, 60), _obj("yellow", "star", 90, 100)
    # vertical spread larger: top to bottom; last pair dominated by dx=50 vs dy=40 -> "left of"
    assert scene_caption([bot, top, mid]) == "an orange ring above a white triangle left of a yellow star"
    assert red.name == "red circle" and red.caption == "a red circle"
    assert _obj("orange", "star", 0, 0).caption == "an orange star"
    # vertical chain whose first pair is dominated by dx < 0 -> "right of"
    assert scene_caption([_obj("green", "square", 20, 80), _obj("red", "circle", 50, 0), _obj("blue", "ring", 10, 10)]) == (
        "a red circle right of a blue ring above a green square"
    )
    with pytest.raises(ValueError):
        scene_caption([])


def test_words_cover_all_captions():
    assert list(WORDS) == sorted(set(WORDS))
    assert set(COLORS) | set(SHAPES) | {"a", "left", "right", "of", "above", "below"} <= set(WORDS)
    used = set()
    for s in iter_scenes(99, 300, size=(48, 48)):
        words = s.caption.split()
        assert set(words) <= set(WORDS), s.caption
        used.update(words)
    assert {"left", "right", "above", "below"} <= used


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("size", SIZES + [(32, 32), (300, 90)])
def test_sizes_and_aspect_ratios(size):
    H, W = size
    short = min(H, W)
    for s in iter_scenes(sum(size), 12, size=size, min_size_frac=0.2, max_size_frac=0.4):
        assert s.image.shape == (H, W, 3)
        assert s.instance_map.shape == (H, W)
        for o in s.objects:
            rows, cols = np.nonzero(o.full_mask)
            extent = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
            # the shape is inscribed in a circle of diameter 0.2..0.4 * min(H, W)
            # (at least 10 px for rings/stars, 6 px otherwise)
            min_diam = max(0.2 * short, 10 if o.shape in ("ring", "star") else 6)
            assert 0.6 * min_diam - 1 <= extent <= max(0.4 * short, min_diam) + 1, (o.name, extent)


def test_objects_lie_inside_the_image():
    """Objects are never cut by the image border: their shapes are complete."""
    for s in iter_scenes(31, 40, n_objects=1, shapes=["circle"], size=(64, 100), min_size_frac=0.4, max_size_frac=0.9):
        (o,) = s.objects
        x0, y0, x1, y1 = o.box
        w, h = x1 - x0, y1 - y0
        assert abs(w - h) <= 1  # a clipped disc would not be round
        assert o.mask.sum() == pytest.approx(math.pi * (w / 2) ** 2, rel=0.12)


# ----------------------------------------------------------------------------- crops


def test_object_crop_contains_the_object(scenes):
    for s in scenes[::3]:
        H, W = s.image.shape[:2]
        for i, o in enumerate(s.objects):
            for square in (True, False):
                for context in (0.0, 0.25, 1.0):
                    X0, Y0, X1, Y1 = object_crop_box(s, i, context=context, square=square)
                    crop = object_crop(s, i, context=context, square=square)
                    assert 0 <= X0 < X1 <= W and 0 <= Y0 < Y1 <= H
                    assert crop.dtype == np.uint8 and crop.shape == (Y1 - Y0, X1 - X0, 3)
                    assert np.array_equal(crop, s.image[Y0:Y1, X0:X1])
                    x0, y0, x1, y1 = o.box
                    assert X0 <= x0 and Y0 <= y0 and x1 <= X1 and y1 <= Y1
                    assert o.mask[Y0:Y1, X0:X1].sum() == o.mask.sum()
                    if square:
                        assert crop.shape[0] == crop.shape[1]
                        side = max(x1 - x0, y1 - y0)
                        want = min(round(side * (1 + 2 * context)), H, W)
                        assert crop.shape[0] == want
                    elif context == 0:
                        assert (X0, Y0, X1, Y1) == o.box


# ----------------------------------------------------------------------------- no overlap


def _flood(seed: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    region = seed & allowed
    while True:
        grown = _dilate(region) & allowed
        if np.array_equal(grown, region):
            return region
        region = grown


def test_no_overlap_mode_objects_do_not_touch():
    for s in iter_scenes(17, 25, n_objects=4, allow_overlap=False, size=(128, 128), backgrounds=["flat"]):
        for o in s.objects:
            assert np.array_equal(o.mask, o.full_mask)
        for a, b in itertools.combinations(s.objects, 2):
            assert not (_dilate(a.full_mask) & b.full_mask).any()
        # not even the anti-aliased fringes touch: every 8-connected blob of non-background
        # pixels belongs to exactly one object
        non_bg = np.abs(s.image.astype(float) - _flat_bg_colour(s)).max(axis=2) > 0
        for i, o in enumerate(s.objects):
            blob = _flood(o.mask, non_bg)
            assert not any((blob & p.mask).any() for j, p in enumerate(s.objects) if j != i)
    # with overlap allowed, objects do touch under the same settings
    touching = 0
    for s in iter_scenes(17, 40, n_objects=4, size=(128, 128)):
        touching += any((_dilate(a.full_mask) & b.full_mask).any() for a, b in itertools.combinations(s.objects, 2))
    assert touching > 0
