"""Attention flow (catalog B1, flow invariants) and GlobEnc adapted to pre-LN ViTs (catalog B5)."""

import itertools

import numpy as np
import pytest
import torch

from explorer.core.jobs import Cancelled, CancelToken, Progress, run_sync
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.host import PluginHost
from explorer_plugins.attention_flow.method import FLOW_SCALE, flow_graph, node_flows
from explorer_plugins.attention_rollout.method import residual_augment, rollout
from explorer_plugins.globenc.method import decompose_block, global_attribution


@pytest.fixture(scope="module")
def host():
    return PluginHost()


def _image(seed=11):
    from explorer.core.image_io import load_image
    from explorer.testing.images import png_bytes

    rng = np.random.default_rng(seed)
    return load_image(png_bytes(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)))


@pytest.fixture(scope="module")
def trace(tiny_clip):
    return run_sync(tiny_clip.trace(_image(), CaptureSpec.everything(3)))


def run(host, method_id, trace, target=Target(), backend=None, **params):
    p = host.make_params(method_id, params)
    return run_sync(host.run(method_id, trace, p, target=target, cancel=CancelToken(), backend=backend))


def _random_aug(rng, n, layers, peaky=1.0):
    out = []
    for _ in range(layers):
        a = rng.random((n, n)) ** peaky
        out.append(residual_augment(a / a.sum(-1, keepdims=True)))
    return out


def _layered_graph(a_hats):
    """Every node and edge of the layered attention graph (top layer included), float capacities:
    the graph whose max-flows the brute-force test enumerates cuts of. That the flows on it equal
    the authors' ``compute_node_flow`` is checked by the golden file
    (tests/plugins/test_golden_attention_flow.py), not here."""
    n, L = a_hats[0].shape[0], len(a_hats)
    edges = {}
    for layer in range(1, L + 1):
        for i, j in itertools.product(range(n), range(n)):
            if a_hats[layer - 1][i, j] > 0:
                edges[(layer * n + i, (layer - 1) * n + j)] = float(a_hats[layer - 1][i, j])
    return edges, (L + 1) * n


# -- attention flow (B1) ----------------------------------------------------------------------

def test_flow_matches_brute_force_min_cut():
    """Max-flow = min-cut: enumerate every s-t cut of a tiny graph (independent of any solver)."""
    rng = np.random.default_rng(3)
    for n, L, q in [(2, 2, 0), (3, 2, 1), (2, 3, 1)]:
        a_hats = _random_aug(rng, n, L, peaky=3.0)
        edges, size = _layered_graph(a_hats)
        source = L * n + q
        raw = node_flows(a_hats, q, normalize=False)
        for sink in range(n):
            free = [v for v in range(size) if v not in (source, sink)]
            best = np.inf
            for bits in itertools.product((0, 1), repeat=len(free)):
                side = {source} | {v for v, b in zip(free, bits) if b}
                best = min(best, sum(c for (u, v), c in edges.items() if u in side and v not in side))
            assert raw[sink] <= best + 1e-12  # capacities are rounded down
            assert raw[sink] == pytest.approx(best, abs=len(edges) / FLOW_SCALE)


def test_flow_capacity_bound_and_normalisation():
    rng = np.random.default_rng(7)
    for peaky in (1.0, 6.0):
        a_hats = _random_aug(rng, 9, 4, peaky)
        raw = node_flows(a_hats, 0, normalize=False)
        assert (raw >= 0).all() and (raw <= 1.0).all()  # the source's capacities sum to 1
        flows = node_flows(a_hats, 0)
        assert flows.sum() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(flows, raw / raw.sum())
    graph, source = flow_graph(a_hats, 2)
    assert source == 4 * 9 + 2 and graph.shape == (45, 45)
    assert graph[[source], :].sum() <= FLOW_SCALE


def test_flow_and_rollout_agree_in_ranking_on_two_tokens():
    """Catalog B1 invariant 5. With one block, flow and rollout are both the query row of Â (equal
    values, same ranking). With more blocks they agree on most 2-token graphs but not on all: the
    catalog's wording is too strong, see the pinned counterexample below."""
    rng = np.random.default_rng(9)
    for _ in range(100):
        attn = rng.dirichlet(np.ones(2), size=(2, 2))  # (H=2, 2, 2)
        a_hat = residual_augment(attn.mean(0))
        for q in (0, 1):
            f = node_flows([a_hat], q)
            np.testing.assert_allclose(f, rollout([attn])[q], atol=1e-7)
            np.testing.assert_allclose(node_flows([a_hat], q, normalize=False), a_hat[q], atol=1e-8)
    agree = compared = 0
    for _ in range(150):
        L = int(rng.integers(2, 5))
        attns = [rng.dirichlet(np.ones(2), size=(1, 2)) for _ in range(L)]  # (H=1, 2, 2) each
        R = rollout(attns)
        a_hats = [residual_augment(a.mean(0)) for a in attns]
        for q in (0, 1):
            f = node_flows(a_hats, q)
            if abs(R[q, 0] - R[q, 1]) > 1e-6 and abs(f[0] - f[1]) > 1e-6:
                compared += 1
                agree += np.sign(R[q, 0] - R[q, 1]) == np.sign(f[0] - f[1])
    assert compared > 250 and agree / compared > 0.85


