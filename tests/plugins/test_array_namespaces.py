"""Every CLIP method on both array namespaces: a trace of numpy arrays (a CPU model) and a trace of
torch tensors (what a GPU model keeps, here on the CPU). The same method code runs on both
(array API); the results must agree, and the torch trace must never be copied to numpy whole."""

import contextlib

import numpy as np
import pytest
import torch

from explorer.core.arrays import is_host, is_torch
from explorer.core.jobs import CancelToken, run_sync
from explorer.core.results import Heatmap, LabelMap, TokenSelection
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.host import PluginHost
from explorer.plugin_host.reduction import ReductionMethod

PROMPTS = ["a red circle", "a blue square"]
HOST = PluginHost()
CLIP_METHODS = sorted(m.id for m in HOST.methods() if "clip" in m.contribution.backends)
MAPS = [m for m in CLIP_METHODS if HOST.method(m).family not in ("pruning", "merging")]
REDUCTIONS = [m for m in CLIP_METHODS if HOST.method(m).family in ("pruning", "merging")]
# per-method parameters that keep the tiny model's test fast or exercise a non-default path
PARAMS = {"attention.flow": {"max_tokens": 100}, "attribution.gscorecam": {"topk": 16}}


@pytest.fixture(scope="module")
def pair(tiny_clip_spec, make_image_module):
    """(numpy backend, numpy trace, torch backend, torch trace) of the same model and image."""
    from explorer.backends.clip import ClipBackend

    img = make_image_module(72, 96, seed=11)
    np_backend = ClipBackend.load(tiny_clip_spec)
    t_backend = ClipBackend.load(tiny_clip_spec)
    t_backend.trace_arrays = "torch"
    spec = CaptureSpec.everything(np_backend.info.n_layers)
    np_trace = run_sync(np_backend.trace(img, spec)).with_text(np_backend.encode_text(PROMPTS))
    t_trace = run_sync(t_backend.trace(img, spec)).with_text(t_backend.encode_text(PROMPTS))
    return np_backend, np_trace, t_backend, t_trace


@pytest.fixture(scope="module")
def make_image_module():
    from explorer.testing.images import random_image

    return random_image


def test_torch_trace_keeps_tensors_and_reports_its_bytes(pair):
    _, np_trace, _, t_trace = pair
    assert all(is_host(a) for a in np_trace.attentions.values())
    assert all(is_torch(a) for a in (*t_trace.attentions.values(), *t_trace.hidden_states.values()))
    assert t_trace.on_device and not np_trace.on_device
    assert t_trace.nbytes == np_trace.nbytes
    assert np_trace.device_nbytes == 0 and t_trace.device == "cpu"  # tensors on the CPU: no device memory
    for l, a in np_trace.attentions.items():
        np.testing.assert_allclose(t_trace.attentions[l].numpy(), a, atol=1e-6)
    host = t_trace.on_host()
    assert all(is_host(a) for a in host.attentions.values()) and not host.on_device


@contextlib.contextmanager
def spying(method, name: str, field: str):
    """Record the type of ``state.<field>`` at every call of ``method.<name>(state, params)``."""
    seen = []
    original = getattr(method, name)

    def spy(state, p):
        seen.append(type(getattr(state, field)))
        return original(state, p)

    setattr(method, name, spy)
    try:
        yield seen
    finally:
        delattr(method, name)


def _run(method_id, trace, backend):
    params = HOST.make_params(method_id, PARAMS.get(method_id, {}))
    target = Target(prompts=tuple(PROMPTS))
    return run_sync(HOST.run(method_id, trace, params, target=target, cancel=CancelToken(), backend=backend))


