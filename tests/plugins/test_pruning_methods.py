"""Pruning plugins: random / spatial / radial / pooling baselines, DivPrune, DART, Zero-TPrune.

The catalog's invariants (methods.md A6, A7, A8, A17) on hand-made token states, and every
method executed for real in the tiny CLIP through the plugin host (keep = 1 is the plain model,
keep = 0.5 leaves the stated number of tokens).
"""

import math

import numpy as np
import pytest

from explorer.core.image_io import load_image
from explorer.core.jobs import run_sync
from explorer.core.reduction import TokenState, apply_step
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.api import params_to_strings, parse_params
from explorer.plugin_host.host import PluginHost
from explorer.testing.images import png_bytes
from explorer_plugins.baselines.method import (Pool, RadialPrune, RandomPrune, SpatialPrune, pool_groups,
                                               pool_stride, radial_distances, radial_keep, random_keep,
                                               spatial_keep)
from explorer_plugins.dart.method import Dart, dart_counts, dart_select, key_l1, layer_norm
from explorer_plugins.divprune.method import DivPrune, cosine_distance, divprune_select
from explorer_plugins.zerotprune.method import ZeroTPrune, s_stage_drop, split_budget, weighted_pagerank

HOST = PluginHost()
METHOD_IDS = ["pruning.random", "pruning.spatial", "pruning.radial", "merging.pool", "pruning.divprune",
              "pruning.dart", "pruning.zerotprune"]


def _grid_positions(h, w):
    return np.stack(np.divmod(np.arange(h * w), w), 1).astype(np.float64)


def _state(x_patches, keys=None, attention=None, grid=None, prefix=1, seed=0):
    """A first-stage TokenState with the given patch features (a random [CLS] in front)."""
    rng = np.random.default_rng(seed)
    n, d = x_patches.shape
    grid = grid or (1, n)
    x = np.concatenate([rng.normal(size=(prefix, d)), x_patches], 0)
    if keys is None:
        keys = rng.normal(size=(2, n + prefix, 4))
    return TokenState(layer=0, stage=0, x=x, keys=keys, attention=attention, sizes=np.ones(n + prefix),
                      n_prefix=prefix, assign=np.arange(n), positions=_grid_positions(*grid), grid=grid)


def _params(cls, **values):
    return cls.Params(**values)


def _rot180(mask, grid):
    return mask.reshape(grid)[::-1, ::-1].reshape(-1)


# -- registration ---------------------------------------------------------------------------------
def test_methods_are_registered_with_manifests_and_help_text():
    for mid in METHOD_IDS:
        info = HOST.method(mid)
        c = info.contribution
        assert c.family == ("merging" if mid == "merging.pool" else "pruning")
        assert c.backends == ("clip",) and info.requires("model") and info.requires("hidden_states")
        assert c.citation and c.repository.startswith("https://") and c.description and c.adaptation
        model = HOST.params_model(mid)
        p = model()
        assert p.keep == 0.5
        assert parse_params(model, params_to_strings(p)) == p
        for f in p.model_dump():
            assert model.model_fields[f].description, f"{mid}: parameter {f} has no help text"
    assert HOST.method("pruning.zerotprune").requires("attentions")


# -- random -----------------------------------------------------------------------------------------
def test_random_is_seeded_exact_and_uniform():
    st = _state(np.random.default_rng(0).normal(size=(64, 8)), grid=(8, 8))
    m = RandomPrune()
    a = m.reduce(st, _params(RandomPrune, keep=0.25, seed=3)).keep
    b = m.reduce(st, _params(RandomPrune, keep=0.25, seed=3)).keep
    c = m.reduce(st, _params(RandomPrune, keep=0.25, seed=4)).keep
    assert a.size == 16 and np.unique(a).size == 16 and (np.diff(a) > 0).all()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert m.reduce(st, _params(RandomPrune, keep=0.3)).keep.size == math.ceil(0.3 * 64)
    counts = np.zeros(64)
    seeds = 3000
    for s in range(seeds):
        counts[random_keep(64, 16, s)] += 1
    freq = counts / seeds
    assert np.abs(freq - 0.25).max() < 0.05  # ~5 standard deviations
    assert abs(freq.mean() - 0.25) < 1e-12


