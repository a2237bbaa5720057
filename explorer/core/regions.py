"""Regions of an image (SAM masks and their edits), as layers, and their exports.

A :class:`Region` is a boolean mask on the original image with a name, visibility, the prompt
that made it, and optional caption and labels. :class:`RegionSet` holds the regions of one image
in order and offers what the region list needs: add, rename, hide, remove, combine (union,
subtract) and export as PNG masks or COCO run-length encoding (RLE).

COCO RLE (the format of the COCO API): counts of alternating runs of 0s and 1s over the mask
flattened in column-major (Fortran) order, starting with 0s; ``{"size": [H, W], "counts": [...]}``.
Both the uncompressed list form and the compressed string form are written and read here.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .atomic import atomic_write, check_output_dir, write_bytes_atomic, write_text_atomic

__all__ = ["Region", "RegionSet", "rle_encode", "rle_decode", "rle_to_string", "rle_from_string", "mask_box"]


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` of a mask's pixels (x1/y1 exclusive), ``None`` if empty."""
    rows = np.nonzero(mask.any(1))[0]
    cols = np.nonzero(mask.any(0))[0]
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1] + 1), int(rows[-1] + 1)


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """Uncompressed COCO RLE of a ``(H, W)`` bool mask."""
    m = np.asarray(mask, dtype=bool)
    flat = m.flatten(order="F")
    if flat.size == 0:
        return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": []}
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    counts = ([0] if flat[0] else []) + [int(r) for r in runs]
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": counts}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Mask from COCO RLE (list or compressed string counts)."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = rle_from_string(counts if isinstance(counts, str) else counts.decode("ascii"))
    flat = np.zeros(h * w, dtype=bool)
    pos, val = 0, False
    for c in counts:
        c = int(c)
        if val:
            flat[pos:pos + c] = True
        pos += c
        val = not val
    if pos != h * w:
        raise ValueError(f"RLE counts cover {pos} pixels, the mask has {h * w}")
    return flat.reshape((h, w), order="F")


def rle_to_string(counts: Sequence[int]) -> str:
    """The COCO API's compressed form: each count (as a difference to the count two before,
    from the third on) in 5-bit groups with a continuation bit, offset by 48 into printable ASCII."""
    out = []
    for i, c in enumerate(counts):
        x = int(c) - int(counts[i - 2]) if i > 2 else int(c)
        more = True
        while more:
            byte = x & 0x1F
            x >>= 5
            more = not ((x == 0 and not (byte & 0x10)) or (x == -1 and (byte & 0x10)))
            if more:
                byte |= 0x20
            out.append(chr(byte + 48))
    return "".join(out)


