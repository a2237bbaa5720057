"""SCLIP against the authors' code (Wang, Mei & Yuille, ECCV 2024, ``wangf3014/SCLIP``).

``tests/golden/sclip.npz`` holds seeded pixels ``(1, 3, 64, 64)``, three unit query vectors
``(3, 32)`` and what the official code returned for them on a tiny OpenAI-style CLIP (built here
by :func:`golden_models.golden_clip`, loaded there by the official ``clip.load``; the weight sums in
``weight_checksum`` tell a changed initialisation from a changed method):

* ``features (65, 32)``: ``encode_image(pixels, return_all=True, csa=True)``, L2-normalised: every
  token after the correlative-self-attention last block, ``ln_post`` and ``proj``;
* ``logits (3, 8, 8)``: ``CLIPForSegmentation.forward_feature`` at the token grid (patch-query cosine);
* ``slide_logits (3, 64, 64)``: ``forward_slide`` (one 224/112 window covers the 64x64 input), the
  grid logits upsampled bilinearly to the pixels.

Compared: the plugin's features (``dense_features``), its per-prompt cosine maps and those maps
upsampled the official way, all to 1e-5. Repository, commit and exact calls: the file's ``meta``
and ``tests/golden/PROVENANCE.md``. The helpers (now in ``golden_models.py``) also serve
``test_golden_clearclip.py`` and ``test_golden_naclip.py`` (same model recipe, same inputs).
"""

from __future__ import annotations

import numpy as np
import pytest

from golden_models import method_maps, openai_tiny_golden, upsample


@pytest.fixture(scope="module")
def sclip(tmp_path_factory):
    return openai_tiny_golden(tmp_path_factory.mktemp("golden-openai-tiny"), "sclip.npz")


def test_meta_names_the_official_code(sclip):
    _, meta, _, _ = sclip
    assert meta["repository"] == "https://github.com/wangf3014/SCLIP"
    assert meta["commit"] == "b56bd3014b9e8a3ee3450bcfc53700a67d627b7a"
    assert "clip/model.py" in meta["file"] and "clip_segmentor.py" in meta["file"]


def test_features_match_official(sclip):
    from explorer_plugins.sclip.method import dense_features

    z, _, backend, trace = sclip
    np.testing.assert_allclose(np.asarray(dense_features(backend, trace)), z["features"], atol=1e-5, rtol=0)


def test_maps_match_official_logits_and_sliding_window_output(sclip):
    z, _, backend, trace = sclip
    maps = method_maps("similarity.sclip", trace, backend)
    np.testing.assert_allclose(maps, z["logits"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(upsample(maps, (64, 64)), z["slide_logits"], atol=1e-5, rtol=0)
