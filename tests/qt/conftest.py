"""The window under test: the tiny CLIP configured, settings in a temporary file, and no worker
thread left running once it is closed."""

import gc

import pytest
from PySide6.QtCore import QSettings


@pytest.fixture(autouse=True)
def _collect_qt_garbage_on_the_gui_thread(qtbot):
    """A test's widgets left in reference cycles are collected here, on the GUI thread: if Python's
    garbage collector ran later in a worker thread (a model loading), destroying them there would
    deadlock Qt."""
    yield
    qtbot.wait(1)
    gc.collect()


@pytest.fixture
def bare_window(qtbot, tmp_path, tiny_clip_spec):
    """A shown window whose model is configured but not loaded yet."""
    from explorer.plugin_host.engine import Engine
    from explorer.qt.app import create_window

    w = create_window(tiny_clip_spec.canonical(), engine=Engine(),
                      settings=QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(w)
    w.show()
    qtbot.waitExposed(w)
    yield w
    w.close()
    assert w.runner.device_pool.activeThreadCount() == 0 and w.runner.cpu_pool.activeThreadCount() == 0


@pytest.fixture
def window(qtbot, bare_window):
    """The window with its CLIP loaded."""
    with qtbot.waitSignal(bare_window.model_loaded, timeout=60000):
        bare_window.load_model(bare_window.state.model_spec)
    return bare_window


@pytest.fixture(scope="session")
def vlm_spec(tmp_path_factory):
    """A tiny LLaVA-OneVision (anyres tiles) saved with save_pretrained: its spec string."""
    from explorer.testing.tiny_vlm import make_tiny_vlm

    return make_tiny_vlm(tmp_path_factory.mktemp("vlm"), "llava_onevision").canonical()


@pytest.fixture(scope="session")
def sam_spec(tmp_path_factory):
    """A tiny SAM checkpoint loaded through segment-anything's registry: its spec string."""
    from explorer.testing.tiny import make_tiny_sam

    return make_tiny_sam(tmp_path_factory.mktemp("sam")).canonical()
