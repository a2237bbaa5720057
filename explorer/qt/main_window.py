"""The main window: image browser, canvas, method panel, status bar.

The window holds the view state (image, model spec, method, parameters, prompts, query) and
asks the :class:`Engine` for results through the :class:`JobRunner`; it never runs a model
itself. Model loading and tracing run on the device thread; methods that only read a trace run
on the CPU pool. Every change re-runs the current method (debounced); a cached trace makes that
cheap. Errors appear in a message bar above the canvas; the window stays usable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel
from PySide6.QtCore import QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QDockWidget,
    QTabWidget,
    QFileDialog,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from explorer.core.image_io import LoadedImage, image_filter_patterns, load_image
from explorer.core.jobs import Progress
from explorer.core.metrics import box_mask, region_stats
from explorer.core.regions import RegionSet
from explorer.core.results import Heatmap, LabelMap, Result, TokenSelection
from explorer.core.sysinfo import process_rss_bytes
from explorer.core.target import Target
from explorer.core.trace import Trace
from explorer.plugin_host.engine import Engine

from .analysis import FaithfulnessPanel, Legend, RegionTool, region_text
from .browser import ImageBrowser
from .canvas import Canvas
from .compare import CompareView
from .panel import MethodPanel
from .regions_panel import RegionsPanel
from .runner import JobRunner
from .vlm_panel import VlmPanel

log = logging.getLogger(__name__)

__all__ = ["MainWindow", "ViewState"]

MAP_FAMILIES = ("attention", "similarity", "attribution")
REDUCTION_FAMILIES = ("pruning", "merging")


@dataclass
class ViewState:
    """What the window shows; widgets reflect it and hold nothing else."""

    image: LoadedImage | None = None
    image_path: str | None = None
    model_spec: str = "demo"
    method_id: str | None = None
    params: dict[str, BaseModel] = field(default_factory=dict)  # per method, so switching back keeps them
    prompts: tuple[str, ...] = ()
    query: int | None = None
    colormap: str = "viridis"
    opacity: float = 0.6
    vlm_tokens: tuple[int, ...] = ()
    region_stats: dict | None = None


class MessageBar(QWidget):
    """A dismissible one-line message above the canvas (errors and hints, never modal)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(8, 4, 8, 4)
        self.label = QLabel()
        self.label.setObjectName("message_label")
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        close = QPushButton("✕")
        close.setFlat(True)
        close.setFixedWidth(28)
        close.clicked.connect(self.hide)
        lay.addWidget(self.label, 1)
        lay.addWidget(close)
        self.hide()

    def show_message(self, text: str, kind: str = "error") -> None:
        colors = {"error": "#5c1a1a", "info": "#1a3a5c", "warning": "#5c4a1a"}
        self.setStyleSheet(f"background: {colors.get(kind, '#333')}; color: #f1f3f4;")
        self.label.setText(text)
        self.kind = kind
        self.show()

    def text(self) -> str:
        return self.label.text() if self.isVisible() else ""



def _demo_note(info: Any) -> str:
    """What the window adds to a model's name when it is a demo model (said once)."""
    if not info.demo or "synthetic shapes" in info.name:
        return ""
    return "  [demo model: trained on synthetic shapes]"

