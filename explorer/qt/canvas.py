"""The canvas: the image, result overlays drawn through the token layout, a colorbar.

pyqtgraph's fast path for ``ImageItem``: row-major float32 token grids, explicit levels, a
256-entry LUT, and ``setRect`` to stretch each grid segment over its rectangle of the original
image; Qt composites the overlay with the item's opacity. View coordinates are original-image
pixels, ``(x, y)`` with ``y`` down, pixel ``(r, c)`` covering ``[c, c+1) x [r, r+1)``.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QColor, QPen

from explorer.core.layout import Box, TokenLayout
from explorer.core.render import category_colors, colorize, labels_rgba, lookup_table, selection_rgba
from explorer.core.results import Heatmap, LabelMap, TokenSelection

__all__ = ["Canvas", "pg_colormap"]


def pg_colormap(name: str) -> pg.ColorMap:
    """A pyqtgraph ColorMap built from the same LUT the CLI uses (``cmap`` package)."""
    lut = lookup_table(name)
    return pg.ColorMap(pos=np.linspace(0.0, 1.0, len(lut)), color=lut)


class Canvas(pg.GraphicsLayoutWidget):
    """Image + overlays + colorbar. Emits ``clicked(x, y)`` in original-image pixels."""

    clicked = Signal(float, float)
    hovered = Signal(float, float)
    prompt_clicked = Signal(float, float, bool)  # x, y, positive (left click) / negative (shift or right click)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setBackground("#202124")
        self.view = self.addViewBox(row=0, col=0)
        self.view.setAspectLocked(True)
        self.view.invertY(True)
        self.view.setMenuEnabled(False)
        self.image_item = pg.ImageItem(axisOrder="row-major")
        self.view.addItem(self.image_item)
        self.overlay_items: list[pg.ImageItem] = []
        self.colormap_name = "viridis"
        self.opacity = 0.6
        self.levels: tuple[float, float] = (0.0, 1.0)
        self.colorbar = pg.ColorBarItem(values=(0.0, 1.0), colorMap=pg_colormap("viridis"), interactive=False,
                                        width=14, colorMapMenu=False)
        self.addItem(self.colorbar, row=0, col=1)
        self.colorbar.hide()
        self.input_outline = pg.QtWidgets.QGraphicsRectItem()
        self.input_outline.setPen(QPen(QColor(255, 255, 255, 150), 0, Qt.PenStyle.DashLine))
        self.input_outline.setZValue(20)
        self.input_outline.hide()
        self.view.addItem(self.input_outline)
        self.marker = pg.QtWidgets.QGraphicsRectItem()
        self.marker.setPen(QPen(QColor(255, 64, 64), 0))
        self.marker.setZValue(30)
        self.marker.hide()
        self.view.addItem(self.marker)
        self.region_item = pg.ImageItem(axisOrder="row-major")
        self.region_item.setZValue(15)
        self.view.addItem(self.region_item)
        self.points_item = pg.ScatterPlotItem(size=11, pen=pg.mkPen("w", width=1.5))
        self.points_item.setZValue(35)
        self.view.addItem(self.points_item)
        self.image_size: tuple[int, int] | None = None
        self.heatmap: Heatmap | None = None
        self.note = pg.QtWidgets.QLabel(self)
        self.note.setObjectName("canvas_note")
        self.note.setWordWrap(True)
        self.note.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.note.setStyleSheet("background: rgba(32, 33, 36, 215); color: #f1f3f4; padding: 6px 10px; "
                                "border-radius: 4px;")
        self.note.hide()
        self.scene().sigMouseClicked.connect(self._on_click)
        self.scene().sigMouseMoved.connect(self._on_move)

    # -- image ----------------------------------------------------------------------------------
    def set_image(self, rgb: np.ndarray) -> None:
        """Show an ``(H, W, 3)`` uint8 image and reset the view to fit it."""
        h, w = rgb.shape[:2]
        self.image_item.setImage(np.ascontiguousarray(rgb), levels=(0, 255), autoLevels=False)
        self.image_item.setRect(QRectF(0, 0, w, h))
        self.image_size = (h, w)
        self.clear_overlay()
        self.view.autoRange(padding=0.02)

    def clear_image(self) -> None:
        self.image_item.clear()
        self.image_size = None
        self.clear_overlay()
        self.region_item.clear()
        self.points_item.clear()

    # -- a note instead of a map -----------------------------------------------------------------
    def set_note(self, text: str) -> None:
        """Say on the canvas why no map is shown (or ``''`` to hide the note)."""
        if not text:
            self.note.hide()
            return
        self.note.setText(text)
        self._place_note()
        self.note.show()
        self.note.raise_()

    def note_text(self) -> str:
        return self.note.text() if not self.note.isHidden() else ""

    def _place_note(self) -> None:
        width = max(120, min(self.width() - 24, 520))
        self.note.setFixedWidth(width)
        self.note.adjustSize()
        self.note.move((self.width() - width) // 2, 12)

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt override
        super().resizeEvent(event)
        note = getattr(self, "note", None)  # pyqtgraph resizes once inside its own __init__
        if note is not None and not note.isHidden():
            self._place_note()

    # -- overlays -------------------------------------------------------------------------------
    def clear_overlay(self) -> None:
        for item in self.overlay_items:
            self.view.removeItem(item)
        self.overlay_items = []
        self.heatmap = None
        self.colorbar.hide()
        self.input_outline.hide()
        self.marker.hide()

    def _add_grid(self, grid: np.ndarray, rect: Box, lut: np.ndarray | None, levels) -> pg.ImageItem:
        """One overlay item: a float grid through a LUT, or (NaN present / ``lut`` None) an RGBA
        image where NaN cells are transparent. The float grid is kept as ``item.values``."""
        item = pg.ImageItem(axisOrder="row-major")
        grid = np.asarray(grid)
        item.values = grid
        self._paint(item, lut, levels)
        item.setRect(QRectF(rect.x0, rect.y0, rect.width, rect.height))
        item.setOpacity(self.opacity)
        item.setZValue(10)
        self.view.addItem(item)
        self.overlay_items.append(item)
        return item

    def _paint(self, item: pg.ImageItem, lut: np.ndarray | None, levels) -> None:
        grid = item.values
        if grid.ndim == 3:  # already RGBA
            item.setImage(np.ascontiguousarray(grid), levels=None, autoLevels=False)
        elif np.isnan(grid).any():
            rgba = colorize(grid, self.colormap_name, *levels)
            item.setImage(rgba, levels=None, autoLevels=False)
        else:
            item.setImage(np.ascontiguousarray(grid, dtype=np.float32), levels=levels, lut=lut, autoLevels=False)

    def set_heatmap(self, heatmap: Heatmap, colormap: str | None = None, levels: tuple[float, float] | None = None) -> None:
        """Draw a heatmap: one item per grid segment, stretched over its image rectangle."""
        self.clear_overlay()
        self.heatmap = heatmap
        if colormap:
            self.colormap_name = colormap
        self.levels = levels or heatmap.value_range
        lut = lookup_table(self.colormap_name)
        if heatmap.token_values is not None:
            for seg, grid in zip(heatmap.layout.segments, heatmap.grids()):
                self._add_grid(grid, seg.image_rect, lut, self.levels)
        else:
            h, w = heatmap.pixel_values.shape
            self._add_grid(heatmap.pixel_values, Box(0, 0, w, h), lut, self.levels)
        self._show_colorbar()
        self._show_input_outline(heatmap.layout)

    def set_labels(self, labels: LabelMap, alpha: int = 255) -> list[tuple[str, tuple[int, int, int]]]:
        """Draw an open-vocabulary label map (one colour per class, background clear); returns the
        legend entries ``(name, rgb)``."""
        self.clear_overlay()
        n = len(labels.class_names)
        colors = category_colors(n)
        for seg, lab in zip(labels.layout.segments, labels.layout.split(labels.labels)):
            self._add_grid(labels_rgba(lab, n, alpha), seg.image_rect, None, None)
        self._show_input_outline(labels.layout)
        return [(name, tuple(int(v) for v in colors[i])) for i, name in enumerate(labels.class_names)]

    def set_selection(self, selection: TokenSelection, scale: int = 8) -> None:
        """Draw a token selection through the layout: kept tokens clear, dropped ones dimmed,
        fused ones (EViT) tinted, merge groups in distinct colours with borders between groups."""
        self.clear_overlay()
        kept = selection.layout.split(selection.kept)
        groups = selection.layout.split(selection.groups) if selection.groups is not None else [None] * len(kept)
        fused_all = selection.meta.get("fused") if isinstance(selection.meta, dict) else None
        fused = selection.layout.split(np.asarray(fused_all, dtype=bool)) if fused_all is not None else [None] * len(kept)
        for seg, k, g, f in zip(selection.layout.segments, kept, groups, fused):
            item = self._add_grid(selection_rgba(k, g, f, scale=scale), seg.image_rect, None, None)
            item.setOpacity(1.0)
        self._show_input_outline(selection.layout)

    def _show_colorbar(self) -> None:
        cm = pg_colormap(self.colormap_name)
        self.colorbar.setColorMap(cm)
        lo, hi = self.levels
        self.colorbar.setLevels(values=(lo, hi))
        self.colorbar.show()

    def _show_input_outline(self, layout: TokenLayout) -> None:
        """Dashed outline of what the model saw (the crop), when it is not the whole image."""
        if self.image_size is None:
            return
        h, w = self.image_size
        rects = [s.image_rect for s in layout.segments]
        x0, y0 = min(r.x0 for r in rects), min(r.y0 for r in rects)
        x1, y1 = max(r.x1 for r in rects), max(r.y1 for r in rects)
        if abs(x0) < 0.5 and abs(y0) < 0.5 and abs(x1 - w) < 0.5 and abs(y1 - h) < 0.5:
            self.input_outline.hide()
            return
        self.input_outline.setRect(QRectF(x0, y0, x1 - x0, y1 - y0))
        self.input_outline.show()

    def set_colormap(self, name: str) -> None:
        self.colormap_name = name
        if self.heatmap is not None:
            lut = lookup_table(name)
            for item in self.overlay_items:
                self._paint(item, lut, self.levels)
            self._show_colorbar()

    def set_opacity(self, opacity: float) -> None:
        self.opacity = float(opacity)
        for item in self.overlay_items:
            item.setOpacity(self.opacity)

    def set_overlay_visible(self, visible: bool) -> None:
        for item in self.overlay_items:
            item.setVisible(visible)

    def mark(self, box: Box | None) -> None:
        """Outline one token's box (the attention query), or hide the marker."""
        if box is None:
            self.marker.hide()
            return
        self.marker.setRect(QRectF(box.x0, box.y0, box.width, box.height))
        self.marker.show()

    # -- events ---------------------------------------------------------------------------------
    def _to_image(self, scene_pos) -> tuple[float, float] | None:
        if self.image_size is None or not self.view.sceneBoundingRect().contains(scene_pos):
            return None
        p: QPointF = self.view.mapSceneToView(scene_pos)
        h, w = self.image_size
        if 0 <= p.x() < w and 0 <= p.y() < h:
            return float(p.x()), float(p.y())
        return None

    def _on_click(self, event) -> None:
        if event.double():
            return
        xy = self._to_image(event.scenePos())
        if xy is None:
            return
        shift = bool(event.modifiers() & Qt.KeyboardModifier.ShiftModifier)
        if event.button() == Qt.MouseButton.LeftButton:
            self.prompt_clicked.emit(xy[0], xy[1], not shift)
            if not shift:
                self.clicked.emit(*xy)
        elif event.button() == Qt.MouseButton.RightButton:
            self.prompt_clicked.emit(xy[0], xy[1], False)

    # -- regions and prompts ----------------------------------------------------------------------
    def set_region_layer(self, rgba: np.ndarray | None) -> None:
        """Region masks over the image: ``(H, W, 4)`` uint8 at the image size, or ``None``."""
        if rgba is None or self.image_size is None:
            self.region_item.clear()
            return
        h, w = self.image_size
        self.region_item.setImage(np.ascontiguousarray(rgba), levels=None, autoLevels=False)
        self.region_item.setRect(QRectF(0, 0, w, h))

    def set_points(self, points: list[tuple[float, float, int]]) -> None:
        """SAM prompt points ``(x, y, label)``: green for positive, red for negative."""
        spots = [{"pos": (x, y), "brush": pg.mkBrush("#34a853" if lab else "#ea4335"),
                  "symbol": "o" if lab else "x"} for x, y, lab in points]
        self.points_item.setData(spots)

    def _on_move(self, scene_pos) -> None:
        xy = self._to_image(scene_pos)
        if xy is not None:
            self.hovered.emit(*xy)
