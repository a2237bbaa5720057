"""``token-explorer replay SESSION --out DIR``: draw a saved session without a window or a model.

The bundle is read and checked (:func:`explorer.core.bundle.read_bundle`) and applied to a fresh
:class:`~explorer.core.session.SessionModel` exactly as the window applies it; then what the model
holds is drawn from the stored results (no model is loaded, nothing is recomputed):

* ``view.png`` / ``view.npz``: the canvas's result over the image (session colormap and opacity);
* ``regions.png`` / ``regions.json``: the regions over the image, and as COCO run-length encoding;
* ``answer.txt`` / ``answer.json``: the VLM's prompt, answer, tokens and the picked words;
* ``compare.png`` / ``compare.json``: the comparison's cells as one grid, and its metrics, errors,
  agreement and sweep;
* ``session.json``: what was drawn (model specs, method, parameters, prompts, files written).

All images are ``(H, W, 3)`` at the session image's size (the compare grid: 320-pixel tiles).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["replay_session"]


def _draw(image_rgb: np.ndarray, result: Any, colormap: str, opacity: float) -> np.ndarray:
    """A result over the image, as the canvas draws it."""
    from explorer.core.render import default_colormap, heatmap_overlay, labels_overlay, selection_overlay
    from explorer.core.results import Heatmap, LabelMap, TokenSelection

    if isinstance(result, Heatmap):
        vmin, vmax = result.value_range
        cmap = default_colormap(True) if result.signed and colormap == "viridis" else colormap
        return heatmap_overlay(image_rgb, result, cmap, vmin, vmax, opacity)
    if isinstance(result, LabelMap):
        return labels_overlay(image_rgb, result, opacity)
    if isinstance(result, TokenSelection):
        return selection_overlay(image_rgb, result)
    raise ValueError(f"a {type(result).__name__} cannot be drawn")


def _subtitle(mode: str, metrics: dict) -> str:
    if mode in ("reduction", "vlm") and "kept" in metrics:
        parts = [f"kept {int(metrics['kept'])}"]
        if "cosine" in metrics:
            parts.append(f"cos {metrics['cosine']:.3f}")
        if "top1_agree" in metrics:
            parts.append(f"top1 {'=' if metrics['top1_agree'] else 'x'}")
        if "macs_ratio" in metrics:
            parts.append(f"MACs {metrics['macs_ratio']:.2f}")
        return "  ".join(parts)
    parts = []
    if "deletion_auc" in metrics:
        parts.append(f"deletion AUC {metrics['deletion_auc']:.3f}")
    if "seconds" in metrics:
        parts.append(f"{1000 * metrics['seconds']:.0f} ms")
    return "  ".join(parts)


def replay_session(path: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Draw the session bundle ``path`` into ``out_dir``; returns the summary written to
    ``session.json`` (``files``: what was written, by kind). Raises ``BundleError`` for a bundle
    that cannot be read, :class:`~explorer.core.atomic.OutputError` (one line) for a folder that
    cannot be written (checked first; every file is written atomically)."""
    from explorer.core.atomic import check_output_dir, save_image_atomic, write_text_atomic
    from explorer.core.bundle import apply_bundle, read_bundle
    from explorer.core.render import composite, regions_rgba, tile_grid
    from explorer.core.results import jsonable, save_result
    from explorer.core.session import SessionModel
    from explorer.plugin_host.host import PluginHost

    out = check_output_dir(out_dir)
    bundle = read_bundle(path)
    model = SessionModel()
    host = PluginHost()
    apply_bundle(bundle, model, host.make_params)
    rgb = model.image.rgb
    files: dict[str, str] = {}

    def title(mid: str | None) -> str:
        if not mid:
            return ""
        try:
            return host.method(mid).title
        except (KeyError, ValueError):
            return mid

    view = model.view
    if view.result is not None:
        save_image_atomic(out / "view.png", _draw(rgb, view.result, model.colormap,
                                                   model.opacity if model.overlay else 0.0), "PNG")
        save_result(view.result, out / "view.npz", extra_meta={"method": view.method_id, "model": view.model_spec})
        files["view"] = "view.png"
    if model.regions is not None and len(model.regions):
        layer = regions_rgba(model.image.size, model.regions, model.region_id)
        save_image_atomic(out / "regions.png", composite(rgb, layer), "PNG")
        model.regions.save_coco(out / "regions.json", file_name=Path(bundle.image_path).name)
        files["regions"] = "regions.png"
    answer = model.vlm
    if answer is not None:
        gen = answer.generation
        words = [gen.tokens[t] for t in answer.tokens if 0 <= t < len(gen.tokens)]
        write_text_atomic(out / "answer.txt", f"model: {answer.spec}\nprompt: {answer.prompt}\nanswer: {gen.text}\n"
                                        f"picked: {' '.join(words) if words else '(none)'}\n")
        write_text_atomic(out / "answer.json", json.dumps(jsonable({
            "model": answer.spec, "prompt": answer.prompt, "answer": gen.text, "tokens": list(gen.tokens),
            "picked": list(answer.tokens), "prefill_seconds": gen.prefill_seconds, "seconds": gen.seconds}, strict=True), indent=1))
        files["answer"] = "answer.txt"
    c = model.comparison
    if c is not None:
        tiles = []
        for mid in c.method_ids:
            if mid in c.results:
                tiles.append((title(mid), _subtitle(c.mode, c.metrics.get(mid, {})),
                              _draw(rgb, c.results[mid], model.colormap, model.opacity)))
            else:
                tiles.append((title(mid), f"failed: {c.errors.get(mid, 'not run')}"[:60], rgb))
        if tiles:
            save_image_atomic(out / "compare.png", tile_grid(tiles), "PNG")
            files["compare"] = "compare.png"
        data = {"mode": c.mode, "methods": c.method_ids, "keep": c.keep, "layer": c.layer, "metrics": c.metrics,
                "errors": c.errors}
        if c.agreement is not None:
            data["agreement"] = {"values": np.asarray(c.agreement[0], dtype=float), "kinds": np.asarray(c.agreement[1]).astype(str)}
        if c.sweep is not None:
            keeps, sweep = c.sweep
            data["sweep"] = {"keeps": list(keeps), "metrics": {m: [None if v is None else dict(v.values) for v in vals]
                                                              for m, vals in sweep.items()}}
        write_text_atomic(out / "compare.json", json.dumps(jsonable(data, strict=True), indent=1))
    summary = {
        "session": str(path), "image": bundle.image_path, "image_sha256": model.image.sha256,
        "models": {k: (s.spec or s.wanted) for k, s in model.models.items()},
        "method": model.method_id, "method_title": title(model.method_id),
        "view_method": view.method_id if view.result is not None else None,
        "params": model.current_params.model_dump(mode="json") if model.current_params is not None else None,
        "prompts": list(model.prompts), "regions": len(model.regions) if model.regions is not None else 0,
        "files": files,
    }
    write_text_atomic(out / "session.json", json.dumps(jsonable(summary, strict=True), indent=1))
    return summary
