"""MustDrop executed in a real generation (the three stages; the official index logic itself is
checked against the authors' code in test_golden_mustdrop.py).

Properties: an encoder stage that changes nothing and thresholds that drop nothing reproduce the
unpruned model's likelihood exactly (so the image block the backend rebuilds is the model's own);
merged windows shorten the LLM's image block by 8 tokens each; every prefill stage only removes
tokens (key-set tokens never); the decode-time KV cache of every layer from the first pruning layer
on holds exactly the prompt tokens that survived the last stage, the earlier layers everything.
"""

from __future__ import annotations

import numpy as np
import pytest

from explorer.backends.registry import parse_model_spec
from explorer.backends.vlm import VlmBackend
from explorer.core.generation import EncoderStage, PrunePlan, PruneDecision
from explorer.core.image_io import load_image
from explorer.core.jobs import CancelToken, run_sync
from explorer.core.target import Target
from explorer.core.resources import samples_dir
from explorer.plugin_host.api import ParamError
from explorer.plugin_host.host import PluginHost
from explorer.plugin_host.vlm import generate_trace_job
from explorer.testing.images import random_image
from explorer.testing.tiny_vlm import VARIANTS
from explorer_plugins.vlm_mustdrop.method import pruning_layers

HOST = PluginHost()


@pytest.fixture(scope="module")
def demo():
    """The shipped demo VLM on a sample scene (its flat background makes similar windows)."""
    b = VlmBackend.load(parse_model_spec("vlm:demo"))
    trace = run_sync(generate_trace_job(b, load_image(samples_dir() / "scene-01.png"), "describe the scene",
                                        max_new_tokens=6, attention=False))
    return b, trace


def _run(b, trace, **values):
    values.setdefault("max_new_tokens", 6)
    params = HOST.make_params("vlm.mustdrop", values)
    return run_sync(HOST.run("vlm.mustdrop", trace, params, target=Target(prompts=(trace.extras["prompt"],)),
                             cancel=CancelToken(), backend=b))


def test_identity_encoder_stage_rebuilds_the_models_own_input(demo):
    b, trace = demo
    prep, full = trace.extras["prepared"], trace.extras["generation"]
    n = len(prep.image_positions)
    stage = EncoderStage(after_layer={0: lambda h: (h, np.arange(n))}, cls_layers=(-1,))
    plan = PrunePlan(layers=[1], decide=lambda s: PruneDecision(keep=np.arange(len(s.image))), encoder=stage)
    g = run_sync(b.generate_job(prep, max_new_tokens=6, attention_layers=(), prune=plan, force=full.ids))
    ref = run_sync(b.generate_job(prep, max_new_tokens=6, attention_layers=(), force=full.ids))
    assert g.vision_tokens == n and g.groups is None
    assert g.logprob == pytest.approx(ref.logprob, abs=1e-4)


def test_nothing_dropped_is_the_unpruned_model(demo):
    b, trace = demo
    sel = _run(b, trace, encoder_merge=False, key_fraction=0.0, preset="custom", global_thr=0.0, individual_thr=0.0)
    m = sel.meta
    assert m["logprob_full_answer_pruned"] == pytest.approx(m["logprob_full_answer"], abs=1e-4)
    assert m["answer"] == m["answer_full"] and sel.kept.all()


def test_three_stages_on_the_demo_model(demo):
    b, trace = demo
    sel = _run(b, trace, preset="custom", global_thr=0.02, individual_thr=0.05)
    m = sel.meta
    n = len(trace.extras["prepared"].image_positions)
    entering = m["image_tokens_entering_llm"]
    assert entering < n and (n - entering) % 8 == 0  # whole 3x3 windows merged in the vision tower
    per_layer = m["image_tokens_per_layer"]
    assert per_layer[0] == entering and all(a >= b for a, b in zip(per_layer, per_layer[1:]))
    assert per_layer[-1] < entering  # the prefill stages dropped tokens
    sizes = np.bincount(sel.groups[sel.groups >= 0])
    assert set(sizes[sizes > 0].tolist()) <= {1, 9}  # a surviving token is one patch or one whole window
    # the decode cache: layers before the first pruning layer hold the whole prompt, the rest only survivors
    first = m["pruning_layers"][0] - 1
    N = m["prompt_tokens"]
    cache = m["kv_cache_per_layer"]
    survivors = N - (entering - per_layer[-1])
    assert cache[:first] == [N] * first and cache[first:] == [survivors] * (len(cache) - first)
    # what the window shows: merged windows as groups, dropped patches outside every group
    assert sel.groups is not None and (sel.groups >= 0).sum() == sel.kept.sum() < n


