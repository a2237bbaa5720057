"""``token-explorer tokenize IMAGE --model tok:demo --out DIR``: what an image tokenizer makes of an
image, headless.

Writes ``DIR/tokens.json`` (the ids, the model, the reconstruction's PSNR, and for every prefix
length k the PSNR of the image decoded from the first k tokens), ``DIR/input.png`` (the model's
frame: the crop it encoded), ``DIR/reconstruction.png``, ``DIR/influence.npz`` (``maps (N, S, S)``:
every token's influence, decoded with that token replaced) and ``DIR/influence/token-NN.png``
(each map over the frame). ``--method ID`` (with ``--param`` and ``--token``) runs one tokenizer
method instead, like ``token-explorer run``, and writes its result as ``DIR/<method>.npz`` and a PNG.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from explorer.core.atomic import atomic_write, check_output_dir, save_image_atomic, write_text_atomic

__all__ = ["tokenize_image"]


def _png(path: Path, rgb01: np.ndarray) -> None:
    save_image_atomic(path, np.clip(np.round(np.asarray(rgb01) * 255), 0, 255).astype(np.uint8), "PNG")


def _map_png(path: Path, frame: np.ndarray, values: np.ndarray) -> None:
    from explorer.core.render import overlay

    v = np.asarray(values, dtype=np.float64)
    lo, hi = float(np.nanmin(v)), float(np.nanmax(v))
    rgb = overlay((frame * 255).astype(np.uint8), v, "inferno", lo, hi if hi > lo else lo + 1e-9, 0.75)
    save_image_atomic(path, rgb, "PNG")


def _write_usage(out: Path, method: str, usage) -> dict[str, Any]:
    """``<method>.json`` (counts, dead codes, perplexity), ``<method>-histogram.png`` and
    ``<method>-regions.png`` (the mean regions of the 16 most used codes); returns the summary."""
    from explorer.core.render import colorize, tile_grid, usage_histogram

    K = len(usage.counts)
    info = {"images": usage.images, "tokens": int(usage.counts.sum()), "codes": K, "used": int(K - len(usage.dead)),
            "dead": [int(i) for i in usage.dead], "perplexity": usage.perplexity, "skipped": list(usage.skipped),
            "counts": [int(c) for c in usage.counts]}
    write_text_atomic(out / f"{method}.json", json.dumps(info, indent=1))
    save_image_atomic(out / f"{method}-histogram.png", usage_histogram(usage.counts, highlight=usage.ids, size=(160, 640)),
                      "PNG")
    if usage.regions is not None:
        top = [int(c) for c in np.argsort(-usage.counts, kind="stable")[:16] if usage.counts[c] > 0]
        tiles = []
        for c in top:
            r = usage.regions[c]
            tiles.append((f"code {c}", f"{usage.counts[c]} tokens", colorize(r, "inferno", 0.0, float(np.nanmax(r)) or 1.0)[..., :3]))
        save_image_atomic(out / f"{method}-regions.png", tile_grid(tiles, cols=4, width=128), "PNG")
    return {k: v for k, v in info.items() if k != "counts"}


def tokenize_image(image_path: str, model: str, out: str | Path, method: str | None = None,
                   params: dict[str, str] | None = None, tokens: tuple[int, ...] = (),
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """See the module docstring; returns what ``tokens.json`` holds (or the method's summary)."""
    import torch

    from explorer.core.image_io import load_image
    from explorer.core.jobs import run_sync
    from explorer.core.results import CodebookUsage, Heatmap, Reconstruction, TokenScores, save_result
    from explorer.core.target import Target
    from explorer.plugin_host.engine import Engine

    say = progress or (lambda _m: None)
    image = load_image(image_path)
    engine = Engine()
    out = Path(out)
    check_output_dir(out)  # before the model loads
    loaded = run_sync(engine.backend_job(model))
    if getattr(loaded, "kind", "") != "tokenizer":
        raise ValueError(f"{model} is a {loaded.kind} model, not a tokenizer (tok:demo, tok:demo-grid, tok:/folder)")
    if method is not None:
        info = engine.host.method(method)
        if "tokenizer" not in info.contribution.backends:
            raise ValueError(f"{method} is not a tokenizer method (tok.influence, tok.attention, tok.gradient, "
                             "tok.prefix, tok.swap, tok.region, tok.codebook)")
        p = engine.host.make_params(method, dict(params or {}))
        result = run_sync(engine.run_job(model, image, method, p, Target(tokens=tuple(tokens))))
        save_result(result, out / f"{method}.npz", extra_meta={"model": loaded.info.spec, "image": str(image_path)})
        summary: dict[str, Any] = {"method": method, "label": getattr(result, "label", ""), "file": f"{method}.npz"}
        if isinstance(result, Reconstruction):
            _png(out / f"{method}.png", result.rgb)
            summary["psnr"] = result.psnr
        elif isinstance(result, Heatmap):
            from explorer.core.render import heatmap_overlay_image

            lo, hi = result.value_range
            save_image_atomic(out / f"{method}.png", heatmap_overlay_image(image.rgb, result, "inferno", lo, hi, 0.6),
                              "PNG")
        elif isinstance(result, CodebookUsage):
            summary.update(_write_usage(out, method, result))
        elif isinstance(result, TokenScores):
            summary["ranking"] = [int(i) for i in result.order]
            summary["scores"] = [float(s) for s in result.scores]
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
        return summary
    params_inf = engine.host.make_params("tok.influence", {})
    backend, trace = run_sync(engine.prepare_job(model, image, "tok.influence", params_inf, Target()))
    ids = trace.extras["ids"]
    pixels = trace.extras["pixels"][0].float()
    frame = pixels.permute(1, 2, 0).cpu().numpy()
    _png(out / "input.png", frame)
    _png(out / "reconstruction.png", trace.extras["reconstruction"].permute(1, 2, 0).cpu().numpy())
    n = int(ids.shape[-1])
    maps = []
    for t in range(n):
        say(f"influence of token {t + 1}/{n}")
        hm = run_sync(engine.method_job("tok.influence", trace, params_inf, Target(tokens=(t,)), backend=backend))
        m = hm.token_values.reshape(frame.shape[:2])
        maps.append(m)
        _map_png(out / "influence" / f"token-{t:02d}.png", frame, m)
    with atomic_write(out / "influence.npz", "wb") as fh:
        np.savez_compressed(fh, maps=np.stack(maps).astype(np.float32), ids=ids.cpu().numpy())
    prefix = {}
    for k in range(1, n + 1):
        keep = torch.arange(n, device=ids.device) < k
        dec = backend.decode_ids(ids[None], keep[None])[0]
        mse = float(((dec - pixels) ** 2).mean())
        prefix[k] = 10 * np.log10(1.0 / max(mse, 1e-12))
    info = {"model": backend.info.spec, "name": backend.info.name, "image": str(image_path), "ids": ids.tolist(),
            "tokens": n, "layout": "grid" if backend.is_grid else "1D", "ordered": backend.ordered,
            "psnr": float(trace.extras["psnr"]), "prefix_psnr": {str(k): float(v) for k, v in prefix.items()},
            "frame": list(frame.shape[:2])}
    write_text_atomic(out / "tokens.json", json.dumps(info, indent=1))
    return info
