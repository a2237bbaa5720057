"""Top-K against the official code (Haurum et al., ICCVW 2023, ``JoakimHaurum/TokenReduction``).

``tests/golden/topk.npz`` holds what the official ``models/topk.py`` ``Block_TopK.forward`` /
``Attention_TopK.forward`` computed on seeded random blocks over 1-3 reduction stages (5 cases,
n = 196, 49, 64, 36, 200 patch tokens; c4: 0.145 · 200 = 28.999... in float): per stage the patch
tokens entering the block, the official count ``left_tokens = int(keep_rate * init_n)``
(``init_n`` the original patches, ``keep_rate = r ** (s + 1)``), the tokens after the attention
residual, the per-head [CLS] attention rows, the kept indices (``torch.topk(..., sorted=True)``, descending score) and the gathered tokens.
Repository, commit and the exact call are in the file's ``meta`` and ``tests/golden/PROVENANCE.md``.

Compared: ``TopK.reduce`` with the default ``counts="official"`` and ``keep = r ** S`` gives the
official count and the identical kept indices (same order); the numpy reference
:func:`apply_step` of that step gives the official pruned tokens within 1e-5. ``counts="total"``
(the earlier rule, ceil) must keep one token more where ``keep · n`` is not an integer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from explorer.core.reduction import TokenState, apply_step
from explorer_plugins.topk.method import TopK, topk_keep_count

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "topk.npz"
DATA = np.load(GOLDEN)
META = json.loads(str(DATA["meta"][0]))
CASES = META["cases"]


def _state(p, stage, n_stages, n_original):
    """A batched host TokenState of the official stage input (tokens after the attention residual,
    the official per-head [CLS] rows) on a 1 × n grid; ``assign`` has the original length."""
    xres, clsrow = DATA[p + "_xres"].astype(np.float64), DATA[p + "_clsrow"].astype(np.float64)
    B, N, _ = xres.shape
    n = N - 1
    assign = np.where(np.arange(n_original) < n, np.arange(n_original), -1)
    return TokenState(layer=stage, stage=stage, x=xres, keys=None, attention=None, sizes=np.ones((B, N)), n_prefix=1,
                      assign=np.tile(assign, (B, 1)), positions=np.zeros((B, n, 2)), grid=(1, n),
                      n_stages=n_stages, cls_row=clsrow)


def test_meta_names_the_official_source():
    assert META["repository"] == "https://github.com/JoakimHaurum/TokenReduction"
    assert META["commit"] == "88fe07ebbc5ffbf3a36814526577f1a8576e048d"
    assert META["file"] == "models/topk.py"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_counts_kept_indices_and_pruned_tokens(case):
    name, S, n0 = case["name"], case["stages"], case["n"]
    params = TopK.Params(keep=case["keep"])
    assert params.counts == "official"
    for s in range(S):
        p = f"{name}_s{s}"
        left, nin = int(DATA[p + "_left"]), int(DATA[p + "_nin"])
        assert left == int(case["token_ratio"][s] * n0) == case["counts"][s]
        if s:
            assert nin == int(DATA[f"{name}_s{s - 1}_left"])
        assert topk_keep_count(case["keep"], s, S, n0, nin) == left
        state = _state(p, s, S, n0)
        step = TopK().reduce(state, params)
        idx = DATA[p + "_idx"]
        assert step.keep.shape == idx.shape
        np.testing.assert_array_equal(step.keep, idx)  # same tokens, same (descending score) order
        post = DATA[p + "_post"]
        for b in range(idx.shape[0]):
            one = state.image(b)
            x, sizes, _, _ = apply_step(one, type(step)(keep=step.keep[b]))
            assert x.shape[0] == 1 + left
            np.testing.assert_allclose(x, post[b], atol=1e-5, rtol=0)


def test_total_counts_keep_the_earlier_rule():
    """``counts="total"``: ceil instead of int; c2 (64 patches, keep 0.3): 20 instead of 19."""
    case = next(c for c in CASES if c["name"] == "c2")
    state = _state("c2_s0", 0, 1, 64)
    official = TopK().reduce(state, TopK.Params(keep=case["keep"]))
    total = TopK().reduce(state, TopK.Params(keep=case["keep"], counts="total"))
    assert official.keep.shape[-1] == 19 == int(DATA["c2_s0_left"])
    assert total.keep.shape[-1] == math.ceil(0.3 * 64) == 20
    np.testing.assert_array_equal(total.keep[:, :19], official.keep)  # the same ranking, one more token
