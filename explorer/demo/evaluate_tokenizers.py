"""Figures of the demo tokenizers on fresh synthetic scenes (``token-explorer eval-tokenizers``).

For each tokenizer and scene (64x64, 1-3 objects, seeds never used in training):

* reconstruction PSNR for every prefix length k (the first k tokens decoded, the rest standing
  aside: the tail token of an ordered tokenizer, the codebook's mean vector otherwise; for a grid
  tokenizer "the first k" are the first k patches in raster order, an order it was not trained for),
  and the largest rise of the mean squared error from k to k + 1 tokens, relative (none: ordered);
* codebook usage over the scenes: codes used and the perplexity of the code distribution;
* object localisation of the influence maps: every token's influence (the reconstruction decoded
  with that token replaced, |change| per pixel, ``tok.influence``); for each object, the token
  whose influence mass inside the object's mask is largest, and the share of that token's
  influence inside the object, next to the object's share of the image (what a spread-out token
  would get);
* for a grid tokenizer, the share of each token's influence inside its own patch and inside the
  patch grown by one patch on every side (is a grid token's region its patch?).

Everything runs through the program's engine and the ``tok.influence`` plugin.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from explorer.core.image_io import image_from_array
from explorer.core.jobs import run_sync
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.engine import Engine

from .scenes import make_scene, scene_seed

__all__ = ["evaluate_tokenizer", "tokenizer_table", "EVAL_SEED"]

EVAL_SEED = 8_000_009


def evaluate_tokenizer(spec: str, n_scenes: int = 100, seed: int = EVAL_SEED, size: int = 64,
                       progress: Callable[[str], None] | None = None) -> dict:
    import torch

    engine = Engine()
    backend = run_sync(engine.backend_job(spec))
    if getattr(backend, "kind", "") != "tokenizer":
        raise ValueError(f"{spec} is not a tokenizer")
    N = backend.token_count
    params = engine.host.make_params("tok.influence", {})
    psnr = np.zeros((n_scenes, N))
    mse = np.zeros((n_scenes, N))
    best_share, chance = [], []
    own, grown = [], []
    K = int(backend.codebook().shape[0])
    counts = np.zeros(K, np.int64)
    t0 = time.perf_counter()
    for i in range(n_scenes):
        scene = make_scene(scene_seed(seed, i), size=(size, size), n_objects=(1, 3))
        image = image_from_array(scene.image, f"scene {i}")
        trace = run_sync(engine.trace_job(backend, image, CaptureSpec()))
        ids, pixels = trace.extras["ids"], trace.extras["pixels"][0].float()
        counts += np.bincount(ids.cpu().numpy(), minlength=K)
        for k in range(1, N + 1):
            keep = torch.arange(N) < k
            dec = backend.decode_ids(ids[None], keep[None])[0]
            mse[i, k - 1] = float(((dec - pixels) ** 2).mean())
            psnr[i, k - 1] = 10 * np.log10(1.0 / max(mse[i, k - 1], 1e-12))
        maps = np.stack([run_sync(engine.method_job("tok.influence", trace, params, Target(tokens=(t,)),
                                                    backend=backend)).to_image(image.size, mode="nearest")
                         for t in range(N)])  # (N, H, W) on the scene's pixels
        maps = np.nan_to_num(maps, nan=0.0)
        totals = maps.reshape(N, -1).sum(1) + 1e-12
        for obj in scene.objects:
            inside = maps[:, obj.mask].sum(1) / totals
            best_share.append(float(inside.max()))
            chance.append(float(obj.mask.mean()))
        if backend.is_grid:
            seg = trace.layout.segments[0]
            for t in range(N):
                r, c = divmod(t, seg.cols)
                box = seg.cell_box(r, c)
                rows, cols = box.pixel_slices(image.size)
                own.append(float(maps[t][rows, cols].sum() / totals[t]))
                ph, pw = rows.stop - rows.start, cols.stop - cols.start
                g = maps[t][max(0, rows.start - ph):rows.stop + ph, max(0, cols.start - pw):cols.stop + pw]
                grown.append(float(g.sum() / totals[t]))
        if progress is not None and (i + 1) % 10 == 0:
            progress(f"{backend.info.name}: {i + 1}/{n_scenes} scenes, {time.perf_counter() - t0:.0f} s")
    return {"name": backend.info.name, "spec": spec, "tokens": N, "grid": backend.is_grid, "ordered": backend.ordered,
            "psnr": psnr.mean(0).tolist(), "mse": mse.mean(0).tolist(), "best_share": float(np.mean(best_share)), "chance": float(np.mean(chance)),
            "objects": len(best_share), "own_patch": float(np.mean(own)) if own else None,
            "grown_patch": float(np.mean(grown)) if grown else None, "scenes": n_scenes,
            "monotone": bool(np.all(np.diff(mse.mean(0)) <= 0.0)),
            "max_rise": float(max(0.0, (np.diff(mse.mean(0)) / mse.mean(0)[:-1]).max())) if N > 1 else 0.0, "codes": K, "codes_used": int((counts > 0).sum()),
            "perplexity": float(np.exp(-(p * np.log(p)).sum())) if (p := counts[counts > 0] / counts.sum()).size else 0.0}


def tokenizer_table(results: Sequence[dict], header: str) -> str:
    lines = [header, "", "| Tokenizer | Tokens | PSNR, all tokens (dB) | PSNR of the first k tokens (dB) | "
             "Best token's influence inside an object (object's share of the image) | Grid token's influence in "
             "its patch / patch grown by one | Largest rise of the mean error from k to k + 1 | Codes used (perplexity) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        n = r["tokens"]
        ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n]
        prefix = ", ".join(f"k={k}: {r['psnr'][k - 1]:.1f}" for k in ks)
        kind = "grid" if r["grid"] else ("1D, ordered" if r["ordered"] else "1D")
        grid = f"{r['own_patch']:.3f} / {r['grown_patch']:.3f}" if r["grid"] else "–"
        rise = "none" if r["monotone"] else f"{100 * r['max_rise']:.3f} %"
        lines.append(f"| {r['name']} (`{r['spec']}`) | {n} ({kind}) | {r['psnr'][-1]:.2f} | {prefix} | "
                     f"{r['best_share']:.3f} ({r['chance']:.3f}) | {grid} | {rise} | "
                     f"{r['codes_used']} of {r['codes']} ({r['perplexity']:.0f}) |")
    return "\n".join(lines) + "\n"
