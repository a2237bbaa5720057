"""Python's cyclic garbage collection on the GUI thread only.

The collector runs in whichever thread happens to allocate when a generation's threshold is
crossed. If that is a worker thread (a model loading, a trace) and the garbage holds Qt objects
(a closed dialog, the cells of an earlier comparison, in reference cycles through their signal
connections), their C++ destructors run in that thread: Qt objects must be destroyed in the thread
that owns them, and PySide deadlocks there. :class:`GuiThreadCollector` switches automatic
collection off and collects on a GUI-thread timer instead, by the same generation thresholds
(the approach of calibre's ``GarbageCollector``).
"""

from __future__ import annotations

import gc

from PySide6.QtCore import QObject, QTimer

__all__ = ["GuiThreadCollector"]


class GuiThreadCollector(QObject):
    """Collects garbage every ``interval_ms`` on the thread it lives in (the GUI thread)."""

    def __init__(self, parent: QObject | None = None, interval_ms: int = 500,
                 thresholds: tuple[int, int, int] | None = None) -> None:
        super().__init__(parent)
        self.thresholds = tuple(thresholds) if thresholds is not None else gc.get_threshold()
        gc.disable()
        self.timer = QTimer(self)
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self.check)
        self.timer.start()

    def check(self) -> int | None:
        """Collect the oldest generation whose count crossed its threshold; returns it (or None)."""
        counts = gc.get_count()
        generation = None
        for g in (2, 1, 0):
            if counts[g] > self.thresholds[g]:
                generation = g
                break
        if generation is not None:
            gc.collect(generation)
        return generation

    def stop(self) -> None:
        """Automatic collection back on (the window closed)."""
        self.timer.stop()
        gc.enable()
