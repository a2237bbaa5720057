"""The offline demo CLIP: a few training steps, exported as a plain open_clip folder and loaded
back through open_clip and the program's own backend (no network, no mocks)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from explorer.demo import clip_model as cm
from explorer.demo.scenes import WORDS, make_scene
from explorer.demo.training import TrainSettings
from explorer.testing.images import png_bytes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two steps of 4 images into ``<base>/resources/models/demo-clip``."""
    base = tmp_path_factory.mktemp("demo-clip")
    settings = TrainSettings(out_dir=base / "resources" / "models", work_dir=base / "work", seed=0,
                             max_steps=2, log_every=1, extra={"batch_size": 4})
    folder = cm.train(settings)
    return base, settings, folder


@pytest.fixture(scope="module")
def backend(trained):
    from explorer.backends.clip import ClipBackend
    from explorer.backends.specs import ClipSpec

    return ClipBackend.load(ClipSpec(model=f"local-dir:{trained[2]}", device="cpu"))


def _image(scene):
    from explorer.core.image_io import load_image

    return load_image(png_bytes(scene.image))


def test_vocabulary_ends_with_the_largest_id():
    vocab = cm.vocabulary()
    assert set(WORDS) | {"background"} <= set(vocab)
    assert vocab["<pad>"] == 0
    assert vocab["<end>"] == max(vocab.values()) == len(vocab) - 1
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert cm.model_config()["model_cfg"]["text_cfg"]["vocab_size"] == len(vocab)
    assert len(cm.PROMPTS) == 35 and len(set(cm.PROMPTS)) == 35


