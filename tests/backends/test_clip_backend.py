"""The open_clip backend on a tiny real ViT saved and loaded through open_clip's own loader."""

import json

import numpy as np
import pytest
import torch

from explorer.backends.attention import is_probed
from explorer.backends.clip import ClipBackend, ModelLoadError
from explorer.backends.specs import ClipSpec, parse_model_spec
from explorer.core.image_io import load_image
from explorer.core.jobs import Cancelled, CancelToken, run_sync
from explorer.core.trace import CaptureSpec
from explorer.testing.tiny import make_tiny_clip
from explorer.testing.images import png_bytes


def test_loads_through_create_model_and_transforms_with_checkpoint(tiny_clip_spec, tiny_clip):
    from safetensors.torch import load_file

    saved = load_file(tiny_clip_spec.weights)
    state = tiny_clip.model.state_dict()
    assert set(saved) == set(state)
    for k in ("visual.conv1.weight", "visual.transformer.resblocks.2.attn.in_proj_weight", "logit_scale"):
        torch.testing.assert_close(state[k], saved[k])
    info = tiny_clip.info
    assert (info.n_layers, info.n_heads, info.width, info.patch_size, info.input_size) == (3, 4, 64, (8, 8), (64, 64))
    assert info.device == "cpu"


def test_torch_checkpoint_loads_with_weights_only(tmp_path):
    spec = make_tiny_clip(tmp_path, name="explorer-tiny-vit-pt", checkpoint_format="pt", seed=3)
    backend = ClipBackend.load(spec)
    ref = torch.load(spec.weights, weights_only=True)["state_dict"]
    torch.testing.assert_close(backend.model.state_dict()["visual.proj"], ref["visual.proj"])


def test_spec_strings_round_trip(tiny_clip_spec):
    again = parse_model_spec(tiny_clip_spec.canonical())
    assert again == tiny_clip_spec
    s = parse_model_spec("ViT-B-16@openai?device=cpu")
    assert (s.model, s.weights, s.device) == ("ViT-B-16", "openai", "cpu")
    assert parse_model_spec("hf-hub:org/repo").model == "hf-hub:org/repo"
    with pytest.raises(ValueError, match="unknown option"):
        parse_model_spec("ViT-B-16@openai?colour=red")


@pytest.mark.parametrize(
    "spec, message",
    [
        (ClipSpec(model="ViT-Nope-99"), "unknown open_clip architecture"),
        (ClipSpec(model="ViT-B-16", weights="/nonexistent/ckpt.pt"), "does not exist"),
        (ClipSpec(model="local-dir:/nonexistent/folder"), "not an open_clip model folder"),
    ],
)
def test_load_errors_are_one_clear_line(spec, message):
    with pytest.raises(ModelLoadError, match=message) as err:
        ClipBackend.load(spec)
    assert "\n" not in str(err.value)


def test_corrupt_and_mismatched_checkpoints(tmp_path, tiny_clip_spec):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"this is not a checkpoint")
    spec = tiny_clip_spec.model_copy(update={"weights": str(bad)})
    with pytest.raises(ModelLoadError, match="could not load") as err:
        ClipBackend.load(spec)
    assert "\n" not in str(err.value)
    other = make_tiny_clip(tmp_path / "wide", name="explorer-tiny-vit-wide", width=96, heads=4)
    mismatched = tiny_clip_spec.model_copy(update={"weights": other.weights})
    with pytest.raises(ModelLoadError, match=r"does not fit explorer-tiny-vit: visual.class_embedding is \(96,\) in "
                                             r"the file, the model has \(64,\)"):
        ClipBackend.load(mismatched)


