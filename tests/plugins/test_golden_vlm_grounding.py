"""VLM grounding against LVLM-Interpret's official code (Ben Melech Stan et al., CVPR Workshops
2024, ``IntelLabs/lvlm-interpret``).

``tests/golden/vlm_grounding.npz`` holds a seeded image, a teacher-forced answer (6 tokens) and
what the official code returned for them on the tiny demo LLaVA
(``make_tiny_vlm(folder, "demo", seed=0)``: 4 Llama layers, 4 heads, 144 image tokens; weight
``checksum`` stored): ``relevancy`` / ``relevancy_raw`` (6, 144), the image part of the last row of
``utils_relevancy.construct_relevancy_map``'s per-token maps with ``apply_normalization`` True /
False; ``relevancy_word12``, its word map of tokens 1-2; ``attention`` (7 selections, 4 layers,
4 heads, 144), the per-head maps ``utils_attn.handle_attentions_i2t`` draws for each layer and for
the tokens 0..5 and the pair (1, 2). Repository, commit, exact calls and shims in the file's
``meta`` and ``tests/golden/PROVENANCE.md``.

Compared through the plugin host: ``vlm.attention`` for every layer, head and selection (atol
1e-7; measured 1.9e-9) and its default (mean over layers and heads, nothing left out);
``vlm.relevancy``'s default (``gradients="steps"``, ``normalize=True``) for every token and its
``normalize=False`` variant (rtol 1e-5, atol 1e-8; the values are 2e-4..1.4e-2; measured 1.2e-8
absolute, 1.5e-6 relative). ``gradients="target", normalize=False`` (the project's earlier map,
every attention row weighted by the explained token's gradient) equals the official map for the
first token only (later tokens: 0.3-0.5% of the map's maximum apart). The official word map of a
two-token word is the last token's map halved (``compute_word_rel_map`` pads the earlier map, so
its row is no longer the last); the plugin averages the tokens' maps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from explorer.core.jobs import CancelToken, run_sync
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec, Trace
from explorer.plugin_host.host import PluginHost

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "vlm_grounding.npz"
REL = dict(rtol=1e-5, atol=1e-8)


def _load():
    z = np.load(GOLDEN)
    return z, json.loads(str(z["meta"][0]))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from explorer.backends.vlm import VlmBackend
    from explorer.core.image_io import load_image
    from explorer.testing.images import png_bytes
    from explorer.testing.tiny_vlm import make_tiny_vlm

    z, meta = _load()
    backend = VlmBackend.load(make_tiny_vlm(tmp_path_factory.mktemp("vlm"), "demo", seed=0))
    sd = backend.model.state_dict()
    checksum = np.array([float(sd[k].double().sum()) for k in meta["checksum_keys"]])
    image = load_image(png_bytes(z["image"]))
    prepared = backend.prepare(image, meta["prompt"])
    answer = [int(a) for a in z["answer"]]
    gen = run_sync(backend.generate_job(prepared, max_new_tokens=len(answer), attention_layers=None, force=answer))
    trace = Trace(layout=prepared.layout, model=backend.info, image_sha256=image.sha256, capture=CaptureSpec(),
                  extras={"prepared": prepared, "generation": gen, "prompt": meta["prompt"], "capture_note": "",
                          "attention_layers": list(range(backend.info.n_layers))})
    return backend, trace, z, checksum


def run(setup, method_id, tokens, **params):
    backend, trace, _, _ = setup
    host = PluginHost()
    return run_sync(host.run(method_id, trace, host.make_params(method_id, params), target=Target(tokens=tuple(tokens)),
                             cancel=CancelToken(), backend=backend)).token_values


def test_meta_names_the_official_code():
    _, meta = _load()
    assert meta["repository"] == "https://github.com/IntelLabs/lvlm-interpret"
    assert meta["commit"] == "e87dcf807b61e5c734ec333fb0e2b8a4fd18ff2a"
    assert "construct_relevancy_map" in meta["function"] and "handle_attentions_i2t" in meta["function"]


def test_same_model_and_inputs(setup):
    backend, trace, z, checksum = setup
    # a change of the tiny model's initialisation is reported here, not as a numeric mismatch
    np.testing.assert_allclose(checksum, z["checksum"], rtol=1e-6, atol=1e-6)
    prepared = trace.extras["prepared"]
    assert trace.extras["generation"].ids == [int(a) for a in z["answer"]]
    assert len(prepared.image_positions) == 144 and int(prepared.image_positions[0]) == int(z["img_idx"])


def test_attention_of_every_layer_and_head_matches_official(setup):
    backend, _, z, _ = setup
    _, meta = _load()
    L, H = backend.info.n_layers, backend.info.n_heads
    assert z["attention"].shape == (len(meta["selections"]), L, H, 144)
    for s, sel in enumerate(meta["selections"]):
        for layer in range(L):
            for head in range(H):
                got = run(setup, "vlm.attention", sel, start_layer=layer, end_layer=layer, head=head)
                np.testing.assert_allclose(got, z["attention"][s, layer, head], rtol=0, atol=1e-7,
                                           err_msg=f"selection {sel}, layer {layer}, head {head}")


def test_attention_default_is_the_mean_of_the_official_maps(setup):
    _, _, z, _ = setup
    got = run(setup, "vlm.attention", [0])
    assert np.isfinite(got).all()  # nothing left out by default, as the official maps
    np.testing.assert_allclose(got, z["attention"][0].mean((0, 1)), rtol=0, atol=1e-7)
    # the earlier default (sinks left out) stays available and changes nothing else
    old = run(setup, "vlm.attention", [0], exclude_sinks=True)
    keep = np.isfinite(old)
    np.testing.assert_allclose(old[keep], got[keep], rtol=0, atol=0)


def test_relevancy_default_matches_official(setup):
    _, _, z, _ = setup
    for t in range(len(z["answer"])):
        np.testing.assert_allclose(run(setup, "vlm.relevancy", [t]), z["relevancy"][t], **REL, err_msg=f"token {t}")


def test_relevancy_unnormalised_matches_official(setup):
    _, _, z, _ = setup
    for t in (0, 3, 5):
        got = run(setup, "vlm.relevancy", [t], normalize=False)
        np.testing.assert_allclose(got, z["relevancy_raw"][t], **REL, err_msg=f"token {t}")


def test_target_gradients_are_the_earlier_map_and_differ_after_the_first_token(setup):
    backend, trace, z, _ = setup
    gen, prepared = trace.extras["generation"], trace.extras["prepared"]
    first = run(setup, "vlm.relevancy", [0], gradients="target", normalize=False)
    np.testing.assert_allclose(first, z["relevancy_raw"][0], **REL)
    later = run(setup, "vlm.relevancy", [3], gradients="target", normalize=False)
    earlier, _ = backend.relevancy(prepared, gen.ids, 3)  # the backend's default: the project's earlier map
    np.testing.assert_allclose(later, earlier, rtol=0, atol=0)
    gap = np.abs(later - z["relevancy_raw"][3]).max() / np.abs(z["relevancy_raw"][3]).max()
    assert gap > 1e-3, gap


def test_word_map_averages_the_tokens(setup):
    _, _, z, _ = setup
    got = run(setup, "vlm.relevancy", [1, 2])
    np.testing.assert_allclose(got, z["relevancy"][1:3].mean(0), **REL)
    # the official word map keeps only the last token's row (divided by the count)
    np.testing.assert_allclose(z["relevancy_word12"], z["relevancy"][2] / 2, rtol=1e-6, atol=0)
    assert np.abs(got - z["relevancy_word12"]).max() > 1e-3
