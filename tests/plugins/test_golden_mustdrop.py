"""MustDrop against the official code (Liu et al., arXiv 2411.10803, ``liuting20/MustDrop``).

``tests/golden/mustdrop.npz`` (repository, commit, files and exact calls in its ``meta`` and in
``tests/golden/PROVENANCE.md``) holds, for seeded inputs, what the official code returned:

* ``m*``: ``conditional_pooling(feat, 0.8, (3, 3))`` + ``merge_wavg`` + ``merge_source`` on
  ``feat (1, 1 + g², D)`` with some windows made similar: the merged sequence, the sizes, and the
  new token of every patch — :func:`window_merge` must give the same order and tokens (≤ 1e-6);
* ``k*``: the key-set block of ``CLIPVisionModelAcc.custom_forward`` on a stored [CLS] row —
  :func:`key_set` must pick the same tokens;
* ``f*``: four prefill stages of ``dual_attention_filter`` followed by the official stage update
  (key set re-added, sequence shortened), and the decode-time cache index composition —
  :func:`dual_attention_filter`, :func:`stage_keep` and ``VlmBackend._cut_cache`` must agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from explorer.backends.vlm import VlmBackend
from explorer_plugins.vlm_mustdrop.method import dual_attention_filter, key_set, stage_keep, window_merge

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "mustdrop.npz"
Z = np.load(GOLDEN)
META = json.loads(str(Z["meta"][0]))


def test_meta_names_the_official_code():
    assert META["repository"] == "https://github.com/liuting20/MustDrop"
    assert META["commit"] == "909afa538bff22e10c02db2da101aa1870e21912"


def test_window_merge_matches_conditional_pooling():
    merged_total = 0
    for case in [c for c in META["cases"] if c["name"].startswith("m")]:
        name = case["name"]
        feat = torch.from_numpy(Z[f"{name}_feat"])
        out, assign = window_merge(feat, 0.8, 3)
        official = Z[f"{name}_x"]
        assert out.shape == official.shape, name
        np.testing.assert_allclose(out.numpy(), official, atol=1e-6, rtol=0, err_msg=name)
        np.testing.assert_array_equal(assign, Z[f"{name}_assign"], err_msg=name)
        r = case["merged"]
        assert feat.shape[1] - out.shape[1] == 8 * r  # each merged window removes exactly 8 tokens
        merged_total += r
    assert merged_total >= 20  # the cases do merge


def test_merge_conserves_the_size_weighted_sum():
    for case in [c for c in META["cases"] if c["name"].startswith("m")]:
        name = case["name"]
        out, assign = window_merge(torch.from_numpy(Z[f"{name}_feat"]), 0.8, 3)
        sizes = np.bincount(assign)
        np.testing.assert_array_equal(sizes, Z[f"{name}_size"][0, 1:, 0].astype(int))
        np.testing.assert_allclose((out[0, 1:].numpy() * sizes[:, None]).sum(0), Z[f"{name}_feat"][0, 1:].sum(0),
                                   atol=1e-4)


def test_key_set_matches_the_official_block():
    for c in range(4):
        cls = Z[f"k{c}_cls"][:, 1:]  # (H, n): the [CLS] row over the patch tokens
        np.testing.assert_array_equal(key_set(cls, 0.08), np.sort(Z[f"k{c}_index"]), err_msg=f"k{c}")
        np.testing.assert_array_equal(key_set(torch.from_numpy(cls), 0.08), np.sort(Z[f"k{c}_index"]))


def test_prefill_stages_and_cache_match_the_official_forward():
    dropped_by_filter_but_kept = 0
    for case in [c for c in META["cases"] if c["name"].startswith("f")]:
        name, pre, text = case["name"], case["pre"], case["text"]
        g_thr, i_thr = case["thr"]
        keys = Z[f"{name}_keys"]
        original = np.arange(case["n"])  # image-token numbers of the current tokens
        seqs = [np.arange(pre + case["n"] + text)]  # prefill sequence indices entering each stage
        for s in range(4):
            rows = Z[f"{name}_s{s}_rows"]
            f_keep, _ = dual_attention_filter(rows, g_thr, i_thr)
            np.testing.assert_array_equal(f_keep, Z[f"{name}_s{s}_filter"], err_msg=f"{name} stage {s}")
            keep, _ = stage_keep(torch.from_numpy(rows), original, keys, g_thr, i_thr)
            np.testing.assert_array_equal(keep, Z[f"{name}_s{s}_kept"], err_msg=f"{name} stage {s}")
            assert np.isin(keys, original[keep]).all()  # the key set is never dropped
            dropped_by_filter_but_kept += keep.size - f_keep.size
            cur = seqs[-1]
            n_cur = original.size
            seq_keep = np.concatenate([np.arange(pre), pre + keep, np.arange(pre + n_cur, cur.size)])
            seqs.append(cur[seq_keep])
            original = original[keep]
        # the decode cache: official layers 2 | 3-6 | 7-10 | 11-14 saw the sequences entering stages 0..3
        L = 16
        seen = {l: seqs[0] for l in range(3)}
        seen.update({l: seqs[1 + (l - 3) // 4] for l in range(3, 15)})
        seen.update({15: seqs[4]})
        cache = _cache_holding(seen)
        VlmBackend._cut_cache(cache, seen, seqs[4], 2)
        for l in range(L):
            got = cache.layers[l].keys[0, 0, :, 0].long().numpy()
            if l < 2:
                np.testing.assert_array_equal(got, seqs[0])  # before the first pruning layer: everything
            else:
                stage = 0 if l == 2 else 1 + (l - 3) // 4
                if stage < 4:
                    official = Z[f"{name}_cache{stage}"]  # indices into what that layer saw
                    np.testing.assert_array_equal(got, seen[l][official], err_msg=f"{name} layer {l}")
                np.testing.assert_array_equal(got, seqs[4])
    assert dropped_by_filter_but_kept > 0  # the key set mattered in these cases


def _cache_holding(seen: dict[int, np.ndarray]):
    """A real DynamicCache whose layer ``l`` holds the sequence indices ``seen[l]`` as its keys."""
    from transformers import DynamicCache, LlamaConfig

    cache = DynamicCache(config=LlamaConfig(num_hidden_layers=len(seen), hidden_size=8, num_attention_heads=1))
    for l, ids in seen.items():
        kv = torch.as_tensor(ids, dtype=torch.float32)[None, None, :, None].repeat(1, 1, 1, 2)
        cache.update(kv, kv.clone(), l)
    return cache
