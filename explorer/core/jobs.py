"""Qt-free jobs: generators that yield progress and check a cancel token between steps.

A *job* is a generator that yields :class:`Progress` values and returns its result
(``Generator[Progress, None, R]``). The CLI and tests run jobs synchronously with
:func:`run_sync`; the Qt runner drives the same generators on worker threads.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Generator, TypeVar

__all__ = ["Cancelled", "CancelToken", "Progress", "Job", "run_sync", "as_job", "sub_job"]

R = TypeVar("R")


class Cancelled(Exception):
    """Raised inside a job when its cancel token is set."""


class CancelToken:
    """A thread-safe flag checked by jobs between steps (and by backends between blocks)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def cancel(self, reason: str = "cancelled") -> None:
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled(self.reason or "cancelled")


@dataclass(frozen=True)
class Progress:
    """Progress of a job: ``fraction`` in [0, 1] or ``None`` when unknown, and a short message."""

    fraction: float | None = None
    message: str = ""


Job = Generator[Progress, None, R]


def run_sync(
    job: Job,
    cancel: CancelToken | None = None,
    on_progress: Callable[[Progress], None] | None = None,
):
    """Run a job to completion in the calling thread and return its result.

    The cancel token is checked after every yielded step; :class:`Cancelled` propagates.
    """
    try:
        while True:
            if cancel is not None and cancel.cancelled:
                job.close()
                raise Cancelled(cancel.reason or "cancelled")
            step = next(job)
            if on_progress is not None and isinstance(step, Progress):
                on_progress(step)
    except StopIteration as stop:
        return stop.value


def as_job(fn: Callable[[], R], message: str = "") -> Job:
    """Wrap a plain call as a one-step job."""
    yield Progress(0.0, message)
    return fn()


def sub_job(job: Job, start: float, end: float, prefix: str = "") -> Job:
    """Run ``job`` inside another, rescaling its progress into ``[start, end]``.

    Use as ``result = yield from sub_job(inner, 0.0, 0.5)``.
    """
    try:
        step = next(job)
        while True:
            if isinstance(step, Progress):
                frac = None if step.fraction is None else start + (end - start) * step.fraction
                msg = f"{prefix}{step.message}" if prefix else step.message
                yield Progress(frac, msg)
            step = next(job)
    except StopIteration as stop:
        return stop.value


class Stopwatch:
    """Tiny helper for measured-time metrics (seconds, monotonic)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
