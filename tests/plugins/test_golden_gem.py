"""GEM against the official code (Bousselham et al., CVPR 2024, ``WalBouss/GEM``).

``tests/golden/gem.npz`` holds seeded pixels ``(1, 3, 64, 64)`` and what the official
``GEMWrapper`` (``gem/gem_wrapper.py`` with ``SelfSelfAttention``, ``GEMResidualBlock`` and
``modified_vit_forward`` of ``gem/gem_utils.py``; repository, commit and exact call in the file's
``meta`` and ``tests/golden/PROVENANCE.md``) returned for them on a tiny open_clip ViT rebuilt here
(``make_tiny_clip`` seed 0: 7 blocks, width 128, 2 heads, QuickGELU, seeded biases and LayerNorm
parameters; a checksum of its weights is stored and asserted):

* the L2-normalised GEM-path features of every token for ``depth=7`` (the last 6 blocks), ``depth=3``,
  ``ss_attn_iter=2`` and ``ss_attn_temp=0.7`` -> ``gem_features`` with ``n_blocks``, ``iterations``,
  ``temperature``;
* the original path's features (vanilla CLIP);
* ``GEMWrapper.encode_text`` (template ``"a photo of a {}."``) -> ``encode_text(templates="single")``;
* ``GEMWrapper.forward(normalize=True)`` (bilinear upsampling to the image and per-prompt min-max):
  the plugin's raw cosine maps put through the same two display steps.

Tolerance 1e-5 (absolute) everywhere.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from explorer_plugins.gem.method import gem_features
from golden_models import GOLDEN_DIR, dense_clip_backend, dense_clip_trace, load_npz, run_method

GOLDEN = GOLDEN_DIR / "gem.npz"


@pytest.fixture(scope="module")
def golden():
    return load_npz(GOLDEN)


@pytest.fixture(scope="module")
def backend(tmp_path_factory, golden):
    return dense_clip_backend(tmp_path_factory.mktemp("golden-gem"), golden)


@pytest.fixture(scope="module")
def trace(backend, golden):
    return dense_clip_trace(backend, golden)


def test_meta_names_the_official_code(golden):
    meta = json.loads(str(golden["meta"][0]))
    assert meta["repository"] == "https://github.com/WalBouss/GEM"
    assert meta["commit"] == "5fa677ca1dcf10d39ceceadacf3e3cff414d7c27"
    assert "gem/gem_wrapper.py" in meta["file"] and "GEMWrapper" in meta["function"]


def test_original_path_is_the_same_model(backend, trace, golden):
    with torch.no_grad():
        f = F.normalize(backend.project_tokens(torch.from_numpy(trace.hidden(7))[None])[0], dim=-1).numpy()
    np.testing.assert_allclose(f, golden["feat_ori"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case, kwargs", [("default", {}), ("depth3", {"n_blocks": 2}), ("iter2", {"iterations": 2}),
                                          ("temp", {"temperature": 0.7})])
def test_gem_features_match_official(backend, trace, golden, case, kwargs):
    got = gem_features(backend, trace, **kwargs)
    np.testing.assert_allclose(got, golden[f"{case}_feat_gem"], atol=1e-5, rtol=0)


def test_text_template_matches_official(backend, golden):
    got = backend.encode_text([str(p) for p in golden["prompts"]], templates="single").embeddings
    np.testing.assert_allclose(got, golden["text"], atol=1e-5, rtol=0)


def test_maps_match_official_forward(backend, trace, golden):
    # the plugin's defaults: GEM's single template, raw cosine
    maps = np.stack([np.asarray(run_method("similarity.gem", backend, trace, prompt_index=i).token_values)
                     for i in range(len(trace.text.prompts))])  # (K, 64)
    np.testing.assert_allclose(maps, golden["text"] @ golden["default_feat_gem"][1:].T, atol=1e-5, rtol=0)
    # GEMWrapper.forward's display steps: bilinear upsampling to the image, then per-prompt min-max
    up = F.interpolate(torch.from_numpy(maps).reshape(1, -1, 8, 8), size=(64, 64), mode="bilinear")[0]
    lo, hi = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)
    np.testing.assert_allclose(((up - lo) / (hi - lo)).numpy(), golden["maps_minmax"], atol=1e-5, rtol=0)
