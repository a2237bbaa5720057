"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020;
official code ``samiraabnar/attention_flow``).

Per block: fuse heads (mean by default), optionally zero the lowest ``discard_ratio`` of the
entries, add the identity for the residual and renormalise rows: ``Â = (Ā + I) / rowsum``, as the
official ``compute_joint_attention`` does (checked against it: ``tests/golden``).

``discard_ratio`` and the ``max``/``min`` head fusions are not in the paper; they come from
``jacobgil/vit-explain`` (``vit_rollout.py``), which this follows in intent but not in two details:
the whole [CLS] column (every token's attention to [CLS]) is protected from the discard, where
vit-explain protects the single [CLS]→[CLS] entry; and rows are renormalised after adding the
identity, where vit-explain's ``a / a.sum(dim=-1)`` broadcasts the row sums over the columns (so its
rows do not sum to 1). Keeping ``Â`` row-stochastic keeps rollout the joint attention the paper
defines. The [CLS] column is protected whatever the query. Multiply upwards:
``R = Â_end ⋯ Â_start``. The map is the query row of ``R`` (the [CLS] token by default) over the
image tokens. Every row of ``Â`` and ``R`` sums to 1.

Only the query's row is needed, so the run computes ``e_q Â_end ⋯ Â_start`` as a chain of
vector-matrix products (``O(L·N²)``), where the trace lives (array API: numpy on the CPU,
the model's device otherwise; float64 on the CPU, float32 on a device).
"""

from __future__ import annotations

from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from explorer.core.jobs import Progress
from explorer.core.results import Heatmap
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.api import Method, ParamError, resolve_layer
from explorer_plugins.common.attention import (detect_sinks, fuse_heads, mask_sinks, query_index, residual_augment,
                                               rollout_row)

__all__ = ["Rollout", "residual_augment", "rollout"]


def rollout(attentions: Sequence, head_fusion: str = "mean", discard_ratio: float = 0.0, keep: int | None = 0):
    """Joint attention ``R (N, N)`` of a list of per-block ``(H, N, N)`` attentions, first block first."""
    joint = None
    for attn in attentions:
        a_hat = residual_augment(fuse_heads(attn, head_fusion), discard_ratio, keep)
        joint = a_hat if joint is None else a_hat @ joint
    if joint is None:
        raise ParamError("rollout needs at least one layer")
    return joint


class Rollout(Method):
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        start_layer: int = Field(0, description="First block multiplied in.", json_schema_extra={"role": "layer"})
        end_layer: int = Field(-1, description="Last block multiplied in (negative counts from the last).", json_schema_extra={"role": "layer"})
        head_fusion: Literal["mean", "max", "min"] = Field("mean", description="How heads are fused (the paper: mean).")
        discard_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of the lowest attention entries "
                                     "zeroed per block, the [CLS] column kept (vit-explain's option; 0 = the paper).")
        exclude_sinks: bool = Field(False, description="Leave high-norm sink tokens out of the map.")

    def _layers(self, params, n_layers: int) -> list[int]:
        s = resolve_layer(params.start_layer, n_layers, "start_layer")
        e = resolve_layer(params.end_layer, n_layers, "end_layer")
        if s > e:
            raise ParamError(f"start_layer {s} is after end_layer {e}")
        return list(range(s, e + 1))

    def capture(self, params, model, target):
        layers = self._layers(params, model.n_layers)
        return CaptureSpec(attention_layers=layers, hidden_layers={layers[-1] + 1} if params.exclude_sinks else set())

    def run(self, trace, params, *, target, cancel, backend=None):
        layers = self._layers(params, trace.model.n_layers)
        if trace.attention_rows is not None:
            raise ParamError("rollout needs every attention row; this trace kept only some")
        q = query_index(trace.layout, target)
        a_hats = []
        for i, l in enumerate(layers):
            cancel.raise_if_cancelled()
            a_hats.append(residual_augment(fuse_heads(trace.attention(l), params.head_fusion), params.discard_ratio,
                                           trace.layout.cls_index))
            if (i + 1) % 4 == 0:
                yield Progress((i + 1) / len(layers), f"rollout layer {l}")
        who = "[CLS]" if q == trace.layout.cls_index else f"token {q}"
        values = trace.layout.gather(rollout_row(a_hats, q))
        sinks = detect_sinks(trace, layers[-1] + 1) if params.exclude_sinks else []
        if len(sinks):
            values = mask_sinks(values, sinks)
        return Heatmap(
            layout=trace.layout,
            token_values=values,
            label=f"rollout of {who}, layers {layers[0]}-{layers[-1]}",
            meta={"layers": layers, "query": q, "sinks": [int(s) for s in sinks]},
        )
