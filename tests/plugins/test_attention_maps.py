"""Raw attention, rollout (catalog B1 invariants) and MaskCLIP (catalog B6 invariants)."""

import numpy as np
import pytest
import torch

from explorer.core.jobs import CancelToken, run_sync
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.host import PluginHost
from explorer_plugins.attention_rollout.method import residual_augment, rollout
from explorer_plugins.maskclip.method import dense_features


@pytest.fixture(scope="module")
def host():
    return PluginHost()


@pytest.fixture(scope="module")
def trace(tiny_clip):
    from explorer.core.image_io import load_image
    from explorer.testing.images import png_bytes

    rng = np.random.default_rng(11)
    img = load_image(png_bytes(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)))
    t = run_sync(tiny_clip.trace(img, CaptureSpec.everything(3)))
    return t.with_text(tiny_clip.encode_text(["a red circle", "a blue square"]))


def run(host, method_id, trace, target=Target(), backend=None, **params):
    p = host.make_params(method_id, params)
    return run_sync(host.run(method_id, trace, p, target=target, cancel=CancelToken(), backend=backend))


# -- rollout invariants (B1) ------------------------------------------------------------------

def _random_attn(rng, H, N):
    a = rng.random((H, N, N))
    return a / a.sum(-1, keepdims=True)


def test_rollout_rows_sum_to_one_and_nonnegative():
    rng = np.random.default_rng(0)
    attns = [_random_attn(rng, 3, 6) for _ in range(4)]
    R = rollout(attns)
    np.testing.assert_allclose(R.sum(-1), 1.0, atol=1e-12)
    assert (R >= 0).all()
    for a in attns:
        np.testing.assert_allclose(residual_augment(a.mean(0)).sum(-1), 1.0, atol=1e-12)


def test_rollout_identity_and_uniform_layer():
    N = 5
    eye = np.eye(N)[None].repeat(2, 0)
    np.testing.assert_allclose(rollout([eye, eye, eye]), np.eye(N), atol=1e-12)
    uniform = np.full((2, N, N), 1.0 / N)
    R = rollout([eye, uniform, eye])
    np.testing.assert_allclose(R, 0.5 * np.eye(N) + 0.5 / N, atol=1e-12)


def test_rollout_equals_product_of_augmented_layers():
    rng = np.random.default_rng(1)
    attns = [_random_attn(rng, 2, 4) for _ in range(3)]
    aug = [(a.mean(0) + np.eye(4)) / (a.mean(0) + np.eye(4)).sum(-1, keepdims=True) for a in attns]
    np.testing.assert_allclose(rollout(attns), aug[2] @ aug[1] @ aug[0], atol=1e-12)


def test_rollout_plugin_matches_reference(host, trace):
    hm = run(host, "attention.rollout", trace)
    R = rollout([trace.attentions[l] for l in range(3)], keep=0)
    np.testing.assert_allclose(hm.token_values, R[0, 1:], atol=1e-6)
    hm2 = run(host, "attention.rollout", trace, start_layer=1, end_layer=2, head_fusion="max")
    R2 = rollout([trace.attentions[1], trace.attentions[2]], head_fusion="max")
    np.testing.assert_allclose(hm2.token_values, R2[0, 1:], atol=1e-6)
    q = int(trace.layout.image_token_indices()[10])
    hm3 = run(host, "attention.rollout", trace, target=Target(query=q))
    np.testing.assert_allclose(hm3.token_values, R[q, 1:], atol=1e-6)


def test_rollout_bad_layers(host, trace):
    with pytest.raises(ValueError, match="start_layer 2 is after end_layer 1"):
        run(host, "attention.rollout", trace, start_layer=2, end_layer=1)


# -- raw attention ----------------------------------------------------------------------------

def test_raw_attention_is_the_query_row(host, trace):
    hm = run(host, "attention.raw", trace, layer=1, head=2)
    np.testing.assert_allclose(hm.token_values, trace.attentions[1][2, 0, 1:], atol=1e-7)
    hm = run(host, "attention.raw", trace, layer=-1)
    np.testing.assert_allclose(hm.token_values, trace.attentions[2][:, 0, 1:].mean(0), atol=1e-7)
    q = int(trace.layout.image_token_indices()[5])
    hm = run(host, "attention.raw", trace, target=Target(query=q), layer=0, head=0)
    np.testing.assert_allclose(hm.token_values, trace.attentions[0][0, q, 1:], atol=1e-7)
    with pytest.raises(ValueError, match="head 9 out of range"):
        run(host, "attention.raw", trace, head=9)
    with pytest.raises(ValueError, match="out of range"):
        run(host, "attention.raw", trace, layer=7)


