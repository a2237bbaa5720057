"""Cost of a traced forward (attention of all layers kept) relative to a plain ``encode_image``.

    python benchmarks/trace_overhead.py [--model ViT-B-16] [--runs 15]

Random weights (no download), one process, the two measured interleaved on the same input;
prints the medians and their ratio. The issue's target for ViT-B-16 at 224 px: ratio <= 1.3.
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
from explorer.testing.images import png_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = ClipBackend.load(ClipSpec(model=args.model, device="cpu"))
    rng = np.random.default_rng(0)
    image = load_image(png_bytes(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)))
    prepared = backend.prepare(image)
    L = backend.info.n_layers
    attn_all = CaptureSpec(attention_layers=range(L))
    everything = CaptureSpec.everything(L)

    def plain():
        with torch.inference_mode():
            backend.model.encode_image(prepared.pixels)

    def traced(spec):
        return lambda: run_sync(backend.trace(prepared, spec))

    cases = {"encode_image": plain, "trace: attention of all layers": traced(attn_all),
             "trace: attention + hidden states of all layers": traced(everything)}
    for fn in cases.values():  # warm up
        fn()
    times = {k: [] for k in cases}
    for _ in range(args.runs):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["encode_image"])
    print(f"{args.model} at {backend.info.input_size[0]} px, CPU, {torch.get_num_threads()} threads, "
          f"median of {args.runs} runs:")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<48} {1000 * med:8.1f} ms   ratio {med / base:5.2f}")


if __name__ == "__main__":
    main()
