"""Grounding of the demo VLM's caption words on synthetic scenes whose object masks are known.

The VLM captions each scene; every colour or shape word of the caption that names an object of
the scene is explained by the raw attention of its token (mean of heads) over a range of LLM
layers, drawn through the token layout; a hit when the map's peak lies in that object's mask.
Reported per layer range, next to how often the unpruned caption names every object.

``token-explorer eval-vlm`` adds the pruning methods' accuracy through the sweep engine
(:func:`explorer.sweep.presets.evaluate_vlm`) and writes ``docs/vlm-grounding.md``.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from explorer.core.image_io import image_from_array
from explorer.core.jobs import CancelToken, run_sync
from explorer.core.metrics import pointing_game
from explorer.plugin_host.engine import Engine
from explorer.plugin_host.vlm import generate_trace_job

from .scenes import COLORS, SHAPES, iter_scenes

__all__ = ["evaluate_grounding", "names_all", "layer_ranges", "EVAL_SEED"]

EVAL_SEED = 6_000_007


def names_all(caption: str, scene) -> bool:
    """Does the caption name every object ("a red circle" for each)?"""
    text = f" {caption.lower()} "
    return all(f" {o.color} {o.shape} " in text for o in scene.objects)


def _word_objects(tokens: Sequence[str], scene) -> list[tuple[int, int]]:
    """(token index, object index) for each colour/shape word that names one object of the scene:
    a colour followed by a shape picks the object with both; a lone word must be unique."""
    words = [t.strip().lower() for t in tokens]
    out = []
    for i, w in enumerate(words):
        if w in COLORS:
            shape = words[i + 1] if i + 1 < len(words) and words[i + 1] in SHAPES else None
            hits = [k for k, o in enumerate(scene.objects) if o.color == w and (shape is None or o.shape == shape)]
        elif w in SHAPES:
            color = words[i - 1] if i > 0 and words[i - 1] in COLORS else None
            hits = [k for k, o in enumerate(scene.objects) if o.shape == w and (color is None or o.color == color)]
        else:
            continue
        if len(hits) == 1:
            out.append((i, hits[0]))
    return out


def layer_ranges(n_layers: int) -> dict[str, tuple[int, int]]:
    third = max(1, n_layers // 3)
    ranges = {"early": (0, third - 1), "middle": (third, min(n_layers - 1, 2 * third - 1)),
              "late": (min(n_layers - 1, 2 * third), n_layers - 1), "all": (0, n_layers - 1)}
    return {k: v for k, v in ranges.items() if v[0] <= v[1]}


def evaluate_grounding(spec: str = "vlm:demo", n_scenes: int = 200, prompt: str | None = None, seed: int = EVAL_SEED,
                       size: tuple[int, int] = (224, 224), progress: Callable[[str], None] | None = None,
                       cancel: CancelToken | None = None, max_new_tokens: int = 24) -> dict:
    """``{"ranges", "hits" (per range: 0/1 per grounded word), "full" (per scene: the caption names
    every object), "n_layers"}``."""
    from .vlm_model import CAPTION_PROMPT

    prompt = prompt or CAPTION_PROMPT
    engine = Engine()
    backend = run_sync(engine.backend_job(spec))
    L = backend.info.n_layers
    ranges = layer_ranges(L)
    hits = {k: [] for k in ranges}
    full_acc: list[float] = []
    t0 = time.perf_counter()
    for i, scene in enumerate(iter_scenes(seed, n_scenes, size=size)):
        if cancel is not None:
            cancel.raise_if_cancelled()
        image = image_from_array(scene.image, f"scene {i}")
        trace = run_sync(generate_trace_job(backend, image, prompt, max_new_tokens))
        gen = trace.extras["generation"]
        full_acc.append(float(names_all(gen.text, scene)))
        for t, k in _word_objects(gen.tokens, scene):
            for name, (s, e) in ranges.items():
                values = np.nanmean(np.stack([gen.attention[l][t].mean(0) for l in range(s, e + 1)]), 0)
                raster = trace.layout.to_image(values, scene.image.shape[:2], mode="bilinear")
                hits[name].append(float(pointing_game(raster, scene.objects[k].mask)))
        if progress is not None and (i + 1) % 10 == 0:
            progress(f"grounding: {i + 1}/{n_scenes} scenes, {time.perf_counter() - t0:.0f} s")
    return {"ranges": ranges, "hits": hits, "full": full_acc, "n_layers": L}
