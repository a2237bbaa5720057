"""Plugin discovery and lazy loading.

Discovery reads the ``explorer.plugins`` entry points and each one's manifest *without importing
anything*: the manifest is found in the distribution's file list (``importlib.metadata``), or, for
an editable install, under the folder of the top-level package (locating a top-level package runs
no code; locating ``a.b`` through the import system would execute ``a/__init__.py``). Plugin code
is imported the first time one of its methods is used. A plugin whose manifest or import is broken
becomes an error entry with its message; it never stops the program.

Method ids are unique. The built-in plugins (distribution ``token-explorer``) claim their ids
first, then the others in name order; a later claim of a taken id is refused and listed in
:attr:`PluginHost.conflicts` (its plugin's other methods stay). ``prefer`` (or the environment
variable ``EXPLORER_PLUGIN_PREFER="method.id=plugin-name,..."``) gives an id to another claimant.

Results are checked before anyone draws them (:func:`check_result`): infinite values, maps with
no finite value or one constant value, label indices outside the classes, selections whose order
or groups point outside the image tokens, reconstructions outside [0, 1] become a
:class:`PluginError` naming the method.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from pydantic import BaseModel

from explorer.core.jobs import CancelToken, Cancelled, Job, Progress
from explorer.core.results import (Caption, CodebookUsage, Curve, Heatmap, LabelMap, Metrics, Reconstruction,
                                   RegionMask, TokenScores, TokenSelection)
from explorer.core.target import Target
from explorer.core.trace import Trace

from .api import Method, parse_params
from .manifest import ManifestError, MethodContribution, PluginManifest, read_manifest

log = logging.getLogger(__name__)

__all__ = ["PluginHost", "PluginRecord", "MethodInfo", "PluginError", "ENTRY_POINT_GROUP", "BUILTIN_DISTRIBUTION",
           "check_result", "Conflict"]

ENTRY_POINT_GROUP = "explorer.plugins"
BUILTIN_DISTRIBUTION = "token-explorer"
PREFER_ENV = "EXPLORER_PLUGIN_PREFER"
ISOLATE_ENV = "EXPLORER_ISOLATE"  # "third-party" (default), "all" (every method that can be), "none"
_NEEDS_PROCESS = ("model", "gradients", "passes")  # these call the loaded model: they run in this process
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


@dataclass(frozen=True)
class Conflict:
    """Two plugins claim one method id: ``kept`` provides it, ``refused`` does not."""

    method_id: str
    kept: str
    refused: str
    reason: str


def _dist_name(ep: md.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return getattr(dist, "name", None) if dist is not None else None


def _manifest_location(value: str, dist: md.Distribution | None = None) -> Path:
    """``package.sub:manifest.toml`` -> the file path, without executing any package: the file as
    the distribution lists it, else under the top-level package's folder (an editable install)."""
    module, sep, resource = value.partition(":")
    if not sep or not module or not resource:
        raise ManifestError(f"entry point value {value!r} must be 'package:manifest.toml'")
    parts = module.split(".")
    if not all(p.isidentifier() for p in parts) or "/" in resource or "\\" in resource or resource.startswith("."):
        raise ManifestError(f"entry point value {value!r} must be 'package:manifest.toml'")
    wanted = "/".join(parts) + "/" + resource
    if dist is not None:
        for f in dist.files or ():
            if str(f).replace("\\", "/") == wanted:
                return Path(str(dist.locate_file(f)))
    try:
        spec = importlib.util.find_spec(parts[0])  # a top-level name: the finders only, no package code
    except (ImportError, ValueError) as exc:
        raise ManifestError(f"cannot locate package {parts[0]!r}: {exc}") from None
    if spec is None:
        raise ManifestError(f"package {module!r} is not installed")
    if spec.submodule_search_locations:
        base = Path(list(spec.submodule_search_locations)[0])
    elif spec.origin and len(parts) == 1:
        base = Path(spec.origin).parent
    else:
        raise ManifestError(f"cannot find the folder of package {module!r}")
    return base.joinpath(*parts[1:], resource)


def _prefer_from_env() -> dict[str, str]:
    out = {}
    for item in os.environ.get(PREFER_ENV, "").split(","):
        mid, sep, plugin = item.partition("=")
        if sep and mid.strip() and plugin.strip():
            out[mid.strip()] = plugin.strip()
    return out


