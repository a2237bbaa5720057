"""Zero-TPrune's weighted PageRank converges, and says how.

The plain power iteration ``s ← Aᵀs`` (renormalised) runs until the L1 change of every head's
scores is at most ``tol`` (cap ``max_iterations``); a head that does not get there (a periodic
attention graph makes the iterates oscillate, a nearly periodic or nearly reducible one makes them
crawl) is recomputed with damped PageRank ``s ← d·Aᵀs + (1 − d)/N``, ``d = 0.85``, a contraction
that converges on every graph. Checked here:

* a constructed periodic graph (two token sets that attend only to each other): the undamped
  iteration oscillates forever; the method's scores converge, to the fixed point of the damped map
  (within 1e-12), and the result reports the damping, the iterations and the residual;
* a well-behaved (strictly positive) attention matrix: the scores are the stationary distribution,
  the left eigenvector of ``A`` for the eigenvalue 1 (within 1e-6), without damping; the same on
  torch tensors;
* the demo CLIP (the shipped ``demo`` model) on ``photo-cat.png``, block 2: head 3 has an eigenvalue
  −0.99998 (nearly period 2), where 30 plain steps and 2,000 plain steps disagree; the executed run
  and the preview report the damped head, a residual below the tolerance and a warning.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from explorer.core.jobs import run_sync
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.host import PluginHost
from explorer_plugins.zerotprune.method import DAMPING, ZeroTPrune, weighted_pagerank

HOST = PluginHost()
ROOT = Path(__file__).resolve().parents[2]


def _periodic(n_a=2, n_b=3, seed=0):
    """Tokens 0..n_a-1 attend only to n_a..n_a+n_b-1 and back: a period-2 attention graph."""
    rng = np.random.default_rng(seed)
    n = n_a + n_b
    a = np.zeros((n, n))
    a[:n_a, n_a:] = rng.random((n_a, n_b)) + 0.1
    a[n_a:, :n_a] = rng.random((n_b, n_a)) + 0.1
    return a / a.sum(1, keepdims=True)


def _positive(n, seed):
    rng = np.random.default_rng(seed)
    a = rng.random((n, n)) ** 3 + 1e-3
    return a / a.sum(1, keepdims=True)


def _stationary(a):
    """The left eigenvector of a row-stochastic ``a`` for the eigenvalue 1, summing to 1."""
    w, v = np.linalg.eig(a.T)
    x = np.real(v[:, np.argmin(np.abs(w - 1))])
    return x / x.sum()


def test_periodic_graph_oscillates_undamped_and_converges_damped():
    p = _periodic()
    # the undamped iteration oscillates between two vectors: it never converges
    s200, s201, s202 = (weighted_pagerank(p, t) for t in (200, 201, 202))
    assert np.abs(s201 - s200).sum() > 0.1
    np.testing.assert_allclose(s202, s200, atol=1e-12)
    _, fixed = weighted_pagerank(p, 200, return_info=True)
    assert not fixed.converged and not fixed.damped and fixed.residual > 0.1

    s, info = weighted_pagerank(p, return_info=True)
    assert info.damped and info.damped_heads == (0,) and info.damping == DAMPING == 0.85
    assert info.iterations == 1000 and info.residual_plain > 0.1  # the cap, still oscillating
    assert info.converged and info.residual <= info.tol == 1e-8
    assert 0 < info.damped_iterations <= 150
    # the fixed point of the damped map
    np.testing.assert_allclose(s, DAMPING * (s @ p) + (1 - DAMPING) / p.shape[0], atol=1e-12)
    assert s.sum() == pytest.approx(1.0, abs=1e-12) and (s > 0).all()


def test_only_the_heads_that_do_not_converge_are_damped():
    a = np.stack([_positive(5, 1), _periodic(), _positive(5, 2)])
    s, info = weighted_pagerank(a, return_info=True, max_iterations=300)
    assert info.damped_heads == (1,) and info.converged and info.iterations == 300
    for h in (0, 2):
        np.testing.assert_allclose(s[h], _stationary(a[h]), atol=1e-6)
    assert info.as_dict()["damped_heads"] == [1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_well_behaved_matrix_gives_the_stationary_distribution(seed):
    a = np.stack([_positive(50, 10 * seed + h) for h in range(4)])
    s, info = weighted_pagerank(a, return_info=True)
    assert not info.damped and info.converged and info.residual <= 1e-8 and info.iterations < 1000
    for h in range(4):
        np.testing.assert_allclose(s[h], _stationary(a[h]), atol=1e-6, rtol=0)
    # the same on torch tensors (the device path)
    st, tinfo = weighted_pagerank(torch.from_numpy(a), return_info=True)
    assert isinstance(st, torch.Tensor) and tinfo.iterations == info.iterations
    np.testing.assert_allclose(st.numpy(), s, atol=1e-12)


def test_damped_fallback_on_torch_tensors():
    a = np.stack([_positive(5, 3), _periodic()])
    s, info = weighted_pagerank(a, return_info=True, max_iterations=50)
    st, tinfo = weighted_pagerank(torch.from_numpy(a), return_info=True, max_iterations=50)
    assert (tinfo.iterations, tinfo.damped_heads, tinfo.damped_iterations) == (50, (1,), info.damped_iterations)
    assert tinfo.residual == pytest.approx(info.residual, rel=1e-6) and info.damped_heads == (1,)
    np.testing.assert_allclose(st.numpy(), s, atol=1e-12)


def test_parameters_are_checked():
    with pytest.raises(ValueError):
        weighted_pagerank(_periodic(), damping=1.0)
    with pytest.raises(ValueError):
        weighted_pagerank(_periodic(), max_iterations=0)
    p = ZeroTPrune.Params()
    assert (p.max_iterations, p.tol, p.damping) == (1000, 1e-8, 0.85)


# -- the demo CLIP ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    from explorer.backends.clip import ClipBackend
    from explorer.backends.registry import parse_model_spec
    from explorer.core.image_io import load_image

    backend = ClipBackend.load(parse_model_spec("demo"))
    image = load_image(ROOT / "resources" / "samples" / "photo-cat.png")
    trace = run_sync(backend.trace(image, CaptureSpec(attention_layers=frozenset({2}), hidden_layers=frozenset({2}))))
    return backend, trace


def test_demo_clip_block_2_needs_the_fallback(demo):
    backend, trace = demo
    a = np.asarray(backend.token_state(trace, 2).to_host().attention, np.float64)
    assert a.shape == (4, 145, 145)
    # head 3 is nearly periodic: the plain iterates still oscillate after 2,000 steps
    w = np.linalg.eigvals(a[3])
    assert np.sort(np.real(w))[0] < -0.9999
    s2000, s2001 = weighted_pagerank(a[3], 2000), weighted_pagerank(a[3], 2001)
    assert np.abs(s2001 - s2000).sum() > 0.5
    old = weighted_pagerank(a, 30).mean(0)  # the earlier fixed 30 steps
    assert np.abs(old - weighted_pagerank(a, 2000).mean(0)).max() > 0.01
    s, info = weighted_pagerank(a, return_info=True)
    assert 3 in info.damped_heads and info.converged and info.residual <= 1e-8
    for h in set(range(4)) - set(info.damped_heads):
        np.testing.assert_allclose(s[h], _stationary(a[h]), atol=1e-6)


def test_demo_clip_run_and_preview_report_the_iteration(demo):
    backend, trace = demo
    params = HOST.make_params("pruning.zerotprune", {"keep": 0.5, "layer": 2})
    sel = run_sync(HOST.run("pruning.zerotprune", trace, params, target=Target(), backend=backend))
    (entry,) = sel.meta["pagerank"]
    assert entry["block"] == 2 and entry["damped"] and 3 in entry["damped_heads"]
    assert entry["converged"] and entry["residual"] <= entry["tol"] == 1e-8
    assert entry["iterations"] == 1000 and entry["damping"] == 0.85 and entry["damped_iterations"] > 0
    assert any("block 2" in w and "damped PageRank (d = 0.85)" in w for w in sel.meta["warnings"])
    preview = HOST.load("pruning.zerotprune").select(trace, params, backend)
    (seen,) = preview.meta["pagerank"]  # the preview decides on the trace's attention, the run recomputes it
    assert {k: v for k, v in seen.items() if "residual" not in k} == {k: v for k, v in entry.items()
                                                                      if "residual" not in k}
    assert seen["residual"] <= 1e-8 and seen["residual_plain"] == pytest.approx(entry["residual_plain"], rel=1e-6)
    np.testing.assert_array_equal(preview.kept, sel.kept)
    # the scores are the mean over heads of the converged (or damped) PageRank
    a = np.asarray(backend.token_state(trace, 2).to_host().attention)
    np.testing.assert_allclose(sel.scores, weighted_pagerank(a).mean(0)[1:], atol=1e-6)
