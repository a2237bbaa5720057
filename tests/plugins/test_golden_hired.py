"""HiRED against the official budgets and selection (Arif et al., arXiv 2408.10945, ``hasanar1f/HiRED``).

``tests/golden/hired.npz`` holds inputs and what the official ``HiRED_sub_img_budgets`` and
``HiRED_token_selection`` (``transformers/src/transformers/models/llava_next/modeling_llava_next.py``;
repository, commit and exact call in the file's ``meta`` and ``tests/golden/PROVENANCE.md``)
returned for them: per-tile budgets over a grid of rates, alphas, tile grids and seeded mark
patterns (including cases where the official float32 truncation and a float64 floor differ), and
the kept masks on seeded [CLS] attention. Budgets and kept sets must be identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from explorer_plugins.vlm_hired.method import Partitions, hired_select, hired_sub_budgets

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "hired.npz"
N_V = 576


def _load():
    z = np.load(GOLDEN)
    return z, json.loads(str(z["meta"][0]))


def _budget_cases(z):
    spatial = np.unpackbits(z["b_spatial"], axis=1)[:, :N_V].astype(bool)
    for i in range(len(z["b_sub"])):
        nh, nw = (int(a) for a in z["b_grid"][i])
        marks = np.array([m.sum() for m in np.array_split(spatial[i], nh * nw)], dtype=np.int64)
        yield marks, int(z["b_sub"][i]), z["b_budgets"][i, :nh * nw]


def test_meta_names_the_official_code():
    _, meta = _load()
    assert meta["repository"] == "https://github.com/hasanar1f/HiRED"
    assert meta["commit"] == "502d6dd79a03e87cc808cedba8b8a951d93cb62b"


def test_tile_budgets_match_official_float32_truncation():
    z, _ = _load()
    differ = 0
    for marks, sub, expected in _budget_cases(z):
        np.testing.assert_array_equal(hired_sub_budgets(marks, sub, N_V), expected)
        differ += not np.array_equal(hired_sub_budgets(marks, sub, N_V, "float64"), expected)
    assert differ > 0  # the grid holds cases where a float64 floor is not the official budget


def test_kept_sets_match_official_selection():
    z, meta = _load()
    for i, case in enumerate(meta["selection_cases"]):
        n_v, P = case["n_v"], case["P"]
        top, bottom = z[f"s{i}_top"].sum(1), z[f"s{i}_bottom"].sum(1)  # heads summed, float32 as official
        parts = Partitions(numbers=np.arange(P * n_v, dtype=np.int64).reshape(P, n_v), grid=tuple(case["grid"]))
        numbers, info = hired_select(top, bottom, parts, case["rate"], case["alpha"])
        expected = np.flatnonzero(z[f"s{i}_mask"])
        np.testing.assert_array_equal(numbers, expected)
        np.testing.assert_array_equal(info["budgets"], z[f"s{i}_mask"][1:].sum(1))
