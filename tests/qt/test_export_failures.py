"""The window's exports: a bad path, a folder, a full disk become one line in the message bar
(never "Unexpected error"), and an earlier file at the path is kept whole."""

import errno
import os
import zipfile

import numpy as np
import pytest


def _no_space(*args, **kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def shown(qtbot, window, image_file, tmp_path):
    with qtbot.waitSignal(window.map_shown, timeout=60000):
        window.open_image(str(image_file(64, 64)))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "folder.png").mkdir()
    return window


def _bad(tmp_path, suffix):
    return [(tmp_path / "notes.txt" / f"o{suffix}", "is a file, not a folder"),
            (tmp_path / "folder.png", "it is a folder"),
            (tmp_path / ("x" * 300 + suffix), "too long")]


def _error_shown(w, needle):
    text = w.message.text()
    assert w.message.kind == "error" and needle in text and "Unexpected" not in text, text
    assert len(text.splitlines()) == 1
    return text


def test_overlay_export_failures_are_messages(shown, tmp_path, monkeypatch):
    w = shown
    good = tmp_path / "overlay.png"
    assert w.export(str(good)) is True and good.stat().st_size > 0
    before = good.read_bytes()
    for path, needle in _bad(tmp_path, ".png") + [(tmp_path / "o.jpg", "unknown extension .jpg")]:
        assert w.export(str(path)) is False
        _error_shown(w, "Overlay not exported: cannot write")
        _error_shown(w, needle)
    raw = tmp_path / "raw.npz"
    assert w.export(str(raw)) is True
    raw_before = raw.read_bytes()
    monkeypatch.setattr("explorer.core.atomic.os.replace", _no_space)
    for path in (good, raw):
        assert w.export(str(path)) is False
        _error_shown(w, f"cannot write '{path}': No space left on device")
    monkeypatch.undo()
    assert good.read_bytes() == before and raw.read_bytes() == raw_before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_region_exports_and_session_save_failures_are_messages(shown, tmp_path, monkeypatch):
    w = shown
    mask = np.zeros((64, 64), bool)
    mask[10:30, 10:40] = True
    w.model.edit_regions("add", mask, "box")
    coco, masks = tmp_path / "r.json", tmp_path / "r.zip"
    assert w.export_regions("coco", str(coco)) and w.export_regions("png", str(masks))
    before = coco.read_bytes(), masks.read_bytes()
    assert w.export_regions("coco", str(tmp_path / "notes.txt" / "r.json")) is False
    _error_shown(w, "Regions not exported: cannot write")
    assert w.export_regions("coco", str(tmp_path / "folder.png")) is False
    _error_shown(w, "it is a folder")
    assert w.export_regions("png", str(tmp_path / "notes.txt")) is False  # a folder of PNGs where a file is
    _error_shown(w, "is a file, not a folder")
    monkeypatch.setattr("explorer.core.atomic.os.fsync", _no_space)
    assert w.export_regions("coco", str(coco)) is False
    _error_shown(w, "No space left on device")
    assert w.export_regions("png", str(masks)) is False
    _error_shown(w, "No space left on device")
    assert w.export_regions("png", str(tmp_path / "pngs")) is False
    _error_shown(w, "No space left on device")
    assert w.save_session(str(tmp_path / "s.tesession")) is None
    _error_shown(w, "session not saved")
    monkeypatch.undo()
    assert (coco.read_bytes(), masks.read_bytes()) == before
    assert zipfile.ZipFile(masks).namelist() == ["001_box.png"]
    assert w.save_session(str(tmp_path / "folder.png")) is not None  # a session next to a folder of that name
    (tmp_path / "dir.tesession").mkdir()
    assert w.save_session(str(tmp_path / "dir.tesession")) is None
    _error_shown(w, "session not saved")
