"""Speed of token reduction on ViT-B-16 at 224 px (random weights, CPU).

    python benchmarks/reduction.py [--runs 5]

1. Selections of 8 methods from one cached trace (first-stage decisions, no tower pass) against
   one plain forward: target <= 1/4.
2. An executed plan at keep 0.5 from block 4 (Top-K; tokens really removed) against the full
   forward, both from the image: target < 1.
Medians over ``--runs``; each case runs in turn with a plain forward in one process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from explorer.backends.clip import ClipBackend
from explorer.backends.specs import ClipSpec
from explorer.core.image_io import load_image
from explorer.core.jobs import run_sync
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.host import PluginHost
from explorer.testing.images import png_bytes

METHODS = ["pruning.random", "pruning.spatial", "pruning.topk", "pruning.evit", "merging.tome", "pruning.divprune",
           "pruning.dart", "merging.kmedoids"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    backend = ClipBackend.load(ClipSpec(model=args.model, device="cpu"))
    host = PluginHost()
    image = load_image(png_bytes(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)))
    prepared = backend.prepare(image)
    trace = run_sync(backend.trace(prepared, CaptureSpec.everything(backend.info.n_layers)))
    available = [m for m in METHODS if m in {x.id for x in host.methods()}]
    methods = [(host.load(m), host.make_params(m, {"keep": 0.5, "layer": 4})) for m in available]
    topk = host.load("pruning.topk")
    topk_params = host.make_params("pruning.topk", {"keep": 0.5, "layer": 4})
    stages = topk.stages(topk_params, backend.info)

    def plain():
        with torch.inference_mode():
            backend.model.encode_image(prepared.pixels)

    def selections():
        for method, params in methods:
            method.select(trace, params, backend)

    def executed():
        backend.run_reduced(prepared, stages, lambda st: topk.reduce(st, topk_params))

    def executed_from_trace():
        backend.run_reduced(trace, stages, lambda st: topk.reduce(st, topk_params))

    def measure(cases: dict) -> dict[str, float]:
        """Medians of ``cases`` run in turn ``--runs`` times (the order rotating)."""
        for fn in cases.values():
            fn()
        times = {k: [] for k in cases}
        items = list(cases.items())
        for r in range(args.runs):
            for name, fn in items[r % len(items):] + items[: r % len(items)]:
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        return {k: statistics.median(v) for k, v in times.items()}

    print(f"{args.model}, CPU {torch.get_num_threads()} threads, median of {args.runs}; methods: {', '.join(available)}")
    # each target compares two things measured in turn, so that neither inherits the other's
    # allocator and BLAS-thread state more than the other does
    for cases in ({"plain forward": plain, f"{len(methods)} selections from the cached trace": selections},
                  {"plain forward": plain, "executed Top-K keep 0.5 from block 4 (from the image)": executed},
                  {"plain forward": plain, "executed Top-K keep 0.5 from block 4 (from the cached trace)": executed_from_trace}):
        med = measure(cases)
        base = med["plain forward"]
        for name, m in med.items():
            if name != "plain forward":
                print(f"  {name:<62} {1000 * m:8.1f} ms   ratio {m / base:5.2f}   (plain forward {1000 * base:.1f} ms)")


if __name__ == "__main__":
    main()
