"""VLM pruning plugins (FastV, SparseVLM, DART, DivPrune, HiRED, random, pooling) on tiny random
VLMs saved and loaded with ``from_pretrained``: the catalog invariants of each method (exact kept
counts, kept tokens are the top-scored ones, pivots, raters, budgets, determinism, group means),
the backend probes they use (vision [CLS] rows and LLM attention rows against an eager
recomputation), and every method end to end through the plugin host, with the reported
log-likelihood checked against an independent layer loop that removes exactly the reported tokens
(text and prefix untouched, original position ids, Qwen2-VL's 3-D M-RoPE ids included)."""

import math

import numpy as np
import pytest
import torch

from explorer.backends.vlm import PruneDecision
from explorer.core.jobs import CancelToken, run_sync
from explorer.core.results import TokenSelection
from explorer.core.target import Target
from explorer.plugin_host.api import ParamError
from explorer.plugin_host.host import PluginHost
from explorer.plugin_host.vlm import generate_trace_job
from explorer.testing.images import random_image
from explorer.testing.tiny_vlm import VARIANTS

HOST = PluginHost()
METHODS = ["vlm.fastv", "vlm.sparsevlm", "vlm.dart", "vlm.divprune", "vlm.hired", "vlm.random", "vlm.pool"]
SHAPES = {"square": (64, 64), "wide": (50, 110)}


@pytest.fixture(scope="module")
def backends(tiny_vlm_backends):
    return tiny_vlm_backends


def _image(shape, seed=0):
    return random_image(*shape, seed=seed)


@pytest.fixture(scope="module")
def traces(backends):
    cache = {}

    def get(name, shape="square", seed=0):
        key = (name, shape, seed)
        if key not in cache:
            b = backends(name)
            trace = run_sync(generate_trace_job(b, _image(SHAPES[shape], seed), VARIANTS[name].prompt,
                                                max_new_tokens=3))
            cache[key] = (b, trace)
        return cache[key]

    return get


def run(backend, trace, method_id, **values):
    values.setdefault("max_new_tokens", 3)
    params = HOST.make_params(method_id, values)
    prompt = trace.extras["prompt"]
    target = Target(prompts=(prompt,)) if HOST.method(method_id).requires("text") else Target()
    return run_sync(HOST.run(method_id, trace, params, target=target, cancel=CancelToken(), backend=backend))


def manual_logprob(b, prep, layer, answer, keep=None, groups=None, renumber=False):
    """Log-likelihood of ``answer`` with the decoder layers run by hand, without a cache: the
    whole sequence (prompt + answer[:-1]) through layers ``< layer``, then the dropped image
    tokens removed (or each merge group replaced by its mean at its first member), every other
    token and every position id unchanged, then the remaining layers. ``renumber`` (a wrong
    implementation, for contrast): the survivors get the position ids ``0..n'-1`` instead."""
    lm, answer = b.lm, [int(t) for t in answer]
    image = np.asarray(prep.image_positions)
    with torch.no_grad():
        embeds, pos = b.llm_inputs(prep)
        if len(answer) > 1:
            embeds = torch.cat([embeds, lm.embed_tokens(torch.tensor([answer[:-1]]))], 1)
            steps = torch.arange(1, len(answer))
            pos = torch.cat([pos, pos[..., -1:] + steps.view(*([1] * (pos.dim() - 1)), -1)], -1)

        def layers(h, p, start, stop):
            emb = lm.rotary_emb(h, position_ids=p)
            for i in range(start, stop):
                h = lm.layers[i](h, attention_mask=None, position_embeddings=emb, position_ids=p)
            return h

        h = layers(embeds, pos, 0, layer).clone()
        drop = set()
        if groups is not None:
            for g in range(int(groups.max()) + 1):
                members = image[np.nonzero(groups == g)[0]]
                h[0, members[0]] = h[0, torch.as_tensor(members)].mean(0)
                drop |= set(members[1:].tolist())
        else:
            drop = set(image[~keep].tolist())
        seq = torch.as_tensor([i for i in range(h.shape[1]) if i not in drop])
        kept_pos = pos.index_select(-1, seq)
        if renumber:
            kept_pos = torch.arange(len(seq)).expand_as(kept_pos).contiguous()
        h = layers(h[:, seq], kept_pos, layer, len(lm.layers))
        logits = b.model.lm_head(lm.norm(h[0, -len(answer):])).float()
        return float(torch.log_softmax(logits, -1)[torch.arange(len(answer)), torch.tensor(answer)].sum())