class MainWindow(QMainWindow):
    result_shown = Signal(object)  # the Result drawn on the canvas
    model_loaded = Signal(object)  # ModelInfo

    def __init__(self, engine: Engine | None = None, model_spec: str = "demo", settings: QSettings | None = None) -> None:
        super().__init__()
        self.setWindowTitle("Token Explorer")
        self.resize(1280, 820)
        self.setAcceptDrops(True)
        self.engine = engine or Engine()
        self.runner = JobRunner(self)
        self.settings = settings
        self.state = ViewState(model_spec=model_spec)
        self.backend: Any = None  # the loaded backend (set on the GUI thread when a load finishes)
        self.trace: Trace | None = None
        self.result: Result | None = None
        self._pending_model: str | None = None

        # central: message bar above two tabs (the canvas; the compare grid)
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
        cl.addWidget(self.message)
        cl.addWidget(self.tabs, 1)
        self.setCentralWidget(central)
        self.region = RegionTool(self.canvas, self._on_region)
        self._raster: tuple[int, object] | None = None  # (id of result, its raster on the image)

        # docks
        self.browser = ImageBrowser()
        self.browser.image_chosen.connect(self.open_image)
        bdock = QDockWidget("Images", self)
        bdock.setObjectName("images_dock")
        bdock.setWidget(self.browser)
        self.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, bdock)
        self.panel = MethodPanel()
        pdock = QDockWidget("Method", self)
        pdock.setObjectName("method_dock")
        pdock.setWidget(self.panel)
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, pdock)
        self.resizeDocks([bdock, pdock], [220, 320], Qt.Orientation.Horizontal)
        self.vlm_panel = VlmPanel()
        vdock = QDockWidget("Ask a VLM", self)
        vdock.setObjectName("vlm_dock")
        vdock.setWidget(self.vlm_panel)
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, vdock)
        self.tabifyDockWidget(pdock, vdock)
        pdock.raise_()
        self.vlm_dock = vdock
        self.vlm_trace: Trace | None = None
        self.vlm_backend: Any = None
        self.regions_panel = RegionsPanel()
        rdock = QDockWidget("Regions", self)
        rdock.setObjectName("regions_dock")
        rdock.setWidget(self.regions_panel)
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, rdock)
        self.tabifyDockWidget(pdock, rdock)
        pdock.raise_()
        self.regions_dock = rdock
        self.sam_backend: Any = None
        self.regions: RegionSet | None = None
        self.region_id: int | None = None
        self.segmenting = False
        self.prompt_points: list[tuple[float, float, int]] = []
        self.prompt_box: list[float] | None = None
        self.candidates: list = []
        self.candidate = 0
        self.faithfulness = FaithfulnessPanel()
        fdock = QDockWidget("Faithfulness", self)
        fdock.setObjectName("faithfulness_dock")
        fdock.setWidget(self.faithfulness)
        self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, fdock)
        self.resizeDocks([fdock], [200], Qt.Orientation.Vertical)
        self.faithfulness_dock = fdock
        fdock.hide()  # shown when a map is scored (Analysis ▸ Score faithfulness)

        # status bar
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

        # wiring
        self.panel.set_methods(self.engine.host.methods(), self.engine.host.errors)
        self.panel.method_changed.connect(self.set_method)
        self.panel.form.changed.connect(self._on_params)
        self.panel.prompts_changed.connect(self.set_prompts)
        self.panel.reset_query.connect(lambda: self.set_query(None))
        self.panel.colormap_changed.connect(self._on_colormap)
        self.panel.opacity_changed.connect(self._on_opacity)
        self.panel.overlay_toggled.connect(self.canvas.set_overlay_visible)
        self.canvas.clicked.connect(self._on_canvas_click)
        self.legend.class_clicked.connect(self._on_legend_click)
        self.vlm_panel.generate_requested.connect(self.ask_vlm)
        self.vlm_panel.load_requested.connect(self.load_vlm)
        self.vlm_panel.strip.selection_changed.connect(self._on_vlm_tokens)
        self.vlm_panel.grid.picked.connect(self._on_grid_pick)
        rp = self.regions_panel
        rp.load_requested.connect(self.load_sam)
        rp.segment_toggled.connect(self._set_segmenting)
        rp.clear_prompt.connect(self.clear_prompt)
        rp.box_requested.connect(self.box_prompt)
        rp.candidate_chosen.connect(self._choose_candidate)
        rp.add_requested.connect(self.add_region)
        rp.union_requested.connect(self.union_regions)
        rp.subtract_requested.connect(self.subtract_regions)
        rp.delete_requested.connect(self.delete_regions)
        rp.renamed.connect(self._rename_region)
        rp.visibility_changed.connect(self._region_visibility)
        rp.selected.connect(self.select_region)
        rp.label_requested.connect(self.label_regions)
        rp.caption_requested.connect(self.caption_regions)
        rp.export_requested.connect(self.export_regions_dialog)
        self.canvas.prompt_clicked.connect(self._on_prompt_click)
        self.faithfulness.compute_requested.connect(self.run_faithfulness)
        self._compare_checked = {"maps": {"attention.rollout", "similarity.maskclip", "attention.raw"},
                                 "reduction": {"pruning.topk", "pruning.evit", "merging.tome", "pruning.divprune",
                                               "pruning.random", "merging.pool"},
                                 "vlm": {"vlm.fastv", "vlm.dart", "vlm.divprune", "vlm.random", "vlm.pool", "vlm.sparsevlm"}}
        self._set_compare_mode("maps")
        self.compare.mode_changed.connect(self._set_compare_mode)
        self.compare.run_requested.connect(self.run_compare)
        self.compare.score_requested.connect(self.score_compare)
        self.compare.sweep_requested.connect(self.run_sweep)
        self.runner.progress.connect(self._on_progress)
        self.runner.busy_changed.connect(self._on_busy)
        self._rerun = QTimer(self)
        self._rerun.setSingleShot(True)
        self._rerun.setInterval(120)
        self._rerun.timeout.connect(self.run_current)
        self._mem_timer = QTimer(self)
        self._mem_timer.setInterval(2000)
        self._mem_timer.timeout.connect(self._update_memory)
        self._mem_timer.start()
        self._update_memory()
        self._build_menus()
        ids = [m.id for m in self.engine.host.methods()]
        first = "attention.rollout" if "attention.rollout" in ids else (ids[0] if ids else None)
        if first:
            self.panel.select_method(first)
            self.set_method(first)

    # -- menus and shortcuts --------------------------------------------------------------------
    def _build_menus(self) -> None:
        m = self.menuBar().addMenu("&File")
        a = QAction("&Open image…", self)
        a.setShortcut(QKeySequence.StandardKey.Open)
        a.triggered.connect(self.open_image_dialog)
        m.addAction(a)
        a = QAction("Open &folder…", self)
        a.triggered.connect(self.browser.choose_folder)
        m.addAction(a)
        m.addSeparator()
        a = QAction("&Export overlay PNG…", self)
        a.setShortcut(QKeySequence("Ctrl+E"))
        a.triggered.connect(self.export_dialog)
        m.addAction(a)
        m.addSeparator()
        a = QAction("&Quit", self)
        a.setShortcut(QKeySequence.StandardKey.Quit)
        a.triggered.connect(self.close)
        m.addAction(a)
        mm = self.menuBar().addMenu("&Model")
        a = QAction("&Load model…", self)
        a.triggered.connect(self.load_model_dialog)
        mm.addAction(a)
        a = QAction("Use the &demo model", self)
        a.triggered.connect(lambda: self.load_model("demo"))
        mm.addAction(a)
        am = self.menuBar().addMenu("&Analysis")
        self.box_action = QAction("Draw a &box (map share inside)", self)
        self.box_action.setCheckable(True)
        self.box_action.toggled.connect(lambda on: self.region.start() if on else self.region.remove())
        am.addAction(self.box_action)
        a = QAction("Score &faithfulness (deletion / insertion)", self)
        a.setShortcut(QKeySequence("Ctrl+F"))
        a.triggered.connect(self.run_faithfulness)
        am.addAction(a)
        a = QAction("&Compare methods", self)
        a.triggered.connect(lambda: (self.tabs.setCurrentWidget(self.compare), self.run_compare(self.compare.checked())))
        am.addAction(a)
        vm = self.menuBar().addMenu("&View")
        for dock in self.findChildren(QDockWidget):
            vm.addAction(dock.toggleViewAction())
        hm = self.menuBar().addMenu("&Help")
        a = QAction("&Keyboard shortcuts", self)
        a.triggered.connect(self._show_shortcuts)
        hm.addAction(a)
        a = QAction("&Plugins", self)
        a.triggered.connect(self._show_plugins)
        hm.addAction(a)
        for key, role, delta in (("[", "layer", -1), ("]", "layer", 1), (",", "head", -1), (".", "head", 1)):
            sc = QShortcut(QKeySequence(key), self)
            sc.activated.connect(lambda role=role, delta=delta: self.panel.form.step(role, delta))
        sc = QShortcut(QKeySequence(Qt.Key.Key_Space), self.canvas)
        sc.activated.connect(lambda: self.panel.show_overlay.toggle())
        sc = QShortcut(QKeySequence(Qt.Key.Key_Escape), self)
        sc.activated.connect(self.cancel_jobs)

    def _show_shortcuts(self) -> None:
        QMessageBox.information(self, "Keyboard shortcuts",
                                "Ctrl+O open image\nCtrl+E export overlay\n[ ] previous/next layer\n"
                                ", . previous/next head\nSpace show/hide overlay\nEsc cancel running work\n"
                                "Click a patch: make it the attention query")

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

    # -- model ----------------------------------------------------------------------------------
    def load_model_dialog(self) -> None:
        text, ok = QInputDialog.getText(
            self, "Load model",
            "Model spec: ViT-B-16@openai, ViT-B-16@/path/ckpt.pt, hf-hub:org/repo, local-dir:/path, or demo",
            text=self.state.model_spec)
        if ok and text.strip():
            self.load_model(text.strip())

    def load_model(self, spec: str) -> None:
        """Load a model on the device thread; the window keeps working meanwhile."""
        self.state.model_spec = spec
        self.model_label.setText(f"loading {spec}…")
        self.runner.submit("model", lambda cancel: self.engine.backend_job(spec), description="loading model",
                           on_done=self._on_model, on_error=self._on_model_error)

    def _on_model(self, backend: Any) -> None:
        self.backend = backend
        self.trace = None
        info = backend.info
        label = info.name + _demo_note(info)
        self.model_label.setText(label)
        self.device_label.setText(f"device: {info.device}")
        self.panel.form.set_model_limits(info.n_layers, info.n_heads)
        from explorer.plugin_host.reduction import default_layer

        self.compare.layer.setValue(default_layer(info.n_layers))
        if self.settings is not None:
            self.settings.setValue("model", self.state.model_spec)
        self.model_loaded.emit(info)
        self.schedule_run()

    def _on_model_error(self, exc: BaseException) -> None:
        self.model_label.setText("no model")
        self.show_error(f"Model not loaded: {exc}")

    # -- image ----------------------------------------------------------------------------------
    def open_image_dialog(self) -> None:
        pattern = " ".join(image_filter_patterns())
        path, _ = QFileDialog.getOpenFileName(self, "Open image", str(Path(self.state.image_path or Path.home()).parent),
                                              f"Images ({pattern});;All files (*)")
        if path:
            self.open_image(path)

    def open_image(self, path: str) -> None:
        """Read an image off the GUI thread; a bad file shows a message and changes nothing."""
        self.runner.submit("image", lambda cancel: load_image(path), device=False, description="reading image",
                           on_done=lambda img: self._set_image(img, path),
                           on_error=lambda exc: self.show_error(str(exc)))

    def _set_image(self, image: LoadedImage, path: str | None) -> None:
        self.state.image = image
        self.state.image_path = path
        self.state.query = None
        self.trace = None
        self.result = None
        self.canvas.set_image(image.rgb)
        self.regions = RegionSet(image.size)
        self.region_id = None
        self.prompt_points, self.candidates, self.prompt_box = [], [], None
        self.canvas.set_points([])
        self._refresh_regions()
        self.message.hide()
        if image.warnings:
            self.show_message("; ".join(image.warnings), "warning")
        title = Path(path).name if path else "image"
        self.setWindowTitle(f"{title} ({image.size[1]}x{image.size[0]}) — Token Explorer")
        self.browser.select(path)
        self._update_query_label()
        self.schedule_run()

    def set_image_array(self, image: LoadedImage, name: str = "image") -> None:
        self._set_image(image, name)

    # drag and drop
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
        else:
            self.open_image(str(path))

    # -- method, params, prompts, query -------------------------------------------------------
    def set_method(self, method_id: str) -> None:
        host = self.engine.host
        try:
            info = host.method(method_id)
            model = host.params_model(method_id)  # imports the plugin now (first use)
        except (ValueError, RuntimeError) as exc:
            self.show_error(str(exc))
            return
        self.state.method_id = method_id
        params = self.state.params.get(method_id) or host.make_params(method_id)
        self.state.params[method_id] = params
        n_layers = self.backend.info.n_layers if self.backend is not None else None
        n_heads = self.backend.info.n_heads if self.backend is not None else None
        self.panel.form.set_model(model, params, n_layers, n_heads)
        self.panel.describe(info)
        if self.panel.current_method() != method_id:
            self.panel.select_method(method_id)
        self.schedule_run()

    def _on_params(self, params: BaseModel) -> None:
        if self.state.method_id:
            self.state.params[self.state.method_id] = params
            self.schedule_run()

    def set_params(self, **values: Any) -> None:
        """Set parameters of the current method (like editing the form)."""
        current = self.state.params[self.state.method_id].model_dump()
        current.update(values)
        params = self.engine.host.make_params(self.state.method_id, current)
        self.panel.form.set_values(params)
        self._on_params(params)

    def set_prompts(self, prompts: tuple[str, ...]) -> None:
        if prompts != self.state.prompts:
            self.state.prompts = tuple(prompts)
            if self.panel.prompts() != self.state.prompts:
                self.panel.prompt_edit.setText("; ".join(prompts))
            self.schedule_run()

    def set_query(self, query: int | None) -> None:
        self.state.query = query
        self._update_query_label()
        self.schedule_run()

    def _update_query_label(self) -> None:
        if self.state.query is None:
            self.panel.set_query_text("Query: [CLS] token (click a patch)")
            self.canvas.mark(None)
            return
        layout = self.trace.layout if self.trace is not None else None
        self.panel.set_query_text(f"Query: token {self.state.query}")
        if layout is not None and layout.locate(self.state.query) is not None:
            self.canvas.mark(layout.token_box(self.state.query)[1])

    def _on_canvas_click(self, x: float, y: float) -> None:
        if self.trace is None or self.segmenting:
            return
        token = self.trace.layout.token_at(x, y)
        if token is None:
            self.show_message("That pixel was cropped away by the model's preprocessing: no token covers it.", "info")
            return
        self.set_query(token)

    def _on_colormap(self, name: str) -> None:
        self.state.colormap = name
        self.canvas.set_colormap(name)
        self.compare.set_colormap(name)

    def _on_opacity(self, value: float) -> None:
        self.state.opacity = value
        self.canvas.set_opacity(value)
        self.compare.set_opacity(value)

    # -- running --------------------------------------------------------------------------------
    def target(self) -> Target:
        return Target(prompts=self.state.prompts, query=self.state.query)

    def schedule_run(self) -> None:
        self._rerun.start()

    def run_current(self) -> None:
        """Compute the current method's result: trace on the device thread (cached), then the method."""
        s = self.state
        if s.image is None or s.method_id is None:
            return
        if self.backend is None:
            if not self.runner.busy:
                self.show_message("No model loaded: Model ▸ Load model…", "info")
            return
        info = self.engine.host.method(s.method_id)
        if "vlm" in info.contribution.backends and "clip" not in info.contribution.backends:
            self.run_vlm_method()
            return
        if info.requires("text") and not s.prompts:
            self.show_message(f"{info.title} needs a text prompt: type one in the Target box.", "info")
            return
        params = s.params[s.method_id]
        spec, image, method_id, target = s.model_spec, s.image, s.method_id, self.target()
        self.runner.submit(
            "prepare",
            lambda cancel: self.engine.prepare_job(spec, image, method_id, params, target, cancel),
            description="tracing",
            on_done=lambda out: self._on_prepared(out, method_id, params, target),
            on_error=self._on_run_error,
        )

    def _on_prepared(self, out: tuple[Any, Trace], method_id: str, params: BaseModel, target: Target) -> None:
        backend, trace = out
        self.trace = trace
        if trace.text is not None:
            self.panel.show_tokens(trace.text.prompts, trace.text.tokens)
        self._update_query_label()
        needs_model = self.engine.needs_model(method_id)
        self.runner.submit(
            "method",
            lambda cancel: self.engine.method_job(method_id, trace, params, target, cancel, backend),
            device=needs_model,
            description=self.engine.host.method(method_id).title,
            on_done=self._show_result,
            on_error=self._on_run_error,
        )

    def _show_result(self, result: Result) -> None:
        self.result = result
        self._raster = None
        self.faithfulness.clear()
        entries = []
        if isinstance(result, Heatmap):
            self.canvas.set_heatmap(result, self.state.colormap)
        elif isinstance(result, LabelMap):
            entries = self.canvas.set_labels(result)
        elif isinstance(result, TokenSelection):
            self.canvas.set_selection(result)
        self.canvas.set_opacity(self.state.opacity)
        self.canvas.set_overlay_visible(self.panel.show_overlay.isChecked())
        self.legend.set_entries(entries)
        self._on_region(self.region.box)
        self._region_analysis()
        self._update_query_label()
        if self.message.isVisible() and getattr(self.message, "kind", "") != "warning":
            self.message.hide()
        label = getattr(result, "label", "")
        self.status_text.setText(label)
        self.result_shown.emit(result)

    def _on_run_error(self, exc: BaseException) -> None:
        self.show_error(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

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
        rss = process_rss_bytes()
        cache = self.engine.traces.nbytes
        text = f"RAM {rss / 2**20:.0f} MiB" if rss else ""
        text += f" · cache {cache / 2**20:.0f} MiB"
        self.memory_label.setText(text)

    # -- vision-language model ------------------------------------------------------------------
    def load_vlm(self, spec: str) -> None:
        self.vlm_panel.status.setText(f"loading {spec}…")
        self.runner.submit("vlm-model", lambda cancel: self.engine.backend_job(spec), description="loading VLM",
                           on_done=self._on_vlm_model,
                           on_error=lambda exc: (self.vlm_panel.status.setText(""), self.show_error(f"VLM not loaded: {exc}")))

    def _on_vlm_model(self, backend: Any) -> None:
        self.vlm_backend = backend
        demo = _demo_note(backend.info)
        self.vlm_panel.status.setText(f"{backend.info.name} ({backend.family}) on {backend.info.device}{demo}")

    def ask_vlm(self, spec: str, prompt: str, max_new_tokens: int) -> None:
        """Generate an answer about the current image (device thread), streaming its text."""
        from explorer.plugin_host.vlm import generate_trace_job

        if self.state.image is None:
            self.show_message("Open an image first.", "info")
            return
        if not prompt:
            self.show_message("Type a question or instruction for the VLM.", "info")
            return
        image = self.state.image
        self.vlm_panel.answer.setText("…")
        self.vlm_panel.strip.set_tokens([])

        def job(cancel):
            backend = yield from self.engine.backend_job(spec)
            trace = yield from generate_trace_job(backend, image, prompt, max_new_tokens, cancel)
            return backend, trace

        self.runner.submit("vlm", job, description="generating",
                           on_progress=lambda p: self.vlm_panel.stream(p.message) if p.message else None,
                           on_done=self._on_vlm_answer,
                           on_error=lambda exc: self._on_vlm_error(exc, spec, prompt, max_new_tokens))

    def _on_vlm_error(self, exc: BaseException, spec: str, prompt: str, max_new_tokens: int) -> None:
        """A model that needs its repository's own code is loaded only if the user agrees."""
        if "trust_remote_code" in str(exc) and "trust_remote_code=true" not in spec:
            answer = QMessageBox.question(
                self, "Run the model's own code?",
                f"{spec} ships its own Python code, which would run on this computer. Allow it only if you trust "
                "the repository. Load it with its code?")
            if answer == QMessageBox.StandardButton.Yes:
                sep = "&" if "?" in spec else "?"
                spec = f"{spec}{sep}trust_remote_code=true"
                self.vlm_panel.model_edit.setText(spec)
                self.ask_vlm(spec, prompt, max_new_tokens)
                return
        self._on_run_error(exc)

    def _on_vlm_answer(self, out) -> None:
        backend, trace = out
        self._on_vlm_model(backend)
        self.vlm_trace = trace
        gen = trace.extras["generation"]
        if trace.extras.get("capture_note"):
            self.show_message(trace.extras["capture_note"], "warning")
        self.vlm_panel.answer.setText(gen.text or "(no answer: the model stopped at once)")
        self.vlm_panel.strip.set_tokens(gen.tokens)
        self.result_shown.emit(trace)
        if gen.tokens:
            if self.state.method_id not in {m.id for m in self.engine.host.methods(backend="vlm")}:
                self.set_method("vlm.attention")
            self.vlm_panel.strip.select((0,))

    def _on_vlm_tokens(self, tokens: tuple) -> None:
        self.state.vlm_tokens = tuple(tokens)
        self._show_layer_head_grid()
        info = self.engine.host.method(self.state.method_id) if self.state.method_id else None
        if info is not None and "vlm" in info.contribution.backends:
            self.schedule_run()

    def _show_layer_head_grid(self) -> None:
        trace = self.vlm_trace
        if trace is None or not self.state.vlm_tokens:
            return
        gen = trace.extras["generation"]
        seg = trace.layout.segments[0]
        n0 = seg.n_tokens
        layers = sorted(gen.attention)
        maps = np.stack([np.nanmean(gen.attention[l][list(self.state.vlm_tokens)], 0)[:, :n0] for l in layers])
        self.vlm_panel.grid.show_maps(maps, (seg.rows, seg.cols), self.state.colormap)

    def _on_grid_pick(self, layer: int, head: int) -> None:
        if self.state.method_id != "vlm.attention":
            self.set_method("vlm.attention")
        self.set_params(start_layer=layer, end_layer=layer, head=head)

    def run_vlm_method(self) -> None:
        s = self.state
        trace = self.vlm_trace
        if trace is None or s.image is None or trace.image_sha256 != s.image.sha256:
            self.show_message("Ask the VLM about this image first (the 'Ask a VLM' panel).", "info")
            self.vlm_dock.raise_()
            return
        method_id, params = s.method_id, s.params[s.method_id]
        target = Target(prompts=(trace.extras.get("prompt", ""),), tokens=s.vlm_tokens or (0,))
        backend = self.vlm_backend
        self.runner.submit("method", lambda cancel: self.engine.method_job(method_id, trace, params, target, cancel, backend),
                           device=self.engine.needs_model(method_id), description=self.engine.host.method(method_id).title,
                           on_done=self._show_result, on_error=self._on_run_error)

    # -- SAM regions ------------------------------------------------------------------------------
    def load_sam(self, spec: str) -> None:
        self.regions_panel.status.setText(f"loading {spec}…")
        self.runner.submit("sam-model", lambda cancel: self.engine.backend_job(spec), description="loading SAM",
                           on_done=self._on_sam_model,
                           on_error=lambda exc: (self.regions_panel.status.setText(""), self.show_error(f"SAM not loaded: {exc}")))

    def _on_sam_model(self, backend: Any) -> None:
        self.sam_backend = backend
        demo = _demo_note(backend.info)
        self.regions_panel.status.setText(f"{backend.info.name} on {backend.info.device}{demo}")
        self._embed_current()

    def _embed_current(self) -> None:
        """Compute (or fetch from the caches) the SAM embedding of the current image in the background."""
        if self.sam_backend is None or self.state.image is None:
            return
        backend, image = self.sam_backend, self.state.image
        self.runner.submit("sam-embed", lambda cancel: backend.embedding_job(image, cancel), description="SAM image encoder",
                           on_done=lambda emb: self.regions_panel.status.setText(
                               f"{backend.info.name}: embedding {emb.source}" + (f" in {emb.seconds:.1f} s" if emb.seconds else "")),
                           on_error=self._on_run_error)

    def _set_segmenting(self, on: bool) -> None:
        self.segmenting = bool(on)
        if on and self.sam_backend is None:
            self.load_sam(self.regions_panel.model_edit.text().strip())
        elif on:
            self._embed_current()

    def box_prompt(self) -> None:
        """A box prompt: the first press places a box to adjust, the second segments inside it."""
        if self.state.image is None:
            return
        if self.region.box is None:
            self.box_action.setChecked(True)
            self.show_message("Adjust the box, then press 'Box prompt' again.", "info")
            return
        b = self.region.box
        self.prompt_box = [b.x0, b.y0, b.x1, b.y1]
        if not self.segmenting:
            self.regions_panel.segment_button.setChecked(True)
        self.run_sam()

    def clear_prompt(self) -> None:
        self.prompt_box = None
        self.prompt_points, self.candidates = [], []
        self.canvas.set_points([])
        self.regions_panel.show_candidates(np.zeros((1, 1, 3), np.uint8), [], [], 0)
        self._refresh_regions()

    def _on_prompt_click(self, x: float, y: float, positive: bool) -> None:
        if not self.segmenting or self.state.image is None:
            return
        self.prompt_points.append((x, y, 1 if positive else 0))
        self.canvas.set_points(self.prompt_points)
        self.run_sam()

    def run_sam(self) -> None:
        """Masks for the current points: the embedding comes from the cache after the first click,
        so a click only runs SAM's prompt encoder and mask decoder (device thread)."""
        if self.sam_backend is None:
            self.load_sam(self.regions_panel.model_edit.text().strip())
            return
        backend, image = self.sam_backend, self.state.image
        pts = np.array([[x, y] for x, y, _ in self.prompt_points], dtype=np.float32) if self.prompt_points else None
        labels = np.array([lab for _, _, lab in self.prompt_points], dtype=np.int64) if self.prompt_points else None
        box = None if self.prompt_box is None else np.asarray(self.prompt_box, dtype=np.float32)
        n = 0 if pts is None else len(pts)
        previous = self.candidates[self.candidate].meta.get("logits") if self.candidates and n > 1 else None
        multimask = (n == 1 and box is None) or (n == 0 and box is not None)

        def job(cancel):
            emb = yield from backend.embedding_job(image, cancel)
            return backend.predict(emb, pts, labels, box=box, mask_input=previous, multimask=multimask)

        self.runner.submit("sam-click", job, description="SAM", on_done=self._on_masks, on_error=self._on_run_error)

    def _on_masks(self, masks: list) -> None:
        self.candidates, self.candidate = masks, 0
        self.regions_panel.show_candidates(self.state.image.rgb, [m.mask for m in masks], [m.score for m in masks], 0)
        self._refresh_regions()
        self.result_shown.emit(masks)

    def _choose_candidate(self, i: int) -> None:
        if 0 <= i < len(self.candidates):
            self.candidate = i
            self.regions_panel.show_candidates(self.state.image.rgb, [m.mask for m in self.candidates],
                                               [m.score for m in self.candidates], i)
            self._refresh_regions()

    def add_region(self, name: str | None = None) -> None:
        if not self.candidates or self.regions is None:
            return
        m = self.candidates[self.candidate]
        region = self.regions.add(m.mask, name, score=m.score,
                                  prompt={"points": [list(p) for p in self.prompt_points], "box": self.prompt_box})
        self.region_id = region.id
        self.prompt_points, self.candidates, self.prompt_box = [], [], None
        self.canvas.set_points([])
        self.regions_panel.show_candidates(self.state.image.rgb, [], [], 0)
        self._refresh_regions()
        self.select_region(region.id)

    def _refresh_regions(self) -> None:
        """Draw visible regions (and the chosen candidate) over the image; refill the list."""
        if self.state.image is None or self.regions is None:
            self.canvas.set_region_layer(None)
            return
        from explorer.core.render import category_colors

        H, W = self.state.image.size
        rgba = np.zeros((H, W, 4), dtype=np.uint8)
        colors = category_colors(max(1, len(self.regions)), seed=3)
        for k, r in enumerate(self.regions):
            if r.visible:
                rgba[r.mask, :3] = colors[k]
                rgba[r.mask, 3] = 150 if r.id == self.region_id else 90
        if self.candidates:
            m = self.candidates[self.candidate].mask
            rgba[m] = (66, 133, 244, 140)
        self.canvas.set_region_layer(rgba if rgba[..., 3].any() else None)
        self.regions_panel.set_regions(self.state.image.rgb, list(self.regions), self.region_id)

    def _selected_region_mask(self) -> np.ndarray | None:
        if self.regions is None or self.region_id is None:
            return None
        try:
            return self.regions.get(self.region_id).mask
        except KeyError:
            return None

    def _rename_region(self, rid: int, name: str) -> None:
        try:
            self.regions.rename(rid, name)
        except (ValueError, KeyError) as exc:
            self.show_error(str(exc))
            self._refresh_regions()

    def _region_visibility(self, rid: int, visible: bool) -> None:
        if self.regions is not None and self.regions.get(rid).visible != visible:
            self.regions.set_visible(rid, visible)
            self._refresh_regions()

    def union_regions(self, ids: list[int]) -> None:
        try:
            self.region_id = self.regions.union(ids).id
        except (ValueError, KeyError) as exc:
            self.show_message(f"Union: {exc} (select two or more regions)", "info")
            return
        self._refresh_regions()

    def subtract_regions(self, ids: list[int]) -> None:
        if len(ids) < 2:
            self.show_message("Subtract: select the region to keep first, then the ones to remove.", "info")
            return
        self.region_id = self.regions.subtract(ids[0], ids[1:]).id
        self._refresh_regions()

    def delete_regions(self, ids: list[int]) -> None:
        for i in ids:
            self.regions.remove(i)
        if self.region_id in ids:
            self.region_id = None
        self._refresh_regions()

    def select_region(self, rid: int) -> None:
        if self.regions is None:
            return
        self.region_id = rid
        self.state.region_stats = None
        self._refresh_regions()
        self._region_analysis()

    def _region_analysis(self) -> None:
        """Labels, caption, and what falls inside the selected region: the current map's mass and
        peak, the [CLS] attention share per layer and head, each generated word's share."""
        from explorer.plugin_host.regions import attention_share, kept_inside, map_stats, word_shares

        if self.regions is None or self.region_id is None:
            return
        try:
            r = self.regions.get(self.region_id)
        except KeyError:
            return
        lines = [f"<b>{r.name}</b>: {r.area} px" + (f", SAM score {r.score:.2f}" if r.score is not None else "")]
        if r.caption:
            lines.append(f"caption: <i>{r.caption}</i>")
        if r.labels:
            lines.append("labels: " + ", ".join(f"{n} ({p:.2f})" for n, p in r.labels))
        if isinstance(self.result, Heatmap):
            st = map_stats(self.result, r.mask)
            lines.append(f"map: {100 * st['mass_inside']:.1f}% of the mass inside (region is {100 * st['area_share']:.1f}% "
                         f"of the image), peak {'inside' if st['peak_inside'] else 'outside'}")
            self.state.region_stats = st
        if isinstance(self.result, TokenSelection):
            kept, total = kept_inside(self.result, r.mask)
            lines.append(f"selection keeps {kept} of the region's {total} tokens")
        share = None
        if self.trace is not None and self.trace.attentions and self.trace.attention_rows is None:
            try:
                share = attention_share(self.trace, r.mask)
            except ValueError:
                share = None
        self.regions_panel.show_share(share)
        if self.vlm_trace is not None and self.vlm_trace.image_sha256 == self.state.image.sha256:
            gen = self.vlm_trace.extras["generation"]
            shares = word_shares(self.vlm_trace, r.mask)
            grounded = [f"{gen.tokens[t].strip()} ({v:.2f})" for t, v in enumerate(shares) if v >= 0.5]
            lines.append("words grounding inside: " + (", ".join(grounded) if grounded else "none above 50%"))
            for t, b in enumerate(self.vlm_panel.strip.buttons):
                b.setToolTip(f"{100 * shares[t]:.0f}% of its image attention inside '{r.name}'")
        self.regions_panel.info.setText("<br>".join(lines))

    def label_regions(self, ids: list[int]) -> None:
        """CLIP labels of each region over the chosen vocabulary (device thread)."""
        from explorer.plugin_host.regions import region_labels

        if not ids or self.backend is None or self.backend.kind != "clip":
            self.show_message("Labels need regions and a CLIP model.", "info")
            return
        which = self.regions_panel.vocabulary.currentText()
        custom = [t for t in self.regions_panel.custom_vocabulary.text().split(",") if t.strip()]
        backend, image = self.backend, self.state.image
        masks = {i: self.regions.get(i).mask for i in ids}

        def job(cancel):
            out = {}
            for k, (i, m) in enumerate(masks.items()):
                cancel.raise_if_cancelled()
                yield Progress(k / len(masks), f"labelling region {k + 1}/{len(masks)}")
                out[i] = region_labels(backend, image, m, which, custom)
            return out

        def done(out):
            for i, labels in out.items():
                self.regions.update(i, labels=tuple(labels))
            self._refresh_regions()
            self._region_analysis()
            self.result_shown.emit(out)

        self.runner.submit("labels", job, description="labels", on_done=done, on_error=self._on_run_error)

    def caption_regions(self, ids: list[int]) -> None:
        """VLM captions of each region (crop with context, or the region highlighted)."""
        from explorer.plugin_host.regions import caption_region_job

        if not ids:
            return
        spec = self.vlm_panel.model_edit.text().strip()
        prompt = self.regions_panel.caption_prompt.text().strip() or "describe"
        mode = self.regions_panel.caption_mode.currentText()
        image = self.state.image
        masks = {i: self.regions.get(i).mask for i in ids}

        def job(cancel):
            backend = yield from self.engine.backend_job(spec)
            out = {}
            for k, (i, m) in enumerate(masks.items()):
                cancel.raise_if_cancelled()
                yield Progress(k / len(masks), f"captioning region {k + 1}/{len(masks)}")
                out[i] = yield from caption_region_job(backend, image, m, prompt, mode=mode, cancel=cancel)
            return backend, out

        def done(res):
            backend, out = res
            self._on_vlm_model(backend)
            for i, text in out.items():
                self.regions.update(i, caption=text)
            self._refresh_regions()
            self._region_analysis()
            self.result_shown.emit(out)

        self.runner.submit("captions", job, description="captions", on_done=done, on_error=self._on_run_error)

    def export_regions_dialog(self, kind: str) -> None:
        if self.regions is None or not len(self.regions):
            self.show_message("No regions to export yet.", "info")
            return
        if kind == "coco":
            path, _ = QFileDialog.getSaveFileName(self, "Export regions (COCO RLE)", "regions.json", "JSON (*.json)")
        else:
            path, _ = QFileDialog.getSaveFileName(self, "Export region masks", "regions.zip", "ZIP (*.zip)")
        if path:
            self.export_regions(kind, path)

    def export_regions(self, kind: str, path: str) -> None:
        name = Path(self.state.image_path).name if self.state.image_path else ""
        if kind == "coco":
            self.regions.save_coco(path, file_name=name)
        else:
            self.regions.save_pngs(path)

    # -- analysis -------------------------------------------------------------------------------
    def _on_legend_click(self, index: int) -> None:
        """Label map -> the clicked prompt's own map (one click away)."""
        params = self.state.params.get(self.state.method_id)
        if params is not None and {"output", "prompt_index"} <= set(type(params).model_fields):
            self.set_params(output="map", prompt_index=index)

    def _result_raster(self):
        """The current heatmap rasterised on the image (cached per result)."""
        if not isinstance(self.result, Heatmap) or self.state.image is None:
            return None
        if self._raster is None or self._raster[0] != id(self.result):
            self._raster = (id(self.result), self.result.to_image(self.state.image.size))
        return self._raster[1]

    def region_stats(self) -> dict[str, float] | None:
        box, raster = self.region.box, self._result_raster()
        if box is None or raster is None:
            return None
        return region_stats(raster, box_mask(box, raster.shape))

    def _on_region(self, box) -> None:
        stats = self.region_stats() if box is not None else None
        self.region_label.setText(region_text(stats))
        self.region_label.setVisible(stats is not None)
        if box is None and self.box_action.isChecked():
            self.box_action.setChecked(False)

    def _faithfulness_factory(self, result: Heatmap, trace: Trace):
        from explorer.plugin_host.faithfulness import deletion_insertion_job

        image = self.state.image
        prompt = result.meta.get("prompt") if isinstance(result.meta, dict) else None
        text = None
        if trace.text is not None and trace.text.prompts:
            idx = trace.text.prompts.index(prompt) if prompt in trace.text.prompts else 0
            text = trace.text.embeddings[idx]
        backend = self.backend
        return lambda cancel: deletion_insertion_job(backend, image, result.token_values, text, cancel=cancel)

    def run_faithfulness(self) -> None:
        """Deletion/insertion curves of the current map (device thread, cancellable)."""
        if not isinstance(self.result, Heatmap) or self.result.token_values is None or self.trace is None:
            self.show_message("Run a map method first: faithfulness scores a map over the image tokens.", "info")
            return
        self.faithfulness_dock.show()
        self.runner.submit("faithfulness", self._faithfulness_factory(self.result, self.trace),
                           description="faithfulness",
                           on_done=lambda out: self.faithfulness.show_result(out.curve, out.metrics),
                           on_error=self._on_run_error)

    def _set_compare_mode(self, mode: str) -> None:
        previous = getattr(self, "_compare_mode", None)
        if previous is not None:
            self._compare_checked[previous] = set(self.compare.checked())
        self._compare_mode = mode
        families = REDUCTION_FAMILIES if mode in ("reduction", "vlm") else MAP_FAMILIES
        backend = "vlm" if mode == "vlm" else "clip"
        self.compare.set_methods([m for m in self.engine.host.methods(backend=backend) if m.family in families],
                                 checked=self._compare_checked.get(mode, set()))
        self.compare.set_mode(mode)

    def _reduction_ready(self, method_ids: list[str]) -> bool:
        if not method_ids or self.state.image is None or self.backend is None:
            self.show_message("Open an image, load a model and tick methods to compare.", "info")
            return False
        return True

    def run_compare(self, method_ids: list[str]) -> None:
        """Run several methods on the same image and target into the compare grid."""
        if self.compare.current_mode == "reduction":
            self.run_reduction_compare(method_ids)
            return
        if self.compare.current_mode == "vlm":
            self.run_vlm_pruning_compare(method_ids)
            return
        s = self.state
        if not method_ids or s.image is None or self.backend is None:
            self.show_message("Open an image, load a model and tick methods to compare.", "info")
            return
        host = self.engine.host
        needs_text = [m for m in method_ids if host.method(m).requires("text")]
        if needs_text and not s.prompts:
            self.show_message("Some of these methods need a text prompt: type one in the Target box.", "info")
            return
        params = []
        for mid in method_ids:
            s.params.setdefault(mid, host.make_params(mid))
            params.append(s.params[mid])
        self.compare.prepare(method_ids, s.image.rgb)
        self.compare.set_colormap(s.colormap)
        spec, image, target = s.model_spec, s.image, self.target()
        self.runner.submit("compare:prepare",
                           lambda cancel: self.engine.prepare_job(spec, image, method_ids, params, target, cancel),
                           description="tracing",
                           on_done=lambda out: self._compare_prepared(out, method_ids, params, target),
                           on_error=self._on_run_error)

    def _compare_prepared(self, out, method_ids, params, target) -> None:
        backend, trace = out
        self.trace = trace
        for mid, p in zip(method_ids, params):
            self.runner.submit(
                f"compare:{mid}",
                lambda cancel, mid=mid, p=p: self.engine.timed_method_job(mid, trace, p, target, cancel, backend),
                device=self.engine.needs_model(mid),
                description=self.engine.host.method(mid).title,
                on_done=lambda res, mid=mid: self.compare.show_result(mid, res[0], res[1], self.state.colormap),
                on_error=lambda exc, mid=mid: self.compare.show_error(mid, str(exc)),
            )

    def run_reduction_compare(self, method_ids: list[str]) -> None:
        """Every ticked reduction method executed on the image, with metrics and agreement."""
        from explorer.plugin_host.compare import compare_job

        if not self._reduction_ready(method_ids):
            return
        s = self.state
        self.compare.prepare(method_ids, s.image.rgb)
        params = {m: s.params[m] for m in method_ids if m in s.params}
        keep, layer = self.compare.keep.value(), self.compare.layer.value()
        spec, image = s.model_spec, s.image

        def done(cmp) -> None:
            region = self._selected_region_mask()
            for mid in method_ids:
                if mid in cmp.selections:
                    values = dict(cmp.metrics[mid].values)
                    if region is not None:
                        from explorer.plugin_host.regions import kept_inside

                        values["region_kept"] = kept_inside(cmp.selections[mid], region)
                    self.compare.show_reduction(mid, cmp.selections[mid], values)
                else:
                    self.compare.show_error(mid, cmp.errors.get(mid, "failed"))
            self.compare.show_agreement(method_ids, cmp.agreement, cmp.agreement_kind)
            self.result_shown.emit(cmp)

        self.runner.submit("compare:reduction",
                           lambda cancel: compare_job(self.engine, spec, image, method_ids, params, keep, layer, cancel=cancel),
                           description="token reduction", on_done=done, on_error=self._on_run_error)

    def run_vlm_pruning_compare(self, method_ids: list[str]) -> None:
        """Every ticked VLM pruning method executed on the current answer's prompt (device thread)."""
        from explorer.plugin_host.compare import with_overrides

        trace, backend = self.vlm_trace, self.vlm_backend
        if not method_ids or trace is None or self.state.image is None or trace.image_sha256 != self.state.image.sha256:
            self.show_message("Ask the VLM about this image first, then tick pruning methods.", "info")
            return
        self.compare.prepare(method_ids, self.state.image.rgb)
        keep = self.compare.keep.value()
        params = {m: with_overrides(self.engine, m, self.state.params.get(m), keep=keep) for m in method_ids}
        vlm_target = Target(prompts=(trace.extras.get("prompt", ""),))  # the question (text-guided methods)
        for mid in method_ids:
            self.runner.submit(
                f"compare:{mid}",
                lambda cancel, mid=mid: self.engine.method_job(mid, trace, params[mid], vlm_target, cancel, backend),
                description=self.engine.host.method(mid).title,
                on_done=lambda sel, mid=mid: (self.compare.show_vlm_pruning(mid, sel), self.result_shown.emit(sel)),
                on_error=lambda exc, mid=mid: self.compare.show_error(mid, str(exc)))

    def run_sweep(self, method_ids: list[str]) -> None:
        """Embedding cosine against keep ratio for every ticked reduction method."""
        from explorer.plugin_host.compare import sweep_job

        if not self._reduction_ready(method_ids):
            return
        s = self.state
        params = {m: s.params[m] for m in method_ids if m in s.params}
        layer, spec, image = self.compare.layer.value(), s.model_spec, s.image
        keeps = self.compare.SWEEP_KEEPS
        self.runner.submit("compare:sweep",
                           lambda cancel: sweep_job(self.engine, spec, image, method_ids, keeps, params, layer, cancel=cancel),
                           description="keep-ratio sweep",
                           on_done=lambda res: (self.compare.show_sweep(res, keeps), self.result_shown.emit(res)),
                           on_error=self._on_run_error)

    def score_compare(self, method_ids: list[str]) -> None:
        """Faithfulness AUCs (and the box share) of every compared map into the table."""
        if self.trace is None:
            return
        for mid in method_ids:
            result = self.compare.results.get(mid)
            if not isinstance(result, Heatmap) or result.token_values is None:
                continue
            box = self.region.box
            extra = {}
            if box is not None:
                raster = result.to_image(self.state.image.size)
                extra = {"mass_inside": region_stats(raster, box_mask(box, raster.shape))["mass_inside"]}
            self.runner.submit(f"compare-score:{mid}", self._faithfulness_factory(result, self.trace),
                               description="faithfulness",
                               on_done=lambda out, mid=mid, extra=extra: self.compare.show_scores(
                                   mid, {**out.metrics.values, **extra}),
                               on_error=lambda exc, mid=mid: self.compare.show_error(mid, str(exc)))

    # -- messages and export --------------------------------------------------------------------
    def show_error(self, text: str) -> None:
        log.info("shown error: %s", text)
        self.message.show_message(text, "error")

    def show_message(self, text: str, kind: str = "info") -> None:
        self.message.show_message(text, kind)

    def export_dialog(self) -> None:
        if not isinstance(self.result, Heatmap) or self.state.image is None:
            self.show_message("Nothing to export yet: run a map method first.", "info")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export overlay", "overlay.png", "PNG (*.png);;Raw result (*.npz)")
        if path:
            self.export(path)

    def export(self, path: str) -> None:
        from PIL import Image

        from explorer.core.render import overlay
        from explorer.core.results import save_result

        if path.lower().endswith(".npz"):
            save_result(self.result, path, extra_meta={"model": self.state.model_spec, "method": self.state.method_id})
            return
        hm: Heatmap = self.result
        lo, hi = self.canvas.levels
        rgb = overlay(self.state.image.rgb, hm.to_image(self.state.image.size), self.state.colormap, lo, hi, self.state.opacity)
        Image.fromarray(rgb).save(path)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self._mem_timer.stop()
        self._rerun.stop()
        self.runner.shutdown()
        self.browser.shutdown()
        super().closeEvent(event)
