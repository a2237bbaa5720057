"""Gradient attribution maps on the tiny CLIP: Chefer relevance (catalog B2), ALBEF-style Grad-CAM
on attention (B3, ITC mode) and gScoreCAM (B4), plus ``ClipBackend.prepared_for``.

Three kinds of checks:

* the catalog invariants of each method (function level and through the plugin host);
* the backend's gradients against an independent autograd computation written here: the CLIP
  logit recomputed by hand from the model's weights (embeddings, explicit softmax attention,
  MLP, ``ln_post``, ``proj``, ``logit_scale * cos``) with one block's attention probabilities
  (or the last block's output) made a leaf, so ``dy/dA`` and ``dy/dx`` come from plain autograd;
* agreement with the ``pytorch-grad-cam`` package (``grad-cam``) on the same model, target layer
  (``visual.transformer.resblocks[-1]`` with the ViT reshape transform: drop [CLS], grid of D
  channels) and target (the CLIP logit of one prompt): its hooked activations and gradients, its
  ``GradCAM`` channel weights and maps (which are gScoreCAM's channel importance and step 2), and
  its ``ScoreCAM`` softmax weights and maps (gScoreCAM with ``k = C``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from explorer.core.image_io import load_image
from explorer.core.jobs import Cancelled, CancelToken, Progress, run_sync
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec, TextEncoding
from explorer.plugin_host.host import PluginHost
from explorer.testing.images import png_bytes
from explorer_plugins.chefer.method import chefer_relevance, layer_relevance
from explorer_plugins.gradcam.method import attention_gradcam, block_index
from explorer_plugins.gscorecam.method import (
    channel_importance,
    channel_masks,
    combine,
    grid_channels,
    gscorecam_job,
    normalize_cam,
    softmax_weights,
    token_importance,
    auto_source,
)

PROMPTS = ("a red circle", "a blue square")
TARGET = Target(prompts=PROMPTS)


@pytest.fixture(scope="module")
def host():
    return PluginHost()


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(23)
    return load_image(png_bytes(rng.integers(0, 256, (80, 112, 3), dtype=np.uint8)))


@pytest.fixture(scope="module")
def trace(tiny_clip, image):
    t = run_sync(tiny_clip.trace(image, CaptureSpec()))
    return t.with_text(tiny_clip.encode_text(PROMPTS))


@pytest.fixture(scope="module")
def pixels(tiny_clip, image):
    return tiny_clip.prepare(image).pixels


def run(host, method_id, trace, backend, target=TARGET, cancel=None, **params):
    p = host.make_params(method_id, params)
    return run_sync(host.run(method_id, trace, p, target=target, cancel=cancel or CancelToken(), backend=backend))


def text_vector(trace, i=0) -> torch.Tensor:
    return torch.from_numpy(np.asarray(trace.text.embeddings[i], dtype=np.float32))


def manual_logit(backend, pixels: torch.Tensor, text: torch.Tensor, leaf: str, layer: int | None = None):
    """The CLIP logit recomputed by hand from the weights; returns ``(y, leaf tensor)``.

    ``leaf='attention'``: block ``layer``'s post-softmax probabilities ``(1, H, N, N)`` are a leaf;
    ``leaf='hidden'``: the last block's output ``(1, N, D)`` is. Independent of the backend's probe
    and of ``gradient_pass``.
    """
    v = backend.model.visual
    x = v.conv1(pixels.float())
    x = x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)
    x = torch.cat([v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1), x], dim=1)
    x = v.ln_pre(x + v.positional_embedding)
    held = None
    for i, blk in enumerate(v.transformer.resblocks):
        mha = blk.attn
        h = blk.ln_1(x)
        B, N, D = h.shape
        H = mha.num_heads
        q, k, val = (h @ mha.in_proj_weight.T + mha.in_proj_bias).split(D, dim=-1)
        q, k, val = (z.reshape(B, N, H, D // H).transpose(1, 2) for z in (q, k, val))
        A = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), dim=-1)
        if leaf == "attention" and i == layer:
            A = A.detach().requires_grad_(True)
            held = A
        o = (A @ val).transpose(1, 2).reshape(B, N, D)
        x = x + blk.ls_1(mha.out_proj(o))
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    if leaf == "hidden":
        x = x.detach().requires_grad_(True)
        held = x
    pooled = v.ln_post(x)[:, 0] @ v.proj
    y = backend.model.logit_scale.exp() * (F.normalize(pooled, dim=-1)[0] @ F.normalize(text, dim=-1))
    return y, held


def manual_attention_and_grad(backend, pixels, text, layer):
    with torch.enable_grad():
        y, A = manual_logit(backend, pixels, text, "attention", layer)
        (g,) = torch.autograd.grad(y, A)
    return float(y.detach()), A[0].detach().double().numpy(), g[0].double().numpy()


def manual_hidden_and_grad(backend, pixels, text):
    with torch.enable_grad():
        y, x = manual_logit(backend, pixels, text, "hidden")
        (g,) = torch.autograd.grad(y, x)
    return float(y.detach()), x[0].detach().numpy(), g[0].numpy()


def self_text_trace(trace):
    """The trace with its image's own embedding as the only prompt: the logit is at its maximum
    over text directions, so every gradient of it vanishes (a real zero-gradient case)."""
    emb = trace.image_embedding[None].astype(np.float32)
    return trace.with_text(TextEncoding(prompts=("itself",), embeddings=emb))


# -- prepared_for (the backend's prepared-image cache) -------------------------------------------

def test_prepared_for_returns_the_traced_image(tiny_clip, trace, image):
    got = tiny_clip.prepared_for(trace)
    assert got.sha256 == trace.image_sha256 == image.sha256
    torch.testing.assert_close(got.pixels, tiny_clip.prepare(image).pixels)
    assert got.layout.n_image_tokens == trace.layout.n_image_tokens


def test_prepared_for_forgets_old_images_with_a_clear_error(tiny_clip_spec, make_image):
    from explorer.backends.clip import ClipBackend

    backend = ClipBackend.load(tiny_clip_spec)  # own instance: evicting must not touch the shared one
    first = run_sync(backend.trace(make_image(40, 50, seed=100), CaptureSpec()))
    assert backend.prepared_for(first).sha256 == first.image_sha256
    for s in range(backend.PREPARED_KEPT):
        backend.prepare(make_image(40, 50, seed=200 + s))
    with pytest.raises(ValueError, match="no longer held"):
        backend.prepared_for(first)
    with pytest.raises(ValueError, match="no longer held"):
        backend.prepared_for(dataclasses.replace(first, image_sha256="0" * 64))


# -- Chefer relevance (B2) -------------------------------------------------------------------------

def _random_attn_grad(rng, H=3, N=6):
    a = rng.random((H, N, N))
    return a / a.sum(-1, keepdims=True), rng.normal(size=(H, N, N))


def test_chefer_rules_invariants():
    rng = np.random.default_rng(0)
    pairs = [_random_attn_grad(rng) for _ in range(4)]
    R = chefer_relevance([a for a, _ in pairs], [g for _, g in pairs])
    assert (R >= 0).all() and (np.diag(R) >= 1).all()
    # rule 5 by hand for one block
    a, g = pairs[0]
    np.testing.assert_allclose(layer_relevance(a, g), np.maximum(a * g, 0).mean(0))
    # zero gradients: R = I
    np.testing.assert_array_equal(chefer_relevance([a for a, _ in pairs], [np.zeros_like(g) for _, g in pairs]),
                                  np.eye(6))
    # single block: scaling the target (the gradient) by c > 0 scales R - I by c
    for c in (0.5, 3.0):
        np.testing.assert_allclose(chefer_relevance([a], [c * g]) - np.eye(6),
                                   c * (chefer_relevance([a], [g]) - np.eye(6)), atol=1e-12)


def test_chefer_all_blocks_invariants_on_the_model(host, tiny_clip, trace):
    prepared = tiny_clip.prepared_for(trace)
    gp = tiny_clip.gradient_pass(prepared, trace.text.embeddings[0], attention_layers=[0, 1, 2])
    R = chefer_relevance([gp.attentions[l] for l in range(3)], [gp.attention_grads[l] for l in range(3)])
    assert (R >= 0).all() and (np.diag(R) >= 1 - 1e-12).all()
    assert (R - np.eye(len(R))).max() > 0  # the gradients are not all zero
    hm = run(host, "attribution.chefer", trace, tiny_clip, start_layer=0)
    np.testing.assert_allclose(hm.token_values, R[0, 1:], rtol=1e-5, atol=1e-9)
    assert (hm.token_values >= 0).all()
    assert hm.meta["layers"] == [0, 1, 2]


def test_chefer_matches_independent_autograd(host, tiny_clip, trace, pixels):
    """Default (last block only): the map is ``(I + mean_h (dy/dA ⊙ A)^+)[0, 1:]`` with ``A`` and
    ``dy/dA`` from the hand-written forward pass."""
    y, A, G = manual_attention_and_grad(tiny_clip, pixels, text_vector(trace), 2)
    gp = tiny_clip.gradient_pass(tiny_clip.prepared_for(trace), trace.text.embeddings[0], attention_layers=[2])
    assert gp.score == pytest.approx(y, rel=1e-5)
    np.testing.assert_allclose(gp.attentions[2], A, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gp.attention_grads[2], G, rtol=1e-3, atol=1e-6 * np.abs(G).max())
    ref = (np.eye(A.shape[-1]) + np.maximum(A * G, 0).mean(0))[0, 1:]
    hm = run(host, "attribution.chefer", trace, tiny_clip)
    np.testing.assert_allclose(hm.token_values, ref, rtol=1e-3, atol=1e-6 * ref.max())


def test_chefer_zero_gradient_gives_zero_map(host, tiny_clip, trace):
    normal = run(host, "attribution.chefer", trace, tiny_clip, start_layer=0).token_values
    flat = run(host, "attribution.chefer", self_text_trace(trace), tiny_clip, start_layer=0,
               target=Target(prompts=("itself",))).token_values
    assert normal.max() > 0
    assert np.abs(flat).max() < 1e-4 * normal.max()


def test_chefer_and_gradcam_scale_linearly_with_the_target(host, tiny_clip, trace):
    """Single block: multiplying CLIP's logit scale by c multiplies the target, its gradients and
    therefore ``R - I`` (the map) by c; Grad-CAM's clamped product scales the same way."""
    base_c = run(host, "attribution.chefer", trace, tiny_clip).token_values
    base_g = run(host, "attribution.gradcam", trace, tiny_clip).token_values
    scale = tiny_clip.model.logit_scale
    saved = scale.detach().clone()
    c = 2.5
    try:
        with torch.no_grad():
            scale.add_(math.log(c))
        scaled_c = run(host, "attribution.chefer", trace, tiny_clip).token_values
        scaled_g = run(host, "attribution.gradcam", trace, tiny_clip).token_values
    finally:
        with torch.no_grad():
            scale.copy_(saved)
    np.testing.assert_allclose(scaled_c, c * base_c, rtol=1e-4, atol=1e-6 * base_c.max())
    np.testing.assert_allclose(scaled_g, c * base_g, rtol=1e-4, atol=1e-6 * base_g.max())


