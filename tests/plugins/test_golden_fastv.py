"""FastV against the official selection (Chen et al., ECCV 2024, ``pkunlp-icler/FastV``).

``tests/golden/fastv.npz`` holds what the official selection lines returned: ``LlamaModel.forward``'s
in-place branch (``src/transformers/src/transformers/models/llama/modeling_llama.py``) and the
llava-hf ``fastv_forward`` (both agree; repository, commit, line ranges and exact call in the
file's ``meta`` and ``tests/golden/PROVENANCE.md``): the head mean of the attention of layer K−1,
its **last query row** (the last prompt token), over the image block, ``topk(round(n·(1−R)))``.

* Six seeded cases: the file stores that last row per head ``(H, L)`` (the only row the official
  lines read) and the sequence positions kept. The project's own path is run on it: the backend's
  ``VlmBackend._prune_state`` (head mean of the probe's last-token row; stand-ins for the probe
  request and the model) and ``VlmFastV.decide``. The kept image tokens must be identical.
* The tiny demo VLM of the tests (``make_tiny_vlm(folder, "demo", seed=0)``; a checksum of its LLM
  weights is stored): the official lines on its eager attentions, against the plugin run end to end
  through the plugin host (the backend recomputes the row from post-RoPE queries and keys). The kept
  sets must be identical.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from explorer.backends.vlm import VlmBackend
from explorer.core.jobs import CancelToken, run_sync
from explorer.core.target import Target
from explorer.plugin_host.host import PluginHost
from explorer.plugin_host.vlm import generate_trace_job
from explorer.testing.images import random_image
from explorer.testing.tiny_vlm import VARIANTS
from explorer_plugins.vlm_fastv.method import VlmFastV

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "fastv.npz"
HOST = PluginHost()


def _load():
    z = np.load(GOLDEN)
    return z, json.loads(str(z["meta"][0]))


Z, META = _load()


def _project_keep(last_rows, s0, n, K, R):
    """The project's path: the backend's PruneState (head mean of the last prompt token's row over the
    image columns) and ``VlmFastV.decide``; returns the kept image-token numbers."""
    H, L = last_rows.shape
    rows = torch.from_numpy(np.ascontiguousarray(last_rows[:, s0:s0 + n])).reshape(1, H, 1, n)
    req = SimpleNamespace(rows_out={f"llm.{K - 1}": [rows]}, keys_out={})
    backend = SimpleNamespace(host_arrays=lambda: True)
    state = VlmBackend._prune_state(backend, K, torch.zeros(1, L, 4), np.arange(s0, s0 + n), np.arange(n),
                                    np.arange(s0 + n, L), req, SimpleNamespace(layout=None))
    params = VlmFastV.Params(keep=1 - R, layer=K)
    decision = VlmFastV().decide(state, params)
    return np.sort(state.original[np.asarray(decision.keep)])


def test_meta_names_the_official_code():
    assert META["repository"] == "https://github.com/pkunlp-icler/FastV"
    assert META["commit"] == "d1659729b5bf1be225e99ee15783deeea80f63b1"
    assert META["file"] == "src/transformers/src/transformers/models/llama/modeling_llama.py"
    assert len(META["cases"]) == 6


@pytest.mark.parametrize("i", range(6))
def test_kept_sets_match_official_on_seeded_attention(i):
    c = META["cases"][i]
    kept = _project_keep(Z[f"c{i}_last_rows"], c["s0"], c["n"], 2, c["R"])
    np.testing.assert_array_equal(kept, Z[f"c{i}_kept_image"])
    assert kept.size == c["ATTENTION_RANK"]
    # the official keep_indexs: the prefix, the kept image tokens and every token after the image
    L, s0, n = c["L"], c["s0"], c["n"]
    expected = np.concatenate([np.arange(s0), s0 + kept, np.arange(s0 + n, L)])
    np.testing.assert_array_equal(expected, Z[f"c{i}_keep_indexs"])


def test_head_max_is_not_official_and_head_order_does_not_matter():
    """The comparison is sharp: pooling the heads by their max gives another set; the head mean does
    not depend on the heads' order."""
    c = META["cases"][0]
    rows = Z["c0_last_rows"]
    s0, n = c["s0"], c["n"]
    k = c["ATTENTION_RANK"]
    by_max = np.sort(np.argsort(-rows[:, s0:s0 + n].max(0), kind="stable")[:k])
    assert not np.array_equal(by_max, Z["c0_kept_image"])
    shifted = np.roll(rows, 1, axis=0)  # the same heads in another order: the head mean is unchanged
    np.testing.assert_array_equal(_project_keep(shifted, s0, n, 2, c["R"]), Z["c0_kept_image"])


# -- the tiny demo VLM, end to end -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tiny_vlm_backends):
    b = tiny_vlm_backends("demo")
    tiny = META["tiny"]
    checksum = float(sum(p.detach().double().sum() for p in b.lm.parameters()))
    assert checksum == pytest.approx(tiny["lm_param_sum"], abs=1e-6), "the tiny demo VLM's init changed"
    trace = run_sync(generate_trace_job(b, random_image(64, 64, seed=0), VARIANTS["demo"].prompt, max_new_tokens=1))
    prep = trace.extras["prepared"]
    assert prep.inputs["input_ids"].shape[1] == tiny["seq"]
    np.testing.assert_array_equal(prep.image_positions, np.arange(tiny["s0"], tiny["s0"] + tiny["n"]))
    return b, trace


@pytest.mark.parametrize("case", range(4))
def test_tiny_demo_vlm_end_to_end_matches_official(demo, case):
    b, trace = demo
    c = META["tiny"]["cases"][case]
    params = HOST.make_params("vlm.fastv", {"keep": 1 - c["R"], "layer": c["K"], "max_new_tokens": 1})
    sel = run_sync(HOST.run("vlm.fastv", trace, params, target=Target(prompts=(trace.extras["prompt"],)),
                            cancel=CancelToken(), backend=b))
    expected = Z[f"tiny_K{c['K']}_R{int(c['R'] * 100)}_kept_image"]
    np.testing.assert_array_equal(np.flatnonzero(sel.kept), expected)
