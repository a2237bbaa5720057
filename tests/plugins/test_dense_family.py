"""The training-free dense CLIP family (catalog B7-B13): each method's invariants, and agreement
with an independent reference written here from the block weights (ln_1, in_proj slices,
out_proj, mlp, ln_post, proj) on the tiny test model (3 blocks, 4 heads, 8x8 grid). GEM has no
reference here: its math is compared with the official code in test_golden_gem.py."""

import dataclasses
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from explorer.core.jobs import Cancelled, CancelToken, run_sync
from explorer.core.results import Heatmap, LabelMap
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.host import PluginHost
from explorer_plugins.clip_surgery.method import feature_surgery, surgery_features
from explorer_plugins.clsclip.method import clsclip_features
from explorer_plugins.gem.method import adaptive_inverse_temperature, gem_features, gem_paths, self_self_weights
from explorer_plugins.naclip.method import grid_gaussian, neighbourhood_bias

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def host():
    return PluginHost()


@pytest.fixture(scope="module")
def trace(tiny_clip):
    from explorer.core.image_io import load_image
    from explorer.testing.images import png_bytes

    rng = np.random.default_rng(5)
    img = load_image(png_bytes(rng.integers(0, 256, (80, 112, 3), dtype=np.uint8)))
    t = run_sync(tiny_clip.trace(img, CaptureSpec.everything(3)))
    return t.with_text(tiny_clip.encode_text(PROMPTS))


def run(host, method_id, trace, backend, target=None, **params):
    target = target or Target(prompts=trace.text.prompts)
    p = host.make_params(method_id, params)
    return run_sync(host.run(method_id, trace, p, target=target, cancel=CancelToken(), backend=backend))


def maps(host, method_id, trace, backend, **params):
    """``(n_patches, n_prompts)``: every prompt's map as typed (no templates)."""
    cols = [run(host, method_id, trace, backend, templates="none", prompt_index=i, **params).token_values
            for i in range(len(trace.text.prompts))]
    return np.stack(cols, 1)


# -- the reference, from the weights ------------------------------------------------------------

def blocks(tiny_clip):
    return list(tiny_clip.model.visual.transformer.resblocks)


