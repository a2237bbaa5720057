"""The benchmark commands on tiny models and a few scenes: the bookkeeping behind the docs tables.

Each test checks a property the table relies on, not the (meaningless) scores of random weights.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

pytest.importorskip("ray")

from explorer.demo.scenes import iter_scenes  # noqa: E402
from explorer.sweep.presets import MAPS_SEED as EVAL_SEED  # noqa: E402
from explorer.sweep.presets import evaluate_maps, evaluate_reduction, markdown_table, reduction_table  # noqa: E402


def test_eval_maps_counts_every_object_and_shares_the_random_baseline(tiny_clip_spec, ray_local):
    methods = ["attention.raw", "similarity.maskclip"]
    rows = evaluate_maps(tiny_clip_spec.canonical(), n_scenes=3, methods=methods, deletion_steps=4, size=(96, 128))
    n_objects = sum(len(s.objects) for s in iter_scenes(EVAL_SEED, 3, size=(96, 128), n_objects=2))
    assert n_objects == 6
    by_id = {r.method: r for r in rows}
    assert set(by_id) == set(methods)
    for r in rows:
        assert r.total == n_objects and r.failures == 0
        assert 0.0 <= r.pointing <= 1.0
        assert len(r.deletion) == n_objects and np.all(np.isfinite(r.deletion))
    # raw attention ignores the prompt: one map per scene, so at most one of its two objects is hit
    assert by_id["attention.raw"].hits <= 3
    # one random order per object, the same baseline for every method
    assert by_id["attention.raw"].random_deletion == by_id["similarity.maskclip"].random_deletion
    table = markdown_table(rows, "header")
    assert "`attention.raw`" in table and "`similarity.maskclip`" in table


def test_eval_reduction_keep_one_is_the_unreduced_model(tiny_clip_spec, ray_local):
    acc = evaluate_reduction(tiny_clip_spec.canonical(), n_scenes=2, keeps=(1.0, 0.25),
                             methods=["pruning.topk", "merging.tome"], layer=1, size=(96, 96))
    assert set(acc) == {"pruning.topk", "merging.tome"}
    for a in acc.values():
        assert a.errors == 0, a.error
        assert a.agree[1.0] == [1.0, 1.0]
        np.testing.assert_allclose(a.cosine[1.0], 1.0, atol=1e-4)
        assert all(-1.0 <= c <= 1.0 + 1e-6 for c in a.cosine[0.25])
        assert all(0.0 <= s <= 1.0 for s in a.share[0.25])
    assert "`pruning.topk`" in reduction_table(acc, (1.0, 0.25), "header")


def test_eval_vlm_keep_one_answers_like_the_unpruned_model(tmp_path, ray_local):
    from explorer.sweep.presets import evaluate_vlm, vlm_tables
    from explorer.testing.tiny_vlm import make_tiny_vlm

    spec = make_tiny_vlm(tmp_path / "vlm", "demo").canonical()
    res = evaluate_vlm(spec, n_scenes=2, keeps=(1.0,), methods=["vlm.random", "vlm.fastv"], size=(64, 96),
                       max_new_tokens=4)
    assert len(res["full"]) == 2
    for mid in ("vlm.random", "vlm.fastv"):
        assert res["accuracy"][mid][1.0] == res["full"]
    assert "`vlm.fastv`" in vlm_tables(res, (1.0,), "header")


def test_eval_regions_scores_every_object(tmp_path, tiny_clip_spec):
    from explorer.demo.evaluate_regions import evaluate_regions, regions_table
    from explorer.testing.tiny import make_tiny_sam
    from explorer.testing.tiny_vlm import make_tiny_vlm

    sam = make_tiny_sam(tmp_path / "sam").canonical()
    vlm = make_tiny_vlm(tmp_path / "vlm", "demo").canonical()
    res = evaluate_regions(tiny_clip_spec.canonical(), sam, vlm, n_scenes=2, size=(64, 80))
    assert res["objects"] == sum(len(s.objects) for s in iter_scenes(7_000_003, 2, size=(64, 80)))
    for key in ("mask_iou", "label_top1", "caption_exact"):
        assert 0.0 <= res[key] <= 1.0
    assert str(res["objects"]) in regions_table(res, "header")
