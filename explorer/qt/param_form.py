"""A form generated from a method's pydantic parameter model.

Each field becomes a widget by kind (spin box, check box, combo box, line edit); bounds and help
text come from the model. Fields with ``role`` 'layer' or 'head' are bounded by the loaded model
(layers ``-L..L-1``, heads ``-1..H-1`` where -1 shows as "mean"). The form holds no state of its
own: :meth:`values` reads the widgets, :meth:`set_values` writes them, and every edit emits
``changed`` with the validated parameter object (or shows why it is invalid).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QSpinBox,
    QWidget,
)

from explorer.plugin_host.api import ParamError, ParamField, param_fields, parse_params

__all__ = ["ParamForm"]

_BIG = 1_000_000


class ParamForm(QWidget):
    """Widgets for one parameter model; ``changed(params)`` on every valid edit."""

    changed = Signal(object)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.layout_ = QFormLayout(self)
        self.layout_.setContentsMargins(0, 0, 0, 0)
        self.model: type[BaseModel] | None = None
        self.fields: list[ParamField] = []
        self.widgets: dict[str, QWidget] = {}
        self.error = QLabel()
        self.error.setStyleSheet("color: #d93025;")
        self.error.setWordWrap(True)
        self.error.hide()
        self.n_layers: int | None = None
        self.n_heads: int | None = None
        self._building = False

    def set_model(self, model: type[BaseModel] | None, values: BaseModel | None = None,
                  n_layers: int | None = None, n_heads: int | None = None) -> None:
        """Rebuild the form for ``model`` (``None`` clears it)."""
        self._building = True
        while self.layout_.rowCount():
            self.layout_.removeRow(0)
        self.error = QLabel()
        self.error.setStyleSheet("color: #d93025;")
        self.error.setWordWrap(True)
        self.error.hide()
        self.widgets = {}
        self.model = model
        self.n_layers, self.n_heads = n_layers, n_heads
        self.fields = param_fields(model) if model is not None else []
        for f in self.fields:
            w = self._make_widget(f)
            w.setObjectName(f"param_{f.name}")
            w.setToolTip(f.description)
            self.widgets[f.name] = w
            label = QLabel(f.name.replace("_", " "))
            label.setToolTip(f.description)
            self.layout_.addRow(label, w)
        self.layout_.addRow(self.error)
        if values is not None:
            self.set_values(values)
        self._building = False

    def set_model_limits(self, n_layers: int | None, n_heads: int | None) -> None:
        """Re-bound layer/head fields for a newly loaded model, keeping values."""
        self.n_layers, self.n_heads = n_layers, n_heads
        for f in self.fields:
            w = self.widgets.get(f.name)
            if isinstance(w, QSpinBox) and f.role in ("layer", "head"):
                self._bound_int(w, f)

    # -- widgets --------------------------------------------------------------------------------
    def _bound_int(self, w: QSpinBox, f: ParamField) -> None:
        lo = int(f.minimum) if f.minimum is not None else -_BIG
        hi = int(f.maximum) if f.maximum is not None else _BIG
        if f.role == "layer" and self.n_layers:
            lo, hi = max(lo, -self.n_layers), min(hi, self.n_layers - 1)
        if f.role == "head" and self.n_heads:
            lo, hi = max(lo, -1), min(hi, self.n_heads - 1)
            w.setSpecialValueText("mean" if lo == -1 else "")
        w.setRange(lo, hi)

    def _make_widget(self, f: ParamField) -> QWidget:
        if f.name == "prompt_index" and f.kind == "int":
            w = QComboBox()  # the prompts by name (set_prompts); the value is the index
            w.addItem(f"{int(f.default)}: (type a prompt in the Target box)", int(f.default))
            w.currentIndexChanged.connect(self._emit)
            return w
        small = f.kind == "float" and f.default is not None and float(f.default) != round(float(f.default), 4)
        if (f.optional and f.kind in ("int", "float")) or small:
            # an optional number (empty means None: the method's automatic choice), or a float finer
            # than a spin box's 4 decimals (a tolerance such as 1e-08): typed as text
            w = QLineEdit()
            w.setPlaceholderText("auto (empty)" if f.optional else "a number, e.g. 1e-08")
            w.setText(self._text_of(f.default))
            w.editingFinished.connect(self._emit)
            return w
        if f.kind == "bool":
            w = QCheckBox()
            w.setChecked(bool(f.default))
            w.toggled.connect(self._emit)
            return w
        if f.kind == "int":
            w = QSpinBox()
            self._bound_int(w, f)
            w.setValue(int(f.default))
            w.valueChanged.connect(self._emit)
            return w
        if f.kind == "float":
            w = QDoubleSpinBox()
            w.setDecimals(4)
            lo = f.minimum if f.minimum is not None else -1e6
            hi = f.maximum if f.maximum is not None else 1e6
            w.setRange(float(lo), float(hi))
            span = (hi - lo) if (f.minimum is not None and f.maximum is not None) else 1.0
            w.setSingleStep(max(span / 100.0, 1e-4))
            w.setValue(float(f.default))
            w.valueChanged.connect(self._emit)
            return w
        if f.kind == "choice":
            w = QComboBox()
            for c in f.choices:
                w.addItem(str(c), c)
            w.setCurrentIndex(max(0, list(f.choices).index(f.default)) if f.default in f.choices else 0)
            w.currentIndexChanged.connect(self._emit)
            return w
        w = QLineEdit()
        w.setText(self._text_of(f.default))
        w.editingFinished.connect(self._emit)
        return w

    @staticmethod
    def _text_of(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, (list, tuple)):
            return ", ".join(str(v) for v in value)
        return str(value)

    # -- values ---------------------------------------------------------------------------------
    def raw_values(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in self.fields:
            w = self.widgets[f.name]
            if isinstance(w, QCheckBox):
                out[f.name] = w.isChecked()
            elif isinstance(w, QSpinBox):
                out[f.name] = w.value()
            elif isinstance(w, QDoubleSpinBox):
                out[f.name] = w.value()
            elif isinstance(w, QComboBox):
                out[f.name] = w.currentData()
            else:
                text = w.text().strip()
                out[f.name] = None if (f.optional and not text) else text
        return out

    def values(self) -> BaseModel | None:
        """The validated parameters, or ``None`` (and the reason shown) when invalid."""
        if self.model is None:
            return None
        try:
            params = parse_params(self.model, self.raw_values())
        except ParamError as exc:
            self.error.setText(str(exc))
            self.error.show()
            return None
        self.error.hide()
        return params

    def set_values(self, params: BaseModel) -> None:
        was = self._building
        self._building = True
        try:
            data = params.model_dump()
            for f in self.fields:
                w, v = self.widgets[f.name], data.get(f.name)
                if isinstance(w, QCheckBox):
                    w.setChecked(bool(v))
                elif isinstance(w, QSpinBox):
                    w.setValue(int(v))
                elif isinstance(w, QDoubleSpinBox):
                    w.setValue(float(v))
                elif isinstance(w, QComboBox):
                    idx = w.findData(v)
                    if idx < 0 and f.name == "prompt_index":
                        w.addItem(f"{v}", v)
                        idx = w.count() - 1
                    w.setCurrentIndex(max(idx, 0))
                else:
                    w.setText(self._text_of(v))
        finally:
            self._building = was

    def _emit(self, *_: Any) -> None:
        if self._building:
            return
        params = self.values()
        if params is not None:
            self.changed.emit(params)

    def step(self, role: str, delta: int) -> str | None:
        """Move the first field with ``role`` by ``delta`` (keyboard shortcuts), clamped to its
        range: ``None`` when it moved, else a line saying why not (the window shows it)."""
        for f in self.fields:
            w = self.widgets.get(f.name)
            if f.role == role and isinstance(w, QSpinBox):
                target = w.value() + delta
                if target < w.minimum() or target > w.maximum():
                    end = "first" if target < w.minimum() else "last"
                    shown = w.specialValueText() if w.value() == w.minimum() and w.specialValueText() else w.value()
                    return f"{f.name.replace('_', ' ')} is already the {end} one ({shown})"
                w.setValue(target)
                return None
        return f"this method has no {role} to step"

    def set_prompts(self, prompts: tuple[str, ...]) -> None:
        """Name the prompts in a ``prompt_index`` field (a choice of the typed prompts, not a bare number)."""
        w = self.widgets.get("prompt_index")
        if not isinstance(w, QComboBox):
            return
        was = self._building
        self._building = True
        try:
            current = max(0, w.currentIndex())
            w.clear()
            names = list(prompts) or ["(type a prompt in the Target box)"]
            for i, p in enumerate(names):
                w.addItem(f"{i}: {p}", i)
            w.setCurrentIndex(min(current, w.count() - 1))
        finally:
            self._building = was