def _finite_range(values: np.ndarray) -> tuple[int, float, float] | None:
    """``(count, min, max)`` of the finite values, None when there are none."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return None
    return finite.size, float(finite.min()), float(finite.max())


def check_result(result: Any) -> str | None:
    """What is wrong with a method's result, in words (None: it can be drawn); see the module
    docstring. NaN marks "no value here" (sink tokens, pixels outside a crop) and is allowed, as
    long as some value is finite."""
    if isinstance(result, Heatmap):
        v = result.token_values if result.token_values is not None else result.pixel_values
        if np.isinf(v).any():
            return f"a map with {int(np.isinf(v).sum())} infinite value(s)"
        r = _finite_range(v)
        if r is None:
            return "a map with no finite value (all NaN)"
        if r[0] > 1 and r[1] == r[2]:
            return f"a constant map (every value {r[1]:g})"
    elif isinstance(result, LabelMap):
        n = len(result.class_names)
        labels = result.labels
        if n and ((labels < -1) | (labels >= n)).any():
            return f"labels outside the {n} classes (from {int(labels.min())} to {int(labels.max())})"
        if result.scores is not None and np.isinf(result.scores).any():
            return "label scores with infinite values"
    elif isinstance(result, TokenSelection):
        n = result.layout.n_image_tokens
        if result.order is not None and result.order.size and ((result.order < 0) | (result.order >= n)).any():
            return f"an order with token indices outside 0..{n - 1}"
        if result.groups is not None and (result.groups.shape[0] != n or (result.groups >= n).any()):
            return f"groups that do not match the {n} image tokens"
        if result.scores is not None and np.isinf(result.scores).any():
            return "token scores with infinite values"
    elif isinstance(result, Reconstruction):
        if not np.isfinite(result.rgb).all() or result.rgb.min() < -1e-3 or result.rgb.max() > 1 + 1e-3:
            return "a reconstruction with values outside [0, 1]"
        err = result.error.token_values  # may be constant: a perfect reconstruction has no error
        if np.isinf(err).any() or _finite_range(err) is None:
            return "a reconstruction whose error map has no finite value or infinite values"
    elif isinstance(result, TokenScores):
        if np.isinf(result.scores).any() or _finite_range(result.scores) is None:
            return "token scores with no finite value or infinite values"
    return None


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

    def __init__(self, group: str = ENTRY_POINT_GROUP, entry_points: Iterable[md.EntryPoint] | None = None,
                 prefer: dict[str, str] | None = None) -> None:
        self.group = group
        self._explicit = list(entry_points) if entry_points is not None else None
        self.prefer = dict(_prefer_from_env() if prefer is None else prefer)
        self.plugins: list[PluginRecord] = []
        self.conflicts: list[Conflict] = []
        self._methods: dict[str, MethodInfo] = {}
        self._loaded: dict[str, Method] = {}
        self._load_errors: dict[str, str] = {}
        self.isolate = os.environ.get(ISOLATE_ENV, "third-party")
        self._isolation = None
        self.discover()

    # -- discovery ------------------------------------------------------------------------------
    def discover(self) -> None:
        eps = self._explicit if self._explicit is not None else list(md.entry_points(group=self.group))
        self.plugins, self._methods, self.conflicts = [], {}, []
        # the built-in plugins claim their ids first, then the others by name
        eps = sorted(eps, key=lambda e: (_dist_name(e) != BUILTIN_DISTRIBUTION, e.name))
        claims: dict[str, list[MethodInfo]] = {}
        for ep in eps:
            rec = PluginRecord(name=ep.name, value=ep.value, distribution=_dist_name(ep))
            try:
                rec.manifest_path = _manifest_location(ep.value, getattr(ep, "dist", None))
                rec.manifest = read_manifest(rec.manifest_path)
            except ManifestError as exc:
                rec.error = str(exc)
                log.warning("plugin %s: %s", ep.name, exc)
            self.plugins.append(rec)
            if rec.manifest is None:
                continue
            for contrib in rec.manifest.methods:
                claims.setdefault(contrib.id, []).append(MethodInfo(plugin=rec.name, contribution=contrib))
        builtin = {r.name for r in self.plugins if r.distribution == BUILTIN_DISTRIBUTION}
        for method_id, infos in claims.items():
            wanted = self.prefer.get(method_id)
            kept = next((i for i in infos if i.plugin == wanted), infos[0])
            self._methods[method_id] = kept
            for other in infos:
                if other is kept:
                    continue
                if kept.plugin == wanted:
                    reason = f"{PREFER_ENV} gives it to {kept.plugin!r}"
                elif kept.plugin in builtin:
                    reason = "the built-in plugin keeps it"
                else:
                    reason = "the first plugin by name keeps it"
                self.conflicts.append(Conflict(method_id, kept.plugin, other.plugin, reason))
                log.warning("plugin %s: method id %r refused (%s)", other.plugin, method_id, reason)

    @property
    def errors(self) -> list[tuple[str, str]]:
        """``(plugin or method, message)`` for every broken plugin and failed import."""
        out = [(p.name, p.error) for p in self.plugins if p.error]
        out += [(c.refused, f"method id {c.method_id!r} is also claimed by {c.kept!r}: refused ({c.reason})")
                for c in self.conflicts]
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

    def builtin(self, plugin: str) -> bool:
        return any(r.name == plugin and r.distribution == BUILTIN_DISTRIBUTION for r in self.plugins)

    def isolated(self, method_id: str) -> bool:
        """Whether the method runs in a worker process (:mod:`~explorer.plugin_host.isolation`):
        the methods of third-party plugins that need no model (``EXPLORER_ISOLATE``: ``all`` also
        isolates the built-in ones, ``none`` none)."""
        info = self.method(method_id)
        if self.isolate == "none" or any(info.requires(w) for w in _NEEDS_PROCESS):
            return False
        return self.isolate == "all" or not self.builtin(info.plugin)

    def close(self) -> None:
        """Stop the worker processes."""
        if self._isolation is not None:
            self._isolation.close()

    def capture(self, method_id: str, params: BaseModel, model: Any, target: Target):
        """The method's :meth:`~explorer.plugin_host.api.Method.capture`, its failures attributed
        to its plugin (:class:`PluginError`)."""
        info = self.method(method_id)
        method = self.load(method_id)
        try:
            return method.capture(params, model, target)
        except ValueError:
            raise
        except SystemExit as exc:
            raise PluginError(f"{info.title} ({info.plugin}) called sys.exit({exc.code!r}) in capture()") from None
        except Exception as exc:  # noqa: BLE001
            raise PluginError(f"{info.title} ({info.plugin}) failed in capture(): {type(exc).__name__}: {exc}") from exc

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
        if self.isolated(method_id):
            result = yield from self._run_isolated(info, trace, params, target, cancel)
        else:
            result = yield from self._run_here(info, method, trace, params, target, cancel, backend)
        if not isinstance(result, _RESULT_TYPES):
            raise PluginError(f"{info.title} ({info.plugin}) returned {type(result).__name__}, not a result type")
        problem = check_result(result)
        if problem is not None:
            raise PluginError(f"{info.title} ({info.plugin}) returned {problem}; nothing is drawn")
        yield Progress(1.0, f"{info.title} done")
        return result

    def _run_isolated(self, info: MethodInfo, trace: Trace, params: BaseModel, target: Target,
                      cancel: CancelToken) -> Job:
        from .isolation import IsolatedRunner, WorkerDied, WorkerError

        if self._isolation is None:
            self._isolation = IsolatedRunner()
        try:
            return (yield from self._isolation.run(info.plugin, info.contribution.python_name, trace, params, target,
                                                   cancel))
        except WorkerDied as exc:
            raise PluginError(f"{info.title} ({info.plugin}) crashed: {exc}; the program goes on") from None
        except WorkerError as exc:
            if exc.user:
                raise ValueError(exc.message) from None
            if exc.kind == "SystemExit":
                raise PluginError(f"{info.title} ({info.plugin}) called sys.exit({exc.exit_code!r}); "
                                  "the program goes on") from None
            if exc.kind in ("OutOfMemoryError", "MemoryError") or "out of memory" in exc.message.lower():
                raise PluginError(f"{info.title} ran out of memory (in its worker process): capture fewer layers or "
                                  "use a smaller image") from None
            raise PluginError(f"{info.title} ({info.plugin}) failed: {exc.kind}: {exc.message}") from None

    def _run_here(self, info: MethodInfo, method: Method, trace: Trace, params: BaseModel, target: Target,
                  cancel: CancelToken, backend: Any) -> Job:
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
        except SystemExit as exc:  # a method must not end the program
            raise PluginError(f"{info.title} ({info.plugin}) called sys.exit({exc.code!r}); the program goes on") from None
        except Exception as exc:  # noqa: BLE001 - attribute plugin failures, keep the program alive
            if _out_of_memory(exc):
                where = str(getattr(backend, "device", "the device"))
                _release(backend)
                raise PluginError(f"{info.title} ran out of memory on {where}: capture fewer layers, use a smaller "
                                  f"image or batch, or load the model with device=cpu") from exc
            raise PluginError(f"{info.title} ({info.plugin}) failed: {type(exc).__name__}: {exc}") from exc
        return result
