"""Regions as layers and their exports; RLE checked against the COCO API (pycocotools)."""

import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from explorer.core.regions import RegionSet, mask_box, rle_decode, rle_encode, rle_from_string, rle_to_string


def _masks(h=30, w=40):
    a = np.zeros((h, w), bool)
    a[5:15, 5:20] = True
    b = np.zeros((h, w), bool)
    b[10:25, 15:35] = True
    return a, b


def test_rle_round_trip_and_the_coco_api():
    mask_util = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for shape in [(30, 40), (7, 3), (1, 50)]:
        for density in (0.0, 0.3, 1.0):
            m = rng.random(shape) < density
            m[0, 0] = density > 0.5  # both starting values
            rle = rle_encode(m)
            np.testing.assert_array_equal(rle_decode(rle), m)
            theirs = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            assert rle_to_string(rle["counts"]) == theirs["counts"].decode()
            assert rle_from_string(theirs["counts"].decode()) == rle["counts"]
            np.testing.assert_array_equal(mask_util.decode(theirs).astype(bool), m)
    with pytest.raises(ValueError):
        rle_decode({"size": [2, 2], "counts": [1, 1]})


def test_layers_rename_hide_combine():
    a, b = _masks()
    rs = RegionSet((30, 40))
    ra, rb = rs.add(a, "cat"), rs.add(b)
    assert rb.name == "region 2" and mask_box(a) == (5, 5, 20, 15)
    rs.rename(rb.id, "dog")
    rs.set_visible(ra.id, False)
    assert not rs.get(ra.id).visible and rs.get(rb.id).name == "dog"
    u = rs.union([ra.id, rb.id])
    np.testing.assert_array_equal(u.mask, a | b)
    d = rs.subtract(rb.id, [ra.id])
    np.testing.assert_array_equal(d.mask, b & ~a)
    assert d.area == int((b & ~a).sum())
    rs.remove(u.id)
    assert [r.name for r in rs] == ["cat", "dog", "dog − cat"]
    with pytest.raises(ValueError):
        rs.add(np.zeros((3, 3), bool))
    with pytest.raises(ValueError):
        rs.union([ra.id])
    with pytest.raises(ValueError):
        rs.rename(ra.id, "  ")


def test_exports(tmp_path):
    a, b = _masks()
    rs = RegionSet((30, 40))
    rs.add(a, "cat", score=0.9, labels=(("cat", 0.8),))
    rs.add(b, "dog")
    coco = json.loads(rs.save_coco(tmp_path / "r.json", file_name="x.png").read_text())
    assert coco["images"][0]["height"] == 30 and len(coco["annotations"]) == 2
    ann = coco["annotations"][0]
    assert ann["bbox"] == [5, 5, 15, 10] and ann["area"] == int(a.sum())
    np.testing.assert_array_equal(rle_decode(ann["segmentation"]), a)
    plain = rs.to_coco(compressed=False)
    np.testing.assert_array_equal(rle_decode(plain["annotations"][1]["segmentation"]), b)
    z = rs.save_pngs(tmp_path / "masks.zip")
    with zipfile.ZipFile(z) as zf:
        names = zf.namelist()
        assert names == ["001_cat.png", "002_dog.png"]
        with zf.open(names[1]) as fh:
            np.testing.assert_array_equal(np.asarray(Image.open(fh)) > 0, b)
    folder = rs.save_pngs(tmp_path / "masks")
    assert sorted(p.name for p in folder.iterdir()) == ["001_cat.png", "002_dog.png"]
