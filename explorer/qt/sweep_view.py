"""The Sweep tab: the rows of a sweep's results, sortable and filterable; picking a row asks for
that image with that method and setting on the canvas (``row_picked(position)``).

The table shows the key columns (image, model, method, setting, target) and only the metric
columns that hold a value somewhere; numbers sort as numbers, rows without a value last in either order. The rows are read-only:
the view renders the session model's :class:`~explorer.core.session.SweepResults`.
"""

from __future__ import annotations

import math
from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QSortFilterProxyModel, Qt, Signal
from PySide6.QtWidgets import QHBoxLayout, QLabel, QLineEdit, QTableView, QVBoxLayout, QWidget

__all__ = ["SweepView", "SweepTableModel"]

KEY_COLUMNS = ("image", "method", "setting", "target")
FILTER_ROLE = Qt.ItemDataRole.UserRole + 1  # what the filter searches: the text shown and the raw value


class SweepTableModel(QAbstractTableModel):
    """A pandas DataFrame as a read-only Qt table; ``Qt.UserRole`` gives the sort key."""

    def __init__(self, frame: Any = None, titles: dict[str, str] | None = None) -> None:
        super().__init__()
        self.frame = None
        self.columns: list[str] = []
        self.titles = titles or {}
        if frame is not None:
            self.set_frame(frame)

    def set_frame(self, frame: Any) -> None:
        import numpy as np

        from explorer.sweep.results import METRIC_COLUMNS

        self.beginResetModel()
        self.frame = frame.reset_index(drop=True)
        metrics = [c for c in METRIC_COLUMNS if c in frame and c != "seconds"
                   and np.isfinite(frame[c].to_numpy(dtype=float)).any()]
        extra = [c for c in ("answer", "error") if c in frame and (frame[c] != "").any()]
        tail = [c for c in ("seconds", "model") if c in frame]
        self.columns = [c for c in KEY_COLUMNS if c in frame] + metrics + extra + tail
        self.endResetModel()

    def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: N802 - Qt API
        return 0 if self.frame is None or parent.isValid() else len(self.frame)

    def columnCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: N802 - Qt API
        return 0 if parent.isValid() else len(self.columns)

    def headerData(self, section: int, orientation, role: int = Qt.ItemDataRole.DisplayRole):  # noqa: N802
        if role == Qt.ItemDataRole.DisplayRole and orientation == Qt.Orientation.Horizontal:
            return self.columns[section].replace("_", " ")
        return None

    def value(self, row: int, column: str) -> Any:
        v = self.frame[column].iloc[row]
        return v.item() if hasattr(v, "item") else v

    def data(self, index: QModelIndex, role: int = Qt.ItemDataRole.DisplayRole):
        if not index.isValid() or self.frame is None:
            return None
        col = self.columns[index.column()]
        v = self.value(index.row(), col)
        if role == Qt.ItemDataRole.DisplayRole:
            if isinstance(v, float):
                return "" if math.isnan(v) else f"{v:.4g}"
            if col == "method":
                return self.titles.get(v, v)
            if col == "image":
                return str(v).rsplit("/", 1)[-1]
            if col == "setting":
                from explorer.sweep.results import setting_text

                return setting_text(str(v))
            return str(v)
        if role == Qt.ItemDataRole.ToolTipRole:
            return str(v)
        if role == FILTER_ROLE:
            return f"{self.data(index)} {v}"
        if role == Qt.ItemDataRole.UserRole:  # the sort key: numbers as numbers
            return v if isinstance(v, (int, float)) else str(v)
        return None


class _NumbersLast(QSortFilterProxyModel):
    """Sorts by ``Qt.UserRole`` with rows lacking a value (NaN) after the others in either order."""

    def lessThan(self, left: QModelIndex, right: QModelIndex) -> bool:  # noqa: N802 - Qt API
        a = self.sourceModel().data(left, Qt.ItemDataRole.UserRole)
        b = self.sourceModel().data(right, Qt.ItemDataRole.UserRole)
        a_nan = isinstance(a, float) and math.isnan(a)
        b_nan = isinstance(b, float) and math.isnan(b)
        if a_nan or b_nan:
            if a_nan and b_nan:
                return False
            return a_nan if self.sortOrder() == Qt.SortOrder.DescendingOrder else b_nan
        try:
            return a < b
        except TypeError:
            return str(a) < str(b)


class SweepView(QWidget):
    """See the module docstring."""

    row_picked = Signal(int)  # the row's position in the session model's rows

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        lay = QVBoxLayout(self)
        top = QHBoxLayout()
        self.label = QLabel("File ▸ Open sweep results… shows a sweep's rows here.")
        self.label.setWordWrap(True)
        self.filter = QLineEdit()
        self.filter.setPlaceholderText("filter: text in any column (method, setting, image…)")
        self.filter.setClearButtonEnabled(True)
        top.addWidget(self.label, 1)
        top.addWidget(self.filter, 1)
        lay.addLayout(top)
        self.model = SweepTableModel()
        self.proxy = _NumbersLast(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setFilterKeyColumn(-1)
        self.proxy.setFilterRole(FILTER_ROLE)
        self.proxy.setFilterCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.filter.textChanged.connect(self.proxy.setFilterFixedString)
        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.setSelectionBehavior(QTableView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QTableView.SelectionMode.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.setWordWrap(False)
        self.table.setToolTip("Click a column to sort; double-click a row (or press Enter) to open that image with "
                              "that method and setting on the canvas")
        self.table.doubleClicked.connect(self._picked)
        self.table.activated.connect(self._picked)
        lay.addWidget(self.table, 1)

    def show_results(self, results: Any, titles: dict[str, str]) -> None:
        if results is None:
            self.model.titles = {}
            self.model.set_frame(_empty())
            self.label.setText("File ▸ Open sweep results… shows a sweep's rows here.")
            return
        self.model.titles = titles
        self.model.set_frame(results.rows)
        df = results.rows
        failed = int((df["error"] != "").sum()) if "error" in df else 0
        self.label.setText(f"{results.folder}: {len(df)} rows, {df['item_id'].nunique()} images, "
                           f"{df['method'].nunique()} methods" + (f", {failed} failed" if failed else ""))
        self.table.resizeColumnsToContents()
        for c in range(self.model.columnCount()):
            self.table.setColumnWidth(c, min(self.table.columnWidth(c), 220))

    def sort_by(self, column: str, descending: bool = False) -> None:
        self.table.sortByColumn(self.model.columns.index(column),
                                Qt.SortOrder.DescendingOrder if descending else Qt.SortOrder.AscendingOrder)

    def position_at(self, view_row: int) -> int:
        """The session-model position of the row shown at ``view_row`` (after sorting/filtering)."""
        return self.proxy.mapToSource(self.proxy.index(view_row, 0)).row()

    def _picked(self, index: QModelIndex) -> None:
        if index.isValid():
            self.row_picked.emit(self.proxy.mapToSource(index).row())


def _empty():
    import pandas as pd

    return pd.DataFrame({c: [] for c in KEY_COLUMNS})
