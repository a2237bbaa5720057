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

import json
from pathlib import Path

import numpy as np
import pytest

from explorer.core.image_io import load_image
from explorer.core.jobs import CancelToken, run_sync
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec, TextEncoding
from explorer.plugin_host.host import PluginHost
from explorer.testing.images import png_bytes

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "chefer_clip.npz"
ATOL = 1e-6


def _load():
    z = np.load(GOLDEN)
    return {k: z[k] for k in z.files}, json.loads(str(z["meta"][0]))


def build_golden_clip(folder, meta):
    """The tiny open_clip model of the golden file (its config may ask for QuickGELU, which has no
    weights: only the registered config changes), loaded through the program's backend."""
    from safetensors.torch import load_file

    from explorer.backends.clip import ClipBackend
    from explorer.testing.tiny import make_tiny_clip

    spec = make_tiny_clip(folder, name=meta["model_name"], seed=meta["seed"], **meta["config"])
    if meta.get("quick_gelu"):
        cfg = json.loads(Path(spec.config).read_text())
        cfg["quick_gelu"] = True
        Path(spec.config).write_text(json.dumps(cfg, indent=2))
    state = load_file(spec.weights)
    checksum = np.array([float(state[k].double().sum()) for k in ("visual.conv1.weight",
                         "visual.transformer.resblocks.0.attn.in_proj_weight", "visual.proj", "text_projection")])
    return ClipBackend.load(spec), checksum


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    g, meta = _load()
    backend, checksum = build_golden_clip(tmp_path_factory.mktemp("golden-chefer"), meta)
    np.testing.assert_allclose(checksum, g["checksum"], rtol=1e-6,
                               err_msg="the tiny CLIP's initialisation changed: rebuild the golden inputs")
    image = load_image(png_bytes(g["image"]))
    np.testing.assert_allclose(backend.prepare(image).pixels.numpy(), g["pixels"], rtol=0, atol=1e-6)
    emb = g["text_features"] / np.linalg.norm(g["text_features"], axis=-1, keepdims=True)
    trace = run_sync(backend.trace(image, CaptureSpec())).with_text(
        TextEncoding(prompts=tuple(meta["prompts"]), embeddings=emb.astype(np.float32)))
    return g, meta, backend, trace


def _run(golden, **params):
    _, meta, backend, trace = golden
    host = PluginHost()
    p = host.make_params("attribution.chefer", params)
    return run_sync(host.run("attribution.chefer", trace, p, target=Target(prompts=tuple(meta["prompts"])),
                             cancel=CancelToken(), backend=backend))


def test_meta_names_the_official_code():
    _, meta = _load()
    assert meta["repository"] == "https://github.com/hila-chefer/Transformer-MM-Explainability"
    assert meta["commit"] == "58eaea85ac9c34aff052f368514b35d2e4c8dd3c"
    assert meta["function"] == "interpret"


def test_project_text_tower_matches_the_official_features(golden):
    g, meta, backend, _ = golden
    emb = g["text_features"] / np.linalg.norm(g["text_features"], axis=-1, keepdims=True)
    np.testing.assert_allclose(backend.encode_text(meta["prompts"]).embeddings, emb, rtol=0, atol=1e-5)


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
