"""Spatial, radial and pooling baselines against the authors' official code.

* ``tests/golden/spatial.npz``: HiRED's ``LlavaNextForConditionalGeneration.add_spatial_tokens``
  (``hasanar1f/HiRED``, ``modeling_llava_next.py``) on empty masks, with the forward's count
  ``int(num_vision_tokens * spatial_budget)``, for 62 (n, budget) pairs: the kept indices.
  ``pruning.spatial`` with ``pattern="hired"`` must keep the identical indices; the default
  ``grid`` and ``raster`` patterns keep exactly ``ceil(keep·n)`` (a keep-ratio baseline; HiRED's
  stride keeps ``n − 1`` tokens for any keep above 0.5).
* ``tests/golden/spatial_radial.npz``: TokenReduction's
  ``HeuristicVisionTransformer.prep_pattern_stage_subset`` and the forward's mask ``distances <=
  threshold`` (``JoakimHaurum/TokenReduction``, ``models/heuristic.py``) for 90 cases (sides 14,
  7, 8, 5, 24; L1, L2, L∞; 1-3 stages): the kept indices per stage. ``pruning.radial`` with
  ``count="threshold", coords="official"`` must give the official target counts and the identical
  kept sets, except where the official float32 coordinates split one mathematically tied distance
  shell (L1 on the even sides 14 and 24: 6 of 135 stages); there the two sets differ only by
  tokens of that one shell. The default (``exact``, ``centred``) is the project's exact-count rule.
* ``tests/golden/pool.npz``: LLaVA-NeXT's ``LlavaMetaForCausalLM.get_2dPool`` (average mode,
  ``LLaVA-VL/LLaVA-NeXT``, ``llava/model/llava_arch.py``) on seeded random frame features (9 cases):
  the pooled tokens. ``merging.pool`` (per frame, through :func:`apply_step`) and ``vlm.pool``
  (one grid segment per frame, :func:`segment_pool_groups` + the group means in first-member
  order, as the VLM backend merges) must equal them within 1e-5; on sides not divisible by the
  stride the official ``avg_pool2d`` drops the last rows/columns, while the project keeps them as
  smaller edge windows (a merge step must place every token in a group): there the full windows
  equal the official tokens and the extra groups are exactly the edge tokens.

Repositories, commits and exact calls are in each file's ``meta`` and ``tests/golden/PROVENANCE.md``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from explorer.core.layout import Geometry, GridSegment, TokenLayout
from explorer.core.reduction import ReductionStep, TokenState, apply_step
from explorer_plugins.baselines.method import (Pool, RadialPrune, SpatialPrune, radial_distances, radial_keep,
                                               radial_official_count)
from explorer_plugins.vlm_baselines.method import VlmPool, segment_pool_groups

ROOT = Path(__file__).resolve().parents[1] / "golden"
SPATIAL = np.load(ROOT / "spatial.npz")
RADIAL = np.load(ROOT / "spatial_radial.npz")
POOL = np.load(ROOT / "pool.npz")


def _meta(z):
    return json.loads(str(z["meta"][0]))


def _grid(h, w):
    return np.stack(np.divmod(np.arange(h * w), w), 1).astype(np.float64)


def _state(x_patches, grid, stage=0, n_stages=1, n_original=None, positions=None):
    """A host TokenState: a zero [CLS] in front of ``x_patches``, positions on ``grid``."""
    n, d = x_patches.shape
    n_original = n if n_original is None else n_original
    x = np.concatenate([np.zeros((1, d)), x_patches.astype(np.float64)], 0)
    assign = np.where(np.arange(n_original) < n, np.arange(n_original), -1)
    return TokenState(layer=0, stage=stage, x=x, keys=None, attention=None, sizes=np.ones(n + 1), n_prefix=1,
                      assign=assign, positions=_grid(*grid) if positions is None else positions, grid=grid,
                      n_stages=n_stages)


def test_metas_name_the_official_code():
    s, r, p = _meta(SPATIAL), _meta(RADIAL), _meta(POOL)
    assert s["repository"] == "https://github.com/hasanar1f/HiRED"
    assert s["commit"] == "502d6dd79a03e87cc808cedba8b8a951d93cb62b"
    assert s["function"].endswith("add_spatial_tokens")
    assert r["repository"] == "https://github.com/JoakimHaurum/TokenReduction"
    assert r["commit"] == "88fe07ebbc5ffbf3a36814526577f1a8576e048d" and r["file"] == "models/heuristic.py"
    assert p["repository"] == "https://github.com/LLaVA-VL/LLaVA-NeXT"
    assert p["commit"] == "df179663ae8b83207df100a1f7af24caec633ff9" and p["file"] == "llava/model/llava_arch.py"


# -- pruning.spatial: HiRED add_spatial_tokens --------------------------------------------------------
def test_spatial_hired_pattern_is_hireds_add_spatial_tokens():
    method = SpatialPrune()
    assert SpatialPrune.Params().pattern == "grid"
    for case in _meta(SPATIAL)["cases"]:
        n, budget = case["n"], case["budget"]
        params = SpatialPrune.Params(keep=budget, pattern="hired")
        step = method.reduce(_state(np.zeros((n, 2)), (1, n)), params)
        np.testing.assert_array_equal(step.keep, SPATIAL[case["name"]], err_msg=f"n={n} budget={budget}")


def test_spatial_grid_and_raster_keep_exactly_the_budget():
    """The default ``grid`` and ``raster``: exactly ceil(keep·n), not HiRED's set."""
    differ = 0
    for case in _meta(SPATIAL)["cases"]:
        n, budget = case["n"], case["budget"]
        side = math.isqrt(n)
        grid = (side, side) if side * side == n else (1, n)
        for pattern in ("grid", "raster"):
            step = SpatialPrune().reduce(_state(np.zeros((n, 2)), grid), SpatialPrune.Params(keep=budget, pattern=pattern))
            assert step.keep.size == math.ceil(budget * n - 1e-9)
            differ += not np.array_equal(step.keep, SPATIAL[case["name"]])
    assert differ > 60


