"""Conformance checks for method plugins, for this project's tests and for plugin authors' own
(in the spirit of ``captum.testing``): build a tiny model with :mod:`explorer.testing.tiny`, then
call these on your method. Each check raises ``AssertionError`` with a one-line reason.

* :func:`check_cancellation` drives ``method.run`` itself, without the host, with its cancel token
  set, checking the token at every step the method yields, as the host does. A method passes
  when it stops before returning a result: it calls ``cancel.raise_if_cancelled()`` (or reads
  ``cancel.cancelled``) between its steps, or yields :class:`~explorer.core.jobs.Progress` so that
  the host can stop it there. A method that computes its result without ever doing either cannot
  be cancelled while it runs, and fails.
* :func:`check_result` runs the method on a trace that holds exactly what its ``capture()``
  declared: the result is one of the result types, its layout is the trace's, its values are
  finite where they are not NaN-marked, and the host's own checks
  (:func:`~explorer.plugin_host.host.check_result`) pass.
* :func:`check_deterministic`: two runs give identical values.
* :func:`check_params_round_trip`: the default parameters survive the string form the command line
  and the window use, and every parameter has help text.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from explorer.core.jobs import CancelToken, Cancelled, run_sync
from explorer.core.results import Heatmap, LabelMap, TokenSelection
from explorer.core.target import Target

__all__ = ["check_cancellation", "check_result", "check_deterministic", "check_params_round_trip", "traced_for"]


def traced_for(host, method_id: str, backend, image, prompts: tuple[str, ...] = ("a red circle", "a blue square"),
               params=None):
    """``(method, params, target, trace)``: a trace of ``image`` holding exactly what the method's
    ``capture()`` declares (and the prompts' text encoding when it needs text)."""
    info = host.method(method_id)
    method = host.load(method_id)
    params = params or host.make_params(method_id)
    target = Target(prompts=prompts if info.requires("text") else ())
    capture = method.capture(params, backend.info, target)
    trace = run_sync(backend.trace(image, capture))
    if target.prompts:
        trace = trace.with_text(backend.encode_text(target.prompts))
    if info.requires("model") and hasattr(backend, "prepare"):
        backend.prepare(image)
    return method, params, target, trace


def check_cancellation(method, trace, params, target: Target, backend: Any = None, name: str = "") -> None:
    """See the module docstring."""
    name = name or type(method).__name__
    token = CancelToken()
    token.cancel("conformance check")
    try:
        job = method.run(trace, params, target=target, cancel=token, backend=backend)
    except Cancelled:
        return
    if not hasattr(job, "__next__"):
        raise AssertionError(f"{name}: run() returned a result with its cancel token set (it neither checks "
                             "`cancel` nor yields progress, so it cannot be stopped while it runs)")
    try:
        while True:
            next(job)
            token.raise_if_cancelled()  # what the host does at every step the method yields
    except Cancelled:
        return
    except StopIteration:
        raise AssertionError(f"{name}: ran to its result with its cancel token set (check `cancel` or yield "
                             "Progress between steps, so that Cancel can stop it)") from None
    finally:
        job.close()


def _values(result) -> np.ndarray:
    if isinstance(result, Heatmap):
        return result.token_values if result.token_values is not None else result.pixel_values
    if isinstance(result, LabelMap):
        return result.labels
    if isinstance(result, TokenSelection):
        return result.kept
    raise AssertionError(f"unexpected result type {type(result).__name__}")


def check_result(host, method_id: str, backend, image, params=None):
    """See the module docstring; returns the result."""
    from explorer.plugin_host.host import check_result as host_check

    method, params, target, trace = traced_for(host, method_id, backend, image, params=params)
    result = run_sync(host.run(method_id, trace, params, target=target, backend=backend))
    assert result.layout.n_image_tokens == trace.layout.n_image_tokens, f"{method_id}: layout differs from the trace's"
    assert result.layout.original_size == image.size, f"{method_id}: layout is not over the image"
    values = np.asarray(_values(result), dtype=np.float64)
    assert not np.isinf(values).any(), f"{method_id}: infinite values"
    problem = host_check(result)
    assert problem is None, f"{method_id}: {problem}"
    return result


def check_deterministic(host, method_id: str, backend, image, params=None) -> None:
    a = check_result(host, method_id, backend, image, params)
    b = check_result(host, method_id, backend, image, params)
    np.testing.assert_array_equal(_values(a), _values(b), err_msg=f"{method_id}: two runs differ")


def check_params_round_trip(host, method_id: str) -> None:
    from explorer.plugin_host.api import params_to_strings, parse_params

    model = host.params_model(method_id)
    p = model()
    assert parse_params(model, params_to_strings(p)) == p, f"{method_id}: parameters do not survive their strings"
    for f in p.model_dump():
        assert model.model_fields[f].description, f"{method_id}: parameter {f} has no help text"