def test_flow_and_rollout_can_disagree_with_two_blocks():
    """Two tokens, two blocks (residual-augmented rows, diagonal >= 0.5), query 0: rollout prefers
    token 1, flow prefers token 0. Each path source -> (1, i) -> (0, j) is edge-disjoint from the
    others, so the flow to j is the sum over i of min(upper[0, i], lower[i, j])."""
    a1 = np.array([[0.52, 0.48], [0.16, 0.84]])  # lower block
    a2 = np.array([[0.89, 0.11], [0.17, 0.83]])  # upper block, source row 0
    rolled = (a2 @ a1)[0]  # [0.4804, 0.5196]
    raw = node_flows([a1, a2], 0, normalize=False)
    # by hand: to 0: min(.89, .52) + min(.11, .16) = .63; to 1: min(.89, .48) + min(.11, .84) = .59
    np.testing.assert_allclose(raw, [0.63, 0.59], atol=1e-7)
    assert rolled[1] > rolled[0] and raw[0] > raw[1]


def test_flow_plugin_matches_reference(host, trace):
    a_hats = [residual_augment(trace.attentions[l].mean(0)) for l in range(3)]
    hm = run(host, "attention.flow", trace)
    np.testing.assert_allclose(hm.token_values, node_flows(a_hats, 0)[1:], atol=1e-6)
    q = int(trace.layout.image_token_indices()[10])
    hm_q = run(host, "attention.flow", trace, target=Target(query=q))
    np.testing.assert_allclose(hm_q.token_values, node_flows(a_hats, q)[1:], atol=1e-6)
    raw = run(host, "attention.flow", trace, start_layer=1, head_fusion="max", normalize=False)
    ref = node_flows([residual_augment(trace.attentions[l].max(0)) for l in (1, 2)], 0, normalize=False)
    np.testing.assert_allclose(raw.token_values, ref[1:], atol=1e-6)
    assert raw.meta["layers"] == [1, 2]


def test_flow_refuses_long_sequences_and_suggests_rollout(host, trace):
    with pytest.raises(ValueError, match=r"65 tokens.*max_tokens=64.*rollout"):
        run(host, "attention.flow", trace, max_tokens=64)


def test_flow_yields_progress_and_stops_between_flows(host, trace):
    p = host.make_params("attention.flow", {})
    tok = CancelToken()
    job = host.run("attention.flow", trace, p, target=Target(), cancel=tok)
    seen = [next(job), next(job)]
    assert all(isinstance(s, Progress) for s in seen) and 0 < seen[1].fraction < 1
    tok.cancel()
    with pytest.raises(Cancelled):
        while True:
            next(job)


# -- GlobEnc (B5) -----------------------------------------------------------------------------

def _true_pre_mlp(block, x):
    """The block's own state before the MLP, x + ls_1(attention(ln_1 x)), from its modules."""
    with torch.no_grad():
        return x + block.ls_1(block.attention(block.ln_1(x)))


