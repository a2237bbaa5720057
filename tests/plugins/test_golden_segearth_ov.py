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

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from explorer.core.jobs import CancelToken, run_sync
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "segearth_ov.npz"
METHOD = "similarity.segearth_ov"


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
    be, checksum = build_golden_clip(tmp_path_factory.mktemp("golden-segearth"), config)
    # a different init (another torch, another make_tiny_clip) shows up here, not as a method mismatch
    np.testing.assert_allclose(checksum, golden["checksum"], rtol=1e-9)
    return be


@pytest.fixture(scope="module")
def trace(backend, golden):
    from explorer.testing.images import random_image

    prepared = dataclasses.replace(backend.prepare(random_image(64, 64, seed=3)),
                                   pixels=torch.from_numpy(golden["pixels"]))
    t = run_sync(backend.trace(prepared, CaptureSpec(hidden_layers={backend.info.n_layers - 1})))
    return t.with_text(backend.encode_text([str(p) for p in golden["prompts"]]))


def run(backend, trace, **params):
    from explorer.plugin_host.host import PluginHost

    host = PluginHost()
    p = host.make_params(METHOD, params)
    return run_sync(host.run(METHOD, trace, p, target=Target(prompts=trace.text.prompts), cancel=CancelToken(),
                             backend=backend))


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
    maps = np.stack([np.asarray(run(backend, trace, prompt_index=i, **kw).token_values)
                     for i in range(len(trace.text.prompts))])
    np.testing.assert_allclose(maps, golden[f"{case}_logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("key, lam, thd", [("lam03_labels_thd0", None, None), ("lam03_labels_thd9", None, 0.9),
                                           ("lam2_labels_thd0", -2.0, None)])
def test_labels_match_official_postprocess(backend, trace, golden, key, lam, thd):
    kw = {} if lam is None else {"cls_token_lambda": lam}
    if thd is not None:
        kw["prob_threshold"] = thd
    lm = run(backend, trace, output="labels", **kw)  # the defaults: logit_scale 50, prob_threshold 0
    np.testing.assert_array_equal(np.asarray(lm.labels), golden[key])
