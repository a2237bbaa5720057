"""``token-explorer eval-demo``: score the shipped demo models on fresh synthetic scenes.

Each demo model's module evaluates through the program's own loading and inference code on
scenes from seeds never used in training, and returns named figures; this module gathers them
and compares them with the targets the demo models are held to.
"""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

__all__ = ["TARGETS", "evaluate_demo", "format_report"]

# figure -> (target, higher is better)
TARGETS: dict[str, float] = {
    "clip_zero_shot_top1": 0.90,
    "clip_pointing_game": 0.80,
    "sam_point_iou": 0.80,
    "vlm_crop_caption_exact": 0.80,
    "vlm_scene_names_all": 0.70,
}

_MODULES = {"clip": "explorer.demo.clip_model", "sam": "explorer.demo.sam_model", "vlm": "explorer.demo.vlm_model"}


def evaluate_demo(n_scenes: int = 500, only: Sequence[str] | None = None,
                  progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """Figures of the demo models in ``resources/models`` (each on ``n_scenes`` scenes)."""
    out: dict[str, float] = {}
    for kind in only or list(_MODULES):
        if kind not in _MODULES:
            raise ValueError(f"unknown demo model {kind!r}; choose from {', '.join(_MODULES)}")
        module = importlib.import_module(_MODULES[kind])
        if progress is not None:
            progress(f"evaluating the demo {kind.upper()} on {n_scenes} scenes")
        out.update(module.evaluate(n_scenes=n_scenes, progress=None if progress is None else _relay(kind, progress)))
    return out


def _relay(kind: str, progress: Callable[[str], None]) -> Callable[..., None]:
    """Adapt the models' progress calls (``(done, total)`` or a ``Progress``) to one line of text."""

    def relay(*args) -> None:
        if len(args) == 2:
            progress(f"{kind}: {args[0]}/{args[1]}")
        else:
            progress(f"{kind}: {getattr(args[0], 'message', args[0])}")

    return relay


def format_report(figures: dict[str, float], n_scenes: int) -> str:
    lines = [f"Demo models on {n_scenes} fresh synthetic scenes (seeds not used in training):", ""]
    lines.append(f"{'figure':<28} {'value':>8} {'target':>8}")
    for name, value in figures.items():
        target = TARGETS.get(name)
        mark = "" if target is None else ("  ok" if value >= target else "  below target")
        tgt = "" if target is None else f"{target:8.2f}"
        lines.append(f"{name:<28} {value:8.3f} {tgt:>8}{mark}")
    return "\n".join(lines)
