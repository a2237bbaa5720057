"""Sweep every token-reduction method over keep ratios on synthetic scenes.

For each scene (1-4 objects), each method and each keep ratio the reduction is executed for
real and compared with the unreduced model:

* ``top1_agree``: the zero-shot label over the 35 scene captions is unchanged;
* ``cosine``: reduced vs full image embedding;
* ``object_share``: for pruning methods, the fraction of kept patch tokens whose cell centre
  lies on an object (next to the fraction of all tokens on objects, the chance level); for
  merging methods, the fraction of merged tokens that hold only object or only background
  patches (group purity).

Run with ``token-explorer eval-reduction`` (writes a markdown table, e.g. ``docs/token-reduction.md``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from explorer.core.image_io import image_from_array
from explorer.core.jobs import CancelToken, run_sync
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.compare import REDUCTION_FAMILIES, with_overrides
from explorer.plugin_host.engine import Engine
from explorer.plugin_host.reduction import default_layer, label_set, reduction_metrics

from .scenes import iter_scenes

__all__ = ["evaluate_reduction", "reduction_table", "KEEPS", "EVAL_SEED"]

KEEPS = (0.75, 0.5, 0.25, 0.1)
EVAL_SEED = 5_000_011


@dataclass
class _Acc:
    title: str
    family: str
    agree: dict[float, list[float]] = field(default_factory=dict)
    cosine: dict[float, list[float]] = field(default_factory=dict)
    share: dict[float, list[float]] = field(default_factory=dict)
    chance: list[float] = field(default_factory=list)
    errors: int = 0
    error: str = ""


def _on_object(layout, instance_map: np.ndarray) -> np.ndarray:
    """Per image token: does its cell centre lie on an object?"""
    seg = layout.segments[0]
    out = np.zeros(layout.n_image_tokens, dtype=bool)
    H, W = instance_map.shape
    for t in range(layout.n_image_tokens):
        r, c = divmod(t, seg.cols)
        b = seg.cell_box(r, c)
        x, y = int((b.x0 + b.x1) / 2), int((b.y0 + b.y1) / 2)
        if 0 <= x < W and 0 <= y < H:
            out[t] = instance_map[y, x] > 0
    return out


def evaluate_reduction(spec: str = "demo", n_scenes: int = 200, keeps: Sequence[float] = KEEPS,
                       methods: Sequence[str] | None = None, layer: int | None = None, seed: int = EVAL_SEED,
                       size: tuple[int, int] = (224, 224), progress: Callable[[str], None] | None = None,
                       cancel: CancelToken | None = None) -> dict[str, _Acc]:
    engine = Engine()
    backend = run_sync(engine.backend_job(spec))
    infos = [m for m in engine.host.methods(backend="clip") if m.family in REDUCTION_FAMILIES]
    if methods:
        infos = [m for m in infos if m.id in set(methods)]
    if layer is None:
        layer = default_layer(backend.info.n_layers)
    _, T = label_set(backend, "auto")
    acc = {m.id: _Acc(m.title, m.family) for m in infos}
    capture = CaptureSpec.everything(backend.info.n_layers)
    t0 = time.perf_counter()
    for i, scene in enumerate(iter_scenes(seed, n_scenes, size=size)):
        if cancel is not None:
            cancel.raise_if_cancelled()
        image = image_from_array(scene.image, f"scene {i}")
        trace = run_sync(engine.trace_job(backend, image, capture))
        on_obj = _on_object(trace.layout, scene.instance_map)
        for info in infos:
            a = acc[info.id]
            a.chance.append(float(on_obj.mean()))
            for keep in keeps:
                try:
                    params = with_overrides(engine, info.id, None, keep=keep, layer=layer, seed=i)
                    sel = run_sync(engine.method_job(info.id, trace, params, Target(), backend=backend))
                except (ValueError, RuntimeError) as exc:
                    a.errors += 1
                    a.error = str(exc).splitlines()[0]
                    continue
                m = reduction_metrics(trace, sel, T).values
                a.agree.setdefault(keep, []).append(m["top1_agree"])
                a.cosine.setdefault(keep, []).append(m["cosine"])
                if sel.groups is None:
                    if sel.kept.any():
                        a.share.setdefault(keep, []).append(float(on_obj[sel.kept].mean()))
                else:
                    pure = [len(set(on_obj[sel.groups == g])) == 1 for g in np.unique(sel.groups[sel.groups >= 0])]
                    a.share.setdefault(keep, []).append(float(np.mean(pure)))
        if progress is not None and (i + 1) % 10 == 0:
            progress(f"{i + 1}/{n_scenes} scenes, {time.perf_counter() - t0:.0f} s")
    return acc


def reduction_table(acc: dict[str, _Acc], keeps: Sequence[float], header: str) -> str:
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    ks = " | ".join(f"keep {k}" for k in keeps)
    lines = [header, "", "Zero-shot top-1 agreement with the unreduced model / embedding cosine:", "",
             f"| Method | Family | {ks} |", "|---|---|" + "---|" * len(keeps)]
    for mid, a in acc.items():
        cells = " | ".join(f"{mean(a.agree.get(k, [])):.3f} / {mean(a.cosine.get(k, [])):.3f}" for k in keeps)
        note = f" ({a.errors} failed: {a.error})" if a.errors else ""
        lines.append(f"| {a.title} (`{mid}`){note} | {a.family} | {cells} |")
    chance = mean([c for a in acc.values() for c in a.chance])
    lines += ["", f"Where the kept tokens fall: for pruning, the share of kept tokens on objects (all tokens: "
              f"{chance:.3f} on objects); for merging, the share of merged tokens that are pure (only object or only "
              f"background patches):", "", f"| Method | {ks} |", "|---|" + "---|" * len(keeps)]
    for mid, a in acc.items():
        cells = " | ".join(f"{mean(a.share.get(k, [])):.3f}" for k in keeps)
        kind = "pure groups" if a.family == "merging" else "on objects"
        lines.append(f"| {a.title} ({kind}) | {cells} |")
    return "\n".join(lines) + "\n"
