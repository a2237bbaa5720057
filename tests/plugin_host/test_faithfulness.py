"""Deletion / insertion curves on the tiny CLIP, checked against hand-built masked inputs."""

import numpy as np
import pytest
import torch

from explorer.core.jobs import run_sync
from explorer.core.metrics import curve_auc
from explorer.plugin_host.faithfulness import _masks, deletion_insertion_job, ranking


def test_ranking_puts_nan_last_and_masks_count():
    assert list(ranking(np.array([0.2, np.nan, 0.9, 0.5]))) == [2, 3, 0, 1]
    m = _masks(np.array([3, 1, 0, 2]), 4, 4, deletion=True)
    assert m.sum(1).tolist() == [0, 1, 2, 3, 4]
    assert m[1].tolist() == [False, False, False, True]
    ins = _masks(np.array([3, 1, 0, 2]), 4, 4, deletion=False)
    np.testing.assert_array_equal(ins, ~m)


def test_masked_inputs_replace_exactly_the_token_patches(tiny_clip, make_image):
    prepared = tiny_clip.prepare(make_image(64, 64))
    masks = np.zeros((2, 64), bool)
    masks[1, [0, 9, 63]] = True  # cells (0,0), (1,1), (7,7)
    out = tiny_clip.masked_inputs(prepared, masks, "mean")
    torch.testing.assert_close(out[0], prepared.pixels[0])
    changed = (out[1] != prepared.pixels[0]).any(0)
    expected = torch.zeros(64, 64, dtype=torch.bool)
    for r, c in [(0, 0), (1, 1), (7, 7)]:
        expected[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = True
    assert torch.equal(changed, expected)
    assert torch.all(out[1][:, :8, :8] == 0)  # the normalisation mean is 0 after normalising
    blur = tiny_clip.masked_inputs(prepared, masks, "blur")
    assert not torch.equal(blur[1], out[1])
    with pytest.raises(ValueError):
        tiny_clip.masked_inputs(prepared, masks, "noise")


def test_curves_match_hand_computed_scores(tiny_clip, make_image):
    image = make_image(64, 80, seed=3)
    values = np.random.default_rng(0).random(64)
    text = tiny_clip.encode_text(["a red circle"]).embeddings[0]
    out = run_sync(deletion_insertion_job(tiny_clip, image, values, text, steps=4, n_random=2, seed=1))
    m = out.metrics.values
    series = {s.name: s for s in out.curve.series}
    assert set(series) == {"deletion", "insertion", "deletion (random)", "insertion (random)"}
    dele, ins = series["deletion"].y, series["insertion"].y
    assert dele[0] == pytest.approx(1.0) and ins[-1] == pytest.approx(1.0, abs=1e-5)
    assert dele[-1] == pytest.approx(ins[0], abs=1e-5)  # both: every patch replaced
    # an independent recomputation of the half-deleted point
    prepared = tiny_clip.prepare(image)
    order = np.argsort(-values)
    mask = np.zeros((1, 64), bool)
    mask[0, order[:32]] = True
    x = tiny_clip.masked_inputs(prepared, mask)
    with torch.no_grad():
        f = tiny_clip.model.encode_image(x, normalize=True)[0]
        score = float(tiny_clip.model.logit_scale.exp() * (f @ torch.from_numpy(text)))
    assert dele[2] * m["score"] == pytest.approx(score, rel=1e-4)
    assert m["deletion_auc"] == pytest.approx(curve_auc(series["deletion"].x, dele))
    assert "random_insertion_auc" in m


def test_without_prompt_scores_are_cosines_to_the_image(tiny_clip, make_image):
    out = run_sync(deletion_insertion_job(tiny_clip, make_image(64, 64), np.arange(64.0), None, steps=2, n_random=0))
    assert out.metrics.values["score"] == pytest.approx(1.0, abs=1e-5)
    assert "random_deletion_auc" not in out.metrics.values
    with pytest.raises(ValueError, match="64 image tokens"):
        run_sync(deletion_insertion_job(tiny_clip, make_image(64, 64), np.arange(10.0)))


def test_range_normalisation_runs_from_the_full_image_to_the_blank_one(tiny_clip, make_image):
    """'range': 1 = the full image's score, 0 = every patch replaced, whatever the logit's sign;
    the same raw scores as 'full'."""
    image = make_image(64, 80, seed=3)
    values = np.random.default_rng(0).random(64)
    text = tiny_clip.encode_text(["a red circle"]).embeddings[0]
    full = run_sync(deletion_insertion_job(tiny_clip, image, values, text, steps=4, n_random=0))
    rng = run_sync(deletion_insertion_job(tiny_clip, image, values, text, steps=4, n_random=0, normalise="range"))
    f, r = ({s.name: s.y for s in out.curve.series} for out in (full, rng))
    m = rng.metrics.values
    assert r["deletion"][0] == pytest.approx(1.0) and r["deletion"][-1] == pytest.approx(0.0, abs=1e-6)
    assert r["insertion"][0] == pytest.approx(0.0, abs=1e-5) and r["insertion"][-1] == pytest.approx(1.0, abs=1e-5)
    raw = f["deletion"] * m["score"]
    np.testing.assert_allclose(r["deletion"], (raw - m["blank_score"]) / (m["score"] - m["blank_score"]), rtol=1e-5)
    assert m["blank_score"] == pytest.approx(raw[-1], rel=1e-5)
    with pytest.raises(ValueError, match="normalise"):
        run_sync(deletion_insertion_job(tiny_clip, image, values, text, normalise="max"))
