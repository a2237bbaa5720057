"""Start the window: ``token-explorer [IMAGE | FOLDER | SESSION] [--model SPEC]``.

The window shows first; the model loads afterwards on the device thread (torch is imported
there, never before the window is up). Before Qt starts, :func:`~.platform_check.window_problem`
checks that the window can open at all (a display, the xcb libraries) and names the fix.

``EXPLORER_STARTUP_REPORT=FILE`` (benchmarks/startup.py) appends one JSON line per milestone,
``{"event": ..., "t": time.time()}`` for ``window_shown``, ``image_shown``, ``model_loaded`` and
``first_overlay``, and quits once
the first overlay is drawn.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import traceback
from typing import Sequence

__all__ = ["main", "create_window"]


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="token-explorer", description="Open the Token Explorer window.")
    p.add_argument("image", nargs="?", help="image, folder or saved session (.tesession) to open")
    p.add_argument("--model", default=None, help="model spec (default: the last one used, else the demo model)")
    p.add_argument("--method", default=None, help="method id to select")
    p.add_argument("--text", action="append", default=[], help="text prompt (repeatable)")
    return p.parse_args(list(argv))


def create_window(model_spec: str | None = None, engine=None, settings=None):
    """Build the main window (no model loaded yet)."""
    import pyqtgraph as pg
    from PySide6.QtCore import QSettings

    from explorer.backends.specs import default_model

    from .main_window import MainWindow

    pg.setConfigOptions(imageAxisOrder="row-major", antialias=False)
    settings = settings if settings is not None else QSettings()
    spec = model_spec or os.environ.get("EXPLORER_MODEL") or settings.value("model") or default_model()
    return MainWindow(engine=engine, model_spec=str(spec), settings=settings)


def _install_excepthooks(window) -> None:
    """Uncaught errors (a plugin raising in a slot, a worker thread) are logged and shown, not fatal."""
    def show(exc_type, exc, tb) -> None:
        logging.getLogger("explorer").error("uncaught: %s", "".join(traceback.format_exception(exc_type, exc, tb)))
        try:
            window.show_error(f"Unexpected error: {exc_type.__name__}: {exc}")
        except RuntimeError:
            pass

    sys.excepthook = show
    threading.excepthook = lambda args: show(args.exc_type, args.exc_value, args.exc_traceback)


def _startup_reporter(window, app):
    """Milestones for benchmarks/startup.py (see the module docstring); ``None`` when not asked."""
    path = os.environ.get("EXPLORER_STARTUP_REPORT")
    if not path:
        return None
    import json
    import time

    def report(event: str) -> None:
        with open(path, "a") as fh:
            fh.write(json.dumps({"event": event, "t": time.time()}) + "\n")

    def first(_result) -> None:
        report("first_overlay")
        window.map_shown.disconnect(first)
        app.quit()

    window.map_shown.connect(first)
    window.model_loaded.connect(lambda _info: report("model_loaded"))
    window.model.events.image.connect(lambda _image: report("image_shown"))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    from .platform_check import window_problem

    problem = window_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    from PySide6.QtCore import QCoreApplication, QTimer
    from PySide6.QtWidgets import QApplication

    QCoreApplication.setOrganizationName("token-explorer")
    QCoreApplication.setApplicationName("token-explorer")
    app = QApplication.instance() or QApplication([sys.argv[0]])
    app.setStyle("Fusion")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .gui_gc import GuiThreadCollector

    collector = GuiThreadCollector(app)  # Qt objects are never destroyed by a collection in a worker thread
    window = create_window(args.model)
    _install_excepthooks(window)
    report = _startup_reporter(window, app)
    window.show()
    if report is not None:
        app.processEvents()
        report("window_shown")

    def start() -> None:
        window.load_model(window.state.model_spec)
        if args.method:
            window.set_method(args.method)
        if args.text:
            window.set_prompts(tuple(args.text))
        if args.image:
            if args.image.endswith(".tesession"):
                window.open_session(args.image)
            elif os.path.isdir(args.image):
                window.browser.set_folder(args.image)
            else:
                window.browser.set_folder(os.path.dirname(os.path.abspath(args.image)))
                window.open_image(args.image)

    QTimer.singleShot(0, start)
    try:
        return app.exec()
    finally:
        collector.stop()
