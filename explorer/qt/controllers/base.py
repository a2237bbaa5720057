"""What every controller shares: the window's model, engine and runner, and short error lines."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - for annotations only
    from ..main_window import MainWindow

__all__ = ["Controller", "short_error"]


def short_error(exc: BaseException | str, limit: int = 300) -> str:
    """One line for the user: the first line of the message (no traceback), at most ``limit`` characters."""
    text = str(exc).strip() if not isinstance(exc, str) else exc.strip()
    line = text.splitlines()[0] if text else (type(exc).__name__ if not isinstance(exc, str) else "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


class Controller:
    """Base of the dock controllers (see the package docstring)."""

    def __init__(self, window: "MainWindow") -> None:
        self.window = window
        self.model = window.model
        self.engine = window.engine
        self.runner = window.runner

    def backend(self, kind: str) -> Any:
        """The loaded backend of ``kind``'s working model (``None`` when none works yet)."""
        slot = self.model.slot(kind)
        return self.engine.backend_for(slot.spec) if slot.spec else None

    def slot_text(self, kind: str, none: str, detail: str = "") -> str:
        """One status line for ``kind``'s model slot: loading, working (name, ``detail``, device,
        a demo-model warning) or none (``none`` and the last load's error)."""
        slot = self.model.slot(kind)
        if slot.loading:
            return f"loading {slot.loading}…" + (f" ({slot.info.name} in use)" if slot.ready else "")
        if slot.ready:
            demo = ("  [demo model: trained on synthetic shapes]"
                    if slot.info.demo and "synthetic shapes" not in slot.info.name else "")
            return f"{slot.info.name}{detail} on {slot.info.device}{demo}"
        return none + (f": {slot.error}" if slot.error else "")

    def load(self, kind: str, spec: str, then=None, failed=None) -> None:
        """Load a model of ``kind`` on the device thread, as a transaction: the working model
        stays until the new one is loaded; a failure is said once and changes nothing else
        (``failed(exc)`` is called after it is said)."""
        from explorer.backends.registry import parse_model_spec

        try:
            parsed = parse_model_spec(spec)
        except ValueError as exc:
            self.model.post(f"Model not loaded: {short_error(exc)}", "error")
            return
        if parsed.kind != kind:
            self.model.post(f"Model not loaded: {spec!r} is a {parsed.kind} model, not a {kind} model", "error")
            return
        self.model.begin_load(kind, spec)

        def done(backend: Any) -> None:
            self.model.load_succeeded(kind, spec, backend.info)
            if then is not None:
                then(backend)

        self.runner.submit(f"model:{kind}", lambda cancel: self.engine.backend_job(spec), description=f"loading {spec}",
                           on_done=done, on_error=lambda exc: (self.model.load_failed(kind, spec, short_error(exc)),
                                                               failed is not None and failed(exc)),
                           on_cancelled=lambda: self.model.load_failed(kind, spec, "cancelled"))
