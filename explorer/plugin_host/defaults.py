"""A method's starting parameters for the loaded model, the same in the window and the CLI.

A plugin's parameter model carries defaults fixed for the model its paper used
(:class:`~explorer.plugin_host.reduction.ReductionParams` reduces at block 4, ViT-B's third of
12; ToMe merges from block 0). On a shallower model a fixed block can land at or past the last
block, where reducing leaves the [CLS] output unchanged and every method reports cosine 1 and
KL 0, so that pruning looks free. CLIP pruning and merging methods therefore start at
:func:`~explorer.plugin_host.reduction.default_layer` of the loaded model (a third of its depth)
unless a block is given; the window's compare view, ``token-explorer compare``, ``token-explorer
run`` and :func:`~explorer.plugin_host.compare.compare_job` all take it from here.
"""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel

from explorer.core.trace import ModelInfo

from .host import PluginHost
from .reduction import default_layer, first_layer

__all__ = ["REDUCTION_FAMILIES", "is_clip_reduction", "default_params", "compare_layer"]

REDUCTION_FAMILIES = ("pruning", "merging")


def is_clip_reduction(host: PluginHost, method_id: str) -> bool:
    """Whether ``method_id`` is a pruning or merging method of the CLIP tower (its manifest's
    family is ``pruning``/``merging`` and its backends include ``clip``)."""
    info = host.method(method_id)
    return info.family in REDUCTION_FAMILIES and "clip" in info.contribution.backends


def default_params(host: PluginHost, method_id: str, model_info: ModelInfo | None,
                   values: Mapping[str, Any] | None = None) -> BaseModel:
    """The method's parameters: the plugin's defaults updated by ``values`` (typed values or the
    CLI's strings), except that a CLIP pruning/merging method starts at ``layer =
    default_layer(model_info.n_layers)`` unless ``values`` sets ``layer`` (no model loaded yet:
    the plugin's own default).

    Raises
    ------
    ParamError
        A value is unknown or invalid for the method's parameter model.
    """
    values = dict(values or {})
    if (model_info is not None and "layer" not in values and is_clip_reduction(host, method_id)
            and "layer" in host.params_model(method_id).model_fields):
        values["layer"] = default_layer(model_info.n_layers)
    return host.make_params(method_id, values)


def compare_layer(model_info: ModelInfo, layer: int | None = None) -> int:
    """The block a comparison of reduction methods uses on this model: ``layer`` (negative counts
    from the last, too large is clamped to the last block, as the methods resolve it), else
    :func:`default_layer`. ``ParamError`` for a negative block before the first."""
    if layer is None:
        return default_layer(model_info.n_layers)
    return first_layer(int(layer), model_info.n_layers)
