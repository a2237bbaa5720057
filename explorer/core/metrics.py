"""Map scores that need no model: pointing game, mass inside a region, curve areas.

Maps are ``(H, W)`` float rasters on the original image (NaN = no value); regions are ``(H, W)``
bool masks.
"""

from __future__ import annotations

import numpy as np

from .layout import Box

__all__ = ["pointing_game", "mass_inside", "box_mask", "curve_auc", "region_stats", "kept_iou",
           "normalized_mutual_information"]


def box_mask(box: Box, size: tuple[int, int]) -> np.ndarray:
    """Pixels whose centres lie in ``box`` on an image of ``size = (H, W)``."""
    m = np.zeros(size, dtype=bool)
    rows, cols = box.pixel_slices(size)
    m[rows, cols] = True
    return m


def _peak(values: np.ndarray) -> tuple[int, int] | None:
    v = np.where(np.isfinite(values), values, -np.inf)
    if not np.isfinite(v).any():
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(v)), v.shape))  # type: ignore[return-value]


def pointing_game(values: np.ndarray, region: np.ndarray, tolerance: int = 0) -> bool:
    """True when the map's maximum lies inside ``region`` (or within ``tolerance`` pixels of it)."""
    values = np.asarray(values)
    region = np.asarray(region, dtype=bool)
    if values.shape != region.shape:
        raise ValueError(f"map {values.shape} and region {region.shape} differ in size")
    peak = _peak(values)
    if peak is None:
        return False
    r, c = peak
    if tolerance <= 0:
        return bool(region[r, c])
    r0, r1 = max(0, r - tolerance), r + tolerance + 1
    c0, c1 = max(0, c - tolerance), c + tolerance + 1
    yy, xx = np.mgrid[r0:min(r1, region.shape[0]), c0:min(c1, region.shape[1])]
    near = (yy - r) ** 2 + (xx - c) ** 2 <= tolerance**2
    return bool(region[r0:r1, c0:c1][near].any())


def mass_inside(values: np.ndarray, region: np.ndarray) -> float:
    """Share of the map's mass inside ``region`` (the energy-based pointing game): the map is
    min-max normalised to [0, 1] over its finite pixels first (NaN pixels carry no mass)."""
    values = np.asarray(values, dtype=np.float64)
    region = np.asarray(region, dtype=bool)
    if values.shape != region.shape:
        raise ValueError(f"map {values.shape} and region {region.shape} differ in size")
    finite = np.isfinite(values)
    if not finite.any():
        return 0.0
    lo, hi = float(values[finite].min()), float(values[finite].max())
    v = np.where(finite, (values - lo) / (hi - lo) if hi > lo else 1.0, 0.0)
    total = float(v.sum())
    return float(v[region].sum() / total) if total > 0 else 0.0


def region_stats(values: np.ndarray, region: np.ndarray) -> dict[str, float]:
    """``mass_inside``, ``peak_inside`` (0/1) and the region's share of the image area."""
    return {
        "mass_inside": mass_inside(values, region),
        "peak_inside": float(pointing_game(values, region)),
        "area_share": float(np.asarray(region, dtype=bool).mean()),
    }


def curve_auc(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoid area under ``y(x)``, with ``x`` spanning [0, 1]."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def kept_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two kept-token sets (bool masks over the image tokens)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = int((a | b).sum())
    return float((a & b).sum() / union) if union else 1.0


def normalized_mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """NMI of two labelings (arithmetic-mean normalisation, as scikit-learn's default), used to
    compare merge groupings ("Which Tokens to Use?", Haurum et al. 2023). 1.0 for identical
    partitions up to relabeling; labels of -1 are treated as one more cluster."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    if a.shape != b.shape:
        raise ValueError("labelings differ in length")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    n = a.size
    cont = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(cont, (ia, ib), 1.0)
    pij = cont / n
    pi, pj = pij.sum(1), pij.sum(0)
    nz = pij > 0
    mi = float((pij[nz] * np.log(pij[nz] / (pi[:, None] * pj[None, :])[nz])).sum())
    ha = float(-(pi[pi > 0] * np.log(pi[pi > 0])).sum())
    hb = float(-(pj[pj > 0] * np.log(pj[pj > 0])).sum())
    if ha == 0.0 and hb == 0.0:
        return 1.0
    denom = (ha + hb) / 2.0
    return float(mi / denom) if denom > 0 else 0.0