# -- pruning.radial: TokenReduction's heuristic radial pattern ----------------------------------------
def test_radial_threshold_official_coords_match_tokenreduction():
    mismatched = []
    for case in _meta(RADIAL)["cases"]:
        P, metric, S = case["P"], case["metric"], case["stages"]
        n0 = P * P
        pos = _grid(P, P)
        exact = radial_distances(pos, (P, P), metric, "official")
        keep = case["keep_rate"] ** S
        params = RadialPrune.Params(keep=keep, metric=metric, count="threshold", coords="official")
        cur = np.arange(n0)
        for s in range(S):
            gold = RADIAL[f"{case['name']}_s{s}"].astype(np.int64)
            assert radial_official_count(keep, s, S, n0, cur.size) == case["num_tokens"][s]
            step = RadialPrune().reduce(_state(np.zeros((cur.size, 2)), (P, P), s, S, n0, pos[cur]), params)
            kept = cur[step.keep]
            if not np.array_equal(kept, gold):
                # the official float32 coordinates k·P/(P−1) split one tied shell: the sets differ only there
                diff = np.setxor1d(kept, gold)
                assert np.unique(exact[diff]).size == 1, case
                assert set(kept) <= set(gold) or set(gold) <= set(kept)
                mismatched.append((case["name"], s))
            cur = gold  # the next stage starts from the official survivors
    assert mismatched == [("r0", 0), ("r1", 1), ("r1", 2), ("r72", 0), ("r73", 1), ("r73", 2)]


def test_radial_centred_coordinates_differ_on_odd_sides():
    """``coords="centred"`` (the default) measures from the true centre; on a 7×7 grid the official
    linspace(-4, 3, 7) origin sits half a step towards the top left."""
    case = next(c for c in _meta(RADIAL)["cases"] if c["P"] == 7 and c["metric"] == "l2" and c["stages"] == 1
                and c["keep_rate"] == 0.5)
    pos = _grid(7, 7)
    centred = radial_keep(pos, (7, 7), case["num_tokens"][0], "l2", "threshold", "centred")
    official = radial_keep(pos, (7, 7), case["num_tokens"][0], "l2", "threshold", "official")
    np.testing.assert_array_equal(official, RADIAL[case["name"] + "_s0"])
    assert not np.array_equal(centred, official)
    assert RadialPrune.Params().count == "exact" and RadialPrune.Params().coords == "centred"


