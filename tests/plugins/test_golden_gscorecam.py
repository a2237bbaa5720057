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

from functools import partial

import numpy as np
import pytest

from explorer.core.jobs import run_sync
from explorer_plugins.gscorecam.method import grid_channels, gscorecam_job, token_importance
from golden_models import load_golden, meta_clip_golden, run_on_golden

GOLDEN = "gscorecam_clip.npz"
_run = partial(run_on_golden, "attribution.gscorecam")
CASES = load_golden(GOLDEN)[1]["cases"]


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    return meta_clip_golden(tmp_path_factory.mktemp("golden-gscorecam"), GOLDEN)


def _scored(weights):
    """The channels the official code scored: every unscored channel has the same weight e^0 / Z."""
    values, counts = np.unique(weights, return_counts=True)
    if counts.max() == 1:
        return set(range(len(weights)))
    return set(np.nonzero(weights != values[counts.argmax()])[0].tolist())


def test_meta_names_the_official_code():
    _, meta = load_golden(GOLDEN)
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