def _eager_attention(backend, hidden_in: np.ndarray, layer: int) -> np.ndarray:
    """Independent recomputation: ln_1, packed in-projection, softmax(q k^T / sqrt(d))."""
    blk = backend.model.visual.transformer.resblocks[layer]
    x = torch.from_numpy(hidden_in)[None]
    with torch.no_grad():
        u = blk.ln_1(x)
        W, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
        D = u.shape[-1]
        H = blk.attn.num_heads
        q = (u @ W[:D].T + b[:D]).reshape(1, -1, H, D // H).transpose(1, 2)
        k = (u @ W[D:2 * D].T + b[D:2 * D]).reshape(1, -1, H, D // H).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-1, -2) / (D // H) ** 0.5, dim=-1)
    return a[0].numpy()


def test_trace_matches_plain_encode_and_eager_attention(tiny_clip, make_image):
    img = make_image(90, 150, seed=1)
    trace = run_sync(tiny_clip.trace(img, CaptureSpec.everything(3)))
    prepared = tiny_clip.prepare(img)
    ref = tiny_clip.encode_image_tensor(prepared.pixels)[0]
    np.testing.assert_allclose(trace.image_embedding, ref, atol=1e-5)
    assert set(trace.attentions) == {0, 1, 2} and set(trace.hidden_states) == {0, 1, 2, 3}
    for layer in range(3):
        a = trace.attentions[layer]
        assert a.shape == (4, 65, 65)
        np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(a, _eager_attention(tiny_clip, trace.hidden_states[layer], layer), atol=1e-5)


def test_row_capture_equals_full_rows_and_only_asked_layers_are_probed(tiny_clip, make_image):
    img = make_image(64, 64, seed=2)
    full = run_sync(tiny_clip.trace(img, CaptureSpec(attention_layers={1})))
    probed_during_pass = {}
    hooks = [
        blk.attn.register_forward_pre_hook(lambda m, a, i=i: probed_during_pass.__setitem__(i, is_probed(m)))
        for i, blk in enumerate(tiny_clip.blocks)
    ]
    try:
        rows = run_sync(tiny_clip.trace(img, CaptureSpec(attention_layers={1}, attention_rows=(0, 9))))
    finally:
        for h in hooks:
            h.remove()
    assert probed_during_pass == {0: False, 1: True, 2: False}  # the fused kernel stays on elsewhere
    assert rows.attentions[1].shape == (4, 2, 65)
    np.testing.assert_allclose(rows.attentions[1], full.attentions[1][:, [0, 9]], atol=1e-6)
    np.testing.assert_allclose(rows.attention_row(1, 9), full.attention_row(1, 9), atol=1e-6)
    np.testing.assert_allclose(rows.image_embedding, full.image_embedding, atol=1e-6)
    with pytest.raises(KeyError):
        rows.attention_row(1, 3)


def test_probes_are_removed_after_a_forward_that_raised(tiny_clip, make_image, monkeypatch):
    img = make_image(64, 64)
    blk = tiny_clip.blocks[1]

    def boom(*a, **k):
        raise RuntimeError("injected failure inside block 1")

    monkeypatch.setattr(blk.mlp, "forward", boom)
    with pytest.raises(RuntimeError, match="injected"):
        run_sync(tiny_clip.trace(img, CaptureSpec.everything(3)))
    monkeypatch.undo()
    assert not any(is_probed(b.attn) for b in tiny_clip.blocks)
    assert all(len(b.attn._forward_hooks) == 0 and len(b._forward_pre_hooks) == 0 for b in tiny_clip.blocks)
    # and the model still works
    run_sync(tiny_clip.trace(img, CaptureSpec(attention_layers={0})))


def test_cancel_between_blocks(tiny_clip, make_image):
    img = make_image(64, 64)
    tok = CancelToken()
    steps = []

    def on_progress(p):
        steps.append(p.message)
        if p.message.startswith("block 1"):
            tok.cancel()

    before = tiny_clip.forward_count
    with pytest.raises(Cancelled):
        run_sync(tiny_clip.trace(img, CaptureSpec.everything(3), cancel=tok), cancel=tok, on_progress=on_progress)
    assert "block 3/3" not in steps
    assert not any(is_probed(b.attn) for b in tiny_clip.blocks)
    assert tiny_clip.forward_count == before + 1


def test_capture_out_of_range_is_refused(tiny_clip, make_image):
    with pytest.raises(ValueError, match="3 blocks"):
        run_sync(tiny_clip.trace(make_image(64, 64), CaptureSpec(attention_layers={5})))


@pytest.mark.parametrize("size", [(64, 64), (80, 200), (200, 80)])
def test_layout_agrees_with_the_real_preprocessing(tiny_clip, size):
    """A bright block placed on one token's box (from the layout) shows up in that patch of the
    model input, and nowhere else."""
    H, W = size
    base = np.full((H, W, 3), 40, np.uint8)
    layout = tiny_clip.prepare(load_image(png_bytes(base))).layout
    seq = layout.image_token_indices()[27]  # row 3, col 3 of the 8x8 grid
    _, box = layout.token_box(int(seq))
    arr = base.copy()
    rows, cols = box.pixel_slices((H, W))
    arr[rows, cols] = 250
    pixels = tiny_clip.prepare(load_image(png_bytes(arr))).pixels[0]  # (3, 64, 64), normalised
    patch_means = pixels.mean(0).reshape(8, 8, 8, 8).mean((1, 3)).numpy()  # (rows, cols) of patches
    assert np.unravel_index(patch_means.argmax(), patch_means.shape) == (3, 3)
    inner = pixels.mean(0)[3 * 8 + 2: 3 * 8 + 6, 3 * 8 + 2: 3 * 8 + 6]
    outer = pixels.mean(0)[:, :16]
    assert inner.min() > outer.max()


def test_custom_block_models_trace_exactly(tmp_path, make_image):
    """open_clip's own Attention (qk-norm) goes through its adapter and matches encode_image."""
    cfg_dir = tmp_path / "qk"
    spec = make_tiny_clip(cfg_dir, name="explorer-tiny-vit-qknorm")
    cfg = json.loads((cfg_dir / "explorer-tiny-vit-qknorm.json").read_text())
    cfg["vision_cfg"]["qk_norm"] = True
    (cfg_dir / "explorer-tiny-vit-qknorm.json").write_text(json.dumps(cfg))
    import open_clip
    from safetensors.torch import save_file

    open_clip.add_model_config(cfg_dir / "explorer-tiny-vit-qknorm.json")
    torch.manual_seed(5)
    model = open_clip.create_model("explorer-tiny-vit-qknorm")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, spec.weights)
    backend = ClipBackend.load(spec)
    assert type(backend.blocks[0].attn).__name__ == "Attention"
    img = make_image(70, 70, seed=4)
    trace = run_sync(backend.trace(img, CaptureSpec.everything(3)))
    ref = backend.encode_image_tensor(backend.prepare(img).pixels)[0]
    np.testing.assert_allclose(trace.image_embedding, ref, atol=1e-5)
    np.testing.assert_allclose(trace.attentions[2].sum(-1), 1.0, atol=1e-5)


def test_run_block_default_equals_the_block(tiny_clip, make_image):
    trace = run_sync(tiny_clip.trace(make_image(64, 64), CaptureSpec.everything(3)))
    x = tiny_clip.to_tensor(trace.hidden(1))
    with torch.no_grad():
        y = tiny_clip.run_block(1, x)
        z = tiny_clip.run_block(1, x, attention=lambda ad, q, k, v: torch.softmax(ad.logits(q, k), -1) @ v)
    np.testing.assert_allclose(y[0].numpy(), trace.hidden(2), atol=1e-5)
    np.testing.assert_allclose(z[0].numpy(), trace.hidden(2), atol=1e-5)


def test_encode_text_tokens(tiny_clip):
    enc = tiny_clip.encode_text(["a red circle", "a dog"])
    assert enc.embeddings.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(enc.embeddings, axis=1), 1.0, atol=1e-5)
    assert enc.tokens[0][1:-1] == ("a", "red", "circle")
    assert enc.pooled_index == (4, 3)
    with pytest.raises(ValueError):
        tiny_clip.encode_text(["  "])
