"""Sweep fixtures: a COCO-format dataset written by the test (synthetic scenes saved as PNG, their
objects as RLE masks and boxes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray")


def write_coco(folder: Path, n: int, size=(64, 64), seed: int = 11) -> Path:
    """``n`` two-object scenes as PNGs under ``folder/images`` and ``folder/coco.json``: the first
    object of each scene as an RLE mask, the second as a box only; categories are the captions."""
    from explorer.core.regions import rle_encode
    from explorer.demo.scenes import iter_scenes

    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, categories = [], [], {}
    for i, scene in enumerate(iter_scenes(seed, n, size=size, n_objects=2)):
        name = f"img{i:02d}.png"
        Image.fromarray(scene.image).save(images_dir / name)
        images.append({"id": 100 + i, "file_name": name, "height": size[0], "width": size[1]})
        for k, obj in enumerate(scene.objects):
            cid = categories.setdefault(obj.caption, len(categories) + 1)
            x0, y0, x1, y1 = obj.box
            ann = {"id": len(annotations) + 1, "image_id": 100 + i, "category_id": cid, "iscrowd": 0,
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(obj.mask.sum())}
            if k == 0:
                ann["segmentation"] = rle_encode(obj.mask)
            annotations.append(ann)
    path = folder / "coco.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": v, "name": k} for k, v in categories.items()]}))
    return path


@pytest.fixture(scope="session")
def coco12(tmp_path_factory):
    return write_coco(tmp_path_factory.mktemp("coco12"), 12)


def masks_of(coco_path: Path) -> dict[tuple[str, str], np.ndarray]:
    """(image id, category name) -> the union mask, decoded independently of the sweep's loader."""
    from explorer.core.regions import rle_decode

    data = json.loads(coco_path.read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    out: dict[tuple[str, str], np.ndarray] = {}
    for a in data["annotations"]:
        h, w = sizes[a["image_id"]]
        if "segmentation" in a:
            m = rle_decode(a["segmentation"])
        else:
            x, y, bw, bh = a["bbox"]
            m = np.zeros((h, w), bool)
            m[y:y + bh, x:x + bw] = True
        key = (str(a["image_id"]), names[a["category_id"]])
        out[key] = out[key] | m if key in out else m
    return out
