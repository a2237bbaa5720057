"""The regions panel: SAM prompts and candidates, the region layers, labels and captions, and how
much of a map, of each attention head and of each generated word falls inside a region.

The panel holds widgets only; the window owns the SAM model, the :class:`RegionSet` and runs every
model call on the device thread.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QIcon, QImage, QPixmap
from PySide6.QtWidgets import (
    QComboBox,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from explorer.core.regions import Region
from explorer.core.render import lookup_table
from explorer.plugin_host.regions import VOCABULARIES

from .vlm_panel import model_row

__all__ = ["RegionsPanel", "mask_thumbnail"]

THUMB = 56
LIST_THUMB = 32


def mask_thumbnail(rgb: np.ndarray, mask: np.ndarray, size: int = THUMB, color=(66, 133, 244)) -> QIcon:
    """An icon: the image with the mask tinted, cropped to the mask's box."""
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if rows.size:
        pad = 4
        y0, y1 = max(0, rows[0] - pad), min(mask.shape[0], rows[-1] + 1 + pad)
        x0, x1 = max(0, cols[0] - pad), min(mask.shape[1], cols[-1] + 1 + pad)
    else:
        y0, y1, x0, x1 = 0, mask.shape[0], 0, mask.shape[1]
    crop = rgb[y0:y1, x0:x1].astype(np.float32)
    m = mask[y0:y1, x0:x1, None]
    tinted = np.where(m, crop * 0.45 + np.array(color) * 0.55, crop * 0.6)
    arr = np.ascontiguousarray(np.clip(tinted, 0, 255).astype(np.uint8))
    img = QImage(arr.data, arr.shape[1], arr.shape[0], arr.strides[0], QImage.Format.Format_RGB888).copy()
    return QIcon(QPixmap.fromImage(img).scaled(size, size, Qt.AspectRatioMode.KeepAspectRatio,
                                               Qt.TransformationMode.SmoothTransformation))


