"""DART against the official selection (Wen et al., EMNLP 2025, ``ZichenWen1/DART``).

``tests/golden/dart.npz`` holds fixed seeded inputs and the kept indices that the official
``DART.get_retained_image_token`` (``llava/model/language_model/modeling_llama_self.py``; the
repository, commit and exact call are in the file's ``meta`` and in ``tests/golden/PROVENANCE.md``)
returned for them. The official loop visits its pivots in the iteration order of a Python ``set``
of their sequence positions; the plugins' default ``pivot_order="official"`` must reproduce the
kept sets exactly, while the other orders stay available with their documented behaviour.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from explorer_plugins.common.selection import dart_pivot_order
from explorer_plugins.dart.method import Dart
from explorer_plugins.dart.method import dart_select as enc_select
from explorer_plugins.dart.method import key_l1 as enc_key_l1
from explorer_plugins.vlm_dart.method import VlmDartParams, dart_token_topk
from explorer_plugins.vlm_dart.method import dart_select as vlm_select
from explorer_plugins.vlm_dart.method import key_l1 as vlm_key_l1

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "dart.npz"


def _load():
    data = np.load(GOLDEN)
    meta = json.loads(str(data["meta"]))
    cases = []
    for i, c in enumerate(meta["cases"]):
        cases.append(dict(c, keys=data[f"c{i}_keys"][0].astype(np.float64),
                          hidden=data[f"c{i}_hidden"][0].astype(np.float64), kept=data[f"c{i}_kept"]))
    return meta, cases


META, CASES = _load()
ENCODER_LIKE = [i for i, c in enumerate(CASES) if c["pivot_text_token"] == 0 and c["text_length"] == 0]


def _layout(c):
    s0, n, t = c["image_token_start_index"], c["image_token_length"], c["text_length"]
    return s0, n, t, s0 + np.arange(n), s0 + n + np.arange(t)


def _topk(c):
    # the official TOKEN_TOPK, from the same float expression n·(1 − reduction_ratio)
    return dart_token_topk(c["image_token_length"], 1 - c["reduction_ratio"],
                           c["pivot_image_token"] + c["pivot_text_token"], c["max_num_trunction"])


def _vlm(c, order):
    s0, n, t, img, txt = _layout(c)
    keep, _, _ = vlm_select(c["hidden"][img], vlm_key_l1(c["keys"], img), c["hidden"][txt], vlm_key_l1(c["keys"], txt),
                            c["pivot_image_token"], c["pivot_text_token"], _topk(c), order=order, img_pos=img, txt_pos=txt)
    return np.asarray(keep) + s0


def _enc(c, order):
    s0, n, _, img, _ = _layout(c)
    keep, _ = enc_select(enc_key_l1(c["keys"][:, img]), c["hidden"][img], c["pivot_image_token"], _topk(c),
                         order=order, positions=img)
    return np.asarray(keep) + s0


def test_golden_provenance():
    assert META["repository"] == "https://github.com/ZichenWen1/DART"
    assert len(META["commit"]) == 40 and META["function"].startswith("DART.get_retained_image_token")
    assert len(CASES) >= 6


@pytest.mark.parametrize("i", range(len(CASES)))
def test_vlm_official_order_reproduces_official_sets(i):
    c = CASES[i]
    kept = _vlm(c, "official")
    np.testing.assert_array_equal(kept, c["kept"])
    assert kept.size == c["n_kept"] == c["pivot_image_token"] + (c["pivot_image_token"] + c["pivot_text_token"]) * _topk(c)


@pytest.mark.parametrize("i", ENCODER_LIKE)
def test_encoder_official_order_reproduces_official_sets(i):
    np.testing.assert_array_equal(_enc(CASES[i], "official"), CASES[i]["kept"])


def test_the_order_matters_on_the_golden_inputs():
    """The earlier documented orders do not reproduce the official sets in general (which is why
    ``official`` is the default), but they keep the same number of tokens and the same pivots."""
    vlm_same = [np.array_equal(_vlm(c, "position"), c["kept"]) for c in CASES]
    enc_same = [np.array_equal(_enc(CASES[i], "key_norm"), CASES[i]["kept"]) for i in ENCODER_LIKE]
    assert not all(vlm_same) and not all(enc_same)
    for c in CASES:
        for order in ("position", "key_norm"):
            assert _vlm(c, order).size == c["kept"].size


def test_pivot_order_semantics():
    # a set of small ints iterates by hash (= value) modulo its table size, probing on collisions,
    # so it is not the sorted order: 9 and 1 share slot 1 of an 8-slot table and 9 came first
    assert dart_pivot_order([9, 1], "official") == [0, 1]
    assert dart_pivot_order([9, 1], "position") == [1, 0]
    assert dart_pivot_order([9, 1], "key_norm") == [0, 1]
    pos = [75, 38, 40, 99, 610, 612, 615, 620]
    assert [pos[k] for k in dart_pivot_order(pos, "official")] == list(set(pos))
    with pytest.raises(ValueError):
        dart_pivot_order(pos, "sorted")


def _greedy(u, valid, kept, pivot_vecs, counts):
    """The documented selection loop (numpy, visiting ``pivot_vecs`` in the given order)."""
    valid, kept = valid.copy(), kept.copy()
    for vec, t in zip(pivot_vecs, counts):
        cos = np.where(valid, u @ vec, np.inf)
        chosen = np.argsort(cos, kind="stable")[:t]
        kept[chosen] |= valid[chosen]
        valid[chosen] = False
    return np.flatnonzero(kept)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("i", range(len(CASES)))
def test_vlm_position_order_is_the_documented_ascending_order(i):
    c = CASES[i]
    s0, n, t, img, txt = _layout(c)
    u, ut = _unit(c["hidden"][img]), _unit(c["hidden"][txt])
    ip = np.sort(np.argsort(-vlm_key_l1(c["keys"], img), kind="stable")[:c["pivot_image_token"]])
    tp = np.sort(np.argsort(-vlm_key_l1(c["keys"], txt), kind="stable")[:c["pivot_text_token"]])
    valid = np.ones(n, bool)
    valid[ip] = False
    vecs = [u[k] for k in ip] + [ut[k] for k in tp]  # image pivots, then text pivots, ascending
    expected = _greedy(u, valid, ~valid, vecs, [_topk(c)] * len(vecs))
    np.testing.assert_array_equal(_vlm(c, "position") - s0, expected)


@pytest.mark.parametrize("i", ENCODER_LIKE)
def test_encoder_key_norm_order_is_the_documented_descending_order(i):
    c = CASES[i]
    s0, n, _, img, _ = _layout(c)
    u = _unit(c["hidden"][img])
    piv = np.argsort(-enc_key_l1(c["keys"][:, img]), kind="stable")[:c["pivot_image_token"]]
    valid = np.ones(n, bool)
    valid[piv] = False
    expected = _greedy(u, valid, ~valid, [u[k] for k in piv], [_topk(c)] * len(piv))
    np.testing.assert_array_equal(_enc(c, "key_norm") - s0, expected)
    _, visited = enc_select(enc_key_l1(c["keys"][:, img]), c["hidden"][img], c["pivot_image_token"], _topk(c),
                            order="key_norm")
    np.testing.assert_array_equal(visited, piv)


def test_plugins_default_to_the_official_order():
    assert Dart.Params().pivot_order == "official"
    assert VlmDartParams().pivot_order == "official"
