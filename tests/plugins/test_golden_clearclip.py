"""ClearCLIP against the authors' code (Lan et al., ECCV 2024, ``mc-lan/ClearCLIP``).

``tests/golden/clearclip.npz`` holds the pixels and query vectors of ``sclip.npz``'s recipe and
what the repository's open_clip fork and segmentor returned for them on the same tiny OpenAI-style
CLIP (loaded there by the fork's ``load_openai_model``; ``weight_checksum`` as in ``sclip.npz``):

* ``features (64, 32)``: ``encode_image(pixels, 'ClearCLIP', True)`` L2-normalised, the patch
  tokens after the last block reduced to ``out_proj(softmax(s·qqᵀ) v)`` (no residual, no FFN),
  ``ln_post`` and ``proj`` (the fork drops [CLS]);
* ``logits (3, 8, 8)``: ``ClearCLIPSegmentation.forward_feature`` at the token grid;
* ``slide_logits (3, 64, 64)``: ``forward_slide`` (one 448/224 window), upsampled bilinearly.

Compared: the plugin's patch features, its cosine maps and those maps upsampled the official way,
to 1e-5. Repository, commit and calls: the file's ``meta`` and ``tests/golden/PROVENANCE.md``.
"""

from __future__ import annotations

import numpy as np
import pytest

from golden_models import method_maps, openai_tiny_golden, upsample


@pytest.fixture(scope="module")
def clearclip(tmp_path_factory):
    return openai_tiny_golden(tmp_path_factory.mktemp("golden-openai-tiny"), "clearclip.npz")


def test_meta_names_the_official_code(clearclip):
    _, meta, _, _ = clearclip
    assert meta["repository"] == "https://github.com/mc-lan/ClearCLIP"
    assert meta["commit"] == "ad68a404d55d48d27330b93554eb64a234ff717f"
    assert "open_clip/transformer.py" in meta["file"]


def test_patch_features_match_official(clearclip):
    from explorer_plugins.clearclip.method import dense_features

    z, _, backend, trace = clearclip
    feats = np.asarray(dense_features(backend, trace))
    np.testing.assert_allclose(trace.layout.gather(feats), z["features"], atol=1e-5, rtol=0)


def test_maps_match_official_logits_and_sliding_window_output(clearclip):
    z, _, backend, trace = clearclip
    maps = method_maps("similarity.clearclip", trace, backend)
    np.testing.assert_allclose(maps, z["logits"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(upsample(maps, (64, 64)), z["slide_logits"], atol=1e-5, rtol=0)
