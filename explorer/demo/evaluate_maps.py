"""Score every map method on synthetic two-object scenes whose object masks are known.

For each scene and each of its two objects, every map method explains the object's caption
("a red circle") and is scored by

* the pointing game: the map (rasterised on the image, bilinear) peaks inside the object's mask;
* the deletion AUC: patches removed in the map's order, the CLIP logit of the caption rescored
  (:mod:`explorer.plugin_host.faithfulness`; lower is better), with a random order as baseline.

Text-free methods (raw attention, rollout, flow, GlobEnc) give the same map for both objects, so
at most one of the two can be hit: their pointing game is bounded by 0.5 by construction.

Run with ``token-explorer eval-maps`` (writes a markdown table, e.g. ``docs/map-methods.md``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from explorer.core.image_io import image_from_array
from explorer.core.jobs import CancelToken, run_sync
from explorer.core.metrics import pointing_game
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.engine import Engine
from explorer.plugin_host.faithfulness import deletion_insertion_job

from .scenes import iter_scenes

__all__ = ["MapScores", "evaluate_maps", "markdown_table", "MAP_FAMILIES", "EVAL_SEED"]

MAP_FAMILIES = ("attention", "similarity", "attribution")
EVAL_SEED = 4_000_037  # disjoint from the training seeds of the demo models


@dataclass
class MapScores:
    method: str
    title: str
    family: str
    hits: int = 0
    total: int = 0
    deletion: list[float] = field(default_factory=list)
    random_deletion: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    failures: int = 0
    error: str = ""

    @property
    def pointing(self) -> float:
        return self.hits / self.total if self.total else float("nan")

    def row(self) -> dict[str, float | str]:
        mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
        return {"method": self.method, "title": self.title, "family": self.family, "pointing_game": self.pointing,
                "deletion_auc": mean(self.deletion), "random_deletion_auc": mean(self.random_deletion),
                "ms_per_map": 1000 * mean(self.seconds), "maps": self.total, "failures": self.failures}


def _params(engine: Engine, method_id: str, demo: bool):
    model = engine.host.params_model(method_id)
    values = {}
    if "templates" in model.model_fields and demo:
        values["templates"] = "none"
    return engine.host.make_params(method_id, values)


def evaluate_maps(
    spec: str = "demo",
    n_scenes: int = 500,
    seed: int = EVAL_SEED,
    methods: Sequence[str] | None = None,
    deletion_steps: int = 16,
    size: tuple[int, int] = (224, 224),
    progress: Callable[[str], None] | None = None,
    cancel: CancelToken | None = None,
) -> list[MapScores]:
    """Pointing game and deletion AUC of each map method on ``n_scenes`` two-object scenes."""
    engine = Engine()
    backend = run_sync(engine.backend_job(spec))
    infos = [m for m in engine.host.methods(backend="clip") if m.family in MAP_FAMILIES]
    if methods:
        wanted = set(methods)
        infos = [m for m in infos if m.id in wanted]
        missing = wanted - {m.id for m in infos}
        if missing:
            raise ValueError(f"unknown map method(s): {', '.join(sorted(missing))}")
    scores = {m.id: MapScores(m.id, m.title, m.family) for m in infos}
    params = {m.id: _params(engine, m.id, backend.info.demo) for m in infos}
    capture = CaptureSpec.everything(backend.info.n_layers)
    t0 = time.perf_counter()
    for i, scene in enumerate(iter_scenes(seed, n_scenes, size=size, n_objects=2)):
        if cancel is not None:
            cancel.raise_if_cancelled()
        if len(scene.objects) != 2:
            continue
        image = image_from_array(scene.image, f"scene {i}")
        trace = run_sync(engine.trace_job(backend, image, capture))
        n_tokens = trace.layout.n_image_tokens
        for k, obj in enumerate(scene.objects):
            target = Target(prompts=(obj.caption,))
            text = engine.text_encoding(backend, target.prompts)
            t = trace.with_text(text)
            random_auc = float("nan")
            if deletion_steps:  # one random order per object, shared by every method's baseline
                order = np.random.default_rng([seed, i, k]).random(n_tokens)
                random_auc = run_sync(deletion_insertion_job(backend, image, order, text.embeddings[0],
                                                             steps=deletion_steps, n_random=0,
                                                             insertion=False)).metrics.values["deletion_auc"]
            for info in infos:
                s = scores[info.id]
                try:
                    start = time.perf_counter()
                    result = run_sync(engine.method_job(info.id, t, params[info.id], target, backend=backend))
                    s.seconds.append(time.perf_counter() - start)
                except (ValueError, RuntimeError) as exc:  # a method that cannot run here is reported, not fatal
                    s.failures += 1
                    s.error = str(exc).splitlines()[0]
                    continue
                raster = result.to_image(image.size)
                s.total += 1
                s.hits += int(pointing_game(raster, obj.mask))
                if deletion_steps and result.token_values is not None:
                    faith = run_sync(deletion_insertion_job(backend, image, result.token_values, text.embeddings[0],
                                                            steps=deletion_steps, n_random=0, insertion=False))
                    s.deletion.append(faith.metrics.values["deletion_auc"])
                    s.random_deletion.append(random_auc)
        if progress is not None and (i + 1) % 10 == 0:
            progress(f"{i + 1}/{n_scenes} scenes, {time.perf_counter() - t0:.0f} s")
    return list(scores.values())


def markdown_table(rows: list[MapScores], header: str) -> str:
    lines = [header, "", "| Method | Family | Pointing game | Deletion AUC (random order) | ms per map |",
             "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-np.nan_to_num(r.pointing, nan=-1), r.title)):
        d = r.row()
        dele = f"{d['deletion_auc']:.3f} ({d['random_deletion_auc']:.3f})" if np.isfinite(d["deletion_auc"]) else "–"
        point = f"{d['pointing_game']:.3f}" if np.isfinite(d["pointing_game"]) else "–"
        note = f" ({r.failures} failed: {r.error})" if r.failures else ""
        lines.append(f"| {r.title} (`{r.method}`){note} | {r.family} | {point} | {dele} | {d['ms_per_map']:.1f} |")
    return "\n".join(lines) + "\n"
