"""Ask a vision-language model; its answer becomes a strip of clickable tokens.

Clicking a token (shift-click for a span, i.e. a word of several tokens) asks the window for that
token's map; a layer x head grid of small maps of the selected token helps pick layers. The
panel holds no model: the window runs generation on the device thread and streams the text in.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPoint, QRect, QSize, Qt, Signal
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from explorer.core.render import lookup_table

__all__ = ["model_row", "VlmPanel", "TokenStrip", "LayerHeadGrid"]



def model_row(panel: QWidget, label: str, default_model: str, name: str, tooltip: str) -> QHBoxLayout:
    """The ``label [spec] [Load]`` row of a model dock: sets ``panel.model_edit`` and emits
    ``panel.load_requested(spec)`` on Load."""
    row = QHBoxLayout()
    panel.model_edit = QLineEdit(default_model)
    panel.model_edit.setObjectName(name)
    panel.model_edit.setToolTip(tooltip)
    load = QPushButton("Load")
    load.clicked.connect(lambda: panel.load_requested.emit(panel.model_edit.text().strip()))
    row.addWidget(QLabel(label))
    row.addWidget(panel.model_edit, 1)
    row.addWidget(load)
    return row

class FlowLayout(QLayout):
    """Lays out its widgets left to right and wraps them onto new rows at the layout's width (Qt's
    flow layout example): token buttons never overlap, whatever the dock's width."""

    def __init__(self, parent: QWidget | None = None, spacing: int = 3) -> None:
        super().__init__(parent)
        self._items: list = []
        self._spacing = spacing
        self.setContentsMargins(0, 0, 0, 0)

    def addItem(self, item) -> None:  # noqa: N802 - Qt override
        self._items.append(item)

    def count(self) -> int:
        return len(self._items)

    def itemAt(self, i: int):  # noqa: N802 - Qt override
        return self._items[i] if 0 <= i < len(self._items) else None

    def takeAt(self, i: int):  # noqa: N802 - Qt override
        return self._items.pop(i) if 0 <= i < len(self._items) else None

    def expandingDirections(self):  # noqa: N802 - Qt override
        return Qt.Orientation(0)

    def hasHeightForWidth(self) -> bool:  # noqa: N802 - Qt override
        return True

    def heightForWidth(self, width: int) -> int:  # noqa: N802 - Qt override
        return self._arrange(QRect(0, 0, width, 0), move=False)

    def setGeometry(self, rect: QRect) -> None:  # noqa: N802 - Qt override
        super().setGeometry(rect)
        self._arrange(rect, move=True)

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt override
        return self.minimumSize()

    def minimumSize(self) -> QSize:  # noqa: N802 - Qt override
        size = QSize()
        for item in self._items:
            size = size.expandedTo(item.minimumSize())
        return size

    def _arrange(self, rect: QRect, move: bool) -> int:
        x, y, row_h = rect.x(), rect.y(), 0
        for item in self._items:
            hint = item.sizeHint()
            if x + hint.width() > rect.right() and row_h > 0:
                x, y, row_h = rect.x(), y + row_h + self._spacing, 0
            if move:
                item.setGeometry(QRect(QPoint(x, y), hint))
            x += hint.width() + self._spacing
            row_h = max(row_h, hint.height())
        return y + row_h - rect.y()


class _FlowWidget(QWidget):
    """A widget whose children flow in rows (:class:`FlowLayout`)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.flow = FlowLayout(self)

    def clear(self) -> None:
        while self.flow.count():
            item = self.flow.takeAt(0)
            w = item.widget() if item is not None else None
            if w is not None:
                w.hide()
                w.deleteLater()

    def add(self, widget: QWidget) -> None:
        self.flow.addWidget(widget)


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
        self._texts = list(tokens)
        for i, tok in enumerate(tokens):
            b = QToolButton()
            b.setText(tok.strip() or "␣")
            b.setCheckable(True)
            b.setObjectName(f"token_{i}")
            b.clicked.connect(lambda _=False, i=i: self._clicked(i))
            self.flow.add(b)
            self.buttons.append(b)

    def token_texts(self) -> list[str]:
        """The tokens shown (as given to :meth:`set_tokens`)."""
        return list(getattr(self, "_texts", []))

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

    def show_maps(self, maps: np.ndarray, grid: tuple[int, int], colormap: str = "viridis",
                  layers: list[int] | None = None) -> None:
        """``maps (L, H, rows*cols)`` of the first segment's grid; ``layers`` names the rows (the
        LLM layers kept), the columns are heads. Rows and columns are labelled."""
        self.clear()
        self.items = {}
        L, H, _ = maps.shape
        if L * H > self.max_cells:
            H = max(1, self.max_cells // L)
        layers = list(layers) if layers is not None else list(range(L))
        lut = lookup_table(colormap)
        rows, cols = grid
        style = {"color": "#bdc1c6", "size": "8pt"}
        self.addLabel("", row=0, col=0)
        for h in range(H):
            self.addLabel(f"h{h}", row=0, col=h + 1, **style)
        for l in range(L):
            self.addLabel(f"L{layers[l]}", row=l + 1, col=0, **style)
            for h in range(H):
                vb = self.addViewBox(row=l + 1, col=h + 1, lockAspect=True, enableMouse=False)
                vb.setMenuEnabled(False)
                vb.invertY(True)
                m = maps[l, h].reshape(rows, cols)
                finite = m[np.isfinite(m)]
                lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
                item = pg.ImageItem(np.nan_to_num(m, nan=lo).astype(np.float32), axisOrder="row-major",
                                    levels=(lo, hi if hi > lo else lo + 1), lut=lut)
                item.mouseClickEvent = lambda ev, l=layers[l], h=h: self.picked.emit(l, h)  # noqa: B023
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
        lay.addLayout(model_row(self, "VLM", default_model, "vlm_model",
                                "vlm:demo, vlm:llava-hf/llava-1.5-7b-hf, vlm:/path/folder (?trust_remote_code=true "
                                "only for repositories you trust)"))
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
        hint = QLabel("Click a token for its map (shift-click: a span). Below, rows L = LLM layers, columns h = heads:")
        hint.setWordWrap(True)
        lay.addWidget(hint)
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
