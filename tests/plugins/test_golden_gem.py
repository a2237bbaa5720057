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

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from explorer.core.jobs import CancelToken, run_sync
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec
from explorer_plugins.gem.method import gem_features

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "gem.npz"


def build_golden_clip(folder: Path, config: dict):
    """The tiny model of the golden file: ``make_tiny_clip`` seed 0, QuickGELU (OpenAI's activation,
    which CLIP Surgery's official classes use), every bias and LayerNorm parameter moved by a seeded
    ``0.1 * randn`` (open_clip initialises them to 0 and 1). Returns ``(backend, checksum)``."""
    from safetensors.torch import load_file, save_file

    from explorer.backends.clip import ClipBackend
    from explorer.testing.tiny import make_tiny_clip

    spec = make_tiny_clip(folder, name="golden-dense-vit", seed=0, **config)
    cfg = Path(spec.config)
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "quick_gelu": True}, indent=2))
    sd = load_file(spec.weights)
    g = torch.Generator().manual_seed(1)
    for k in sorted(sd):
        if k.endswith(".bias") or (k.endswith(".weight") and k.split(".")[-2].startswith("ln_")):
            sd[k] = sd[k] + 0.1 * torch.randn(sd[k].shape, generator=g)
    save_file(sd, spec.weights)
    checksum = np.array([float(sd[k].double().sum()) for k in (
        "visual.conv1.weight", "visual.transformer.resblocks.6.attn.in_proj_weight", "token_embedding.weight",
        "visual.transformer.resblocks.6.ln_1.bias")])
    return ClipBackend.load(spec), checksum


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def backend(tmp_path_factory, golden):
    config = json.loads(str(golden["config"][0]))  # make_tiny_clip's keyword arguments
    be, checksum = build_golden_clip(tmp_path_factory.mktemp("golden-gem"), config)
    # a different init (another torch, another make_tiny_clip) shows up here, not as a GEM mismatch
    np.testing.assert_allclose(checksum, golden["checksum"], rtol=1e-9)
    return be


@pytest.fixture(scope="module")
def trace(backend, golden):
    from explorer.testing.images import random_image

    prepared = dataclasses.replace(backend.prepare(random_image(64, 64, seed=3)),
                                   pixels=torch.from_numpy(golden["pixels"]))
    t = run_sync(backend.trace(prepared, CaptureSpec.everything(backend.info.n_layers)))
    return t.with_text(backend.encode_text([str(p) for p in golden["prompts"]]))


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
    from explorer.plugin_host.host import PluginHost

    host = PluginHost()
    prompts = trace.text.prompts
    cols = []
    for i in range(len(prompts)):  # the plugin's defaults: GEM's single template, raw cosine
        p = host.make_params("similarity.gem", {"prompt_index": i})
        hm = run_sync(host.run("similarity.gem", trace, p, target=Target(prompts=prompts), cancel=CancelToken(),
                               backend=backend))
        cols.append(np.asarray(hm.token_values))
    maps = np.stack(cols)  # (K, 64)
    np.testing.assert_allclose(maps, golden["text"] @ golden["default_feat_gem"][1:].T, atol=1e-5, rtol=0)
    # GEMWrapper.forward's display steps: bilinear upsampling to the image, then per-prompt min-max
    up = F.interpolate(torch.from_numpy(maps).reshape(1, -1, 8, 8), size=(64, 64), mode="bilinear")[0]
    lo, hi = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)
    np.testing.assert_allclose(((up - lo) / (hi - lo)).numpy(), golden["maps_minmax"], atol=1e-5, rtol=0)
