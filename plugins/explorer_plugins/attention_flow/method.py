"""Attention flow (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).

The attention of the used blocks ``s..e`` (``L = e - s + 1`` of them) becomes a layered directed
graph with ``N`` nodes per layer and ``L + 1`` layers: node ``(ℓ, i)`` is token ``i`` after the
``ℓ``-th used block (``ℓ = 0``: the input of block ``s``). The edge from ``(ℓ, i)`` to
``(ℓ - 1, j)`` has the capacity ``Â_ℓ[i, j]``, the head-fused attention of that block with the
residual added, ``Â = (Ā + I) / rowsum`` (the same matrix as rollout,
:func:`explorer_plugins.common.attention.residual_augment`, computed where the trace lives; only
these ``L`` head-fused ``(N, N)`` matrices come to the host, where the max-flows run). The flow of input token ``j``
to the output node ``(L, q)`` is the value of a maximum flow from ``(L, q)`` to ``(0, j)``; as in
the official ``compute_flows`` (``samiraabnar/attention_flow``, ``attention_graph_util.py``) the
flows of one output node are divided by their sum. Only the query's output node is computed
(the [CLS] token, or the clicked token): one max-flow per input token.

Max-flow. The official code runs networkx Edmonds–Karp on float capacities. Here the capacities
are rounded *down* to integer multiples of ``1 / FLOW_SCALE`` (``FLOW_SCALE = 2**28``, a step of
about 3.7e-9) and solved exactly with Dinic's algorithm (``scipy.sparse.csgraph.maximum_flow``).
Rounding down keeps every capacity at or below its float value, so the quantised flow never
exceeds the float flow and never exceeds 1 (the source's capacities sum to at most 1); it is
below the float flow by less than ``1 / FLOW_SCALE`` per edge of a minimum cut.

Graph size: ``L·N²`` edges (the top layer keeps only the query's row). Measured with
``benchmarks/attention_flow.py`` on a busy 2-core CPU: 145 tokens × 6 layers ≈ 1.2–1.8 s,
197 tokens × 12 layers (ViT-B/16 at 224 px) ≈ 8–10 s for the [CLS] node (networkx Edmonds–Karp,
the official solver, extrapolates to over two hours for 145 × 6). The ``max_tokens`` parameter
(default 160) refuses longer sequences unless raised.
"""

from __future__ import annotations

from typing import Iterator, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from explorer.core.jobs import Progress
from explorer.core.results import Heatmap
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.api import Method, ParamError, resolve_layer
from explorer.core.arrays import to_host
from explorer_plugins.common.attention import fuse_heads, query_index, residual_augment

__all__ = ["FLOW_SCALE", "flow_graph", "iter_node_flows", "node_flows", "AttentionFlow"]

FLOW_SCALE = 2**28  # capacities are floor(Â · FLOW_SCALE); every flow stays below 2**31


def flow_graph(a_hats: Sequence[np.ndarray], query: int, scale: int = FLOW_SCALE):
    """The layered attention graph with integer capacities.

    Parameters
    ----------
    a_hats
        Residual-augmented attention ``(N, N)`` of the used blocks, first block first (rows =
        queries, columns = keys, each row summing to 1).
    query
        Sequence index ``q`` of the output node ``(L, q)``.
    scale
        Capacities are ``floor(Â · scale)``.

    Returns
    -------
    graph, source
        ``graph``: scipy CSR array ``((L + 1)·N, (L + 1)·N)`` of int32 capacities, node
        ``(ℓ, i)`` at index ``ℓ·N + i``, edges from layer ``ℓ`` to layer ``ℓ - 1``; in the top
        layer only the source's edges are kept (the other top nodes cannot carry its flow).
        ``source``: the index of ``(L, q)``. The sink of input token ``j`` is index ``j``.
    """
    from scipy.sparse import csr_array

    if not a_hats:
        raise ParamError("attention flow needs at least one layer")
    L = len(a_hats)
    n = int(a_hats[0].shape[-1])
    if not 0 <= query < n:
        raise ParamError(f"query token {query} outside a sequence of {n}")
    if not 0 < scale < 2**31:  # edge flows, and the total (at most scale), must fit int32
        raise ValueError("flow scale must be a positive int32")
    rows, cols, caps = [], [], []
    for layer in range(1, L + 1):
        a = np.asarray(a_hats[layer - 1], dtype=np.float64)
        if a.shape != (n, n):
            raise ValueError(f"attention of layer {layer - 1} is {a.shape}, expected {(n, n)}")
        src = np.arange(n) if layer < L else np.array([query])
        c = np.floor(np.clip(a[src], 0.0, 1.0) * scale).astype(np.int64)
        r, k = np.nonzero(c)
        rows.append(layer * n + src[r])
        cols.append((layer - 1) * n + k)
        caps.append(c[r, k])
    size = (L + 1) * n
    graph = csr_array(
        (np.concatenate(caps).astype(np.int32), (np.concatenate(rows), np.concatenate(cols))), shape=(size, size)
    )
    graph.sort_indices()
    return graph, L * n + query


