"""Pointing game, mass inside a region, curve areas."""

import numpy as np
import pytest

from explorer.core.layout import Box
from explorer.core.metrics import box_mask, curve_auc, mass_inside, pointing_game, region_stats


def test_box_mask_uses_pixel_centres():
    m = box_mask(Box(1.5, 0.0, 3.5, 2.0), (4, 5))
    # centres x = 1.5 and 2.5 lie in [1.5, 3.5): columns 1 and 2; rows 0 and 1
    assert m.sum() == 4 and m[0, 1] and m[1, 2] and not m[0, 3] and not m[2, 1]


def test_pointing_game():
    v = np.zeros((10, 10))
    v[7, 2] = 5.0
    region = np.zeros((10, 10), bool)
    region[6:9, 1:4] = True
    assert pointing_game(v, region)
    assert not pointing_game(v, ~region)
    near = np.zeros((10, 10), bool)
    near[7, 5] = True
    assert not pointing_game(v, near) and pointing_game(v, near, tolerance=3)
    v[0, 0] = np.nan  # NaN never wins
    assert pointing_game(v, region)
    with pytest.raises(ValueError):
        pointing_game(v, region[:5])


def test_mass_inside_is_minmax_normalised_energy():
    v = np.full((4, 4), 10.0)
    v[0, 0] = 12.0
    region = np.zeros((4, 4), bool)
    region[0, 0] = True
    assert mass_inside(v, region) == pytest.approx(1.0)  # everything else normalises to 0
    u = np.arange(16, dtype=float).reshape(4, 4)
    r = u >= 8
    expected = ((u - 0) / 15)[r].sum() / ((u - 0) / 15).sum()
    assert mass_inside(u, r) == pytest.approx(expected)
    assert mass_inside(np.full((2, 2), np.nan), np.ones((2, 2), bool)) == 0.0
    s = region_stats(u, r)
    assert s["peak_inside"] == 1.0 and s["area_share"] == 0.5


def test_curve_auc():
    x = np.linspace(0, 1, 5)
    assert curve_auc(x, np.ones(5)) == pytest.approx(1.0)
    assert curve_auc(x, x) == pytest.approx(0.5)
