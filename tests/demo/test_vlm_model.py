"""Tests of the demo VLM: a few real training steps, the exported folder loaded back through
transformers' own loaders, image-token bookkeeping, generation, evaluation and resuming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from explorer.demo import vlm_model as V  # noqa: E402
from explorer.demo.scenes import WORDS, make_scene, object_crop  # noqa: E402
from explorer.demo.training import TrainSettings  # noqa: E402

FAST = {"batch_size": 4}


def _settings(tmp: Path, **kw) -> TrainSettings:
    base = dict(out_dir=tmp / "out", work_dir=tmp / "work", seed=0, minutes=30.0, max_steps=2, log_every=1,
                save_every=1, extra=dict(FAST))
    base.update(kw)
    _demo_clip(base["out_dir"])
    return TrainSettings(**base)


def _demo_clip(out: Path) -> Path:
    """An (untrained, perturbed) demo CLIP exported where the VLM trainer looks for its tower."""
    from explorer.demo import clip_model as C

    folder = Path(out) / "demo-clip"
    if not folder.is_dir():
        clip = C.build_model(seed=3)
        with torch.no_grad():
            for p in clip.parameters():
                p.add_(0.02 * torch.randn_like(p))
        C.export_model(clip, folder)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return V.train(_settings(tmp_path_factory.mktemp("vlm")))


@pytest.fixture(scope="module")
def loaded(trained):
    return V.load(trained)


def test_vocabulary_and_prompts():
    assert set(WORDS) <= set(V.VOCAB)
    assert len(set(V.VOCAB)) == len(V.VOCAB)
    for prompt in (V.CAPTION_PROMPT, V.OBJECT_PROMPT):
        assert prompt.split()[0] == V.IMAGE_TOKEN
        assert set(prompt.split()[1:]) <= set(V.PROMPT_WORDS)
    tok = V.build_tokenizer()
    caption = "a red circle left of an orange star above a white ring"
    ids = tok(caption)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == caption
    # the placeholder is split out even without spaces (the processor writes it repeated)
    ids = tok(V.IMAGE_TOKEN * 3 + " describe", add_special_tokens=False)["input_ids"]
    assert ids[:3] == [tok.convert_tokens_to_ids(V.IMAGE_TOKEN)] * 3 and len(ids) == 4


def test_folder_loads_with_transformers(trained):
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

    names = {p.name for p in trained.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= names
    assert (trained / "model.safetensors").stat().st_size < 15_000_000
    processor = AutoProcessor.from_pretrained(trained, local_files_only=True)
    assert isinstance(processor, LlavaProcessor)
    model = LlavaForConditionalGeneration.from_pretrained(trained, local_files_only=True)
    auto = AutoModelForImageTextToText.from_pretrained(trained, local_files_only=True)
    assert type(auto).__name__ == "LlavaForConditionalGeneration"
    cfg = model.config
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    assert grid >= 8
    assert cfg.image_seq_length == grid * grid == V.NUM_IMAGE_TOKENS
    assert cfg.image_token_index == processor.tokenizer.convert_tokens_to_ids(V.IMAGE_TOKEN)
    assert cfg.vision_feature_select_strategy == "default"
    assert processor.patch_size == cfg.vision_config.patch_size
    sd_a, sd_b = model.state_dict(), auto.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the scene"}]}],
        add_generation_prompt=True,
    )
    assert text == V.CAPTION_PROMPT
    info = json.loads((trained / "training.json").read_text())
    assert info["steps"] == 2 and info["finished"]


@pytest.mark.parametrize("size", [(96, 96), (80, 200), (230, 90)], ids=["square", "wide", "tall"])
def test_image_tokens_equal_grid(loaded, size):
    model, processor = loaded
    cfg = model.config
    rows = cols = cfg.vision_config.image_size // cfg.vision_config.patch_size
    image = make_scene(5, size=size).image
    enc = processor(images=image, text=V.CAPTION_PROMPT, return_tensors="pt")
    is_img = (enc["input_ids"][0] == cfg.image_token_index).numpy()
    where = np.flatnonzero(is_img)
    assert len(where) == rows * cols == cfg.image_seq_length
    assert np.all(np.diff(where) == 1)  # one contiguous run, right after <s>
    assert where[0] == 1
    assert tuple(enc["pixel_values"].shape) == (1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    with torch.inference_mode():
        feats = model.get_image_features(pixel_values=enc["pixel_values"]).pooler_output
        out = model(**enc)  # raises if tokens and features disagree
    assert feats[0].shape == (rows * cols, cfg.text_config.hidden_size)
    assert out.logits.shape[:2] == enc["input_ids"].shape


def test_encode_examples_masks_everything_but_the_answer():
    processor = V.build_processor()
    scene = make_scene(3)
    images = [scene.image, object_crop(scene, 0)]
    answers = [scene.caption, scene.objects[0].caption]
    batch = V.encode_examples(processor, images, [V.CAPTION_PROMPT, V.OBJECT_PROMPT], answers)
    tok = processor.tokenizer
    for i, answer in enumerate(answers):
        lab = batch["labels"][i]
        kept = lab[lab != -100].tolist()
        assert kept[-1] == tok.eos_token_id
        assert tok.decode(kept[:-1]) == answer
        n_prompt = 1 + V.NUM_IMAGE_TOKENS + 3
        assert (lab[:n_prompt] == -100).all()
        assert batch["input_ids"][i, n_prompt : n_prompt + len(kept)].tolist() == kept
    assert batch["pixel_values"].shape == (2, 3, V.IMAGE_SIZE, V.IMAGE_SIZE)


def test_patch_targets_follow_the_per_axis_resize():
    from types import SimpleNamespace

    scene = SimpleNamespace(objects=[SimpleNamespace(color="red", shape="ring"),
                                     SimpleNamespace(color="blue", shape="star")])
    inst = np.zeros((80, 160), dtype=np.int16)  # 8 x 8 tokens of 10 x 20 pixels
    inst[0:20, 0:40] = 1  # tokens (0, 0), (0, 1), (1, 0), (1, 1)
    inst[75:80, 150:160] = 2  # a quarter of token (7, 7): below min_cover, but its peak token
    t = V.patch_targets(inst, scene, grid=8, min_cover=0.5)
    color, shape = t[0].reshape(8, 8), t[1].reshape(8, 8)
    expected = np.zeros((8, 8), dtype=np.int64)
    expected[:2, :2] = V._COLOR_IDS["red"]
    expected[7, 7] = V._COLOR_IDS["blue"]
    np.testing.assert_array_equal(color, expected)
    assert shape[0, 0] == V._SHAPE_IDS["ring"] and shape[7, 7] == V._SHAPE_IDS["star"]
    assert (shape[color == 0] == 0).all()


def test_training_data_is_deterministic_and_disjoint_from_evaluation():
    recipe = V.Recipe()
    a = V._training_examples(0, 7, 3, 2, recipe)
    b = V._training_examples(0, 7, 3, 2, recipe)
    assert a[1:3] == b[1:3] and np.array_equal(a[3], b[3])
    assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0]))
    assert a[1] == [V.CAPTION_PROMPT] * 3 + [V.OBJECT_PROMPT] * 2
    assert a[3].shape == (5, 2, V.NUM_IMAGE_TOKENS)
    assert all(len(ans.split()) == 3 for ans in a[2][3:])
    # a crop shows its object: the crop's tokens are labelled with the object's colour and shape
    for crop_targets, answer in zip(a[3][3:], a[2][3:]):
        _, color, shape = answer.split()
        assert (crop_targets[0] == V._COLOR_IDS[color]).any() and (crop_targets[1] == V._SHAPE_IDS[shape]).any()
    from explorer.demo.scenes import scene_seed

    train_seeds = {V._train_scene_seed(0, V._SCENE_STREAM, k, j) for k in range(200) for j in range(32)}
    eval_seeds = {scene_seed(V.EVAL_SEED, i) for i in range(500)}
    assert not train_seeds & eval_seeds


def test_generate_caption_returns_vocabulary_words(loaded):
    model, processor = loaded
    scene = make_scene(11, size=(120, 200))
    words = set(V.VOCAB) - set(V.SPECIAL_TOKENS)
    for prompt in (V.CAPTION_PROMPT, V.OBJECT_PROMPT):
        text = V.generate_caption(model, processor, scene.image, max_new_tokens=6, prompt=prompt)
        assert isinstance(text, str)
        assert set(text.split()) <= words
        assert len(text.split()) <= 6
    with pytest.raises(ValueError):
        V.generate_caption(model, processor, scene.image[..., 0])


def test_evaluate_small(trained):
    calls = []
    metrics = V.evaluate(trained, n_scenes=3, progress=lambda done, total: calls.append((done, total)))
    assert set(metrics) == {"vlm_crop_caption_exact", "vlm_scene_names_all", "vlm_scene_caption_exact"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert calls[-1] == (6, 6)
    with pytest.raises(ValueError):
        V.evaluate(trained, n_scenes=0)


def test_names_all_objects():
    scene = make_scene(21, n_objects=3)
    assert V.names_all_objects(scene.caption, scene)
    first = scene.objects[0]
    assert not V.names_all_objects(scene.caption.replace(f"{first.color} {first.shape}", "x"), scene)


def test_resume_continues_from_saved_step(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    straight = V.train(_settings(tmp_path / "straight", max_steps=3))

    real = V._training_examples
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(V, "_training_examples", interrupted)
    settings = _settings(tmp_path / "resumed", max_steps=3)
    with pytest.raises(KeyboardInterrupt):
        V.train(settings)
    state = torch.load(settings.work_dir / V.RUN_NAME / "state.pt", weights_only=False)
    assert state["step"] == 2 and not state["finished"]

    monkeypatch.setattr(V, "_training_examples", real)
    seen = []

    def recording(seed, step, *args, **kwargs):
        seen.append(step)
        return real(seed, step, *args, **kwargs)

    monkeypatch.setattr(V, "_training_examples", recording)
    resumed = V.train(settings)
    assert seen == [2]  # only the missing step was trained
    assert json.loads((resumed / "training.json").read_text())["steps"] == 3

    # the interrupted and resumed run ends where the uninterrupted one does
    from safetensors.torch import load_file

    a = load_file(straight / "model.safetensors")
    b = load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)

    # a finished run is not trained again
    seen.clear()
    V.train(settings)
    assert seen == []


def test_vision_tower_starts_from_the_demo_clip(tmp_path):
    """The converted tower computes the open_clip tower's hidden states, block by block."""
    from explorer.demo import clip_model as C
    from open_clip.factory import create_model_and_transforms

    folder = _demo_clip(tmp_path)
    clip, _, _ = create_model_and_transforms(f"local-dir:{folder}")
    clip.eval()
    vlm = V.build_model(seed=0).eval()
    before = vlm.model.vision_tower.embeddings.patch_embedding.weight.clone()
    V.init_vision_from_clip(vlm, folder)
    assert not torch.equal(before, vlm.model.vision_tower.embeddings.patch_embedding.weight)
    x = torch.randn(2, 3, V.IMAGE_SIZE, V.IMAGE_SIZE)
    with torch.no_grad():
        visual = clip.visual
        h = visual._embeds(x)
        ours = [h]
        for block in visual.transformer.resblocks:
            h = block(h)
            ours.append(h)
        theirs = vlm.model.vision_tower(pixel_values=x, output_hidden_states=True).hidden_states
    assert len(theirs) == len(ours) == C.VISION_LAYERS + 1
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_vision_init_refuses_a_missing_or_mismatched_clip(tmp_path):
    vlm = V.build_model(seed=0)
    with pytest.raises(FileNotFoundError, match="train it first"):
        V.init_vision_from_clip(vlm, tmp_path / "nothing")
    small = V.build_model(V.VLMArch(vision_hidden=64, vision_mlp=256, vision_heads=2), seed=0)
    with pytest.raises(ValueError, match="does not fit"):
        V.init_vision_from_clip(small, _demo_clip(tmp_path))
