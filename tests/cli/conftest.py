"""A saved session for the replay tests: the sample scene, a rollout map, two regions and a
pruning comparison, made with the demo CLIP through the same session model the window uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "resources" / "samples" / "scene-01.png"


@pytest.fixture(scope="session")
def session_bundle(tmp_path_factory):
    """``(path, model)``: a bundle written by ``save_session`` and the session model it holds."""
    from explorer.backends.registry import parse_model_spec
    from explorer.core.bundle import save_session
    from explorer.core.image_io import load_image
    from explorer.core.jobs import run_sync
    from explorer.core.session import SessionModel
    from explorer.core.target import Target
    from explorer.plugin_host.compare import compare_job
    from explorer.plugin_host.defaults import default_params
    from explorer.plugin_host.engine import Engine

    engine = Engine()
    spec = parse_model_spec("demo")
    image = load_image(SAMPLE)
    model = SessionModel("demo")
    model.set_image(image, str(SAMPLE))
    mid = "attention.rollout"
    params = default_params(engine.host, mid, None)
    model.set_method(mid, params)
    backend, trace = run_sync(engine.prepare_job(spec, image, mid, params, Target()))
    model.load_succeeded("clip", spec.canonical(), backend.info)
    result = run_sync(engine.method_job(mid, trace, params, Target(), None, backend))
    assert model.show_result(result, mid, image.sha256, spec.canonical())
    H, W = image.size
    left = np.zeros((H, W), bool)
    left[H // 4: H // 2, W // 8: W // 3] = True
    right = np.zeros((H, W), bool)
    right[H // 2:, W // 2:] = True
    model.edit_regions("add", left, "left box")
    model.edit_regions("add", right, "right box")
    ids = ["pruning.topk", "merging.tome"]
    cmp = run_sync(compare_job(engine, spec, image, ids, keep=0.5))
    comparison = model.start_comparison("reduction", ids, keep=0.5, layer=cmp.layer)
    for m in ids:
        model.comparison_result(comparison.id, m, cmp.selections[m], dict(cmp.metrics[m].values))
    model.comparison_agreement(comparison.id, cmp.agreement, cmp.agreement_kind)
    path = save_session(model, tmp_path_factory.mktemp("session") / "scene.tesession")
    return path, model