# -- MaskCLIP invariants (B6) -----------------------------------------------------------------

def test_maskclip_equals_clip_with_identity_last_attention(host, trace, tiny_clip):
    """Independent reference: the last block by hand with attention forced to the identity."""
    blk = tiny_clip.model.visual.transformer.resblocks[-1]
    x = torch.from_numpy(trace.hidden(2))[None]
    with torch.no_grad():
        u = blk.ln_1(x)
        D = u.shape[-1]
        v = u @ blk.attn.in_proj_weight[2 * D:].T + blk.attn.in_proj_bias[2 * D:]
        y = x + blk.attn.out_proj(v)
        y = y + blk.mlp(blk.ln_2(y))
        f = tiny_clip.model.visual.ln_post(y) @ tiny_clip.model.visual.proj
        f = torch.nn.functional.normalize(f[0, 1:], dim=-1).numpy()
    t = trace.text.embeddings
    tgt = Target(prompts=trace.text.prompts)
    hm = run(host, "similarity.maskclip", trace, target=tgt, backend=tiny_clip, templates="none")
    assert hm.token_values.shape == (64,)  # [CLS] excluded
    np.testing.assert_allclose(hm.token_values, f @ t[0], atol=1e-5)
    hm1 = run(host, "similarity.maskclip", trace, target=tgt, backend=tiny_clip, prompt_index=1, templates="none")
    np.testing.assert_allclose(hm1.token_values, f @ t[1], atol=1e-5)
    sm = run(host, "similarity.maskclip", trace, target=tgt, backend=tiny_clip, mode="softmax", templates="none")
    assert ((sm.token_values > 0) & (sm.token_values < 1)).all()
    # templates: CLIP's 80 ImageNet templates, each normalised, averaged, renormalised
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    with torch.no_grad():
        ids = tiny_clip.tokenizer([tmpl(trace.text.prompts[0]) for tmpl in OPENAI_IMAGENET_TEMPLATES])
        e = torch.nn.functional.normalize(tiny_clip.model.encode_text(ids), dim=-1).mean(0)
        e = torch.nn.functional.normalize(e, dim=0).numpy()
    hm80 = run(host, "similarity.maskclip", trace, target=tgt, backend=tiny_clip, templates="imagenet-80")
    np.testing.assert_allclose(hm80.token_values, f @ e, atol=1e-5)
    # auto on a real CLIP: MaskCLIP's own 85 (the official list, tests/golden/maskclip_templates.npz)
    from pathlib import Path

    with np.load(Path(__file__).resolve().parents[1] / "golden" / "maskclip_templates.npz") as z:
        official = [str(t) for t in z["templates"]]
    with torch.no_grad():
        ids = tiny_clip.tokenizer([tmpl.format(trace.text.prompts[0]) for tmpl in official])
        e85 = torch.nn.functional.normalize(tiny_clip.model.encode_text(ids), dim=-1).mean(0)
        e85 = torch.nn.functional.normalize(e85, dim=0).numpy()
    hm85 = run(host, "similarity.maskclip", trace, target=tgt, backend=tiny_clip)  # auto
    np.testing.assert_allclose(hm85.token_values, f @ e85, atol=1e-5)
    lm = run(host, "similarity.maskclip", trace, target=tgt, backend=tiny_clip, output="labels", templates="none",
             background="sky, grass")
    assert lm.class_names == trace.text.prompts and lm.scores.shape == (2, 64)
    assert set(np.unique(lm.labels)) <= {-1, 0, 1}


def test_maskclip_locality(trace, tiny_clip):
    """A patch's output depends only on its own last-layer input."""
    base = dense_features(tiny_clip, trace)
    hidden = dict(trace.hidden_states)
    h = hidden[2].copy()
    h[20] += np.random.default_rng(0).normal(size=h.shape[1]).astype(np.float32) * 3
    from dataclasses import replace

    changed = dense_features(tiny_clip, replace(trace, hidden_states={**hidden, 2: h}))
    diff = np.abs(changed - base).max(-1)
    assert diff[20] > 1e-3
    assert np.delete(diff, 20).max() < 1e-6


def test_maskclip_needs_prompts_and_the_model(host, trace, tiny_clip):
    with pytest.raises(ValueError, match="needs a text prompt"):
        run(host, "similarity.maskclip", trace, backend=tiny_clip)
    with pytest.raises(ValueError, match="needs the loaded model"):
        run(host, "similarity.maskclip", trace, target=Target(prompts=("x",)))
    with pytest.raises(ValueError, match="prompt_index 5"):
        run(host, "similarity.maskclip", trace, target=Target(prompts=trace.text.prompts), backend=tiny_clip, prompt_index=5)