def test_chefer_map_changes_with_the_prompt(host, tiny_clip, trace):
    a = run(host, "attribution.chefer", trace, tiny_clip, prompt_index=0).token_values
    b = run(host, "attribution.chefer", trace, tiny_clip, prompt_index=1).token_values
    assert not np.allclose(a, b, rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="prompt_index"):
        run(host, "attribution.chefer", trace, tiny_clip, prompt_index=2)
    with pytest.raises(ValueError, match="start_layer"):
        run(host, "attribution.chefer", trace, tiny_clip, start_layer=3)


# -- ALBEF-style Grad-CAM (B3, ITC) ----------------------------------------------------------------

def test_gradcam_formula_and_nonnegative():
    rng = np.random.default_rng(1)
    a, g = _random_attn_grad(rng, H=4, N=7)
    out = attention_gradcam(a, g)
    np.testing.assert_allclose(out, (a[:, 0, :] * np.maximum(g[:, 0, :], 0)).mean(0))
    assert (out >= 0).all()
    assert block_index(-4, 12) == 8 and block_index(-4, 3) == 0 and block_index(1, 3) == 1
    with pytest.raises(ValueError, match="out of range"):
        block_index(3, 3)


@pytest.mark.parametrize("layer", [-4, 1, 2])
def test_gradcam_matches_independent_autograd(host, tiny_clip, trace, pixels, layer):
    """The plugin's map equals ``mean_h A[:, 0, 1:] * clamp(dy/dA[:, 0, 1:], 0)`` at the block
    (``-4`` is block 0 on this 3-block model) with ``A``, ``dy/dA`` from the hand-written pass."""
    block = block_index(layer, 3)
    _, A, G = manual_attention_and_grad(tiny_clip, pixels, text_vector(trace, 1), block)
    ref = (A[:, 0, 1:] * np.maximum(G[:, 0, 1:], 0)).mean(0)
    hm = run(host, "attribution.gradcam", trace, tiny_clip, layer=layer, prompt_index=1)
    assert hm.meta["layer"] == block
    assert (hm.token_values >= 0).all() and hm.token_values.max() > 0
    np.testing.assert_allclose(hm.token_values, ref, rtol=1e-3, atol=1e-6 * ref.max())


