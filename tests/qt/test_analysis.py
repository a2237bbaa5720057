"""Label maps with a legend, the box tool, faithfulness curves, the compare grid, parameter forms."""

import numpy as np
import pytest

from explorer.core.layout import Box
from explorer.core.results import Heatmap, LabelMap
from explorer.plugin_host.api import params_to_strings, parse_params
from explorer.plugin_host.host import PluginHost
from explorer.qt.param_form import ParamForm


def _show(qtbot, w, action):
    with qtbot.waitSignal(w.map_shown, timeout=60000) as blocker:
        action()
    return blocker.args[0]


def test_labels_legend_and_one_click_prompt_map(qtbot, window, image_file):
    window.set_method("similarity.maskclip")
    window.set_prompts(("a red circle", "a blue square", "a dog"))
    _show(qtbot, window, lambda: window.open_image(str(image_file(64, 64))))
    result = _show(qtbot, window, lambda: window.set_params(output="labels", templates="none"))
    assert isinstance(result, LabelMap)
    assert window.legend.isVisible() and window.legend.count() == 3
    rgba = window.canvas.overlay_items[0].image
    assert rgba.shape == (8, 8, 4)
    result = _show(qtbot, window, lambda: window.legend.class_clicked.emit(2))
    assert isinstance(result, Heatmap) and "a dog" in result.label
    assert not window.legend.isVisible()


def test_box_reports_share_of_the_map(qtbot, window, image_file):
    window.set_method("attention.rollout")
    result = _show(qtbot, window, lambda: window.open_image(str(image_file(64, 64))))
    window.box_action.setChecked(True)
    window.region.set_box(Box(0, 0, 64, 64))
    assert window.region_stats()["mass_inside"] == pytest.approx(1.0)
    window.region.set_box(Box(0, 0, 32, 64))
    stats = window.region_stats()
    raster = result.to_image((64, 64))
    lo, hi = np.nanmin(raster), np.nanmax(raster)
    norm = (raster - lo) / (hi - lo)
    assert stats["mass_inside"] == pytest.approx(norm[:, :32].sum() / norm.sum(), rel=1e-5)
    assert "of the map's mass" in window.region_label.text()
    window.box_action.setChecked(False)
    assert window.region.box is None and not window.region_label.isVisible()


def test_faithfulness_curves_are_plotted(qtbot, window, image_file):
    window.set_method("attention.rollout")
    _show(qtbot, window, lambda: window.open_image(str(image_file(64, 64))))
    window.run_faithfulness()
    qtbot.waitUntil(lambda: window.faithfulness.metrics is not None, timeout=60000)
    m = window.faithfulness.metrics.values
    assert {"deletion_auc", "insertion_auc", "random_deletion_auc"} <= set(m)
    assert len(window.faithfulness.plot.listDataItems()) == 4
    assert "deletion AUC" in window.faithfulness.summary.text()


def test_compare_grid_runs_methods_on_one_trace(qtbot, window, image_file):
    window.set_method("attention.rollout")
    _show(qtbot, window, lambda: window.open_image(str(image_file(64, 80))))
    window.set_prompts(("a red circle",))
    qtbot.waitUntil(lambda: not window.runner.busy, timeout=60000)
    count = window.backend.forward_count
    ids = ["attention.raw", "attention.rollout", "similarity.maskclip"]
    window.compare.set_checked(ids)
    window.tabs.setCurrentWidget(window.compare)
    window.run_compare(window.compare.checked())
    qtbot.waitUntil(lambda: len(window.compare.results) == 3, timeout=60000)
    assert window.backend.forward_count == count  # the cached trace served every method
    assert all(cell.canvas.overlay_items for cell in window.compare.cells.values())
    assert window.compare.table.rowCount() == 3 and window.compare.table.item(0, 2).text() != ""
    views = [c.canvas.view for c in window.compare.cells.values()]
    views[0].setRange(xRange=(10, 30), yRange=(10, 30), padding=0)
    qtbot.wait(50)
    # linked: the same centre (each cell keeps its own aspect ratio, so extents differ slightly)
    for v in views[1:]:
        for axis in (0, 1):
            assert np.mean(v.viewRange()[axis]) == pytest.approx(np.mean(views[0].viewRange()[axis]), abs=0.2)
            assert np.diff(v.viewRange()[axis])[0] < 40
    window.compare.score_requested.emit(ids)
    qtbot.waitUntil(lambda: all(window.compare.table.item(r, 3) is not None for r in range(3)), timeout=120000)


def test_every_method_form_round_trips(qtbot):
    host = PluginHost()
    form = ParamForm()
    qtbot.addWidget(form)
    for m in host.methods():
        model = host.params_model(m.id)
        default = model()
        form.set_model(model, default, n_layers=12, n_heads=12)
        assert form.values() == default, m.id
        text = params_to_strings(default)
        assert parse_params(model, text) == form.values()
