"""Tools to judge a map: faithfulness curves, the share of a map inside a drawn box, a legend.

* :class:`FaithfulnessPanel`: deletion and insertion curves (and the random-order baseline)
  plotted with pyqtgraph, AUCs in the legend; the computation is an engine job run on the device
  thread by the window.
* :class:`RegionTool`: a box the user draws on the canvas (a pyqtgraph ROI); the window reports the
  map's mass inside it and whether the map's peak falls inside (pointing game).
* :class:`Legend`: class colours of a label map; clicking a class asks for that prompt's map.
"""

from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtCore import QRectF, Qt, Signal
from PySide6.QtGui import QColor, QIcon, QPixmap
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from explorer.core.layout import Box
from explorer.core.results import Curve, Metrics

__all__ = ["FaithfulnessPanel", "RegionTool", "Legend"]

_PENS = {
    "deletion": pg.mkPen("#e8710a", width=2),
    "insertion": pg.mkPen("#1a73e8", width=2),
    "deletion (random)": pg.mkPen("#e8710a", width=1, style=Qt.PenStyle.DashLine),
    "insertion (random)": pg.mkPen("#1a73e8", width=1, style=Qt.PenStyle.DashLine),
}


class FaithfulnessPanel(QWidget):
    """Plot of deletion/insertion curves with a button that asks for them; the legend sits beside
    the plot, and the summary says what was masked, what is plotted and how to read the AUCs."""

    compute_requested = Signal()
    HELP = ("Deletion: replace the map's most important patches first (lower area = more faithful); insertion: "
            "reveal them first (higher = more faithful); dashed: random orders.")

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        top = QHBoxLayout()
        self.button = QPushButton("Score faithfulness")
        self.button.setObjectName("faithfulness_button")
        self.button.setToolTip("Delete / insert patches in the map's order and recompute the model's score")
        self.button.clicked.connect(self.compute_requested)
        self.summary = QLabel(self.HELP)
        self.summary.setWordWrap(True)
        top.addWidget(self.button)
        top.addWidget(self.summary, 1)
        lay.addLayout(top)
        self.plot_widget = pg.GraphicsLayoutWidget()
        self.plot_widget.setBackground("#202124")
        self.plot = self.plot_widget.addPlot(row=0, col=0)
        self.plot.setLabel("bottom", "fraction of patches replaced / revealed")
        self.plot.setLabel("left", "0 = blank, 1 = full")
        for axis in ("bottom", "left"):
            self.plot.getAxis(axis).enableAutoSIPrefix(False)
        self.plot.showGrid(x=True, y=True, alpha=0.2)
        self.legend = pg.LegendItem()  # its own column: never over the curves
        self.plot_widget.addItem(self.legend, row=0, col=1)
        lay.addWidget(self.plot_widget, 1)
        self.curve: Curve | None = None
        self.metrics: Metrics | None = None

    def clear(self) -> None:
        self.plot.clear()
        self.legend.clear()
        self.curve = None
        self.metrics = None
        self.summary.setText(self.HELP)

    def show_result(self, curve: Curve, metrics: Metrics) -> None:
        self.plot.clear()
        self.legend.clear()
        self.curve, self.metrics = curve, metrics
        m = metrics.values
        for s in curve.series:
            auc = m.get(f"{'random_' if 'random' in s.name else ''}{s.name.split()[0]}_auc")
            name = f"{s.name} (AUC {auc:.3f})" if auc is not None else s.name
            self.legend.addItem(self.plot.plot(s.x, s.y, pen=_PENS.get(s.name, pg.mkPen("w"))), name)
        ranged = curve.meta.get("normalise") == "range"
        self.plot.setLabel("left", "0 = blank, 1 = full" if ranged else "score / unmasked score")
        text = (f"deletion AUC {m['deletion_auc']:.3f} (random {m.get('random_deletion_auc', float('nan')):.3f})")
        if "insertion_auc" in m:
            text += f" · insertion AUC {m['insertion_auc']:.3f} (random {m.get('random_insertion_auc', float('nan')):.3f})"
        text += (". Patches are replaced by the normalisation mean; the score is the prompt's logit (or the cosine "
                 "to the unmasked embedding), ")
        if ranged:
            text += (f"scaled from the blank image's ({m.get('blank_score', float('nan')):.2f}) = 0 to the full "
                     f"image's ({m.get('score', float('nan')):.2f}) = 1.")
            if m.get("blank_score", 0.0) > m.get("score", 0.0):
                text += (f" The blank image scores higher than the image itself ({m['blank_score']:.2f} > {m['score']:.2f}; "
                         "a model can rate an empty input highly, the demo models never saw one), so the curves run "
                         "upside down and the AUCs say nothing about the map for this prompt and model.")
        else:
            text += "divided by the unmasked image's."
            if m.get("score", 1.0) < 0:
                text += (f" The unmasked score is negative ({m['score']:.2f}; CLIP logits have no fixed sign), so the "
                         "division flips the curves and the AUCs are negative.")
        self.summary.setText(text)


class RegionTool:
    """A user-drawn box on a canvas; ``changed(box)`` fires as it moves (``None`` when removed)."""

    def __init__(self, canvas, on_change) -> None:
        self.canvas = canvas
        self.on_change = on_change
        self.roi: pg.RectROI | None = None

    @property
    def box(self) -> Box | None:
        if self.roi is None:
            return None
        pos, size = self.roi.pos(), self.roi.size()
        return Box(float(pos.x()), float(pos.y()), float(pos.x() + size.x()), float(pos.y() + size.y()))

    def start(self) -> None:
        """Place a box in the middle third of the image (the user then moves and resizes it)."""
        if self.canvas.image_size is None:
            return
        self.remove()
        h, w = self.canvas.image_size
        self.roi = pg.RectROI([w / 3, h / 3], [w / 3, h / 3], pen=pg.mkPen("#fbbc04", width=2),
                              maxBounds=QRectF(0, 0, w, h))
        self.roi.setZValue(40)
        self.canvas.view.addItem(self.roi)
        self.roi.sigRegionChanged.connect(lambda *_: self.on_change(self.box))
        self.on_change(self.box)

    def set_box(self, box: Box) -> None:
        if self.roi is None:
            self.start()
        self.roi.setPos((box.x0, box.y0))
        self.roi.setSize((box.width, box.height))

    def remove(self) -> None:
        if self.roi is not None:
            self.canvas.view.removeItem(self.roi)
            self.roi = None
            self.on_change(None)


class Legend(QListWidget):
    """Class names with their colours; ``class_clicked(index)``."""

    class_clicked = Signal(int)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setFlow(QListWidget.Flow.LeftToRight)
        self.setWrapping(True)
        self.setMaximumHeight(64)
        self.setToolTip("Click a class to see its map")
        self.itemClicked.connect(lambda item: self.class_clicked.emit(self.row(item)))
        self.hide()

    def set_entries(self, entries: list[tuple[str, tuple[int, int, int]]]) -> None:
        self.clear()
        for name, rgb in entries:
            pm = QPixmap(12, 12)
            pm.fill(QColor(*rgb))
            self.addItem(QListWidgetItem(QIcon(pm), name))
        self.setVisible(bool(entries))


def region_text(stats: dict[str, float] | None) -> str:
    if stats is None:
        return ""
    peak = "inside" if stats["peak_inside"] else "outside"
    return (f"box: {100 * stats['mass_inside']:.1f}% of the map's mass (box is {100 * stats['area_share']:.1f}% "
            f"of the image); peak {peak}")