def _check_key_invariant(backend, trace, layer):
    """Σ_j y_ij + ls_1(b_O) = the true state before the MLP (the official code keeps the output-projection
    bias out of every contribution and uses it only in the LN variance); with ``bias_on_diagonal`` the
    contributions sum to the true state itself."""
    block = backend.blocks[layer]
    x = torch.from_numpy(trace.hidden(layer))[None]
    dec = decompose_block(backend, layer, trace.hidden(layer), trace.attention(layer), return_parts=True)
    old = decompose_block(backend, layer, trace.hidden(layer), trace.attention(layer), return_parts=True,
                          bias_on_diagonal=True)
    y_true = _true_pre_mlp(block, x)
    with torch.no_grad():
        ln2 = block.ln_2(y_true)[0].numpy()
        after = (y_true + block.ls_2(block.mlp(block.ln_2(y_true))))[0].numpy()
        b_o = block.ls_1(block.attn.out_proj.bias)[None].numpy()  # (1, D)
        s = torch.sqrt(y_true[0].var(-1, unbiased=False) + block.ln_2.eps)[:, None].numpy()
        g = block.ln_2.weight.numpy()
    # the reference state is the real one: the block's output from it is the traced next hidden state
    np.testing.assert_allclose(after, trace.hidden(layer + 1), atol=1e-5)
    np.testing.assert_allclose(dec.y.sum(1) + b_o, y_true[0].numpy(), atol=1e-5)
    ln2_bias_part = g * (b_o - b_o.mean(-1, keepdims=True)) / s
    np.testing.assert_allclose(dec.y_hat.sum(1) + block.ln_2.bias.detach().numpy() + ln2_bias_part, ln2, atol=1e-5)
    np.testing.assert_allclose(old.y.sum(1), y_true[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(old.y_hat.sum(1) + block.ln_2.bias.detach().numpy(), ln2, atol=1e-5)
    for d in (dec, old):
        np.testing.assert_allclose(d.n_enc, np.linalg.norm(d.y_hat, axis=-1), rtol=1e-5, atol=1e-7)  # Gram path
        assert (d.n_enc >= 0).all()
    return dec


def test_globenc_contributions_sum_to_the_true_states(tiny_clip, trace):
    """Catalog B5 invariant 2: Σ_j y_ij = block state before the MLP, Σ_j ŷ_ij + β = ln_2 of it."""
    for layer in range(3):
        dec = _check_key_invariant(tiny_clip, trace, layer)
        n = trace.layout.n_tokens
        assert dec.n_enc.shape == (n, n) and dec.y.shape == (n, n, tiny_clip.info.width)


def test_globenc_handles_layer_scale_and_head_scale_free_blocks(tiny_clip_spec):
    from open_clip.transformer import LayerScale

    from explorer.backends.clip import ClipBackend

    backend = ClipBackend.load(tiny_clip_spec)  # a private copy: its blocks are modified
    d = backend.info.width
    torch.manual_seed(0)
    for block in backend.blocks:
        block.ls_1 = LayerScale(d, 0.5)
        with torch.no_grad():
            block.ls_1.gamma.uniform_(0.1, 2.0)
            block.attn.out_proj.bias.normal_(0.0, 0.5)  # a non-zero output bias: where it goes matters
    t = run_sync(backend.trace(_image(4), CaptureSpec.everything(3)))
    for layer in range(3):
        _check_key_invariant(backend, t, layer)
    backend.blocks[1].ln_attn = torch.nn.LayerNorm(d)
    with pytest.raises(ValueError, match="cannot be decomposed"):
        decompose_block(backend, 1, t.hidden(1), t.attention(1))


def test_globenc_identity_attention_gives_diagonal_n_enc(tiny_clip, trace):
    H, n = trace.attentions[0].shape[:2]
    eye = np.broadcast_to(np.eye(n, dtype=np.float32), (H, n, n))
    for layer in range(3):
        dec = decompose_block(tiny_clip, layer, trace.hidden(layer), eye, return_parts=True)
        off = ~np.eye(n, dtype=bool)
        assert (dec.n_enc[off] == 0).all()
        assert (np.diag(dec.n_enc) > 0).all()


def test_globenc_diagonal_layers_give_diagonal_global():
    rng = np.random.default_rng(0)
    mats = [np.diag(rng.random(6) + 0.1) for _ in range(4)]
    G = global_attribution(mats)
    np.testing.assert_allclose(G, np.diag(np.prod([np.diag(m) for m in mats], axis=0)))
    dense = [rng.random((5, 5)) for _ in range(3)]
    np.testing.assert_allclose(global_attribution(dense), dense[2] @ dense[1] @ dense[0])  # no I, no renormalising


def test_globenc_plugin_matches_reference(host, tiny_clip, trace):
    n_encs = [decompose_block(tiny_clip, l, trace.hidden(l), trace.attention(l)).n_enc for l in range(3)]
    G = global_attribution(n_encs)
    hm = run(host, "attribution.globenc", trace, backend=tiny_clip)
    np.testing.assert_allclose(hm.token_values, G[0, 1:], rtol=1e-5)
    assert "adaptation" in hm.label
    q = int(trace.layout.image_token_indices()[7])
    hm_q = run(host, "attribution.globenc", trace, target=Target(query=q), backend=tiny_clip, start_layer=1)
    np.testing.assert_allclose(hm_q.token_values, (n_encs[2] @ n_encs[1])[q, 1:], rtol=1e-5)
    hm_s = run(host, "attribution.globenc", trace, backend=tiny_clip, scale_to_max=True)
    np.testing.assert_allclose(hm_s.token_values, G[0, 1:] / G[0].max(), rtol=1e-5)
    with pytest.raises(ValueError, match="needs the loaded model"):
        run(host, "attribution.globenc", trace)
