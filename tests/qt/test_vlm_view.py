"""Asking a VLM in the window: streamed answer, token strip, a word's map, the layer x head grid."""

import numpy as np
import pytest
from PySide6.QtCore import Qt

from explorer.core.results import Heatmap
from explorer.core.trace import Trace


@pytest.fixture
def window(bare_window):
    """Asking a VLM needs no CLIP loaded."""
    return bare_window


def test_ask_select_a_word_and_see_its_map(qtbot, window, vlm_spec, image_file):
    with qtbot.waitSignal(window.model_loaded, timeout=60000):
        window.load_model(window.state.model_spec)
    with qtbot.waitSignal(window.map_shown, timeout=60000):
        window.open_image(str(image_file(60, 100)))
    streamed = []
    window.runner.progress.connect(lambda d, p: streamed.append(p.message) if d == "generating" else None)
    window.vlm_panel.model_edit.setText(vlm_spec)
    window.vlm_panel.prompt_edit.setText("<image> describe the image")
    window.vlm_panel.max_tokens.setValue(4)
    with qtbot.waitSignal(window.answer_shown, timeout=120000, check_params_cb=lambda r: isinstance(r, Trace)) as b:
        qtbot.mouseClick(window.vlm_panel.generate_button, Qt.MouseButton.LeftButton)
    gen = b.args[0].extras["generation"]
    assert gen.tokens and len(window.vlm_panel.strip.buttons) == len(gen.tokens)
    assert streamed  # the answer streamed in token by token
    # the first token was selected automatically and its map drawn through the anyres layout
    qtbot.waitUntil(lambda: isinstance(window.result, Heatmap) and "attention of" in window.result.label, timeout=60000)
    assert len(window.canvas.overlay_items) == 2  # base view and tiles
    L, H = window.vlm_backend.info.n_layers, window.vlm_backend.info.n_heads
    assert len(window.vlm_panel.grid.items) == L * H
    # a span of two tokens
    with qtbot.waitSignal(window.map_shown, timeout=60000,
                          check_params_cb=lambda r: isinstance(r, Heatmap) and r.meta.get("tokens") == [0, 1]):
        window.vlm_panel.strip.select((0, 1))
    # picking a grid cell narrows the map to that layer and head
    with qtbot.waitSignal(window.map_shown, timeout=60000,
                          check_params_cb=lambda r: isinstance(r, Heatmap) and "head 1" in r.label):
        window.vlm_panel.grid.picked.emit(0, 1)
    expected = np.nanmean(gen.attention[0][[0, 1], 1], 0)
    np.testing.assert_allclose(window.result.token_values, np.where(np.isnan(window.result.token_values), np.nan, expected),
                               atol=1e-6)


def test_vlm_method_without_an_answer_explains_what_to_do(qtbot, window, image_file):
    with qtbot.waitSignal(window.model_loaded, timeout=60000):
        window.load_model(window.state.model_spec)
    with qtbot.waitSignal(window.map_shown, timeout=60000):
        window.open_image(str(image_file(64, 64)))
    window.set_method("vlm.attention")
    # the canvas says what is missing instead of keeping the previous map
    qtbot.waitUntil(lambda: "Ask the VLM" in window.canvas.note_text(), timeout=10000)
    assert not window.canvas.overlay_items and not window.canvas.colorbar.isVisible()


@pytest.fixture(scope="module")
def demo_vlm_spec(tmp_path_factory):
    from explorer.testing.tiny_vlm import make_tiny_vlm

    return make_tiny_vlm(tmp_path_factory.mktemp("vlm-demo"), "demo").canonical()


def test_vlm_pruning_compare(qtbot, window, demo_vlm_spec, image_file):
    with qtbot.waitSignal(window.model_loaded, timeout=60000):
        window.load_model(window.state.model_spec)
    with qtbot.waitSignal(window.map_shown, timeout=60000):
        window.open_image(str(image_file(60, 100)))
    window.vlm_panel.model_edit.setText(demo_vlm_spec)
    window.vlm_panel.prompt_edit.setText("<image> describe the scene")
    window.vlm_panel.max_tokens.setValue(3)
    with qtbot.waitSignal(window.answer_shown, timeout=120000, check_params_cb=lambda r: isinstance(r, Trace)):
        qtbot.mouseClick(window.vlm_panel.generate_button, Qt.MouseButton.LeftButton)
    window.compare.set_mode("vlm")
    ids = ["vlm.fastv", "vlm.random", "vlm.pool"]
    window.compare.set_checked(ids)
    window.compare.keep.setValue(0.5)
    window.run_compare(window.compare.checked())
    done = lambda: all(window.compare.table.item(r, 2) is not None for r in range(3))  # noqa: E731
    qtbot.waitUntil(done, timeout=180000)
    assert len(window.compare.results) == 3, [window.compare.table.item(r, 2).text() for r in range(3)]
    cols = window.compare.COLUMNS
    n = window.vlm_trace.layout.n_image_tokens
    kept = {m: window.compare.results[m].meta["image_tokens_kept"] for m in ids}
    assert kept["vlm.fastv"] == round(0.5 * n) and kept["vlm.random"] == round(0.5 * n)
    assert kept["vlm.pool"] == n  # keep 0.5 -> 1x1 windows: pooling cannot halve a grid
    shown = {window.compare.table.item(r, cols.index("kept")).text() for r in range(3)}
    assert shown == {str(v) for v in kept.values()}
    assert window.compare.table.item(0, cols.index("same answer")).text() in ("yes", "no")
