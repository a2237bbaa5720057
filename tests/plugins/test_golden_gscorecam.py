"""gScoreCAM against the official code (Chen, Li, Biaz, Bui & Nguyen, ACCV 2022, ``anguyen8/gScoreCAM``:
``tools/cam.py::CAMWrapper`` -> ``pytorch_grad_cam/gscore_cam.py::GScoreCAM`` on ``base_cam.py``).

``tests/golden/gscorecam_clip.npz`` holds a 64x64 RGB image, the model input the project makes of it
(``pixels``), two prompts' official text features, and per case (``meta["cases"]``: prompt, top-k,
batch size, ``is_transformer``) the official cam on the 8x8 token grid (``heatmap_size=None``: no
resize; ReLU and ``normalize2D`` applied) and the official channel weights ``(C,)`` (softmax over
all channels, unscored ones at score 0), run on the repository's ``hila_clip`` CLIP classes loaded
with the weights of a tiny open_clip ViT (``make_tiny_clip(seed=0, width=128, heads=2, ...)`` with
QuickGELU; repository, commit and exact call in ``meta`` and PROVENANCE.md).
``is_transformer=True`` (the [CLS]-gradient channel ranking) is the plugin's ``gradient='cls'`` (and
its default ``auto``); ``False`` ranks by the patch-token gradients (``gradient='patches'``), used
only with every channel scored. Compared: the plugin's normalised map (atol 1e-5), its scored
channels (identical sets) and the channel weights from :func:`gscorecam_job` (atol 1e-6).
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
from explorer_plugins.gscorecam.method import grid_channels, gscorecam_job, token_importance

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "gscorecam_clip.npz"


def _load():
    z = np.load(GOLDEN)
    return {k: z[k] for k in z.files}, json.loads(str(z["meta"][0]))


CASES = _load()[1]["cases"]


def build_golden_clip(folder, meta):
    """The tiny open_clip model of the golden file (QuickGELU has no weights: only the registered
    config changes), loaded through the program's backend; returns it and a weight checksum."""
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
    backend, checksum = build_golden_clip(tmp_path_factory.mktemp("golden-gscorecam"), meta)
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
    p = host.make_params("attribution.gscorecam", params)
    return run_sync(host.run("attribution.gscorecam", trace, p, target=Target(prompts=tuple(meta["prompts"])),
                             cancel=CancelToken(), backend=backend))


def _scored(weights):
    """The channels the official code scored: every unscored channel has the same weight e^0 / Z."""
    values, counts = np.unique(weights, return_counts=True)
    if counts.max() == 1:
        return set(range(len(weights)))
    return set(np.nonzero(weights != values[counts.argmax()])[0].tolist())


def test_meta_names_the_official_code():
    _, meta = _load()
    assert meta["repository"] == "https://github.com/anguyen8/gScoreCAM"
    assert meta["commit"] == "87c35a1342fb15e6b988dfcfba1f28e265ba0aff"
    assert "GScoreCAM" in meta["function"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_gscorecam_matches_official(golden, case):
    g = golden[0]
    name = case["name"]
    source = "cls" if case["is_transformer"] else "patches"
    sources = [source, "auto"] if case["is_transformer"] else [source]
    for s in sources:
        hm = _run(golden, prompt_index=case["prompt_index"], topk=case["topk"], batch_size=case["batch_size"], gradient=s)
        assert hm.meta["gradient"] == source
        np.testing.assert_allclose(hm.token_values, g[f"{name}_cam"].reshape(-1), rtol=0, atol=1e-5)
        assert set(hm.meta["channels"]) == _scored(g[f"{name}_weights"])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_channel_weights_match_official(golden, case):
    g, _, backend, trace = golden
    p = case["prompt_index"]
    gp = backend.gradient_pass(backend.prepared_for(trace), trace.text.embeddings[p], hidden_layers=[3])
    acts = grid_channels(trace.layout, gp.hidden[3])
    imp = token_importance(trace.layout, gp.hidden_grads[3], "cls" if case["is_transformer"] else "patches")

    def score(batch):
        return backend.score_inputs(batch, text_embedding=trace.text.embeddings[p], batch_size=batch.shape[0])

    out = run_sync(gscorecam_job(acts, imp, backend.prepared_for(trace).pixels, score, case["topk"], case["batch_size"]))
    np.testing.assert_allclose(out.weights, g[f"{case['name']}_weights"], rtol=0, atol=1e-6)
    assert set(out.channels.tolist()) == _scored(g[f"{case['name']}_weights"])