# -- uniform spatial sampling -----------------------------------------------------------------------
def test_spatial_sampling_is_exact_and_strided():
    pos = _grid_positions(8, 8)
    keep = spatial_keep(pos, (8, 8), 16)
    rows, cols = np.divmod(keep, 8)
    assert set(rows) == {1, 3, 5, 7} and set(cols) == {1, 3, 5, 7}
    for grid in ((8, 8), (6, 10), (7, 7), (1, 9)):
        n = grid[0] * grid[1]
        p = _grid_positions(*grid)
        for k in range(1, n + 1):
            for pattern in ("grid", "raster"):
                kept = spatial_keep(p, grid, k, pattern)
                assert kept.size == k and np.unique(kept).size == k and kept.min() >= 0 and kept.max() < n
    # raster is HiRED's arange(0, n, n // k)
    np.testing.assert_array_equal(spatial_keep(pos, (8, 8), 16, "raster"), np.arange(0, 64, 4))
    st = _state(np.zeros((64, 3)), grid=(8, 8))
    assert SpatialPrune().reduce(st, _params(SpatialPrune, keep=0.5)).keep.size == 32


# -- radial -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["l1", "l2", "linf"])
def test_radial_exact_count_closest_to_centre_and_symmetric(metric):
    for grid in ((8, 8), (7, 7), (6, 10)):
        pos = _grid_positions(*grid)
        n = pos.shape[0]
        d = radial_distances(pos, grid, metric)
        for k in range(1, n + 1):
            kept = radial_keep(pos, grid, k, metric)
            assert kept.size == k and np.unique(kept).size == k
            mask = np.zeros(n, bool)
            mask[kept] = True
            if k < n:
                assert d[mask].max() <= d[~mask].min()
            # symmetric under 180° rotation whenever the parity allows it
            centre_token = grid[0] % 2 == 1 and grid[1] % 2 == 1
            if (k % 2 == 0) != centre_token:
                np.testing.assert_array_equal(mask, _rot180(mask, grid), err_msg=f"{grid} k={k}")
            np.testing.assert_array_equal(radial_keep(pos, grid, k, metric), kept)  # deterministic
            # the official threshold rule: symmetric always, count closest to the target
            thr = radial_keep(pos, grid, k, metric, count="threshold")
            tmask = np.zeros(n, bool)
            tmask[thr] = True
            np.testing.assert_array_equal(tmask, _rot180(tmask, grid))
            best = min(abs(int((d <= t).sum()) - k) for t in np.unique(d))
            assert abs(thr.size - k) == best


def test_radial_plugin_scores_and_count():
    st = _state(np.zeros((64, 3)), grid=(8, 8))
    step = RadialPrune().reduce(st, _params(RadialPrune, keep=0.5, metric="linf"))
    assert step.keep.size == 32
    assert step.scores.argmax() in (27, 28, 35, 36)  # the four centre tokens


# -- pooling ----------------------------------------------------------------------------------------
def test_pool_windows_counts_and_mean():
    assert [pool_stride(k) for k in (1.0, 0.5, 0.25, 0.11, 0.0625)] == [1, 1, 2, 3, 4]
    assert pool_stride(0.5, 3) == 3
    rng = np.random.default_rng(2)
    st = _state(rng.normal(size=(64, 5)), grid=(8, 8))
    step = Pool().reduce(st, _params(Pool, keep=0.25))
    assert step.merge is not None and step.n_out(64) == 16
    g = step.merge.reshape(8, 8)
    for wr in range(4):
        for wc in range(4):
            assert np.unique(g[2 * wr:2 * wr + 2, 2 * wc:2 * wc + 2]).size == 1
    x, sizes, assign, pos = apply_step(st, step)
    assert (sizes[1:] == 4).all()
    # preserves the global token mean (divisible grid: every window has s² tokens)
    np.testing.assert_allclose(x[1:].mean(0), st.x[1:].mean(0), atol=1e-12)
    # a merged token is its window's mean, at the window's centre
    np.testing.assert_allclose(x[1], st.x[1:][[0, 1, 8, 9]].mean(0))
    np.testing.assert_allclose(pos[0], [0.5, 0.5])
    # not divisible: ceil(h/s)·ceil(w/s) windows, edge windows smaller
    for grid, s in (((7, 7), 2), ((6, 10), 4), ((8, 8), 3)):
        groups = pool_groups(_grid_positions(*grid), s)
        assert groups.max() + 1 == math.ceil(grid[0] / s) * math.ceil(grid[1] / s)
        assert set(np.unique(groups)) == set(range(groups.max() + 1))
    # keep 1 (and 0.5): s = 1, every token its own group
    np.testing.assert_array_equal(Pool().reduce(st, _params(Pool, keep=0.5)).merge, np.arange(64))