def test_cache_policy_is_what_decoding_reads(demo):
    b, trace = demo
    common = dict(encoder_merge=False, key_fraction=0.0, preset="custom", global_thr=0.02, individual_thr=0.05)
    final = _run(b, trace, cache="final", **common).meta
    kept = _run(b, trace, cache="prefill", **common).meta
    assert final["image_tokens_per_layer"] == kept["image_tokens_per_layer"]
    assert sum(final["kv_cache_per_layer"]) < sum(kept["kv_cache_per_layer"])
    assert kept["kv_cache_per_layer"][-1] == final["kv_cache_per_layer"][-1]  # the last stage's layers agree


def test_key_set_tokens_are_never_dropped(demo, spy):
    b, trace = demo
    seen = spy(HOST, "vlm.mustdrop")
    _run(b, trace, preset="custom", global_thr=0.5, individual_thr=0.5, key_fraction=0.25)
    from explorer_plugins.vlm_mustdrop.method import key_set

    assert len(seen) == 6  # three stages in the pruned generation and three in the forced one
    keys = key_set(seen[0][0].extras["vision_cls"][-1], 0.25)
    assert keys.size > 0
    for state, decision in seen:
        assert np.isin(keys, state.original).all()  # still present before every stage
        assert np.isin(keys, state.original[decision.keep]).all()
        assert state.text_rows.shape[1:] == (len(state.text), len(state.image))


def test_text_rows_are_the_prefill_attention(demo):
    """At the first stage every earlier layer saw the whole prompt: the rows handed to the method
    equal the backend's rows of the unpruned prompt."""
    b, trace = demo
    prep = trace.extras["prepared"]
    seen = []
    plan = PrunePlan(layers=[2], decide=lambda s: (seen.append(s), PruneDecision(keep=np.arange(len(s.image))))[1],
                     text_rows=True)
    run_sync(b.generate_job(prep, max_new_tokens=1, attention_layers=(), prune=plan))
    state = seen[0]
    ref = b.attention_rows(prep, 1, state.text)[:, :, prep.image_positions]
    np.testing.assert_allclose(np.asarray(state.text_rows), ref, atol=1e-5)


def test_pruning_layers_follow_the_official_schedule():
    assert pruning_layers("auto", 32) == [2, 6, 10, 14]
    assert pruning_layers("auto", 4) == [0, 1, 2]
    assert pruning_layers("3, 1", 8) == [1, 3]
    with pytest.raises(ParamError, match="0..2"):
        pruning_layers("3", 4)


def test_other_towers_and_shallow_models_get_a_clear_message(tiny_vlm_backends):
    b = tiny_vlm_backends("qwen2_vl")
    trace = run_sync(generate_trace_job(b, random_image(64, 64, seed=0), VARIANTS["qwen2_vl"].prompt,
                                        max_new_tokens=2, attention=False))
    with pytest.raises(ValueError, match="needs a LLaVA model with a CLIP tower"):
        b._encoder_inputs(trace.extras["prepared"], EncoderStage())
    with pytest.raises(ParamError, match="encoder_merge=false and key_fraction=0"):
        _run(b, trace)
    with pytest.raises(ParamError, match="1 layer"):  # the tiny test VLMs have one LLM layer
        _run(b, trace, encoder_merge=False, key_fraction=0.0, positions="original")
