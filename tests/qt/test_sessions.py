"""Sessions in the window: a session that used all four docks reopens to the same pixels; a
damaged or newer bundle is refused and nothing is lost."""

import json
import zipfile

import numpy as np
import pytest
from PySide6.QtCore import QPointF, QSettings, Qt

from explorer.core.trace import Trace


def _click(qtbot, canvas, x, y):
    pos = canvas.mapFromScene(canvas.view.mapViewToScene(QPointF(x, y)))
    qtbot.mouseClick(canvas.viewport(), Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, pos)


def _pixels(widget) -> np.ndarray:
    """The widget as it is drawn now: (h, w, 4) uint8."""
    img = widget.grab().toImage().convertToFormat(widget.grab().toImage().Format.Format_RGBA8888)
    arr = np.frombuffer(img.constBits(), np.uint8, img.sizeInBytes()).reshape(img.height(), img.bytesPerLine())
    return arr[:, : img.width() * 4].reshape(img.height(), img.width(), 4).copy()


def _new_window(qtbot, tmp_path, spec, name):
    from explorer.plugin_host.engine import Engine
    from explorer.qt.app import create_window

    w = create_window(spec, engine=Engine(), settings=QSettings(str(tmp_path / f"{name}.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(w)
    w.resize(1280, 800)
    w.show()
    qtbot.waitExposed(w)
    return w


def _everything_shown(w):
    """What the four docks show, as plain values."""
    return {
        "image": w.model.image.sha256,
        "method": w.model.method_id,
        "prompts": w.model.prompts,
        "regions": [(r.name, int(r.mask.sum()), r.visible) for r in w.regions],
        "region_rows": [w.regions_panel.list.item(i).text() for i in range(w.regions_panel.list.count())],
        "answer": w.vlm_panel.answer.text(),
        "tokens": w.vlm_panel.strip.token_texts(),
        "selected": w.vlm_panel.strip.selected,
        "compare_cells": sorted(w.compare.cells),
        "compare_knobs": (w.model.compare_keep, w.model.compare_layer, w.compare.keep.value(), w.compare.layer.value()),
        "compare_table": [[w.compare.table.item(r, c).text() if w.compare.table.item(r, c) else ""
                           for c in range(w.compare.table.columnCount())] for r in range(w.compare.table.rowCount())],
        "status": w.status_text.text(),
    }


@pytest.fixture
def used_window(qtbot, window, sam_spec, vlm_spec, image_file, tmp_path, monkeypatch):
    """The window after a map, a SAM region, a VLM answer and a reduction comparison."""
    monkeypatch.setenv("EXPLORER_CACHE_DIR", str(tmp_path / "cache"))
    w = window
    w.resize(1280, 800)
    w.set_method("similarity.maskclip")
    w.set_prompts(("a red circle", "a blue square"))
    with qtbot.waitSignal(w.map_shown, timeout=60000):
        w.open_image(str(image_file(64, 96, "scene.png")))
    # regions: a click, a region
    w.regions_panel.model_edit.setText(sam_spec)
    w.regions_panel.segment_button.setChecked(True)
    qtbot.waitUntil(lambda: w.sam_backend is not None, timeout=60000)
    with qtbot.waitSignal(w.regions_shown, timeout=60000, check_params_cb=lambda r: isinstance(r, list)):
        _click(qtbot, w.canvas, 30.5, 20.5)
    w.add_region("left blob")
    w.regions_panel.segment_button.setChecked(False)
    # the VLM: an answer, its second word picked
    w.vlm_panel.model_edit.setText(vlm_spec)
    w.vlm_panel.prompt_edit.setText("<image> describe the image")
    w.vlm_panel.max_tokens.setValue(3)
    with qtbot.waitSignal(w.answer_shown, timeout=120000, check_params_cb=lambda r: isinstance(r, Trace)):
        qtbot.mouseClick(w.vlm_panel.generate_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: w.model.method_id == "vlm.attention" and w.result is not None, timeout=60000)
    w.vlm_panel.strip.select((1,))
    # back to a CLIP map for the canvas, its parameters changed
    with qtbot.waitSignal(w.map_shown, timeout=60000):
        w.set_method("similarity.maskclip")
    with qtbot.waitSignal(w.map_shown, timeout=60000):
        w.set_params(prompt_index=1)
    # compare: a reduction comparison
    w.compare.set_mode("reduction")
    w.compare.set_checked(["pruning.topk", "pruning.evit"])
    w.compare.keep.setValue(0.5)
    w.compare.layer.setValue(1)
    with qtbot.waitSignal(w.comparison_shown, timeout=120000, check_params_cb=lambda r: hasattr(r, "selections")):
        w.run_compare(w.compare.checked())
    qtbot.waitUntil(lambda: not w.runner.busy, timeout=60000)
    return w


def test_a_session_reopens_to_the_same_view(qtbot, used_window, tmp_path, tiny_clip_spec):
    w = used_window
    path = w.save_session(str(tmp_path / "work.tesession"))
    assert path and zipfile.is_zipfile(path)
    before = _everything_shown(w)
    assert w.message.text() == ""  # the note about the word map went when MaskCLIP was picked again
    w.tabs.setCurrentWidget(w.tabs.widget(0))
    qtbot.wait(50)
    canvas_before = _pixels(w.canvas)
    w.tabs.setCurrentWidget(w.compare)
    qtbot.wait(50)
    cells_before = {mid: _pixels(c.canvas) for mid, c in w.compare.cells.items()}

    other = _new_window(qtbot, tmp_path, tiny_clip_spec.canonical(), "other")
    try:
        with qtbot.waitSignal(other.session_opened, timeout=60000):
            other.open_session(path)
        qtbot.waitUntil(lambda: other.model.slot("clip").ready, timeout=60000)
        qtbot.waitUntil(lambda: not other.runner.busy, timeout=60000)
        after = _everything_shown(other)
        before["status"] = after["status"] = None  # "session … opened" vs the map's title
        assert after == before
        assert other.model.view.result is not None and other.model.view.method_id == "similarity.maskclip"
        np.testing.assert_array_equal(other.result.token_values, w.result.token_values)
        assert other.message.text() == ""
        other.tabs.setCurrentWidget(other.tabs.widget(0))
        qtbot.wait(50)
        np.testing.assert_array_equal(_pixels(other.canvas), canvas_before)
        other.tabs.setCurrentWidget(other.compare)
        qtbot.wait(50)
        for mid, pixels in cells_before.items():
            np.testing.assert_array_equal(_pixels(other.compare.cells[mid].canvas), pixels)
        # the reopened answer is live: picking another word draws its map
        with qtbot.waitSignal(other.map_shown, timeout=60000):
            other.vlm_panel.strip.select((0,))
        assert other.model.method_id == "vlm.attention"
        # recent sessions remember it
        assert other.session_controller.recent()[0] == path
    finally:
        other.close()


@pytest.mark.parametrize("damage", ["truncated", "newer", "not-a-zip", "image-changed"])
def test_a_damaged_bundle_is_refused_and_nothing_is_lost(qtbot, window, image_file, tmp_path, damage):
    w = window
    src = image_file(64, 64, "pic.png")
    w.set_method("attention.rollout")
    with qtbot.waitSignal(w.map_shown, timeout=60000):
        w.open_image(str(src))
    path = tmp_path / "s.tesession"
    assert w.save_session(str(path))
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "not-a-zip":
        path.write_bytes(b"hello")
    elif damage == "newer":
        with zipfile.ZipFile(path) as zf:
            entries = {n: zf.read(n) for n in zf.namelist()}
        meta = json.loads(entries["session.json"])
        meta["schema_version"] += 1
        entries["session.json"] = json.dumps(meta).encode()
        with zipfile.ZipFile(path, "w") as zf:
            for n, b in entries.items():
                zf.writestr(n, b)
    else:
        from PIL import Image

        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(src)
    # a different state in the window, which a refused bundle must leave alone
    with qtbot.waitSignal(w.map_shown, timeout=60000):
        w.open_image(str(image_file(50, 70, "now.png")))
    shown = (w.model.image.sha256, w.model.method_id, w.result)
    w.open_session(str(path))
    qtbot.waitUntil(lambda: "Session not opened" in w.message.text(), timeout=30000)
    text = w.message.text()
    assert "\n" not in text
    expected = {"truncated": "not a readable session", "not-a-zip": "not a readable session",
                "newer": "newer version", "image-changed": "changed since"}[damage]
    assert expected in text
    assert (w.model.image.sha256, w.model.method_id, w.result) == shown
    assert w.canvas.overlay_items
