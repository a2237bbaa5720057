"""What a new user hit first, driven through the real window: each test reproduces one finding
(a failed load, a second comparison, a word click, a method that cannot run, the query marker,
the folder browser, words the model cannot represent, a demo model on a photograph, cramped
displays, layer keys at the ends)."""

import numpy as np
import pytest
from PIL import Image
from PySide6.QtCore import QRect, Qt

from explorer.core.resources import samples_dir
from explorer.core.results import Heatmap
from explorer.core.trace import Trace


def _open(qtbot, w, path, timeout=60000):
    with qtbot.waitSignal(w.map_shown, timeout=timeout) as blocker:
        w.open_image(str(path))
    return blocker.args[0]


def test_a_failed_load_keeps_the_working_model(qtbot, window, image_file, monkeypatch):
    """Finding 1 (and 6): no network, weights not cached -> one short line, the model in use stays."""
    import explorer.backends.network as network

    monkeypatch.setattr(network, "hub_reachable", lambda timeout=1.0: False)
    window.set_method("attention.rollout")
    _open(qtbot, window, image_file(64, 64))
    name = window.backend.info.name
    loads = []
    window.runner.progress.connect(lambda d, p: loads.append(d) if d.startswith("loading") else None)
    window.load_model("ViT-B-16@openai")
    qtbot.waitUntil(lambda: "Model not loaded" in window.message.text(), timeout=30000)
    text = window.message.text()
    assert "\n" not in text and len(text) < 400
    assert "local-dir:" in text or "@/path" in text  # the spec forms that load local files
    assert f"{name} stays in use" in text
    assert window.model.slot("clip").ready and window.backend.info.name == name
    assert name in window.model_label.text()
    # the kept model still answers, and nothing retries the failed download
    with qtbot.waitSignal(window.map_shown, timeout=60000):
        window.set_method("attention.raw")
    assert window.model.slot("clip").loading is None


def test_a_failed_first_load_is_not_retried_by_every_action(qtbot, bare_window, image_file, monkeypatch):
    import explorer.backends.network as network

    monkeypatch.setattr(network, "hub_reachable", lambda timeout=1.0: False)
    w = bare_window
    w.load_model("ViT-B-16@openai")
    qtbot.waitUntil(lambda: "Model not loaded" in w.message.text(), timeout=30000)
    submitted = []
    original = w.runner.submit
    w.runner.submit = lambda key, *a, **k: (submitted.append(key), original(key, *a, **k))[1]
    w.open_image(str(image_file(64, 64)))
    qtbot.waitUntil(lambda: "No model" in w.canvas.note_text(), timeout=30000)
    assert not any(k.startswith("model:") for k in submitted)
    assert "local-dir:" in w.canvas.note_text()  # the canvas says why and how to fix it


def test_a_second_comparison_replaces_the_first(qtbot, window, image_file):
    """Finding 2: no stale cell, title or row; the window keeps its size."""
    window.set_method("attention.rollout")
    _open(qtbot, window, image_file(64, 80))
    window.set_prompts(("a red circle",))
    size = window.size()
    window.tabs.setCurrentWidget(window.compare)
    maps = ["attention.raw", "attention.rollout", "similarity.maskclip"]
    window.compare.set_checked(maps)
    window.run_compare(window.compare.checked())
    qtbot.waitUntil(lambda: len(window.compare.results) == 3, timeout=60000)
    window.compare.set_mode("reduction")
    ids = ["pruning.topk", "pruning.evit"]
    window.compare.set_checked(ids)
    with qtbot.waitSignal(window.comparison_shown, timeout=120000, check_params_cb=lambda r: hasattr(r, "selections")):
        window.run_compare(window.compare.checked())
    qtbot.wait(50)
    from explorer.qt.compare import _Cell

    cells = [c for c in window.compare.findChildren(_Cell)]
    titles = sorted(c.title.text() for c in cells)
    assert len(cells) == 2 and window.compare.grid.count() == 2
    assert not any("MaskCLIP" in t or "rollout" in t.lower() for t in titles), titles
    assert set(window.compare.cells) == set(ids)
    assert window.compare.table.rowCount() == 2
    assert window.size() == size
    # the session model holds one comparison, of the new methods
    assert set(window.model.comparison.method_ids) == set(window.model.comparison.results) == set(ids)


