"""Capture specs, the byte-budget LRU cache, the trace cache, jobs and cancellation."""

import threading

import numpy as np
import pytest

from explorer.core.cache import LRUCache, TraceCache
from explorer.core.jobs import Cancelled, CancelToken, Progress, run_sync, sub_job
from explorer.core.layout import Geometry, TokenLayout
from explorer.core.render import colorize, lookup_table, overlay
from explorer.core.trace import CaptureSpec, ModelInfo, Trace


class Blob:
    def __init__(self, n):
        self.nbytes = n


def test_capture_union_and_covers():
    a = CaptureSpec(attention_layers={0, 1}, attention_rows=(0,))
    b = CaptureSpec(attention_layers={2}, attention_rows=(5,), hidden_layers={3})
    u = a.union(b)
    assert u.attention_layers == {0, 1, 2} and u.attention_rows == (0, 5) and u.hidden_layers == {3}
    assert u.covers(a) and u.covers(b) and not a.covers(b)
    full = CaptureSpec(attention_layers={0, 1, 2})
    assert full.covers(a) and not a.covers(full)
    assert a.union(full).attention_rows is None
    assert CaptureSpec(hidden_layers={1}).union(a).attention_rows == (0,)
    assert CaptureSpec.everything(3).covers(u)
    with pytest.raises(ValueError):
        CaptureSpec(attention_layers={-1})


def test_lru_evicts_by_bytes_in_recency_order():
    c = LRUCache(100)
    c.put("a", Blob(40))
    c.put("b", Blob(40))
    assert c.get("a") is not None  # a is now most recent
    c.put("c", Blob(40))  # evicts b
    assert "b" not in c and "a" in c and "c" in c
    assert c.nbytes == 80
    assert not c.put("huge", Blob(101)) and "huge" not in c
    c.put("a", Blob(10))
    assert c.nbytes == 50


def _trace(sha, capture):
    layout = TokenLayout.single_grid(Geometry.identity((8, 8)), 2, 2)
    info = ModelInfo(kind="clip", spec="clip:x", name="x", n_layers=2, n_heads=1, width=4)
    attn = {l: np.zeros((1, 5, 5), np.float32) for l in capture.attention_layers}
    return Trace(layout=layout, model=info, image_sha256=sha, capture=capture, attentions=attn)


def test_trace_cache_serves_covering_captures():
    tc = TraceCache(1 << 20)
    full = CaptureSpec.everything(2)
    tc.put(_trace("img1", full))
    assert tc.find("img1", "clip:x", CaptureSpec(attention_layers={1})) is not None
    assert tc.find("img2", "clip:x", CaptureSpec(attention_layers={1})) is None
    assert tc.find("img1", "clip:other", CaptureSpec()) is None
    small = CaptureSpec(attention_layers={0}, attention_rows=(0,))
    tc2 = TraceCache(1 << 20)
    tc2.put(_trace("img1", small))
    assert tc2.find("img1", "clip:x", CaptureSpec(attention_layers={0})) is None  # needs all rows


def test_run_sync_progress_and_result():
    def job():
        for i in range(3):
            yield Progress(i / 3, f"step {i}")
        return 42

    seen = []
    assert run_sync(job(), on_progress=seen.append) == 42
    assert [p.message for p in seen] == ["step 0", "step 1", "step 2"]


def test_cancellation_between_steps_closes_the_job():
    closed = threading.Event()

    def job():
        try:
            for i in range(100):
                yield Progress(i / 100)
        finally:
            closed.set()
        return "never"

    tok = CancelToken()
    seen = []

    def on_progress(p):
        seen.append(p)
        if len(seen) == 3:
            tok.cancel()

    with pytest.raises(Cancelled):
        run_sync(job(), cancel=tok, on_progress=on_progress)
    assert closed.is_set() and len(seen) == 3


def test_sub_job_rescales_progress():
    def inner():
        yield Progress(0.5, "half")
        return "x"

    def outer():
        r = yield from sub_job(inner(), 0.2, 0.4)
        return r

    seen = []
    assert run_sync(outer(), on_progress=seen.append) == "x"
    assert seen[0].fraction == pytest.approx(0.3)


def test_colorize_and_overlay():
    lut = lookup_table("viridis")
    assert lut.shape == (256, 4) and lut.dtype == np.uint8
    v = np.array([[0.0, 1.0], [np.nan, 0.5]])
    rgba = colorize(v, "viridis", 0.0, 1.0)
    assert rgba[1, 0, 3] == 0 and rgba[0, 0, 3] == 255
    np.testing.assert_array_equal(rgba[0, 0], lut[0])
    np.testing.assert_array_equal(rgba[0, 1], lut[255])
    img = np.full((2, 2, 3), 100, np.uint8)
    out = overlay(img, v, "viridis", 0.0, 1.0, opacity=1.0)
    np.testing.assert_array_equal(out[1, 0], [100, 100, 100])  # NaN leaves the image untouched
    np.testing.assert_array_equal(out[0, 1], lut[255, :3])
    with pytest.raises(ValueError):
        lookup_table("no-such-map")


def test_trace_cache_counts_device_memory_against_its_own_budget():
    """A GPU trace keeps its arrays on the device: the cache counts those bytes against the device
    budget and evicts the oldest traces to stay under it (torch's meta device stands in for a GPU)."""
    import dataclasses

    import torch

    base = _trace("x", CaptureSpec())

    def device_trace(sha, mib):
        attn = {0: torch.empty(mib << 18, dtype=torch.float32, device="meta")}  # mib MiB on "the device"
        return dataclasses.replace(base, image_sha256=sha, attentions=attn)

    cache = TraceCache(max_bytes=1 << 30, device_bytes=None)
    a, b, c = device_trace("a", 3), device_trace("b", 3), device_trace("c", 3)
    assert a.device_nbytes == 3 << 20 and a.device == "meta" and a.on_device
    for t in (a, b, c):
        assert cache.put(t)
    assert len(cache) == 3 and cache.device_nbytes == 9 << 20
    cache.set_device_budget(7 << 20)  # a GPU model loaded: the oldest trace goes
    assert len(cache) == 2 and cache.device_nbytes == 6 << 20
    assert cache.find("a", "clip:x", CaptureSpec()) is None
    assert cache.find("b", "clip:x", CaptureSpec()) is b
    assert cache.put(device_trace("d", 3))  # b was used last: c goes
    assert cache.find("c", "clip:x", CaptureSpec()) is None
    assert not cache.put(device_trace("huge", 8))  # larger than the device budget by itself
    assert cache.nbytes < 1 << 20  # host bytes: none of the device arrays
