"""Folder browser: the images of a folder as thumbnails; clicking one opens it.

Thumbnails are decoded on a worker pool (Pillow, header-checked by the hardened loader's probe
so a decompression bomb is never decoded) and delivered to the list on the GUI thread.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps
from PySide6.QtCore import QObject, QRunnable, QSize, Qt, QThread, QThreadPool, Signal
from PySide6.QtGui import QIcon, QImage, QPixmap
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from explorer.core.image_io import ImageLoadError, list_images, probe_image

__all__ = ["ImageBrowser"]

THUMB = 96


class _ThumbSignals(QObject):
    ready = Signal(str, QImage, str)  # path, thumbnail (null if failed), error


class _ThumbJob(QRunnable):
    def __init__(self, path: Path, signals: _ThumbSignals, generation: int, owner: "ImageBrowser") -> None:
        super().__init__()
        self.path, self.signals, self.generation, self.owner = path, signals, generation, owner

    def run(self) -> None:
        if self.generation != self.owner.generation:
            return
        # thumbnails wait for idle CPU time: a model loading or tracing comes first
        QThread.currentThread().setPriority(QThread.Priority.IdlePriority)
        try:
            probe_image(self.path)
            with Image.open(self.path) as im:
                im.draft("RGB", (THUMB * 2, THUMB * 2))
                im = ImageOps.exif_transpose(im)
                im.thumbnail((THUMB, THUMB))
                im = im.convert("RGBA")
                data = im.tobytes()
                qimg = QImage(data, im.width, im.height, im.width * 4, QImage.Format.Format_RGBA8888).copy()
            self.signals.ready.emit(str(self.path), qimg, "")
        except (ImageLoadError, OSError, ValueError) as exc:
            self.signals.ready.emit(str(self.path), QImage(), str(exc).splitlines()[0])


class ImageBrowser(QWidget):
    """A folder chooser and a thumbnail list; emits ``image_chosen(path)``."""

    image_chosen = Signal(str)
    folder_changed = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.folder: Path | None = None
        self.generation = 0
        self.pool = QThreadPool(self)
        self.pool.setMaxThreadCount(2)
        self.signals = _ThumbSignals()
        self.signals.ready.connect(self._on_thumb)
        self.label = QLabel("No folder")
        self.label.setWordWrap(True)
        choose = QPushButton("Folder…")
        choose.clicked.connect(self.choose_folder)
        top = QHBoxLayout()
        top.addWidget(self.label, 1)
        top.addWidget(choose)
        self.list = QListWidget()
        self.list.setViewMode(QListWidget.ViewMode.IconMode)
        self.list.setIconSize(QSize(THUMB, THUMB))
        self.list.setResizeMode(QListWidget.ResizeMode.Adjust)
        self.list.setMovement(QListWidget.Movement.Static)
        self.list.setUniformItemSizes(True)
        self.list.setGridSize(QSize(THUMB + 16, THUMB + 28))
        self.list.itemActivated.connect(self._activate)
        self.list.itemClicked.connect(self._activate)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addLayout(top)
        lay.addWidget(self.list, 1)
        self._items: dict[str, QListWidgetItem] = {}

    def choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open folder", str(self.folder or Path.home()))
        if folder:
            self.set_folder(folder)

    def set_folder(self, folder: str | Path) -> None:
        self.generation += 1
        self.pool.clear()
        self.folder = Path(folder)
        self.list.clear()
        self._items = {}
        files = list_images(self.folder)
        self.label.setText(f"{self.folder.name or self.folder}: {len(files)} image(s)")
        self.label.setToolTip(str(self.folder))
        for path in files:
            item = QListWidgetItem(path.name)
            item.setData(Qt.ItemDataRole.UserRole, str(path))
            item.setToolTip(str(path))
            item.setSizeHint(QSize(THUMB + 12, THUMB + 24))
            self.list.addItem(item)
            self._items[str(path)] = item
            self.pool.start(_ThumbJob(path, self.signals, self.generation, self))
        self.folder_changed.emit(str(self.folder))

    def select(self, path: str | Path | None) -> None:
        """Highlight the file shown on the canvas (none when it is not in this folder)."""
        item = self._items.get(str(path)) if path is not None else None
        if item is not None:
            self.list.setCurrentItem(item)
        else:
            self.list.clearSelection()
            self.list.setCurrentRow(-1)

    def _on_thumb(self, path: str, image: QImage, error: str) -> None:
        item = self._items.get(path)
        if item is None:
            return
        if image.isNull():
            item.setToolTip(f"{path}\n{error}")
            item.setText(f"⚠ {Path(path).name}")
        else:
            item.setIcon(QIcon(QPixmap.fromImage(image)))

    def _activate(self, item: QListWidgetItem) -> None:
        self.image_chosen.emit(item.data(Qt.ItemDataRole.UserRole))

    def shutdown(self) -> None:
        self.generation += 1
        self.pool.clear()
        self.pool.waitForDone(5000)
