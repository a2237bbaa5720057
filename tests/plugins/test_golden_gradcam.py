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

from functools import partial

import numpy as np
import pytest

from explorer.core.image_io import load_image
from explorer.testing.images import png_bytes
from golden_models import load_golden, meta_clip_backend, run_on_golden, text_feature_trace

GOLDEN = "gradcam_albef.npz"
_run = partial(run_on_golden, "attribution.gradcam")


def golden_image(g):
    return load_image(png_bytes(np.kron(g["image_small"], np.ones((4, 4, 1), dtype=np.uint8))))


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    g, meta = load_golden(GOLDEN)
    backend = meta_clip_backend(tmp_path_factory.mktemp("golden-gradcam"), g, meta)
    image = golden_image(g)
    pixels = backend.prepare(image).pixels.double()
    np.testing.assert_allclose([float(pixels.sum()), float(pixels.abs().sum())], g["pixel_sum"], rtol=1e-6)
    return g, meta, backend, text_feature_trace(backend, image, g, meta)


def test_meta_names_the_official_code():
    _, meta = load_golden(GOLDEN)
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
