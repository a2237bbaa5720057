"""Shared by the gradient methods (Chefer, Grad-CAM, gScoreCAM): the prompt whose logit is explained."""

from __future__ import annotations

import numpy as np

from explorer.plugin_host.api import ParamError

__all__ = ["prompt_inputs"]


def prompt_inputs(trace, params, backend, title: str):
    """``(prepared image, text embedding (E,), prompt)`` for a gradient method's run."""
    if backend is None:
        raise ParamError(f"{title} needs the loaded model")
    if trace.text is None or not trace.text.prompts:
        raise ParamError(f"{title} needs a text prompt")
    n = len(trace.text.prompts)
    if params.prompt_index >= n:
        raise ParamError(f"prompt_index {params.prompt_index}: only {n} prompt(s) given")
    prepared = backend.prepared_for(trace)
    return prepared, np.asarray(trace.text.embeddings[params.prompt_index]), trace.text.prompts[params.prompt_index]
