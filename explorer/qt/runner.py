"""The job runner: core jobs on worker threads, results applied on the GUI thread.

* One *device* thread (a ``QThreadPool`` with one thread): models run one at a time.
* A *CPU* pool for methods that only read a trace.
* A new job with the same key cancels the previous one (its result is dropped even if it
  finishes); every job can be cancelled through its :class:`CancelToken`.
* Workers never touch widgets: they emit signals, which Qt delivers on the GUI thread.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal, Slot

from explorer.core.jobs import Cancelled, CancelToken, Progress

log = logging.getLogger(__name__)

__all__ = ["JobRunner", "JobHandle"]


class _Signals(QObject):
    progress = Signal(object, object)  # handle, Progress
    finished = Signal(object, object)  # handle, result
    failed = Signal(object, object)  # handle, exception
    cancelled = Signal(object)  # handle


@dataclass(eq=False)
class JobHandle:
    key: str
    description: str
    cancel: CancelToken = field(default_factory=CancelToken)
    on_done: Callable[[Any], None] | None = None
    on_error: Callable[[BaseException], None] | None = None
    on_progress: Callable[[Progress], None] | None = None
    on_cancelled: Callable[[], None] | None = None
    device: bool = True
    state: str = "queued"  # queued, running, done, failed, cancelled


class _Worker(QRunnable):
    def __init__(self, handle: JobHandle, factory: Callable[[CancelToken], Any], signals: _Signals) -> None:
        super().__init__()
        self.handle = handle
        self.factory = factory
        self.signals = signals
        self.setAutoDelete(True)

    def run(self) -> None:  # worker thread
        h = self.handle
        if h.cancel.cancelled:
            self.signals.cancelled.emit(h)
            return
        h.state = "running"
        try:
            job = self.factory(h.cancel)
            result = None
            if hasattr(job, "__next__"):
                try:
                    while True:
                        h.cancel.raise_if_cancelled()
                        step = next(job)
                        if isinstance(step, Progress):
                            self.signals.progress.emit(h, step)
                except StopIteration as stop:
                    result = stop.value
                finally:
                    job.close()
            else:
                result = job
            h.cancel.raise_if_cancelled()
        except Cancelled:
            self.signals.cancelled.emit(h)
            return
        except BaseException as exc:  # noqa: BLE001 - every failure is reported, the program stays up
            if h.cancel.cancelled:
                self.signals.cancelled.emit(h)
                return
            log.debug("job %s failed:\n%s", h.key, traceback.format_exc())
            self.signals.failed.emit(h, exc)
            return
        self.signals.finished.emit(h, result)


class JobRunner(QObject):
    """Runs jobs off the GUI thread; see module docstring."""

    busy_changed = Signal(bool)
    progress = Signal(str, object)  # description, Progress
    job_failed = Signal(object, object)  # handle, exception

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.device_pool = QThreadPool(self)
        self.device_pool.setMaxThreadCount(1)
        self.cpu_pool = QThreadPool(self)
        self.cpu_pool.setMaxThreadCount(max(1, min(4, QThreadPool.globalInstance().maxThreadCount())))
        self._signals = _Signals()
        self._signals.progress.connect(self._on_progress)
        self._signals.finished.connect(self._on_finished)
        self._signals.failed.connect(self._on_failed)
        self._signals.cancelled.connect(self._on_cancelled)
        self._current: dict[str, JobHandle] = {}
        self._active: set[JobHandle] = set()

    def submit(self, key: str, factory: Callable[[CancelToken], Any], *, device: bool = True,
               description: str = "", on_done=None, on_error=None, on_progress=None,
               on_cancelled=None) -> JobHandle:
        """Queue ``factory(cancel)`` (a job generator or a plain call). Cancels the previous job of ``key``."""
        old = self._current.get(key)
        if old is not None and old.state in ("queued", "running"):
            old.cancel.cancel("superseded")
        h = JobHandle(key=key, description=description or key, on_done=on_done, on_error=on_error,
                      on_progress=on_progress, on_cancelled=on_cancelled, device=device)
        self._current[key] = h
        self._active.add(h)
        self.busy_changed.emit(True)
        (self.device_pool if device else self.cpu_pool).start(_Worker(h, factory, self._signals))
        return h

    def cancel(self, key: str | None = None) -> None:
        """Cancel the job of ``key``, or every job."""
        for h in list(self._active):
            if key is None or h.key == key:
                h.cancel.cancel("cancelled by the user")

    @property
    def busy(self) -> bool:
        return bool(self._active)

    def is_current(self, h: JobHandle) -> bool:
        return self._current.get(h.key) is h

    def wait(self, msecs: int = 30000) -> bool:
        """Block until every job ended (tests and shutdown)."""
        a = self.device_pool.waitForDone(msecs)
        b = self.cpu_pool.waitForDone(msecs)
        return a and b

    def shutdown(self, msecs: int = 10000) -> None:
        self.cancel()
        self.device_pool.clear()
        self.cpu_pool.clear()
        self.wait(msecs)

    # -- GUI-thread side ------------------------------------------------------------------------
    def _retire(self, h: JobHandle) -> None:
        self._active.discard(h)
        if not self._active:
            self.busy_changed.emit(False)

    @Slot(object, object)
    def _on_progress(self, h: JobHandle, p: Progress) -> None:
        if h.cancel.cancelled or not self.is_current(h):
            return
        self.progress.emit(h.description, p)
        if h.on_progress:
            h.on_progress(p)

    @Slot(object, object)
    def _on_finished(self, h: JobHandle, result: Any) -> None:
        self._retire(h)
        if h.cancel.cancelled or not self.is_current(h):
            h.state = "cancelled"
            if h.on_cancelled:
                h.on_cancelled()
            return
        h.state = "done"
        if h.on_done:
            h.on_done(result)

    @Slot(object, object)
    def _on_failed(self, h: JobHandle, exc: BaseException) -> None:
        self._retire(h)
        h.state = "failed"
        if not self.is_current(h):
            return
        if h.on_error:
            h.on_error(exc)
        self.job_failed.emit(h, exc)

    @Slot(object)
    def _on_cancelled(self, h: JobHandle) -> None:
        self._retire(h)
        h.state = "cancelled"
        if h.on_cancelled:
            h.on_cancelled()
