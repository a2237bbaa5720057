"""The items of a sweep's dataset, listed on the driver and read by the workers.

:func:`list_items` turns a :class:`~explorer.sweep.spec.DatasetSpec` into small records (plain
strings and numbers, no pixels): the driver never reads an image. :func:`load_item` runs in a
worker and returns a :class:`Sample`: the image through the program's one hardened loader and
the targets to score maps against, each a name (the prompt) and an optional ``(H, W)`` bool mask
in the image's pixels.

* ``folder``: every image under ``path`` (recursive, sorted by relative path); targets are the
  dataset's ``prompts`` (no masks);
* ``coco``: the images of a COCO-format JSON (``images``, ``annotations``, ``categories``); the
  targets are the categories present in an image, each the union of its instances' masks
  (polygons, RLE, or boxes when an annotation has no segmentation);
* ``vqa``: one JSON object per line, ``{"image": ..., "question": ..., "answers": [...]}`` (an
  optional ``"id"``); no targets;
* ``synthetic``: scene ``i`` of ``make_scene(scene_seed(seed, i), size, objects)``; the targets are
  its objects' captions and visible masks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from explorer.core.image_io import LoadedImage, image_from_array, list_images, load_image
from explorer.core.regions import rle_decode

from .spec import SweepSpec

__all__ = ["Sample", "TargetObject", "list_items", "load_item", "categories_of", "vqa_correct", "normalize_answer"]


@dataclass
class TargetObject:
    """What a map is asked about: ``name`` (the prompt) and its pixels (``mask (H, W) bool`` or None)."""

    name: str
    mask: np.ndarray | None = None


@dataclass
class Sample:
    """One item read by a worker."""

    image: LoadedImage
    targets: list[TargetObject] = field(default_factory=list)
    question: str = ""
    answers: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)  # synthetic: the object names a caption must contain


def _images_root(spec: SweepSpec) -> Path:
    d = spec.dataset
    return spec.resolve(d.images) if d.images else spec.resolve(d.path).parent


def list_items(spec: SweepSpec) -> list[dict[str, Any]]:
    """The dataset's items in a fixed order: ``item_id``, ``index``, ``path`` (empty for synthetic
    scenes), ``question``, ``answers`` and ``annotations`` (JSON strings)."""
    d = spec.dataset
    items: list[dict[str, Any]] = []
    if d.kind == "synthetic":
        items = [{"item_id": f"scene-{i:06d}", "index": i, "path": "", "question": d.question, "answers": "[]",
                  "annotations": "[]"} for i in range(int(d.count))]
    elif d.kind == "folder":
        root = spec.resolve(d.path)
        for i, p in enumerate(list_images(root, recursive=True)):
            items.append({"item_id": str(p.relative_to(root)), "index": i, "path": str(p), "question": d.question,
                          "answers": "[]", "annotations": "[]"})
    elif d.kind == "coco":
        items = _coco_items(spec)
    else:
        items = _vqa_items(spec)
    return items[: d.count] if d.count is not None and d.kind != "synthetic" else items


def _coco(spec: SweepSpec) -> dict:
    path = spec.resolve(spec.dataset.path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"dataset.path: {path.name} is not a readable COCO JSON ({exc})") from None
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"dataset.path: {path.name} has no 'images' list (not COCO format)")
    return data


def categories_of(spec: SweepSpec) -> list[str]:
    """Names of the dataset's categories (the label set of label maps): COCO's categories, the
    synthetic scenes' 35 object captions, or the folder's prompts."""
    d = spec.dataset
    if d.kind == "coco":
        return [c["name"] for c in sorted(_coco(spec).get("categories", []), key=lambda c: c["id"])]
    if d.kind == "synthetic":
        from explorer.plugin_host.reduction import SCENE_LABELS

        return list(SCENE_LABELS)
    return list(d.prompts)


def _coco_items(spec: SweepSpec) -> list[dict[str, Any]]:
    data = _coco(spec)
    root = _images_root(spec)
    names = {c["id"]: c["name"] for c in data.get("categories", [])}
    by_image: dict[Any, list[dict]] = {}
    for a in data.get("annotations", []):
        if a.get("iscrowd", 0) and "segmentation" not in a:
            continue
        entry = {"category": names.get(a.get("category_id"), str(a.get("category_id"))),
                 "segmentation": a.get("segmentation"), "bbox": a.get("bbox")}
        by_image.setdefault(a.get("image_id"), []).append(entry)
    items = []
    for i, img in enumerate(sorted(data["images"], key=lambda im: im["id"])):
        items.append({"item_id": str(img["id"]), "index": i, "path": str(root / img["file_name"]), "question":
                      spec.dataset.question, "answers": "[]",
                      "annotations": json.dumps({"height": img.get("height"), "width": img.get("width"),
                                                 "objects": by_image.get(img["id"], [])})})
    return items


def _vqa_items(spec: SweepSpec) -> list[dict[str, Any]]:
    path = spec.resolve(spec.dataset.path)
    root = _images_root(spec)
    items = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"dataset.path: {path.name} cannot be read ({exc})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            image, question, answers = rec["image"], rec["question"], rec.get("answers", [])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"dataset.path: {path.name} line {n} is not a VQA item "
                             f"({{image, question, answers}}): {exc}") from None
        if isinstance(answers, str):
            answers = [answers]
        items.append({"item_id": str(rec.get("id", f"line-{n}")), "index": len(items),
                      "path": str(Path(image) if Path(image).is_absolute() else root / image), "question": question,
                      "answers": json.dumps([str(a) for a in answers]), "annotations": "[]"})
    return items


def _polygons_mask(polygons: list[list[float]], h: int, w: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        if len(poly) >= 6:
            draw.polygon([(float(poly[k]), float(poly[k + 1])) for k in range(0, len(poly) - 1, 2)], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def _object_mask(obj: dict, h: int, w: int) -> np.ndarray:
    seg = obj.get("segmentation")
    if isinstance(seg, dict):  # RLE (counts as a list, or COCO's compressed string)
        mask = rle_decode(seg)
        if mask.shape != (h, w):
            raise ValueError(f"an RLE mask of {mask.shape} on a {h}x{w} image")
        return mask
    if isinstance(seg, list) and seg:
        return _polygons_mask(seg, h, w)
    box = obj.get("bbox")
    if box and len(box) == 4:
        x, y, bw, bh = (float(v) for v in box)
        mask = np.zeros((h, w), dtype=bool)
        mask[max(0, int(np.floor(y))):min(h, int(np.ceil(y + bh))), max(0, int(np.floor(x))):min(w, int(np.ceil(x + bw)))] = True
        return mask
    raise ValueError("an annotation with neither segmentation nor bbox")


def load_item(item: dict[str, Any], spec: SweepSpec) -> Sample:
    """Read one item (in a worker). Raises ``ImageLoadError`` (a ``ValueError``) for an image that
    cannot be read and ``ValueError`` for annotations that do not fit it."""
    d = spec.dataset
    if d.kind == "synthetic":
        from explorer.demo.scenes import make_scene, scene_seed

        n_obj = tuple(d.objects) if isinstance(d.objects, list) else int(d.objects)
        scene = make_scene(scene_seed(d.seed, int(item["index"])), size=tuple(d.size), n_objects=n_obj)
        image = image_from_array(scene.image, item["item_id"])
        return Sample(image=image, targets=[TargetObject(o.caption, o.mask) for o in scene.objects],
                      question=item["question"], objects=[o.name for o in scene.objects])
    image = load_image(item["path"])
    answers = json.loads(item.get("answers") or "[]")
    if d.kind == "coco":
        ann = json.loads(item["annotations"])
        h, w = image.size
        if ann.get("height") and ann.get("width") and (int(ann["height"]), int(ann["width"])) != (h, w):
            raise ValueError(f"the annotations are for a {ann['height']}x{ann['width']} image, the file is {h}x{w}")
        merged: dict[str, np.ndarray] = {}
        for obj in ann["objects"]:
            m = _object_mask(obj, h, w)
            merged[obj["category"]] = merged[obj["category"]] | m if obj["category"] in merged else m
        targets = [TargetObject(name, mask) for name, mask in merged.items() if mask.any()]
    elif d.kind == "folder":
        targets = [TargetObject(p) for p in d.prompts]
    else:
        targets = []
    return Sample(image=image, targets=targets, question=item["question"], answers=[str(a) for a in answers])


_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, spaces collapsed (VQA-style matching)."""
    import re

    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def vqa_correct(answer: str, sample: Sample) -> float:
    """1.0 when ``answer`` is right: for VQA items, it equals one of the answers after
    :func:`normalize_answer`; for synthetic scenes, it names every object ("red circle" for
    each). NaN when the item has nothing to check against."""
    if sample.answers:
        a = normalize_answer(answer)
        return float(any(a == normalize_answer(x) for x in sample.answers))
    if sample.objects:
        text = f" {normalize_answer(answer)} "
        return float(all(f" {name} " in text for name in sample.objects))
    return float("nan")
