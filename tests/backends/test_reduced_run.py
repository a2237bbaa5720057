"""Executed token reduction in the CLIP backend, checked against the numpy reference."""

import numpy as np
import pytest
import torch

from explorer.core.jobs import Cancelled, CancelToken, run_sync
from explorer.core.reduction import ReductionStep, TokenState, apply_step, block_macs, keep_count
from explorer.core.trace import CaptureSpec


def _state(rng, n=9, d=6, prefix=1):
    x = rng.normal(size=(n + prefix, d))
    return TokenState(layer=0, stage=0, x=x, keys=rng.normal(size=(2, n + prefix, 3)), attention=None,
                      sizes=rng.integers(1, 4, size=n + prefix).astype(float), n_prefix=prefix,
                      assign=np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 3]), positions=rng.random((n, 2)), grid=(1, 11))


def test_keep_count_roundings():
    assert keep_count(0.5, 7, "ceil") == 4 and keep_count(0.5, 7, "floor") == 3 and keep_count(0.5, 7) == 4
    assert keep_count(0.01, 10) == 1 and keep_count(1.0, 10) == 10
    with pytest.raises(ValueError):
        keep_count(0.0, 10)


def test_apply_step_keep_merge_fuse_reference():
    rng = np.random.default_rng(0)
    st = _state(rng)
    x, s, a, pos = apply_step(st, ReductionStep(keep=np.array([4, 0, 7])))
    np.testing.assert_array_equal(x[1:], st.x[1:][[4, 0, 7]])
    assert list(a) == [1, -1, -1, -1, 0, -1, -1, 2, -1, -1, -1]
    m = np.array([0, 0, 1, 2, 1, 2, 2, 0, 1])
    x, s, a, pos = apply_step(st, ReductionStep(merge=m))
    # mass conservation: sum(size) and sum(size * x) are unchanged
    assert s.sum() == pytest.approx(st.sizes.sum())
    np.testing.assert_allclose((s[:, None] * x).sum(0), (st.sizes[:, None] * st.x).sum(0))
    assert list(a) == list(m[st.assign])
    fuse = np.zeros(9)
    fuse[[1, 2]] = [0.2, 0.3]
    x, s, a, pos = apply_step(st, ReductionStep(keep=np.array([0]), fuse=fuse))
    np.testing.assert_allclose(x[-1], 0.2 * st.x[2] + 0.3 * st.x[3])
    assert s[-1] == st.sizes[2] + st.sizes[3] and a[1] == 1 and a[2] == 1 and a[3] == -1
    with pytest.raises(ValueError):
        ReductionStep(keep=np.array([1, 1]))
    with pytest.raises(ValueError):
        ReductionStep(merge=np.array([0, 2]))


def test_torch_apply_matches_numpy_reference(tiny_clip):
    rng = np.random.default_rng(1)
    st = _state(rng)
    x = torch.as_tensor(st.x, dtype=torch.float32)[None]
    sizes = torch.as_tensor(st.sizes, dtype=torch.float32)
    fuse = np.zeros(9)
    fuse[5] = 0.7
    for step in (ReductionStep(keep=np.array([8, 2, 5])), ReductionStep(merge=np.array([0, 1, 0, 1, 2, 2, 0, 1, 2])),
                 ReductionStep(keep=np.array([3]), fuse=fuse)):
        xt, st_sizes, a, pos = tiny_clip._apply_step(x, sizes, st, step)
        xr, sr, ar, posr = apply_step(st, step)
        np.testing.assert_allclose(xt[0].numpy(), xr, atol=1e-5)
        np.testing.assert_allclose(st_sizes.numpy(), sr, atol=1e-6)
        np.testing.assert_array_equal(a, ar)
        np.testing.assert_allclose(pos, posr)


def _keep_all(state):
    return ReductionStep(keep=np.arange(state.n_patches))


def test_keep_everything_equals_the_plain_forward(tiny_clip, make_image):
    img = make_image(64, 80, seed=5)
    trace = run_sync(tiny_clip.trace(img, CaptureSpec.everything(3)))
    for stages in ([0], [1, 2]):
        run = tiny_clip.run_reduced(img, stages, _keep_all)
        np.testing.assert_allclose(run.embedding, trace.image_embedding, atol=1e-5)
        from_trace = tiny_clip.run_reduced(trace, stages, _keep_all)
        np.testing.assert_allclose(from_trace.embedding, run.embedding, atol=1e-6)
        assert run.tokens_per_block == (65, 65, 65)
        assert (run.assign == np.arange(64)).all()
    # proportional attention with all sizes 1 adds log(1) = 0
    prop = tiny_clip.run_reduced(img, [1], _keep_all, proportional_attention=True)
    np.testing.assert_allclose(prop.embedding, trace.image_embedding, atol=1e-5)


