"""ALBEF-style Grad-CAM on attention (ITC mode) against the official code (Li et al., NeurIPS 2021,
``salesforce/ALBEF``: ``Grounding.py::val`` with ``gradcam_mode='itc'``, ``models/vit.py``).

``tests/golden/gradcam_albef.npz`` holds a 96x96 RGB image (``image_small`` 24x24 upsampled 4x4, so
24x24 patches as ``val`` reshapes to), two prompts' CLIP text features, and for ``block_num`` 0, 1, 2
the official ``gradcam = (cam * grad.clamp(0)).mean(1)`` ``(2 prompts, 24, 24)`` that ``val``
returned, run with ALBEF's own ``VisionTransformer`` holding the image tower of a tiny open_clip ViT
(``make_tiny_clip(seed=0, image_size=96, patch_size=4, width=128, heads=2, ...)``; CLIP's ``ln_pre``
put where ALBEF applies ``pos_drop``; ALBEF's BERT text side replaced by the stored CLIP text
features, ``temp = 1 / logit_scale``, so the target ``sim / temp`` is CLIP's logit; repository,
commit, exact call and shims in ``meta`` and PROVENANCE.md), plus the official [CLS] attention rows
and their gradients. The test rebuilds the model (weight checksum), and compares the plugin's map
through the plugin host with the official one (atol 2e-8, rtol 1e-6; the maps are ~1e-3, measured max difference 3e-9).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from explorer.core.image_io import load_image
from explorer.core.jobs import CancelToken, run_sync
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec, TextEncoding
from explorer.plugin_host.host import PluginHost
from explorer.testing.images import png_bytes

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "gradcam_albef.npz"


def _load():
    z = np.load(GOLDEN)
    return {k: z[k] for k in z.files}, json.loads(str(z["meta"][0]))


def build_golden_clip(folder, meta):
    """The tiny open_clip model of the golden file, loaded through the program's backend; returns
    it and a weight checksum."""
    from safetensors.torch import load_file

    from explorer.backends.clip import ClipBackend
    from explorer.testing.tiny import make_tiny_clip

    spec = make_tiny_clip(folder, name=meta["model_name"], seed=meta["seed"], **meta["config"])
    state = load_file(spec.weights)
    checksum = np.array([float(state[k].double().sum()) for k in ("visual.conv1.weight",
                         "visual.transformer.resblocks.0.attn.in_proj_weight", "visual.proj", "text_projection")])
    return ClipBackend.load(spec), checksum


def golden_image(g):
    return load_image(png_bytes(np.kron(g["image_small"], np.ones((4, 4, 1), dtype=np.uint8))))


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    g, meta = _load()
    backend, checksum = build_golden_clip(tmp_path_factory.mktemp("golden-gradcam"), meta)
    np.testing.assert_allclose(checksum, g["checksum"], rtol=1e-6,
                               err_msg="the tiny CLIP's initialisation changed: rebuild the golden inputs")
    image = golden_image(g)
    pixels = backend.prepare(image).pixels.double()
    np.testing.assert_allclose([float(pixels.sum()), float(pixels.abs().sum())], g["pixel_sum"], rtol=1e-6)
    emb = g["text_features"] / np.linalg.norm(g["text_features"], axis=-1, keepdims=True)
    trace = run_sync(backend.trace(image, CaptureSpec())).with_text(
        TextEncoding(prompts=tuple(meta["prompts"]), embeddings=emb.astype(np.float32)))
    return g, meta, backend, trace


def _run(golden, **params):
    _, meta, backend, trace = golden
    host = PluginHost()
    p = host.make_params("attribution.gradcam", params)
    return run_sync(host.run("attribution.gradcam", trace, p, target=Target(prompts=tuple(meta["prompts"])),
                             cancel=CancelToken(), backend=backend))


def test_meta_names_the_official_code():
    _, meta = _load()
    assert meta["repository"] == "https://github.com/salesforce/ALBEF"
    assert meta["commit"] == "b9727e43c3040491774d1b22cc27718aa7772fac"
    assert meta["function"].startswith("val")


@pytest.mark.parametrize("block", [0, 1, 2])
@pytest.mark.parametrize("prompt", [0, 1])
def test_gradcam_matches_official_val_itc(golden, block, prompt):
    g = golden[0]
    hm = _run(golden, layer=block, prompt_index=prompt)
    ref = g[f"gradcam_block{block}"][prompt].reshape(-1)
    assert ref.max() > 1e-4
    np.testing.assert_allclose(hm.token_values, ref, rtol=1e-6, atol=2e-8)


def test_attention_and_gradient_rows_match_official(golden):
    """The intermediate quantities: the backend's [CLS] attention row and its gradient at each block
    equal the official ``get_attention_map()`` / ``get_attn_gradients()`` rows."""
    g, _, backend, trace = golden
    for p in (0, 1):
        gp = backend.gradient_pass(backend.prepared_for(trace), trace.text.embeddings[p], attention_layers=[0, 1, 2])
        for b in range(3):
            np.testing.assert_allclose(gp.attentions[b][:, 0, :], g["attn_cls"][b, p], rtol=0, atol=1e-6)
            scale = np.abs(g["grad_cls"][b, p]).max()
            np.testing.assert_allclose(gp.attention_grads[b][:, 0, :], g["grad_cls"][b, p], rtol=0, atol=1e-5 * scale)


def test_default_layer_is_albef_block_8_of_12(golden):
    """The default ``layer=-4`` is block 0 on this 3-block model (ALBEF's block_num 8 of 12 blocks)."""
    hm = _run(golden)
    assert hm.meta["layer"] == 0
    np.testing.assert_allclose(hm.token_values, golden[0]["gradcam_block0"][0].reshape(-1), rtol=1e-6, atol=2e-8)