# -- DivPrune ---------------------------------------------------------------------------------------
def _official_divprune(v, ratio):
    """Straightforward re-implementation of the official loop (llava_arch.py::DivPrune)."""
    n = v.shape[0]
    k = int(round(ratio * n))
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    dist = 1.0 - u @ u.T
    s = np.empty(k, dtype=np.int64)
    for i in range(k):
        if i == 0:
            scores = np.sort(dist, axis=0)[1]  # topk(2, dim=0, largest=False).values[1]
        else:
            scores = dist[s[:i]].min(axis=0)
        s[i] = int(np.argmax(scores))
    return s


def test_divprune_matches_the_official_loop():
    rng = np.random.default_rng(11)
    for trial in range(12):
        n = int(rng.integers(5, 60))
        d = int(rng.integers(2, 16))
        v = rng.normal(size=(n, d)) + rng.normal(size=d) * rng.random()
        for ratio in (0.098, 0.25, 0.5, 0.7):
            official = _official_divprune(v, ratio)
            if official.size == 0:
                continue
            order, gains, _ = divprune_select(v, official.size)
            np.testing.assert_array_equal(order, official)
            step = DivPrune().reduce(_state(v), _params(DivPrune, keep=ratio))
            np.testing.assert_array_equal(step.keep, np.sort(official))


def test_divprune_invariants():
    rng = np.random.default_rng(5)
    v = rng.normal(size=(40, 12))
    k = 12
    order, gains, dist = divprune_select(v, k)
    assert order.size == k and np.unique(order).size == k
    # greedy monotonicity (i >= 1)
    assert (np.diff(gains[1:]) <= 1e-12).all()
    assert (dist[order] == 0).all() and dist.max() <= gains[-1] + 1e-12
    # permutation equivariance
    perm = rng.permutation(40)
    order_p, _, _ = divprune_select(v[perm], k)
    assert set(perm[order_p]) == set(order)
    # scale invariance (positive per-token scalars)
    order_s, _, _ = divprune_select(v * rng.uniform(0.1, 10.0, size=(40, 1)), k)
    np.testing.assert_array_equal(order_s, order)
    # D is the cosine distance, symmetric, zero diagonal
    dm = cosine_distance(v)
    np.testing.assert_allclose(dm, dm.T)
    assert (np.diag(dm) == 0).all() and (dm >= 0).all()


def test_divprune_never_picks_duplicates_while_distinct_tokens_remain():
    rng = np.random.default_rng(8)
    base = rng.normal(size=(10, 6))
    copies = base[[0, 0, 3, 7, 7, 7]] * rng.uniform(0.5, 2.0, size=(6, 1))  # exact (scaled) duplicates
    v = np.concatenate([base, copies])[rng.permutation(16)]
    for k in range(1, 11):
        order, _, _ = divprune_select(v, k)
        dm = cosine_distance(v)[np.ix_(order, order)]
        off = dm[~np.eye(k, dtype=bool)]
        assert (off > 1e-9).all(), f"k={k}: a duplicate was picked"
    # with more than the distinct directions, k distinct indices still come back
    order, _, _ = divprune_select(v, 14)
    assert np.unique(order).size == 14