def _same(a, b, what):
    if isinstance(a, Heatmap):
        assert isinstance(b, Heatmap), what
        np.testing.assert_array_equal(np.isnan(a.token_values), np.isnan(b.token_values), err_msg=what)
        np.testing.assert_allclose(b.token_values, a.token_values, rtol=2e-5, atol=1e-6, err_msg=what)
    elif isinstance(a, LabelMap):
        assert isinstance(b, LabelMap), what
        np.testing.assert_array_equal(b.labels, a.labels, err_msg=what)
        np.testing.assert_allclose(b.scores, a.scores, rtol=2e-5, atol=1e-6, err_msg=what)
    elif isinstance(a, TokenSelection):
        assert isinstance(b, TokenSelection), what
        np.testing.assert_array_equal(b.kept, a.kept, err_msg=what)
        if a.groups is not None:
            np.testing.assert_array_equal(b.groups, a.groups, err_msg=what)
        if "embedding" in a.meta:
            np.testing.assert_allclose(b.meta["embedding"], a.meta["embedding"], atol=1e-5, err_msg=what)
    else:
        raise AssertionError(f"{what}: unexpected result {type(a).__name__}")


@pytest.mark.parametrize("method_id", MAPS)
def test_map_methods_agree_on_numpy_and_torch_traces(pair, method_id):
    np_backend, np_trace, t_backend, t_trace = pair
    _same(_run(method_id, np_trace, np_backend), _run(method_id, t_trace, t_backend), method_id)


@pytest.mark.parametrize("method_id", REDUCTIONS)
def test_reductions_agree_on_numpy_and_torch(pair, method_id):
    np_backend, np_trace, t_backend, t_trace = pair
    method: ReductionMethod = HOST.load(method_id)
    params = HOST.make_params(method_id, {"keep": 0.5, "layer": 1})
    a, b = method.select(np_trace, params, np_backend), method.select(t_trace, params, t_backend)
    _same(a, b, f"{method_id} selection")
    # executed: numpy states (host_only methods, or the numpy backend's) vs device states
    _same(_run(method_id, np_trace, np_backend), _run(method_id, t_trace, t_backend), f"{method_id} executed")


@pytest.mark.parametrize("method_id", [m for m in REDUCTIONS if not HOST.load(m).host_only])
def test_device_methods_decide_on_tensors(pair, method_id):
    """Array-API reduction methods get the device's tensors (no numpy copy of the tokens)."""
    _, _, t_backend, t_trace = pair
    method: ReductionMethod = HOST.load(method_id)
    params = HOST.make_params(method_id, {"keep": 0.5, "layer": 1})
    with spying(method, "reduce", "x") as seen:
        method.select(t_trace, params, t_backend)
        method.executed(t_backend, t_trace, params)
    assert seen and all(t is torch.Tensor for t in seen), (method_id, seen)


# -- VLM pruning: numpy states (a CPU model) and device tensors -----------------------------------
VLM_PRUNING = sorted(m.id for m in HOST.methods() if "vlm" in m.contribution.backends and m.family == "pruning")


@pytest.fixture(scope="module")
def vlm_pair(tiny_vlm_backends, make_image_module):
    from explorer.plugin_host.vlm import generate_trace_job

    from explorer.testing.tiny_vlm import VARIANTS

    backend = tiny_vlm_backends("demo")
    image = make_image_module(48, 64, seed=3)
    trace = run_sync(generate_trace_job(backend, image, VARIANTS["demo"].prompt, max_new_tokens=4))
    return backend, trace


@pytest.mark.parametrize("method_id", VLM_PRUNING)
def test_vlm_pruning_agrees_on_numpy_and_torch_states(vlm_pair, method_id):
    backend, trace = vlm_pair
    fields = HOST.params_model(method_id).model_fields
    params = HOST.make_params(method_id, {"max_new_tokens": 4, **({"keep": 0.5} if "keep" in fields else {})})
    if "layer" in fields:
        params = params.model_copy(update={"layer": min(params.layer, backend.info.n_layers - 1)})
    results = {}
    with spying(HOST.load(method_id), "decide", "hidden") as seen:
        try:
            for kind in ("numpy", "torch"):
                backend.trace_arrays = kind
                results[kind] = run_sync(HOST.run(method_id, trace, params, target=Target(prompts=("the image",)),
                                                  cancel=CancelToken(), backend=backend))
        finally:
            backend.trace_arrays = "auto"
    a, b = results["numpy"], results["torch"]
    np.testing.assert_array_equal(b.kept, a.kept, err_msg=method_id)
    assert a.meta["answer"] == b.meta["answer"]
    assert seen[0] is np.ndarray and seen[-1] is torch.Tensor
