"""The shipped demo models keep the figures recorded in the README (fewer scenes, with a margin).

``token-explorer eval-demo --scenes 500`` produced the figures in :data:`MEASURED`; here each model
is scored again through the same code on 100 scenes of the same held-out seeds, and must stay
within :data:`MARGIN` of them (the binomial standard error at 100 scenes is about 0.03-0.05).
A retrained model that is worse, or a change to loading or inference that breaks them, fails.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from explorer.core.resources import demo_model_dir  # noqa: E402

#: ``token-explorer eval-demo --scenes 500`` on the shipped models.
MEASURED = {
    "clip_zero_shot_top1": 0.916,
    "clip_pointing_game": 0.927,
    "sam_point_iou": 0.833,
    "vlm_crop_caption_exact": 0.962,
    "vlm_scene_names_all": 0.514,
}
MARGIN = 0.1
N_SCENES = 100


@pytest.mark.parametrize("kind", ["clip", "sam", "vlm"])
def test_shipped_model_keeps_its_figures(kind):
    import importlib

    assert demo_model_dir(kind).is_dir(), f"the demo {kind} is not shipped in {demo_model_dir(kind)}"
    module = importlib.import_module(f"explorer.demo.{kind}_model")
    figures = module.evaluate(n_scenes=N_SCENES)
    for name, measured in MEASURED.items():
        if name.startswith(kind):
            assert figures[name] >= measured - MARGIN, (name, figures[name], measured)