# -- DART -------------------------------------------------------------------------------------------
def test_dart_counts():
    assert dart_counts(64, 0.5, 4, "closest") == (4, [7] * 4)
    assert dart_counts(64, 0.5, 4, "official") == (4, [8] * 4)
    p, t = dart_counts(64, 0.3, 4, "exact")  # k = 19 = 4 + 15
    assert p == 4 and sum(t) == 15 and t == [4, 4, 4, 3]
    # the official LLaVA-1.5 setting (576 tokens, "128" kept): P_img + (P_img + P_txt)·16 with P_txt = 4
    assert math.ceil((576 * (1 - 0.778)) // 8) == 15 and 128 // 8 == 16


@pytest.mark.parametrize("mode", ["closest", "exact", "official"])
def test_dart_keeps_pivots_and_the_stated_count(mode):
    rng = np.random.default_rng(3)
    for trial in range(6):
        n = int(rng.integers(20, 80))
        keys = rng.normal(size=(3, n + 1, 5))
        st = _state(rng.normal(size=(n, 16)), keys=keys, seed=trial)
        for keep in (0.1, 0.3, 0.5, 0.8):
            params = _params(Dart, keep=keep, pivots=4, count=mode)
            step = Dart().reduce(st, params)
            p, topk = dart_counts(n, keep, 4, mode)
            assert p == min(4, int(round(keep * n))) or mode == "official"  # a budget below P keeps k pivots
            pivots = np.argsort(-key_l1(keys[:, 1:]), kind="stable")[:p]
            assert set(pivots) <= set(step.keep)
            expected = min(n, p + sum(topk))
            assert step.keep.size == expected
            if mode == "exact":
                assert expected == int(round(keep * n))
            assert (np.diff(step.keep) > 0).all() and step.keep.max() < n


def test_dart_single_pivot_duplication():
    rng = np.random.default_rng(4)
    n = 30
    feats = rng.normal(size=(n, 10))
    feats[[5, 17, 22]] = feats[9] * np.array([[1.0], [2.0], [0.5]])  # exact copies of the pivot
    norm = rng.random(n)
    norm[9] = 10.0  # token 9 is the pivot
    u = layer_norm(feats)
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    cos = u @ u[9]
    valid = np.setdiff1d(np.arange(n), [9])
    for t in (1, 5, 12, 25, 29):
        keep, pivots = dart_select(norm, layer_norm(feats), 1, t)
        assert list(pivots) == [9]
        expected = valid[np.argsort(cos[valid], kind="stable")[:t]]
        np.testing.assert_array_equal(keep, np.sort(np.concatenate([[9], expected])))
        copies_in = np.isin([5, 17, 22], keep)
        # copies of the pivot (cos = 1) are selected last
        assert not copies_in.any() if t <= n - 4 else copies_in.sum() == t - (n - 4)


# -- Zero-TPrune ------------------------------------------------------------------------------------
def _row_stochastic(rng, h, n):
    a = rng.random((h, n, n)) ** 3
    return a / a.sum(-1, keepdims=True)


def test_weighted_pagerank_properties():
    rng = np.random.default_rng(0)
    a = _row_stochastic(rng, 4, 12)
    for it in (1, 3, 30):
        s = weighted_pagerank(a, it)
        assert s.shape == (4, 12) and (s >= 0).all()
        np.testing.assert_allclose(s.sum(-1), 1.0)
        # the ranking (indeed the normalised vector) of (Aᵀ)^t · 1
        for h in range(4):
            ref = np.ones(12)
            for _ in range(it):
                ref = a[h].T @ ref
            np.testing.assert_allclose(s[h], ref / ref.sum(), rtol=1e-10)
    # uniform attention: all scores equal
    np.testing.assert_allclose(weighted_pagerank(np.full((2, 9, 9), 1 / 9), 10), 1 / 9)
    # star graph: everybody attends to token 4, which gets the highest score
    star = np.full((9, 9), 0.02)
    star[:, 4] = 1.0
    star /= star.sum(1, keepdims=True)
    s = weighted_pagerank(star, 5)
    assert s.argmax() == 4 and (s[4] > np.delete(s, 4)).all()


def test_zerotprune_budget_and_stages():
    for n in (9, 16, 64):
        for k in range(1, n + 1):
            r_i, r_s = split_budget(n, k, 0.5)
            assert r_i + r_s == n - k and 0 <= r_s <= (n - r_i) // 2 and r_i >= 0
    # S-stage: a less important token duplicating an important one is pruned
    rng = np.random.default_rng(1)
    n = 8
    q = np.concatenate([[0.2], np.linspace(0.2, 0.05, n)])  # [CLS], then patches 0..7 by decreasing importance
    q /= q.sum()
    att = np.broadcast_to(q, (2, n + 1, n + 1)).copy()  # PageRank of identical rows = the row itself
    keys = rng.normal(size=(2, n + 1, 6))
    keys[:, 1 + 5] = keys[:, 1 + 1] * 3.0  # patch 5 (group B) = patch 1 (group A), up to scale
    st = _state(rng.normal(size=(n, 6)), keys=keys, attention=att)
    step = ZeroTPrune().reduce(st, _params(ZeroTPrune, keep=0.75, importance_share=0.5))
    # r = 2: the I-stage drops the least important patch 7, the S-stage the duplicate 5
    np.testing.assert_array_equal(step.keep, [0, 1, 2, 3, 4, 6])
    np.testing.assert_allclose(step.scores, q[1:] / q.sum())
    dropped = s_stage_drop(np.arange(7), keys[:, 1:].mean(0), 1)
    assert list(dropped) == [5]


def test_zerotprune_exact_count_on_random_states():
    rng = np.random.default_rng(6)
    n = 64
    for keep in (0.1, 0.25, 0.5, 0.9):
        for share in (0.0, 0.5, 1.0):
            st = _state(rng.normal(size=(n, 8)), keys=rng.normal(size=(4, n + 1, 4)),
                        attention=_row_stochastic(rng, 4, n + 1), grid=(8, 8))
            step = ZeroTPrune().reduce(st, _params(ZeroTPrune, keep=keep, importance_share=share))
            assert step.keep.size == math.ceil(keep * n) and np.unique(step.keep).size == step.keep.size


# -- executed in the tiny CLIP through the host -----------------------------------------------------
@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(21)
    return load_image(png_bytes(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)))


