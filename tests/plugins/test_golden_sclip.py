"""SCLIP against the authors' code (Wang, Mei & Yuille, ECCV 2024, ``wangf3014/SCLIP``).

``tests/golden/sclip.npz`` holds seeded pixels ``(1, 3, 64, 64)``, three unit query vectors
``(3, 32)`` and what the official code returned for them on a tiny OpenAI-style CLIP (built here
by :func:`golden_clip`, loaded there by the official ``clip.load``; the weight sums in
``weight_checksum`` tell a changed initialisation from a changed method):

* ``features (65, 32)``: ``encode_image(pixels, return_all=True, csa=True)``, L2-normalised: every
  token after the correlative-self-attention last block, ``ln_post`` and ``proj``;
* ``logits (3, 8, 8)``: ``CLIPForSegmentation.forward_feature`` at the token grid (patch-query cosine);
* ``slide_logits (3, 64, 64)``: ``forward_slide`` (one 224/112 window covers the 64x64 input), the
  grid logits upsampled bilinearly to the pixels.

Compared: the plugin's features (``dense_features``), its per-prompt cosine maps and those maps
upsampled the official way, all to 1e-5. Repository, commit and exact calls: the file's ``meta``
and ``tests/golden/PROVENANCE.md``. The helpers here also serve ``test_golden_clearclip.py`` and
``test_golden_naclip.py`` (same model recipe, same inputs).
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

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden"
CHECKSUM_KEYS = ("visual.conv1.weight", "visual.transformer.resblocks.2.attn.in_proj_weight", "visual.proj",
                 "visual.transformer.resblocks.2.mlp.c_fc.weight")
PROMPTS = ("q0", "q1", "q2")


def load_golden(name: str) -> tuple[dict, dict]:
    with np.load(GOLDEN_DIR / name) as z:
        data = {k: z[k] for k in z.files}
    return data, json.loads(str(data["meta"][0]))


def golden_clip(folder: Path, seed: int = 7):
    """The tiny OpenAI-style CLIP of the SCLIP / ClearCLIP / NACLIP goldens: 64 px, 8 px patches,
    3 blocks of width 128 with 2 heads of 64 (OpenAI's ``build_model`` derives heads = width / 64),
    QuickGELU, text width 64 with 1 head, every weight rounded through float16 (``build_model``
    converts to fp16, so the official loader gets the same numbers). Returns ``(spec, state)``."""
    import open_clip
    from safetensors.torch import save_file

    from explorer.backends.specs import ClipSpec
    from explorer.testing.tiny import tiny_clip_config

    name = "golden-openai-tiny"
    cfg = tiny_clip_config(width=128, heads=2, text_width=64)
    cfg["quick_gelu"] = True
    cfg["text_cfg"]["heads"] = 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / f"{name}.json")
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    state = {k: (v.detach().half().float() if v.is_floating_point() else v.detach()).contiguous().clone()
             for k, v in model.state_dict().items()}
    save_file(state, str(folder / f"{name}.safetensors"))
    return ClipSpec(model=name, weights=str(folder / f"{name}.safetensors"), config=str(folder / f"{name}.json"),
                    device="cpu"), state


def assert_checksum(state, z) -> None:
    sums = [float(state[k].double().sum()) for k in CHECKSUM_KEYS]
    np.testing.assert_allclose(sums, z["weight_checksum"], rtol=1e-6, atol=1e-6,
                               err_msg="the tiny model's initialisation changed (torch or open_clip): "
                                       "the golden file no longer describes this model")


def golden_trace(backend, z):
    """A trace of the stored pixels (the backend's own preprocessing replaced by them) with the
    stored query vectors as the prompts' text embeddings."""
    from explorer.testing.images import random_image

    prepared = backend.prepare(random_image(64, 64, seed=0))
    prepared = dataclasses.replace(prepared, pixels=torch.from_numpy(z["pixels"]))
    L = backend.info.n_layers
    trace = run_sync(backend.trace(prepared, CaptureSpec(hidden_layers={L - 1})))
    return trace.with_text(TextEncoding(prompts=PROMPTS, embeddings=z["query"].astype(np.float32)))


@pytest.fixture(scope="module")
def golden_backend(tmp_path_factory):
    from explorer.backends.clip import ClipBackend

    spec, state = golden_clip(tmp_path_factory.mktemp("golden-openai-tiny"))
    return ClipBackend.load(spec), state


def method_maps(method_id: str, trace, backend, **params) -> np.ndarray:
    """``(K, rows, cols)``: the plugin's cosine map of every prompt (``templates='none'``)."""
    from explorer.plugin_host.host import PluginHost

    host = PluginHost()
    seg = trace.layout.segments[0]
    out = []
    for i in range(len(trace.text.prompts)):
        p = host.make_params(method_id, {"templates": "none", "prompt_index": i, **params})
        r = run_sync(host.run(method_id, trace, p, target=Target(prompts=trace.text.prompts), cancel=CancelToken(),
                              backend=backend))
        out.append(np.asarray(r.token_values).reshape(seg.rows, seg.cols))
    return np.stack(out)


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The official resize of the grid logits to the pixels (bilinear, ``align_corners=False``)."""
    return F.interpolate(torch.from_numpy(maps)[None], size=size, mode="bilinear", align_corners=False)[0].numpy()


# -- SCLIP ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sclip(golden_backend):
    z, meta = load_golden("sclip.npz")
    backend, state = golden_backend
    assert_checksum(state, z)
    return z, meta, backend, golden_trace(backend, z)


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
