"""GlobEnc against the official decomposition (Modarressi et al., NAACL 2022, ``mohsenfayyaz/GlobEnc``).

``tests/golden/globenc.npz`` holds the tensors of a tiny attention block for two layers (block
input, values, attention probabilities, output projection weight and bias, LayerNorm parameters)
and what the official ``BertSelfOutput.forward`` / ``BertNormOutput.forward`` and the
``BertEncoder.forward`` accumulation (``src/modeling/modeling_bert.py``; repository, commit and
exact call in the file's ``meta`` and ``tests/golden/PROVENANCE.md``) returned for them. The
official code puts the output-projection bias only into the LayerNorm variance (through
``pre_ln_states``); the project's default must match it to 1e-5, and ``bias_on_diagonal=True``
(the project's earlier variant) must not.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from explorer_plugins.globenc.method import decompose_tensors, global_attribution

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "globenc.npz"


def _load():
    z = np.load(GOLDEN)
    return z, json.loads(str(z["meta"][0]))


def _run(z, l, **kw):
    t = lambda k: torch.from_numpy(z[f"l{l}_{k}"])  # noqa: E731
    parts = SimpleNamespace(out_weight=t("out_weight"), out_bias=t("out_bias"), layer_scale=None, head_scale=None,
                            ln2_weight=t("ln2_weight"), ln2_eps=1e-5)
    n_enc, y, y_hat = decompose_tensors(t("x"), t("v"), t("attention"), parts, return_parts=True, **kw)
    return n_enc.numpy(), y.numpy(), y_hat.numpy()


def test_meta_names_the_official_code():
    _, meta = _load()
    assert meta["repository"] == "https://github.com/mohsenfayyaz/GlobEnc"
    assert meta["commit"] == "a26b38bfdc00e01a994a0f07740f059d0431dca5"
    assert meta["file"] == "src/modeling/modeling_bert.py"


def test_block_decomposition_matches_official():
    z, _ = _load()
    for l in (0, 1):
        n_enc, _, y_hat = _run(z, l)
        np.testing.assert_allclose(n_enc, z[f"l{l}_n_enc"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(y_hat, z[f"l{l}_post_ln_layer"], atol=1e-5, rtol=0)


def test_global_attribution_matches_official():
    z, _ = _load()
    G = global_attribution([_run(z, l)[0] for l in (0, 1)])
    np.testing.assert_allclose(G, z["globenc"], atol=1e-5, rtol=0)


def test_bias_on_diagonal_is_the_non_official_variant():
    """The old behaviour (bias also on the diagonal) is kept as an option and differs from the official."""
    z, _ = _load()
    for l in (0, 1):
        n_old, y_old, _ = _run(z, l, bias_on_diagonal=True)
        n_new, y_new, _ = _run(z, l)
        off = ~np.eye(n_new.shape[0], dtype=bool)
        np.testing.assert_allclose(n_old[off], n_new[off], atol=1e-12)  # only the diagonal changes
        assert np.abs(np.diag(n_old) - np.diag(z[f"l{l}_n_enc"])).max() > 1e-3
        # with the bias on the diagonal the contributions sum to the true state; officially they miss b_O
        np.testing.assert_allclose(y_old.sum(1), z[f"l{l}_pre_ln_states"], atol=1e-5)
        np.testing.assert_allclose(y_new.sum(1) + z[f"l{l}_out_bias"], z[f"l{l}_pre_ln_states"], atol=1e-5)
