"""The main window with pytest-qt (offscreen): open, run, overlay, click, cancel, bad input."""

import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from PIL import Image
from PySide6.QtCore import QPointF, Qt

from explorer.core.results import Heatmap


def _open(qtbot, w, path):
    with qtbot.waitSignal(w.map_shown, timeout=60000) as blocker:
        w.open_image(str(path))
    return blocker.args[0]


def test_open_image_runs_method_and_draws_overlay(qtbot, window, image_file):
    window.set_method("attention.rollout")
    result = _open(qtbot, window, image_file(100, 180))
    assert isinstance(result, Heatmap)
    assert window.canvas.image_size == (100, 180)
    assert len(window.canvas.overlay_items) == 1
    item = window.canvas.overlay_items[0]
    seg = result.layout.segments[0]
    rect = item.mapRectToParent(item.boundingRect())
    box = seg.image_rect
    assert (rect.x(), rect.y(), rect.width(), rect.height()) == pytest.approx((box.x0, box.y0, box.width, box.height))
    np.testing.assert_allclose(item.image, result.grids()[0])
    assert window.canvas.colorbar.isVisible()
    assert window.canvas.input_outline.isVisible()  # the model saw a centre crop
    assert "tiny" in window.model_label.text()


def test_switching_layer_reuses_the_trace(qtbot, window, image_file):
    window.set_method("attention.raw")
    _open(qtbot, window, image_file(64, 64))
    count = window.backend.forward_count
    for layer in (0, 1, 2):
        with qtbot.waitSignal(window.map_shown, timeout=30000) as blocker:
            window.set_params(layer=layer, head=1)
        assert blocker.args[0].meta["layer"] == layer
    with qtbot.waitSignal(window.map_shown, timeout=30000):
        window.set_method("attention.rollout")
    assert window.backend.forward_count == count


def test_click_makes_the_patch_the_query(qtbot, window, image_file):
    window.set_method("attention.raw")
    _open(qtbot, window, image_file(64, 64))
    canvas = window.canvas
    # pixel (44.5, 12.5) -> patch row 1, col 5 -> sequence index 1 + 8 + 5
    scene = canvas.view.mapViewToScene(QPointF(44.5, 12.5))
    pos = canvas.mapFromScene(scene)
    with qtbot.waitSignal(window.map_shown, timeout=30000) as blocker:
        qtbot.mouseClick(canvas.viewport(), Qt.MouseButton.LeftButton, pos=pos)
    assert window.state.query == 14
    assert blocker.args[0].meta["query"] == 14
    assert canvas.marker.isVisible()
    np.testing.assert_allclose(blocker.args[0].token_values, window.trace.attentions[2][:, 14, 1:].mean(0), atol=1e-6)


def test_similarity_with_prompts_and_tokens(qtbot, window, image_file):
    window.set_method("similarity.maskclip")
    window.canvas.set_image(np.zeros((64, 64, 3), np.uint8))
    with qtbot.waitSignal(window.map_shown, timeout=30000) as blocker:
        window.open_image(str(image_file(64, 64)))
        window.set_prompts(("a red circle", "a blue square"))
    assert "a red circle" in blocker.args[0].label
    assert "circle" in window.panel.tokens_label.text()


def test_cancel_leaves_the_window_usable(qtbot, window, image_file):
    window.set_method("attention.rollout")
    started = threading.Event()

    def slow(module, args):
        started.set()
        time.sleep(0.5)

    hook = window.backend.blocks[0].register_forward_pre_hook(slow)
    shown = []
    window.map_shown.connect(shown.append)
    try:
        window.open_image(str(image_file(70, 70)))
        qtbot.waitUntil(started.is_set, timeout=30000)
        assert window.cancel_button.isVisible()
        qtbot.mouseClick(window.cancel_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: not window.runner.busy, timeout=30000)
    finally:
        hook.remove()
    assert not shown
    assert not window.cancel_button.isVisible()
    with qtbot.waitSignal(window.map_shown, timeout=30000):
        window.set_params(head_fusion="max")
    assert window.result is not None


def _bad_file(tmp_path, kind):
    import struct
    import zlib

    path = tmp_path / f"bad-{kind}.png"
    if kind == "text":
        path.write_bytes(b"not an image at all")
    elif kind == "broken-png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    elif kind == "truncated-jpeg":
        path = tmp_path / "cut.jpg"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 120, 3), dtype=np.uint8)).save(path, quality=90)
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "1x1":
        Image.new("RGB", (1, 1)).save(path)
    else:  # a 30000x30000 header
        def chunk(tag, data):
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8))
                         + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("kind", ["text", "broken-png", "truncated-jpeg", "1x1", "30000x30000"])
def test_bad_image_shows_a_message(qtbot, window, tmp_path, kind, image_file):
    window.set_method("attention.rollout")
    _open(qtbot, window, image_file(64, 64))
    bad = _bad_file(tmp_path, kind)
    window.open_image(str(bad))
    qtbot.waitUntil(lambda: "cannot read" in window.message.text(), timeout=10000)
    assert bad.name in window.message.text()
    assert window.canvas.image_size == (64, 64)  # the previous image is still shown
    assert window.isVisible()


def test_model_load_error_is_shown(qtbot, window):
    window.load_model("ViT-Nope-1")
    qtbot.waitUntil(lambda: "unknown open_clip architecture" in window.message.text(), timeout=30000)


def test_form_is_generated_and_shortcuts_move_the_layer(qtbot, window, image_file):
    window.set_method("attention.raw")
    _open(qtbot, window, image_file(64, 64))
    form = window.panel.form
    layer = form.widgets["layer"]
    assert (layer.minimum(), layer.maximum()) == (-3, 2)
    head = form.widgets["head"]
    assert (head.minimum(), head.maximum()) == (-1, 3) and head.specialValueText() == "mean"
    with qtbot.waitSignal(window.map_shown, timeout=30000) as blocker:
        layer.setValue(0)
    assert blocker.args[0].meta["layer"] == 0
    with qtbot.waitSignal(window.map_shown, timeout=30000) as blocker:
        qtbot.keyClick(window, Qt.Key.Key_BracketRight)
    assert blocker.args[0].meta["layer"] == 1


def test_folder_browser_and_export(qtbot, window, tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    for i, (h, w) in enumerate([(64, 64), (50, 90)]):
        Image.fromarray(np.full((h, w, 3), 60 * (i + 1), np.uint8)).save(folder / f"p{i}.png")
    (folder / "notes.txt").write_text("x")
    window.set_method("attention.rollout")
    window.browser.set_folder(folder)
    assert window.browser.list.count() == 2
    qtbot.waitUntil(lambda: not window.browser.list.item(1).icon().isNull(), timeout=10000)
    with qtbot.waitSignal(window.map_shown, timeout=30000):
        window.browser._activate(window.browser.list.item(1))
    assert window.canvas.image_size == (50, 90)
    out = tmp_path / "export.png"
    window.export(str(out))
    with Image.open(out) as im:
        assert im.size == (90, 50)


def test_torch_is_imported_after_the_window_shows(tmp_path):
    code = textwrap.dedent(
        f"""
        import os, sys
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
        from PySide6.QtCore import QSettings
        from PySide6.QtWidgets import QApplication
        app = QApplication([])
        from explorer.qt.app import create_window
        w = create_window("demo", settings=QSettings(r"{tmp_path / 's.ini'}", QSettings.Format.IniFormat))
        w.show()
        app.processEvents()
        assert "torch" not in sys.modules, "torch imported before the window showed"
        assert w.isVisible()
        w.close()
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
