"""Grounding of generated words on the image with a tiny VLM: raw attention and relevancy maps."""

import numpy as np
import pytest

from explorer.core.jobs import CancelToken, run_sync
from explorer.core.results import Heatmap
from explorer.core.target import Target
from explorer.plugin_host.host import PluginHost
from explorer.plugin_host.vlm import generate_trace_job
from explorer.testing.images import png_bytes
from explorer.testing.tiny_vlm import VARIANTS, make_tiny_vlm
from explorer_plugins.vlm_grounding.method import vlm_sinks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from explorer.backends.vlm import VlmBackend
    from explorer.core.image_io import load_image

    backend = VlmBackend.load(make_tiny_vlm(tmp_path_factory.mktemp("vlm"), "llava_onevision"))
    image = load_image(png_bytes(np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8)))
    trace = run_sync(generate_trace_job(backend, image, VARIANTS["llava_onevision"].prompt, max_new_tokens=4))
    return backend, trace


def run(setup, method_id, target, **params):
    backend, trace = setup
    host = PluginHost()
    return run_sync(host.run(method_id, trace, host.make_params(method_id, params), target=target,
                             cancel=CancelToken(), backend=backend))


def test_raw_attention_map_is_the_captured_row(setup):
    backend, trace = setup
    gen = trace.extras["generation"]
    assert gen.ids, "the tiny model must produce tokens for this test"
    hm = run(setup, "vlm.attention", Target(tokens=(0,)), exclude_sinks=False)
    assert isinstance(hm, Heatmap) and hm.token_values.shape == (trace.layout.n_image_tokens,)
    expected = np.mean([gen.attention[l][0].mean(0) for l in range(backend.info.n_layers)], 0)
    np.testing.assert_allclose(hm.token_values, expected, atol=1e-6)
    # the image part of a row sums to at most 1 (the rest goes to text and the BOS sink)
    assert 0 < np.nansum(hm.token_values) <= 1 + 1e-5
    last = backend.info.n_layers - 1
    one = run(setup, "vlm.attention", Target(tokens=(1,)), start_layer=last, end_layer=last, head=1, exclude_sinks=False)
    np.testing.assert_allclose(one.token_values, gen.attention[last][1, 1], atol=1e-6)
    # both views of the anyres layout get values
    grids = hm.grids()
    assert len(grids) == 2 and all(np.isfinite(g).all() for g in grids)


def test_sinks_are_left_out():
    rng = np.random.default_rng(0)
    att = {0: rng.random((3, 2, 40)) * 0.01}
    att[0][:, :, 7] = 0.5
    assert list(vlm_sinks(att)) == [7]


def test_relevancy_map_and_errors(setup):
    backend, trace = setup
    gen = trace.extras["generation"]
    assert gen.ids
    hm = run(setup, "vlm.relevancy", Target(tokens=(0,)))
    ref, _ = backend.relevancy(trace.extras["prepared"], gen.ids, 0, gradients="steps", normalize=True)
    np.testing.assert_allclose(hm.token_values, ref, atol=1e-6)
    with pytest.raises(ValueError, match="outside the"):
        run(setup, "vlm.attention", Target(tokens=(99,)))


def test_capture_budget_keeps_evenly_spaced_layers(setup):
    from explorer.plugin_host.vlm import capture_bytes, capture_plan

    backend, trace = setup
    n = trace.layout.n_image_tokens
    layers, note = capture_plan(backend, n, 8)
    assert layers == list(range(backend.info.n_layers)) and note == ""

    class Big:
        class info:
            n_layers, n_heads = 32, 32

    one = capture_bytes(1, 32, 2880, 100)
    layers, note = capture_plan(Big, 2880, 100, budget=4 * one)
    assert len(layers) == 4 and layers[0] == 0 and layers[-1] == 31 and "4 of 32 layers" in note
    assert capture_bytes(32, 32, 2880, 100) > 4 * one