def test_reduction_really_shortens_later_blocks(tiny_clip, make_image):
    img = make_image(64, 64, seed=6)
    trace = run_sync(tiny_clip.trace(img, CaptureSpec.everything(3)))
    seen = []

    def half(state):
        seen.append((state.layer, state.x.shape[0], state.attention.shape))
        return ReductionStep(keep=np.arange(0, state.n_patches, 2))

    run = tiny_clip.run_reduced(trace, [0, 1], half)
    assert seen == [(0, 65, (4, 65, 65)), (1, 33, (4, 33, 33))]
    assert run.tokens_per_block == (65, 33, 17)
    assert (run.assign >= 0).sum() == 16
    full = 3 * block_macs(65, 65, 64, 256)
    assert run.macs == pytest.approx(block_macs(65, 33, 64, 256) + block_macs(33, 17, 64, 256) + block_macs(17, 17, 64, 256))
    assert run.macs < full
    # the first stage decided on exactly the unreduced model's state
    st = tiny_clip.token_state(trace, 0)
    np.testing.assert_allclose(st.attention, trace.attentions[0], atol=1e-6)
    tok = CancelToken()
    tok.cancel()
    with pytest.raises(Cancelled):
        tiny_clip.run_reduced(trace, [0], half, cancel=tok)
    with pytest.raises(ValueError):
        tiny_clip.run_reduced(trace, [5], half)


# -- fused kernels and batches ---------------------------------------------------------------------
def _prepared_batch(backend, images):
    from explorer.backends.clip import PreparedImage

    preps = [backend.prepare(img) for img in images]
    return PreparedImage(torch.cat([p.pixels for p in preps]), preps[0].layout, preps[0].sha256), preps


@pytest.mark.parametrize("method_id,need", [("merging.tome", "none"), ("pruning.topk", "cls"), ("pruning.evit", "cls")])
def test_fused_blocks_equal_the_explicit_ones(tiny_clip, make_image, method_id, need):
    """A reducing block that keeps the fused kernel (ToMe: keys only, with log(size) as an additive
    mask; Top-K/EViT: the [CLS] row computed alone) gives the run with explicit probabilities."""
    from explorer.plugin_host.host import PluginHost

    host = PluginHost()
    method = host.load(method_id)
    assert method.attention_need(host.make_params(method_id, {})) == need
    params = host.make_params(method_id, {"keep": 0.5, "layer": 0})
    stages = method.stages(params, tiny_clip.info)
    img = make_image(64, 80, seed=21)
    prop = method.uses_proportional_attention(params)
    runs = {a: tiny_clip.run_reduced(img, stages, lambda st: method.reduce(st, params), proportional_attention=prop,
                                     attention=a, batched=True, host=False) for a in (need, "full")}
    fused, explicit = runs[need], runs["full"]
    np.testing.assert_allclose(fused.embedding, explicit.embedding, atol=1e-5)
    np.testing.assert_array_equal(fused.assign, explicit.assign)
    np.testing.assert_allclose(fused.sizes, explicit.sizes)
    assert fused.tokens_per_block == explicit.tokens_per_block


@pytest.mark.parametrize("method_id", ["merging.tome", "pruning.topk", "pruning.divprune", "merging.kmedoids"])
def test_a_batch_equals_its_images_run_alone(tiny_clip, make_image, method_id):
    """Batched runs (one decision for the batch, or one per image) give every image what it gets
    alone: the same embedding, the same kept tokens."""
    from explorer.plugin_host.host import PluginHost

    host = PluginHost()
    method = host.load(method_id)
    params = host.make_params(method_id, {"keep": 0.5, "layer": 1})
    images = [make_image(64, 64 + 8 * i, seed=30 + i) for i in range(3)]
    batch, preps = _prepared_batch(tiny_clip, images)
    together = method.executed(tiny_clip, batch, params)
    assert together.batch_size == 3 and together.embeddings.shape == (3, tiny_clip.info.embed_dim)
    for i, prep in enumerate(preps):
        alone = method.executed(tiny_clip, prep, params)
        np.testing.assert_allclose(together.embeddings[i], alone.embedding, atol=1e-5)
        np.testing.assert_array_equal(together.assigns[i], alone.assign)
    plain = tiny_clip.run_reduced(batch, ())
    assert plain.tokens_per_block == (65, 65, 65) and plain.batch_size == 3
    for i, prep in enumerate(preps):
        np.testing.assert_allclose(plain.embeddings[i], tiny_clip.encode_image_tensor(prep.pixels)[0], atol=1e-5)
