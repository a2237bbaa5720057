"""Grounding and pruning of the demo VLM on synthetic scenes whose object masks are known.

* Grounding: the demo VLM captions each scene; every colour or shape word of the caption that
  names an object of the scene is explained by the raw attention of its token (mean of heads)
  over a range of LLM layers, drawn through the token layout; a hit when the map's peak lies in
  that object's mask. Reported per layer range.
* Pruning: each VLM pruning method at several keep ratios; the caption is right when it names
  every object of the scene (as ``eval-demo`` counts it), next to the unpruned accuracy.

Run with ``token-explorer eval-vlm`` (writes a markdown table, e.g. ``docs/vlm-grounding.md``).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from explorer.core.image_io import image_from_array
from explorer.core.jobs import CancelToken, run_sync
from explorer.core.metrics import pointing_game
from explorer.core.target import Target
from explorer.plugin_host.compare import with_overrides
from explorer.plugin_host.engine import Engine
from explorer.plugin_host.vlm import generate_trace_job

from .scenes import COLORS, SHAPES, iter_scenes

__all__ = ["evaluate_vlm", "vlm_tables", "names_all", "EVAL_SEED", "KEEPS"]

EVAL_SEED = 6_000_007
KEEPS = (0.75, 0.5, 0.25, 0.1)


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


def evaluate_vlm(spec: str = "vlm:demo", n_scenes: int = 200, keeps: Sequence[float] = KEEPS,
                 methods: Sequence[str] | None = None, prompt: str | None = None, seed: int = EVAL_SEED,
                 size: tuple[int, int] = (224, 224), progress: Callable[[str], None] | None = None,
                 cancel: CancelToken | None = None, max_new_tokens: int = 24) -> dict:
    from .vlm_model import CAPTION_PROMPT

    prompt = prompt or CAPTION_PROMPT
    engine = Engine()
    backend = run_sync(engine.backend_job(spec))
    L = backend.info.n_layers
    ranges = layer_ranges(L)
    hits = {k: [] for k in ranges}
    pruning = [m for m in engine.host.methods(backend="vlm") if m.family in ("pruning", "merging")]
    if methods:
        pruning = [m for m in pruning if m.id in set(methods)]
    accuracy = {m.id: {k: [] for k in keeps} for m in pruning}
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
        for info in pruning:
            for keep in keeps:
                try:
                    params = with_overrides(engine, info.id, None, keep=keep, max_new_tokens=max_new_tokens, seed=i)
                    if "layer" in type(params).model_fields and params.layer >= L:
                        params = with_overrides(engine, info.id, params, layer=L - 1)
                    sel = run_sync(engine.method_job(info.id, trace, params, Target(prompts=(prompt,)), backend=backend))
                except (ValueError, RuntimeError):
                    continue
                accuracy[info.id][keep].append(float(names_all(sel.meta["answer"], scene)))
        if progress is not None and (i + 1) % 10 == 0:
            progress(f"{i + 1}/{n_scenes} scenes, {time.perf_counter() - t0:.0f} s")
    return {"ranges": ranges, "hits": hits, "accuracy": accuracy, "full": full_acc,
            "titles": {m.id: m.title for m in pruning}, "n_layers": L}


def vlm_tables(res: dict, keeps: Sequence[float], header: str) -> str:
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    lines = [header, "", "Grounding: the raw-attention map of a colour or shape word peaks inside the named object's mask.",
             "", "| LLM layers | Words | Pointing game |", "|---|---|---|"]
    for name, (s, e) in res["ranges"].items():
        lines.append(f"| {name} ({s}-{e}) | {len(res['hits'][name])} | {mean(res['hits'][name]):.3f} |")
    ks = " | ".join(f"keep {k}" for k in keeps)
    lines += ["", f"Pruning: scene captions naming every object (unpruned: {mean(res['full']):.3f}).", "",
              f"| Method | {ks} |", "|---|" + "---|" * len(keeps)]
    for mid, by_keep in res["accuracy"].items():
        cells = " | ".join(f"{mean(by_keep[k]):.3f}" for k in keeps)
        lines.append(f"| {res['titles'][mid]} (`{mid}`) | {cells} |")
    return "\n".join(lines) + "\n"

