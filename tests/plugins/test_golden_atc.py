"""ATC against the official code (Haurum et al., Agglomerative Token Clustering, ECCV 2024,
``JoakimHaurum/ATC``).

``tests/golden/atc.npz`` holds what the official ``ATC_setup/models/atc.py`` returned
(``agglomerative_clustering(keys.mean(1), K, linkage, class_token=True)`` then ``merge_wavg``;
repository, commit and exact call in the file's ``meta`` and ``tests/golden/PROVENANCE.md``) for:

* seeded random inputs (stored): a batch of 2, ``N`` = 49 and 64 patch tokens + [CLS], keys of 2
  heads, the three linkages, ``K`` from 3 to 63, unit sizes and random sizes (``*_rand``);
* real tokens: the head-mean keys and features of block 1 of the tiny open_clip model of the
  tests (``make_tiny_clip(folder, seed=0)``) on a seeded image (stored, with a checksum of
  three weight tensors; ``test_real_tokens_come_from_the_tiny_model`` rebuilds them).

Compared: the partition must be identical (the project numbers the clusters by their first patch
token, the official code by scikit-learn's label; the official labels renumbered by first
occurrence must equal the project's), [CLS] stays alone and first, and the merged tokens and
sizes of ``apply_step`` must equal the official ``merge_wavg`` output (in the official order)
within 1e-5 (measured: 1.6e-7).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from explorer.core.reduction import TokenState, apply_step
from explorer_plugins.atc.method import ATC
from explorer_plugins.common.selection import cluster_count, relabel
from golden_models import tiny_clip_checksum, tiny_clip_real_trace

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "atc.npz"
TOL = 1e-5
Z = dict(np.load(GOLDEN))
META = json.loads(str(Z["meta"][0]))
CASES = [str(c) for c in Z["cases"]]
REAL_LAYER = 1


def _state(keys, x, size) -> TokenState:
    """One image's state: ``keys (H, 1+N, dh)``, ``x (1+N, C)``, ``size (1+N,)``."""
    n = x.shape[0] - 1
    return TokenState(layer=0, stage=0, x=np.asarray(x, np.float64), keys=keys, attention=None,
                      sizes=np.asarray(size, np.float64), n_prefix=1, assign=np.arange(n),
                      positions=np.zeros((n, 2)), grid=(1, n), n_stages=1)


def _inputs(case):
    """``keys (B, H, 1+N, dh)``, ``x (B, 1+N, C)``, ``size (B, 1+N)``, linkage, K."""
    name, linkage, k = case.split("_")[:3]
    if name == "real":
        keys, x = Z["real_keys"][None], Z["real_x"][None]
    else:
        keys, x = Z[f"{name}__keys"], Z[f"{name}__x"]
    size = Z[f"{name}__size_rand"] if case.endswith("_rand") else np.ones(x.shape[:2], np.float32)
    return keys, x, size, linkage, int(k[1:])


def _compare(case, state, b):
    """Run the plugin on ``state`` (image ``b`` of ``case``) and compare with the official output;
    returns the largest difference of the merged tokens."""
    _, _, _, linkage, K = _inputs(case)
    n = state.n_patches
    keep = (K + 0.5) / n
    assert cluster_count(keep, state) == K
    step = ATC().reduce(state, ATC.Params(keep=keep, linkage=linkage))

    labels = Z[f"{case}__labels"][b].astype(np.int64)  # official cluster id + 1, [CLS] 0
    assert labels[0] == 0 and (labels[1:] >= 1).all()
    official = labels[1:] - 1
    assert np.unique(official).size == K
    np.testing.assert_array_equal(np.asarray(step.merge), relabel(official))  # same partition

    new_x, new_size, _, _ = apply_step(state, step)
    first = np.array([np.flatnonzero(step.merge == g)[0] for g in range(K)])
    order = np.concatenate([[0], 1 + official[first]])  # the official token of every project token
    want_x, want_size = Z[f"{case}__x_merged"][b][order], Z[f"{case}__size_merged"][b][order]
    diff = float(np.max(np.abs(new_x - want_x)))
    assert diff <= TOL, diff
    assert np.max(np.abs(new_size - want_size)) <= TOL
    return diff


def test_meta_names_the_official_code():
    assert META["repository"] == "https://github.com/JoakimHaurum/ATC"
    assert META["commit"] == "227c94b584df323b94dd79e8ddbb88b1587eeb8e"
    assert META["file"] == "ATC_setup/models/atc.py"
    assert "agglomerative_clustering" in META["call"] and "merge_wavg" in META["call"]
    assert GOLDEN.stat().st_size < 200_000


@pytest.mark.parametrize("case", CASES)
def test_atc_matches_official(case):
    keys, x, size, _, _ = _inputs(case)
    for b in range(x.shape[0]):
        _compare(case, _state(keys[b], x[b], size[b]), b)


def test_real_tokens_come_from_the_tiny_model(tiny_clip):
    """The stored real tokens are block 1 of the tests' tiny CLIP on the seeded image: rebuilt here
    (a changed initialisation is reported by the checksum first) and clustered from the rebuilt
    state like the official code clustered the stored one."""
    np.testing.assert_allclose(tiny_clip_checksum(tiny_clip), Z["real_checksum"], rtol=1e-6,
                               err_msg="the tiny CLIP's initialisation changed: rebuild tests/golden/atc.npz")
    state = tiny_clip.token_state(tiny_clip_real_trace(tiny_clip), REAL_LAYER, attention="none")
    np.testing.assert_allclose(state.keys, Z["real_keys"], atol=1e-5)
    np.testing.assert_allclose(state.x, Z["real_x"], atol=1e-5)
    for case in (c for c in CASES if c.startswith("real")):
        _compare(case, state, 0)