def test_a_word_click_then_a_new_image_still_draws_a_map(qtbot, window, vlm_spec, image_file):
    """Finding 3: the VLM word map does not capture the Method dock."""
    window.set_method("attention.rollout")
    _open(qtbot, window, image_file(60, 100, "first.png"))
    window.vlm_panel.model_edit.setText(vlm_spec)
    window.vlm_panel.prompt_edit.setText("<image> describe the image")
    window.vlm_panel.max_tokens.setValue(3)
    with qtbot.waitSignal(window.answer_shown, timeout=120000, check_params_cb=lambda r: isinstance(r, Trace)):
        qtbot.mouseClick(window.vlm_panel.generate_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: window.model.method_id == "vlm.attention" and isinstance(window.result, Heatmap), timeout=60000)
    assert "was Attention rollout" in window.message.text() or "Attention rollout" in window.message.text()
    # a new image: the dock goes back to the CLIP method and a map is drawn
    result = _open(qtbot, window, image_file(64, 64, "second.png"))
    assert window.model.method_id == "attention.rollout"
    assert isinstance(result, Heatmap) and "rollout" in result.label.lower()
    assert window.canvas.overlay_items and window.canvas.note_text() == ""
    assert "Ask the VLM" not in window.message.text()
    window.tabs.setCurrentWidget(window.compare)
    assert "Ask the VLM" not in window.message.text()


def test_a_method_that_cannot_run_says_so_on_the_canvas(qtbot, window, image_file):
    """Finding 3: MaskCLIP without a prompt leaves no old map, colour bar or status behind."""
    window.set_method("attention.raw")
    _open(qtbot, window, image_file(64, 64))
    assert window.canvas.overlay_items and window.canvas.colorbar.isVisible()
    window.set_prompts(())
    window.set_method("similarity.maskclip")
    qtbot.waitUntil(lambda: "needs a text prompt" in window.canvas.note_text(), timeout=10000)
    assert not window.canvas.overlay_items
    assert not window.canvas.colorbar.isVisible()
    assert window.result is None
    assert "raw" not in window.status_text.text().lower()
    assert "needs a text prompt" in window.status_text.text()


def test_the_query_marker_only_for_methods_that_read_a_query(qtbot, window, image_file):
    """Finding 3: the marker of a clicked patch disappears for methods that ignore the query."""
    window.set_method("attention.raw")
    _open(qtbot, window, image_file(64, 64))
    with qtbot.waitSignal(window.map_shown, timeout=30000):
        window.set_query(14)
    assert window.canvas.marker.isVisible()
    with qtbot.waitSignal(window.map_shown, timeout=30000):
        window.set_method("attention.rollout")
    assert not window.canvas.marker.isVisible()
    assert "not used" in window.panel.query_label.text()
    with qtbot.waitSignal(window.map_shown, timeout=30000):
        window.set_method("attention.raw")
    assert window.canvas.marker.isVisible()  # the query is still the clicked patch


def test_the_browser_highlights_the_file_shown(qtbot, window, tmp_path, image_file):
    """Finding 3: a file that fails to open, or an image from elsewhere, moves no highlight onto
    a file that is not on the canvas."""
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((48, 48, 3), 60 * (i + 1), np.uint8)).save(folder / f"p{i}.png")
    (folder / "p3.png").write_bytes(b"not an image")
    window.set_method("attention.rollout")
    window.browser.set_folder(folder)
    lst = window.browser.list
    shown = lambda: lst.currentItem().data(Qt.ItemDataRole.UserRole) if lst.currentItem() else None  # noqa: E731
    with qtbot.waitSignal(window.map_shown, timeout=60000):
        window.browser._activate(lst.item(1))
    assert shown() == str(folder / "p1.png")
    lst.setCurrentRow(3)  # the user moves to the broken file and opens it
    window.browser._activate(lst.item(3))
    qtbot.waitUntil(lambda: "cannot read" in window.message.text(), timeout=10000)
    assert shown() == str(folder / "p1.png") == window.model.image_path
    _open(qtbot, window, image_file(40, 40, "elsewhere.png"))
    assert shown() is None


