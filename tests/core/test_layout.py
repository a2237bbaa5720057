"""Token layout: geometry composition and token maps landing on the right pixels."""

import numpy as np
import pytest

from explorer.core.layout import Box, Geometry, GridSegment, SpecialToken, TokenLayout


def clip_like_geometry(h: int, w: int, size: int = 224) -> Geometry:
    """Shortest-side resize to ``size`` then a centred ``size`` crop (torchvision rules)."""
    geo = Geometry.identity((h, w))
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nh, nw = size, int(size * w / h)
    geo = geo.resize((nh, nw))
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return geo.crop(top, left, size, size)


def pixels_in_box(box: Box, size) -> np.ndarray:
    """Boolean mask of the pixels whose centres lie inside ``box`` (independent of the layout code)."""
    H, W = size
    yc = np.arange(H) + 0.5
    xc = np.arange(W) + 0.5
    return ((yc >= box.y0) & (yc < box.y1))[:, None] & ((xc >= box.x0) & (xc < box.x1))[None, :]


def test_geometry_composes_resize_crop_pad():
    geo = Geometry.identity((100, 200)).resize((50, 100)).crop(0, 25, 50, 50).pad(2, 3, 4, 5)
    assert geo.frame_size == (56, 58)
    x, y = geo.to_frame(np.array([50.0, 150.0]), np.array([0.0, 100.0]))
    # x: 50 * 0.5 - 25 + 3 = 3 ; 150 * 0.5 - 25 + 3 = 53 ; y: 0 + 2 = 2 ; 100 * 0.5 + 2 = 52
    np.testing.assert_allclose(x, [3.0, 53.0])
    np.testing.assert_allclose(y, [2.0, 52.0])
    bx, by = geo.to_original(x, y)
    np.testing.assert_allclose(bx, [50.0, 150.0])
    np.testing.assert_allclose(by, [0.0, 100.0])
    with pytest.raises(ValueError):
        geo.resize((0, 10))


@pytest.mark.parametrize("size", [(224, 224), (240, 500), (500, 240), (37, 91)])
def test_one_hot_token_lands_on_its_box(size):
    """Every token's one-hot map, painted with nearest sampling, lights exactly its box's pixels."""
    H, W = size
    geo = clip_like_geometry(H, W, 224)
    layout = TokenLayout.single_grid(geo, 14, 14)
    assert layout.n_tokens == 197 and layout.n_image_tokens == 196
    for k in [0, 13, 14, 100, 195]:
        onehot = np.zeros(196)
        onehot[k] = 1.0
        img = layout.to_image(onehot, mode="nearest")
        seq = int(layout.image_token_indices()[k])
        _, box = layout.token_box(seq)
        expected = pixels_in_box(box, (H, W))
        lit = np.nan_to_num(img) == 1.0
        assert lit.any()
        np.testing.assert_array_equal(lit, expected)


def test_center_crop_covers_only_the_crop():
    layout = TokenLayout.single_grid(clip_like_geometry(100, 300, 224), 14, 14)
    rect = layout.segments[0].image_rect
    # the crop is the central 100x100 square of the 300-wide image
    assert rect.x0 == pytest.approx(300 * (int(round((672 - 224) / 2)) / 672), abs=1e-9)
    assert rect.width == pytest.approx(100.0, rel=1e-2)
    img = layout.to_image(np.ones(196))
    assert np.isnan(img[:, :90]).all() and np.isnan(img[:, 210:]).all()
    assert np.isfinite(img[:, 110:190]).all()


def test_token_at_inverts_token_box():
    layout = TokenLayout.single_grid(clip_like_geometry(180, 260, 224), 14, 14)
    for seq in (1, 50, 196):
        _, box = layout.token_box(seq)
        cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
        assert layout.token_at(cx, cy) == seq
    assert layout.token_at(1.0, 90.0) is None  # cropped away on the left


def test_bilinear_is_exact_at_cell_centres_and_bounded():
    geo = Geometry.identity((80, 80))
    layout = TokenLayout.single_grid(geo, 4, 4)
    vals = np.arange(16, dtype=float)
    img = layout.to_image(vals, mode="bilinear")
    # cell (r, c) centre at pixel (20r + 10, 20c + 10) -> pixel centre 9.5 is 0.5 px off; use exact 1x1 out size check
    assert img.min() >= vals.min() - 1e-6 and img.max() <= vals.max() + 1e-6
    small = layout.to_image(vals, out_size=(4, 4), mode="bilinear")
    np.testing.assert_allclose(small, vals.reshape(4, 4), atol=1e-6)


def test_segments_with_newline_tokens_and_offsets():
    geo = Geometry.identity((60, 90))
    base = GridSegment("base", 2, 3, seq_start=5, geometry=geo)
    tiles = GridSegment("tiles", 4, 6, seq_start=11, geometry=geo, row_stride=7)  # newline after each row
    layout = TokenLayout(n_tokens=11 + 4 * 7 + 2, original_size=(60, 90), segments=(base, tiles),
                         special=(SpecialToken(0, "text"),))
    idx = layout.image_token_indices()
    assert len(idx) == 6 + 24
    assert list(tiles.extra_indices()) == [17, 24, 31, 38]
    assert not set(tiles.extra_indices()) & set(idx)
    assert layout.locate(17) is None
    assert layout.locate(18) == (1, 1, 0)
    assert layout.image_token_number(18) == 6 + 6
    grids = layout.split(np.arange(30))
    assert grids[0].shape == (2, 3) and grids[1].shape == (4, 6)
    seq_vals = np.zeros(layout.n_tokens)
    seq_vals[idx] = np.arange(30)
    np.testing.assert_array_equal(layout.gather(seq_vals), np.arange(30))
    # mean over the overlapping segments
    v = np.concatenate([np.full(6, 2.0), np.full(24, 4.0)])
    np.testing.assert_allclose(layout.to_image(v), 3.0)
    np.testing.assert_allclose(layout.to_image(v, combine="max"), 4.0)
    np.testing.assert_allclose(layout.to_image(v, segments=["base"]), 2.0)
    shifted = layout.with_offset(10, layout.n_tokens + 10)
    assert shifted.image_token_indices()[0] == idx[0] + 10


def test_layout_validation():
    geo = Geometry.identity((10, 10))
    with pytest.raises(ValueError):
        TokenLayout(n_tokens=5, original_size=(10, 10), segments=(GridSegment("a", 2, 3, 0, geo),))
    with pytest.raises(ValueError):
        TokenLayout(n_tokens=20, original_size=(10, 10),
                    segments=(GridSegment("a", 2, 2, 0, geo), GridSegment("b", 2, 2, 3, geo)))
    with pytest.raises(ValueError):
        TokenLayout(n_tokens=20, original_size=(11, 10), segments=(GridSegment("a", 2, 2, 0, geo),))


def test_layout_round_trips_through_dict():
    layout = TokenLayout.single_grid(clip_like_geometry(123, 456, 64), 8, 8)
    again = TokenLayout.from_dict(layout.to_dict())
    assert again.to_dict() == layout.to_dict()
    v = np.random.default_rng(0).random(64)
    np.testing.assert_array_equal(again.to_image(v), layout.to_image(v))
