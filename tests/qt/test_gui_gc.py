"""Cyclic garbage is collected on the GUI thread only, so that Qt objects in cycles are never
destroyed by a collection that happens to run in a worker thread."""

import gc
import threading

from PySide6.QtCore import QObject


def test_collection_happens_on_the_gui_thread(qtbot):
    from explorer.qt.gui_gc import GuiThreadCollector

    collector = GuiThreadCollector(interval_ms=20, thresholds=(0, 0, 0))  # every tick, whatever else set them
    try:
        assert not gc.isenabled()
        destroyed_in = []

        class Node(QObject):
            pass

        def make_cycle():
            a = Node()
            a.me = a  # a Python-level cycle through the wrapper
            a.destroyed.connect(lambda: destroyed_in.append(threading.current_thread().name))

        make_cycle()
        # a worker allocates plenty: with automatic collection on, it would collect the cycle there
        worker = threading.Thread(target=lambda: [[object() for _ in range(50)] for _ in range(2000)], name="worker")
        worker.start()
        worker.join()
        assert destroyed_in == []
        qtbot.waitUntil(lambda: bool(destroyed_in), timeout=5000)
        assert destroyed_in == [threading.main_thread().name]
    finally:
        collector.stop()
    assert gc.isenabled()