def test_gradcam_zero_gradient_gives_zero_map(host, tiny_clip, trace):
    normal = run(host, "attribution.gradcam", trace, tiny_clip, layer=2).token_values
    flat = run(host, "attribution.gradcam", self_text_trace(trace), tiny_clip, layer=2,
               target=Target(prompts=("itself",))).token_values
    assert np.abs(flat).max() < 1e-4 * normal.max()


# -- gScoreCAM (B4) --------------------------------------------------------------------------------

def _scorer(backend, text: np.ndarray):
    def score(batch):
        return backend.score_inputs(batch, text_embedding=text, batch_size=batch.shape[0])
    return score


@pytest.fixture(scope="module")
def cam_inputs(tiny_clip, trace, pixels):
    """``(activations (C, h, w), importance (C,))`` at the last block's output from the hand-written
    pass: the patch grid of the hidden state and the [CLS] token's gradient (the plugin's default)."""
    _, x, g = manual_hidden_and_grad(tiny_clip, pixels, text_vector(trace))
    return grid_channels(trace.layout, x), g[trace.layout.cls_index].astype(np.float32)


def _gscorecam(tiny_clip, trace, pixels, acts, importance, k, batch_size=128):
    return run_sync(gscorecam_job(acts, importance, pixels, _scorer(tiny_clip, trace.text.embeddings[0]), k, batch_size))


