"""SegEarth-OV against the official code (Li et al., CVPR 2025, ``likyoo/SegEarth-OV``).

``tests/golden/segearth_ov.npz`` holds seeded pixels ``(1, 3, 64, 64)`` and what the official
``SegEarthSegmentation`` (``segearth_segmentor.py`` with the repository's own modified open_clip:
``VisionTransformer.forward`` and ``custom_attn(model_type='SegEarth')`` of
``open_clip/transformer.py``; repository, commit, exact call and shims in the file's ``meta`` and
``tests/golden/PROVENANCE.md``) returned for them on a tiny open_clip ViT rebuilt here
(``make_tiny_clip`` seed 0: 7 blocks, width 128, 2 heads, QuickGELU, seeded biases and LayerNorm
parameters; a checksum of its weights is stored and asserted), three prompts, ``feature_up=False``:

* ``openai_imagenet_template`` (the 80 format strings) and the ensembled query features ->
  ``template_strings("imagenet-80")`` and ``encode_text(templates="imagenet-80")``;
* ``forward_feature`` logits at token resolution for ``cls_token_lambda`` -0.3 (the base config),
  0 and -2 -> the plugin's map of each prompt (default templates), which is
  ``cos(F_n, T_k) + λ · cos(F_cls, T_k)``;
* ``postprocess_result`` labels (softmax at ``logit_scale`` 50, arg-max, ``prob_thd`` 0 and 0.9 with
  ``bg_idx=-1``) -> the plugin's ``output='labels'`` with ``prob_threshold``.

Tolerance 1e-5 (absolute) for features and logits; labels identical.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from explorer.core.trace import CaptureSpec
from golden_models import GOLDEN_DIR, dense_clip_backend, dense_clip_trace, load_npz, run_method

GOLDEN = GOLDEN_DIR / "segearth_ov.npz"
METHOD = "similarity.segearth_ov"


@pytest.fixture(scope="module")
def golden():
    return load_npz(GOLDEN)


@pytest.fixture(scope="module")
def backend(tmp_path_factory, golden):
    return dense_clip_backend(tmp_path_factory.mktemp("golden-segearth"), golden)


@pytest.fixture(scope="module")
def trace(backend, golden):
    return dense_clip_trace(backend, golden, CaptureSpec(hidden_layers={backend.info.n_layers - 1}))


def test_meta_names_the_official_code(golden):
    meta = json.loads(str(golden["meta"][0]))
    assert meta["repository"] == "https://github.com/likyoo/SegEarth-OV"
    assert meta["commit"] == "3e22a969b32c6d751bdbba64a88a0b670e630f55"
    assert "segearth_segmentor.py" in meta["file"] and "forward_feature" in meta["function"]


def test_templates_and_query_features_match_official(backend, golden):
    from explorer.backends.clip import template_strings

    official = [str(t) for t in golden["templates"]]
    assert len(official) == 80 and set(template_strings("imagenet-80")) == set(official)
    got = backend.encode_text([str(p) for p in golden["prompts"]], templates="imagenet-80").embeddings
    np.testing.assert_allclose(got, golden["text"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case, lam", [("lam03", None), ("lam0", 0.0), ("lam2", -2.0)])
def test_logits_match_official_forward_feature(backend, trace, golden, case, lam):
    kw = {} if lam is None else {"cls_token_lambda": lam}  # None: the plugin's default, the official -0.3
    maps = np.stack([np.asarray(run_method(METHOD, backend, trace, prompt_index=i, **kw).token_values)
                     for i in range(len(trace.text.prompts))])
    np.testing.assert_allclose(maps, golden[f"{case}_logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("key, lam, thd", [("lam03_labels_thd0", None, None), ("lam03_labels_thd9", None, 0.9),
                                           ("lam2_labels_thd0", -2.0, None)])
def test_labels_match_official_postprocess(backend, trace, golden, key, lam, thd):
    kw = {} if lam is None else {"cls_token_lambda": lam}
    if thd is not None:
        kw["prob_threshold"] = thd
    lm = run_method(METHOD, backend, trace, output="labels", **kw)  # the defaults: logit_scale 50, prob_threshold 0
    np.testing.assert_array_equal(np.asarray(lm.labels), golden[key])
