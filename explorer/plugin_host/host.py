"""Plugin discovery and lazy loading.

Discovery reads the ``explorer.plugins`` entry points and each one's manifest *without importing
the plugin* (the manifest file is located through the import system's spec, not by executing the
package). Plugin code is imported the first time one of its methods is used. A plugin whose
manifest or import is broken becomes an error entry with its message; it never stops the program.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel

from explorer.core.jobs import CancelToken, Cancelled, Job, Progress
from explorer.core.results import (Caption, CodebookUsage, Curve, Heatmap, LabelMap, Metrics, Reconstruction,
                                   RegionMask, TokenScores, TokenSelection)
from explorer.core.target import Target
from explorer.core.trace import Trace

from .api import Method, parse_params
from .manifest import ManifestError, MethodContribution, PluginManifest, read_manifest

log = logging.getLogger(__name__)

__all__ = ["PluginHost", "PluginRecord", "MethodInfo", "PluginError", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "explorer.plugins"
_RESULT_TYPES = (Heatmap, TokenSelection, RegionMask, LabelMap, Caption, Curve, Metrics, Reconstruction, TokenScores,
                 CodebookUsage)


class PluginError(RuntimeError):
    """A plugin failed (import, bad result, or an exception in its code); names the plugin."""


@dataclass
class PluginRecord:
    """One discovered plugin: its manifest, or the error that kept it out."""

    name: str
    value: str
    distribution: str | None = None
    manifest: PluginManifest | None = None
    manifest_path: Path | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.manifest is not None


@dataclass(frozen=True)
class MethodInfo:
    """A method as listed (from the manifest): no plugin code is needed to show it."""

    plugin: str
    contribution: MethodContribution

    @property
    def id(self) -> str:
        return self.contribution.id

    @property
    def title(self) -> str:
        return self.contribution.title

    @property
    def family(self) -> str:
        return self.contribution.family

    def requires(self, what: str) -> bool:
        return what in self.contribution.requires


def _manifest_location(value: str) -> Path:
    """``package:manifest.toml`` -> the file path, without executing ``package``."""
    module, sep, resource = value.partition(":")
    if not sep or not module or not resource:
        raise ManifestError(f"entry point value {value!r} must be 'package:manifest.toml'")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise ManifestError(f"cannot locate package {module!r}: {exc}") from None
    if spec is None:
        raise ManifestError(f"package {module!r} is not installed")
    if spec.submodule_search_locations:
        base = Path(list(spec.submodule_search_locations)[0])
    elif spec.origin:
        base = Path(spec.origin).parent
    else:
        raise ManifestError(f"cannot find the folder of package {module!r}")
    return base / resource


def _out_of_memory(exc: BaseException) -> bool:
    """A device or host allocation failed (torch's ``OutOfMemoryError``, its message, MemoryError)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ in ("OutOfMemoryError", "OutOfMemory"):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _release(backend: Any) -> None:
    """Give the device's cached blocks back after an out-of-memory error (torch is loaded by then)."""
    device = getattr(backend, "device", None)
    if device is not None:
        from explorer.backends.devices import release_memory

        release_memory(device)


def _checked(job: Job, cancel: CancelToken) -> Job:
    """Forward a plugin's job, checking the cancel token before every step it takes."""
    try:
        while True:
            cancel.raise_if_cancelled()
            step = next(job)
            yield step
    except StopIteration as stop:
        return stop.value
    finally:
        job.close()


class PluginHost:
    """Finds plugins, lists their methods, imports and runs them on demand."""

    def __init__(self, group: str = ENTRY_POINT_GROUP, entry_points: Iterable[md.EntryPoint] | None = None) -> None:
        self.group = group
        self._explicit = list(entry_points) if entry_points is not None else None
        self.plugins: list[PluginRecord] = []
        self._methods: dict[str, MethodInfo] = {}
        self._loaded: dict[str, Method] = {}
        self._load_errors: dict[str, str] = {}
        self.discover()

    # -- discovery ------------------------------------------------------------------------------
    def discover(self) -> None:
        eps = self._explicit if self._explicit is not None else list(md.entry_points(group=self.group))
        self.plugins, self._methods = [], {}
        for ep in sorted(eps, key=lambda e: e.name):
            dist = getattr(getattr(ep, "dist", None), "name", None)
            rec = PluginRecord(name=ep.name, value=ep.value, distribution=dist)
            try:
                rec.manifest_path = _manifest_location(ep.value)
                rec.manifest = read_manifest(rec.manifest_path)
            except ManifestError as exc:
                rec.error = str(exc)
                log.warning("plugin %s: %s", ep.name, exc)
            self.plugins.append(rec)
            if rec.manifest is None:
                continue
            for contrib in rec.manifest.methods:
                if contrib.id in self._methods:
                    other = self._methods[contrib.id].plugin
                    rec.error = f"method id {contrib.id!r} is already provided by plugin {other!r}"
                    continue
                self._methods[contrib.id] = MethodInfo(plugin=rec.name, contribution=contrib)

    @property
    def errors(self) -> list[tuple[str, str]]:
        """``(plugin or method, message)`` for every broken plugin and failed import."""
        out = [(p.name, p.error) for p in self.plugins if p.error]
        out += sorted(self._load_errors.items())
        return out

    def methods(self, family: str | None = None, backend: str | None = None) -> list[MethodInfo]:
        out = list(self._methods.values())
        if family is not None:
            out = [m for m in out if m.family == family]
        if backend is not None:
            out = [m for m in out if backend in m.contribution.backends]
        return sorted(out, key=lambda m: (m.family, m.title))

    def method(self, method_id: str) -> MethodInfo:
        try:
            return self._methods[method_id]
        except KeyError:
            known = ", ".join(sorted(self._methods)) or "none"
            raise ValueError(f"unknown method {method_id!r}; available: {known}") from None

    # -- loading --------------------------------------------------------------------------------
    def load(self, method_id: str) -> Method:
        """Import the method's code (once) and return its instance; :class:`PluginError` on failure."""
        if method_id in self._loaded:
            return self._loaded[method_id]
        info = self.method(method_id)
        if method_id in self._load_errors:
            raise PluginError(self._load_errors[method_id])
        module_name, _, attr = info.contribution.python_name.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
            instance = obj() if isinstance(obj, type) else obj
            if not isinstance(instance, Method):
                raise TypeError(f"{info.contribution.python_name} is not an explorer Method")
            if not (isinstance(instance.Params, type) and issubclass(instance.Params, BaseModel)):
                raise TypeError("Method.Params must be a pydantic model")
        except Exception as exc:  # noqa: BLE001 - plugin code may raise anything on import
            msg = f"plugin {info.plugin!r} method {method_id!r} failed to load: {type(exc).__name__}: {exc}"
            self._load_errors[method_id] = msg
            log.warning(msg)
            raise PluginError(msg) from exc
        self._loaded[method_id] = instance
        return instance

    def params_model(self, method_id: str) -> type[BaseModel]:
        return self.load(method_id).Params

    def make_params(self, method_id: str, values: dict | None = None) -> BaseModel:
        return parse_params(self.params_model(method_id), values)

    def is_loaded(self, method_id: str) -> bool:
        return method_id in self._loaded

    # -- running --------------------------------------------------------------------------------
    def run(self, method_id: str, trace: Trace, params: BaseModel, *, target: Target,
            cancel: CancelToken | None = None, backend: Any = None) -> Job:
        """Job: run a method, attributing any failure to its plugin (:class:`PluginError`)."""
        info = self.method(method_id)
        method = self.load(method_id)
        cancel = cancel or CancelToken()
        if info.requires("text") and not target.prompts:
            raise ValueError(f"{info.title} needs a text prompt")
        try:
            cancel.raise_if_cancelled()
            job = method.run(trace, params, target=target, cancel=cancel, backend=backend)
            if not hasattr(job, "__next__"):
                result = job  # a plain function result is accepted too
            else:
                result = yield from _checked(job, cancel)
            cancel.raise_if_cancelled()
        except (Cancelled, ValueError):
            raise
        except Exception as exc:  # noqa: BLE001 - attribute plugin failures, keep the program alive
            if _out_of_memory(exc):
                where = str(getattr(backend, "device", "the device"))
                _release(backend)
                raise PluginError(f"{info.title} ran out of memory on {where}: capture fewer layers, use a smaller "
                                  f"image or batch, or load the model with device=cpu") from exc
            raise PluginError(f"{info.title} ({info.plugin}) failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(result, _RESULT_TYPES):
            raise PluginError(f"{info.title} ({info.plugin}) returned {type(result).__name__}, not a result type")
        yield Progress(1.0, f"{info.title} done")
        return result
