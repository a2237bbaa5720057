"""The ``eval-*`` commands as sweeps: each builds a SPEC over seeded synthetic scenes, runs it with
:func:`~explorer.sweep.run.run_sweep` (Ray, resumable when ``results_dir`` is kept) and renders
the rows as the tables in ``docs/``.

* :func:`evaluate_maps` (``eval-maps``): every CLIP map method on two-object scenes; per object
  the pointing game (the map's peak in the object's mask) and the deletion AUC of the caption's
  logit, next to one random order per object shared by every method. Text-free methods give the
  same map for both objects, so their pointing game is at most 0.5 by construction.
* :func:`evaluate_reduction` (``eval-reduction``): every CLIP pruning/merging method at each keep
  ratio, executed: top-1 agreement and embedding cosine with the unreduced model, and where the
  kept tokens fall (``object_share`` next to the chance level ``object_chance``). Random methods
  are seeded by the scene's index.
* :func:`evaluate_vlm` (``eval-vlm``): the VLM pruning methods at each keep ratio (the caption
  names every object), plus the grounding of caption words (:mod:`explorer.demo.evaluate_vlm`).
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .results import read_results
from .run import run_sweep
from .spec import MAP_FAMILIES, REDUCTION_FAMILIES, load_spec

__all__ = ["evaluate_maps", "evaluate_reduction", "evaluate_vlm", "markdown_table", "reduction_table", "vlm_tables",
           "MapScores", "MAPS_SEED", "REDUCTION_SEED", "VLM_SEED", "KEEPS"]

MAPS_SEED = 4_000_037  # disjoint from the training seeds of the demo models
REDUCTION_SEED = 5_000_011
VLM_SEED = 6_000_007
KEEPS = (0.75, 0.5, 0.25, 0.1)


@contextmanager
def _folder(results_dir: str | Path | None) -> Iterator[Path]:
    if results_dir is not None:
        yield Path(results_dir)
        return
    with tempfile.TemporaryDirectory(prefix="explorer-eval-") as tmp:
        yield Path(tmp) / "sweep"


def _is_demo(spec: str) -> bool:
    from explorer.backends.registry import parse_model_spec

    return parse_model_spec(spec).canonical() in {parse_model_spec(s).canonical() for s in ("demo", "vlm:demo")}


def _methods(backend: str, families: Sequence[str], wanted: Sequence[str] | None, what: str) -> list:
    from explorer.plugin_host.host import PluginHost

    infos = [m for m in PluginHost().methods(backend=backend) if m.family in families]
    if wanted:
        missing = set(wanted) - {m.id for m in infos}
        if missing:
            raise ValueError(f"unknown {what} method(s): {', '.join(sorted(missing))}")
        infos = [m for m in infos if m.id in set(wanted)]
    return infos


def _frame(out: Path):
    table = read_results(out)
    if table is None:
        raise ValueError("the sweep wrote no rows")
    return table.to_pandas()


# -- maps -------------------------------------------------------------------------------------------
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


def evaluate_maps(spec: str = "demo", n_scenes: int = 500, seed: int = MAPS_SEED, methods: Sequence[str] | None = None,
                  deletion_steps: int = 16, size: tuple[int, int] = (224, 224),
                  progress: Callable[[str], None] | None = None, results_dir: str | Path | None = None,
                  address: str | None = None, actors: int = 1) -> list[MapScores]:
    """Pointing game and deletion AUC of each map method on ``n_scenes`` two-object scenes."""
    infos = _methods("clip", MAP_FAMILIES, methods, "map")
    from explorer.plugin_host.host import PluginHost

    host, demo = PluginHost(), _is_demo(spec)
    entries = [{"id": m.id, "params": {"templates": "none"} if demo and "templates" in host.params_model(m.id).model_fields
                else {}} for m in infos]
    sweep = load_spec({"models": [spec], "dataset": {"kind": "synthetic", "count": n_scenes, "seed": seed, "objects": 2,
                                                      "size": list(size)},
                       "methods": entries,
                       "metrics": ["pointing_game"] + (["deletion_auc"] if deletion_steps else []),
                       "run": {"deletion_steps": max(2, deletion_steps), "actors": actors, "batch_size": 2}})
    scores = {m.id: MapScores(m.id, m.title, m.family) for m in infos}
    with _folder(results_dir) as out:
        run_sweep(sweep, out, address=address, progress=progress)
        df = _frame(out)
    for mid, g in df.groupby("method"):
        s = scores[mid]
        bad = g[g["error"] != ""]
        good = g[g["error"] == ""]
        s.failures = int(len(bad))
        s.error = str(bad["error"].iloc[0]) if len(bad) else ""
        s.total = int(len(good))
        s.hits = int(good["pointing_game"].sum())
        s.seconds = good["seconds"].tolist()
        if deletion_steps:
            s.deletion = good["deletion_auc"].dropna().tolist()
            s.random_deletion = good["random_deletion_auc"].dropna().tolist()
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


# -- token reduction ---------------------------------------------------------------------------------
@dataclass
class ReductionScores:
    title: str
    family: str
    agree: dict[float, list[float]] = field(default_factory=dict)
    cosine: dict[float, list[float]] = field(default_factory=dict)
    share: dict[float, list[float]] = field(default_factory=dict)
    chance: list[float] = field(default_factory=list)
    groups: list[float] = field(default_factory=list)  # 1: the share is of pure merge groups, 0: of kept tokens
    errors: int = 0
    error: str = ""


def evaluate_reduction(spec: str = "demo", n_scenes: int = 200, keeps: Sequence[float] = KEEPS,
                       methods: Sequence[str] | None = None, layer: int | None = None, seed: int = REDUCTION_SEED,
                       size: tuple[int, int] = (224, 224), progress: Callable[[str], None] | None = None,
                       results_dir: str | Path | None = None, address: str | None = None,
                       actors: int = 1) -> dict[str, ReductionScores]:
    """Every CLIP pruning/merging method at each keep ratio on 1-4-object scenes (see the module docstring)."""
    infos = _methods("clip", REDUCTION_FAMILIES, methods, "reduction")
    sweep = load_spec({"models": [spec], "dataset": {"kind": "synthetic", "count": n_scenes, "seed": seed,
                                                      "objects": [1, 4], "size": list(size)},
                       "methods": [{"id": m.id, "grid": {"keep": [float(k) for k in keeps]}} for m in infos],
                       "metrics": ["top1_agree", "cosine", "object_share"],
                       "run": {"vary_seed": True, "reduction_layer": layer, "actors": actors, "batch_size": 2}})
    acc = {m.id: ReductionScores(m.title, m.family) for m in infos}
    with _folder(results_dir) as out:
        run_sweep(sweep, out, address=address, progress=progress)
        df = _frame(out)
    import json

    for (mid, setting), g in df.groupby(["method", "setting"]):
        a, keep = acc[mid], float(json.loads(setting)["keep"])
        bad, good = g[g["error"] != ""], g[g["error"] == ""]
        a.errors += int(len(bad))
        a.error = str(bad["error"].iloc[0]) if len(bad) else a.error
        a.agree[keep] = good["top1_agree"].tolist()
        a.cosine[keep] = good["cosine"].tolist()
        a.share[keep] = good["object_share"].dropna().tolist()
        a.chance += good["object_chance"].dropna().tolist()
        a.groups += good["object_share_groups"].dropna().tolist()
    return acc


def reduction_table(acc: dict[str, ReductionScores], keeps: Sequence[float], header: str) -> str:
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    ks = " | ".join(f"keep {k}" for k in keeps)
    lines = [header, "", "Zero-shot top-1 agreement with the unreduced model / embedding cosine:", "",
             f"| Method | Family | {ks} |", "|---|---|" + "---|" * len(keeps)]
    for mid, a in acc.items():
        cells = " | ".join(f"{mean(a.agree.get(k, [])):.3f} / {mean(a.cosine.get(k, [])):.3f}" for k in keeps)
        note = f" ({a.errors} failed: {a.error})" if a.errors else ""
        lines.append(f"| {a.title} (`{mid}`){note} | {a.family} | {cells} |")
    chance = mean([c for a in acc.values() for c in a.chance])
    lines += ["", f"Where the kept tokens fall: for a kept subset (pruning, and K-Medoids, which passes its medoids "
              f"on), the share of kept tokens on objects (all tokens: {chance:.3f} on objects); for merging into "
              f"groups, the share of merged tokens that are pure (only object or only background patches):", "", f"| Method | {ks} |", "|---|" + "---|" * len(keeps)]
    for mid, a in acc.items():
        cells = " | ".join(f"{mean(a.share.get(k, [])):.3f}" for k in keeps)
        grouped = bool(np.mean(a.groups) > 0.5) if a.groups else a.family == "merging"
        kind = "pure groups" if grouped else "on objects"
        lines.append(f"| {a.title} ({kind}) | {cells} |")
    return "\n".join(lines) + "\n"


# -- VLM ------------------------------------------------------------------------------------------------
def evaluate_vlm(spec: str = "vlm:demo", n_scenes: int = 200, keeps: Sequence[float] = KEEPS,
                 methods: Sequence[str] | None = None, prompt: str | None = None, seed: int = VLM_SEED,
                 size: tuple[int, int] = (224, 224), progress: Callable[[str], None] | None = None,
                 max_new_tokens: int = 24, results_dir: str | Path | None = None, address: str | None = None,
                 actors: int = 1) -> dict:
    """Grounding of caption words (:func:`explorer.demo.evaluate_vlm.evaluate_grounding`) and the
    VLM pruning methods at each keep ratio as a sweep (a caption is right when it names every
    object of its scene)."""
    from explorer.demo.evaluate_vlm import evaluate_grounding
    from explorer.demo.vlm_model import CAPTION_PROMPT

    prompt = prompt or CAPTION_PROMPT
    infos = _methods("vlm", REDUCTION_FAMILIES, methods, "VLM pruning")
    res = evaluate_grounding(spec, n_scenes, prompt=prompt, seed=seed, size=size, progress=progress,
                             max_new_tokens=max_new_tokens)
    sweep = load_spec({"models": [spec], "dataset": {"kind": "synthetic", "count": n_scenes, "seed": seed,
                                                      "objects": [1, 4], "size": list(size), "question": prompt},
                       "methods": [{"id": m.id, "grid": _vlm_grid(m.id, keeps)} for m in infos],
                       "metrics": ["vqa_correct", "image_tokens_kept"],
                       "run": {"vary_seed": True, "max_new_tokens": max_new_tokens, "actors": actors,
                               "batch_size": 2}})
    import json

    accuracy = {m.id: {float(k): [] for k in keeps} for m in infos if "keep" in _vlm_grid(m.id, keeps)}
    presets: dict[str, dict[str, dict[str, list[float]]]] = {
        m.id: {p: {"correct": [], "kept": []} for p in _vlm_grid(m.id, keeps).get("preset", [])}
        for m in infos if m.id not in accuracy}
    with _folder(results_dir) as out:
        run_sweep(sweep, out, address=address, progress=progress)
        df = _frame(out)
    good = df[df["error"] == ""]
    for (mid, setting), g in good.groupby(["method", "setting"]):
        s = json.loads(setting)
        if mid in accuracy:
            accuracy[mid][float(s["keep"])] = g["vqa_correct"].tolist()
        else:
            presets[mid][str(s["preset"])] = {"correct": g["vqa_correct"].tolist(),
                                              "kept": (g["image_tokens_kept"] / g["image_tokens"]).tolist()}
    res.update({"accuracy": accuracy, "presets": presets, "titles": {m.id: m.title for m in infos}})
    return res


def _vlm_grid(method_id: str, keeps: Sequence[float]) -> dict:
    """A VLM pruning method's settings in ``eval-vlm``: the keep ratios, or for a threshold-driven
    method without ``keep`` (MustDrop) its named presets (the ``preset`` choices but ``custom``)."""
    from typing import get_args

    from explorer.plugin_host.host import PluginHost

    fields = PluginHost().params_model(method_id).model_fields
    if "keep" in fields:
        return {"keep": [float(k) for k in keeps]}
    if "preset" in fields:
        return {"preset": [p for p in get_args(fields["preset"].annotation) if p != "custom"]}
    return {}


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
        cells = " | ".join(f"{mean(by_keep[float(k)]):.3f}" for k in keeps)
        lines.append(f"| {res['titles'][mid]} (`{mid}`) | {cells} |")
    if res.get("presets"):
        lines += ["", "Threshold-driven pruning: the number kept varies per image; each named preset (the method's "
                  "published thresholds) with the mean fraction of the image tokens left after its last stage and "
                  "the captions naming every object:", "", "| Method | Preset | Image tokens kept | Captions right |",
                  "|---|---|---|---|"]
        for mid, by_preset in res["presets"].items():
            for name, v in by_preset.items():
                lines.append(f"| {res['titles'][mid]} (`{mid}`) | {name} | {mean(v['kept']):.3f} | "
                             f"{mean(v['correct']):.3f} |")
    return "\n".join(lines) + "\n"
