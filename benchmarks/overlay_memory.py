"""Peak memory of drawing the CLI's ``run --out X.png`` overlay on a large image: as it was (the
map rasterised over the whole image in float64, colorized and blended in one piece, then copied
into Pillow) against the banded drawing the CLI uses now.

    python benchmarks/overlay_memory.py [--size 9000x9000] [--variant both|old|new] [--grid 14]

Each variant runs in a fresh child process (so that the peak resident set size, ``ru_maxrss``,
is its own): a synthetic ``H x W`` RGB image and a heatmap on a CLIP-like layout (shortest side
resized to 224, centred 224 crop, a ``grid x grid`` token grid) are made first; the figure is the
peak RSS *above* what the process held once they existed (what drawing and writing the PNG cost
on top of the image and the model), plus tracemalloc's peak of the Python/numpy allocations
(Pillow's own buffers are not traced). Both variants write the PNG to a temporary folder; the
SHA-256 of the drawn pixels is printed so that the two can be seen to be identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from explorer.core.layout import Geometry, TokenLayout  # noqa: E402
from explorer.core.render import lookup_table  # noqa: E402
from explorer.core.results import Heatmap  # noqa: E402

MB = 1 << 20


def rss_now() -> int:
    """Resident set size now, in bytes (Linux ``/proc``; the peak so far elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return rss_peak()


def rss_peak() -> int:
    """Peak resident set size of this process, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def synthetic(h: int, w: int, grid: int) -> tuple[np.ndarray, Heatmap]:
    """An ``(h, w, 3)`` uint8 image (smooth ramps) and a heatmap on a CLIP-like layout of it."""
    y = (np.arange(h, dtype=np.uint32) * 255 // max(h - 1, 1)).astype(np.uint8)
    x = (np.arange(w, dtype=np.uint32) * 255 // max(w - 1, 1)).astype(np.uint8)
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[..., 0] = x[None, :]
    img[..., 1] = y[:, None]
    img[..., 2] = 128
    geo = Geometry.identity((h, w))
    size = 224
    nh, nw = (size, int(size * w / h)) if w > h else (int(size * h / w), size)
    geo = geo.resize((nh, nw)).crop(int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0)), size, size)
    layout = TokenLayout.single_grid(geo, grid, grid)
    values = np.random.default_rng(0).random(grid * grid).astype(np.float32)
    return img, Heatmap(layout=layout, token_values=values)


# -- the drawing as it was before the banded one (tests/core/test_render_bands.py checks the banded
# drawing against these, pixel for pixel) ----------------------------------------------------------
def old_to_image(layout: TokenLayout, values: np.ndarray, out_size: tuple[int, int],
                 mode: str = "bilinear") -> np.ndarray:
    """``TokenLayout.to_image`` as it was: every segment sampled over the whole raster at once."""
    grids = layout.split(np.asarray(values, dtype=np.float64))
    acc = np.zeros(out_size, dtype=np.float64)
    cnt = np.zeros(out_size, dtype=np.float64)
    for seg, g in zip(layout.segments, grids):
        v, cov = seg.sample(g, out_size, mode)
        acc[cov] += v[cov]
        cnt[cov] += 1
    out = np.full(out_size, np.nan, dtype=np.float32)
    have = cnt > 0
    out[have] = acc[have] / cnt[have]
    return out


def old_colorize(values, colormap, vmin, vmax):
    """``colorize`` as it was: a float64 index over the whole map."""
    lut = lookup_table(colormap)
    v = np.asarray(values, dtype=np.float64)
    span = (vmax - vmin) or 1.0
    idx = np.clip((v - vmin) / span * (len(lut) - 1), 0, len(lut) - 1)
    idx = np.where(np.isfinite(idx), idx, 0).round().astype(np.intp)
    rgba = lut[idx].copy()
    rgba[~np.isfinite(v), 3] = 0
    return rgba


def old_overlay(image_rgb, values, colormap, vmin, vmax, opacity=0.6):
    """``overlay`` as it was: one full-size RGBA and one full-size float blend."""
    rgba = old_colorize(values, colormap, vmin, vmax)
    a = (rgba[..., 3:4].astype(np.float32) / 255.0) * float(opacity)
    out = image_rgb.astype(np.float32) * (1.0 - a) + rgba[..., :3].astype(np.float32) * a
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def draw_old(img: np.ndarray, hm: Heatmap, out: Path) -> bytes:
    from PIL import Image

    vmin, vmax = hm.value_range
    rgb = old_overlay(img, old_to_image(hm.layout, hm.token_values, img.shape[:2]), "viridis", vmin, vmax, 0.6)
    Image.fromarray(rgb).save(out)
    return rgb.tobytes()


def draw_new(img: np.ndarray, hm: Heatmap, out: Path) -> bytes:
    from explorer.core.atomic import save_image_atomic
    from explorer.core.render import heatmap_overlay_image

    vmin, vmax = hm.value_range
    pil = heatmap_overlay_image(img, hm, "viridis", vmin, vmax, 0.6)
    save_image_atomic(out, pil, "PNG")
    return pil


def child(variant: str, h: int, w: int, grid: int) -> dict:
    img, hm = synthetic(h, w, grid)
    base_now, base_peak = rss_now(), rss_peak()
    tracemalloc.start()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "overlay.png"
        drawn = draw_old(img, hm, out) if variant == "old" else draw_new(img, hm, out)
        seconds = time.perf_counter() - t0
        _, traced = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        peak = rss_peak()
        png_bytes = out.stat().st_size
        pixels = drawn if isinstance(drawn, bytes) else drawn.tobytes()
    return {"variant": variant, "size": [h, w], "megapixels": h * w / 1e6, "image_mb": img.nbytes / MB,
            "rss_before_mb": base_now / MB, "peak_above_mb": (max(peak, base_peak) - base_now) / MB,
            "tracemalloc_peak_mb": traced / MB, "seconds": seconds, "png_mb": png_bytes / MB,
            "pixels_sha256": hashlib.sha256(pixels).hexdigest()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="9000x9000", help="HxW of the synthetic image (default 9000x9000: 81 MP)")
    p.add_argument("--variant", choices=["both", "old", "new"], default="both")
    p.add_argument("--grid", type=int, default=14, help="token grid side (default 14: ViT-B/16 at 224)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    h, w = (int(v) for v in args.size.lower().split("x"))
    if args.child:
        print(json.dumps(child(args.variant, h, w, args.grid)))
        return 0
    print("command: python benchmarks/overlay_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    rows = []
    for variant in (["old", "new"] if args.variant == "both" else [args.variant]):
        proc = subprocess.run([sys.executable, __file__, "--child", "--variant", variant, "--size", args.size,
                               "--grid", str(args.grid)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{variant}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if not rows:
        return 1
    r0 = rows[0]
    print(f"image {r0['size'][1]}x{r0['size'][0]} ({r0['megapixels']:.1f} MP, {r0['image_mb']:.0f} MB as uint8 RGB); "
          f"{args.grid}x{args.grid} token map on a CLIP-like layout")
    print(f"{'variant':<8} {'peak RSS above image+map (MB)':>30} {'tracemalloc peak (MB)':>22} {'seconds':>8} "
          f"{'PNG (MB)':>9}  pixels sha256")
    for r in rows:
        print(f"{r['variant']:<8} {r['peak_above_mb']:>30.0f} {r['tracemalloc_peak_mb']:>22.0f} {r['seconds']:>8.1f} "
              f"{r['png_mb']:>9.1f}  {r['pixels_sha256'][:16]}")
    if len(rows) == 2:
        same = rows[0]["pixels_sha256"] == rows[1]["pixels_sha256"]
        print(f"pixels identical: {'yes' if same else 'NO'}; peak RSS ratio old/new "
              f"{rows[0]['peak_above_mb'] / max(rows[1]['peak_above_mb'], 1e-9):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
