"""The VLM backend on tiny random models of every family, saved and loaded with from_pretrained:
greedy generation equals transformers' own, captured attention rows equal an eager
recomputation, pruning keeps exactly what it is told and keep-all changes nothing, relevancy
agrees with autograd through the eager attention weights."""

import numpy as np
import pytest
import torch

from explorer.backends.vlm import PruneDecision
from explorer.core.jobs import Cancelled, CancelToken, run_sync
from explorer.testing.images import random_image
from explorer.testing.tiny_vlm import VARIANTS

FAMILIES = ["demo", "llava-crop", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm"]
SHAPES = {"square": (64, 64), "wide": (50, 110), "tall": (120, 48)}


@pytest.fixture(scope="module")
def backends(tiny_vlm_backends):
    return tiny_vlm_backends


def _image(shape, seed=0):
    return random_image(*shape, seed=seed)


@pytest.mark.parametrize("name", FAMILIES)
def test_generation_matches_transformers_and_counts_match(backends, name):
    b = backends(name)
    for shape in SHAPES.values():
        prep = b.prepare(_image(shape), VARIANTS[name].prompt)
        ids = prep.inputs["input_ids"][0].numpy()
        specials = [t.index for t in prep.layout.special if t.kind in ("newline", "cls")]
        assert len(prep.image_positions) + len(specials) == int((ids == b.image_token_id).sum())
        g = run_sync(b.generate_job(prep, max_new_tokens=4))
        out = b.model.generate(**prep.inputs, max_new_tokens=4, do_sample=False)
        ref = [t for t in out[0, ids.shape[0]:].tolist() if t not in b.eos_ids]
        assert g.ids == ref[: len(g.ids)] and (len(g.ids) == 4 or len(ref) == len(g.ids))
        assert all(a.shape[1:] == (b.info.n_heads, len(prep.image_positions)) for a in g.attention.values())


@pytest.mark.parametrize("name", ["demo", "llava_next", "qwen2_vl", "idefics3"])
def test_attention_rows_equal_an_eager_recomputation(backends, name):
    from transformers import AutoModelForImageTextToText

    b = backends(name)
    prep = b.prepare(_image(SHAPES["wide"], 1), VARIANTS[name].prompt)
    g = run_sync(b.generate_job(prep, max_new_tokens=1))
    eager = AutoModelForImageTextToText.from_pretrained(b.spec.model, attn_implementation="eager").eval()
    with torch.no_grad():
        out = eager(**prep.inputs, output_attentions=True)
    for l in range(b.info.n_layers):
        ref = out.attentions[l][0, :, -1, :][:, torch.as_tensor(prep.image_positions)].numpy()
        np.testing.assert_allclose(g.attention[l][0], ref, atol=2e-5)
        assert g.image_mass[0, l] == pytest.approx(float(ref.sum(1).mean()), abs=1e-4)


@pytest.mark.parametrize("name", ["demo", "llava_onevision", "qwen2_vl", "smolvlm"])
def test_pruning_counts_and_keep_all_is_the_unpruned_model(backends, name):
    b = backends(name)
    prep = b.prepare(_image(SHAPES["square"], 2), VARIANTS[name].prompt)
    base = run_sync(b.generate_job(prep, max_new_tokens=3))
    n = len(prep.image_positions)
    seen = {}

    def keep_all(state):
        seen["state"] = state
        return PruneDecision(keep=np.arange(len(state.image)))

    lay = 1 if b.info.n_layers > 1 else 0
    for layer in sorted({0, lay}):
        same = run_sync(b.generate_job(prep, max_new_tokens=3, prune=(layer, keep_all, True)))
        assert same.ids == base.ids and same.logprob == pytest.approx(base.logprob, abs=1e-4)
    st = seen["state"]
    assert st.layer == lay and len(st.image) == n
    if lay:
        assert st.last_row.shape == (n,) and st.keys is not None

    def score(s):
        return s.last_row if s.last_row is not None else np.linalg.norm(s.hidden[s.image], axis=1)

    k = max(1, n // 3)
    top = lambda s: PruneDecision(keep=np.argsort(-score(s))[:k])  # noqa: E731
    pruned = run_sync(b.generate_job(prep, max_new_tokens=3, prune=(lay, top, False)))
    assert len(pruned.kept[lay]) == k
    if lay:
        assert len(pruned.kept[0]) == n and not np.isnan(pruned.attention[0][0]).any()
    # tokens removed from the pruning layer on: their attention there is NaN
    assert np.isnan(pruned.attention[lay][0]).any(axis=0).sum() == n - k
    # the log-likelihood of the unpruned answer under the pruned model
    ll = run_sync(b.generate_job(prep, max_new_tokens=3, force=base.ids, prune=(lay, top, False)))
    assert np.isfinite(ll.logprob) and ll.ids == base.ids[: len(ll.ids)]
    with pytest.raises(ValueError):
        run_sync(b.generate_job(prep, prune=(99, keep_all, False)))


def test_generation_can_be_cancelled(backends):
    b = backends("demo")
    prep = b.prepare(_image(SHAPES["square"]), VARIANTS["demo"].prompt)
    tok = CancelToken()
    job = b.generate_job(prep, max_new_tokens=10, cancel=tok)
    next(job)
    tok.cancel()
    with pytest.raises(Cancelled):
        while True:
            next(job)


@pytest.mark.parametrize("name", ["demo", "qwen2_vl"])
def test_relevancy_agrees_with_autograd_on_eager_weights(backends, name):
    from transformers import AutoModelForImageTextToText

    b = backends(name)
    prep = b.prepare(_image(SHAPES["wide"], 3), VARIANTS[name].prompt)
    g = run_sync(b.generate_job(prep, max_new_tokens=2))
    if not g.ids:
        pytest.skip("the tiny model stopped at once")
    ours, logit = b.relevancy(prep, g.ids, 0)
    assert (ours >= 0).all()
    eager = AutoModelForImageTextToText.from_pretrained(b.spec.model, attn_implementation="eager").eval()
    out = eager(**prep.inputs, output_attentions=True)
    for a in out.attentions:
        a.retain_grad()
    target = out.logits[0, -1, g.ids[0]]
    assert float(target) == pytest.approx(logit, rel=1e-4, abs=1e-4)
    target.backward()
    n = out.attentions[0].shape[-1]
    R = torch.eye(n, dtype=torch.float64)
    for a in out.attentions:
        cam = (a.grad * a).clamp(min=0).mean(1)[0].double()
        R = R + cam @ R
    ref = R[-1, torch.as_tensor(prep.image_positions)].detach().numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-6)


def test_merging_into_group_means(backends):
    b = backends("demo")
    prep = b.prepare(_image(SHAPES["square"], 4), VARIANTS["demo"].prompt)
    n = len(prep.image_positions)
    groups = np.arange(n) // 4  # consecutive quadruples
    g = run_sync(b.generate_job(prep, max_new_tokens=2, prune=(0, lambda s: PruneDecision(merge=groups), False)))
    assert len(g.kept[0]) == n // 4 and (g.groups == groups).all()
    # identity groups merge nothing: the unpruned model
    base = run_sync(b.generate_job(prep, max_new_tokens=2))
    same = run_sync(b.generate_job(prep, max_new_tokens=2, prune=(0, lambda s: PruneDecision(merge=np.arange(n)), False)))
    assert same.ids == base.ids and same.logprob == pytest.approx(base.logprob, abs=1e-5)