@pytest.fixture(scope="module")
def full_trace(tiny_clip, image):
    return run_sync(tiny_clip.trace(image, CaptureSpec.everything(3)))


def _expected_kept(mid, n, keep):
    if mid == "merging.pool":
        s = pool_stride(keep)
        return math.ceil(8 / s) ** 2
    if mid == "pruning.divprune":
        return int(round(keep * n))
    if mid == "pruning.dart":
        p, t = dart_counts(n, keep, 4, "closest")
        return min(n, p + sum(t))
    return math.ceil(keep * n)


@pytest.mark.parametrize("method_id", METHOD_IDS)
def test_keep_one_is_the_unreduced_model(method_id, tiny_clip, full_trace):
    params = HOST.make_params(method_id, {"keep": 1.0})
    sel = run_sync(HOST.run(method_id, full_trace, params, target=Target(), backend=tiny_clip))
    np.testing.assert_allclose(sel.meta["embedding"], full_trace.image_embedding, atol=1e-5)
    assert sel.meta["kept_tokens"] == 64 and sel.kept.all()


@pytest.mark.parametrize("method_id", METHOD_IDS)
@pytest.mark.parametrize("layer", [0, 4])
def test_half_keep_leaves_the_expected_tokens(method_id, layer, tiny_clip, image):
    method = HOST.load(method_id)
    params = HOST.make_params(method_id, {"keep": 0.5, "layer": layer})
    # the method's own capture declaration is enough
    trace = run_sync(tiny_clip.trace(image, method.capture(params, tiny_clip.info, Target())))
    sel = run_sync(HOST.run(method_id, trace, params, target=Target(), backend=tiny_clip))
    k = _expected_kept(method_id, 64, 0.5)
    assert sel.meta["kept_tokens"] == k
    assert sel.meta["final_tokens"] == k + 1  # [CLS] is never dropped
    block = min(layer, 2)
    expected_blocks = [65] * (block + 1) + [k + 1] * (2 - block)
    assert sel.meta["tokens_per_block"] == expected_blocks
    assert sel.kept.shape == (64,)
    if method_id == "merging.pool":
        assert sel.kept.all() and np.unique(sel.groups).size == k
    else:
        assert int(sel.kept.sum()) == k
    # the cached-trace preview gives the same first-stage decision as the executed run
    preview = method.select(trace, params, tiny_clip)
    np.testing.assert_array_equal(preview.kept, sel.kept)
    if method_id == "merging.pool":
        np.testing.assert_array_equal(preview.groups, sel.groups)


def test_pool_quarter_and_dart_official_executed(tiny_clip, full_trace):
    sel = run_sync(HOST.run("merging.pool", full_trace, HOST.make_params("merging.pool", {"keep": 0.25}),
                            target=Target(), backend=tiny_clip))
    assert sel.meta["kept_tokens"] == 16 and sel.meta["merging"]
    assert sorted(np.bincount(sel.groups)) == [4] * 16
    sel = run_sync(HOST.run("pruning.dart", full_trace,
                            HOST.make_params("pruning.dart", {"keep": 0.5, "count": "official"}),
                            target=Target(), backend=tiny_clip))
    assert sel.meta["kept_tokens"] == 4 + 4 * 8
    sel = run_sync(HOST.run("pruning.random", full_trace, HOST.make_params("pruning.random", {"keep": 0.3, "seed": 9}),
                            target=Target(), backend=tiny_clip))
    again = run_sync(HOST.run("pruning.random", full_trace, HOST.make_params("pruning.random", {"keep": 0.3, "seed": 9}),
                              target=Target(), backend=tiny_clip))
    np.testing.assert_array_equal(sel.kept, again.kept)
    np.testing.assert_array_equal(sel.meta["embedding"], again.meta["embedding"])