def rle_from_string(s: str) -> list[int]:
    """Inverse of :func:`rle_to_string`."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


@dataclass(frozen=True)
class Region:
    """One region: ``mask (H, W)`` bool on the original image."""

    id: int
    name: str
    mask: np.ndarray
    visible: bool = True
    score: float | None = None
    prompt: dict[str, Any] = field(default_factory=dict)
    caption: str = ""
    labels: tuple[tuple[str, float], ...] = ()

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def box(self) -> tuple[int, int, int, int] | None:
        return mask_box(self.mask)


class RegionSet:
    """The regions of one image, in list order (see module docstring)."""

    def __init__(self, image_size: tuple[int, int]) -> None:
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.regions: list[Region] = []
        self._next = 1

    def __len__(self) -> int:
        return len(self.regions)

    def __iter__(self):
        return iter(self.regions)

    def get(self, region_id: int) -> Region:
        for r in self.regions:
            if r.id == region_id:
                return r
        raise KeyError(f"no region {region_id}")

    def _check(self, mask: np.ndarray) -> np.ndarray:
        m = np.asarray(mask, dtype=bool)
        if m.shape != self.image_size:
            raise ValueError(f"mask is {m.shape}, the image is {self.image_size}")
        return m

    def add(self, mask: np.ndarray, name: str | None = None, **kw: Any) -> Region:
        region = Region(id=self._next, name=name or f"region {self._next}", mask=self._check(mask), **kw)
        self._next += 1
        self.regions.append(region)
        return region

    def update(self, region_id: int, **changes: Any) -> Region:
        for i, r in enumerate(self.regions):
            if r.id == region_id:
                if "mask" in changes:
                    changes["mask"] = self._check(changes["mask"])
                self.regions[i] = replace(r, **changes)
                return self.regions[i]
        raise KeyError(f"no region {region_id}")

    def rename(self, region_id: int, name: str) -> Region:
        name = name.strip()
        if not name:
            raise ValueError("a region needs a name")
        return self.update(region_id, name=name)

    def set_visible(self, region_id: int, visible: bool) -> Region:
        return self.update(region_id, visible=bool(visible))

    def remove(self, region_id: int) -> None:
        self.regions = [r for r in self.regions if r.id != region_id]

    def union(self, ids: Iterable[int], name: str | None = None) -> Region:
        ids = list(ids)
        if len(ids) < 2:
            raise ValueError("a union needs at least two regions")
        mask = np.zeros(self.image_size, dtype=bool)
        for i in ids:
            mask |= self.get(i).mask
        return self.add(mask, name or " ∪ ".join(self.get(i).name for i in ids), prompt={"union": ids})

    def subtract(self, base: int, minus: Iterable[int], name: str | None = None) -> Region:
        minus = list(minus)
        mask = self.get(base).mask.copy()
        for i in minus:
            mask &= ~self.get(i).mask
        title = name or f"{self.get(base).name} − " + ", ".join(self.get(i).name for i in minus)
        return self.add(mask, title, prompt={"subtract": [base, *minus]})

    # -- export -----------------------------------------------------------------------------------
    def to_coco(self, image_id: int = 1, file_name: str = "", compressed: bool = True) -> dict[str, Any]:
        """A COCO-style dict: one image, one category per distinct region name, one annotation
        per region with RLE ``segmentation``, ``area`` and ``bbox`` ([x, y, w, h])."""
        names = sorted({r.name for r in self.regions})
        cats = {n: i + 1 for i, n in enumerate(names)}
        anns = []
        for k, r in enumerate(self.regions):
            rle = rle_encode(r.mask)
            if compressed:
                rle = {"size": rle["size"], "counts": rle_to_string(rle["counts"])}
            box = r.box or (0, 0, 0, 0)
            anns.append({"id": k + 1, "image_id": image_id, "category_id": cats[r.name], "segmentation": rle,
                         "area": r.area, "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "iscrowd": 0,
                         "score": r.score, "caption": r.caption, "labels": [list(lab) for lab in r.labels]})
        h, w = self.image_size
        return {"images": [{"id": image_id, "file_name": file_name, "height": h, "width": w}],
                "categories": [{"id": i, "name": n} for n, i in cats.items()], "annotations": anns}

    def save_coco(self, path: str | Path, **kw: Any) -> Path:
        """Write :meth:`to_coco` as JSON, atomically (an :class:`~explorer.core.atomic.OutputError`,
        one line, when it cannot be written; an earlier file stays untouched)."""
        return write_text_atomic(path, json.dumps(self.to_coco(**kw), indent=1))

    def save_pngs(self, path: str | Path) -> Path:
        """A ZIP of one 8-bit PNG per region (255 inside), or a folder when ``path`` has no .zip.

        The ZIP and every PNG of the folder are written atomically; a failure raises
        :class:`~explorer.core.atomic.OutputError` (one line naming the path).
        """
        from PIL import Image

        path = Path(path)

        def png(mask: np.ndarray) -> bytes:
            buf = io.BytesIO()
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf, "PNG")
            return buf.getvalue()

        def fname(k: int, r: Region) -> str:
            safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in r.name)[:40]
            return f"{k + 1:03d}_{safe}.png"

        if path.suffix.lower() == ".zip":
            with atomic_write(path, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as zf:
                for k, r in enumerate(self.regions):
                    zf.writestr(fname(k, r), png(r.mask))
        else:
            check_output_dir(path)
            for k, r in enumerate(self.regions):
                write_bytes_atomic(path / fname(k, r), png(r.mask))
        return path
