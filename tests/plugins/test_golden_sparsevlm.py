"""SparseVLM against the official selection (Zhang et al., ICML 2025, ``Gumpest/SparseVLMs``).

``tests/golden/sparsevlm.npz`` holds seeded inputs and what the official code returned for them
(repository, commits, exact calls in the file's ``meta`` and ``tests/golden/PROVENANCE.md``):

* the text raters: the lines of ``LlamaDynamicvitModel.forward``
  (``llava/model/language_model/modelling_sparse_llama.py``) that softmax ``V·Tᵀ`` over the text,
  average over the image tokens and keep the text tokens above the mean;
* ``attn_postprocess_topk`` (``score.py`` at HEAD): the raters' head-mean attention to the image
  tokens, averaged over the raters, and the top ``min(schedule, n − 1)``;
* ``attn_postprocess_rank`` (``score.py`` of the initial commit, the paper's v1.0 rank rule): the
  count ``min(int(rank(P)·scale + bias), n − 1)`` with the float32 ``torch.linalg.matrix_rank`` of
  the rater × image matrix ``P``, and no pruning at all when ``rank(P) = n``.

The cases include rater rows that are exact duplicates (rank-deficient) and one that is the float32
mean of two others (rank-deficient at float32 precision only), and a 4-token image whose ``P`` has
full rank. The project's ``VlmSparseVLM.extras`` and ``decide`` run on them with stand-ins for the
backend (its ``input_embeddings`` and ``attention_rows`` serve the stored arrays; the latter only
has the official rater rows). Kept sets must be identical, raters identical, scores within 1e-6.
The tiny demo VLM of the tests (``make_tiny_vlm(folder, "demo", seed=0)``, weight checksum stored;
its 4 LLM layers make the one-stage plugin the whole official schedule ``[2, 6, 15]``) is also run
end to end through the plugin host against the official code on its eager attentions.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from explorer.core.generation import PruneState
from explorer.core.jobs import CancelToken, run_sync
from explorer.core.target import Target
from explorer.plugin_host.host import PluginHost
from explorer.plugin_host.vlm import generate_trace_job
from explorer.testing.images import random_image
from explorer.testing.tiny_vlm import VARIANTS
from explorer_plugins.vlm_sparsevlm.method import VlmSparseVLM

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "sparsevlm.npz"
HOST = PluginHost()
IMAGE_ID = 7
SCHEDULE_AT_LAYER_2 = {192: 300, 128: 303, 96: 238, 64: 66}  # score.py: sparse_token_dict[RETAIN_TOKN][0]


def _load():
    z = np.load(GOLDEN)
    return z, json.loads(str(z["meta"][0]))


Z, META = _load()


class _Backend:
    """What ``VlmSparseVLM.extras`` calls, serving the stored arrays."""

    image_token_id = IMAGE_ID

    def __init__(self, i, c):
        self.c, self.L = c, c["L"]
        e = np.zeros((self.L, c["C"]), np.float32)
        e[c["s0"]:] = Z[f"c{i}_hidden"]
        self.e = e
        q = c["s0"] + c["n"] + np.asarray(c["raters"])
        self.rows = {int(p): Z[f"c{i}_rater_rows"][:, j, :] for j, p in enumerate(q)}

    def input_embeddings(self, prepared):
        return self.e

    def attention_rows(self, prepared, layer, rows):
        assert layer == 2, "the official first stage scores with the attention of decoder layer 2"
        missing = [int(r) for r in rows if int(r) not in self.rows]
        assert not missing, f"rows {missing} are not official raters"
        return np.stack([self.rows[int(r)] for r in rows], 1)  # (H, R, L)


def _decide(i, params):
    c = META["cases"][i]
    s0, n, L = c["s0"], c["n"], c["L"]
    ids = np.arange(L) % 5 + 10
    ids[s0:s0 + n] = IMAGE_ID
    prepared = SimpleNamespace(inputs={"input_ids": ids[None]}, image_positions=np.arange(s0, s0 + n))
    m = VlmSparseVLM()
    extras = m.extras(_Backend(i, c), prepared, params)
    state = PruneState(layer=params.layer, hidden=None, image=np.arange(s0, s0 + n), original=np.arange(n),
                       text=np.arange(s0 + n, L), last_row=None, keys=None, layout=None, extras=extras)
    return extras, m.decide(state, params)


def _keep_for(retain, n):
    """``keep`` whose count ``min(round(keep·n), n − 1)`` is the official ``min(schedule, n − 1)``."""
    return min(SCHEDULE_AT_LAYER_2[retain], n) / n


def test_meta_names_the_official_code():
    assert META["repository"] == "https://github.com/Gumpest/SparseVLMs"
    assert META["commit"] == "26a5f48813c46cd1c7364160354e7fdd3febaa67"
    assert META["rank_commit"] == "91fb6d9857a089a39c660527519c76ab0a259349"
    assert META["file"] == "llava/model/language_model/score.py"


@pytest.mark.parametrize("i", range(5))
def test_raters_scores_and_schedule_counts_match_official(i):
    c = META["cases"][i]
    for t in c["topk"]:
        params = VlmSparseVLM.Params(keep=_keep_for(t["retain"], c["n"]))
        extras, decision = _decide(i, params)
        np.testing.assert_array_equal(extras["raters"], c["s0"] + c["n"] + np.asarray(c["raters"]))
        np.testing.assert_allclose(decision.scores, Z[f"c{i}_relation"], atol=1e-6, rtol=0)
        np.testing.assert_array_equal(np.asarray(decision.keep), Z[f"c{i}_topk{t['retain']}_keep"])
        assert len(decision.keep) == t["k"]


def test_default_keep_is_the_first_stage_of_the_192_schedule():
    c = META["cases"][0]
    assert c["n"] == 576
    _, decision = _decide(0, VlmSparseVLM.Params())
    np.testing.assert_array_equal(np.asarray(decision.keep), Z["c0_topk192_keep"])


@pytest.mark.parametrize("i", range(5))
def test_rank_rule_matches_official_v1(i):
    c = META["cases"][i]
    for j, r in enumerate(c["rank"]):
        params = VlmSparseVLM.Params(count="rank", rank_scale=r["scale"], rank_bias=r["bias"])
        _, decision = _decide(i, params)
        np.testing.assert_array_equal(np.asarray(decision.keep), Z[f"c{i}_rank{j}_keep"])


def test_rank_cases_are_sharp():
    """The file holds a case whose rank differs between float32 (official) and float64, and one where
    ``P`` has full rank ``n`` (officially: no pruning)."""
    cases = META["cases"]
    assert any(r["rank"] != r["rank_float64"] and r["scale"] == 1.0 for r in cases[3]["rank"])
    assert cases[4]["rank"][0]["rank"] == cases[4]["n"] and not cases[4]["rank"][0]["s_flag"]
    assert Z["c4_rank0_keep"].size == cases[4]["n"]
    assert cases[2]["rank"][0]["rank"] < len(cases[2]["raters"])  # the duplicated rows


# -- the tiny demo VLM, end to end -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tiny_vlm_backends):
    b = tiny_vlm_backends("demo")
    checksum = float(sum(p.detach().double().sum() for p in b.lm.parameters()))
    assert checksum == pytest.approx(META["tiny"]["lm_param_sum"], abs=1e-6), "the tiny demo VLM's init changed"
    traces = {}

    def get(seed):
        if seed not in traces:
            traces[seed] = run_sync(generate_trace_job(b, random_image(64, 64, seed=seed), VARIANTS["demo"].prompt,
                                                       max_new_tokens=1))
        return b, traces[seed]

    return get


@pytest.mark.parametrize("j", range(3))
def test_tiny_demo_vlm_end_to_end_matches_official(demo, j):
    c = META["tiny"]["cases"][j]
    b, trace = demo(c["seed"])
    prep = trace.extras["prepared"]
    assert prep.inputs["input_ids"].shape[1] == c["seq"]
    np.testing.assert_array_equal(prep.image_positions, np.arange(c["s0"], c["s0"] + c["n"]))
    values = {"max_new_tokens": 1}
    values.update({"keep": _keep_for(c["value"], c["n"])} if c["mode"] == "topk" else
                  {"count": "rank", "rank_scale": c["value"]})
    params = HOST.make_params("vlm.sparsevlm", values)
    sel = run_sync(HOST.run("vlm.sparsevlm", trace, params, target=Target(prompts=(trace.extras["prompt"],)),
                            cancel=CancelToken(), backend=b))
    np.testing.assert_array_equal(np.flatnonzero(sel.kept), Z[f"tiny{j}_keep"])
