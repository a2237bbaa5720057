"""Click a region: SAM candidates, region layers, labels, captions, what falls inside, exports."""

import json

import numpy as np
import pytest
from PySide6.QtCore import QPointF, Qt

from explorer.core.regions import rle_decode


@pytest.fixture
def specs(sam_spec, vlm_spec):
    return sam_spec, vlm_spec


def _click(qtbot, canvas, x, y, button=Qt.MouseButton.LeftButton, modifier=Qt.KeyboardModifier.NoModifier):
    pos = canvas.mapFromScene(canvas.view.mapViewToScene(QPointF(x, y)))
    qtbot.mouseClick(canvas.viewport(), button, modifier, pos)


def test_segment_add_edit_label_caption_export(qtbot, window, specs, image_file, tmp_path, monkeypatch):
    sam_spec, vlm_spec = specs
    monkeypatch.setenv("EXPLORER_CACHE_DIR", str(tmp_path / "cache"))
    with qtbot.waitSignal(window.map_shown, timeout=60000):
        window.open_image(str(image_file(64, 96)))
    window.regions_panel.model_edit.setText(sam_spec)
    window.regions_panel.segment_button.setChecked(True)
    qtbot.waitUntil(lambda: window.sam_backend is not None, timeout=60000)
    query_before = window.state.query
    with qtbot.waitSignal(window.regions_shown, timeout=60000, check_params_cb=lambda r: isinstance(r, list)) as b:
        _click(qtbot, window.canvas, 30.5, 20.5)
    assert window.state.query == query_before  # segmenting clicks do not move the attention query
    masks = b.args[0]
    assert len(masks) == 3 and masks[0].mask.shape == (64, 96)
    assert window.regions_panel.candidate_buttons[2].isEnabled()
    # a negative point refines: still only one encoder run for this image
    with qtbot.waitSignal(window.regions_shown, timeout=60000, check_params_cb=lambda r: isinstance(r, list)):
        _click(qtbot, window.canvas, 70.5, 40.5, Qt.MouseButton.RightButton)
    assert window.sam_backend.encoder_calls == 1
    assert [p[2] for p in window.prompt_points] == [1, 0]
    window._choose_candidate(0)
    qtbot.mouseClick(window.regions_panel.add_button, Qt.MouseButton.LeftButton)
    assert len(window.regions) == 1 and window.regions_panel.list.count() == 1
    # a second region from another click, then union and subtract
    with qtbot.waitSignal(window.regions_shown, timeout=60000, check_params_cb=lambda r: isinstance(r, list)):
        _click(qtbot, window.canvas, 80.5, 50.5)
    window.add_region("second")
    ids = [r.id for r in window.regions]
    window.union_regions(ids)
    window.subtract_regions([ids[1], ids[0]])
    assert len(window.regions) == 4
    r1, r2, u, d = list(window.regions)
    np.testing.assert_array_equal(u.mask, r1.mask | r2.mask)
    np.testing.assert_array_equal(d.mask, r2.mask & ~r1.mask)
    item = window.regions_panel.list.item(1)
    item.setText("renamed")
    assert window.regions.get(r2.id).name == "renamed"
    item.setCheckState(Qt.CheckState.Unchecked)
    assert not window.regions.get(r2.id).visible
    # what falls inside the selected region
    window.select_region(u.id)
    info = window.regions_panel.info.text()
    assert "of the mass inside" in info and window.regions_panel.share_plot.isVisible()
    # labels with a custom vocabulary, then a caption from a VLM
    window.regions_panel.vocabulary.setCurrentText("custom")
    window.regions_panel.custom_vocabulary.setText("a red circle, a blue square, a dog")
    with qtbot.waitSignal(window.regions_shown, timeout=60000, check_params_cb=lambda r: isinstance(r, dict)):
        window.label_regions([u.id])
    labels = window.regions.get(u.id).labels
    assert len(labels) == 3 and abs(sum(p for _, p in labels) - 1) < 1e-5
    window.vlm_panel.model_edit.setText(vlm_spec)
    window.regions_panel.caption_prompt.setText("<image> describe the image")
    with qtbot.waitSignal(window.regions_shown, timeout=120000, check_params_cb=lambda r: isinstance(r, dict)):
        window.caption_regions([u.id, d.id])
    assert all(isinstance(window.regions.get(i).caption, str) for i in (u.id, d.id))
    # exports
    window.export_regions("coco", str(tmp_path / "r.json"))
    coco = json.loads((tmp_path / "r.json").read_text())
    np.testing.assert_array_equal(rle_decode(coco["annotations"][2]["segmentation"]), u.mask)
    window.export_regions("png", str(tmp_path / "r.zip"))
    assert (tmp_path / "r.zip").stat().st_size > 0


def test_box_prompt_and_region_tokens_kept(qtbot, window, specs, image_file, tmp_path, monkeypatch):
    from explorer.core.layout import Box

    sam_spec, _ = specs
    monkeypatch.setenv("EXPLORER_CACHE_DIR", str(tmp_path / "cache"))
    with qtbot.waitSignal(window.map_shown, timeout=60000):
        window.open_image(str(image_file(64, 64)))
    window.regions_panel.model_edit.setText(sam_spec)
    window.box_prompt()  # first press: a box to adjust
    assert window.region.box is not None
    window.region.set_box(Box(8, 8, 40, 40))
    window.regions_panel.segment_button.setChecked(True)
    qtbot.waitUntil(lambda: window.sam_backend is not None, timeout=60000)
    with qtbot.waitSignal(window.regions_shown, timeout=60000, check_params_cb=lambda r: isinstance(r, list)) as b:
        window.box_prompt()
    assert window.prompt_box == [8.0, 8.0, 40.0, 40.0] and len(b.args[0]) == 3
    window.add_region("boxed")
    region = window.regions.get(window.region_id)
    assert region.prompt["box"] == [8.0, 8.0, 40.0, 40.0]
    # a reduction compare reports how many of the region's tokens each method keeps
    window.compare.set_mode("reduction")
    window.compare.set_checked(["pruning.topk"])
    window.compare.keep.setValue(0.5)
    window.compare.layer.setValue(1)
    with qtbot.waitSignal(window.comparison_shown, timeout=120000, check_params_cb=lambda r: hasattr(r, "selections")) as b:
        window.run_compare(["pruning.topk"])
    from explorer.plugin_host.regions import kept_inside

    kept, total = kept_inside(b.args[0].selections["pruning.topk"], region.mask)
    col = window.compare.COLUMNS.index("region tokens kept")
    assert window.compare.table.item(0, col).text() == f"{kept}/{total}"