# -- merging.pool and vlm.pool: LLaVA-NeXT get_2dPool --------------------------------------------------
def _windows(side, s):
    """(full, partial) window ids of a side×side grid in raster order of the ceil-mode windows."""
    c = -(-side // s)
    full = [i * c + j for i in range(c) for j in range(c) if (i + 1) * s <= side and (j + 1) * s <= side]
    return np.array(full), c * c


@pytest.mark.parametrize("case", _meta(POOL)["cases"], ids=lambda c: c["name"])
def test_merging_pool_equals_get_2dpool(case):
    name, side, s = case["name"], case["side"], case["stride"]
    feat, pooled = POOL[name + "_feat"], POOL[name + "_pooled"]
    full, n_windows = _windows(side, s)
    for f in range(feat.shape[0]):
        state = _state(feat[f], (side, side))
        step = Pool().reduce(state, Pool.Params(stride=s))
        assert step.merge is not None and int(step.merge.max()) + 1 == n_windows
        x, sizes, _, _ = apply_step(state, step)
        np.testing.assert_allclose(x[1:][full], pooled[f], atol=1e-5, rtol=0)
        assert (sizes[1:][full] == s * s).all()
        if side % s:  # ceil mode: the extra windows hold exactly the rows/columns avg_pool2d drops
            edge = np.setdiff1d(np.arange(n_windows), full)
            r, c = np.divmod(np.arange(side * side), side)
            dropped = (r >= side // s * s) | (c >= side // s * s)
            assert set(np.flatnonzero(np.isin(step.merge, edge))) == set(np.flatnonzero(dropped))
        else:
            assert full.size == n_windows
    if s == 2:  # keep 0.25 -> s = round(1/sqrt(keep)) = 2
        assert (Pool().reduce(_state(feat[0], (side, side)), Pool.Params(keep=0.25)).merge == step.merge).all()


def _frames_layout(frames, side):
    geo = Geometry.identity((side, side))
    segs = tuple(GridSegment(f"frame {i}", side, side, seq_start=1 + i * side * side, geometry=geo)
                 for i in range(frames))
    return TokenLayout(n_tokens=1 + frames * side * side + 2, original_size=(side, side), segments=segs)


@pytest.mark.parametrize("case", _meta(POOL)["cases"], ids=lambda c: c["name"])
def test_vlm_pool_equals_get_2dpool(case):
    name, side, s, frames = case["name"], case["side"], case["stride"], case["frames"]
    feat, pooled = POOL[name + "_feat"], POOL[name + "_pooled"]
    layout = _frames_layout(frames, side)
    n = frames * side * side
    groups = segment_pool_groups(layout, np.arange(n), s)
    G = int(groups.max()) + 1
    x = feat.reshape(n, -1).astype(np.float64)
    # as VlmBackend merges: each group's mean, placed at its first member; survivors in sequence order
    first = np.array([np.flatnonzero(groups == g)[0] for g in range(G)])
    order = np.argsort(first, kind="stable")
    means = np.stack([x[groups == g].mean(0) for g in order])
    full, per_frame = _windows(side, s)
    assert G == frames * per_frame
    ours = means.reshape(frames, per_frame, -1)[:, full]
    np.testing.assert_allclose(ours, pooled, atol=1e-5, rtol=0)
    # the plugin's own decision (stride given; keep 0.25 -> s = 2)
    state = SimpleNamespace(layout=layout, original=np.arange(n))
    np.testing.assert_array_equal(VlmPool().decide(state, VlmPool.Params(stride=s)).merge, groups)
    if s == 2:
        np.testing.assert_array_equal(VlmPool().decide(state, VlmPool.Params(keep=0.25)).merge, groups)
