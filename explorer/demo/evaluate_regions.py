"""Click an object, get its region, labels and caption: scored on synthetic scenes.

For each object of each scene: one positive point at a random interior pixel of its visible
mask -> SAM's best mask (IoU with the object's mask reported) -> CLIP labels over the 35 scene
captions (top-1 right when it is the object's caption) and the VLM's caption of the region
(cropped with context; right when it equals the object's caption). Everything runs through the
program's own services (:mod:`explorer.plugin_host.regions`).

Run with ``token-explorer eval-regions`` (writes a markdown table, e.g. ``docs/regions.md``).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from explorer.core.image_io import image_from_array
from explorer.core.jobs import CancelToken, run_sync
from explorer.plugin_host.engine import Engine
from explorer.plugin_host.regions import caption_region_job, region_labels

from .scenes import iter_scenes

__all__ = ["evaluate_regions", "regions_table", "EVAL_SEED"]

EVAL_SEED = 7_000_003


def evaluate_regions(clip: str = "demo", sam: str = "sam:demo", vlm: str = "vlm:demo", n_scenes: int = 200,
                     seed: int = EVAL_SEED, size: tuple[int, int] = (224, 224),
                     progress: Callable[[str], None] | None = None, cancel: CancelToken | None = None) -> dict:
    from .vlm_model import OBJECT_PROMPT

    engine = Engine()
    clip_b = run_sync(engine.backend_job(clip))
    sam_b = run_sync(engine.backend_job(sam))
    vlm_b = run_sync(engine.backend_job(vlm))
    rng = np.random.default_rng(seed)
    iou, label_top1, caption_ok = [], [], []
    t0 = time.perf_counter()
    for i, scene in enumerate(iter_scenes(seed, n_scenes, size=size)):
        if cancel is not None:
            cancel.raise_if_cancelled()
        image = image_from_array(scene.image, f"scene {i}")
        emb = run_sync(sam_b.embedding_job(image))
        for obj in scene.objects:
            ys, xs = np.nonzero(obj.mask)
            k = rng.integers(len(xs))
            masks = sam_b.predict(emb, points=[[xs[k], ys[k]]], labels=[1])
            mask = masks[0].mask
            inter, union = np.logical_and(mask, obj.mask).sum(), np.logical_or(mask, obj.mask).sum()
            iou.append(float(inter / union) if union else 0.0)
            if not mask.any():
                label_top1.append(0.0)
                caption_ok.append(0.0)
                continue
            labels = region_labels(clip_b, image, mask, "scenes", top=1)
            label_top1.append(float(labels[0][0] == obj.caption))
            text = run_sync(caption_region_job(vlm_b, image, mask, OBJECT_PROMPT))
            caption_ok.append(float(text.strip() == obj.caption))
        if progress is not None and (i + 1) % 10 == 0:
            progress(f"{i + 1}/{n_scenes} scenes, {time.perf_counter() - t0:.0f} s")
    return {"objects": len(iou), "mask_iou": float(np.mean(iou)) if iou else float("nan"),
            "label_top1": float(np.mean(label_top1)) if label_top1 else float("nan"),
            "caption_exact": float(np.mean(caption_ok)) if caption_ok else float("nan")}


def regions_table(res: dict, header: str) -> str:
    return "\n".join([header, "", "| Objects | Mask IoU (one point) | Label top-1 (CLIP, 35 captions) | "
                      "Region caption exactly right (VLM) |", "|---|---|---|---|",
                      f"| {res['objects']} | {res['mask_iou']:.3f} | {res['label_top1']:.3f} | "
                      f"{res['caption_exact']:.3f} |"]) + "\n"