def split_heads(t, H):
    B, N, D = t.shape
    return t.reshape(B, N, H, D // H).transpose(1, 2)


def ref_qkv(blk, x):
    """ln_1 then the in_proj slices: ``(u, q, k, v)`` with q, k, v ``(1, H, N, dh)``."""
    u = blk.ln_1(x)
    D = u.shape[-1]
    W, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
    H = blk.attn.num_heads
    q = u @ W[:D].T + b[:D]
    k = u @ W[D:2 * D].T + b[D:2 * D]
    v = u @ W[2 * D:].T + b[2 * D:]
    return u, split_heads(q, H), split_heads(k, H), split_heads(v, H)


def ref_out(blk, o):
    B, H, N, dh = o.shape
    return blk.attn.out_proj(o.transpose(1, 2).reshape(B, N, H * dh))


def ref_ffn(blk, y):
    return y + blk.mlp(blk.ln_2(y))


def ref_project(tiny_clip, y):
    v = tiny_clip.model.visual
    return F.normalize(v.ln_post(y) @ v.proj, dim=-1)[0].numpy()


def sm(z):
    return torch.softmax(z, dim=-1)


def hidden(trace, i):
    return torch.from_numpy(trace.hidden(i))[None]


def scale(q):
    return q.shape[-1] ** -0.5


# -- SCLIP (B7) ----------------------------------------------------------------------------------

def test_sclip_equals_reference_and_rows_sum_to_two(host, trace, tiny_clip):
    from explorer_plugins.sclip.method import csa_weights

    blk = blocks(tiny_clip)[-1]
    x = hidden(trace, 2)
    with torch.no_grad():
        _, q, k, v = ref_qkv(blk, x)
        s = scale(q)
        qq, kk = s * q @ q.transpose(-1, -2), s * k @ k.transpose(-1, -2)
        torch.testing.assert_close(qq, qq.transpose(-1, -2))  # symmetric before the softmax
        A = sm(qq) + sm(kk)
        torch.testing.assert_close(A.sum(-1), torch.full(A.shape[:-1], 2.0))
        f = ref_project(tiny_clip, ref_ffn(blk, x + ref_out(blk, A @ v)))  # residual and FFN kept
        adapter, pq, pk, _ = tiny_clip.block_qkv(2, x)
        torch.testing.assert_close(csa_weights(adapter, pq, pk), A, atol=1e-6, rtol=1e-5)
        # identical tokens: both softmaxes are uniform
        same = x[:, :1].repeat(1, x.shape[1], 1)
        adapter, pq, pk, _ = tiny_clip.block_qkv(2, same)
        w = csa_weights(adapter, pq, pk)
        torch.testing.assert_close(w, torch.full_like(w, 2.0 / x.shape[1]))
    np.testing.assert_allclose(maps(host, "similarity.sclip", trace, tiny_clip), f[1:] @ trace.text.embeddings.T, atol=1e-5)
    p = host.make_params("similarity.sclip", {})
    assert p.logit_scale == 40 and p.prob_threshold == 0


# -- ClearCLIP (B8) ------------------------------------------------------------------------------

def test_clearclip_last_block_is_exactly_out_proj_of_qq_attention(host, trace, tiny_clip):
    from explorer_plugins.clearclip.method import last_block

    blk = blocks(tiny_clip)[-1]
    x = hidden(trace, 2)
    with torch.no_grad():
        _, q, _, v = ref_qkv(blk, x)
        A = sm(scale(q) * q @ q.transpose(-1, -2))
        torch.testing.assert_close(A.sum(-1), torch.ones(A.shape[:-1]))
        y_ref = ref_out(blk, A @ v)  # no x term, no FFN
        y = last_block(tiny_clip, x)
        torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
        f = ref_project(tiny_clip, y_ref)
    np.testing.assert_allclose(maps(host, "similarity.clearclip", trace, tiny_clip), f[1:] @ trace.text.embeddings.T, atol=1e-5)
    p = host.make_params("similarity.clearclip", {})
    assert p.logit_scale == 50 and p.prob_threshold == 0
    assert "0.5" in type(p).model_fields["prob_threshold"].description
    lm = run(host, "similarity.clearclip", trace, tiny_clip, templates="none", output="labels")
    logits = f[1:] @ trace.text.embeddings.T
    np.testing.assert_array_equal(lm.labels, logits.argmax(1))


# -- NACLIP (B11) --------------------------------------------------------------------------------

def official_addition(rows, cols, std):
    """NACLIP's own construction: a (2h-1)x(2w-1) Gaussian window convolved with one-hot maps,
    then zero [CLS] row and column."""
    consts = 1 / (std * np.sqrt(2))
    ks = [torch.linspace(-(d - 1) / 2 * consts, (d - 1) / 2 * consts, d) for d in (2 * rows - 1, 2 * cols - 1)]
    window = torch.exp(-(torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0))
    m = torch.einsum("ij,kl->ijkl", torch.eye(rows), torch.eye(cols)).permute(0, 3, 1, 2).contiguous()
    out = F.conv2d(m.view(-1, rows, cols).unsqueeze(1), window[None, None], padding="same").squeeze(1)
    out = out.view(rows * cols, rows * cols)
    out = torch.vstack([torch.zeros((1, rows * cols)), out])
    return torch.hstack([torch.zeros((rows * cols + 1, 1)), out]).numpy()


def test_naclip_omega_properties(trace):
    omega = neighbourhood_bias(trace.layout, 5.0)
    N = trace.layout.n_tokens
    assert omega.shape == (N, N)
    np.testing.assert_array_equal(omega, omega.T)
    assert (omega[0] == 0).all() and (omega[:, 0] == 0).all()  # [CLS] row and column
    patches = omega[1:, 1:]
    np.testing.assert_allclose(np.diag(patches), 1.0)
    assert (patches > 0).all() and (patches <= 1).all()
    row0 = patches[0, :8]  # patch (0, 0) against (0, c): decreasing with the distance
    assert (np.diff(row0) < 0).all()
    np.testing.assert_allclose(patches[0, 8 + 1], np.exp(-2 / 50), rtol=1e-6)  # (0,0)-(1,1): d² = 2
    np.testing.assert_allclose(omega, official_addition(8, 8, 5.0), atol=1e-6)
    # non-square grid, another std: the closed form equals the official convolution
    np.testing.assert_allclose(grid_gaussian(3, 5, 1.3), official_addition(3, 5, 1.3)[1:, 1:], atol=1e-6)
    # std -> 0: the identity on the patches
    np.testing.assert_allclose(grid_gaussian(8, 8, 0.05), np.eye(64), atol=1e-30)


@pytest.mark.parametrize("std", [5.0, 1.5])
def test_naclip_equals_reference(host, trace, tiny_clip, std):
    blk = blocks(tiny_clip)[-1]
    x = hidden(trace, 2)
    omega = torch.from_numpy(official_addition(8, 8, std)).float()
    with torch.no_grad():
        _, _, k, v = ref_qkv(blk, x)
        A = sm(scale(k) * k @ k.transpose(-1, -2) + omega)
        torch.testing.assert_close(A.sum(-1), torch.ones(A.shape[:-1]))
        f = ref_project(tiny_clip, ref_out(blk, A @ v))  # no residual, no FFN
    np.testing.assert_allclose(maps(host, "similarity.naclip", trace, tiny_clip, gaussian_std=std),
                               f[1:] @ trace.text.embeddings.T, atol=1e-5)
    assert host.make_params("similarity.naclip", {}).logit_scale == 40
    assert "not implemented" in host.method("similarity.naclip").contribution.adaptation


# -- SegEarth-OV (B12) ---------------------------------------------------------------------------

def test_segearth_reference_and_cls_bias_keeps_each_prompts_ranking(host, trace, tiny_clip):
    blk = blocks(tiny_clip)[-1]
    x = hidden(trace, 2)
    with torch.no_grad():
        _, q, k, v = ref_qkv(blk, x)
        s = scale(q)
        A = sm(s * q @ q.transpose(-1, -2)) + sm(s * k @ k.transpose(-1, -2)) + sm(s * v @ v.transpose(-1, -2))
        torch.testing.assert_close(A.sum(-1), torch.full(A.shape[:-1], 3.0))
        f = ref_project(tiny_clip, ref_out(blk, A @ v))
    T = trace.text.embeddings
    cos = f[1:] @ T.T
    cls_cos = f[0] @ T.T  # the [CLS] of the modified block
    # lambda = 0: plain qq+kk+vv attention, no residual, no FFN
    np.testing.assert_allclose(maps(host, "similarity.segearth_ov", trace, tiny_clip, cls_token_lambda=0.0), cos, atol=1e-5)
    assert host.make_params("similarity.segearth_ov", {}).cls_token_lambda == -0.3
    biased = maps(host, "similarity.segearth_ov", trace, tiny_clip)
    np.testing.assert_allclose(biased, cos - 0.3 * cls_cos[None, :], atol=1e-5)
    for kk in range(2):  # a constant per prompt: the spatial ranking is unchanged
        np.testing.assert_array_equal(np.argsort(biased[:, kk], kind="stable"), np.argsort(cos[:, kk], kind="stable"))
    lm = run(host, "similarity.segearth_ov", trace, tiny_clip, templates="none", output="labels", cls_token_lambda=-2.0)
    np.testing.assert_array_equal(lm.labels, (cos - 2.0 * cls_cos[None, :]).argmax(1))
    assert host.make_params("similarity.segearth_ov", {}).logit_scale == 50


def test_segearth_refuses_the_upsampler(host, trace, tiny_clip):
    with pytest.raises(ValueError, match="SimFeatUp upsampler is not supported"):
        run(host, "similarity.segearth_ov", trace, tiny_clip, simfeatup_checkpoint="/x/xclip_jbu_one_million_aid.ckpt")


# -- CLIP Surgery (B9) ---------------------------------------------------------------------------

def ref_surgery(tiny_clip, trace, start):
    bl = blocks(tiny_clip)
    x_ori = x_new = hidden(trace, start)
    with torch.no_grad():
        for blk in bl[start:]:
            _, q, k, v = ref_qkv(blk, x_ori)
            A_new = sm(scale(v) * v @ v.transpose(-1, -2))
            torch.testing.assert_close(A_new.sum(-1), torch.ones(A_new.shape[:-1]))
            x_new = x_new + ref_out(blk, A_new @ v)  # no FFN on the new path
            x_ori = ref_ffn(blk, x_ori + ref_out(blk, sm(scale(q) * q @ k.transpose(-1, -2)) @ v))
        x_new = x_new.clone()
        x_new[:, 0] = x_ori[:, 0]
        return ref_project(tiny_clip, x_new), x_ori


def ref_feature_surgery(Fe, T):
    """The official elementwise form."""
    prob = torch.softmax(2 * torch.from_numpy(Fe[:1] @ T.T), -1)
    w = prob / prob.mean(-1, keepdim=True)
    feats = torch.from_numpy(Fe)[:, None, :] * torch.from_numpy(T)[None, :, :] * w.reshape(1, -1, 1)
    feats = feats - feats.mean(1, keepdim=True)
    return feats.sum(-1).numpy()


def test_clip_surgery_equals_reference_sums_to_zero_and_keeps_cls(host, trace, tiny_clip):
    Fe, x_ori = ref_surgery(tiny_clip, trace, 0)  # 3 blocks < 6: all blocks
    np.testing.assert_allclose(x_ori[0].numpy(), trace.hidden(3), atol=1e-5)  # the original path is vanilla CLIP
    feats = surgery_features(tiny_clip, trace, 6)
    np.testing.assert_allclose(feats, Fe, atol=1e-5)
    # the [CLS] output is the original CLIP [CLS]: the image embedding is unchanged
    np.testing.assert_allclose(feats[0], trace.image_embedding, atol=1e-5)
    T = trace.text.embeddings
    sim = ref_feature_surgery(Fe, T)
    got = maps(host, "similarity.clip_surgery", trace, tiny_clip)
    np.testing.assert_allclose(got, sim[1:], atol=1e-5)
    np.testing.assert_allclose(got.sum(1), 0.0, atol=1e-6)  # Σ_k sim[n, k] = 0
    hm = run(host, "similarity.clip_surgery", trace, tiny_clip, templates="none")
    assert hm.signed and hm.meta["redundancy"] == "classes" and hm.meta["modified_blocks"] == 3
    # three classes (a background prompt included): still Σ_k = 0, equal to the elementwise form
    T3 = tiny_clip.encode_text(PROMPTS + ["grass"]).embeddings
    s3 = feature_surgery(feats, T3, cls_index=0)
    np.testing.assert_allclose(s3, ref_feature_surgery(feats, T3), atol=1e-6)
    np.testing.assert_allclose(s3.sum(1), 0.0, atol=1e-6)
    lm = run(host, "similarity.clip_surgery", trace, tiny_clip, templates="none", output="labels", background="grass")
    np.testing.assert_array_equal(lm.labels, np.where(s3[1:].argmax(1) == 2, -1, s3[1:].argmax(1)))
    assert host.method("similarity.clip_surgery").contribution.repository == "https://github.com/xmed-lab/CLIP_Surgery"


def test_clip_surgery_fewer_blocks_and_capture(host, trace, tiny_clip):
    method = host.load("similarity.clip_surgery")
    p = host.make_params("similarity.clip_surgery", {"n_blocks": 1})
    # the modified blocks' inputs and the last output: the original path is read from the trace
    assert method.capture(p, tiny_clip.info, Target()).hidden_layers == {2, 3}
    assert method.capture(host.make_params("similarity.clip_surgery", {}), tiny_clip.info, Target()).hidden_layers == {0, 1, 2, 3}
    Fe, _ = ref_surgery(tiny_clip, trace, 2)
    np.testing.assert_allclose(surgery_features(tiny_clip, trace, 1), Fe, atol=1e-5)
    # a trace holding only the first modified block's input: the original path is recomputed
    only_start = dataclasses.replace(trace, hidden_states={2: trace.hidden(2)})
    np.testing.assert_allclose(surgery_features(tiny_clip, only_start, 1), Fe, atol=1e-5)
    np.testing.assert_allclose(maps(host, "similarity.clip_surgery", trace, tiny_clip, n_blocks=1),
                               ref_feature_surgery(Fe, trace.text.embeddings)[1:], atol=1e-5)


def test_clip_surgery_single_prompt_subtracts_the_empty_string(host, trace, tiny_clip):
    one = trace.with_text(tiny_clip.encode_text(PROMPTS[:1]))
    Fe, _ = ref_surgery(tiny_clip, trace, 0)
    with torch.no_grad():
        r = F.normalize(tiny_clip.model.encode_text(tiny_clip.tokenizer([""])), dim=-1)[0].numpy()
    t = one.text.embeddings[0]
    hm = run(host, "similarity.clip_surgery", one, tiny_clip, templates="none")
    np.testing.assert_allclose(hm.token_values, Fe[1:] @ (t - r), atol=1e-5)
    assert hm.meta["redundancy"] == "empty"
    with pytest.raises(ValueError, match="2 or more prompts"):
        run(host, "similarity.clip_surgery", one, tiny_clip, templates="none", redundancy="classes")
    # with a single prompt and no redundant feature the similarity would vanish identically
    np.testing.assert_allclose(feature_surgery(Fe, one.text.embeddings, 0), 0.0, atol=1e-7)


# -- GEM (B10) -----------------------------------------------------------------------------------
# Its math is compared with the official WalBouss/GEM in test_golden_gem.py (tests/golden/gem.npz);
# here only invariants that need no reference.

def test_gem_keeps_raw_cosine_single_template_and_vanilla_original_path(host, trace, tiny_clip):
    Fe = gem_features(tiny_clip, trace)
    with torch.no_grad():
        _, ori = gem_paths(tiny_clip, hidden(trace, 0), 0)
    np.testing.assert_allclose(ori[0].numpy(), trace.hidden(3), atol=1e-5)  # the original path is vanilla CLIP
    # a trace holding only the first modified block's input: the original path is recomputed, same features
    only_start = dataclasses.replace(trace, hidden_states={0: trace.hidden(0)})
    np.testing.assert_allclose(gem_features(tiny_clip, only_start), Fe, atol=1e-5)
    got = maps(host, "similarity.gem", trace, tiny_clip)
    np.testing.assert_allclose(got, Fe[1:] @ trace.text.embeddings.T, atol=1e-5)  # raw cosine, no min-max
    # default templates: GEM's single "a photo of a {}."
    with torch.no_grad():
        t = F.normalize(tiny_clip.model.encode_text(tiny_clip.tokenizer([f"a photo of a {PROMPTS[1]}."])), dim=-1)[0].numpy()
    hm = run(host, "similarity.gem", trace, tiny_clip, prompt_index=1)
    np.testing.assert_allclose(hm.token_values, Fe[1:] @ t, atol=1e-5)
    p = host.make_params("similarity.gem", {})
    assert (p.templates, p.prob_threshold, p.n_blocks, p.iterations, p.temperature) == ("single", 0.85, 6, 1, None)
    assert np.abs(gem_features(tiny_clip, trace, iterations=2) - Fe).max() > 1e-4


def test_gem_attention_is_row_stochastic_and_temperature_adaptive(trace, tiny_clip):
    x = hidden(trace, 2)
    with torch.no_grad():
        adapter, q, k, v = tiny_clip.block_qkv(2, x)
        for tau in (0.5, 7.0):
            ws = self_self_weights(q, k, v, tau, 1)
            for w in ws + [sum(ws) / 3]:
                assert (w >= 0).all()
                torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
        # the adaptive inverse temperature of the last block: mean norm of its ln_1 output times dh^-1/2
        tau = float(adaptive_inverse_temperature(tiny_clip.block_input_norm(2, x), q.shape[-1]))
        u = tiny_clip.model.visual.transformer.resblocks[2].ln_1(x)
    np.testing.assert_allclose(tau, float(u.norm(dim=-1).mean()) * q.shape[-1] ** -0.5, rtol=1e-6)
    # a fixed temperature equal to the adaptive one gives the same features; another does not
    Fe = gem_features(tiny_clip, trace, n_blocks=1)
    np.testing.assert_allclose(gem_features(tiny_clip, trace, n_blocks=1, temperature=tau), Fe, atol=1e-5)
    assert np.abs(gem_features(tiny_clip, trace, n_blocks=1, temperature=tau * 5) - Fe).max() > 1e-4


# -- ClsCLIP (B13, experimental) -----------------------------------------------------------------

def ref_clsclip(tiny_clip, trace, t, shallow):
    bl = blocks(tiny_clip)
    proj = tiny_clip.model.visual.proj
    with torch.no_grad():
        c = torch.from_numpy(t) @ torch.linalg.pinv(proj)
        torch.testing.assert_close(c @ proj, torch.from_numpy(t), atol=1e-5, rtol=1e-5)
        x = hidden(trace, 0)
        for i, blk in enumerate(bl[:-1]):
            if i < shallow:
                x = x.clone()
                x[:, 0] = c * x[:, 0].norm() / c.norm()
            x = blk(x)
        blk = bl[-1]
        _, _, _, v = ref_qkv(blk, x)
        y = ref_ffn(blk, x + ref_out(blk, v))  # MaskCLIP readout
        return ref_project(tiny_clip, y)


def test_clsclip_equals_reference_one_pass_per_prompt(host, trace, tiny_clip):
    T = trace.text.embeddings
    F0, F1 = (ref_clsclip(tiny_clip, trace, T[k], 2) for k in range(2))  # 3 blocks: shallow 3 -> 2
    np.testing.assert_allclose(clsclip_features(tiny_clip, trace, T[0], 3), F0, atol=1e-5)
    assert np.abs(F0 - F1).max() > 1e-4  # the pass depends on the prompt
    got = maps(host, "similarity.clsclip", trace, tiny_clip)
    np.testing.assert_allclose(got, np.stack([F0[1:] @ T[0], F1[1:] @ T[1]], 1), atol=1e-5)
    hm = run(host, "similarity.clsclip", trace, tiny_clip, templates="none")
    assert hm.meta["shallow_layers"] == 2 and hm.meta["experimental"]
    lm = run(host, "similarity.clsclip", trace, tiny_clip, templates="none", output="labels")
    assert isinstance(lm, LabelMap)
    np.testing.assert_array_equal(lm.labels, got.argmax(1))
    Fs1 = ref_clsclip(tiny_clip, trace, T[0], 1)
    hm1 = run(host, "similarity.clsclip", trace, tiny_clip, templates="none", shallow_layers=1)
    np.testing.assert_allclose(hm1.token_values, Fs1[1:] @ T[0], atol=1e-5)
    method = host.load("similarity.clsclip")
    assert method.capture(host.make_params("similarity.clsclip", {}), tiny_clip.info, Target()).hidden_layers == {0}
    assert "experimental" in host.method("similarity.clsclip").contribution.adaptation.lower()


def test_clsclip_checks_cancel_between_prompts(host, trace, tiny_clip):
    tok = CancelToken()
    p = host.make_params("similarity.clsclip", {"output": "labels", "templates": "none"})
    job = host.run("similarity.clsclip", trace, p, target=Target(prompts=trace.text.prompts), cancel=tok, backend=tiny_clip)
    first = next(job)
    assert "pass 1/2" in first.message
    tok.cancel()
    with pytest.raises(Cancelled):
        while True:
            next(job)


# -- all of them ---------------------------------------------------------------------------------

FAMILY = ["similarity.sclip", "similarity.clearclip", "similarity.clip_surgery", "similarity.gem",
          "similarity.naclip", "similarity.segearth_ov", "similarity.clsclip"]


@pytest.mark.parametrize("method_id", FAMILY)
def test_family_outputs_and_manifests(host, trace, tiny_clip, method_id):
    c = host.method(method_id).contribution
    assert c.family == "similarity" and c.backends == ("clip",)
    expected = {"hidden_states", "text", "model"} | ({"passes"} if method_id == "similarity.clsclip" else set())
    assert set(c.requires) == expected  # ClsCLIP runs one vision pass per prompt
    assert c.citation and c.description and c.adaptation and c.repository.startswith("https://")
    hm = run(host, method_id, trace, tiny_clip, templates="none")
    assert isinstance(hm, Heatmap) and hm.token_values.shape == (64,)
    sm_ = run(host, method_id, trace, tiny_clip, templates="none", mode="softmax")
    assert ((sm_.token_values >= 0) & (sm_.token_values <= 1)).all()
    lm = run(host, method_id, trace, tiny_clip, templates="none", output="labels", background="sky")
    assert lm.class_names == trace.text.prompts and lm.scores.shape == (2, 64)
    assert set(np.unique(lm.labels)) <= {-1, 0, 1}
    with pytest.raises(ValueError, match="prompt_index 5"):
        run(host, method_id, trace, tiny_clip, prompt_index=5)
    with pytest.raises(ValueError, match="needs the loaded model"):
        run(host, method_id, trace, None, templates="none")
