"""Region services: crops, tokens inside a region, attention share per layer and head, labels."""

import numpy as np
import pytest

from explorer.core.image_io import image_from_array
from explorer.core.jobs import run_sync
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.regions import (
    attention_share,
    crop_region,
    region_labels,
    tokens_inside,
    vocabulary,
)


def test_crop_region_context_and_highlight():
    rgb = np.random.default_rng(0).integers(0, 256, (100, 160, 3), dtype=np.uint8)
    img = image_from_array(rgb)
    mask = np.zeros((100, 160), bool)
    mask[40:60, 70:90] = True
    crop = crop_region(img, mask, context=0.25, min_side=1)
    assert crop.shape == (30, 30, 3)  # 20 px box grown by 25% on each side
    np.testing.assert_array_equal(crop, rgb[35:65, 65:95])
    hl = crop_region(img, mask, context=0.25, mode="highlight", min_side=1)
    np.testing.assert_array_equal(hl[5:25, 5:25], rgb[40:60, 70:90])  # inside untouched
    assert not np.array_equal(hl[0, 0], rgb[35, 65])
    with pytest.raises(ValueError):
        crop_region(img, np.zeros_like(mask))


def test_tokens_inside_and_attention_share(tiny_clip, make_image):
    img = make_image(64, 64)
    trace = run_sync(tiny_clip.trace(img, CaptureSpec.everything(3)))
    mask = np.zeros((64, 64), bool)
    mask[:, :32] = True  # the left half: grid columns 0-3
    inside = tokens_inside(trace.layout, mask)
    assert inside.reshape(8, 8)[:, :4].all() and not inside.reshape(8, 8)[:, 4:].any()
    share = attention_share(trace, mask)
    assert share.shape == (3, 4)
    row = trace.attentions[1][2, 0, 1:].reshape(8, 8)
    assert share[1, 2] == pytest.approx(row[:, :4].sum() / row.sum(), rel=1e-5)
    full = attention_share(trace, np.ones((64, 64), bool))
    np.testing.assert_allclose(full, 1.0)


def test_region_labels_are_a_distribution(tiny_clip, make_image):
    img = make_image(64, 96)
    mask = np.zeros((64, 96), bool)
    mask[10:40, 20:60] = True
    labels = region_labels(tiny_clip, img, mask, "custom", ["a red circle", "a dog", "a car"], top=2)
    assert len(labels) == 2 and labels[0][1] >= labels[1][1]
    names, templates = vocabulary("auto", demo=False)
    assert len(names) == 80 and templates == "single"
    names, templates = vocabulary("auto", demo=True)
    assert len(names) == 35 and templates is None
    with pytest.raises(ValueError):
        vocabulary("lvis", demo=False)
