"""MaskCLIP's maps against the authors' code (Zhou, Loy & Dai, ECCV 2022, ``chongzhou96/MaskCLIP``).

``tests/golden/maskclip_maps.npz`` holds seeded pixels ``(1, 3, 64, 64)``, three unit query vectors
``(3, 32)`` (the head's text embeddings) and what the official mmseg pipeline returned for them on
the tests' tiny CLIP (``make_tiny_clip(seed=0)``, the session ``tiny_clip``; converted by the
official ``convert_clip_weights.py``, built from the official ``maskclip_vit16.py`` config with the
tiny sizes; ``weight_checksum`` tells a changed initialisation from a changed method):

* ``features (64, 32)``: ``MaskClipHead.proj`` of the backbone's ``return_qkv`` value path
  (``v = x + out_proj(v)``, ``v = v + FFN(ln_2 v)``, ``ln_post``), L2-normalised, per patch;
* ``logits (3, 8, 8)``: ``MaskClipHead.forward`` (``cls_seg``: patch-query cosine; key smoothing
  and prompt denoising off, as in the config);
* ``resized_logits (3, 64, 64)``: ``EncoderDecoder.encode_decode`` (bilinear resize to the input).

The official config builds its ViT with LayerNorm eps 1e-6 where CLIP has 1e-5; the golden uses
the model's 1e-5 (the config's value moves the logits by 3e-6; ``meta`` notes). Compared: the
plugin's patch features, its cosine maps and those maps resized the official way, to 1e-5.
Repository, commit and calls: the file's ``meta`` and ``tests/golden/PROVENANCE.md``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from explorer.core.jobs import CancelToken, run_sync
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec, TextEncoding

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "maskclip_maps.npz"
PROMPTS = ("q0", "q1", "q2")


@pytest.fixture(scope="module")
def golden(tiny_clip):
    from explorer.testing.images import random_image

    with np.load(GOLDEN) as f:
        z = {k: f[k] for k in f.files}
    meta = json.loads(str(z["meta"][0]))
    state = tiny_clip.model.state_dict()
    sums = [float(state[k].double().sum()) for k in meta["weight_checksum_keys"]]
    np.testing.assert_allclose(sums, z["weight_checksum"], rtol=1e-6, atol=1e-6,
                               err_msg="make_tiny_clip's initialisation changed: the golden file no longer describes it")
    prepared = tiny_clip.prepare(random_image(64, 64, seed=0))
    prepared = dataclasses.replace(prepared, pixels=torch.from_numpy(z["pixels"]))
    trace = run_sync(tiny_clip.trace(prepared, CaptureSpec(hidden_layers={tiny_clip.info.n_layers - 1})))
    trace = trace.with_text(TextEncoding(prompts=PROMPTS, embeddings=z["query"]))
    return z, meta, trace


def test_meta_names_the_official_code(golden):
    _, meta, _ = golden
    assert meta["repository"] == "https://github.com/chongzhou96/MaskCLIP"
    assert meta["commit"] == "245d31f809be9c1938f8f30561b6bf9ed033d746"
    assert "mmseg/models/backbones/vit.py" in meta["file"] and "maskclip_head.py" in meta["file"]


def test_patch_features_match_official(golden, tiny_clip):
    from explorer_plugins.maskclip.method import dense_features

    z, _, trace = golden
    feats = trace.layout.gather(np.asarray(dense_features(tiny_clip, trace)))
    np.testing.assert_allclose(feats, z["features"], atol=1e-5, rtol=0)


def test_maps_match_official_logits_and_resized_output(golden, tiny_clip):
    from explorer.plugin_host.host import PluginHost

    z, _, trace = golden
    host = PluginHost()
    maps = []
    for i in range(len(PROMPTS)):
        p = host.make_params("similarity.maskclip", {"templates": "none", "prompt_index": i})
        r = run_sync(host.run("similarity.maskclip", trace, p, target=Target(prompts=PROMPTS), cancel=CancelToken(),
                              backend=tiny_clip))
        maps.append(np.asarray(r.token_values).reshape(8, 8))
    maps = np.stack(maps)
    np.testing.assert_allclose(maps, z["logits"], atol=1e-5, rtol=0)
    resized = F.interpolate(torch.from_numpy(maps)[None], size=(64, 64), mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(resized.numpy(), z["resized_logits"], atol=1e-5, rtol=0)
