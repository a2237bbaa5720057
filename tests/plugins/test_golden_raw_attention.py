"""Raw attention against the official raw-attention baseline of Chefer, Gur & Wolf (CVPR 2021,
``hila-chefer/Transformer-Explainability``: ``baselines/ViT/ViT_explanation_generator.py::LRP.generate_LRP``
with ``method="last_layer_attn"``, i.e. ``ViT_orig_LRP.py::VisionTransformer.relprop``: the last
block's attention, mean over heads, [CLS] row over the patches).

``tests/golden/raw_attention.npz`` holds a 96x96 RGB image (``image_small`` 24x24 upsampled 4x4),
the official map ``(576,)`` computed by the repository's ``VisionTransformer`` holding the image
tower of a tiny open_clip ViT (``make_tiny_clip(seed=0, image_size=96, patch_size=4, width=128,
heads=2, ...)``; CLIP's ``ln_pre`` applied after the position embedding by a forward hook, the
blocks' LayerNorm eps set to CLIP's; repository, commit, exact call and shims in ``meta`` and
PROVENANCE.md), and that model's [CLS] attention rows per block and head (``get_attn()``). The test
rebuilds the model (weight checksum) and compares the plugin's map through the plugin host: the
default (last block, head mean, [CLS] query) with the official map, and every block and head with
the official model's rows; atol 1e-8 (probabilities ~1e-3; measured: identical).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from explorer.core.image_io import load_image
from explorer.core.jobs import CancelToken, run_sync
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.host import PluginHost
from explorer.testing.images import png_bytes

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "raw_attention.npz"
ATOL = 1e-8


def _load():
    z = np.load(GOLDEN)
    return {k: z[k] for k in z.files}, json.loads(str(z["meta"][0]))


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    from safetensors.torch import load_file

    from explorer.backends.clip import ClipBackend
    from explorer.testing.tiny import make_tiny_clip

    g, meta = _load()
    spec = make_tiny_clip(tmp_path_factory.mktemp("golden-raw"), name=meta["model_name"], seed=meta["seed"], **meta["config"])
    state = load_file(spec.weights)
    checksum = np.array([float(state[k].double().sum()) for k in ("visual.conv1.weight",
                         "visual.transformer.resblocks.0.attn.in_proj_weight", "visual.proj", "text_projection")])
    np.testing.assert_allclose(checksum, g["checksum"], rtol=1e-6,
                               err_msg="the tiny CLIP's initialisation changed: rebuild the golden inputs")
    backend = ClipBackend.load(spec)
    image = load_image(png_bytes(np.kron(g["image_small"], np.ones((4, 4, 1), dtype=np.uint8))))
    pixels = backend.prepare(image).pixels.double()
    np.testing.assert_allclose([float(pixels.sum()), float(pixels.abs().sum())], g["pixel_sum"], rtol=1e-6)
    trace = run_sync(backend.trace(image, CaptureSpec(attention_layers={0, 1, 2})))
    return g, meta, backend, trace


def _run(golden, **params):
    _, _, backend, trace = golden
    host = PluginHost()
    p = host.make_params("attention.raw", params)
    return run_sync(host.run("attention.raw", trace, p, target=Target(), cancel=CancelToken(), backend=backend))


def test_meta_names_the_official_code():
    _, meta = _load()
    assert meta["repository"] == "https://github.com/hila-chefer/Transformer-Explainability"
    assert meta["commit"] == "c3e578f76b954e8528afeaaee26de3f07e3fe559"
    assert "last_layer_attn" in meta["function"]


def test_default_matches_the_official_last_layer_attn(golden):
    g = golden[0]
    hm = _run(golden)
    assert hm.meta["layer"] == 2 and hm.meta["head"] == -1 and hm.meta["query"] == 0
    np.testing.assert_allclose(hm.token_values, g["cam"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("head", [-1, 0, 1])
def test_every_block_and_head_matches_the_official_attention(golden, layer, head):
    g = golden[0]
    rows = g["attn_cls"][layer][:, 1:]
    ref = rows.mean(0) if head < 0 else rows[head]
    np.testing.assert_allclose(_run(golden, layer=layer, head=head).token_values, ref, rtol=0, atol=ATOL)