def test_export_is_a_plain_open_clip_folder(trained):
    import open_clip
    from open_clip.transformer import VisionTransformer
    from safetensors.torch import load_file

    folder = trained[2]
    assert {"open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    assert set(cfg) >= {"model_cfg", "preprocess_cfg"}
    assert "timm_model_name" not in cfg["model_cfg"]["vision_cfg"]
    assert (folder / "open_clip_model.safetensors").stat().st_size <= 12 * 2**20
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}", weights_only=True)
    assert isinstance(model.visual, VisionTransformer)
    grid = model.visual.grid_size
    assert grid[0] >= 12 and grid[1] >= 12
    saved = load_file(str(folder / "open_clip_model.safetensors"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    info = json.loads((folder / "demo_training.json").read_text())
    assert info["steps"] == 2


def test_tokenizer_round_trips_a_caption(trained):
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    tok = open_clip.get_tokenizer(f"local-dir:{trained[2]}")
    assert isinstance(tok, HFTokenizer)
    ids = tok(["a red circle", "A Red circle.", "a red blob"])
    assert ids.shape == (3, cm.CONTEXT_LENGTH)
    words = tok.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    assert words[:5] == ["<start>", "a", "red", "circle", "<end>"] and set(words[5:]) == {"<pad>"}
    assert torch.equal(ids[0], ids[1])  # lower-cased, punctuation dropped
    assert int(ids[2, 3]) == cm.vocabulary()["<unk>"]
    assert int(ids[0].argmax()) == 4  # open_clip pools at the largest id: the end token
    long = tok(" ".join(["a red circle left of"] * 20))[0]
    assert int(long[-1]) == cm.vocabulary()["<end>"] and int(long.argmax()) == cm.CONTEXT_LENGTH - 1


def test_demo_spec_loads_traces_and_encodes_text(trained, monkeypatch):
    from explorer.backends.clip import ClipBackend
    from explorer.backends.specs import parse_model_spec
    from explorer.core.jobs import run_sync
    from explorer.core.trace import CaptureSpec

    monkeypatch.setenv("EXPLORER_RESOURCES", str(trained[0] / "resources"))
    spec = parse_model_spec("demo")
    assert spec.is_demo
    backend = ClipBackend.load(spec)
    assert backend.info.n_layers >= 3 and backend.info.patch_size == (8, 8)
    scene = make_scene(5, size=(120, 180), n_objects=2)
    trace = run_sync(backend.trace(_image(scene), CaptureSpec(hidden_layers={backend.info.n_layers - 1})))
    seg = trace.layout.segments[0]
    assert (seg.rows, seg.cols) == (12, 12)
    assert trace.image_embedding.shape == (128,)
    enc = backend.encode_text(["a red circle", "an orange star left of a blue ring"])
    assert enc.embeddings.shape == (2, 128)
    np.testing.assert_allclose(np.linalg.norm(enc.embeddings, axis=1), 1.0, rtol=1e-5)
    assert enc.pooled_index == (4, 9)
    assert enc.tokens[0] == ("<start>", "a", "red", "circle", "<end>")


def test_training_path_matches_the_program(trained, backend):
    """Training input, pooled embedding and MaskCLIP features equal what the program computes."""
    from explorer.core.jobs import run_sync
    from explorer.core.trace import CaptureSpec
    from explorer_plugins.maskclip.method import dense_features

    scene = make_scene(11, size=(100, 150), n_objects=1)
    sample = cm._scene_sample(scene, cm._val_transform(), centre=4)
    assert sample is not None
    pixels = sample[0]
    prepared = backend.prepare(_image(scene))
    torch.testing.assert_close(pixels[None], prepared.pixels)
    L = backend.info.n_layers
    trace = run_sync(backend.trace(prepared, CaptureSpec(hidden_layers={L - 1})))
    with torch.no_grad():
        image, dense = cm._encode_images(backend.model, pixels[None])
    np.testing.assert_allclose(image[0].numpy(), trace.image_embedding, atol=1e-5)
    np.testing.assert_allclose(dense[0].numpy(), dense_features(backend, trace)[1:], atol=1e-5)
    prompts = ["a red circle", "a blue square left of an orange star above a white ring"]
    with torch.no_grad():
        text = cm._encode_texts(backend.model, backend.tokenizer(prompts))
    np.testing.assert_allclose(text.numpy(), backend.encode_text(prompts).embeddings, atol=1e-5)


def test_patch_targets_land_on_the_layout_cells(backend):
    """A patch fully inside an object in the targets is a token whose cell covers that object."""
    scene = make_scene(3, size=(140, 100), n_objects=(2, 3), min_size_frac=0.3)
    sample = cm._scene_sample(scene, cm._val_transform(), centre=4)
    assert sample is not None
    _, caption, classes, area, centre = sample
    assert area.shape == centre.shape == (144, cm.N_CLASSES)
    np.testing.assert_allclose(area.sum(1), 1.0)
    layout = backend.prepare(_image(scene)).layout
    full = np.flatnonzero(area.max(1) == 1.0)
    assert len(full) > 0
    instance = scene.instance_map
    lut = [cm.N_CLASSES - 1] + [cm.PROMPTS.index(o.caption) for o in scene.objects]
    for p in full:
        _, box = layout.token_box(layout.image_token_indices()[p])
        x, y = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
        assert lut[instance[int(y), int(x)]] == int(area[p].argmax())
    assert set(classes) == {lut[k + 1] for k in range(len(scene.objects))}


def test_batches_are_seeded_and_shaped():
    recipe = cm.Recipe(batch_size=3)
    a, b = cm.make_batch(0, 7, recipe), cm.make_batch(0, 7, recipe)
    torch.testing.assert_close(a.pixels, b.pixels)
    assert a.captions == b.captions
    assert a.pixels.shape == (3, 3, 96, 96) and a.patch_area.shape == (3, 144, cm.N_CLASSES)
    assert not torch.equal(a.pixels, cm.make_batch(0, 8, recipe).pixels)
    assert cm.Recipe.from_extra({"batch_size": 5, "n_objects_p": [1, 0, 0, 0], "other": 1}).batch_size == 5


def test_evaluate_runs_through_the_engine(trained):
    seen = []
    res = cm.evaluate(trained[2], n_scenes=2, progress=seen.append)
    assert set(res) == {"clip_zero_shot_top1", "clip_pointing_game"}
    assert all(0.0 <= v <= 1.0 for v in res.values())
    assert seen and seen[-1].fraction == pytest.approx(1.0)


def test_resume_continues_and_a_finished_run_only_reexports(tmp_path):
    def settings(steps):
        return TrainSettings(out_dir=tmp_path / "out", work_dir=tmp_path / "work", seed=1, max_steps=steps,
                             log_every=1, extra={"batch_size": 2})

    folder = cm.train(settings(2))
    state = torch.load(tmp_path / "work" / "clip" / "state.pt", weights_only=False)
    assert state["step"] == 2
    cm.train(settings(3))
    state = torch.load(tmp_path / "work" / "clip" / "state.pt", weights_only=False)
    assert state["step"] == 3 and [h["step"] for h in state["history"]] == [1.0, 2.0, 3.0]
    before = (folder / "open_clip_model.safetensors").read_bytes()
    cm.train(settings(3))  # budget spent: nothing trained, same weights exported again
    assert (folder / "open_clip_model.safetensors").read_bytes() == before
    assert json.loads((folder / "demo_training.json").read_text())["steps"] == 3