def test_gscorecam_backend_activations_and_gradients_match_autograd(tiny_clip, trace, pixels):
    """The backend's hidden state ``L`` and its gradient equal the hand-written pass. Only [CLS]
    reaches the logit after the last block, so every patch token's gradient there is exactly 0:
    the patch-mean importance ranks nothing, which is why the default uses the [CLS] gradient."""
    _, x, g = manual_hidden_and_grad(tiny_clip, pixels, text_vector(trace))
    gp = tiny_clip.gradient_pass(tiny_clip.prepared_for(trace), trace.text.embeddings[0], hidden_layers=[3])
    np.testing.assert_allclose(gp.hidden[3], x, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gp.hidden_grads[3], g, rtol=1e-3, atol=1e-5 * np.abs(g).max())
    assert np.abs(g[0]).max() > 0
    assert not gp.hidden_grads[3][1:].any() and not g[1:].any()
    np.testing.assert_array_equal(token_importance(trace.layout, gp.hidden_grads[3], "patches"), 0.0)
    np.testing.assert_array_equal(token_importance(trace.layout, gp.hidden_grads[3], "cls"), gp.hidden_grads[3][0])
    assert auto_source(trace.layout, gp.hidden_grads[3]) == "cls"
    no_cls = gp.hidden_grads[3].copy()
    no_cls[0] = 0.0  # a tower pooling the patch tokens: the [CLS] gradient vanishes instead
    no_cls[1:] = 1.0
    assert auto_source(trace.layout, no_cls) == "patches"
    assert grid_channels(trace.layout, gp.hidden[3]).shape == (64, 8, 8)  # D channels on the 8x8 grid
    np.testing.assert_array_equal(grid_channels(trace.layout, gp.hidden[3])[:, 2, 5], gp.hidden[3][1 + 2 * 8 + 5])


def test_gscorecam_weights_sum_to_one_with_the_unscored_quirk(tiny_clip, trace, pixels, cam_inputs):
    acts, importance = cam_inputs
    out = _gscorecam(tiny_clip, trace, pixels, acts, importance, k=10, batch_size=4)
    C = acts.shape[0]
    assert out.weights.sum() == pytest.approx(1.0, abs=1e-12)
    # the 10 channels with the largest importance are scored (largest first), the others sit at 0
    np.testing.assert_array_equal(out.channels, np.argsort(-importance)[:10])
    z = np.exp(out.scores).sum() + (C - 10) * 1.0
    rest = np.delete(out.weights, out.channels)
    np.testing.assert_allclose(rest, 1.0 / z, rtol=1e-9)
    np.testing.assert_allclose(out.weights[out.channels], np.exp(out.scores) / z, rtol=1e-9)
    assert (out.cam >= 0).all() and out.cam.max() > 0
    np.testing.assert_allclose(out.cam, np.maximum(np.tensordot(out.weights, acts, 1), 0), rtol=1e-6, atol=1e-9)


