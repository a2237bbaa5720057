"""CLIP Surgery against the official code (Li et al., 2023 / Pattern Recognition 2025, ``xmed-lab/CLIP_Surgery``).

``tests/golden/clip_surgery.npz`` holds seeded pixels ``(1, 3, 64, 64)`` and what the official
``clip`` package (``clip/clip_surgery_model.py``: ``CLIPSurgery`` built by ``build_model``, with
``VisionTransformer.forward``, ``ResidualAttentionBlock`` and the v-v ``Attention``;
``clip/clip.py``: ``encode_text_with_prompt_ensemble``, ``clip_feature_surgery``,
``get_similarity_map``; repository, commit and exact call in the file's ``meta`` and
``tests/golden/PROVENANCE.md``) returned for them on a tiny open_clip ViT rebuilt here
(``make_tiny_clip`` seed 0: 7 blocks, width 128, 2 heads of 64, QuickGELU, seeded biases and
LayerNorm parameters; a checksum of its weights is stored and asserted):

* the official default template list (85: CLIP's 80 ImageNet and 5 scene templates) -> the
  ``maskclip-85`` set, which ``templates='auto'`` now uses; the ensembled text features of three
  prompts and of the empty string;
* the normalised surgery features of every token ([CLS] from the original path) -> ``surgery_features``;
* ``clip_feature_surgery`` for three prompts (class redundancy) and for one prompt minus the empty
  string (``demo.py``'s single-text case) -> the plugin's map with its defaults;
* ``get_similarity_map`` (per-prompt min-max, bilinear upsampling, a display step the canvas does)
  applied to the plugin's map.

Tolerance 1e-5 (absolute). ``templates='imagenet-80'`` (the plugin's earlier default) is kept as a
parameter and must differ from the official result.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from explorer_plugins.clip_surgery.method import feature_surgery, surgery_features
from golden_models import GOLDEN_DIR, dense_clip_backend, dense_clip_trace, load_npz, run_method

GOLDEN = GOLDEN_DIR / "clip_surgery.npz"
METHOD = "similarity.clip_surgery"


@pytest.fixture(scope="module")
def golden():
    return load_npz(GOLDEN)


@pytest.fixture(scope="module")
def backend(tmp_path_factory, golden):
    return dense_clip_backend(tmp_path_factory.mktemp("golden-surgery"), golden)


@pytest.fixture(scope="module")
def trace(backend, golden):
    return dense_clip_trace(backend, golden)


def maps(backend, trace, **params):
    """``(K, n_patches)``: every prompt's map."""
    return np.stack([np.asarray(run_method(METHOD, backend, trace, prompt_index=i, **params).token_values)
                     for i in range(len(trace.text.prompts))])


def test_meta_names_the_official_code(golden):
    meta = json.loads(str(golden["meta"][0]))
    assert meta["repository"] == "https://github.com/xmed-lab/CLIP_Surgery"
    assert meta["commit"] == "d4696d47f49cfe70f49140afe5eb94f94c5f59bc"
    assert "clip/clip_surgery_model.py" in meta["file"] and "clip_feature_surgery" in meta["function"]


def test_template_set_and_text_features_match_official(backend, golden):
    from explorer.backends.clip import template_strings
    from explorer.plugin_host.host import PluginHost

    official = [str(t) for t in golden["templates"]]
    assert len(official) == 85 and set(template_strings("maskclip-85")) == set(official)  # a mean: order is free
    prompts = [str(p) for p in golden["prompts"]]
    np.testing.assert_allclose(backend.encode_text(prompts, templates="maskclip-85").embeddings, golden["text"],
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(backend.encode_text([""], templates="maskclip-85", allow_empty=True).embeddings,
                               golden["text_empty"], atol=1e-5, rtol=0)
    assert PluginHost().make_params(METHOD, {}).templates == "auto"


def test_features_match_official(backend, trace, golden):
    np.testing.assert_allclose(surgery_features(backend, trace), golden["features"], atol=1e-5, rtol=0)


def test_class_redundancy_maps_match_official(backend, trace, golden):
    got = maps(backend, trace)  # defaults: templates auto = the official 85, redundancy auto = classes
    np.testing.assert_allclose(got, golden["sim_classes"][1:].T, atol=1e-5, rtol=0)
    # get_similarity_map: per-prompt min-max over the patches, then bilinear upsampling to the image
    sm = torch.from_numpy(got.T)[None]  # (1, n, K)
    sm = (sm - sm.min(1, keepdim=True)[0]) / (sm.max(1, keepdim=True)[0] - sm.min(1, keepdim=True)[0])
    sm = F.interpolate(sm.reshape(1, 8, 8, -1).permute(0, 3, 1, 2), (64, 64), mode="bilinear")[0]
    np.testing.assert_allclose(sm.numpy(), golden["map_classes"], atol=1e-5, rtol=0)


def test_single_prompt_minus_empty_string_matches_official(backend, trace, golden):
    one = trace.with_text(backend.encode_text([str(golden["prompts"][0])]))
    hm = run_method(METHOD, backend, one)
    assert hm.meta["redundancy"] == "empty"
    np.testing.assert_allclose(np.asarray(hm.token_values), golden["sim_single"][1:, 0], atol=1e-5, rtol=0)


def test_imagenet_80_is_the_earlier_non_official_default(backend, trace, golden):
    old = maps(backend, trace, templates="imagenet-80")
    assert np.abs(old - golden["sim_classes"][1:].T).max() > 1e-3
    T80 = backend.encode_text(list(trace.text.prompts), templates="imagenet-80").embeddings
    np.testing.assert_allclose(old, feature_surgery(golden["features"], T80, 0)[1:].T, atol=1e-5, rtol=0)
    one = trace.with_text(backend.encode_text([str(golden["prompts"][0])]))
    old1 = np.asarray(run_method(METHOD, backend, one, templates="imagenet-80").token_values)
    assert np.abs(old1 - golden["sim_single"][1:, 0]).max() > 1e-3