def iter_node_flows(a_hats: Sequence[np.ndarray], query: int, scale: int = FLOW_SCALE) -> Iterator[float]:
    """Yield the maximum flow from ``(L, query)`` to each input node ``(0, j)``, ``j = 0..N-1``.

    Values are in attention units (capacities divided by ``scale``), not normalised; each is at
    most 1. A generator so that callers can check cancellation between flows.
    """
    from scipy.sparse.csgraph import maximum_flow

    graph, source = flow_graph(a_hats, query, scale)
    n = int(a_hats[0].shape[-1])
    into_input = np.asarray(graph[:, :n].sum(0)).reshape(-1)  # capacity into each input node
    for j in range(n):
        if into_input[j] == 0:  # nothing can reach this input node
            yield 0.0
            continue
        yield maximum_flow(graph, source, j, method="dinic").flow_value / scale


def node_flows(a_hats: Sequence[np.ndarray], query: int, normalize: bool = True,
               scale: int = FLOW_SCALE) -> np.ndarray:
    """``(N,)`` flows of every input token to the output node ``(L, query)``.

    With ``normalize`` (the official ``compute_flows``) they are divided by their sum.
    """
    flows = np.fromiter(iter_node_flows(a_hats, query, scale), dtype=np.float64, count=a_hats[0].shape[-1])
    if normalize and flows.sum() > 0:
        flows = flows / flows.sum()
    return flows


class AttentionFlow(Method):
    """Attention flow of the query's output node; see the module docstring."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        start_layer: int = Field(0, description="First block in the graph (the paper: 0).", json_schema_extra={"role": "layer"})
        end_layer: int = Field(-1, description="Last block in the graph (negative counts from the last).", json_schema_extra={"role": "layer"})
        head_fusion: Literal["mean", "max", "min"] = Field("mean", description="How heads are fused (the paper: mean).")
        normalize: bool = Field(True, description="Divide the flows by their sum over the sequence (the official compute_flows).")
        max_tokens: int = Field(
            160, ge=2, le=4096,
            description="Refuse longer sequences: one max-flow per token, cost grows about as tokens^3 x layers "
                        "(measured on 2 CPU cores: 145 tokens x 6 blocks ~1.5 s, 197 x 12 ~9 s).",
        )

    def _layers(self, params, n_layers: int) -> list[int]:
        s = resolve_layer(params.start_layer, n_layers, "start_layer")
        e = resolve_layer(params.end_layer, n_layers, "end_layer")
        if s > e:
            raise ParamError(f"start_layer {s} is after end_layer {e}")
        return list(range(s, e + 1))

    def capture(self, params, model, target):
        return CaptureSpec(attention_layers=self._layers(params, model.n_layers))

    def run(self, trace, params, *, target, cancel, backend=None):
        cancel.raise_if_cancelled()
        layers = self._layers(params, trace.model.n_layers)
        if trace.attention_rows is not None:
            raise ParamError("attention flow needs every attention row; this trace kept only some")
        n = trace.layout.n_tokens
        if n > params.max_tokens:
            raise ParamError(
                f"attention flow on {n} tokens x {len(layers)} blocks is too slow (max_tokens={params.max_tokens}); "
                f"raise max_tokens to wait for it, or use attention rollout (attention.rollout)"
            )
        q = query_index(trace.layout, target)
        a_hats = [to_host(residual_augment(fuse_heads(trace.attention(l), params.head_fusion)), np.float64)
                  for l in layers]
        yield Progress(0.0, f"attention flow: {n} max-flows")
        flows = np.zeros(n, dtype=np.float64)
        step = max(1, n // 50)
        for j, value in enumerate(iter_node_flows(a_hats, q)):
            flows[j] = value
            cancel.raise_if_cancelled()
            if (j + 1) % step == 0 or j + 1 == n:
                yield Progress((j + 1) / n, f"attention flow {j + 1}/{n}")
        raw_total = float(flows.sum())
        if params.normalize and raw_total > 0:
            flows = flows / raw_total
        who = "[CLS]" if q == trace.layout.cls_index else f"token {q}"
        return Heatmap(
            layout=trace.layout,
            token_values=trace.layout.gather(flows),
            label=f"attention flow of {who}, layers {layers[0]}-{layers[-1]}",
            meta={"layers": layers, "query": q, "normalized": params.normalize, "raw_total": raw_total,
                  "flow_scale": FLOW_SCALE},
        )