def test_gscorecam_channel_permutation_invariance(tiny_clip, trace, pixels, cam_inputs):
    acts, importance = cam_inputs
    perm = np.random.default_rng(5).permutation(acts.shape[0])
    for k in (12, acts.shape[0]):
        a = _gscorecam(tiny_clip, trace, pixels, acts, importance, k)
        b = _gscorecam(tiny_clip, trace, pixels, acts[perm], importance[perm], k)
        np.testing.assert_allclose(b.cam, a.cam, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(b.weights, a.weights[perm], rtol=1e-5, atol=1e-12)


def test_gscorecam_with_all_channels_is_scorecam(tiny_clip, trace, pixels, cam_inputs):
    """k = C: an independent ScoreCAM (every channel: bilinear upsampling with aligned corners,
    min-max with the official 1e-6, mask the normalised input, CLIP logit by ``encode_image``;
    softmax weights; ReLU of the weighted sum)."""
    acts, importance = cam_inputs
    C = acts.shape[0]
    up = torch.nn.UpsamplingBilinear2d(size=tuple(pixels.shape[-2:]))(torch.from_numpy(acts)[None])[0]
    lo = up.amin(dim=(1, 2), keepdim=True)
    hi = up.amax(dim=(1, 2), keepdim=True)
    masked = pixels * ((up - lo) / (hi - lo + 1e-6))[:, None]
    with torch.no_grad():
        f = tiny_clip.model.encode_image(masked, normalize=True)
        s = (tiny_clip.model.logit_scale.exp() * f @ text_vector(trace)).double().numpy()
    w = np.exp(s - s.max())
    w /= w.sum()
    cam = np.maximum(np.tensordot(w, acts.astype(np.float64), 1), 0)
    out = _gscorecam(tiny_clip, trace, pixels, acts, importance, k=C, batch_size=16)
    assert len(out.channels) == C
    np.testing.assert_allclose(out.weights, w, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(out.cam, cam, rtol=1e-4, atol=1e-6 * cam.max())
    # topk above the width is clamped to C
    again = _gscorecam(tiny_clip, trace, pixels, acts, importance, k=10 * C)
    np.testing.assert_allclose(again.weights, out.weights, rtol=1e-5, atol=1e-12)


def test_gscorecam_plugin_matches_the_pieces_and_is_deterministic(host, tiny_clip, trace, pixels, cam_inputs):
    acts, importance = cam_inputs
    raw = run(host, "attribution.gscorecam", trace, tiny_clip, topk=20, batch_size=7, normalize=False)
    ref = _gscorecam(tiny_clip, trace, pixels, acts, importance, k=20)
    assert raw.meta["channels"] == [int(c) for c in ref.channels]
    np.testing.assert_allclose(raw.token_values, ref.cam.reshape(-1), rtol=1e-3, atol=1e-5 * ref.cam.max())
    assert raw.meta["weight_sum"] == pytest.approx(1.0, abs=1e-9)
    assert raw.meta["unscored_weight"] == pytest.approx(44 * np.delete(ref.weights, ref.channels)[0], rel=1e-4)
    a = run(host, "attribution.gscorecam", trace, tiny_clip)
    b = run(host, "attribution.gscorecam", trace, tiny_clip)
    np.testing.assert_array_equal(a.token_values, b.token_values)
    assert (a.token_values >= 0).all() and a.token_values.max() == pytest.approx(1.0, abs=1e-6)
    full = run(host, "attribution.gscorecam", trace, tiny_clip, normalize=False)
    np.testing.assert_allclose(a.token_values, normalize_cam(full.token_values), rtol=1e-5, atol=1e-7)
    # the default k = 300 scores every one of the tiny model's 64 channels: the importance source
    # cannot matter then
    patches = run(host, "attribution.gscorecam", trace, tiny_clip, gradient="patches")
    np.testing.assert_allclose(patches.token_values, a.token_values, rtol=1e-5, atol=1e-7)
    assert a.meta["gradient"] == "cls" and patches.meta["gradient"] == "patches"
    forced = run(host, "attribution.gscorecam", trace, tiny_clip, topk=20, normalize=False, gradient="cls")
    np.testing.assert_allclose(forced.token_values, raw.token_values, rtol=1e-5, atol=1e-7)  # batch 128 vs 7


def test_gscorecam_cancels_between_batches(host, tiny_clip, trace):
    tok = CancelToken()
    job = host.run("attribution.gscorecam", trace, host.make_params("attribution.gscorecam", {"batch_size": 8}),
                   target=TARGET, cancel=tok, backend=tiny_clip)
    seen = []
    before = tiny_clip.forward_count
    with pytest.raises(Cancelled):
        while True:
            step = next(job)
            if isinstance(step, Progress) and "scored" in step.message:
                seen.append(step.message)
                tok.cancel()
    assert seen == ["scored 8/64 channels"]
    assert tiny_clip.forward_count - before == 2  # the gradient pass and one scored batch


def test_masks_weights_and_combination_helpers():
    rng = np.random.default_rng(2)
    m = channel_masks(torch.from_numpy(rng.normal(size=(3, 4, 4)).astype(np.float32)), (16, 16))
    assert m.shape == (3, 16, 16)
    np.testing.assert_allclose(m.amin(dim=(1, 2)).numpy(), 0.0, atol=1e-7)
    np.testing.assert_allclose(m.amax(dim=(1, 2)).numpy(), 1.0, atol=1e-5)
    w = softmax_weights(np.array([np.nan, 2.0]), np.array([1, 0]), 3)  # NaN scores become 0
    np.testing.assert_allclose(w, np.exp([2.0, 0.0, 0.0]) / np.exp([2.0, 0.0, 0.0]).sum())
    assert (combine(rng.normal(size=(3, 2, 2)), np.ones(3) / 3) >= 0).all()
    g = rng.normal(size=(5, 2, 3))
    np.testing.assert_allclose(channel_importance(g), g.mean(axis=(1, 2)), rtol=1e-6)


# -- agreement with pytorch-grad-cam ---------------------------------------------------------------

class ClipLogits(torch.nn.Module):
    """The tiny CLIP as a classifier over the prompts: ``(B, 3, h, w) -> (B, T)`` logits."""

    def __init__(self, model, texts: np.ndarray):
        super().__init__()
        self.model = model
        self.register_buffer("texts", torch.from_numpy(np.asarray(texts, dtype=np.float32)))

    def forward(self, pixels):
        f = self.model.encode_image(pixels, normalize=True)
        return self.model.logit_scale.exp() * f @ self.texts.T


def vit_reshape(rows, cols):
    def transform(t):  # (B, N, D) -> (B, D, rows, cols), [CLS] dropped (gScoreCAM's reshape_transform)
        return t[:, 1:].reshape(t.shape[0], rows, cols, t.shape[-1]).permute(0, 3, 1, 2)
    return transform


def cls_reshape(t):  # (B, N, D) -> (B, D, 1, 1): the [CLS] token (gScoreCAM's cls_reshpae)
    return t[:, :1].permute(0, 2, 1)[..., None]


def test_agrees_with_pytorch_grad_cam(tiny_clip, trace, pixels):
    """What is compared, on the same model and target (prompt 1's logit), through
    pytorch-grad-cam's own hooks (``ActivationsAndGradients``) on a classifier wrapper:

    * ``GradCAM`` at ``resblocks[-2]`` with the ViT reshape transform (the patch gradients are not
      zero there): its activations and gradients vs the backend's hidden state ``L-1`` and its
      gradient; its channel weights (spatial mean of the gradient) vs
      :func:`channel_importance`; its token-grid map ``ReLU(Σ w A)`` vs :func:`combine`; its
      returned pixel map vs its own ``scale_cam_image`` applied to our grid;
    * ``GradCAM`` at ``resblocks[-1]`` (gScoreCAM's target layer): with the ViT reshape its
      activations are our channels and its patch gradients are all zero (as ours); with the
      [CLS] reshape (the official ``cls_reshpae``) its channel weights are gScoreCAM's default
      importance, :func:`token_importance` ``'cls'``;
    * ``ScoreCAM`` at ``resblocks[-1]``: its softmax weights (``get_cam_weights``: same aligned-
      corner upsampling, min-max and normalised-input masking; its min-max epsilon is 1e-8, the
      official gScoreCAM's 1e-6) vs gScoreCAM with ``k = C``, and its returned pixel map vs
      ``scale_cam_image`` of our cam.

    Chefer relevance and the ALBEF-style attention Grad-CAM are not compared with the package:
    both need the attention *probabilities* and their gradient, which are not the output of any
    module of open_clip's block (``nn.MultiheadAttention`` runs fused, ``need_weights=False``),
    while pytorch-grad-cam hooks module outputs, and its formulas (channel-mean weights over an
    activation grid) are not theirs. Their gradients are checked against the hand-written
    autograd above instead.
    """
    from pytorch_grad_cam import GradCAM, ScoreCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    seg = trace.layout.segments[0]
    blocks = tiny_clip.model.visual.transformer.resblocks
    wrapped = ClipLogits(tiny_clip.model, trace.text.embeddings)
    targets = [ClassifierOutputTarget(1)]
    size = tuple(pixels.shape[-2:])
    gp = tiny_clip.gradient_pass(tiny_clip.prepared_for(trace), trace.text.embeddings[1], hidden_layers=[2, 3])

    def grad_cam(layer, reshape):
        with GradCAM(model=wrapped, target_layers=[layer], reshape_transform=reshape) as cam:
            out = cam(input_tensor=pixels.clone(), targets=targets)
            a = cam.activations_and_grads.activations[0].numpy()
            g = cam.activations_and_grads.gradients[0].numpy()
            w = cam.get_cam_weights(pixels, layer, targets, a, g)[0]
            grid = np.maximum(cam.get_cam_image(pixels, layer, targets, a, g), 0)[0]
        assert not layer._forward_hooks, "pytorch-grad-cam hooks were not released"
        return out[0], a[0], g[0], w, grid

    # a layer with non-zero patch gradients: everything agrees
    out, a, g, w, grid = grad_cam(blocks[-2], vit_reshape(seg.rows, seg.cols))
    acts, grads = grid_channels(trace.layout, gp.hidden[2]), grid_channels(trace.layout, gp.hidden_grads[2])
    np.testing.assert_allclose(a, acts, rtol=1e-4, atol=1e-5)
    assert np.abs(grads).max() > 0
    np.testing.assert_allclose(g, grads, rtol=1e-3, atol=1e-5 * np.abs(grads).max())
    np.testing.assert_allclose(w, channel_importance(grads), rtol=1e-3, atol=1e-5 * np.abs(w).max())
    ours = combine(acts, channel_importance(grads))
    assert ours.max() > 0
    np.testing.assert_allclose(grid, ours, rtol=1e-3, atol=1e-5 * ours.max())
    np.testing.assert_allclose(out, scale_cam_image(scale_cam_image(ours[None], size[::-1]))[0], atol=1e-4)

    # gScoreCAM's layer: patch gradients vanish; the [CLS] gradient is the importance
    acts = grid_channels(trace.layout, gp.hidden[3])
    _, a, g, _, _ = grad_cam(blocks[-1], vit_reshape(seg.rows, seg.cols))
    np.testing.assert_allclose(a, acts, rtol=1e-4, atol=1e-5)
    assert not g.any()
    _, _, _, w, _ = grad_cam(blocks[-1], cls_reshape)
    importance = token_importance(trace.layout, gp.hidden_grads[3], "cls")
    np.testing.assert_allclose(w, importance, rtol=1e-3, atol=1e-5 * np.abs(importance).max())

    C = acts.shape[0]
    with ScoreCAM(model=wrapped, target_layers=[blocks[-1]], reshape_transform=vit_reshape(seg.rows, seg.cols)) as sc:
        sc.batch_size = 16
        their_w = sc.get_cam_weights(pixels, blocks[-1], targets, acts[None], None)[0]
        their_out = sc(input_tensor=pixels.clone(), targets=targets)[0]
    assert not blocks[-1]._forward_hooks
    mine = run_sync(gscorecam_job(acts, importance, pixels, _scorer(tiny_clip, trace.text.embeddings[1]), topk=C))
    np.testing.assert_allclose(their_w, mine.weights, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(their_out, scale_cam_image(scale_cam_image(mine.cam[None], size[::-1]))[0], atol=1e-4)
