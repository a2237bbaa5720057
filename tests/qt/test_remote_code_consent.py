"""A VLM that needs its repository's own code: the window asks before any of it runs (the backend
refuses it by type, whatever transformers' message says), and answering No runs nothing."""

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QMessageBox


def _record_no(monkeypatch):
    asked = []

    def question(parent, title, text, *args, **kwargs):
        asked.append((title, text))
        return QMessageBox.StandardButton.No

    monkeypatch.setattr(QMessageBox, "question", question)
    return asked


def test_loading_a_model_with_its_own_code_asks_first(qtbot, bare_window, tmp_path, monkeypatch):
    from explorer.testing.tiny_vlm import make_remote_code_vlm

    marker = tmp_path / "imported.txt"
    folder = make_remote_code_vlm(tmp_path / "remote", marker).model
    asked = _record_no(monkeypatch)
    panel = bare_window.vlm_panel
    panel.model_edit.setText(f"vlm:{folder}")
    panel.load_requested.emit(panel.model_edit.text())
    qtbot.waitUntil(lambda: len(asked) == 1, timeout=60000)
    title, text = asked[0]
    assert title == "Run the model's own code?"
    assert f"vlm:{folder}" in text and "configuration_x.py" in text and "trust" in text
    qtbot.waitUntil(lambda: bare_window.runner.device_pool.activeThreadCount() == 0, timeout=10000)
    qtbot.wait(50)
    assert len(asked) == 1 and panel.model_edit.text() == f"vlm:{folder}"  # No: not retried with the code allowed
    assert bare_window.vlm_backend is None
    assert not marker.exists()


def test_asking_a_model_with_its_own_code_asks_first(qtbot, bare_window, tmp_path, monkeypatch, image_file):
    from explorer.testing.tiny_vlm import make_remote_code_vlm

    with qtbot.waitSignal(bare_window.model_loaded, timeout=60000):
        bare_window.load_model(bare_window.state.model_spec)
    with qtbot.waitSignal(bare_window.map_shown, timeout=60000):
        bare_window.open_image(str(image_file(48, 64)))
    marker = tmp_path / "imported.txt"
    folder = make_remote_code_vlm(tmp_path / "remote", marker).model
    asked = _record_no(monkeypatch)
    panel = bare_window.vlm_panel
    panel.model_edit.setText(f"vlm:{folder}")
    panel.prompt_edit.setText("describe the image")
    qtbot.mouseClick(panel.generate_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: len(asked) == 1, timeout=60000)
    assert f"vlm:{folder}" in asked[0][1]
    qtbot.waitUntil(lambda: bare_window.runner.device_pool.activeThreadCount() == 0, timeout=10000)
    assert panel.model_edit.text() == f"vlm:{folder}" and bare_window.vlm_backend is None
    assert not marker.exists()
