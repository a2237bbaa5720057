"""Run a plugin method in a worker process the host can kill.

A method that calls ``os._exit``, crashes the interpreter (a segfault in native code) or never
returns must not take the program with it. :class:`IsolatedRunner` keeps one worker process per
plugin (started with ``spawn``: no copy of the program's threads, Qt or CUDA state), sends it the
method's inputs and reads back progress and the result:

* the inputs are the trace with every array copied to the host (device tensors become numpy
  arrays; the worker never touches the GPU), the parameters and the target; the method receives
  ``backend=None``, so only methods that need no model (``requires`` without ``model``,
  ``gradients`` or ``passes``) can run isolated; the others run in the program's process;
* cancel: the job polls the pipe every 20 ms; on cancel the worker is terminated (SIGTERM, then
  SIGKILL 0.2 s later) and the job raises :class:`~explorer.core.jobs.Cancelled` at once, so the
  thread that ran the job is free again; the next call starts a fresh worker;
* a worker that dies (exit code, signal) becomes a :class:`WorkerDied` naming the signal; the
  host turns it into a message naming the plugin.

The worker is reused between calls while it is healthy (its start, about a second, is paid once
per plugin). Results come back pickled; they are plain numpy dataclasses.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import signal
import threading
from typing import Any

import numpy as np

from explorer.core.arrays import to_host
from explorer.core.jobs import CancelToken, Cancelled, Job, Progress

__all__ = ["IsolatedRunner", "WorkerDied", "WorkerError", "host_copy"]

POLL_SECONDS = 0.02
KILL_GRACE_SECONDS = 0.2


class WorkerDied(RuntimeError):
    """The worker process ended while running a method (``exitcode``: its code, or minus the signal)."""

    def __init__(self, exitcode: int | None) -> None:
        self.exitcode = exitcode
        super().__init__(describe_exit(exitcode))


class WorkerError(RuntimeError):
    """The method raised in the worker: ``kind`` (the exception's class name) and its message;
    ``user`` when it was a ``ValueError`` (a message for the user, re-raised as one)."""

    def __init__(self, kind: str, message: str, user: bool = False, exit_code: Any = None) -> None:
        self.kind, self.message, self.user, self.exit_code = kind, message, user, exit_code
        super().__init__(f"{kind}: {message}")


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "the worker process stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        what = {"SIGSEGV": "a segmentation fault", "SIGBUS": "a bus error", "SIGABRT": "an abort",
                "SIGKILL": "killed", "SIGFPE": "a floating-point exception"}.get(name, name)
        return f"the worker process died ({what}, {name})"
    return f"the worker process exited with code {exitcode}"


def _host_value(v: Any) -> Any:
    if isinstance(v, np.ndarray) or v is None or isinstance(v, (str, int, float, bool)):
        return v
    if type(v).__module__.startswith("torch"):
        return to_host(v)
    if isinstance(v, dict):
        return {k: _host_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_host_value(x) for x in v) if not hasattr(v, "_fields") else v
    return v


def host_copy(trace: Any) -> Any:
    """The trace with every array on the host (numpy), ready to be pickled to a worker."""
    changes = {}
    for f in dataclasses.fields(trace):
        value = getattr(trace, f.name)
        if f.name in ("hidden_states", "attentions", "extras", "image_embedding"):
            changes[f.name] = _host_value(dict(value) if isinstance(value, dict) or hasattr(value, "items") else value)
    return dataclasses.replace(trace, **changes)


def _load_method(python_name: str):
    import importlib

    module_name, _, attr = python_name.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj() if isinstance(obj, type) else obj


def _worker_main(conn) -> None:
    """The worker's loop: ``(python_name, trace, params, target)`` in, progress and the result out."""
    methods: dict[str, Any] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        python_name, trace, params, target = msg
        try:
            method = methods.get(python_name)
            if method is None:
                method = methods[python_name] = _load_method(python_name)
            job = method.run(trace, params, target=target, cancel=CancelToken(), backend=None)
            if hasattr(job, "__next__"):
                while True:
                    try:
                        step = next(job)
                    except StopIteration as stop:
                        result = stop.value
                        break
                    if isinstance(step, Progress):
                        conn.send(("progress", step.fraction, step.message))
            else:
                result = job
            conn.send(("result", result))
        except SystemExit as exc:
            conn.send(("exit", exc.code))
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the host as a message
            try:
                conn.send(("error", type(exc).__name__, str(exc), isinstance(exc, ValueError)))
            except Exception:  # noqa: BLE001 - an unpicklable exception or a closed pipe
                return


class _Worker:
    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="explorer-plugin-worker")
        self.process.start()
        child.close()

    def alive(self) -> bool:
        return self.process.is_alive()

    def kill(self) -> None:
        p = self.process
        if p.is_alive():
            p.terminate()
            p.join(KILL_GRACE_SECONDS)
            if p.is_alive():
                p.kill()
                p.join(1.0)
        self.conn.close()


class IsolatedRunner:
    """One worker process per plugin, started on first use (see the module docstring)."""

    def __init__(self) -> None:
        self._workers: dict[str, _Worker] = {}
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def _take(self, plugin: str) -> _Worker:
        with self._lock:
            w = self._workers.get(plugin)
            if plugin in self._busy or w is None or not w.alive():
                if w is not None and plugin not in self._busy:
                    w.kill()
                w = _Worker()
                if plugin not in self._busy:
                    self._workers[plugin] = w
            self._busy.add(plugin)
            return w

    def _give_back(self, plugin: str, worker: _Worker, healthy: bool) -> None:
        with self._lock:
            if self._workers.get(plugin) is worker:
                self._busy.discard(plugin)
                if not healthy:
                    del self._workers[plugin]
            if not healthy:
                worker.kill()
            elif self._workers.get(plugin) is not worker:
                worker.kill()  # a second concurrent call had its own worker: do not keep two

    def run(self, plugin: str, python_name: str, trace: Any, params: Any, target: Any,
            cancel: CancelToken) -> Job:
        """Job: the method's result, computed in ``plugin``'s worker; raises :class:`Cancelled`
        (the worker is killed), :class:`WorkerDied` or :class:`WorkerError`."""
        worker = self._take(plugin)
        healthy = False
        try:
            worker.conn.send((python_name, host_copy(trace), params, target))
            while True:
                cancel.raise_if_cancelled()
                if worker.conn.poll(POLL_SECONDS):
                    try:
                        msg = worker.conn.recv()
                    except (EOFError, OSError):
                        worker.process.join(1.0)
                        raise WorkerDied(worker.process.exitcode) from None
                    kind = msg[0]
                    if kind == "progress":
                        yield Progress(msg[1], msg[2])
                    elif kind == "result":
                        healthy = True
                        return msg[1]
                    elif kind == "exit":
                        healthy = True
                        raise WorkerError("SystemExit", f"sys.exit({msg[1]!r})", exit_code=msg[1])
                    else:
                        healthy = True
                        raise WorkerError(msg[1], msg[2], bool(msg[3]))
                elif not worker.alive():
                    worker.process.join(0.1)
                    raise WorkerDied(worker.process.exitcode)
        except Cancelled:
            healthy = False
            raise
        finally:
            self._give_back(plugin, worker, healthy)

    def close(self) -> None:
        with self._lock:
            for w in self._workers.values():
                try:
                    w.conn.send(None)
                except (OSError, ValueError):
                    pass
                w.kill()
            self._workers.clear()
            self._busy.clear()

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

