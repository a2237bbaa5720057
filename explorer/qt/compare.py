"""The compare view: a grid of synchronised canvases, one per method, with a metrics table.

Every canvas shows the same image; zoom and pan move together (linked view boxes). The window
fills it: :meth:`CompareView.show_result` puts a method's result in its cell, and the table lists
per method the time it took and, once scored, its faithfulness AUCs.
"""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QLineEdit,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGridLayout,
    QSpinBox,
    QTabWidget,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from explorer.core.results import Heatmap, LabelMap, TokenSelection
from explorer.plugin_host.host import MethodInfo

from .canvas import Canvas

__all__ = ["CompareView"]


class _Cell(QWidget):
    def __init__(self, title: str) -> None:
        super().__init__()
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.setSpacing(1)
        self.title = QLabel(title)
        self.title.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.title.setStyleSheet("font-weight: bold;")
        self.canvas = Canvas()
        self.canvas.colorbar.setVisible(False)
        lay.addWidget(self.title)
        lay.addWidget(self.canvas, 1)


class CompareView(QWidget):
    """Method checklist, a grid of linked canvases and a metrics table."""

    run_requested = Signal(list)  # method ids
    score_requested = Signal(list)
    sweep_requested = Signal(list)
    mode_changed = Signal(str)

    MAP_COLUMNS = ("method", "family", "time (ms)", "deletion AUC", "insertion AUC", "random deletion AUC", "box mass")
    REDUCTION_COLUMNS = ("method", "family", "kept", "cosine", "top-1 agrees", "KL", "MACs ratio", "time (ms)",
                         "speed-up (ideal)", "region tokens kept", "tokens per block")
    VLM_COLUMNS = ("method", "family", "kept", "same answer", "answer", "log p(full answer)", "Δ log p", "prefill (ms)",
                   "image tokens per layer")
    TOKENIZER_COLUMNS = ("method", "tokens", "first k", "PSNR (dB)", "PSNR per region (dB)", "time (ms)")
    COLUMNS = MAP_COLUMNS
    SWEEP_KEEPS = (0.75, 0.5, 0.25, 0.1)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.cells: dict[str, _Cell] = {}
        self.results: dict[str, object] = {}
        self.image = None
        self.colormap = "viridis"
        self.opacity = 0.6
        outer = QVBoxLayout(self)  # (methods | cells) above, the tables and the sweep across the whole width
        top = QWidget()
        top_row = QHBoxLayout(top)
        top_row.setContentsMargins(0, 0, 0, 0)
        side = QVBoxLayout()
        self.mode = QComboBox()
        self.mode.addItem("Maps", "maps")
        self.mode.addItem("Token reduction", "reduction")
        self.mode.addItem("VLM pruning", "vlm")
        self.mode.addItem("Tokenizers", "tokenizers")
        self.mode.currentIndexChanged.connect(lambda _: self.mode_changed.emit(self.mode.currentData()))
        side.addWidget(self.mode)
        side.addWidget(QLabel("Methods to compare"))
        self.methods = QListWidget()
        self.methods.setObjectName("compare_methods")
        self.methods.setMaximumWidth(240)
        side.addWidget(self.methods, 1)
        self.tok_form = QWidget()
        tok = QFormLayout(self.tok_form)
        tok.setContentsMargins(0, 0, 0, 0)
        self.tok_specs: list[QLineEdit] = []
        self.tok_ks: list[QSpinBox] = []
        for name, spec, k in (("A", "tok:demo", 0), ("B", "tok:demo-grid", 0)):
            edit, spin = QLineEdit(spec), QSpinBox()
            spin.setRange(0, 4096)
            spin.setValue(k)
            spin.setSpecialValueText("all")
            spin.setToolTip("Decode the first k tokens only (all: every token)")
            tok.addRow(f"tokenizer {name}", edit)
            tok.addRow(f"first k ({name})", spin)
            self.tok_specs.append(edit)
            self.tok_ks.append(spin)
        side.addWidget(self.tok_form)
        self.tok_form.hide()
        knobs = QFormLayout()
        self.keep = QDoubleSpinBox()
        self.keep.setRange(0.01, 1.0)
        self.keep.setSingleStep(0.05)
        self.keep.setValue(0.5)
        self.keep.setToolTip("Keep ratio for every reduction method")
        self.layer = QSpinBox()
        self.layer.setRange(-64, 64)
        self.layer.setValue(4)
        self.layer.setToolTip("Reduction block for every method (clamped to the model's last block)")
        knobs.addRow("keep", self.keep)
        knobs.addRow("layer", self.layer)
        self.knobs = QWidget()
        self.knobs.setLayout(knobs)
        side.addWidget(self.knobs)
        self.run_button = QPushButton("Compare")
        self.run_button.clicked.connect(lambda: self.run_requested.emit(self.checked()))
        self.score_button = QPushButton("Score faithfulness")
        self.score_button.clicked.connect(lambda: self.score_requested.emit(sorted(self.results)))
        self.sweep_button = QPushButton("Keep-ratio sweep")
        self.sweep_button.clicked.connect(lambda: self.sweep_requested.emit(self.checked()))
        side.addWidget(self.run_button)
        side.addWidget(self.score_button)
        side.addWidget(self.sweep_button)
        top_row.addLayout(side)
        split = QSplitter(Qt.Orientation.Vertical)
        self.grid_host = QWidget()
        self.grid = QGridLayout(self.grid_host)
        self.grid.setContentsMargins(0, 0, 0, 0)
        top_row.addWidget(self.grid_host, 1)
        split.addWidget(top)
        self.bottom = QTabWidget()
        self.table = QTableWidget(0, len(self.COLUMNS))
        self.table.setHorizontalHeaderLabels(self.COLUMNS)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.verticalHeader().setVisible(False)
        self.table.setWordWrap(False)
        self.bottom.addTab(self.table, "Metrics")
        self.agreement = QTableWidget(0, 0)
        self.agreement.setToolTip("IoU of kept sets (pruning pairs) or NMI of groupings (merging pairs)")
        self.bottom.addTab(self.agreement, "Agreement")
        self.sweep_widget = pg.GraphicsLayoutWidget()
        self.sweep_widget.setBackground("#202124")
        self.sweep_plot = self.sweep_widget.addPlot(row=0, col=0)
        self.sweep_plot.setLabel("bottom", "keep ratio (fraction of the image tokens kept)")
        self.sweep_plot.setLabel("left", "embedding cosine to the unreduced model")
        for axis in ("bottom", "left"):
            self.sweep_plot.getAxis(axis).enableAutoSIPrefix(False)  # no "(x0.001)" rescaling of the axes
        self.sweep_plot.showGrid(x=True, y=True, alpha=0.2)
        self.sweep_legend = pg.LegendItem()  # in its own column, beside the data, never over the curves
        self.sweep_widget.addItem(self.sweep_legend, row=0, col=1)
        self.bottom.addTab(self.sweep_widget, "Sweep")
        self.table.setMinimumHeight(6 * 24)  # a header and five rows at least
        self.bottom.setMinimumHeight(6 * 24 + 36)
        split.addWidget(self.bottom)
        split.setSizes([520, 220])
        outer.addWidget(split, 1)
        self.set_mode("maps")
        self._infos: dict[str, MethodInfo] = {}

    # -- methods --------------------------------------------------------------------------------
    def set_methods(self, methods: list[MethodInfo], checked: set[str] | None = None) -> None:
        self.methods.clear()
        self._infos = {m.id: m for m in methods}
        for m in methods:
            item = QListWidgetItem(f"{m.title}  ({m.family})")
            item.setData(Qt.ItemDataRole.UserRole, m.id)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked if checked and m.id in checked else Qt.CheckState.Unchecked)
            self.methods.addItem(item)

    def tokenizer_configs(self) -> list[tuple[str, str, int]]:
        """``(key, spec, k)`` of the tokenizers compared (tokenizers mode): the key names a cell."""
        out = []
        for edit, spin in zip(self.tok_specs, self.tok_ks):
            spec = edit.text().strip()
            if spec:
                k = spin.value()
                key = f"{spec} · {'all tokens' if k == 0 else f'first {k}'}"
                if key not in [o[0] for o in out]:
                    out.append((key, spec, k))
        return out

    def checked(self) -> list[str]:
        if self.current_mode == "tokenizers":
            return [key for key, _, _ in self.tokenizer_configs()]
        out = []
        for i in range(self.methods.count()):
            item = self.methods.item(i)
            if item.checkState() == Qt.CheckState.Checked:
                out.append(item.data(Qt.ItemDataRole.UserRole))
        return out

    def set_checked(self, ids: list[str]) -> None:
        for i in range(self.methods.count()):
            item = self.methods.item(i)
            item.setCheckState(Qt.CheckState.Checked if item.data(Qt.ItemDataRole.UserRole) in ids else Qt.CheckState.Unchecked)

    def set_mode(self, mode: str) -> None:
        """'maps' or 'reduction': which columns, knobs and buttons apply."""
        idx = self.mode.findData(mode)
        if idx >= 0 and idx != self.mode.currentIndex():
            self.mode.setCurrentIndex(idx)
        reduction = mode in ("reduction", "vlm")
        self.COLUMNS = {"reduction": self.REDUCTION_COLUMNS, "vlm": self.VLM_COLUMNS,
                        "tokenizers": self.TOKENIZER_COLUMNS}.get(mode, self.MAP_COLUMNS)
        self.methods.setVisible(mode != "tokenizers")
        self.tok_form.setVisible(mode == "tokenizers")
        self.table.setColumnCount(len(self.COLUMNS))
        self.table.setHorizontalHeaderLabels(self.COLUMNS)
        self.knobs.setVisible(reduction)
        self.sweep_button.setVisible(mode == "reduction")
        self.score_button.setVisible(mode == "maps")
        self.bottom.setTabVisible(1, reduction)
        self.bottom.setTabVisible(2, mode == "reduction")
        tips = {"deletion AUC": "Area under the score while the map's most important patches are removed first "
                                "(score / the unmasked image's score): lower = more faithful. Can be negative when "
                                "the prompt's logit on the image is negative.",
                "insertion AUC": "Area under the score while patches are revealed in the map's order: higher = more "
                                 "faithful.",
                "random deletion AUC": "The same for random orders: what an uninformative map gets.",
                "box mass": "Share of the map's mass inside the drawn box.",
                "speed-up (ideal)": "The executed run's speed-up over the same model's unreduced blocks, the device "
                                    "synchronised; in parentheses the ideal one, 1 / MACs ratio.",
                "cosine": "Cosine of the reduced image embedding to the unreduced one.",
                "KL": "KL divergence of the zero-shot label distribution (unreduced || reduced), in nats.",
                "PSNR (dB)": "Peak signal-to-noise ratio of the reconstruction against the crop the tokenizer "
                             "encoded (higher = closer).",
                "PSNR per region (dB)": "The same inside each region of the Regions dock (pixels the crop cut "
                                        "away do not count)."}
        for i, name in enumerate(self.COLUMNS):
            item = self.table.horizontalHeaderItem(i)
            if item is not None:
                item.setToolTip(tips.get(name, ""))

    @property
    def current_mode(self) -> str:
        return self.mode.currentData()

    # -- grid -----------------------------------------------------------------------------------
    def clear(self) -> None:
        """Remove every cell, row, agreement and sweep line (no comparison shown)."""
        for cell in self.cells.values():
            self.grid.removeWidget(cell)
            cell.hide()  # at once: deleteLater alone leaves the old cell painted until the event loop runs
            cell.setParent(None)
            cell.deleteLater()
        self.cells, self.results = {}, {}
        self.table.clearContents()
        self.table.setRowCount(0)
        self.agreement.clear()
        self.agreement.setRowCount(0)
        self.agreement.setColumnCount(0)
        self.sweep_plot.clear()
        self.sweep_legend.clear()

    def prepare(self, method_ids: list[str], image_rgb) -> None:
        """Lay out one cell per method (the previous comparison removed) showing the image."""
        self.clear()
        self.image = image_rgb
        n = len(method_ids)
        cols = max(1, math.ceil(math.sqrt(n)))
        first = None
        for i, mid in enumerate(method_ids):
            title = self._infos[mid].title if mid in self._infos else mid
            cell = _Cell(title)
            cell.canvas.set_image(image_rgb)
            if first is None:
                first = cell.canvas.view
            else:
                cell.canvas.view.setXLink(first)
                cell.canvas.view.setYLink(first)
            self.grid.addWidget(cell, i // cols, i % cols)
            self.cells[mid] = cell
            self._set_row(mid, {"method": title, "family": self._infos[mid].family if mid in self._infos else ""})
        QTimer.singleShot(0, self.fit)  # once the grid has laid the cells out at their real size

    def fit(self) -> None:
        """Zoom the linked cells so that the whole image fills them."""
        for cell in self.cells.values():
            cell.canvas.view.autoRange(padding=0.02)
            break  # the others follow through the X/Y links

    def show_result(self, method_id: str, result, seconds: float, colormap: str | None = None) -> None:
        cell = self.cells.get(method_id)
        if cell is None:
            return
        self.results[method_id] = result
        if len(self.results) == 1:
            self.fit()
        if isinstance(result, Heatmap):
            cell.canvas.set_heatmap(result, colormap or self.colormap)
            cell.canvas.colorbar.setVisible(False)
            cell.canvas.set_opacity(self.opacity)
        elif isinstance(result, LabelMap):
            cell.canvas.set_labels(result)
        elif isinstance(result, TokenSelection):
            cell.canvas.set_selection(result)
        cell.title.setToolTip(getattr(result, "label", ""))
        self._set_row(method_id, {"time (ms)": f"{1000 * seconds:.1f}"})

    def show_reconstruction(self, key: str, result, metrics: dict) -> None:
        """A tokenizer's reconstruction (tokenizers mode): the decoded image in its cell, PSNR in the table."""
        import numpy as np

        cell = self.cells.get(key)
        if cell is None:
            return
        self.results[key] = result
        cell.canvas.view.setXLink(None)  # each cell shows its own frame (tokenizers differ in size)
        cell.canvas.view.setYLink(None)
        cell.canvas.set_image(np.clip(np.round(result.rgb * 255), 0, 255).astype(np.uint8))
        cell.canvas.view.autoRange(padding=0.02)
        cell.title.setToolTip(result.label)
        regions = metrics.get("region_psnr", {})
        self._set_row(key, {"tokens": f"{int(metrics.get('tokens', 0))}", "first k": str(result.k),
                            "PSNR (dB)": f"{result.psnr:.2f}",
                            "PSNR per region (dB)": "; ".join(f"{n}: {v:.1f}" for n, v in regions.items()) or "–",
                            "time (ms)": f"{1000 * metrics.get('seconds', 0.0):.0f}"})

    def show_reduction(self, method_id: str, selection, metrics: dict[str, float]) -> None:
        """A reduction method's executed selection and what it did to the output."""
        cell = self.cells.get(method_id)
        if cell is None:
            return
        self.results[method_id] = selection
        if len(self.results) == 1:
            self.fit()
        cell.canvas.set_selection(selection)
        blocks = selection.meta.get("tokens_per_block", [])
        self._set_row(method_id, {
            "kept": str(int(metrics["kept"])), "cosine": f"{metrics['cosine']:.4f}",
            "top-1 agrees": "yes" if metrics["top1_agree"] else "no", "KL": f"{metrics['kl']:.4f}",
            "MACs ratio": f"{metrics['macs_ratio']:.2f}", "time (ms)": f"{1000 * metrics['seconds']:.1f}",
            "speed-up (ideal)": (f"{metrics['speedup']:.2f}x ({metrics['ideal_speedup']:.2f}x)" if "speedup" in metrics
                                 else "–"),
            "region tokens kept": (f"{metrics['region_kept'][0]}/{metrics['region_kept'][1]}" if "region_kept" in metrics
                                   else "–"),
            "tokens per block": " ".join(str(b) for b in blocks)})

    def show_vlm_pruning(self, method_id: str, selection) -> None:
        """A VLM pruning method's kept image tokens and what pruning did to the answer."""
        cell = self.cells.get(method_id)
        if cell is None:
            return
        self.results[method_id] = selection
        if len(self.results) == 1:
            self.fit()
        cell.canvas.set_selection(selection)
        m = selection.meta
        cell.title.setToolTip(f"answer: {m['answer']}")
        self._set_row(method_id, {
            "kept": str(m["image_tokens_kept"]), "same answer": "yes" if m["same_answer"] else "no",
            "answer": m["answer"], "log p(full answer)": f"{m['logprob_full_answer_pruned']:.3f}",
            "Δ log p": f"{m['logprob_full_answer_pruned'] - m['logprob_full_answer']:+.3f}",
            "prefill (ms)": f"{1000 * m['prefill_seconds']:.0f}",
            "image tokens per layer": " ".join(str(v) for v in m["image_tokens_per_layer"])})

    def show_agreement(self, method_ids: list[str], values: np.ndarray, kinds: np.ndarray) -> None:
        titles = [self._infos[m].title if m in self._infos else m for m in method_ids]
        self.agreement.setRowCount(len(method_ids))
        self.agreement.setColumnCount(len(method_ids))
        self.agreement.setHorizontalHeaderLabels(titles)
        self.agreement.setVerticalHeaderLabels(titles)
        for i in range(len(method_ids)):
            for j in range(len(method_ids)):
                v, k = values[i, j], kinds[i, j]
                item = QTableWidgetItem("–" if not np.isfinite(v) else f"{v:.2f} {k}")
                if np.isfinite(v):
                    shade = int(40 + 120 * v)
                    item.setBackground(QColor(30, shade, 60))
                self.agreement.setItem(i, j, item)

    def show_sweep(self, results: dict[str, list], keeps=SWEEP_KEEPS) -> None:
        """Embedding cosine against keep ratio, one line per method."""
        from explorer.core.render import category_colors

        self.sweep_plot.clear()
        self.sweep_legend.clear()
        colors = category_colors(len(results))
        for (mid, metrics), color in zip(results.items(), colors):
            pairs = [(k, m.values["cosine"]) for k, m in zip(keeps, metrics) if m is not None]
            title = self._infos[mid].title if mid in self._infos else mid
            rgb = tuple(int(c) for c in color)
            curve = self.sweep_plot.plot([k for k, _ in pairs], [v for _, v in pairs], pen=pg.mkPen(rgb, width=2),
                                         symbol="o", symbolSize=6, symbolBrush=rgb)
            self.sweep_legend.addItem(curve, title)
        self.sweep_plot.setXRange(0.0, 1.0, padding=0.02)
        self.bottom.setCurrentWidget(self.sweep_widget)

    def show_error(self, method_id: str, message: str) -> None:
        cell = self.cells.get(method_id)
        if cell is not None:
            cell.title.setText(f"{cell.title.text()} ⚠")
            cell.title.setToolTip(message)
        self._set_row(method_id, {self.COLUMNS[2]: f"failed: {message}"})

    def show_scores(self, method_id: str, values: dict[str, float]) -> None:
        names = {"deletion_auc": "deletion AUC", "insertion_auc": "insertion AUC",
                 "random_deletion_auc": "random deletion AUC", "mass_inside": "box mass"}
        self._set_row(method_id, {names[k]: f"{v:.3f}" for k, v in values.items() if k in names})

    def _set_row(self, method_id: str, values: dict[str, str]) -> None:
        row = list(self.cells).index(method_id) if method_id in self.cells else None
        if row is None:
            return
        if self.table.rowCount() <= row:
            self.table.setRowCount(row + 1)
        for key, text in values.items():
            if key in self.COLUMNS:  # a value of another mode's table is not shown
                item = QTableWidgetItem(text)
                item.setToolTip(text)
                self.table.setItem(row, self.COLUMNS.index(key), item)
        self.table.resizeColumnsToContents()
        self.table.setColumnWidth(0, min(self.table.columnWidth(0), 190))  # long titles elide; the tooltip has them

    def set_colormap(self, name: str) -> None:
        self.colormap = name
        for cell in self.cells.values():
            cell.canvas.set_colormap(name)

    def set_opacity(self, opacity: float) -> None:
        self.opacity = opacity
        for cell in self.cells.values():
            cell.canvas.set_opacity(opacity)
