"""Chefer relevance against the official code (Chefer, Gur & Wolf, ICCV 2021,
``hila-chefer/Transformer-MM-Explainability``, ``CLIP_explainability.ipynb``: ``interpret``).

``tests/golden/chefer_clip.npz`` holds a 64x64 RGB image, the model input the project's
preprocessing makes of it (``pixels``), two prompts' text features from the official CLIP text tower,
and the image relevance ``R_image = R[:, 0, 1:]`` (2 prompts x 64 image tokens) the official
``interpret`` returned for ``start_layer`` -1 (its default: only the last block), 0 and 1, run on the
repository's own CLIP classes (``CLIP/clip/model.py``) loaded with the weights of a tiny open_clip
ViT (``make_tiny_clip(seed=0, width=128, heads=2, ...)`` with OpenAI's QuickGELU, head width 64 as
OpenAI's classes need; repository, commit, exact call in the file's ``meta`` and PROVENANCE.md).
The test rebuilds that model, checks a weight checksum (a changed initialisation is reported as
such), and compares the plugin's map (through the plugin host) with the official one, atol 1e-6.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from golden_models import load_golden, meta_clip_golden, run_on_golden, unit_text_features

GOLDEN = "chefer_clip.npz"
_run = partial(run_on_golden, "attribution.chefer")
ATOL = 1e-6


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    return meta_clip_golden(tmp_path_factory.mktemp("golden-chefer"), GOLDEN)


def test_meta_names_the_official_code():
    _, meta = load_golden(GOLDEN)
    assert meta["repository"] == "https://github.com/hila-chefer/Transformer-MM-Explainability"
    assert meta["commit"] == "58eaea85ac9c34aff052f368514b35d2e4c8dd3c"
    assert meta["function"] == "interpret"


def test_project_text_tower_matches_the_official_features(golden):
    g, meta, backend, _ = golden
    np.testing.assert_allclose(backend.encode_text(meta["prompts"]).embeddings, unit_text_features(g), rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize("start_layer,key", [(-1, "relevance_startm1"), (0, "relevance_start0"), (1, "relevance_start1")])
@pytest.mark.parametrize("prompt", [0, 1])
def test_chefer_matches_official_interpret(golden, start_layer, key, prompt):
    g = golden[0]
    hm = _run(golden, start_layer=start_layer, prompt_index=prompt)
    ref = g[key][prompt]
    assert np.abs(ref).max() > 1e-3  # a non-trivial map
    np.testing.assert_allclose(hm.token_values, ref, rtol=0, atol=ATOL)


def test_default_is_the_official_default(golden):
    """The plugin's default ``start_layer`` is the notebook's (-1: the last block only)."""
    np.testing.assert_allclose(_run(golden).token_values, golden[0]["relevance_startm1"][0], rtol=0, atol=ATOL)
