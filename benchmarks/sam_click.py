"""Click-to-mask time with a cached embedding, and time to the first mask on a new image.

    python benchmarks/sam_click.py [--arch vit_b] [--clicks 30]

A SAM of the official ViT-B shape with random weights (segment_anything's registry builder, no
checkpoint), a 768x1024 image. The first mask includes the image encoder; every later click
runs only the prompt encoder and mask decoder on the cached embedding (SamBackend.predict, as the
window does). Target for the click: a median of at most 60 ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from explorer.backends.sam import SamBackend
from explorer.backends.sam_build import _official_config
from explorer.backends.specs import SamSpec
from explorer.core.image_io import image_from_array
from explorer.core.jobs import run_sync


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vit_b")
    ap.add_argument("--clicks", type=int, default=30)
    args = ap.parse_args()
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    model = sam_model_registry[args.arch](checkpoint=None).eval()
    import tempfile

    backend = SamBackend(SamSpec(model=args.arch), model, _official_config(args.arch), torch.device("cpu"),
                         disk_cache=tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    image = image_from_array(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8))
    t = time.perf_counter()
    emb = run_sync(backend.embedding_job(image))
    first = backend.predict(emb, points=[[500, 400]])
    t_first = time.perf_counter() - t
    times = []
    for _ in range(args.clicks):
        x, y = rng.integers(0, 1024), rng.integers(0, 768)
        t = time.perf_counter()
        emb = run_sync(backend.embedding_job(image))  # from the memory cache
        backend.predict(emb, points=[[x, y]])
        times.append(time.perf_counter() - t)
    assert backend.encoder_calls == 1 and len(first) == 3
    print(f"SAM {args.arch} (random weights), 768x1024 image, CPU {torch.get_num_threads()} threads")
    print(f"  first mask on a new image (encoder + decoder): {t_first:.2f} s")
    print(f"  click to mask with the cached embedding: median {1000 * statistics.median(times):.1f} ms, "
          f"min {1000 * min(times):.1f} ms over {args.clicks} clicks (3 candidate masks at full size)")


if __name__ == "__main__":
    main()
