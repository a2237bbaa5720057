"""The Tokenizer dock: load an image tokenizer, encode the current image, see the reconstruction
beside the model's input, move the prefix slider, click tokens for their maps, swap tokens in
from another image, and rank the tokens by a region.

Widgets only: the :class:`~explorer.qt.controllers.tokenizer.TokenizerController` renders the
session model into them and turns their signals into jobs.
"""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QImage, QPixmap
from PySide6.QtWidgets import (QComboBox, QGridLayout, QHBoxLayout, QLabel, QLineEdit, QPushButton, QSlider,
                               QVBoxLayout, QWidget)

from .vlm_panel import TokenStrip, model_row

__all__ = ["TokenizerPanel", "MAP_METHODS", "rgb_pixmap"]

# the strip's click shows one of these maps (method id, label)
MAP_METHODS = (("tok.influence", "influence (decode without it)"), ("tok.attention", "encoder attention"),
               ("tok.gradient", "gradient"))


def rgb_pixmap(rgb01: np.ndarray, size: int = 150) -> QPixmap:
    """A ``(S, S, 3)`` image in [0, 1] as a pixmap ``size`` pixels wide (nearest: pixels stay visible)."""
    a = np.ascontiguousarray(np.clip(np.round(np.asarray(rgb01) * 255), 0, 255).astype(np.uint8))
    h, w = a.shape[:2]
    img = QImage(a.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()
    return QPixmap.fromImage(img).scaled(size, size, Qt.AspectRatioMode.KeepAspectRatio,
                                         Qt.TransformationMode.FastTransformation)


class _Picture(QLabel):
    def __init__(self, caption: str) -> None:
        super().__init__()
        self.caption = caption
        self.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.setMinimumSize(150, 150)
        self.setStyleSheet("background: #202124; color: #9aa0a6;")
        self.setText(caption)
        self.rgb: np.ndarray | None = None

    def show_rgb(self, rgb: np.ndarray | None) -> None:
        self.rgb = None if rgb is None else np.asarray(rgb)
        if rgb is None:
            self.clear()
            self.setText(self.caption)
        else:
            self.setPixmap(rgb_pixmap(rgb, max(150, min(self.width(), self.height()))))


class TokenizerPanel(QWidget):
    """See the module docstring."""

    load_requested = Signal(str)
    encode_requested = Signal()
    prefix_changed = Signal(int)
    map_method_changed = Signal(str)
    swap_requested = Signal(str, str)  # other image path, tokens ("0-7,12")
    rank_requested = Signal()
    codebook_requested = Signal()

    def __init__(self, parent: QWidget | None = None, default_model: str = "tok:demo") -> None:
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        top = model_row(self, "Tokenizer", default_model, "tokenizer_model",
                        "tok:demo (1D, ordered), tok:demo-grid (grid VQ), tok:/folder with config.json and "
                        "model.safetensors (official TiTok releases), tok:org/name on the Hugging Face hub")
        self.encode_button = QPushButton("Encode image")
        self.encode_button.setObjectName("tokenizer_encode")
        self.encode_button.clicked.connect(self.encode_requested)
        lay.addLayout(top)
        lay.addWidget(self.encode_button)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        lay.addWidget(self.status)
        pics = QGridLayout()
        self.input_view = _Picture("input (the crop the model encodes)")
        self.recon_view = _Picture("reconstruction")
        pics.addWidget(self.input_view, 0, 0)
        pics.addWidget(self.recon_view, 0, 1)
        self.input_caption = QLabel("input")
        self.recon_caption = QLabel("reconstruction")
        for c in (self.input_caption, self.recon_caption):
            c.setAlignment(Qt.AlignmentFlag.AlignCenter)
            c.setWordWrap(True)
        pics.addWidget(self.input_caption, 1, 0)
        pics.addWidget(self.recon_caption, 1, 1)
        lay.addLayout(pics)
        pre = QHBoxLayout()
        self.prefix_label = QLabel("prefix: all tokens")
        self.prefix = QSlider(Qt.Orientation.Horizontal)
        self.prefix.setObjectName("tokenizer_prefix")
        self.prefix.setRange(1, 1)
        self.prefix.setToolTip("Decode the first k tokens only (the rest stand aside): ordered tokenizers carry the "
                               "coarse content in their first tokens")
        self.prefix.valueChanged.connect(self.prefix_changed)
        pre.addWidget(self.prefix_label)
        pre.addWidget(self.prefix, 1)
        lay.addLayout(pre)
        row = QHBoxLayout()
        pick = QLabel("A token's map:")
        pick.setToolTip("Click a token in the strip (shift-click: a span) to draw this map of it on the canvas")
        row.addWidget(pick)
        self.map_method = QComboBox()
        for mid, label in MAP_METHODS:
            self.map_method.addItem(label, mid)
        self.map_method.currentIndexChanged.connect(lambda _: self.map_method_changed.emit(self.map_method.currentData()))
        row.addWidget(self.map_method, 1)
        lay.addLayout(row)
        self.strip = TokenStrip()
        lay.addWidget(self.strip)
        swap = QHBoxLayout()
        self.swap_image = QLineEdit()
        self.swap_image.setPlaceholderText("another image's file (default: the image shown before)")
        self.swap_tokens = QLineEdit()
        self.swap_tokens.setPlaceholderText("tokens, e.g. 0-7 (empty: the picked)")
        swap_button = QPushButton("Swap in")
        swap_button.setToolTip("Decode this image with these tokens taken from the other image")
        swap_button.clicked.connect(lambda: self.swap_requested.emit(self.swap_image.text().strip(),
                                                                     self.swap_tokens.text().strip()))
        lay.addWidget(self.swap_image)
        swap.addWidget(self.swap_tokens, 1)
        swap.addWidget(swap_button)
        lay.addLayout(swap)
        self.rank_button = QPushButton("Rank tokens by the region")
        self.rank_button.setToolTip("For each token, the share of its influence inside the region selected in the "
                                    "Regions dock (or the box drawn with Analysis ▸ Draw a box)")
        self.rank_button.clicked.connect(self.rank_requested)
        lay.addWidget(self.rank_button)
        self.ranking = QLabel("")
        self.ranking.setWordWrap(True)
        lay.addWidget(self.ranking)
        self.codebook_button = QPushButton("Codebook usage of the folder")
        self.codebook_button.setObjectName("tokenizer_codebook")
        self.codebook_button.setToolTip("Encode every image of the folder open in the browser: how often each code is "
                                        "used, the dead codes, and where each code's tokens land on average (the "
                                        "picked token's code is drawn on the canvas)")
        self.codebook_button.clicked.connect(self.codebook_requested)
        lay.addWidget(self.codebook_button)
        self.histogram = QLabel()
        self.histogram.setObjectName("tokenizer_histogram")
        self.histogram.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.histogram.setToolTip("Tokens per code, in code order (log scale); orange: this image's codes; red ticks: "
                                  "dead codes")
        self.histogram.hide()
        lay.addWidget(self.histogram)
        self.codebook_text = QLabel("")
        self.codebook_text.setWordWrap(True)
        lay.addWidget(self.codebook_text)
        lay.addStretch(1)

    def set_tokens(self, ids: list[int], ordered: bool) -> None:
        self.strip.set_tokens([f"{i}:{c}" for i, c in enumerate(ids)])
        self.prefix.blockSignals(True)
        self.prefix.setRange(1, max(1, len(ids)))
        self.prefix.setValue(max(1, len(ids)))
        self.prefix.blockSignals(False)
        self.prefix.setEnabled(bool(ids))
        self.prefix_label.setText(f"prefix: all {len(ids)} tokens" + ("" if ordered or not ids else " (not ordered)"))

    def show_usage(self, usage) -> None:
        """A :class:`~explorer.core.results.CodebookUsage` as a histogram and a line (None: hide)."""
        if usage is None:
            self.histogram.hide()
            self.histogram.clear()
            self.codebook_text.setText("")
            return
        from explorer.core.render import usage_histogram

        rgb = usage_histogram(usage.counts, highlight=usage.ids, size=(90, 360))
        self.histogram.setPixmap(QPixmap.fromImage(QImage(np.ascontiguousarray(rgb).data, rgb.shape[1], rgb.shape[0],
                                                          3 * rgb.shape[1], QImage.Format.Format_RGB888).copy()))
        self.histogram.show()
        K, dead = len(usage.counts), len(usage.dead)
        skipped = f"; {len(usage.skipped)} file(s) skipped" if usage.skipped else ""
        self.codebook_text.setText(f"{usage.images} images, {int(usage.counts.sum())} tokens: {K - dead} of {K} codes "
                                   f"used, {dead} dead, perplexity {usage.perplexity:.1f}{skipped}")
        self.codebook_text.setToolTip("\n".join(usage.skipped[:20]))

    def show_scores(self, scores: np.ndarray | None) -> None:
        """Tint the token buttons by a score in [0, 1] (a region ranking) and list the best."""
        for i, b in enumerate(self.strip.buttons):
            if scores is None or i >= len(scores) or not np.isfinite(scores[i]):
                b.setStyleSheet("")
                b.setToolTip("")
                continue
            shade = int(40 + 180 * float(np.clip(scores[i], 0, 1)))
            b.setStyleSheet(f"background: rgb({shade // 3}, {shade}, {shade // 2});")
            b.setToolTip(f"{100 * scores[i]:.0f} % of its influence inside the region")
        if scores is None:
            self.ranking.setText("")
        else:
            order = np.argsort(-np.nan_to_num(scores, nan=-1))[:5]
            self.ranking.setText("inside the region: " + ", ".join(f"token {i} ({100 * scores[i]:.0f} %)" for i in order))
