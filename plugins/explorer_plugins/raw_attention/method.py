"""Raw attention: the post-softmax attention row of one query token over the image tokens.

``A[l, h, q, :]`` (rows = queries, columns = keys) for block ``l``; ``head = -1`` averages the
heads. The query is the target's token (a clicked patch) or the [CLS] token. Values are
probabilities, so the map sums to at most 1 over the image tokens (the rest goes to [CLS] and
other prefix tokens).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from explorer.core.jobs import Progress
from explorer.core.results import Heatmap
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.api import Method, ParamError, resolve_layer


def query_index(layout, target) -> int:
    """Sequence index of the query token: the target's token, else [CLS]."""
    if target.query is not None:
        if not 0 <= target.query < layout.n_tokens:
            raise ParamError(f"query token {target.query} outside a sequence of {layout.n_tokens}")
        return int(target.query)
    cls = layout.cls_index
    if cls is None:
        raise ParamError("this model has no [CLS] token: click a patch to choose the query")
    return cls


class RawAttention(Method):
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        layer: int = Field(-1, description="Block (negative counts from the last).", json_schema_extra={"role": "layer"})
        head: int = Field(-1, ge=-1, description="Attention head; -1 averages all heads.", json_schema_extra={"role": "head"})

    def capture(self, params, model, target):
        return CaptureSpec(attention_layers={resolve_layer(params.layer, model.n_layers)})

    def run(self, trace, params, *, target, cancel, backend=None):
        yield Progress(0.0, "raw attention")
        layer = resolve_layer(params.layer, trace.model.n_layers)
        q = query_index(trace.layout, target)
        row = trace.attention_row(layer, q)  # (H, N)
        if params.head >= row.shape[0]:
            raise ParamError(f"head {params.head} out of range: the model has {row.shape[0]} heads")
        values = row.mean(0) if params.head < 0 else row[params.head]
        head = "mean of heads" if params.head < 0 else f"head {params.head}"
        who = "[CLS]" if q == trace.layout.cls_index else f"token {q}"
        return Heatmap(
            layout=trace.layout,
            token_values=trace.layout.gather(values),
            label=f"raw attention of {who}, layer {layer}, {head}",
            meta={"layer": layer, "head": params.head, "query": q},
        )
