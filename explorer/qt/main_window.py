"""The main window: it assembles the views and the controllers around one session model.

State lives in :class:`~explorer.core.session.SessionModel` (Qt-free, evented); the widgets render
it and send intents; one controller per dock (:mod:`explorer.qt.controllers`: maps, regions,
VLM, compare, sessions) turns intents into jobs on the :class:`~explorer.qt.runner.JobRunner` and
results into model changes. The window itself only builds widgets, menus and the status bar, and
offers a few entry points (``open_image``, ``load_model``, ``set_method``…) that delegate to the
controllers. It never runs a model on the GUI thread.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from PySide6.QtCore import QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QDockWidget,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from explorer.core.jobs import Progress
from explorer.core.session import Message, SessionModel
from explorer.core.sysinfo import process_rss_bytes
from explorer.plugin_host.engine import Engine

from .analysis import FaithfulnessPanel, Legend, RegionTool
from .browser import ImageBrowser
from .canvas import Canvas
from .compare import CompareView
from .controllers import (CompareController, MapsController, RegionsController, SessionController,
                          SweepController, TokenizerController, VlmController)
from .panel import MethodPanel
from .regions_panel import RegionsPanel
from .runner import JobRunner
from .sweep_view import SweepView
from .tokenizer_panel import TokenizerPanel
from .vlm_panel import VlmPanel

log = logging.getLogger(__name__)

__all__ = ["MainWindow", "MessageBar"]


class MessageBar(QWidget):
    """A dismissible one-line message above the canvas (errors and hints, never modal)."""

    dismissed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("message_bar")
        self.setAttribute(Qt.WidgetAttribute.WA_StyledBackground, True)  # the colour fills the whole bar
        lay = QHBoxLayout(self)
        lay.setContentsMargins(8, 4, 8, 4)
        self.label = QLabel()
        self.label.setObjectName("message_label")
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        close = QPushButton("✕")
        close.setFlat(True)
        close.setFixedWidth(28)
        close.clicked.connect(self.dismissed)
        lay.addWidget(self.label, 1)
        lay.addWidget(close)
        self.kind = ""
        self.hide()

    def show_message(self, message: Message | None) -> None:
        if message is None:
            self.hide()
            return
        colors = {"error": "#5c1a1a", "info": "#1a3a5c", "warning": "#5c4a1a"}
        self.setStyleSheet(f"#message_bar {{ background: {colors.get(message.kind, '#333')}; }} "
                           "#message_bar QLabel, #message_bar QPushButton { color: #f1f3f4; background: transparent; }")
        self.label.setText(message.text)
        self.kind = message.kind
        self.show()

    def text(self) -> str:
        return self.label.text() if self.isVisible() else ""


class MainWindow(QMainWindow):
    # One signal per dock, emitted once its job's output is on screen (for scripts and tests):
    map_shown = Signal(object)  # the Heatmap / LabelMap / TokenSelection the canvas now shows
    regions_shown = Signal(object)  # SAM candidate masks, or {region index: labels or caption}
    answer_shown = Signal(object)  # the VLM trace whose answer the VLM dock now shows
    comparison_shown = Signal(object)  # one comparison cell's result, a whole comparison or a sweep
    sweep_shown = Signal(object)  # the SweepResults the Sweep tab now shows
    tokens_shown = Signal(object)  # the tokenizer trace whose tokens the Tokenizer dock now shows
    model_loaded = Signal(object)  # ModelInfo of a CLIP model that loaded
    session_opened = Signal(str)

    def __init__(self, engine: Engine | None = None, model_spec: str = "demo", settings: QSettings | None = None) -> None:
        super().__init__()
        self.setWindowTitle("Token Explorer")
        self.resize(1280, 800)
        self.setAcceptDrops(True)
        self.engine = engine or Engine()
        self.runner = JobRunner(self)
        self.settings = settings
        self.model = SessionModel(model_spec=model_spec)
        self._build_central()
        self._build_docks()
        self._build_status_bar()
        self.maps_controller = MapsController(self)
        self.regions_controller = RegionsController(self)
        self.vlm_controller = VlmController(self)
        self.compare_controller = CompareController(self)
        self.session_controller = SessionController(self)
        self.sweep_controller = SweepController(self)
        self.tokenizer_controller = TokenizerController(self)
        self.model.events.message.connect(self.message.show_message)
        self.message.dismissed.connect(lambda: self.model.clear_message())
        self.runner.progress.connect(self._on_progress)
        self.runner.busy_changed.connect(self._on_busy)
        self._mem_timer = QTimer(self)
        self._mem_timer.setInterval(2000)
        self._mem_timer.timeout.connect(self._update_memory)
        self._mem_timer.start()
        self._update_memory()
        for signal in (self.map_shown, self.comparison_shown, self.answer_shown, self.model_loaded):
            signal.connect(lambda *_: self._update_memory())  # what a job added shows at once
        self._build_menus()
        self.panel.set_methods(self.engine.host.methods(), self.engine.host.errors)
        ids = [m.id for m in self.engine.host.methods()]
        first = "attention.rollout" if "attention.rollout" in ids else (ids[0] if ids else None)
        if first:
            self.maps_controller.set_method(first)

    # -- building -------------------------------------------------------------------------------
    def _build_central(self) -> None:
        central = QWidget()
        cl = QVBoxLayout(central)
        cl.setContentsMargins(0, 0, 0, 0)
        cl.setSpacing(0)
        self.message = MessageBar()
        self.canvas = Canvas()
        self.legend = Legend()
        self.region_label = QLabel("")
        self.region_label.setObjectName("region_label")
        self.region_label.hide()
        page = QWidget()
        pl = QVBoxLayout(page)
        pl.setContentsMargins(0, 0, 0, 0)
        pl.setSpacing(0)
        pl.addWidget(self.canvas, 1)
        pl.addWidget(self.legend)
        pl.addWidget(self.region_label)
        self.compare = CompareView()
        self.tabs = QTabWidget()
        self.tabs.addTab(page, "Canvas")
        self.tabs.addTab(self.compare, "Compare")
        self.sweep_view = SweepView()
        self.tabs.addTab(self.sweep_view, "Sweep")
        cl.addWidget(self.message)
        cl.addWidget(self.tabs, 1)
        self.setCentralWidget(central)
        self.region = RegionTool(self.canvas, lambda box: self.maps_controller.on_box(box))

    def _dock(self, title: str, name: str, widget: QWidget, area, scroll: bool = False) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(name)
        if scroll:  # a long panel scrolls instead of squeezing its lists and plots
            area_widget = QScrollArea()
            area_widget.setWidgetResizable(True)
            area_widget.setFrameShape(QScrollArea.Shape.NoFrame)
            area_widget.setWidget(widget)
            dock.setWidget(area_widget)
        else:
            dock.setWidget(widget)
        self.addDockWidget(area, dock)
        return dock

    def _build_docks(self) -> None:
        right = Qt.DockWidgetArea.RightDockWidgetArea
        self.browser = ImageBrowser()
        self.browser.image_chosen.connect(self.open_image)
        bdock = self._dock("Images", "images_dock", self.browser, Qt.DockWidgetArea.LeftDockWidgetArea)
        self.panel = MethodPanel()
        pdock = self._dock("Method", "method_dock", self.panel, right, scroll=True)
        self.resizeDocks([bdock, pdock], [190, 400], Qt.Orientation.Horizontal)
        self.vlm_panel = VlmPanel()
        self.vlm_dock = self._dock("Ask a VLM", "vlm_dock", self.vlm_panel, right)
        self.tabifyDockWidget(pdock, self.vlm_dock)
        self.regions_panel = RegionsPanel()
        self.regions_dock = self._dock("Regions", "regions_dock", self.regions_panel, right, scroll=True)
        self.tabifyDockWidget(pdock, self.regions_dock)
        self.tokenizer_panel = TokenizerPanel()
        self.tokenizer_dock = self._dock("Tokenizer", "tokenizer_dock", self.tokenizer_panel, right, scroll=True)
        self.tabifyDockWidget(pdock, self.tokenizer_dock)
        pdock.raise_()
        self.method_dock = pdock
        self.faithfulness = FaithfulnessPanel()
        self.faithfulness_dock = self._dock("Faithfulness", "faithfulness_dock", self.faithfulness,
                                            Qt.DockWidgetArea.BottomDockWidgetArea)
        self.resizeDocks([self.faithfulness_dock], [240], Qt.Orientation.Vertical)
        self.faithfulness_dock.hide()  # shown when a map is scored (Analysis ▸ Score faithfulness)

    def _build_status_bar(self) -> None:
        sb = self.statusBar()
        self.model_label = QLabel("no model")
        self.model_label.setObjectName("model_label")
        self.device_label = QLabel("")
        self.memory_label = QLabel("")
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(180)
        self.progress.setTextVisible(True)
        self.progress.hide()
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setObjectName("cancel_button")
        self.cancel_button.clicked.connect(self.cancel_jobs)
        self.cancel_button.hide()
        self.status_text = QLabel("")
        self.status_text.setObjectName("status_text")
        sb.addWidget(self.model_label)
        sb.addWidget(self.device_label)
        sb.addWidget(self.status_text, 1)
        sb.addPermanentWidget(self.progress)
        sb.addPermanentWidget(self.cancel_button)
        sb.addPermanentWidget(self.memory_label)

    def _action(self, menu, text: str, slot, shortcut=None) -> QAction:
        a = QAction(text, self)
        if shortcut is not None:
            a.setShortcut(shortcut)
        a.triggered.connect(slot)
        menu.addAction(a)
        return a

    def _build_menus(self) -> None:
        maps, sessions = self.maps_controller, self.session_controller
        m = self.menuBar().addMenu("&File")
        self._action(m, "&Open image…", maps.open_image_dialog, QKeySequence.StandardKey.Open)
        self._action(m, "Open &folder…", self.browser.choose_folder)
        m.addSeparator()
        self._action(m, "Open &session…", sessions.open_dialog, QKeySequence("Ctrl+Shift+O"))
        self._action(m, "&Save session…", sessions.save_dialog, QKeySequence.StandardKey.Save)
        sessions.recent_menu = m.addMenu("&Recent sessions")
        sessions.fill_recent_menu()
        m.addSeparator()
        self._action(m, "Open s&weep results…", self.sweep_controller.open_dialog)
        m.addSeparator()
        self._action(m, "&Export overlay PNG…", maps.export_dialog, QKeySequence("Ctrl+E"))
        m.addSeparator()
        self._action(m, "&Quit", self.close, QKeySequence.StandardKey.Quit)
        mm = self.menuBar().addMenu("&Model")
        self._action(mm, "&Load model…", maps.load_model_dialog)
        self._action(mm, "Use the &demo model", lambda: self.load_model("demo"))
        am = self.menuBar().addMenu("&Analysis")
        self.box_action = QAction("Draw a &box (map share inside)", self)
        self.box_action.setCheckable(True)
        self.box_action.toggled.connect(lambda on: self.region.start() if on else self.region.remove())
        am.addAction(self.box_action)
        self._action(am, "Score &faithfulness (deletion / insertion)", maps.run_faithfulness, QKeySequence("Ctrl+F"))
        self._action(am, "&Compare methods",
                     lambda: (self.tabs.setCurrentWidget(self.compare), self.run_compare(self.compare.checked())))
        vm = self.menuBar().addMenu("&View")
        for dock in self.findChildren(QDockWidget):
            vm.addAction(dock.toggleViewAction())
        hm = self.menuBar().addMenu("&Help")
        self._action(hm, "&Keyboard shortcuts", self._show_shortcuts)
        self._action(hm, "&Plugins", self._show_plugins)
        for key, role, delta in (("[", "layer", -1), ("]", "layer", 1), (",", "head", -1), (".", "head", 1)):
            sc = QShortcut(QKeySequence(key), self)
            sc.activated.connect(lambda role=role, delta=delta: maps.step(role, delta))
        sc = QShortcut(QKeySequence(Qt.Key.Key_Space), self.canvas)
        sc.activated.connect(lambda: self.model.set_display(overlay=not self.model.overlay))
        sc = QShortcut(QKeySequence(Qt.Key.Key_Escape), self)
        sc.activated.connect(self.cancel_jobs)

    def _show_shortcuts(self) -> None:
        QMessageBox.information(self, "Keyboard shortcuts",
                                "Ctrl+O open image\nCtrl+S save session\nCtrl+Shift+O open session\n"
                                "Ctrl+E export overlay\n[ ] previous/next layer\n, . previous/next head\n"
                                "Space show/hide overlay\nEsc cancel running work\nClick a patch: make it the query "
                                "of methods that use one")

    def _show_plugins(self) -> None:
        lines = []
        for rec in self.engine.host.plugins:
            if rec.ok:
                lines.append(f"✓ {rec.name} {rec.manifest.version}: " + ", ".join(m.id for m in rec.manifest.methods))
            else:
                lines.append(f"✗ {rec.name}: {rec.error}")
        for name, err in self.engine.host.errors:
            if not any(name == r.name for r in self.engine.host.plugins):
                lines.append(f"✗ {name}: {err}")
        QMessageBox.information(self, "Plugins", "\n".join(lines) or "no plugins")

    # -- entry points (the controllers do the work) ----------------------------------------------
    def load_model(self, spec: str) -> None:
        self.maps_controller.load_model(spec)

    def open_image(self, path: str) -> None:
        self.maps_controller.open_image(path)

    def set_method(self, method_id: str) -> None:
        self.maps_controller.set_method(method_id)

    def set_params(self, **values: Any) -> None:
        self.maps_controller.set_params(**values)

    def set_prompts(self, prompts: tuple[str, ...]) -> None:
        self.model.set_prompts(tuple(prompts))

    def set_query(self, query: int | None) -> None:
        self.model.set_query(query)

    def run_compare(self, method_ids: list[str]) -> None:
        self.compare_controller.run(method_ids)

    def run_sweep(self, method_ids: list[str]) -> None:
        self.compare_controller.sweep(method_ids)

    def run_faithfulness(self) -> None:
        self.maps_controller.run_faithfulness()

    def export(self, path: str) -> bool:
        return self.maps_controller.export(path)

    def show_error(self, text: str) -> None:
        log.info("shown error: %s", text)
        self.model.post(text, "error")

    def show_message(self, text: str, kind: str = "info") -> None:
        self.model.post(text, kind)

    # regions (delegating; the Regions dock's buttons go straight to the controller)
    def load_sam(self, spec: str) -> None:
        self.regions_controller.load_sam(spec)

    def box_prompt(self) -> None:
        self.regions_controller.box_prompt()

    def add_region(self, name: str | None = None) -> None:
        self.regions_controller.add_region(name)

    def union_regions(self, ids: list[int]) -> None:
        self.regions_controller.union_regions(ids)

    def subtract_regions(self, ids: list[int]) -> None:
        self.regions_controller.subtract_regions(ids)

    def delete_regions(self, ids: list[int]) -> None:
        self.regions_controller.delete_regions(ids)

    def select_region(self, rid: int) -> None:
        self.regions_controller.select_region(rid)

    def label_regions(self, ids: list[int]) -> None:
        self.regions_controller.label_regions(ids)

    def caption_regions(self, ids: list[int]) -> None:
        self.regions_controller.caption_regions(ids)

    def export_regions(self, kind: str, path: str) -> bool:
        return self.regions_controller.export_regions(kind, path)

    def _choose_candidate(self, i: int) -> None:
        self.model.choose_candidate(i)

    def encode_tokens(self, spec: str | None = None) -> None:
        """Encode the current image with the tokenizer ``spec`` (default: the dock's)."""
        if spec:
            self.tokenizer_panel.model_edit.setText(spec)
        self.tokenizer_controller.encode()

    def open_sweep(self, folder: str) -> None:
        self.sweep_controller.open(folder)

    def pick_sweep_row(self, position: int) -> None:
        self.sweep_controller.pick(position)

    def save_session(self, path: str) -> str | None:
        return self.session_controller.save(path)

    def open_session(self, path: str) -> None:
        self.session_controller.open(path)

    # -- read-only views of the model (for tests and scripts) ------------------------------------
    @property
    def state(self) -> SessionModel:
        return self.model

    @property
    def backend(self):
        return self.maps_controller.backend("clip")

    @property
    def sam_backend(self):
        return self.maps_controller.backend("sam")

    @property
    def vlm_backend(self):
        return self.maps_controller.backend("vlm")

    @property
    def trace(self):
        return self.maps_controller.trace

    @property
    def vlm_trace(self):
        return self.model.vlm.trace if self.model.vlm is not None else None

    @property
    def result(self):
        return self.model.view.result

    @property
    def regions(self):
        return self.model.regions

    @property
    def region_id(self):
        return self.model.region_id

    @property
    def prompt_points(self):
        return self.model.sam_prompt.points

    @property
    def prompt_box(self):
        return self.model.sam_prompt.box

    def region_stats(self):
        return self.maps_controller.region_stats()

    # -- status -------------------------------------------------------------------------------------
    def cancel_jobs(self) -> None:
        if self.runner.busy:
            self.runner.cancel()
            self.status_text.setText("cancelled")

    def _on_progress(self, description: str, p: Progress) -> None:
        self.progress.show()
        if p.fraction is None:
            self.progress.setRange(0, 0)
        else:
            self.progress.setRange(0, 100)
            self.progress.setValue(int(100 * p.fraction))
        self.progress.setFormat(f"{description}: %p%")

    def _on_busy(self, busy: bool) -> None:
        self.cancel_button.setVisible(busy)
        if not busy:
            self.progress.hide()

    def _update_memory(self) -> None:
        """RAM of the process, GPU memory held by tensors (once CUDA is in use) and the trace cache."""
        rss = process_rss_bytes()
        traces = self.engine.traces
        parts = [f"RAM {rss / 2**20:.0f} MiB"] if rss else []
        torch = sys.modules.get("torch")  # never imported here: only read once a model brought it in
        if torch is not None and torch.cuda.is_initialized():
            parts.append(f"GPU {torch.cuda.memory_allocated() / 2**20:.0f} MiB")
        mib = traces.nbytes / 2**20
        cache = f"cache {mib:.1f} MiB" if mib < 10 else f"cache {mib:.0f} MiB"
        if traces.device_nbytes:
            cache += f" (+{traces.device_nbytes / 2**20:.0f} MiB on the device)"
        self.memory_label.setText(" · ".join(parts + [cache]))

    # -- drag and drop -------------------------------------------------------------------------------
    def dragEnterEvent(self, event) -> None:  # noqa: N802 - Qt override
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:  # noqa: N802 - Qt override
        urls = [u for u in event.mimeData().urls() if u.isLocalFile()]
        if not urls:
            return
        path = Path(urls[0].toLocalFile())
        if path.is_dir():
            self.browser.set_folder(path)
        elif path.suffix == ".tesession":
            self.open_session(str(path))
        else:
            self.open_image(str(path))

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self._mem_timer.stop()
        self.maps_controller._rerun.stop()
        self.runner.shutdown()
        self.browser.shutdown()
        super().closeEvent(event)
