"""The SAM backend: one encoder run per image (memory and disk cache), cheap clicks, masks at
the original size, the layout of the embedding grid, checkpoint errors and downloads."""

import hashlib

import numpy as np
import pytest
import torch

from explorer.backends.clip import ModelLoadError
from explorer.backends.sam import SamBackend, download_checkpoint
from explorer.backends.specs import SamSpec, parse_model_spec
from explorer.core.jobs import run_sync
from explorer.testing.tiny import make_tiny_sam


@pytest.fixture(scope="module")
def sam_spec(tmp_path_factory):
    return make_tiny_sam(tmp_path_factory.mktemp("tiny-sam"))


@pytest.fixture
def sam(sam_spec, tmp_path):
    return SamBackend.load(sam_spec, disk_cache=tmp_path / "emb")


def test_second_click_never_reruns_the_encoder(sam, make_image):
    img = make_image(60, 90, seed=1)
    emb = run_sync(sam.embedding_job(img))
    assert emb.source == "computed" and sam.encoder_calls == 1
    m1 = sam.predict(emb, points=[[30, 20]])
    emb2 = run_sync(sam.embedding_job(img))
    m2 = sam.predict(emb2, points=[[30, 20], [70, 40]], labels=[1, 0])
    m3 = sam.predict(emb2, box=[10, 10, 50, 40], mask_input=m1[0].meta["logits"])
    assert sam.encoder_calls == 1 and emb2.source == "memory"
    assert len(m1) == 3 and len(m2) == 3 and all(m.mask.shape == (60, 90) for m in m1 + m2 + m3)
    assert [m.score for m in m1] == sorted((m.score for m in m1), reverse=True)


def test_reopening_loads_the_embedding_from_disk(sam_spec, make_image, tmp_path):
    img = make_image(64, 64, seed=2)
    first = SamBackend.load(sam_spec, disk_cache=tmp_path / "emb")
    a = run_sync(first.embedding_job(img))
    again = SamBackend.load(sam_spec, disk_cache=tmp_path / "emb")  # a new session, same cache folder
    b = run_sync(again.embedding_job(img))
    assert again.encoder_calls == 0 and b.source == "disk"
    torch.testing.assert_close(a.features, b.features)
    pa, pb = first.predict(a, points=[[10, 40]]), again.predict(b, points=[[10, 40]])
    np.testing.assert_array_equal(pa[0].mask, pb[0].mask)
    # a damaged cache file is recomputed, never trusted
    path = next((tmp_path / "emb").rglob("*.safetensors"))
    path.write_bytes(b"garbage")
    third = SamBackend.load(sam_spec, disk_cache=tmp_path / "emb")
    c = run_sync(third.embedding_job(img))
    assert c.source == "computed" and third.encoder_calls == 1


@pytest.mark.parametrize("size", [(64, 64), (40, 120), (150, 50)])
def test_masks_and_layout_map_to_the_original_image(sam, make_image, size):
    img = make_image(*size, seed=3)
    emb = run_sync(sam.embedding_job(img))
    masks = sam.predict(emb, points=[[size[1] // 2, size[0] // 2]])
    assert all(m.mask.shape == size for m in masks)
    layout = sam.layout(size)
    assert layout.n_tokens == 64 and layout.cls_index is None and layout.window_size == 4
    # the layout's geometry equals SAM's own coordinate transform (independent code)
    pts = np.array([[0.0, 0.0], [size[1], size[0]], [size[1] / 3, size[0] / 2]])
    theirs = sam.predictor.transform.apply_coords(pts.copy(), size)
    fx, fy = layout.segments[0].geometry.to_frame(pts[:, 0], pts[:, 1])
    np.testing.assert_allclose(np.stack([fx, fy], 1), theirs, atol=1e-6)
    # the covered region is the image itself: padding lies outside it
    cover = layout.coverage()
    assert cover.all()


def test_prompt_errors(sam, make_image):
    emb = run_sync(sam.embedding_job(make_image(64, 64)))
    with pytest.raises(ValueError, match="point or a box"):
        sam.predict(emb)
    with pytest.raises(ValueError, match="one label per point"):
        sam.predict(emb, points=[[1, 2], [3, 4]], labels=[1])


def test_wrong_and_corrupted_checkpoints(sam_spec, tmp_path):
    with pytest.raises(ModelLoadError, match="unknown SAM architecture or missing folder"):
        SamBackend.load(SamSpec(model=str(tmp_path / "nothing")))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError) as err:
        SamBackend.load(SamSpec(model=sam_spec.model, weights=str(bad)))
    assert "\n" not in str(err.value)
    with pytest.raises(ModelLoadError, match="not found"):
        SamBackend.load(SamSpec(model="vit_b", weights=str(tmp_path / "missing.pth")))
    other = make_tiny_sam(tmp_path / "other", img_size=128, patch_size=16)
    with pytest.raises(ModelLoadError):
        SamBackend.load(SamSpec(model=sam_spec.model, weights=str(other.model) + "/model.safetensors"))
    assert parse_model_spec("sam:demo").is_demo


def test_checkpoint_download_checks_the_hash(tmp_path):
    payload = b"pretend checkpoint bytes" * 1000
    src = tmp_path / "sam_vit_b_01ec64.pth"
    src.write_bytes(payload)
    with pytest.raises(ModelLoadError, match="expected a prefix 01ec64; deleted"):
        download_checkpoint("vit_b", tmp_path / "cache", url=src.as_uri())
    assert not any((tmp_path / "cache").iterdir())
    from explorer.backends import sam as sam_module

    good_prefix = hashlib.sha256(payload).hexdigest()[:6]
    original = sam_module.OFFICIAL_CHECKPOINTS["vit_b"]
    sam_module.OFFICIAL_CHECKPOINTS["vit_b"] = (original[0], good_prefix)
    try:
        seen = []
        path = download_checkpoint("vit_b", tmp_path / "cache", progress=lambda f, m: seen.append(f), url=src.as_uri())
        assert path.read_bytes() == payload and seen and seen[-1] == pytest.approx(1.0)
        assert download_checkpoint("vit_b", tmp_path / "cache", url="http://127.0.0.1:9/never") == path  # cached
    finally:
        sam_module.OFFICIAL_CHECKPOINTS["vit_b"] = original
    with pytest.raises(ModelLoadError, match="could not download the SAM vit_l checkpoint"):
        download_checkpoint("vit_l", tmp_path / "cache", url="http://127.0.0.1:9/sam_vit_l_0b3195.pth")
