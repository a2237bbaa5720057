"""Raw attention: the post-softmax attention row of one query token over the image tokens.

``A[l, h, q, :]`` (rows = queries, columns = keys) for block ``l``; ``head = -1`` averages the
heads. The query is the target's token (a clicked patch) or the [CLS] token. Values are
probabilities, so the map sums to at most 1 over the image tokens (the rest goes to [CLS] and
other prefix tokens). High-norm sink tokens can be left out of the display. Computed where the
trace lives (array API); only the ``(n_image_tokens,)`` map comes to the host.

The default (last block, mean of heads, [CLS] query) is the raw-attention baseline of Chefer, Gur &
Wolf, Transformer Interpretability Beyond Attention Visualization (CVPR 2021), official code
``hila-chefer/Transformer-Explainability``, ``baselines/ViT/ViT_orig_LRP.py::VisionTransformer.relprop``
with ``method="last_layer_attn"`` (``attn[0].clamp(min=0).mean(heads)[0, 1:]``; the clamp is a no-op
on probabilities).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from explorer.core.jobs import Progress
from explorer.core.results import Heatmap
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.api import Method, ParamError, resolve_layer
from explorer_plugins.common.attention import detect_sinks, fuse_heads, mask_sinks, query_index


class RawAttention(Method):
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        layer: int = Field(-1, description="Block (negative counts from the last).", json_schema_extra={"role": "layer"})
        head: int = Field(-1, ge=-1, description="Attention head; -1 averages all heads.", json_schema_extra={"role": "head"})
        exclude_sinks: bool = Field(False, description="Leave high-norm sink tokens out of the map.")

    def capture(self, params, model, target):
        layer = resolve_layer(params.layer, model.n_layers)
        hidden = {layer + 1} if params.exclude_sinks else set()
        return CaptureSpec(attention_layers={layer}, hidden_layers=hidden)

    def run(self, trace, params, *, target, cancel, backend=None):
        yield Progress(0.0, "raw attention")
        layer = resolve_layer(params.layer, trace.model.n_layers)
        q = query_index(trace.layout, target)
        row = trace.attention_row(layer, q)  # (H, N), where the trace lives
        if params.head >= row.shape[0]:
            raise ParamError(f"head {params.head} out of range: the model has {row.shape[0]} heads")
        values = trace.layout.gather(fuse_heads(row, "mean") if params.head < 0 else row[params.head])
        sinks = detect_sinks(trace, layer + 1) if params.exclude_sinks else []
        if len(sinks):
            values = mask_sinks(values, sinks)
        head = "mean of heads" if params.head < 0 else f"head {params.head}"
        who = "[CLS]" if q == trace.layout.cls_index else f"token {q}"
        return Heatmap(
            layout=trace.layout,
            token_values=values,
            label=f"raw attention of {who}, layer {layer}, {head}",
            meta={"layer": layer, "head": params.head, "query": q, "sinks": [int(s) for s in sinks]},
        )
