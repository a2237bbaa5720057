"""SAM builder and loader: tiny models built from configs, saved, and loaded back through
``load_sam``; the official-architecture path with its error cases; ``SamPredictor`` on the result."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from explorer.backends.sam_build import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    build_sam,
    load_sam,
    load_weights,
    sam_config,
    save_sam,
    validate_sam_config,
)


def tiny_config(**overrides):
    params = dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4,
                  global_attn_indexes=(1,), prompt_embed_dim=32, decoder_depth=1, decoder_mlp_dim=64,
                  decoder_num_heads=2, iou_head_hidden_dim=32)
    params.update(overrides)
    return sam_config(**params)


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sam")
    torch.manual_seed(0)
    model = _randomize(build_sam(tiny_config()))
    save_sam(model, tiny_config(), folder)
    return folder, model


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_build_from_config_mirrors_the_library_layout():
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    model = build_sam(tiny_config())
    assert isinstance(model, Sam)
    assert isinstance(model.image_encoder, ImageEncoderViT)
    assert isinstance(model.prompt_encoder, PromptEncoder)
    assert isinstance(model.mask_decoder, MaskDecoder)
    assert isinstance(model.mask_decoder.transformer, TwoWayTransformer)
    assert not model.training
    assert model.image_encoder.img_size == 64
    # windowed blocks and the global one
    assert [blk.window_size for blk in model.image_encoder.blocks] == [4, 0]
    with torch.no_grad():
        emb = model.image_encoder(torch.zeros(1, 3, 64, 64))
    assert emb.shape == (1, 32, 8, 8)  # (B, prompt_embed_dim, img/patch, img/patch)
    assert model.prompt_encoder.mask_input_size == (32, 32)  # 4x the embedding grid
    assert model.mask_decoder.num_multimask_outputs == 3


def test_official_vit_b_shape_matches_the_registry():
    from segment_anything import sam_model_registry

    ours = build_sam(sam_config())  # defaults = ViT-B
    theirs = sam_model_registry["vit_b"]()
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"img_size": 60}, "multiple of patch_size"),
        ({"num_heads": 3}, "divisible"),
        ({"global_attn_indexes": (5,)}, "out of range"),
        ({"pixel_std": (1.0, 0.0, 1.0)}, "pixel_std"),
        ({"window_size": -1}, "window_size"),
    ],
)
def test_invalid_configs_are_one_line_value_errors(change, message):
    with pytest.raises(ValueError, match=message) as info:
        validate_sam_config(tiny_config(**change))
    assert "\n" not in str(info.value)


def test_out_chans_must_match_prompt_dim():
    cfg = tiny_config()
    cfg["encoder"]["out_chans"] = 16
    with pytest.raises(ValueError, match="out_chans"):
        build_sam(cfg)


def test_folder_round_trip(tiny_folder):
    folder, model = tiny_folder
    assert (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()
    loaded, cfg = load_sam(folder)
    assert cfg["img_size"] == 64 and cfg["encoder"]["depth"] == 2
    assert json.loads((folder / CONFIG_NAME).read_text())["prompt_embed_dim"] == 32
    assert not loaded.training
    _same_weights(model, loaded)
    loaded2, _ = load_sam(str(folder))  # str works too
    _same_weights(model, loaded2)


def test_pth_state_dict_round_trip(tiny_folder, tmp_path):
    """A ``.pth`` plain state dict (the official format), read with ``weights_only=True``."""
    folder, model = tiny_folder
    other = _randomize(build_sam(tiny_config()), seed=7)
    pth = tmp_path / "tiny_sam.pth"
    torch.save(other.state_dict(), pth)
    loaded, _ = load_sam(folder, checkpoint=pth)
    _same_weights(other, loaded)
    fresh = build_sam(tiny_config())
    load_weights(fresh, pth)
    _same_weights(other, fresh)


def test_pickled_code_is_refused(tiny_folder, tmp_path):
    folder, _ = tiny_folder

    class Payload:
        def __reduce__(self):
            return (print, ("should never run",))

    bad = tmp_path / "evil.pth"
    torch.save({"x": Payload()}, bad)
    with pytest.raises(ValueError, match="weights-only") as info:
        load_sam(folder, checkpoint=bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["garbage_pth", "truncated_pth", "garbage_safetensors", "not_a_state_dict",
                                  "other_architecture", "missing_keys"])
def test_corrupt_or_wrong_checkpoints(tiny_folder, tmp_path, kind):
    folder, model = tiny_folder
    if kind == "garbage_pth":
        path = tmp_path / "x.pth"
        path.write_bytes(b"\x00not a checkpoint at all" * 10)
        match = "not a readable"
    elif kind == "truncated_pth":
        path = tmp_path / "x.pth"
        torch.save(model.state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        match = "not a readable"
    elif kind == "garbage_safetensors":
        path = tmp_path / "x.safetensors"
        path.write_bytes(b"\xff" * 64)
        match = "not a readable safetensors"
    elif kind == "not_a_state_dict":
        path = tmp_path / "x.pth"
        torch.save([torch.zeros(3)], path)
        match = "does not hold a state dict"
    elif kind == "other_architecture":
        path = tmp_path / "x.pth"
        torch.save(build_sam(tiny_config(embed_dim=48, num_heads=3)).state_dict(), path)
        match = "does not match the architecture"
    else:
        path = tmp_path / "x.pth"
        sd = model.state_dict()
        sd.pop(next(iter(sd)))
        torch.save(sd, path)
        match = "1 missing"
    with pytest.raises(ValueError, match=match) as info:
        load_sam(folder, checkpoint=path)
    assert "\n" not in str(info.value)


def test_corrupt_folder_weights_and_config(tmp_path, tiny_folder):
    src, _ = tiny_folder
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / CONFIG_NAME).write_text((src / CONFIG_NAME).read_text())
    with pytest.raises(ValueError, match="weights not found"):
        load_sam(folder)
    (folder / WEIGHTS_NAME).write_bytes((src / WEIGHTS_NAME).read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_sam(folder)
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_sam(folder)
    (folder / CONFIG_NAME).unlink()
    with pytest.raises(ValueError, match=CONFIG_NAME):
        load_sam(folder)


def test_unknown_architecture_and_missing_paths(tmp_path):
    with pytest.raises(ValueError, match="unknown SAM architecture") as info:
        load_sam("vit_q")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="unknown SAM architecture"):
        load_sam(tmp_path / "nowhere")
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        load_sam(f)


def test_official_architectures_need_an_existing_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="needs a checkpoint"):
        load_sam("vit_b")
    with pytest.raises(ValueError, match="not found"):
        load_sam("vit_h", checkpoint=tmp_path / "sam_vit_h_4b8939.pth")
    bad = tmp_path / "sam_vit_l.pth"
    bad.write_bytes(b"PK\x03\x04 broken zip")
    with pytest.raises(ValueError, match="not a readable"):
        load_sam("vit_l", checkpoint=bad)


def test_official_vit_b_rejects_a_checkpoint_of_another_architecture(tmp_path, monkeypatch):
    """The real registry builder runs (ViT-B, ~1 s) and the tiny state dict is refused, and
    the registry's own unsafe ``torch.load`` is never reached (weights_only is enforced here)."""
    path = tmp_path / "tiny.pth"
    torch.save(build_sam(tiny_config()).state_dict(), path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with pytest.raises(ValueError, match="does not match the architecture") as info:
        load_sam("vit_b", checkpoint=path)
    assert "\n" not in str(info.value)
    assert calls == [True]


def test_official_vit_b_loads_its_own_state_dict(tmp_path):
    """Round trip through the official path: a ViT-B state dict saved as ``.pth`` loads back."""
    from segment_anything import sam_model_registry

    torch.manual_seed(3)
    ref = sam_model_registry["vit_b"]()
    path = tmp_path / "sam_vit_b.pth"
    torch.save(ref.state_dict(), path)
    model, cfg = load_sam("vit_b", checkpoint=path)
    assert cfg["architecture"] == "vit_b" and cfg["img_size"] == 1024
    assert torch.equal(model.image_encoder.pos_embed, ref.image_encoder.pos_embed)
    assert torch.equal(model.mask_decoder.iou_token.weight, ref.mask_decoder.iou_token.weight)


@pytest.mark.parametrize("size", [(40, 40), (30, 70), (90, 24)])
def test_predictor_on_the_loaded_tiny_model(tiny_folder, size):
    from segment_anything import SamPredictor

    folder, _ = tiny_folder
    model, _ = load_sam(folder)
    predictor = SamPredictor(model)
    H, W = size
    image = np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    predictor.set_image(image)
    assert predictor.features.shape == (1, 32, 8, 8)
    assert max(predictor.input_size) == 64
    point = np.array([[W // 2, H // 2]])  # (x, y) in original pixels
    masks, scores, low = predictor.predict(point_coords=point, point_labels=np.array([1]), multimask_output=True)
    assert masks.shape == (3, H, W) and masks.dtype == bool
    assert scores.shape == (3,) and np.isfinite(scores).all()
    assert low.shape == (3, 32, 32)
    one, s1, _ = predictor.predict(point_coords=point, point_labels=np.array([1]),
                                   box=np.array([0, 0, W - 1, H - 1]), multimask_output=False)
    assert one.shape == (1, H, W) and s1.shape == (1,)
