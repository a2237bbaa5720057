"""An LRU cache with a byte budget, and the trace cache keyed by image, model and capture.

Traces are keyed by image content hash + backend spec; inside one key, a lookup for a capture spec
is served by any cached trace whose capture *covers* it, so switching layer, head, token or
method on an image already traced never reruns the model.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

from .trace import CaptureSpec, Trace

__all__ = ["LRUCache", "TraceCache", "nbytes_of"]

V = TypeVar("V")


def nbytes_of(value: object) -> int:
    n = getattr(value, "nbytes", None)
    if isinstance(n, int):
        return n
    return 1024  # small objects: a nominal size so they still count


class LRUCache(Generic[V]):
    """Thread-safe least-recently-used cache that evicts to stay under ``max_bytes``.

    An item larger than the whole budget is not stored (``put`` returns False).
    """

    def __init__(self, max_bytes: int, sizeof: Callable[[V], int] = nbytes_of) -> None:
        if max_bytes <= 0:
            raise ValueError("cache budget must be positive")
        self.max_bytes = int(max_bytes)
        self._sizeof = sizeof
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: Hashable, default=None):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key][0]
            self.misses += 1
            return default

    def put(self, key: Hashable, value: V) -> bool:
        size = int(self._sizeof(value))
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            if size > self.max_bytes:
                return False
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes and self._items:
                _, (_, s) = self._items.popitem(last=False)
                self._bytes -= s
            return True

    def pop(self, key: Hashable, default=None):
        with self._lock:
            if key in self._items:
                value, size = self._items.pop(key)
                self._bytes -= size
                return value
            return default

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._items.keys())

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


class TraceCache:
    """Traces by ``(image_sha256, backend_spec, capture_key)``, least recently used first out.

    Two budgets: ``max_bytes`` for what traces hold in host memory and ``device_bytes`` for what
    they hold in device memory (a GPU trace keeps its arrays on the device; see
    :attr:`Trace.device_nbytes`). A put evicts the least recently used traces until both hold; a
    trace larger than a budget by itself is not kept. ``device_bytes=None``: no device budget.

    :meth:`find` returns a cached trace of the same image and backend whose capture covers the
    requested spec, most recent first.
    """

    def __init__(self, max_bytes: int = 2 << 30, device_bytes: int | None = None) -> None:
        if max_bytes <= 0:
            raise ValueError("cache budget must be positive")
        self.max_bytes = int(max_bytes)
        self.device_bytes = None if device_bytes is None else int(device_bytes)
        self._items: OrderedDict[tuple, tuple[Trace, int, int]] = OrderedDict()
        self._host = 0
        self._device = 0
        self._lock = threading.RLock()

    @staticmethod
    def key(image_sha256: str, backend_spec: str, capture: CaptureSpec) -> tuple[str, str, str]:
        return (image_sha256, backend_spec, capture.key())

    @staticmethod
    def _sizes(trace: Trace) -> tuple[int, int]:
        device = int(trace.device_nbytes)
        return int(trace.nbytes) - device + 4096, device

    def set_device_budget(self, device_bytes: int | None) -> None:
        """Change the device budget (a GPU model loaded); evicts to fit it."""
        with self._lock:
            self.device_bytes = None if device_bytes is None else int(device_bytes)
            self._evict()

    def _evict(self) -> None:
        while self._items and (self._host > self.max_bytes or
                               (self.device_bytes is not None and self._device > self.device_bytes)):
            _, (_, h, d) = self._items.popitem(last=False)
            self._host -= h
            self._device -= d

    def put(self, trace: Trace) -> bool:
        key = self.key(trace.image_sha256, trace.model.spec, trace.capture)
        host, device = self._sizes(trace)
        with self._lock:
            if key in self._items:
                _, h, d = self._items.pop(key)
                self._host -= h
                self._device -= d
            if host > self.max_bytes or (self.device_bytes is not None and device > self.device_bytes):
                return False
            self._items[key] = (trace, host, device)
            self._host += host
            self._device += device
            self._evict()
            return True

    def _get(self, key):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def find(self, image_sha256: str, backend_spec: str, capture: CaptureSpec) -> Trace | None:
        exact = self._get(self.key(image_sha256, backend_spec, capture))
        if exact is not None:
            return exact
        with self._lock:
            keys = list(self._items.keys())
        for key in reversed(keys):
            if key[0] == image_sha256 and key[1] == backend_spec:
                trace = self._get(key)
                if trace is not None and trace.capture.covers(capture):
                    return trace
        return None

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._host = self._device = 0

    @property
    def nbytes(self) -> int:
        """Host bytes held."""
        return self._host

    @property
    def device_nbytes(self) -> int:
        """Device bytes held (GPU traces)."""
        return self._device

    def __len__(self) -> int:
        return len(self._items)
