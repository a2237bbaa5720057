"""The engine: image + model + method + parameters + target -> result, with caching.

Shared by the CLI (run synchronously) and the window (its runner drives the same jobs on worker
threads). Steps, each a job:

1. ``backend_job(spec)``: load the model once per spec (kept while the spec is in use).
2. ``trace_job(backend, image, capture)``: served from the :class:`TraceCache` when a cached trace
   of this image and model covers the capture; otherwise one vision-tower pass.
3. ``text_encoding(backend, prompts)``: cached per model and prompt tuple.
4. ``method_job(...)``: the plugin's own job, run through the plugin host.

When the model is small enough, traces capture every layer (attention and hidden states), so that
switching method, layer, head or query token on a traced image never runs the model again.
Traces of a GPU model stay in device memory; the cache then also counts device bytes against a
share of the device's memory and evicts the oldest traces to stay under it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable

from pydantic import BaseModel

from explorer.core.cache import LRUCache, TraceCache
from explorer.core.image_io import LoadedImage
from explorer.core.jobs import CancelToken, Job, Progress, sub_job
from explorer.core.results import Result
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec, ModelInfo, TextEncoding, Trace

from .host import MethodInfo, PluginHost

__all__ = ["Engine", "capture_bytes"]


def capture_bytes(model: ModelInfo, capture: CaptureSpec, n_tokens: int) -> int:
    """Estimated bytes of a trace: ``L_a * H * Nq * N + L_h * N * D`` values in the model's dtype
    on a device (2 bytes in fp16/bf16), float32 on the CPU."""
    nq = n_tokens if capture.attention_rows is None else len(capture.attention_rows)
    attn = len(capture.attention_layers) * model.n_heads * nq * n_tokens
    hidden = len(capture.hidden_layers) * n_tokens * model.width
    size = 2 if model.device != "cpu" and model.dtype in ("fp16", "bf16") else 4
    return size * (attn + hidden)


@dataclass
class RunOutcome:
    result: Result
    trace: Trace
    seconds_model: float


class Engine:
    """Loads backends, traces images, encodes text and runs methods, caching what it can."""

    device_trace_share = 0.25  # of a GPU's memory, for cached traces

    def __init__(self, host: PluginHost | None = None, trace_budget_bytes: int = 2 << 30,
                 capture_all_below_bytes: int = 600 << 20) -> None:
        self.host = host or PluginHost()
        self.traces = TraceCache(trace_budget_bytes)  # + a device budget once a GPU model is loaded
        self.texts: LRUCache[TextEncoding] = LRUCache(64 << 20)
        self.capture_all_below_bytes = capture_all_below_bytes
        self._backends: dict[str, Any] = {}
        self._lock = threading.RLock()

    # -- models ---------------------------------------------------------------------------------
    def backend_job(self, spec: Any) -> Job:
        """Job: the loaded backend for ``spec`` (a spec object or string). One model per kind
        (CLIP, SAM, VLM) is kept in memory; loading another of the same kind replaces it."""
        from explorer.backends.registry import load_backend, parse_model_spec

        spec = parse_model_spec(spec) if isinstance(spec, str) else spec
        key = spec.canonical()
        with self._lock:
            held = self._backends.get(spec.kind)
            if held is not None and held[0] == key:
                return held[1]
        yield Progress(None, f"loading {spec.display_name}")
        backend = load_backend(spec)
        with self._lock:
            self._backends[spec.kind] = (key, backend)
        self._budget_device(backend)
        yield Progress(1.0, f"loaded {spec.display_name}")
        return backend

    def adopt(self, backend: Any) -> None:
        """Hold an already loaded backend (tests, benchmarks) as if :meth:`backend_job` had loaded it."""
        with self._lock:
            self._backends[backend.info.kind] = (backend.info.spec, backend)
        self._budget_device(backend)

    def _budget_device(self, backend: Any) -> None:
        """A model on a GPU keeps its traces in device memory: the trace cache gets a device budget
        of :attr:`device_trace_share` of the device's memory (freed by evicting old traces)."""
        total = getattr(backend, "device_memory_total", lambda: None)()
        if total:
            self.traces.set_device_budget(int(total * self.device_trace_share))

    def backend_for(self, spec: Any):
        """The loaded backend of ``spec`` (a spec object or string), or ``None`` if it is not loaded."""
        from explorer.backends.registry import parse_model_spec

        try:
            spec = parse_model_spec(spec) if isinstance(spec, str) else spec
        except ValueError:
            return None
        return self.loaded_backend(spec.canonical())

    def loaded_backend(self, spec_key: str):
        for key, backend in self._backends.values():
            if key == spec_key:
                return backend
        return None

    def unload(self) -> None:
        with self._lock:
            self._backends.clear()
        self.traces.clear()
        self.texts.clear()

    # -- capture policy -------------------------------------------------------------------------
    def capture_for(self, backend: Any, methods: Iterable[tuple[str, BaseModel]], target: Target,
                    n_tokens: int) -> CaptureSpec:
        """Union of the methods' captures; everything when it fits ``capture_all_below_bytes``."""
        spec = CaptureSpec()
        for method_id, params in methods:
            spec = spec.union(self.host.capture(method_id, params, backend.info, target))
        full = CaptureSpec.everything(backend.info.n_layers)
        if capture_bytes(backend.info, full, n_tokens) <= self.capture_all_below_bytes:
            return full
        return spec

    # -- traces and text ------------------------------------------------------------------------
    def cached_trace(self, backend: Any, image: LoadedImage, capture: CaptureSpec) -> Trace | None:
        return self.traces.find(image.sha256, backend.info.spec, capture)

    def trace_job(self, backend: Any, image: LoadedImage, capture: CaptureSpec,
                  cancel: CancelToken | None = None) -> Job:
        """Job: a trace of ``image`` covering ``capture`` (cached, or one model pass)."""
        cached = self.cached_trace(backend, image, capture)
        if cached is not None:
            return cached
        trace = yield from backend.trace(image, capture, cancel)
        self.traces.put(trace)
        return trace

    def text_encoding(self, backend: Any, prompts: tuple[str, ...]) -> TextEncoding | None:
        if not prompts:
            return None
        key = (backend.info.spec, prompts)
        enc = self.texts.get(key)
        if enc is None:
            enc = backend.encode_text(prompts)
            self.texts.put(key, enc)
        return enc

    # -- methods --------------------------------------------------------------------------------
    def method_job(self, method_id: str, trace: Trace, params: BaseModel, target: Target,
                   cancel: CancelToken | None = None, backend: Any = None) -> Job:
        return self.host.run(method_id, trace, params, target=target, cancel=cancel, backend=backend)

    def needs_model(self, method_id: str) -> bool:
        """True when the method calls the model itself (run it on the device thread)."""
        info: MethodInfo = self.host.method(method_id)
        return info.requires("model") or info.requires("gradients") or info.requires("passes")

    def prepare_job(self, spec: Any, image: LoadedImage, method_id: str | list[str], params: BaseModel | list[BaseModel],
                    target: Target, cancel: CancelToken | None = None) -> Job:
        """Job (model work only): backend, trace and text encoding ready for the method(s).

        ``method_id``/``params`` may be lists (the compare view): the trace then covers every
        method's capture. Returns ``(backend, trace)``; the trace carries the target's text.
        """
        ids = [method_id] if isinstance(method_id, str) else list(method_id)
        plist = [params] if isinstance(params, BaseModel) else list(params)
        backend = yield from sub_job(self.backend_job(spec), 0.0, 0.3)
        for mid in ids:
            info = self.host.method(mid)
            if backend.kind not in info.contribution.backends:
                raise ValueError(f"{info.title} does not run on {backend.kind} models")
        capture = self.capture_for(backend, list(zip(ids, plist)), target, self._n_tokens(backend, image))
        trace = yield from sub_job(self.trace_job(backend, image, capture, cancel), 0.3, 0.95)
        if any(self.needs_model(mid) for mid in ids) and hasattr(backend, "prepare"):
            backend.prepare(image)  # methods that run the model find its input by the trace's image hash
        if target.prompts:
            yield Progress(0.95, "encoding text")
            trace = trace.with_text(self.text_encoding(backend, target.prompts))
        return backend, trace

    def timed_method_job(self, method_id: str, trace: Trace, params: BaseModel, target: Target,
                         cancel: CancelToken | None = None, backend: Any = None) -> Job:
        """Like :meth:`method_job` but returns ``(result, seconds)``."""
        start = time.perf_counter()
        result = yield from self.method_job(method_id, trace, params, target, cancel, backend)
        return result, time.perf_counter() - start

    def _n_tokens(self, backend: Any, image: LoadedImage) -> int:
        return backend.n_tokens(image.size)

    def run_job(self, spec: Any, image: LoadedImage, method_id: str, params: BaseModel | dict | None,
                target: Target, cancel: CancelToken | None = None) -> Job:
        """Job: the whole pipeline, synchronously (CLI, tests). Returns the :class:`Result`."""
        if not isinstance(params, BaseModel):
            params = self.host.make_params(method_id, params or {})
        if getattr(spec, "kind", None) == "vlm":  # a VLM method: its answer first, then the method
            backend, trace = yield from sub_job(self.vlm_trace_job(spec, image, method_id, params, target, cancel),
                                                0.0, 0.5)
            return (yield from sub_job(self.method_job(method_id, trace, params, target, cancel, backend), 0.5, 1.0))
        backend, trace = yield from sub_job(self.prepare_job(spec, image, method_id, params, target, cancel), 0.0, 0.8)
        result = yield from sub_job(self.method_job(method_id, trace, params, target, cancel, backend), 0.8, 1.0)
        return result

    def vlm_trace_job(self, spec: Any, image: LoadedImage, method_id: str, params: BaseModel, target: Target,
                      cancel: CancelToken | None = None) -> Job:
        """Job: the VLM, and its answer to ``target.prompts[0]`` about ``image`` as a trace (with
        the attention rows a grounding method reads; none for a pruning method, which generates
        again with its decision). Returns ``(backend, trace)``."""
        from .vlm import generate_trace_job

        info = self.host.method(method_id)
        backend = yield from sub_job(self.backend_job(spec), 0.0, 0.4)
        if backend.kind not in info.contribution.backends:
            raise ValueError(f"{info.title} does not run on {backend.kind} models")
        if not target.prompts:
            raise ValueError(f"{info.title} needs a prompt for the VLM (the question about the image)")
        pruning = info.contribution.family in ("pruning", "merging")
        tokens = int(getattr(params, "max_new_tokens", 32))
        trace = yield from sub_job(generate_trace_job(backend, image, target.prompts[0], max_new_tokens=tokens,
                                                      cancel=cancel, attention=not pruning), 0.4, 1.0)
        return backend, trace