def check_meta(sel, b, trace, layer, kept_count):
    """The meta every VLM pruning run reports."""
    n = len(trace.extras["prepared"].image_positions)
    full = trace.extras["generation"]
    meta = sel.meta
    assert isinstance(sel, TokenSelection) and sel.kept.shape == (n,)
    assert meta["layer"] == layer and meta["image_tokens_kept"] == kept_count
    assert meta["image_tokens_per_layer"] == [n] * layer + [kept_count] * (b.info.n_layers - layer)
    assert meta["answer_full"] == full.text and isinstance(meta["answer"], str)
    assert np.isfinite(meta["logprob_full_answer"]) and np.isfinite(meta["logprob_full_answer_pruned"])
    if not full.ids:  # the model stopped at once: there is no answer to score
        assert meta["logprob_full_answer"] == meta["logprob_full_answer_pruned"] == 0.0
    elif len(full.ids) == 3:  # no eos term in the trace's own score
        assert meta["logprob_full_answer"] == pytest.approx(full.logprob, abs=1e-4)
    if sel.groups is None:
        assert int(sel.kept.sum()) == kept_count
    else:
        assert int(sel.groups.max()) + 1 == kept_count
    return meta


# -- every method end to end -------------------------------------------------------------------------
N_DEMO = 144  # the demo VLM: a 12 x 12 grid of image tokens
EXPECTED = {  # demo: 144 image tokens, 3 text tokens after the image ("describe the scene"), 4 LLM layers
    "vlm.fastv": (2, round(0.5 * N_DEMO)),
    "vlm.sparsevlm": (3, round(0.5208 * N_DEMO)),
    "vlm.dart": (2, 4 + 7 * math.floor(0.222 * N_DEMO / 7)),
    "vlm.divprune": (0, round(0.098 * N_DEMO)),
    "vlm.hired": (0, int(N_DEMO * 0.2)),
    "vlm.random": (0, round(0.5 * N_DEMO)),
    "vlm.pool": (0, (12 // 2) ** 2),  # 2 x 2 windows
}


def test_the_methods_are_registered_for_vlm_backends():
    ids = {m.id for m in HOST.methods(backend="vlm")}
    assert set(METHODS) <= ids
    for mid in METHODS:
        c = HOST.method(mid).contribution
        assert c.backends == ("vlm",) and "model" in c.requires and c.repository.startswith("https://")
        assert c.family == ("merging" if mid == "vlm.pool" else "pruning") and c.adaptation
        for name, f in HOST.params_model(mid).model_fields.items():
            assert f.description, f"{mid}: {name} has no help text"


@pytest.mark.parametrize("method_id", METHODS)
def test_end_to_end_meta_and_the_likelihood_of_the_reported_tokens(backends, traces, method_id):
    b, trace = traces("demo")
    full = trace.extras["generation"]
    assert full.ids, "the tiny demo model should answer something"
    layer, count = EXPECTED[method_id]
    sel = run(b, trace, method_id)
    meta = check_meta(sel, b, trace, layer, count)
    # the reported log-likelihood is the unpruned answer's under exactly these tokens removed
    ref = manual_logprob(b, trace.extras["prepared"], layer, full.ids, keep=sel.kept, groups=sel.groups)
    assert meta["logprob_full_answer_pruned"] == pytest.approx(ref, abs=1e-4)
    again = run(b, trace, method_id)
    np.testing.assert_array_equal(again.kept, sel.kept)


# -- FastV -------------------------------------------------------------------------------------------------
def test_fastv_keeps_the_most_attended_tokens(traces, spy):
    b, trace = traces("demo")
    seen = spy(HOST, "vlm.fastv")
    sel = run(b, trace, "vlm.fastv", keep=0.25, layer=2)
    state, decision = seen[0]
    n = len(state.image)
    k = round(0.25 * n)
    assert state.layer == 2 and state.last_row.shape == (n,) and len(decision.keep) == k
    kept_scores = state.last_row[decision.keep]
    dropped = np.delete(state.last_row, decision.keep)
    assert kept_scores.min() >= dropped.max()
    assert sel.kept.sum() == k and (np.nonzero(sel.kept)[0] == state.original[decision.keep]).all()
    # text after the image is never a candidate
    assert np.intersect1d(state.text, state.image).size == 0


def test_fastv_keep_all_is_the_unpruned_model(traces):
    b, trace = traces("demo")
    sel = run(b, trace, "vlm.fastv", keep=1.0)
    assert sel.meta["same_answer"] and sel.meta["answer"] == trace.extras["generation"].text
    assert sel.meta["logprob_full_answer_pruned"] == pytest.approx(sel.meta["logprob_full_answer"], abs=1e-4)
    assert sel.kept.all()


def test_fastv_k0_is_the_seeded_random_subset(traces):
    from explorer_plugins.baselines.method import random_keep

    b, trace = traces("demo")
    sel = run(b, trace, "vlm.fastv", layer=0, seed=3)
    assert (np.nonzero(sel.kept)[0] == random_keep(N_DEMO, N_DEMO // 2, 3)).all()
    assert sel.meta["image_tokens_per_layer"] == [N_DEMO // 2] * b.info.n_layers


# -- DART -----------------------------------------------------------------------------------------------------
def test_dart_keeps_its_pivots_and_the_official_count(traces, spy):
    from explorer_plugins.vlm_dart.method import key_l1

    b, trace = traces("demo")
    seen = spy(HOST, "vlm.dart")
    sel = run(b, trace, "vlm.dart")
    state, decision = seen[0]
    n, t = len(state.image), len(state.text)
    assert state.keys is not None and t == 3
    l1 = key_l1(state.keys, state.image)
    pivots = np.argsort(-l1, kind="stable")[:4]
    assert np.isin(pivots, decision.keep).all()
    token_topk = math.ceil((n * 0.222) // (4 + t))
    assert len(decision.keep) == 4 + (4 + t) * token_topk == sel.kept.sum()
    assert decision.keep.max() < n  # indices into the image tokens only
    # exact mode hits round(keep·n); an explicit MAX_NUM_TRUNCTION gives P_img + P·ceil(M // P)
    seen.clear()
    assert run(b, trace, "vlm.dart", count="exact", keep=0.3).meta["image_tokens_kept"] == round(0.3 * N_DEMO)
    assert run(b, trace, "vlm.dart", max_num_trunction=14).meta["image_tokens_kept"] == 4 + 7 * 2
    with pytest.raises(ParamError):
        HOST.make_params("vlm.dart", {"layer": 0})


def test_dart_selects_the_least_similar_tokens_and_duplicates_last():
    from explorer_plugins.vlm_dart.method import dart_select

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(12, 8))
    feats[5] = feats[0] * 3.0  # an exact duplicate (cos 1) of the pivot
    l1 = np.arange(12.0)[::-1]  # token 0 has the largest key norm: the one pivot
    keep, img_piv, txt_piv = dart_select(feats, l1, np.zeros((0, 8)), np.zeros(0), 1, 0, 4)
    assert list(img_piv) == [0] and txt_piv.size == 0
    cos = (feats / np.linalg.norm(feats, axis=1, keepdims=True)) @ (feats[0] / np.linalg.norm(feats[0]))
    expect = np.sort(np.concatenate([[0], 1 + np.argsort(cos[1:])[:4]]))
    assert (keep == expect).all()
    keep_all, _, _ = dart_select(feats, l1, np.zeros((0, 8)), np.zeros(0), 1, 0, 10)
    assert 5 not in keep_all and len(keep_all) == 11  # the duplicate is the one left


# -- DivPrune ----------------------------------------------------------------------------------------------
def test_divprune_agrees_with_the_encoder_greedy_on_the_input_embeddings(traces, spy):
    from explorer_plugins.divprune.method import divprune_select

    b, trace = traces("demo")
    seen = spy(HOST, "vlm.divprune")
    sel = run(b, trace, "vlm.divprune")
    prep = trace.extras["prepared"]
    embeds, _ = b.llm_inputs(prep)
    v = embeds[0, torch.as_tensor(prep.image_positions)].float().numpy()
    np.testing.assert_allclose(seen[0][0].hidden[seen[0][0].image], v, atol=1e-6)
    order, _, _ = divprune_select(v, round(0.098 * len(v)))
    assert (np.nonzero(sel.kept)[0] == np.sort(order)).all()


def test_qwen2_vl_pruning_keeps_the_m_rope_positions(traces):
    """Qwen2-VL's position ids are 3-D (temporal, row, col) and not the sequence index: the
    pruned run must equal a hand-run model that keeps exactly those ids for the survivors."""
    b, trace = traces("qwen2_vl", "wide")
    prep = trace.extras["prepared"]
    _, pos = b.llm_inputs(prep)
    assert pos.dim() == 3 and not torch.equal(pos[1], pos[2])  # real M-RoPE rows/cols
    full = trace.extras["generation"]
    for mid in ("vlm.divprune", "vlm.random", "vlm.pool"):
        sel = run(b, trace, mid)
        n = len(prep.image_positions)
        count = int(sel.groups.max()) + 1 if sel.groups is not None else int(sel.kept.sum())
        check_meta(sel, b, trace, 0, count)
        assert count < n
        ref = manual_logprob(b, prep, 0, full.ids, keep=sel.kept, groups=sel.groups)
        # the tiny model is only weakly position-sensitive: a tight tolerance still tells the
        # original M-RoPE ids from renumbered ones (float32 agreement is ~5e-7 here)
        assert sel.meta["logprob_full_answer_pruned"] == pytest.approx(ref, abs=1.5e-6)
        wrong = manual_logprob(b, prep, 0, full.ids, keep=sel.kept, groups=sel.groups, renumber=True)
        assert abs(wrong - ref) > 5e-6


# -- SparseVLM -------------------------------------------------------------------------------------------------
def test_sparsevlm_raters_and_top_rated_tokens(traces, spy):
    from explorer_plugins.vlm_sparsevlm.method import sparsevlm_raters

    b, trace = traces("demo")
    seen = spy(HOST, "vlm.sparsevlm")
    sel = run(b, trace, "vlm.sparsevlm")
    state, decision = seen[0]
    raters = state.extras["raters"]
    assert raters.size > 0 and np.isin(raters, state.text).all()
    # the raters from the LLM input embeddings, recomputed
    prep = trace.extras["prepared"]
    embeds, _ = b.llm_inputs(prep)
    e = embeds[0].float().numpy()
    idx, m = sparsevlm_raters(e[prep.image_positions], e[state.text])
    assert (state.text[idx] == raters).all() and (m[idx] > m.mean()).all()
    # scores: the raters' head-mean attention at layer K−1 over the image keys; the top k stay
    rows = b.attention_rows(prep, 2, raters).mean(0)
    scores = rows[:, state.image].mean(0)
    np.testing.assert_allclose(decision.scores, scores, atol=1e-6)
    n = len(state.image)
    k = min(round(0.5208 * n), n - 1)
    assert len(decision.keep) == k == sel.kept.sum()
    assert scores[decision.keep].min() >= np.delete(scores, decision.keep).max()
    rank = run(b, trace, "vlm.sparsevlm", count="rank", rank_scale=1.0)
    assert rank.meta["image_tokens_kept"] == min(np.linalg.matrix_rank(rows[:, state.image].astype(np.float64)), n - 1)


def test_attention_rows_equal_an_eager_recomputation(backends):
    from transformers import AutoModelForImageTextToText

    b = backends("demo")
    prep = b.prepare(_image(SHAPES["wide"], 1), VARIANTS["demo"].prompt)
    N = prep.inputs["input_ids"].shape[1]
    rows = [N - 3, N - 2, 0]
    eager = AutoModelForImageTextToText.from_pretrained(b.spec.model, attn_implementation="eager").eval()
    with torch.no_grad():
        out = eager(**prep.inputs, output_attentions=True)
    for layer in (0, 2):
        ours = b.attention_rows(prep, layer, rows)
        np.testing.assert_allclose(ours, out.attentions[layer][0][:, rows, :].numpy(), atol=2e-5)
    with pytest.raises(ValueError):
        b.attention_rows(prep, 99, rows)
    with pytest.raises(ValueError):
        b.attention_rows(prep, 0, [N])


# -- HiRED -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["demo", "llava_next"])
def test_vision_cls_attention_equals_an_eager_recomputation(backends, name):
    from transformers import AutoModelForImageTextToText

    b = backends(name)
    prep = b.prepare(_image(SHAPES["wide"], 2), VARIANTS[name].prompt)
    got = b.vision_cls_attention(prep, [0, -1])
    assert b.model.config.vision_config._attn_implementation != "explorer_probe"  # restored
    eager = AutoModelForImageTextToText.from_pretrained(b.spec.model, attn_implementation="eager").eval()
    pv = prep.inputs["pixel_values"]
    views = got[0].shape[0]
    pv = pv.reshape(-1, *pv.shape[-3:])[:views]
    with torch.no_grad():
        out = eager.model.vision_tower(pv, output_attentions=True)
    n_layers = len(out.attentions)
    for layer, rows in got.items():
        ref = out.attentions[layer % n_layers][:, :, 0, 1:].numpy()
        assert rows.shape == ref.shape and (rows >= 0).all() and (rows.sum(-1) <= 1 + 1e-6).all()
        np.testing.assert_allclose(rows, ref, atol=2e-6)
    assert (views > 1) == (name == "llava_next")  # LLaVA-NeXT: the base view and its tiles


def test_vision_cls_attention_needs_a_cls_token(backends):
    b = backends("qwen2_vl")
    prep = b.prepare(_image(SHAPES["square"]), VARIANTS["qwen2_vl"].prompt)
    with pytest.raises(ValueError, match="CLS"):
        b.vision_cls_attention(prep, [0])


def test_hired_budgets_and_per_partition_top_k(backends, traces, spy):
    from explorer_plugins.vlm_hired.method import hired_select

    b, trace = traces("llava_next", "wide")
    prep = trace.extras["prepared"]
    seen = spy(HOST, "vlm.hired")
    sel = run(b, trace, "vlm.hired")
    state, decision = seen[0]
    top, bottom, parts = (state.extras[k] for k in ("hired_top", "hired_bottom", "hired_partitions"))
    P, n_v = bottom.shape
    assert P == 1 + parts.grid[0] * parts.grid[1] and P > 1 and n_v == 16
    # the partitions cover the layout: base = segment 0, tile patches either in the tile grid or unpadded away
    base, tiles = prep.layout.segments
    assert (parts.numbers[0] == np.arange(base.n_tokens)).all()
    tile_numbers = parts.numbers[1:][parts.numbers[1:] >= 0]
    assert np.array_equal(np.sort(tile_numbers), base.n_tokens + np.arange(tiles.n_tokens))
    assert (parts.numbers[1:] < 0).any()  # the wide image's tile grid was unpadded
    numbers, info = hired_select(top, bottom, parts, 0.2, 0.5)
    total = int(P * n_v * 0.2)
    full = min(int(total * 0.5), n_v)
    sub = min(total - full, (P - 1) * n_v)
    assert (info["total"], info["full_budget"], info["sub_budget"]) == (total, full, sub)
    # the base view keeps exactly full_budget, its top by the bottom-layer [CLS] attention
    assert len(info["picked"][0]) == full
    assert bottom[0][info["picked"][0]].min() >= np.delete(bottom[0], info["picked"][0]).max()
    # budgets: marks are the top int(n_v·(1−α)) base patches by the top layer, in row bands
    marked = np.zeros(n_v, bool)
    marked[np.argsort(-top[0], kind="stable")[: int(n_v * 0.5)]] = True
    marks = np.array([m.sum() for m in np.array_split(marked, P - 1)])
    assert (info["marks"] == marks).all()
    # official HiRED_sub_img_budgets: (int / int → float32) * sub in float32, truncated by .int()
    ratio32 = marks.astype(np.float32) / np.float32(marks.sum())
    assert (info["budgets"] == np.minimum(np.trunc(ratio32 * np.float32(sub)), n_v)).all()
    _, info64 = hired_select(top, bottom, parts, 0.2, 0.5, budget_dtype="float64")
    assert (info64["budgets"] == np.minimum(np.floor(marks / marks.sum() * sub), n_v)).all()
    for j in range(1, P):  # per-tile top-k by its own bottom-layer attention
        pick = info["picked"][j]
        assert len(pick) == info["budgets"][j - 1]
        if 0 < len(pick) < n_v:
            assert bottom[j][pick].min() >= np.delete(bottom[j], pick).max()
    assert len(numbers) <= total
    assert (np.nonzero(sel.kept)[0] == numbers).all()
    check_meta(sel, b, trace, 0, len(numbers))
    # the newline tokens stay: the likelihood of a forced answer equals the hand-run model
    plan = (0, lambda s: PruneDecision(keep=np.nonzero(sel.kept)[0]), False)
    forced = run_sync(b.generate_job(prep, prune=plan, force=[3, 5]))
    assert forced.logprob == pytest.approx(manual_logprob(b, prep, 0, [3, 5], keep=sel.kept), abs=1e-4)
    # 'skip' never loses picks to the padding; '2d' distributes by the tile rectangles
    skip, info_skip = hired_select(top, bottom, parts, 0.2, 0.5, padding="skip")
    available = (parts.numbers[1:] >= 0).sum(1)
    assert len(skip) == full + np.minimum(info_skip["budgets"], available).sum() >= len(numbers)
    _, info_2d = hired_select(top, bottom, parts, 0.2, 0.5, distribution="2d")
    assert info_2d["marks"].sum() == int(n_v * 0.5)
    assert (info_2d["marks"] == np.bincount(parts.base_tile[marked], minlength=P - 1)).all()


def test_hired_single_partition_and_towers_without_cls(traces, backends):
    b, trace = traces("demo")
    sel = run(b, trace, "vlm.hired", keep=0.25)
    assert sel.meta["image_tokens_kept"] == int(0.25 * N_DEMO)
    qb, qtrace = traces("qwen2_vl", "wide")
    with pytest.raises(ParamError, match="CLS"):
        run(qb, qtrace, "vlm.hired")


# -- random and pooling ------------------------------------------------------------------------------------
def test_random_is_deterministic_per_seed(traces):
    from explorer_plugins.baselines.method import random_keep

    b, trace = traces("demo")
    a = run(b, trace, "vlm.random", seed=5, layer=1)
    again = run(b, trace, "vlm.random", seed=5, layer=1)
    other = run(b, trace, "vlm.random", seed=6, layer=1)
    np.testing.assert_array_equal(a.kept, again.kept)
    assert not np.array_equal(a.kept, other.kept)
    assert (np.nonzero(a.kept)[0] == random_keep(N_DEMO, N_DEMO // 2, 5)).all()
    assert a.meta["image_tokens_per_layer"] == [N_DEMO] + [N_DEMO // 2] * 3


def test_pooling_groups_are_windows_and_merged_tokens_are_their_means(traces, spy):
    b, trace = traces("demo")
    seen = spy(HOST, "vlm.pool")
    sel = run(b, trace, "vlm.pool", keep=0.25)
    state, decision = seen[0]
    groups = decision.merge
    r, c = np.divmod(np.arange(N_DEMO), 12)
    expect = (r // 2) * 6 + c // 2
    assert (groups == expect).all() and (sel.groups == expect).all()
    assert (np.bincount(groups) == 4).all()
    # window means preserve the global token mean (12×12 divisible by 2)
    x = state.hidden[state.image].astype(np.float64)
    means = np.stack([x[groups == g].mean(0) for g in range(36)])
    np.testing.assert_allclose(means.mean(0), x.mean(0), atol=1e-9)
    # stride 3: ceil mode, smaller edge windows
    assert run(b, trace, "vlm.pool", stride=3).meta["image_tokens_kept"] == 16


def test_pooling_windows_stay_inside_their_segment(backends):
    from explorer_plugins.vlm_baselines.method import grid_cells, segment_pool_groups

    b = backends("llava_next")
    prep = b.prepare(_image(SHAPES["wide"], 0), VARIANTS["llava_next"].prompt)
    layout = prep.layout
    numbers = np.arange(layout.n_image_tokens)
    groups = segment_pool_groups(layout, numbers, 2)
    seg, row, col = grid_cells(layout, numbers)
    assert sum(-(-s.rows // 2) * -(-s.cols // 2) for s in layout.segments) == groups.max() + 1
    for g in range(groups.max() + 1):
        members = groups == g
        assert len(set(seg[members])) == 1
        assert len(set(row[members] // 2)) == 1 and len(set(col[members] // 2)) == 1
