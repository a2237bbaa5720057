"""Ask a vision-language model; its answer becomes a strip of clickable tokens.

Clicking a token (shift-click for a span, i.e. a word of several tokens) asks the window for that
token's map; a layer x head grid of small maps of the selected token helps pick layers. The
panel holds no model: the window runs generation on the device thread and streams the text in.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from explorer.core.render import lookup_table

__all__ = ["VlmPanel", "TokenStrip", "LayerHeadGrid"]


class _FlowWidget(QWidget):
    """Lays out child buttons in rows (a minimal flow layout)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.rows = QVBoxLayout(self)
        self.rows.setContentsMargins(0, 0, 0, 0)
        self.rows.setSpacing(2)
        self._row: QHBoxLayout | None = None
        self._count = 0

    def clear(self) -> None:
        while self.rows.count():
            item = self.rows.takeAt(0)
            lay = item.layout()
            if lay is not None:
                while lay.count():
                    w = lay.takeAt(0).widget()
                    if w is not None:
                        w.deleteLater()
        self._row = None
        self._count = 0

    def add(self, widget: QWidget, per_row: int = 8) -> None:
        if self._row is None or self._count % per_row == 0:
            self._row = QHBoxLayout()
            self._row.setSpacing(2)
            self._row.addStretch(0)
            self.rows.addLayout(self._row)
        self._row.insertWidget(self._row.count(), widget)
        self._count += 1


class TokenStrip(QWidget):
    """The generated tokens as toggle buttons; ``selection_changed(tuple of token indices)``."""

    selection_changed = Signal(tuple)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.flow = _FlowWidget()
        lay.addWidget(self.flow)
        self.buttons: list[QToolButton] = []
        self.selected: tuple[int, ...] = ()
        self._anchor: int | None = None

    def set_tokens(self, tokens: list[str]) -> None:
        self.flow.clear()
        self.buttons = []
        self.selected = ()
        for i, tok in enumerate(tokens):
            b = QToolButton()
            b.setText(tok.strip() or "␣")
            b.setCheckable(True)
            b.setObjectName(f"token_{i}")
            b.clicked.connect(lambda _=False, i=i: self._clicked(i))
            self.flow.add(b)
            self.buttons.append(b)

    def _clicked(self, i: int) -> None:
        from PySide6.QtWidgets import QApplication

        shift = bool(QApplication.keyboardModifiers() & Qt.KeyboardModifier.ShiftModifier)
        if shift and self._anchor is not None:
            lo, hi = sorted((self._anchor, i))
            self.select(tuple(range(lo, hi + 1)))
        else:
            self._anchor = i
            self.select((i,))

    def select(self, tokens: tuple[int, ...]) -> None:
        self.selected = tuple(t for t in tokens if 0 <= t < len(self.buttons))
        for k, b in enumerate(self.buttons):
            b.setChecked(k in self.selected)
        self.selection_changed.emit(self.selected)


class LayerHeadGrid(pg.GraphicsLayoutWidget):
    """Small maps of the selected token for every (layer, head): rows = layers, columns = heads.
    Clicking a cell emits ``picked(layer, head)``."""

    picked = Signal(int, int)

    def __init__(self, parent: QWidget | None = None, max_cells: int = 1024) -> None:
        super().__init__(parent)
        self.setBackground("#202124")
        self.max_cells = max_cells
        self.items: dict[tuple[int, int], pg.ImageItem] = {}

    def show_maps(self, maps: np.ndarray, grid: tuple[int, int], colormap: str = "viridis") -> None:
        """``maps (L, H, rows*cols)`` of the first segment's grid."""
        self.clear()
        self.items = {}
        L, H, _ = maps.shape
        if L * H > self.max_cells:
            H = max(1, self.max_cells // L)
        lut = lookup_table(colormap)
        rows, cols = grid
        for l in range(L):
            for h in range(H):
                vb = self.addViewBox(row=l, col=h, lockAspect=True, enableMouse=False)
                vb.setMenuEnabled(False)
                vb.invertY(True)
                m = maps[l, h].reshape(rows, cols)
                finite = m[np.isfinite(m)]
                lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
                item = pg.ImageItem(np.nan_to_num(m, nan=lo).astype(np.float32), axisOrder="row-major",
                                    levels=(lo, hi if hi > lo else lo + 1), lut=lut)
                item.mouseClickEvent = lambda ev, l=l, h=h: self.picked.emit(l, h)  # noqa: B023
                vb.addItem(item)
                self.items[(l, h)] = item


class VlmPanel(QWidget):
    """Model spec, question, Generate/Cancel, the streamed answer, the token strip, the grid."""

    generate_requested = Signal(str, str, int)  # model spec, prompt, max new tokens
    load_requested = Signal(str)

    def __init__(self, parent: QWidget | None = None, default_model: str = "vlm:demo",
                 default_prompt: str = "describe the scene") -> None:
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        top = QHBoxLayout()
        self.model_edit = QLineEdit(default_model)
        self.model_edit.setObjectName("vlm_model")
        self.model_edit.setToolTip("vlm:demo, vlm:llava-hf/llava-1.5-7b-hf, vlm:/path/folder (?trust_remote_code=true only "
                                   "for repositories you trust)")
        load = QPushButton("Load")
        load.clicked.connect(lambda: self.load_requested.emit(self.model_edit.text().strip()))
        top.addWidget(QLabel("VLM"))
        top.addWidget(self.model_edit, 1)
        top.addWidget(load)
        lay.addLayout(top)
        ask = QHBoxLayout()
        self.prompt_edit = QLineEdit(default_prompt)
        self.prompt_edit.setObjectName("vlm_prompt")
        self.prompt_edit.returnPressed.connect(self._generate)
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(1, 512)
        self.max_tokens.setValue(32)
        self.max_tokens.setToolTip("Tokens to generate at most")
        self.generate_button = QPushButton("Ask")
        self.generate_button.setObjectName("vlm_generate")
        self.generate_button.clicked.connect(self._generate)
        ask.addWidget(self.prompt_edit, 1)
        ask.addWidget(self.max_tokens)
        ask.addWidget(self.generate_button)
        lay.addLayout(ask)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        lay.addWidget(self.status)
        self.answer = QLabel("")
        self.answer.setObjectName("vlm_answer")
        self.answer.setWordWrap(True)
        self.answer.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay.addWidget(self.answer)
        lay.addWidget(QLabel("Click a token for its map (shift-click: a span):"))
        self.strip = TokenStrip()
        lay.addWidget(self.strip)
        self.grid = LayerHeadGrid()
        self.grid.setMinimumHeight(160)
        lay.addWidget(self.grid, 1)

    def _generate(self) -> None:
        self.generate_requested.emit(self.model_edit.text().strip(), self.prompt_edit.text().strip(),
                                     self.max_tokens.value())

    def stream(self, text: str) -> None:
        self.answer.setText(text)
