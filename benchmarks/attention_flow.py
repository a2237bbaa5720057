"""Time attention flow (``attention.flow``) for the [CLS] output node.

    python benchmarks/attention_flow.py [--runs 3] [--sharpness 3] [--networkx-sinks 3]
    python benchmarks/attention_flow.py --model ViT-B-16      # also a traced random-weight model

Random attention: per block and head, ``softmax(sharpness * g)`` with ``g`` standard normal
(sharpness 0 = uniform, 3 = peaky like a trained ViT), head-fused by the mean and
residual-augmented exactly as the plugin does. Cases: 145 tokens x 6 blocks (a 12x12 grid) and
197 tokens x 12 blocks (ViT-B/16 at 224 px). Prints the median time of the whole flow row (one
Dinic max-flow per input token). With ``--networkx-sinks k`` it also times networkx
Edmonds-Karp on the official float graph (the reference implementation's solver) for ``k`` sinks
and extrapolates to the full row (only for graphs of at most 200k edges).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from explorer_plugins.attention_flow.method import node_flows
from explorer_plugins.attention_rollout.method import residual_augment


def random_attention(rng, n_tokens: int, n_layers: int, heads: int, sharpness: float) -> list[np.ndarray]:
    out = []
    for _ in range(n_layers):
        g = sharpness * rng.standard_normal((heads, n_tokens, n_tokens))
        a = np.exp(g - g.max(-1, keepdims=True))
        out.append(residual_augment((a / a.sum(-1, keepdims=True)).mean(0)))
    return out


def time_networkx(a_hats: list[np.ndarray], sinks: int) -> float:
    import networkx as nx

    n, L = a_hats[0].shape[0], len(a_hats)
    g = nx.DiGraph()
    for layer in range(1, L + 1):
        a = a_hats[layer - 1]
        for i in range(n):
            for j in range(n):
                g.add_edge(layer * n + i, (layer - 1) * n + j, capacity=float(a[i, j]))
    start = time.perf_counter()
    for j in range(sinks):
        nx.maximum_flow_value(g, L * n, j, flow_func=nx.algorithms.flow.edmonds_karp)
    return (time.perf_counter() - start) / sinks * n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sharpness", type=float, default=3.0)
    ap.add_argument("--networkx-sinks", type=int, default=0)
    ap.add_argument("--model", default=None, help="also trace this open_clip architecture (random weights)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for n, L in [(145, 6), (197, 12)]:
        a_hats = random_attention(rng, n, L, 12, args.sharpness)
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            flows = node_flows(a_hats, 0)
            times.append(time.perf_counter() - start)
        line = f"{n} tokens x {L} blocks: {statistics.median(times):.2f} s per [CLS] row (median of {args.runs})"
        line += f", max normalised flow {flows.max():.4f}"
        if args.networkx_sinks and L * n * n <= 200_000:  # the networkx graph of 197 x 12 takes GBs
            line += f"; networkx Edmonds-Karp ~{time_networkx(a_hats, args.networkx_sinks):.0f} s (extrapolated)"
        print(line, flush=True)
    if args.model:
        from explorer.backends.clip import ClipBackend
        from explorer.backends.specs import ClipSpec
        from explorer.core.image_io import load_image
        from explorer.core.jobs import CancelToken, run_sync
        from explorer.core.target import Target
        from explorer.plugin_host.host import PluginHost
        from explorer.testing.images import png_bytes

        backend = ClipBackend.load(ClipSpec(model=args.model, device="cpu"))
        host = PluginHost()
        params = host.make_params("attention.flow", {"max_tokens": 4096})
        image = load_image(png_bytes(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)))
        trace = run_sync(backend.trace(image, host.load("attention.flow").capture(params, backend.info, Target())))
        start = time.perf_counter()
        run_sync(host.run("attention.flow", trace, params, target=Target(), cancel=CancelToken()))
        print(f"{args.model} (random weights, {trace.n_tokens} tokens x {backend.info.n_layers} blocks): "
              f"{time.perf_counter() - start:.2f} s for the plugin", flush=True)


if __name__ == "__main__":
    main()
