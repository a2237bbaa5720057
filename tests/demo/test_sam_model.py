"""The demo SAM trainer: a few steps of a tiny model, export, load, predict, evaluate, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from explorer.backends.sam_build import CONFIG_NAME, WEIGHTS_NAME, load_sam
from explorer.demo import sam_model
from explorer.demo.training import TrainSettings

TINY = {
    "config": dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4,
                   global_attn_indexes=(1,), prompt_embed_dim=32, decoder_depth=1, decoder_mlp_dim=64,
                   decoder_num_heads=2, iou_head_hidden_dim=32),
    "recipe": dict(images_per_step=1, point_prompts=2, box_prompts=1, multi_point_prompts=1, warmup_steps=2),
}


def _settings(tmp_path, max_steps, **kw):
    return TrainSettings(out_dir=tmp_path / "out", work_dir=tmp_path / "work", seed=1, minutes=5.0,
                         max_steps=max_steps, log_every=1, save_every=1, extra=TINY, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo-sam")
    folder = sam_model.train(_settings(tmp, 3))
    return tmp, folder


def test_export_format_and_load(trained):
    _, folder = trained
    assert folder.name == "demo-sam"
    assert (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    assert cfg["img_size"] == 64 and cfg["training"]["steps"] == 3
    model, loaded_cfg = load_sam(folder)
    assert not model.training
    assert loaded_cfg["encoder"]["embed_dim"] == 32


def test_predictor_on_the_exported_model(trained):
    from segment_anything import SamPredictor

    _, folder = trained
    model, _ = load_sam(folder)
    predictor = SamPredictor(model)
    scene = sam_model.sample_scene(sam_model.EVAL_SEED, 0)
    H, W = scene.size
    predictor.set_image(scene.image)
    r, c = sam_model.interior_pixels(scene.objects[0].mask)[0]
    masks, scores, _ = predictor.predict(point_coords=np.array([[c, r]]), point_labels=np.array([1]),
                                         multimask_output=True)
    assert masks.shape == (3, H, W) and scores.shape == (3,)


def test_evaluate_few_scenes(trained):
    _, folder = trained
    seen = []
    result = sam_model.evaluate(folder, n_scenes=3, progress=lambda done, total: seen.append((done, total)))
    assert 0.0 <= result["sam_point_iou"] <= 1.0
    assert result["sam_point_iou"] <= result["sam_oracle_iou"] + 1e-9
    assert result["n_scenes"] == 3 and result["n_objects"] >= 3
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_evaluate_default_folder_from_resources(trained, monkeypatch):
    tmp, _ = trained
    monkeypatch.setenv("EXPLORER_RESOURCES", str(tmp / "no-resources"))
    with pytest.raises(ValueError, match="demo-sam"):
        sam_model.evaluate(None, n_scenes=1)  # nothing shipped there: a clear error


def test_resume_continues_from_the_saved_step(trained):
    tmp, _ = trained
    state = torch.load(tmp / "work" / "sam" / "state.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 3 and state["finished"]
    before = {k: v.clone() for k, v in state["model"].items()}
    # same budget: nothing is repeated
    sam_model.train(_settings(tmp, 3))
    again = torch.load(tmp / "work" / "sam" / "state.pt", map_location="cpu", weights_only=False)
    assert again["step"] == 3 and len(again["history"]) == len(state["history"])
    # a larger budget continues at step 3 (history goes on from there)
    folder = sam_model.train(_settings(tmp, 5))
    after = torch.load(tmp / "work" / "sam" / "state.pt", map_location="cpu", weights_only=False)
    assert after["step"] == 5
    assert [h["step"] for h in after["history"]] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert any(not torch.equal(before[k], after["model"][k]) for k in before)
    assert json.loads((folder / CONFIG_NAME).read_text())["training"]["steps"] == 5


def test_training_is_seeded(tmp_path):
    a = sam_model.train(_settings(tmp_path / "a", 2))
    b = sam_model.train(_settings(tmp_path / "b", 2))
    ma, _ = load_sam(a)
    mb, _ = load_sam(b)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_scene_streams_and_points():
    s1 = sam_model.sample_scene(0, 5)
    s2 = sam_model.sample_scene(0, 5)
    assert np.array_equal(s1.image, s2.image)
    assert s1.size == sam_model.scene_size(s1.seed)
    sizes = {sam_model.sample_scene(sam_model.EVAL_SEED, i).size for i in range(8)}
    assert len(sizes) > 1  # varied sizes / aspect ratios
    for H, W in sizes:
        assert sam_model.LONG_SIDE[0] <= max(H, W) <= sam_model.LONG_SIDE[1]
        assert max(H, W) / min(H, W) <= sam_model.MAX_ASPECT + 0.05
    mask = np.zeros((6, 7), dtype=bool)
    mask[1:5, 1:6] = True
    rc = sam_model.interior_pixels(mask)
    assert {tuple(p) for p in rc} == {(r, c) for r in range(2, 4) for c in range(2, 5)}
    thin = np.zeros((5, 5), dtype=bool)
    thin[2, :] = True
    assert len(sam_model.interior_pixels(thin)) == 5  # falls back to the mask itself


def test_unknown_recipe_option_is_rejected(tmp_path):
    s = _settings(tmp_path, 1)
    s.extra = {"recipe": {"learning_rate": 1.0}}
    with pytest.raises(ValueError, match="learning_rate"):
        sam_model.train(s)


def test_state_of_another_architecture_is_a_clear_error(tmp_path):
    sam_model.train(_settings(tmp_path, 1))
    other = _settings(tmp_path, 2)
    other.extra = {"config": dict(TINY["config"], embed_dim=48, num_heads=3), "recipe": TINY["recipe"]}
    with pytest.raises(ValueError, match="--fresh"):
        sam_model.train(other)
