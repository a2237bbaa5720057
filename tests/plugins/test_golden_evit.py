"""EViT against the official code (Liang et al., ICLR 2022, ``youweiliang/evit``).

``tests/golden/evit.npz`` holds fixed seeded token tensors and what the official ``evit.py``
``Block.forward`` / ``Attention.forward`` (with ``helpers.complement_idx``) computed for them over
2-3 stages: per stage the patch tokens entering the block (``N - 1``, the previous stage's fused
token counted), ``left_tokens = math.ceil(keep_rate * (N - 1))``, the [CLS] attention, the kept
indices (``torch.topk(..., sorted=True)``, descending score) and the tokens after gather + fusion.
Repository, commit and the exact call are in the file's ``meta`` and in
``tests/golden/PROVENANCE.md``. The plugin's per-stage count, ``topk_step`` and the numpy
reference :func:`apply_step` must reproduce them: counts and kept indices exactly, fused tokens
to 1e-5; and ``EViT.reduce`` (``counts="official"``, the default) with ``keep`` given.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from explorer.core.reduction import ReductionStep, TokenState, apply_step
from explorer_plugins.topk.method import EViT, evit_keep_count, evit_stage_rate, topk_step

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "evit.npz"
DATA = np.load(GOLDEN)
META = [str(m) for m in DATA["meta"]]
CASES = json.loads(next(m for m in META if m.startswith("cases="))[len("cases="):])


def _state(xres, cls_attn, stage, n_stages):
    """A batched host TokenState of the official stage input: ``x`` the tokens after the attention
    residual, ``cls_row`` one "head" holding the official head-mean [CLS] attention."""
    B, N, _ = xres.shape
    n = N - 1
    cls_row = np.concatenate([np.zeros((B, 1, 1)), cls_attn[:, None, :]], -1) if cls_attn is not None else None
    return TokenState(layer=stage, stage=stage, x=xres.astype(np.float64), keys=None, attention=None,
                      sizes=np.ones((B, N)), n_prefix=1, assign=np.tile(np.arange(n), (B, 1)),
                      positions=np.zeros((B, n, 2)), grid=(1, n), n_stages=n_stages, cls_row=cls_row)


def test_meta_names_the_official_source():
    assert "repository=https://github.com/youweiliang/evit" in META
    assert any(m.startswith("commit=") and len(m) == len("commit=") + 40 for m in META)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_stage_counts_kept_indices_and_fused_tokens(case):
    name, rates = case["name"], case["rates"]
    for s, rate in enumerate(rates):
        p = f"{name}_s{s}"
        n_in, left = int(DATA[p + "_nin"]), int(DATA[p + "_left"])
        if s:  # N - 1 of this block counts the previous stage's fused token
            prev = f"{name}_s{s - 1}"
            assert n_in == int(DATA[prev + "_left"]) + int(bool(DATA[prev + "_pruned"]))
        k = evit_keep_count(rate, n_in)
        assert k == left
        if not bool(DATA[p + "_pruned"]):
            assert k == n_in  # left_tokens == N - 1: the official block returns unpruned, no fused token
            continue
        cls_attn, idx, post, xres = DATA[p + "_clsattn"], DATA[p + "_idx"], DATA[p + "_post"], DATA[p + "_xres"]
        step = topk_step(cls_attn, k, fuse=True)
        np.testing.assert_array_equal(step.keep, idx)  # same tokens, same (descending score) order
        for b in range(xres.shape[0]):
            one = _state(xres, cls_attn, s, len(rates)).image(b)
            x, sizes, _, _ = apply_step(one, ReductionStep(keep=step.keep[b], fuse=step.fuse[b]))
            assert x.shape[0] == 1 + k + 1
            np.testing.assert_allclose(x[1:1 + k], post[b, 1:1 + k], atol=1e-5)
            np.testing.assert_allclose(x[-1], post[b, -1], atol=1e-5)  # the fused (extra) token


@pytest.mark.parametrize("case", [c for c in CASES if c["keep"] is not None], ids=lambda c: c["name"])
def test_reduce_with_keep_gives_the_official_stages(case):
    """The plugin's own ``reduce`` (default params, ``keep`` = the official rate ** stages)."""
    name, rates, S = case["name"], case["rates"], case["stages"]
    method = EViT()
    params = EViT.Params(keep=case["keep"])
    assert params.counts == "official"
    for s, rate in enumerate(rates):
        assert evit_stage_rate(case["keep"], S) == pytest.approx(rate, abs=1e-12)
        p = f"{name}_s{s}"
        state = _state(DATA[p + "_xres"], DATA[p + "_clsattn"], s, S)
        step = method.reduce(state, params)
        assert step.keep.shape[-1] == int(DATA[p + "_left"])
        np.testing.assert_array_equal(step.keep, DATA[p + "_idx"])
        fused = (step.fuse[..., None] * DATA[p + "_xres"][:, 1:]).sum(-2)
        np.testing.assert_allclose(fused, DATA[p + "_post"][:, -1], atol=1e-5)


def test_total_counts_keep_the_earlier_mapping():
    """``counts="total"``: the last stage keeps exactly ceil(keep · original patches) (Top-K's rule),
    which differs from the official count on c0 (17 instead of 19 of 49 at keep 0.343)."""
    name = "c0"
    p = f"{name}_s2"
    state = _state(DATA[p + "_xres"], DATA[p + "_clsattn"], 2, 3)
    state.assign = np.tile(np.arange(49), (2, 1))  # the original grid: 49 patches
    total = EViT().reduce(state, EViT.Params(keep=0.343, counts="total"))
    official = EViT().reduce(state, EViT.Params(keep=0.343))
    assert total.keep.shape[-1] == 17 and official.keep.shape[-1] == int(DATA[p + "_left"]) == 19
