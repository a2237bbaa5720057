"""One conformance suite over every registered map method (Captum-style): shapes follow the
layout, values are finite, runs are deterministic, cancellation is honoured, the method's own
capture declaration is enough, and parameters round-trip through strings."""

import numpy as np
import pytest

from explorer.core.image_io import load_image
from explorer.core.jobs import Cancelled, CancelToken, run_sync
from explorer.core.results import Heatmap, LabelMap
from explorer.core.target import Target
from explorer.plugin_host.api import params_to_strings, parse_params
from explorer.plugin_host.host import PluginHost
from explorer.testing.conformance import check_cancellation, traced_for
from explorer.testing.images import png_bytes

MAP_FAMILIES = ("attention", "similarity", "attribution")
HOST = PluginHost()
METHODS = [m.id for m in HOST.methods(backend="clip") if m.family in MAP_FAMILIES]
ALL_METHODS = [m.id for m in HOST.methods()]
CLIP_METHODS = [m.id for m in HOST.methods(backend="clip")]  # maps, selections, pruning and merging
PROMPTS = ("a red circle", "a blue square")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(7)
    return load_image(png_bytes(rng.integers(0, 256, (72, 100, 3), dtype=np.uint8)))


def _target(info):
    return Target(prompts=PROMPTS if info.requires("text") else ())


def _run(method_id, backend, image, cancel=None, params=None):
    info = HOST.method(method_id)
    method = HOST.load(method_id)
    params = params or HOST.make_params(method_id)
    target = _target(info)
    capture = method.capture(params, backend.info, target)
    trace = run_sync(backend.trace(image, capture))  # exactly what the method declared
    if target.prompts:
        trace = trace.with_text(backend.encode_text(target.prompts))
    return HOST.run(method_id, trace, params, target=target, cancel=cancel or CancelToken(), backend=backend)


def test_there_are_map_methods():
    assert {"attention.raw", "attention.rollout", "similarity.maskclip"} <= set(METHODS)


@pytest.mark.parametrize("method_id", METHODS)
def test_result_shape_finite_and_deterministic(method_id, tiny_clip, image):
    a = run_sync(_run(method_id, tiny_clip, image))
    b = run_sync(_run(method_id, tiny_clip, image))
    assert isinstance(a, (Heatmap, LabelMap))
    n = a.layout.n_image_tokens
    assert a.layout.original_size == image.size
    if isinstance(a, Heatmap):
        values = a.token_values if a.token_values is not None else a.pixel_values
        expected = (n,) if a.token_values is not None else image.size
        assert values.shape == expected
        assert np.isfinite(values).all()
        np.testing.assert_array_equal(values, b.token_values if b.token_values is not None else b.pixel_values)
        assert a.to_image().shape == image.size
    else:
        assert a.labels.shape == (n,)
        np.testing.assert_array_equal(a.labels, b.labels)


@pytest.mark.parametrize("method_id", CLIP_METHODS)
def test_cancellation_is_honoured(method_id, tiny_clip, image):
    """``method.run`` itself, driven without the host, stops with its token set."""
    method, params, target, trace = traced_for(HOST, method_id, tiny_clip, image)
    check_cancellation(method, trace, params, target, backend=tiny_clip, name=method_id)


def test_the_cancellation_check_fails_for_a_method_that_ignores_cancel(tiny_clip, image):
    from explorer.plugin_host.api import Method

    class Ignores(Method):  # computes its whole result, never looks at `cancel`
        def run(self, trace, params, *, target, cancel, backend=None):
            values = np.arange(trace.layout.n_image_tokens, dtype=np.float32)
            return Heatmap(layout=trace.layout, token_values=values)

    class IgnoresButIsAGenerator(Ignores):
        def run(self, trace, params, *, target, cancel, backend=None):
            yield from ()  # a generator that never yields
            return Heatmap(layout=trace.layout, token_values=np.ones(trace.layout.n_image_tokens, np.float32))

    class Checks(Ignores):
        def run(self, trace, params, *, target, cancel, backend=None):
            for _ in range(3):
                cancel.raise_if_cancelled()
            return Heatmap(layout=trace.layout, token_values=np.ones(trace.layout.n_image_tokens, np.float32))

    _, params, target, trace = traced_for(HOST, "attention.raw", tiny_clip, image)
    for bad in (Ignores(), IgnoresButIsAGenerator()):
        with pytest.raises(AssertionError, match="cancel"):
            check_cancellation(bad, trace, params, target)
    check_cancellation(Checks(), trace, params, target)


@pytest.mark.parametrize("method_id", ALL_METHODS)
def test_params_round_trip_through_strings(method_id):
    model = HOST.params_model(method_id)
    p = model()
    assert parse_params(model, params_to_strings(p)) == p
    for f, value in p.model_dump().items():
        assert model.model_fields[f].description, f"{method_id}: parameter {f} has no help text"


@pytest.mark.parametrize("method_id", ALL_METHODS)
def test_manifest_states_citation_and_repository(method_id):
    c = HOST.method(method_id).contribution
    assert c.citation and c.repository.startswith("https://")


def test_switching_method_layer_head_prompt_never_reruns_the_tower(tiny_clip, image):
    """After one trace, every method that needs no gradients and no extra passes runs from the
    cache, whatever its layer, head or prompt (the engine's capture covers all layers)."""
    from explorer.plugin_host.engine import Engine

    engine = Engine(HOST)
    engine.adopt(tiny_clip)
    spec = tiny_clip.info.spec
    run_sync(engine.run_job(spec, image, "attention.rollout", None, Target()))
    count = tiny_clip.forward_count
    cheap = [m for m in METHODS if not (HOST.method(m).requires("gradients") or HOST.method(m).requires("passes"))]
    for mid in cheap:
        model = HOST.params_model(mid)
        variants = [{}]
        if "layer" in model.model_fields:
            variants += [{"layer": 0}, {"layer": 1}]
        if "head" in model.model_fields:
            variants += [{"head": 2}]
        for prompts in (("a red circle",), ("a dog", "a cat")):
            for values in variants:
                target = Target(prompts=prompts if HOST.method(mid).requires("text") else ())
                run_sync(engine.run_job(spec, image, mid, values, target))
    assert tiny_clip.forward_count == count


def test_gradient_methods_work_on_a_cached_trace_of_an_older_image(tiny_clip, make_image):
    """The engine re-registers the image's model input when a cached trace serves a method that
    runs the model, even after many other images went through the backend."""
    from explorer.plugin_host.engine import Engine

    grads = [m for m in METHODS if HOST.method(m).requires("gradients")]
    if not grads:
        pytest.skip("no gradient methods registered")
    engine = Engine(HOST)
    engine.adopt(tiny_clip)
    spec = tiny_clip.info.spec
    first = make_image(64, 64, seed=100)
    run_sync(engine.run_job(spec, first, "attention.rollout", None, Target()))
    for s in range(12):  # push the first image out of the backend's short memory
        tiny_clip.prepare(make_image(64, 64, seed=200 + s))
    result = run_sync(engine.run_job(spec, first, grads[0], None, Target(prompts=("a red circle",))))
    assert np.isfinite(result.token_values).all()
