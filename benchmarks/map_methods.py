"""Time of each map method on a cached trace (the vision tower is not rerun).

    python benchmarks/map_methods.py [--model ViT-B-16] [--runs 5] [--all]

Random weights, 224 px, CPU. One trace with every layer's attention and hidden states is taken
once; each method then runs from it (methods needing gradients or extra passes are skipped unless
``--all``). Text is encoded as typed (no templates) so the figure is the method's own cost.
Prints the median over ``--runs`` runs in milliseconds, next to the cost of the traced forward.
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
from explorer.core.jobs import CancelToken, run_sync
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.host import PluginHost
from explorer.testing.images import png_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--all", action="store_true", help="also time gradient / extra-pass methods")
    args = ap.parse_args()
    backend = ClipBackend.load(ClipSpec(model=args.model, device="cpu"))
    host = PluginHost()
    image = load_image(png_bytes(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)))
    t = time.perf_counter()
    trace = run_sync(backend.trace(image, CaptureSpec.everything(backend.info.n_layers)))
    forward = time.perf_counter() - t
    prompts = ("a photo of a dog", "a photo of a cat")
    trace = trace.with_text(backend.encode_text(prompts))
    print(f"{args.model}, CPU {torch.get_num_threads()} threads; traced forward (all layers): {1000 * forward:.0f} ms")
    print(f"{'method':<28} {'median ms':>10}")
    for info in host.methods(backend="clip"):
        if info.family not in ("attention", "similarity", "attribution"):
            continue
        heavy = info.requires("gradients") or info.requires("passes")
        if heavy and not args.all:
            continue
        model = host.params_model(info.id)
        values = {"templates": "none"} if "templates" in model.model_fields else {}
        params = host.make_params(info.id, values)
        target = Target(prompts=prompts if info.requires("text") else ())
        times = []
        try:
            for _ in range(args.runs):
                t = time.perf_counter()
                run_sync(host.run(info.id, trace, params, target=target, cancel=CancelToken(), backend=backend))
                times.append(time.perf_counter() - t)
        except (ValueError, RuntimeError) as exc:
            print(f"{info.id:<28} {'n/a':>10}  ({str(exc).splitlines()[0]})")
            continue
        print(f"{info.id:<28} {1000 * statistics.median(times):10.1f}")


if __name__ == "__main__":
    main()
