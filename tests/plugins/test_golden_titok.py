"""The tokenizer backend's TiTok against the official code (Yu et al., NeurIPS 2024, ``bytedance/1d-tokenizer``).

``tests/golden/titok.npz`` holds four seeded 8-bit 16x16 images and what the official
``modeling/titok.py`` ``TiTok`` (with ``modeling/modules/blocks.py``, ``modeling/quantizer/quantizer.py``
and, for the legacy releases, the MaskGIT-VQGAN decoder of ``modeling/modules/maskgit_vqgan.py``)
returned for them on the tiny official-layout weights of
``make_tiny_titok(folder, legacy=L, seed=0, image_size=16, patch=4)``, prefix ``legacy`` (VQ tokens,
MaskGIT-VQGAN pixel decoder) and ``single`` (single-stage, pixels from the transformer decoder):
the token ids of ``encode``, the pre-quantisation latents, ``decode_tokens`` of those ids and of
eight edited sequences (one token replaced each), and the encoder blocks' attention (the official
forward calls its ``nn.MultiheadAttention`` with ``need_weights=False``; the stored attention is
that module called with ``need_weights=True`` on the block's input). Repository, commit, exact
calls and the shims (tiny shapes for the hard-coded size table) are in the file's ``meta`` and
``tests/golden/PROVENANCE.md``.

Compared (the weights are rebuilt here, their checksum asserted first): identical ids (the
smallest cosine margin between best and second code is 4e-3) and latents within 1e-5 (measured
0); single-stage decoded pixels within 1e-5 (measured 0 with the official batch, 3.6e-7 one image
at a time); legacy: the transformer decoder's VQGAN code logits within 1e-5 (measured 0) and the
pixels within 1e-4 (measured 0 with the official batch, 3.9e-5 one image at a time). The looser
pixel tolerance is the conditioning of the random tiny MaskGIT-VQGAN decoder, not a difference
of the code: one float32 ulp at its input moves its pixels by up to 4.8e-5, and the project's own
decode of the same ids in a batch of 1 and of 4 differs by 2.1e-5; any change of the math moves
them by orders of magnitude more. The backend's clamped ``decode_ids`` is compared with the
official output clamped to [0, 1], and the attention its trace keeps within 1e-6 (measured
4.5e-8). The project's decoder makes the ffn input contiguous as the official code does (else
its 1x1 conv rounds differently: 2e-7 on the logits, 2e-5 on the legacy pixels).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from explorer.backends.registry import load_backend
from explorer.core.image_io import image_from_array
from explorer.core.jobs import run_sync
from explorer.core.trace import CaptureSpec
from explorer.testing.tiny_tokenizer import make_tiny_titok

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "titok.npz"
PREFIXES = ("legacy", "single")
PIXEL_ATOL = {"legacy": 1e-4, "single": 1e-5}  # see the module docstring


@pytest.fixture(scope="module")
def golden():
    z = np.load(GOLDEN)
    return z, json.loads(str(z["meta"][0]))


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden-titok")
    return {p: load_backend(make_tiny_titok(root / p, legacy=p == "legacy", seed=0, image_size=16, patch=4))
            for p in PREFIXES}


def test_meta_names_the_official_code(golden):
    _, meta = golden
    assert meta["repository"] == "https://github.com/bytedance/1d-tokenizer"
    assert meta["commit"] == "942a96fbdd873780179d1b78d5462911528bf8c8"
    assert meta["file"] == "modeling/titok.py"


@pytest.mark.parametrize("prefix", PREFIXES)
def test_the_rebuilt_weights_are_those_of_the_golden_file(golden, backends, prefix):
    z, _ = golden
    state = backends[prefix].model.state_dict()
    sums = [float(state[str(k)].double().sum()) for k in z[f"{prefix}_checksum_keys"]]
    np.testing.assert_allclose(sums, z[f"{prefix}_checksum"], rtol=1e-9, atol=1e-9,
                               err_msg="make_tiny_titok's init changed: rebuild tests/golden/titok.npz")


@pytest.mark.parametrize("prefix", PREFIXES)
def test_encode_matches_official(golden, backends, prefix):
    z, _ = golden
    ids, latents = backends[prefix].encode(torch.from_numpy(z["images"]))
    np.testing.assert_array_equal(ids.numpy(), z[f"{prefix}_ids"])
    np.testing.assert_allclose(latents.numpy(), z[f"{prefix}_latents"], atol=1e-5, rtol=0)
    assert len({tuple(r) for r in z[f"{prefix}_ids"].tolist()}) >= 3  # the images do get different ids


@pytest.mark.parametrize("prefix", PREFIXES)
def test_decode_matches_official(golden, backends, prefix):
    z, _ = golden
    backend = backends[prefix]
    for ids_key, out_key in ((f"{prefix}_ids", f"{prefix}_decoded"),
                             (f"{prefix}_edited_ids", f"{prefix}_edited_decoded")):
        ids = torch.from_numpy(z[ids_key])
        with torch.no_grad():
            raw = backend.model.decode(ids)  # not clamped, as the official decode_tokens
        np.testing.assert_allclose(raw.numpy(), z[out_key], atol=PIXEL_ATOL[prefix], rtol=0)
        np.testing.assert_allclose(backend.decode_ids(ids).numpy(), np.clip(z[out_key], 0, 1), atol=PIXEL_ATOL[prefix],
                                   rtol=0)


def test_legacy_decoder_logits_match_official(golden, backends):
    """The legacy transformer decoder's MaskGIT-VQGAN code logits (before the pixel decoder)."""
    z, _ = golden
    model = backends["legacy"].model
    with torch.no_grad():
        logits = model.decoder(model.token_vectors(torch.from_numpy(z["legacy_ids"])).transpose(1, 2).unsqueeze(2))
    np.testing.assert_allclose(logits.numpy(), z["legacy_logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_one_token_edits_match_official(golden, backends, prefix):
    """The edited sequences are the encoded ids with one token replaced (the stored edit list), and
    decoding the code vectors with that one vector replaced gives the official pixels."""
    z, _ = golden
    backend = backends[prefix]
    ids = torch.from_numpy(z[f"{prefix}_ids"])
    for (b, pos, new), want in zip(z[f"{prefix}_edits"].tolist(), z[f"{prefix}_edited_decoded"]):
        vectors = backend.token_vectors(ids[b:b + 1]).clone()
        vectors[0, pos] = backend.codebook()[new]
        edited = ids[b].clone()
        edited[pos] = new
        assert edited.tolist() in z[f"{prefix}_edited_ids"].tolist()
        np.testing.assert_allclose(backend.decode_vectors(vectors)[0].numpy(), np.clip(want, 0, 1),
                                   atol=PIXEL_ATOL[prefix], rtol=0)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_trace_ids_and_encoder_attention_match_official(golden, backends, prefix):
    """Through the backend's own preprocessing (a 16x16 image needs no resize or crop): the trace's
    ids and every encoder block's attention ``(heads, L, L)`` over ``[cls, patches, latents]``."""
    z, _ = golden
    backend = backends[prefix]
    n_layers = backend.info.n_layers
    for b in range(z[f"{prefix}_attention"].shape[0]):
        trace = run_sync(backend.trace(image_from_array(z["images_uint8"][b]),
                                       CaptureSpec(attention_layers=frozenset(range(n_layers)))))
        np.testing.assert_array_equal(trace.extras["ids"].numpy(), z[f"{prefix}_ids"][b])
        for layer in range(n_layers):
            np.testing.assert_allclose(trace.attentions[layer], z[f"{prefix}_attention"][b, layer], atol=1e-6, rtol=0)
