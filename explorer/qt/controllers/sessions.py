"""Sessions: File ▸ Save session / Open session / Recent sessions.

A session is one bundle file (:mod:`explorer.core.bundle`): written atomically, read and checked
off the GUI thread (the image is hashed there), then applied to the session model as user changes
would be. A damaged bundle, or one from a newer version, is refused with a message and the
current session is left as it was.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QFileDialog, QMenu

from explorer.core.bundle import SUFFIX, BundleError, apply_bundle, read_bundle, save_session

from .base import Controller, short_error

__all__ = ["SessionController"]

RECENT_KEY = "recent_sessions"
RECENT_MAX = 8


class SessionController(Controller):
    """See the module docstring."""

    def __init__(self, window) -> None:
        super().__init__(window)
        self.recent_menu: QMenu | None = None
        self.path: str | None = None

    # -- recent ---------------------------------------------------------------------------------
    def recent(self) -> list[str]:
        s = self.window.settings
        value = s.value(RECENT_KEY) if s is not None else None
        if not value:
            return []
        items = [value] if isinstance(value, str) else list(value)
        return [p for p in items if p]

    def _remember(self, path: str) -> None:
        s = self.window.settings
        if s is None:
            return
        items = [path] + [p for p in self.recent() if p != path]
        s.setValue(RECENT_KEY, items[:RECENT_MAX])
        self.fill_recent_menu()

    def fill_recent_menu(self) -> None:
        menu = self.recent_menu
        if menu is None:
            return
        menu.clear()
        items = self.recent()
        for path in items:
            menu.addAction(Path(path).name, lambda p=path: self.open(p)).setToolTip(path)
        menu.setEnabled(bool(items))

    # -- save -----------------------------------------------------------------------------------
    def save_dialog(self) -> None:
        if self.model.image is None:
            self.model.post("Nothing to save yet: open an image first.", "info")
            return
        start = self.path or str(Path(self.model.image_path or "session").with_suffix(SUFFIX))
        path, _ = QFileDialog.getSaveFileName(self.window, "Save session", start, f"Sessions (*{SUFFIX})")
        if path:
            self.save(path)

    def save(self, path: str) -> str | None:
        try:
            out = save_session(self.model, path)
        except BundleError as exc:
            self.model.post(short_error(exc), "error")
            return None
        self.path = str(out)
        self._remember(self.path)
        self.window.status_text.setText(f"session saved to {out.name}")
        return self.path

    # -- open -----------------------------------------------------------------------------------
    def open_dialog(self) -> None:
        start = str(Path(self.path).parent) if self.path else str(Path.home())
        path, _ = QFileDialog.getOpenFileName(self.window, "Open session", start,
                                              f"Sessions (*{SUFFIX});;All files (*)")
        if path:
            self.open(path)

    def open(self, path: str) -> None:
        """Read the bundle off the GUI thread, then apply it (models load in the background)."""
        self.runner.submit("session", lambda cancel: read_bundle(path), device=False, description="opening session",
                           on_done=lambda bundle: self._apply(bundle, path),
                           on_error=lambda exc: self.model.post(f"Session not opened: {short_error(exc)}", "error"))

    def _apply(self, bundle, path: str) -> None:
        w = self.window
        apply_bundle(bundle, self.model, self.engine.host.make_params)
        self.path = str(path)
        self._remember(self.path)
        # the working models of the session load in the background (its results are already shown)
        w.maps_controller.ensure_model()
        vlm = self.model.slot("vlm")
        if self.model.vlm is not None:
            w.vlm_panel.model_edit.setText(self.model.vlm.spec)
            w.vlm_panel.prompt_edit.setText(self.model.vlm.prompt)
        w.compare.keep.setValue(self.model.compare_keep)
        if self.model.compare_layer is not None:
            w.compare.layer.setValue(self.model.compare_layer)
        sam = self.model.slot("sam")
        if sam.wanted:
            w.regions_panel.model_edit.setText(sam.wanted)
        if vlm.wanted and self.model.vlm is None:
            w.vlm_panel.model_edit.setText(vlm.wanted)
        w.status_text.setText(f"session {Path(path).name} opened")
        w.session_opened.emit(path)