class RegionsPanel(QWidget):
    load_requested = Signal(str)
    segment_toggled = Signal(bool)
    clear_prompt = Signal()
    box_requested = Signal()
    candidate_chosen = Signal(int)
    add_requested = Signal()
    union_requested = Signal(list)
    subtract_requested = Signal(list)
    delete_requested = Signal(list)
    renamed = Signal(int, str)
    visibility_changed = Signal(int, bool)
    selected = Signal(int)
    label_requested = Signal(list)
    caption_requested = Signal(list)
    export_requested = Signal(str)  # 'png' or 'coco'

    def __init__(self, parent: QWidget | None = None, default_model: str = "sam:demo") -> None:
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        top = model_row(self, "SAM", default_model, "sam_model",
                        "sam:demo, sam:vit_b (downloads the official checkpoint once), sam:vit_b@/path/ckpt.pth")
        lay.addLayout(top)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        lay.addWidget(self.status)
        seg = QHBoxLayout()
        self.segment_button = QPushButton("Segment (click)")
        self.segment_button.setObjectName("segment_button")
        self.segment_button.setCheckable(True)
        self.segment_button.setToolTip("Click: positive point · Shift-click or right-click: negative point")
        self.segment_button.toggled.connect(self.segment_toggled)
        clear = QPushButton("Clear prompt")
        clear.clicked.connect(self.clear_prompt)
        self.box_button = QPushButton("Box prompt")
        self.box_button.setObjectName("box_prompt")
        self.box_button.setToolTip("Place a box (drag its corners), then press again to segment inside it")
        self.box_button.clicked.connect(self.box_requested)
        seg.addWidget(self.segment_button)
        seg.addWidget(self.box_button)
        seg.addWidget(clear)
        lay.addLayout(seg)
        cand = QHBoxLayout()
        self.candidate_buttons: list[QToolButton] = []
        for i in range(3):
            b = QToolButton()
            b.setCheckable(True)
            b.setIconSize(QSize(THUMB, THUMB))
            b.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextUnderIcon)
            b.clicked.connect(lambda _=False, i=i: self.candidate_chosen.emit(i))
            b.setEnabled(False)
            cand.addWidget(b)
            self.candidate_buttons.append(b)
        self.add_button = QPushButton("Add region")
        self.add_button.setObjectName("add_region")
        self.add_button.setEnabled(False)
        self.add_button.clicked.connect(self.add_requested)
        cand.addWidget(self.add_button)
        lay.addLayout(cand)
        self.list = QListWidget()
        self.list.setObjectName("region_list")
        self.list.setIconSize(QSize(LIST_THUMB, LIST_THUMB))
        self.list.setMinimumHeight(5 * (LIST_THUMB + 8))  # five regions visible at least
        self.list.setSelectionMode(QListWidget.SelectionMode.ExtendedSelection)
        self.list.itemChanged.connect(self._item_changed)
        self.list.currentItemChanged.connect(lambda cur, _: self.selected.emit(cur.data(Qt.ItemDataRole.UserRole))
                                             if cur is not None else None)
        lay.addWidget(self.list, 1)
        ops = QGridLayout()
        buttons = [("Union", lambda: self.union_requested.emit(self.selected_ids())),
                   ("Subtract", lambda: self.subtract_requested.emit(self.selected_ids())),
                   ("Delete", lambda: self.delete_requested.emit(self.selected_ids())),
                   ("Label", lambda: self.label_requested.emit(self.selected_ids())),
                   ("Caption", lambda: self.caption_requested.emit(self.selected_ids())),
                   ("Caption all", lambda: self.caption_requested.emit(self.all_ids())),
                   ("Export PNGs…", lambda: self.export_requested.emit("png")),
                   ("Export COCO…", lambda: self.export_requested.emit("coco"))]
        self.op_buttons = {}
        for k, (text, fn) in enumerate(buttons):
            b = QPushButton(text)
            b.clicked.connect(fn)
            ops.addWidget(b, k // 3, k % 3)  # three a row: the panel fits a 360-pixel dock
            self.op_buttons[text] = b
        lay.addLayout(ops)
        voc = QHBoxLayout()
        self.vocabulary = QComboBox()
        for v in VOCABULARIES:
            self.vocabulary.addItem(v)
        self.vocabulary.setToolTip("Label vocabulary: auto = the scene captions for the demo CLIP, COCO otherwise")
        self.custom_vocabulary = QLineEdit()
        self.custom_vocabulary.setPlaceholderText("custom labels, comma separated")
        voc.addWidget(QLabel("labels"))
        voc.addWidget(self.vocabulary)
        voc.addWidget(self.custom_vocabulary, 1)
        lay.addLayout(voc)
        cap = QHBoxLayout()
        self.caption_prompt = QLineEdit("name the object")
        self.caption_prompt.setToolTip("What the VLM is asked about each region")
        self.caption_mode = QComboBox()
        self.caption_mode.addItems(["crop", "highlight"])
        cap.addWidget(QLabel("caption"))
        cap.addWidget(self.caption_prompt, 1)
        cap.addWidget(self.caption_mode)
        lay.addLayout(cap)
        self.info = QLabel("")
        self.info.setObjectName("region_info")
        self.info.setWordWrap(True)
        self.info.setTextFormat(Qt.TextFormat.RichText)
        lay.addWidget(self.info)
        self.share_plot = pg.PlotWidget()
        self.share_plot.setBackground("#202124")
        self.share_plot.setMinimumHeight(140)
        self.share_plot.setLabel("left", "layer")
        self.share_plot.setLabel("bottom", "head")
        self.share_plot.setTitle("[CLS] attention share inside (0 to 1)")
        self.share_plot.setToolTip("For every layer (rows) and head (columns): the share of the [CLS] token's attention "
                                   "over the image tokens that falls on tokens inside the selected region")
        self.share_plot.getViewBox().invertY(True)
        self.share_item = pg.ImageItem(axisOrder="row-major")
        self.share_plot.addItem(self.share_item)
        self.share_plot.hide()
        lay.addWidget(self.share_plot)

    # -- candidates -------------------------------------------------------------------------------
    def show_candidates(self, rgb: np.ndarray, masks: list[np.ndarray], scores: list[float], chosen: int) -> None:
        for i, b in enumerate(self.candidate_buttons):
            if i < len(masks):
                b.setIcon(mask_thumbnail(rgb, masks[i]))
                b.setText(f"{scores[i]:.2f}")
                b.setEnabled(True)
                b.setChecked(i == chosen)
            else:
                b.setIcon(QIcon())
                b.setText("")
                b.setEnabled(False)
                b.setChecked(False)
        self.add_button.setEnabled(bool(masks))

    # -- the list ---------------------------------------------------------------------------------
    def set_regions(self, rgb: np.ndarray | None, regions: list[Region], current: int | None = None) -> None:
        """Show ``regions``; when the same regions are listed already their items are updated in
        place (an item being edited is never deleted under the user)."""
        self.list.blockSignals(True)
        try:
            same = [self.list.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.list.count())] == [
                r.id for r in regions]
            if not same:
                self.list.clear()
            for k, r in enumerate(regions):
                item = self.list.item(k) if same else QListWidgetItem(r.name)
                if not same:
                    item.setData(Qt.ItemDataRole.UserRole, r.id)
                    item.setFlags(item.flags() | Qt.ItemFlag.ItemIsEditable | Qt.ItemFlag.ItemIsUserCheckable)
                    if rgb is not None:
                        item.setIcon(mask_thumbnail(rgb, r.mask, size=LIST_THUMB))
                    self.list.addItem(item)
                if item.text() != r.name:
                    item.setText(r.name)
                state = Qt.CheckState.Checked if r.visible else Qt.CheckState.Unchecked
                if item.checkState() != state:
                    item.setCheckState(state)
                tip = [f"{r.area} px"] + ([f"score {r.score:.2f}"] if r.score is not None else [])
                if r.caption:
                    tip.append(f"caption: {r.caption}")
                if r.labels:
                    tip.append("labels: " + ", ".join(f"{n} {p:.2f}" for n, p in r.labels))
                item.setToolTip("\n".join(tip))
                if r.id == current and self.list.currentItem() is not item:
                    self.list.setCurrentItem(item)
        finally:
            self.list.blockSignals(False)

    def _item_changed(self, item: QListWidgetItem) -> None:
        rid, text = item.data(Qt.ItemDataRole.UserRole), item.text()
        visible = item.checkState() == Qt.CheckState.Checked
        self.renamed.emit(rid, text)
        self.visibility_changed.emit(rid, visible)

    def selected_ids(self) -> list[int]:
        ids = [it.data(Qt.ItemDataRole.UserRole) for it in self.list.selectedItems()]
        cur = self.list.currentItem()
        if not ids and cur is not None:
            ids = [cur.data(Qt.ItemDataRole.UserRole)]
        return ids

    def all_ids(self) -> list[int]:
        return [self.list.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.list.count())]

    def show_share(self, share: np.ndarray | None) -> None:
        """``share (layers, heads)``: each cell is one head's [CLS] attention share inside the region,
        with integer layer and head ticks at the cells' centres."""
        if share is None:
            self.share_plot.hide()
            return
        L, H = share.shape
        self.share_item.setImage(share.astype(np.float32), levels=(0.0, 1.0), lut=lookup_table("viridis"))
        self.share_item.setRect(0, 0, H, L)
        step_h, step_l = max(1, H // 8), max(1, L // 8)
        self.share_plot.getAxis("bottom").setTicks([[(h + 0.5, str(h)) for h in range(0, H, step_h)]])
        self.share_plot.getAxis("left").setTicks([[(l + 0.5, str(l)) for l in range(0, L, step_l)]])
        self.share_plot.show()
