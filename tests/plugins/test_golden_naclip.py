"""NACLIP against the authors' code (Hajimiri, Ben Ayed & Dolz, WACV 2025, ``sinahmr/NACLIP``).

``tests/golden/naclip.npz`` holds the pixels and query vectors of ``sclip.npz``'s recipe and what
the official code returned for them on the same tiny OpenAI-style CLIP (official ``clip.load``,
then ``net.visual.set_params('reduced', 'naclip', std)``; ``weight_checksum`` as in ``sclip.npz``):

* ``features (65, 32)`` (std 5, the default) and ``features_std2`` (std 2): ``encode_image(pixels,
  return_all=True)`` L2-normalised, every token after the last block reduced to
  ``out_proj(softmax(s·kkᵀ + ω) v)``, ``ln_post`` and ``proj``;
* ``omega_std5``, ``omega_std2 (65, 65)``: ``get_attention_addition(8, 8, gaussian_window(15, 15, std))``;
* ``logits (3, 8, 8)``: the patch-query cosine of ``NACLIP.forward_feature`` before its resize;
* ``slide_logits (3, 64, 64)``: ``forward_slide`` (one 224/112 window), upsampled bilinearly.

PAMR (on by default in the official ``NACLIP.__init__``) is not run: the plugin does not implement
it (its manifest says so). Compared: ω, the features for both stds, the cosine maps and those maps
upsampled the official way, to 1e-5. Repository, commit and calls: the file's ``meta`` and
``tests/golden/PROVENANCE.md``.
"""

from __future__ import annotations

import numpy as np
import pytest

from golden_models import method_maps, openai_tiny_golden, upsample


@pytest.fixture(scope="module")
def naclip(tmp_path_factory):
    return openai_tiny_golden(tmp_path_factory.mktemp("golden-openai-tiny"), "naclip.npz")


def test_meta_names_the_official_code(naclip):
    _, meta, _, _ = naclip
    assert meta["repository"] == "https://github.com/sinahmr/NACLIP"
    assert meta["commit"] == "0cac3a651f753b11315ea799cfbfabf79da1bd76"
    assert "clip/model.py" in meta["file"]


@pytest.mark.parametrize("std", [5, 2])
def test_neighbourhood_bias_matches_official(naclip, std):
    from explorer_plugins.naclip.method import neighbourhood_bias

    z, _, _, trace = naclip
    np.testing.assert_allclose(neighbourhood_bias(trace.layout, float(std)), z[f"omega_std{std}"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("std,key", [(5.0, "features"), (2.0, "features_std2")])
def test_features_match_official(naclip, std, key):
    from explorer_plugins.naclip.method import dense_features

    z, _, backend, trace = naclip
    np.testing.assert_allclose(np.asarray(dense_features(backend, trace, std)), z[key], atol=1e-5, rtol=0)


def test_maps_match_official_logits_and_sliding_window_output(naclip):
    z, _, backend, trace = naclip
    maps = method_maps("similarity.naclip", trace, backend)
    np.testing.assert_allclose(maps, z["logits"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(upsample(maps, (64, 64)), z["slide_logits"], atol=1e-5, rtol=0)
