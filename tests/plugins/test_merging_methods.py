"""Merging plugins: ToMe, ATC, K-Medoids, DPC-KNN and BAT (catalog A2-A5).

The catalog's invariants on hand-made token states and on the tiny CLIP model, ATC against
scikit-learn, and every method executed through the plugin host. The comparisons with the
authors' official code are golden-file tests: ToMe in ``test_golden.py``, ATC in
``test_golden_atc.py``, K-Medoids and DPC-KNN in ``test_golden_clustering.py``.
"""

import math

import numpy as np
import pytest

from explorer.core.image_io import load_image
from explorer.core.jobs import run_sync
from explorer.core.reduction import TokenState, apply_step
from explorer.core.results import TokenSelection
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.api import params_to_strings, parse_params
from explorer.plugin_host.host import PluginHost
from explorer.testing.images import png_bytes
from explorer_plugins.atc.method import ATC, agglomerative_labels, cosine_distances
from explorer_plugins.bat.method import BAT, bat_groups, bat_split
from explorer_plugins.token_clustering.method import DPCKNN, KMedoids, dpc_knn, k_medoids, relabel
from explorer_plugins.tome.method import ToMe, bipartite_soft_matching, keep_schedule, parse_r

HOST = PluginHost()
MERGING = ("merging.tome", "merging.atc", "merging.kmedoids", "merging.dpcknn", "merging.bat")
# K-Medoids passes the medoid tokens on by default (the study's code); output="merge" merges its clusters
AS_MERGING = {"merging.kmedoids": {"output": "merge"}}


# -- helpers ------------------------------------------------------------------------------------------
def make_state(keys, x=None, sizes=None, attention=None, n_prefix=1, stage=0, n_stages=1, n_orig=None):
    """A hand-made TokenState: ``keys (H, N, dh)``; ``x`` defaults to random features."""
    H, N, _ = keys.shape
    rng = np.random.default_rng(N)
    n = N - n_prefix
    n_orig = n if n_orig is None else n_orig
    return TokenState(
        layer=0, stage=stage, x=rng.normal(size=(N, 8)) if x is None else x, keys=keys, attention=attention,
        sizes=np.ones(N) if sizes is None else sizes, n_prefix=n_prefix,
        assign=np.arange(n_orig) % max(n, 1), positions=np.zeros((n, 2)), grid=(1, n_orig), n_stages=n_stages)


def members(groups):
    """Member lists (sorted patch indices) in group order."""
    return [sorted(np.flatnonzero(groups == g).tolist()) for g in range(int(groups.max()) + 1)]


def partition(labels):
    return {frozenset(np.flatnonzero(labels == v).tolist()) for v in np.unique(labels)}


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(11)
    return load_image(png_bytes(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)))


@pytest.fixture(scope="module")
def trace(tiny_clip, image):
    return run_sync(tiny_clip.trace(image, CaptureSpec.everything(3)))


def host_run(tiny_clip, trace, method_id, **values) -> TokenSelection:
    params = HOST.make_params(method_id, values)
    return run_sync(HOST.run(method_id, trace, params, target=Target(), backend=tiny_clip))


def direct_run(tiny_clip, trace, method_id, **values):
    method = HOST.load(method_id)
    params = HOST.make_params(method_id, values)
    stages = method.stages(params, trace.model)
    return tiny_clip.run_reduced(trace, stages, lambda st: method.reduce(st, params),
                                 proportional_attention=method.uses_proportional_attention(params))


# -- all methods ------------------------------------------------------------------------------------
def test_methods_are_registered_with_citation_and_help():
    for mid in MERGING:
        info = HOST.method(mid)
        assert info.family == "merging"
        c = info.contribution
        assert c.citation and c.repository.startswith("https://") and c.description and c.adaptation
        assert "clip" in c.backends
        model = HOST.params_model(mid)
        p = model()
        assert parse_params(model, params_to_strings(p)) == p
        for name in p.model_dump():
            assert model.model_fields[name].description, f"{mid}: {name} has no help text"
        assert HOST.load(mid).is_merging(p) == (mid != "merging.kmedoids")
        assert HOST.load(mid).is_merging(HOST.make_params(mid, AS_MERGING.get(mid, {})))