@pytest.fixture
def demo_window(qtbot, tmp_path):
    from PySide6.QtCore import QSettings

    from explorer.plugin_host.engine import Engine
    from explorer.qt.app import create_window

    w = create_window("demo", engine=Engine(), settings=QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(w)
    w.show()
    qtbot.waitExposed(w)
    with qtbot.waitSignal(w.model_loaded, timeout=60000):
        w.load_model("demo")
    yield w
    w.close()


def test_words_the_demo_model_cannot_represent_are_flagged(qtbot, demo_window):
    """Finding 7: 'a motorcycle' -> 'a <unk>' is said in the chips and the message bar."""
    w = demo_window
    w.set_method("similarity.maskclip")
    w.set_prompts(("a motorcycle", "a red circle"))
    _open(qtbot, w, samples_dir() / "scene-01.png")
    assert "motorcycle" in w.message.text() and w.message.kind == "warning"
    assert "red circle" not in w.message.text()
    chips = w.panel.tokens_label.text()
    assert "&lt;unk&gt;" in chips and "color" in chips.lower() and "red" in chips


def test_a_demo_model_on_a_photograph_is_said_once(qtbot, demo_window):
    """Finding 7: a photograph with the demo model gets one warning; a synthetic scene none."""
    w = demo_window
    w.set_method("attention.rollout")
    _open(qtbot, w, samples_dir() / "scene-02.png")
    assert w.message.text() == ""
    _open(qtbot, w, samples_dir() / "photo-cat.png")
    assert "synthetic shapes" in w.message.text() and w.message.kind == "warning"
    w.model.clear_message()
    with qtbot.waitSignal(w.map_shown, timeout=30000):
        w.set_params(head_fusion="max")
    assert w.message.text() == ""  # once per image, not on every rerun


def _rows_visible(view) -> int:
    """Rows of a list or table the widget's viewport has room for."""
    row = view.sizeHintForRow(0) if view.model().rowCount() else 24
    return view.viewport().height() // max(row, 1)


def test_displays_are_readable_at_1280x800(qtbot, window, vlm_spec, image_file):
    """Finding 8: lists and tables show five rows, plots read plainly, token chips do not overlap,
    the prompt index names its prompt, the layer x head grid is labelled."""
    w = window
    w.resize(1280, 800)
    w.set_method("similarity.maskclip")
    w.set_prompts(("a red circle", "a blue square"))
    _open(qtbot, w, image_file(64, 80))
    # the prompt index names the prompts
    w.set_params(output="map")
    combo = w.panel.form.widgets["prompt_index"]
    assert [combo.itemText(i) for i in range(combo.count())] == ["0: a red circle", "1: a blue square"]
    # the regions list and the metrics table have room for five rows
    w.regions_dock.raise_()
    qtbot.wait(50)
    assert w.regions_panel.list.height() >= 5 * 36
    w.tabs.setCurrentWidget(w.compare)
    qtbot.wait(50)
    w.compare.table.setRowCount(6)
    assert _rows_visible(w.compare.table) >= 5
    # the sweep plot reads in plain units with its legend beside the data
    axis = w.compare.sweep_plot.getAxis("bottom")
    w.compare.show_sweep({"pruning.topk": [None] * 4})
    assert "x0.001" not in axis.labelString() and not axis.autoSIPrefix
    assert w.compare.sweep_legend.parentItem() is not w.compare.sweep_plot.vb
    # VLM token chips wrap without overlap
    w.vlm_dock.raise_()
    w.vlm_panel.strip.set_tokens([f"word{i}" for i in range(40)])
    qtbot.wait(50)
    rects = [QRect(b.mapTo(w.vlm_panel, b.rect().topLeft()), b.size()) for b in w.vlm_panel.strip.buttons]
    assert all(r.right() <= w.vlm_panel.width() for r in rects)
    assert not any(a.intersects(b) for i, a in enumerate(rects) for b in rects[i + 1:])
    # the layer x head grid names its rows and columns
    grid = w.vlm_panel.grid
    grid.show_maps(np.random.default_rng(0).random((2, 3, 16)), (4, 4), layers=[5, 9])
    texts = {item.text for item in grid.ci.items if hasattr(item, "text")}
    assert {"L5", "L9", "h0", "h1", "h2"} <= texts


def test_layer_keys_stop_at_the_ends_and_say_so(qtbot, window, image_file):
    """Finding 8: `]` on the last layer does not wrap to the first."""
    window.set_method("attention.raw")
    _open(qtbot, window, image_file(64, 64))
    layer = window.panel.form.widgets["layer"]
    with qtbot.waitSignal(window.map_shown, timeout=30000):
        layer.setValue(layer.maximum())
    qtbot.keyClick(window, Qt.Key.Key_BracketRight)
    assert layer.value() == layer.maximum()
    assert "already the last" in window.status_text.text()
    with qtbot.waitSignal(window.map_shown, timeout=30000) as blocker:
        qtbot.keyClick(window, Qt.Key.Key_BracketLeft)
    assert blocker.args[0].meta["layer"] == layer.maximum() - 1

