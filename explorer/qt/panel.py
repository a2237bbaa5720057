"""The method panel: method choice, its generated parameter form, prompts, query, display."""

from __future__ import annotations

import html

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QStandardItemModel
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from explorer.core.render import DIVERGING_COLORMAPS, SEQUENTIAL_COLORMAPS
from explorer.plugin_host.host import MethodInfo

from .param_form import ParamForm

__all__ = ["MethodPanel", "split_prompts", "is_unknown_token"]


UNKNOWN_TOKENS = ("<unk>", "[UNK]", "<|unk|>", "<UNK>")


def is_unknown_token(token: str) -> bool:
    """True for a tokenizer's unknown-word token (the word is lost to the model)."""
    return token.strip() in UNKNOWN_TOKENS


def split_prompts(text: str) -> tuple[str, ...]:
    """Prompts typed as ``a red circle; a blue square`` (``;`` or newlines separate them)."""
    parts = [p.strip() for chunk in text.splitlines() for p in chunk.split(";")]
    return tuple(p for p in parts if p)


class MethodPanel(QWidget):
    method_changed = Signal(str)
    prompts_changed = Signal(tuple)
    reset_query = Signal()
    colormap_changed = Signal(str)
    opacity_changed = Signal(float)
    overlay_toggled = Signal(bool)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.methods: list[MethodInfo] = []
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)

        box = QGroupBox("Method")
        bl = QVBoxLayout(box)
        self.method_combo = QComboBox()
        self.method_combo.setObjectName("method_combo")
        self.method_combo.currentIndexChanged.connect(self._on_method)
        bl.addWidget(self.method_combo)
        self.about = QLabel()
        self.about.setWordWrap(True)
        self.about.setTextFormat(Qt.TextFormat.RichText)
        self.about.setOpenExternalLinks(True)
        self.about.setStyleSheet("color: palette(mid); font-size: 11px;")
        bl.addWidget(self.about)
        self.form = ParamForm()
        bl.addWidget(self.form)
        lay.addWidget(box)

        tbox = QGroupBox("Target")
        tl = QVBoxLayout(tbox)
        self.prompt_edit = QLineEdit()
        self.prompt_edit.setObjectName("prompt_edit")
        self.prompt_edit.setPlaceholderText("text prompts, separated by ;")
        self.prompt_edit.editingFinished.connect(self._on_prompts)
        tl.addWidget(self.prompt_edit)
        self.tokens_label = QLabel()
        self.tokens_label.setWordWrap(True)
        self.tokens_label.setTextFormat(Qt.TextFormat.RichText)
        tl.addWidget(self.tokens_label)
        ql = QHBoxLayout()
        self.query_label = QLabel("Query: [CLS] token (click a patch)")
        self.query_label.setObjectName("query_label")
        ql.addWidget(self.query_label, 1)
        reset = QPushButton("[CLS]")
        reset.setToolTip("Use the [CLS] token as the query again")
        reset.clicked.connect(self.reset_query)
        ql.addWidget(reset)
        tl.addLayout(ql)
        lay.addWidget(tbox)

        dbox = QGroupBox("Display")
        dl = QFormLayout(dbox)
        self.cmap_combo = QComboBox()
        for name in SEQUENTIAL_COLORMAPS + DIVERGING_COLORMAPS:
            self.cmap_combo.addItem(name)
        self.cmap_combo.currentTextChanged.connect(self.colormap_changed)
        dl.addRow("colormap", self.cmap_combo)
        self.opacity = QSlider(Qt.Orientation.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(60)
        self.opacity.valueChanged.connect(lambda v: self.opacity_changed.emit(v / 100.0))
        dl.addRow("opacity", self.opacity)
        self.show_overlay = QCheckBox("show overlay (Space)")
        self.show_overlay.setChecked(True)
        self.show_overlay.toggled.connect(self.overlay_toggled)
        dl.addRow(self.show_overlay)
        lay.addWidget(dbox)
        lay.addStretch(1)

    # -- methods --------------------------------------------------------------------------------
    def set_methods(self, methods: list[MethodInfo], errors: list[tuple[str, str]] = ()) -> None:
        """Fill the method list grouped by family; broken plugins appear disabled with their error."""
        self.method_combo.blockSignals(True)
        self.method_combo.clear()
        self.methods = []
        model: QStandardItemModel = self.method_combo.model()
        family = None
        for info in methods:
            if info.family != family:
                family = info.family
                self.method_combo.addItem(f"— {family} —")
                model.item(self.method_combo.count() - 1).setEnabled(False)
                self.methods.append(None)  # type: ignore[arg-type]
            self.method_combo.addItem(info.title, info.id)
            self.methods.append(info)
        for name, err in errors:
            self.method_combo.addItem(f"⚠ {name} (failed)")
            item = model.item(self.method_combo.count() - 1)
            item.setEnabled(False)
            item.setToolTip(err)
            self.methods.append(None)  # type: ignore[arg-type]
        self.method_combo.blockSignals(False)

    def select_method(self, method_id: str) -> None:
        idx = self.method_combo.findData(method_id)
        if idx >= 0:
            self.method_combo.setCurrentIndex(idx)

    def current_method(self) -> str | None:
        return self.method_combo.currentData()

    def _on_method(self, index: int) -> None:
        method_id = self.method_combo.itemData(index)
        if method_id:
            self.method_changed.emit(method_id)

    def describe(self, info: MethodInfo | None) -> None:
        if info is None:
            self.about.setText("")
            return
        c = info.contribution
        parts = [html.escape(c.description)] if c.description else []
        if c.citation:
            parts.append(f"<i>{html.escape(c.citation)}</i>")
        if c.repository:
            parts.append(f'<a href="{html.escape(c.repository)}">{html.escape(c.repository)}</a>')
        if c.adaptation:
            parts.append(f"<b>Adaptation:</b> {html.escape(c.adaptation)}")
        self.about.setText("<br>".join(parts))

    # -- prompts --------------------------------------------------------------------------------
    def prompts(self) -> tuple[str, ...]:
        return split_prompts(self.prompt_edit.text())

    def _on_prompts(self) -> None:
        self.prompts_changed.emit(self.prompts())

    def show_tokens(self, prompts: tuple[str, ...], tokens: tuple[tuple[str, ...], ...]) -> list[str]:
        """The prompts' tokens as chips; tokens the model cannot represent (``<unk>``) in red.
        Returns the prompts that have such tokens."""
        rows, unknown = [], []
        for p, toks in zip(prompts, tokens):
            chips = []
            for t in toks:
                bad = is_unknown_token(t)
                color = "#a50e0e" if bad else "#3c4043"
                chips.append(f'<span style="background:{color};color:#e8eaed;padding:1px 3px;">{html.escape(t)}</span>')
            if any(is_unknown_token(t) for t in toks):
                unknown.append(p)
            rows.append(f"{html.escape(p)}: {' '.join(chips)}")
        self.tokens_label.setText("<br>".join(rows))
        self.tokens_label.setToolTip("Red: words the model's tokenizer does not know; the model sees them as one "
                                     "'unknown' token" if unknown else "")
        return unknown

    def set_query_text(self, text: str) -> None:
        self.query_label.setText(text)
