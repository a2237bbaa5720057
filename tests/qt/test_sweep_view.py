"""File ▸ Open sweep results: the rows sort as numbers, and double-clicking a row puts that image,
method, setting and target on the canvas."""

import json

import numpy as np
import pytest
from PySide6.QtCore import Qt

pytest.importorskip("pyarrow")


@pytest.fixture
def results(tmp_path, tiny_clip_spec):
    from explorer.sweep.run import run_sweep
    from explorer.sweep.spec import load_spec

    spec = load_spec({"models": [tiny_clip_spec.canonical()],
                      "dataset": {"kind": "synthetic", "count": 3, "size": [64, 64], "seed": 21},
                      "methods": [{"id": "pruning.topk", "params": {"layer": 1}, "grid": {"keep": [0.25, 0.5]}},
                                  {"id": "similarity.maskclip", "params": {"templates": "none"}}]})
    out = tmp_path / "sweep"
    run_sweep(spec, out, plain=True)  # the worker in this process: the same rows Ray writes
    return out


def _double_click(qtbot, view, view_row):
    pos = view.table.visualRect(view.proxy.index(view_row, 0)).center()
    qtbot.mouseClick(view.table.viewport(), Qt.MouseButton.LeftButton, pos=pos)  # a double click is a press, then
    qtbot.mouseDClick(view.table.viewport(), Qt.MouseButton.LeftButton, pos=pos)


def test_open_sort_and_pick_a_row(qtbot, window, results):
    from explorer.core.metrics import pointing_game
    from explorer.demo.scenes import make_scene, scene_seed

    with qtbot.waitSignal(window.sweep_shown, timeout=30000):
        window.open_sweep(str(results))
    view = window.sweep_view
    df = window.model.sweep.rows
    assert window.tabs.currentWidget() is view
    assert view.model.rowCount() == len(df) == 3 * 2 + 3 * 2  # 2 reduction settings + MaskCLIP on 2 objects
    assert "pointing_game" in view.model.columns and "cosine" in view.model.columns
    assert "miou" not in view.model.columns  # metrics with no value anywhere are not shown
    # sorting by a metric orders the rows by its numbers (rows without it last)
    view.sort_by("cosine", descending=True)
    shown = [df["cosine"].iloc[view.position_at(r)] for r in range(len(df))]
    finite = [v for v in shown if np.isfinite(v)]
    assert finite == sorted(finite, reverse=True) and all(np.isnan(v) for v in shown[len(finite):])
    # the map row with the least mass inside its object: onto the canvas
    view.sort_by("mass_inside")
    row = df.iloc[view.position_at(0)]
    assert row["method"] == "similarity.maskclip" and row["mass_inside"] == df["mass_inside"].min()
    with qtbot.waitSignal(window.map_shown, timeout=60000) as blocker:
        _double_click(qtbot, view, 0)
    assert window.tabs.currentIndex() == 0
    assert window.model.method_id == "similarity.maskclip" and window.model.prompts == (row["target"],)
    scene = make_scene(scene_seed(21, int(row["index"])), size=(64, 64), n_objects=2)
    np.testing.assert_array_equal(window.model.image.rgb, scene.image)
    obj = next(o for o in scene.objects if o.caption == row["target"])
    raster = blocker.args[0].to_image((64, 64))
    assert float(pointing_game(raster, obj.mask)) == row["pointing_game"]  # the canvas shows the row's map
    # a reduction row: its method and keep ratio
    view.filter.setText("topk")
    assert view.proxy.rowCount() == 6
    view.sort_by("cosine")
    row = df.iloc[view.position_at(0)]
    with qtbot.waitSignal(window.map_shown, timeout=60000) as blocker:
        _double_click(qtbot, view, 0)
    assert window.model.method_id == "pruning.topk"
    assert window.model.current_params.keep == json.loads(row["setting"])["keep"]
    assert blocker.args[0].kept.sum() == row["kept"]


def test_a_folder_without_results_is_refused(qtbot, window, tmp_path):
    window.open_sweep(str(tmp_path))
    qtbot.waitUntil(lambda: "Sweep results not opened" in window.message.text(), timeout=10000)
    assert "no spec.json" in window.message.text()
    assert window.model.sweep is None