@pytest.mark.parametrize("method_id", MERGING)
def test_keep_everything_gives_the_unreduced_embedding(method_id, tiny_clip, trace):
    values = {"keep": 1.0, **AS_MERGING.get(method_id, {})}
    if method_id == "merging.tome":
        values["r"] = 0
    sel = host_run(tiny_clip, trace, method_id, **values)
    np.testing.assert_allclose(sel.meta["embedding"], trace.image_embedding, atol=1e-5)
    assert sel.meta["final_tokens"] == 65 and sel.meta["merging"]
    assert (sel.groups == np.arange(64)).all()


@pytest.mark.parametrize("method_id", MERGING)
def test_keep_half_gives_the_expected_number_of_tokens(method_id, tiny_clip, trace):
    extra = AS_MERGING.get(method_id, {})
    default = host_run(tiny_clip, trace, method_id, keep=0.5, **extra)  # ToMe from block 0, the others at the last block
    assert default.meta["final_tokens"] == 1 + 32
    sel = host_run(tiny_clip, trace, method_id, keep=0.5, layer=1, **extra)
    assert sel.meta["final_tokens"] == 1 + 32
    assert sel.meta["kept_tokens"] == 32
    assert sel.groups.shape == (64,) and (sel.groups >= 0).all()
    assert np.unique(sel.groups).size == 32
    assert not np.allclose(sel.meta["embedding"], trace.image_embedding, atol=1e-5)
    # deterministic, and the first-stage preview from the cached trace agrees with the executed run
    again = host_run(tiny_clip, trace, method_id, keep=0.5, layer=1, **extra)
    np.testing.assert_array_equal(sel.groups, again.groups)
    np.testing.assert_array_equal(sel.meta["embedding"], again.meta["embedding"])
    method = HOST.load(method_id)
    params = HOST.make_params(method_id, {"keep": 0.5, "layer": 1, **extra})
    preview = method.select(trace, params, tiny_clip)
    if len(method.stages(params, trace.model)) == 1:
        np.testing.assert_array_equal(preview.groups, sel.groups)


@pytest.mark.parametrize("method_id", MERGING)
def test_mass_and_sources_are_conserved_in_the_executed_run(method_id, tiny_clip, trace):
    run = direct_run(tiny_clip, trace, method_id, keep=0.4, **AS_MERGING.get(method_id, {}))
    assert run.sizes.sum() == pytest.approx(65)  # sum of sizes is the original N
    assert run.sizes[0] == 1  # [CLS] stays first with size 1
    assert (run.assign >= 0).all()  # every original token has exactly one current token
    np.testing.assert_allclose(np.bincount(run.assign, minlength=run.sizes.size - 1), run.sizes[1:])


# -- ToMe -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N,r", [(2, 1), (3, 5), (10, 3), (16, 20)])
def test_tome_protects_cls_and_caps_r_on_small_sequences(N, r):
    """Edge cases the golden file (N = 49, 64) does not reach: [CLS] identical to b[0] (the best
    source if it were not protected) stays first and alone, and r is capped at (N - 1) // 2."""
    rng = np.random.default_rng(N * 100 + r)
    keys = rng.normal(size=(4, N, 6))
    keys[:, 0] = keys[:, 1]
    step = ToMe().reduce(make_state(keys), ToMe.Params(r=r))
    n_out = N - 1 - min(r, (N - 1) // 2)
    assert step.n_out(N - 1) == n_out and np.unique(step.merge).size == n_out
    x, s, _, _ = apply_step(make_state(keys), step)
    assert x.shape[0] == 1 + n_out and s[0] == 1


def test_tome_two_prefix_tokens_act_like_no_prefix_on_the_patches():
    """ToMe's rule for [CLS] + distillation token (a[0] never a source, b[0] never a destination):
    with two prefix tokens the patch tokens keep their a/b roles, so the groups equal those of
    the patch tokens alone without a prefix (the official ``class_token`` case is the golden file)."""
    rng = np.random.default_rng(3)
    for N, r in ((12, 4), (13, 6), (21, 10), (9, 0)):
        metric = rng.normal(size=(N, 5))
        metric[2] = metric[1]  # a[1] would merge into the protected token without the rule
        metric[0] = metric[3]  # [CLS] (a[0]) identical to b[1]: the best source without the rule
        g2 = np.asarray(bipartite_soft_matching(metric, r, n_prefix=2))
        g0 = np.asarray(bipartite_soft_matching(metric[2:], r, n_prefix=0))
        np.testing.assert_array_equal(g2, g0)
        assert np.unique(g2).size == N - 2 - min(r, (N - 2) // 2)


def test_tome_token_count_drops_by_r_per_block(tiny_clip, trace):
    run = direct_run(tiny_clip, trace, "merging.tome", r=10)
    assert run.tokens_per_block == (65, 55, 45) and run.sizes.size == 35
    run = direct_run(tiny_clip, trace, "merging.tome", r=40)  # capped at (N - 1) // 2 per block
    assert run.tokens_per_block == (65, 33, 17) and run.sizes.size == 9
    run = direct_run(tiny_clip, trace, "merging.tome", r=6, layer=1)
    assert run.tokens_per_block == (65, 65, 59) and run.sizes.size == 53
    run = direct_run(tiny_clip, trace, "merging.tome", r=10, inflection=-1.0)  # (r, -1): 20, 10, 0
    assert run.tokens_per_block == (65, 45, 35) and run.sizes.size == 35


def test_tome_r_zero_and_keep_one_equals_the_unpatched_model(tiny_clip, trace):
    for prop in (True, False):
        sel = host_run(tiny_clip, trace, "merging.tome", r=0, keep=1.0, prop_attn=prop)
        np.testing.assert_allclose(sel.meta["embedding"], trace.image_embedding, atol=1e-5)
        assert sel.meta["tokens_per_block"] == [65, 65, 65]


def test_tome_proportional_attention_changes_the_output(tiny_clip, trace):
    on = host_run(tiny_clip, trace, "merging.tome", r=12, prop_attn=True)
    off = host_run(tiny_clip, trace, "merging.tome", r=12, prop_attn=False)
    np.testing.assert_array_equal(on.meta["tokens_per_block"], off.meta["tokens_per_block"])
    assert not np.allclose(on.meta["embedding"], off.meta["embedding"], atol=1e-6)


def test_parse_r_and_keep_schedule():
    assert parse_r(3, 10) == [10, 10, 10]
    assert parse_r(3, 10, -1.0) == [20, 10, 0]
    assert parse_r(3, 10, 1.0) == [0, 10, 20]
    assert parse_r(12, 8, -0.5) == [int(12 + (4 - 12) / 11 * i) for i in range(12)]
    assert parse_r(1, 7) == [7]
    assert keep_schedule(64, 1, 3, 0.5) == [11, 11, 10]
    assert keep_schedule(64, 1, 3, 1.0) == [0, 0, 0]
    assert keep_schedule(64, 1, 1, 0.1) == [32]  # capped at 50% per block
    assert keep_schedule(196, 1, 12, 0.3) == [12] * 6 + [11] * 6  # 196 - int(58.8) = 138 = 6·12 + 6·11


def test_tome_mass_conservation_on_a_state():
    rng = np.random.default_rng(5)
    N = 21
    keys = rng.normal(size=(3, N, 4))
    sizes = rng.integers(1, 5, size=N).astype(float)
    sizes[0] = 1
    state = make_state(keys, sizes=sizes)
    step = ToMe().reduce(state, ToMe.Params(r=7))
    x, s, _, _ = apply_step(state, step)
    assert x.shape[0] == N - 7
    assert s.sum() == pytest.approx(sizes.sum())
    np.testing.assert_allclose((s[:, None] * x).sum(0), (sizes[:, None] * state.x).sum(0), atol=1e-9)
    np.testing.assert_array_equal(x[0], state.x[0])


def _clustered_keys(rng, n_clusters=4, n=40, dh=16, heads=2, noise=0.02):
    centres = rng.normal(size=(n_clusters, dh)) * 3
    labels = rng.integers(0, n_clusters, size=n)
    keys = np.empty((heads, n + 1, dh))
    keys[:, 0] = rng.normal(size=dh)
    keys[:, 1:] = centres[labels] + noise * rng.normal(size=(heads, n, dh))
    return keys, labels


def test_tome_merges_only_within_well_separated_clusters():
    rng = np.random.default_rng(7)
    for trial in range(5):
        keys, labels = _clustered_keys(rng)
        # every cluster needs a b token (odd full index = even patch index) to merge into
        assert all((labels[0::2] == c).any() for c in np.unique(labels[1::2]))
        step = ToMe().reduce(make_state(keys), ToMe.Params(r=20))
        for m in members(step.merge):
            assert np.unique(labels[m]).size == 1


# -- ATC --------------------------------------------------------------------------------------------
def test_atc_gives_exactly_k_clusters_and_conserves_size():
    rng = np.random.default_rng(9)
    N = 31
    keys = rng.normal(size=(3, N, 5))
    sizes = rng.integers(1, 4, size=N).astype(float)
    state = make_state(keys, sizes=sizes)
    for linkage in ("single", "complete", "average"):
        step = ATC().reduce(state, ATC.Params(keep=0.3, linkage=linkage))
        assert step.merge.shape == (30,)  # every token in exactly one cluster
        assert np.unique(step.merge).size == 9  # int(30 · 0.3)
        x, s, _, _ = apply_step(state, step)
        assert x.shape[0] == 1 + 9  # K (+1 [CLS])
        assert s.sum() == pytest.approx(sizes.sum())
        again = ATC().reduce(state, ATC.Params(keep=0.3, linkage=linkage))
        np.testing.assert_array_equal(step.merge, again.merge)  # deterministic


def test_atc_single_linkage_is_invariant_to_monotone_transforms():
    rng = np.random.default_rng(10)
    D = cosine_distances(rng.normal(size=(40, 6)))
    for K in (2, 7, 20):
        single = agglomerative_labels(D, K, "single")
        np.testing.assert_array_equal(single, agglomerative_labels(D ** 2, K, "single"))
        np.testing.assert_array_equal(single, agglomerative_labels(np.sqrt(D), K, "single"))


@pytest.mark.parametrize("linkage", ["single", "complete", "average"])
def test_atc_agrees_with_scikit_learn(linkage):
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    rng = np.random.default_rng({"single": 1, "complete": 2, "average": 3}[linkage])
    for n, K in ((12, 3), (30, 9), (50, 25), (64, 32)):
        metric = rng.normal(size=(n, 8))
        D = cosine_distances(metric)
        ours = agglomerative_labels(D, K, linkage)
        ref = sklearn_cluster.AgglomerativeClustering(n_clusters=K, metric="precomputed", linkage=linkage).fit(D).labels_
        assert partition(ours) == partition(ref)
        np.testing.assert_array_equal(ours, relabel(ref))


def test_atc_recovers_well_separated_clusters():
    rng = np.random.default_rng(12)
    keys, labels = _clustered_keys(rng, n_clusters=4, n=40)
    for linkage in ("single", "complete", "average"):
        step = ATC().reduce(make_state(keys), ATC.Params(keep=0.1, linkage=linkage))
        assert partition(step.merge) == partition(labels)


def test_atc_stage_counts_follow_the_study_rule(tiny_clip, trace):
    sel = host_run(tiny_clip, trace, "merging.atc", keep=0.5, layers="0,1")
    # K_i = int(64 · ρ^(i+1)), ρ = 0.5^(1/2): 45, then 32
    assert sel.meta["tokens_per_block"] == [65, 46, 33] and sel.meta["final_tokens"] == 33


# -- K-Medoids --------------------------------------------------------------------------------------
@pytest.mark.parametrize("weighting", ["attention", "uniform"])
@pytest.mark.parametrize("update", ["study", "cluster"])
def test_kmedoids_gives_k_clusters_deterministically(weighting, update):
    rng = np.random.default_rng(14)
    N = 41
    keys = rng.normal(size=(2, N, 4))
    att = rng.random((2, N, N))
    att /= att.sum(-1, keepdims=True)
    state = make_state(keys, attention=att)
    params = KMedoids.Params(keep=0.25, weighting=weighting, update=update, seed=3, output="merge")
    step = KMedoids().reduce(state, params)
    assert np.unique(step.merge).size == 10 and step.merge.shape == (40,)
    np.testing.assert_array_equal(step.merge, KMedoids().reduce(state, params).merge)
    X = state.x[1:]
    medoids, assign = k_medoids(X, 10, 3, att.sum((0, 1))[1:] if weighting == "attention" else None, seed=3,
                                update=update)
    np.testing.assert_array_equal(assign, step.merge)
    # the default output passes the medoid tokens on, in cluster order
    kept = KMedoids().reduce(state, params.model_copy(update={"output": "medoids"}))
    np.testing.assert_array_equal(kept.keep, medoids)
    x, s, _, _ = apply_step(state, kept)
    np.testing.assert_array_equal(x[1:], X[medoids])
    assert (s == 1).all()
    assert (assign[medoids] == np.arange(10)).all()  # every medoid in its own cluster
    D = np.linalg.norm(X[:, None] - X[None], axis=-1)
    np.testing.assert_allclose(D[np.arange(40), medoids[assign]], D[:, medoids].min(1))  # nearest medoid


def test_kmedoids_default_passes_the_medoids_on(tiny_clip, trace):
    """The study's K-Medoids: the K medoid tokens go on (size 1 each), the other tokens are dropped;
    the preview from the cached trace keeps the same tokens as the executed run."""
    sel = host_run(tiny_clip, trace, "merging.kmedoids", keep=0.5, layer=1)
    assert not sel.meta["merging"] and sel.groups is None
    assert sel.meta["final_tokens"] == 1 + 32 and sel.meta["kept_tokens"] == 32 and sel.kept.sum() == 32
    run = direct_run(tiny_clip, trace, "merging.kmedoids", keep=0.5, layer=1)
    assert (run.sizes == 1).all() and (run.assign >= 0).sum() == 32
    method = HOST.load("merging.kmedoids")
    preview = method.select(trace, HOST.make_params("merging.kmedoids", {"keep": 0.5, "layer": 1}), tiny_clip)
    np.testing.assert_array_equal(preview.kept, sel.kept)
    merged = host_run(tiny_clip, trace, "merging.kmedoids", keep=0.5, layer=1, output="merge")
    assert not np.allclose(merged.meta["embedding"], sel.meta["embedding"], atol=1e-6)


def test_kmedoids_on_keys_recovers_separated_clusters():
    rng = np.random.default_rng(15)
    keys, labels = _clustered_keys(rng, n_clusters=4, n=40)
    att = np.ones((2, 41, 41)) / 41
    # start medoids in distinct clusters: the most attended token of every cluster
    for c in range(4):
        att[:, :, 1 + np.flatnonzero(labels == c)[0]] += 1.0 + c
    step = KMedoids().reduce(make_state(keys, attention=att), KMedoids.Params(keep=0.1, metric="keys", output="merge"))
    assert partition(step.merge) == partition(labels)


# -- DPC-KNN ----------------------------------------------------------------------------------------
def test_dpcknn_centres_are_the_top_density_times_distance_tokens():
    rng = np.random.default_rng(16)
    for n, K, k in ((30, 6, 5), (50, 12, 3), (12, 12, 5), (9, 2, 20)):
        X = rng.normal(size=(n, 7))
        labels, centers, score = dpc_knn(X, K, k)
        D = np.array([[np.linalg.norm(X[i] - X[j]) / np.sqrt(7) for j in range(n)] for i in range(n)])
        density = np.array([math.exp(-np.mean(np.sort(D[i])[:min(k, n)] ** 2)) for i in range(n)])
        delta = np.array([min([D[i, j] for j in range(n) if density[j] > density[i]], default=D.max())
                          for i in range(n)])
        np.testing.assert_allclose(score, density * delta)
        assert set(centers.tolist()) == set(np.argsort(-(density * delta))[:K].tolist())
        assert np.unique(labels).size == K and (labels[centers] == np.arange(K)).all()
        np.testing.assert_allclose(D[np.arange(n), centers[labels]], D[:, centers].min(1))
        again = dpc_knn(X, K, k)
        np.testing.assert_array_equal(again[0], labels)


def test_dpcknn_plugin_gives_k_clusters_and_scores():
    rng = np.random.default_rng(17)
    state = make_state(rng.normal(size=(2, 41, 4)))
    step = DPCKNN().reduce(state, DPCKNN.Params(keep=0.3, k=4))
    assert np.unique(step.merge).size == 12
    _, centers, score = dpc_knn(state.x[1:], 12, 4)
    np.testing.assert_allclose(step.scores, score)
    assert set(np.argsort(-step.scores)[:12].tolist()) == set(centers.tolist())
    keys, labels = _clustered_keys(rng, n_clusters=4, n=40, noise=0.05)
    step = DPCKNN().reduce(make_state(keys), DPCKNN.Params(keep=0.1, metric="keys"))
    assert partition(step.merge) == partition(labels)


# -- BAT --------------------------------------------------------------------------------------------
def test_bat_budget_and_structure():
    rng = np.random.default_rng(18)
    n = 60
    scores = rng.random(n)
    keys, feats = rng.normal(size=(n, 5)), rng.normal(size=(n, 7))
    for K, cs, ms in ((30, 0.1, 0.1), (20, 0.25, 0.2), (59, 0.1, 0.1), (2, 0.5, 0.5), (45, 0.0, 0.0)):
        g = bat_groups(scores, keys, feats, K, cs, ms, k=5)
        assert np.unique(g).size == K  # exactly the budget
        C, Ka, r = bat_split(n, K, cs, ms)
        assert Ka + C == K and C >= 1
        order = np.argsort(-scores, kind="stable")
        attentive, inattentive = order[:Ka + r], order[Ka + r:]
        assert (g[attentive] < Ka).all() and (g[inattentive] >= Ka).all()
        assert np.unique(g[inattentive]).size == C
        # the attentive part is ToMe's matching on the attentive tokens in sequence order
        att = np.sort(attentive)
        np.testing.assert_array_equal(g[att], bipartite_soft_matching(keys[att], r, n_prefix=0))
        # the inattentive part is DPC-KNN on their features
        ina = np.sort(inattentive)
        np.testing.assert_array_equal(g[ina] - Ka, dpc_knn(feats[ina], C, 5)[0])
    assert (bat_groups(scores, keys, feats, n) == np.arange(n)).all()
    assert (bat_groups(scores, keys, feats, 1) == 0).all()


def test_bat_keeps_cls_and_merges_by_size_weighted_mean(tiny_clip, trace):
    import torch

    run = direct_run(tiny_clip, trace, "merging.bat", keep=0.5)
    assert run.sizes.size == 1 + 32 and run.sizes[0] == 1
    state = tiny_clip.token_state(trace, 2)
    state.sizes = np.random.default_rng(0).integers(1, 4, size=65).astype(np.float32)
    state.sizes[0] = 1
    step = BAT().reduce(state, BAT.Params(keep=0.5))
    assert np.unique(step.merge).size == 32
    x = torch.as_tensor(state.x, dtype=torch.float32)[None]
    xt, st, _, _ = tiny_clip._apply_step(x, torch.as_tensor(state.sizes), state, step)
    np.testing.assert_allclose(xt[0, 0].numpy(), state.x[0])  # [CLS] untouched, first
    s = state.sizes[1:].astype(np.float64)
    for g in range(32):
        m = step.merge == g
        expected = (s[m, None] * state.x[1:][m]).sum(0) / s[m].sum()
        np.testing.assert_allclose(xt[0, 1 + g].numpy(), expected, atol=1e-5)
        assert st[1 + g].item() == pytest.approx(s[m].sum())
