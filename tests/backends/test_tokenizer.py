"""The image-tokenizer backend: TiTok's official layout, loaders, quantiser, prefixes."""

import json

import numpy as np
import pytest
import torch

from explorer.backends.registry import load_backend, parse_model_spec
from explorer.backends.titok import build_tokenizer, config_from_official, load_tokenizer
from explorer.testing.tiny_tokenizer import make_tiny_grid, make_tiny_titok, tiny_titok_config


def _official(enc, dec, tokens, legacy=True, codebook=4096, token_size=12, l2=True):
    return {"model": {"vq_model": {"vit_enc_model_size": enc, "vit_dec_model_size": dec, "num_latent_tokens": tokens,
                                   "codebook_size": codebook, "token_size": token_size, "use_l2_norm": l2,
                                   "is_legacy": legacy, "finetune_decoder": legacy}},
            "dataset": {"preprocessing": {"crop_size": 256}}}


@pytest.mark.parametrize("enc, dec, n, tensors, params", [
    ("large", "large", 32, 692, 641_054_735), ("base", "base", 64, 404, 204_814_095),
    ("small", "small", 128, 308, 83_674_639)])
def test_the_released_configs_have_the_official_tensors(enc, dec, n, tensors, params):
    """Built on the meta device (no memory): the tensor count and parameter total of the released
    TiTok-L-32, B-64 and S-128 checkpoints, and their key names and shapes."""
    with torch.device("meta"):
        model = build_tokenizer(config_from_official(_official(enc, dec, n)))
    sd = model.state_dict()
    assert len(sd) == tensors and sum(v.numel() for v in sd.values()) == params
    W = {"large": 1024, "base": 768, "small": 512}[enc]
    assert sd["latent_tokens"].shape == (n, W)
    assert sd["encoder.positional_embedding"].shape == (257, W)
    assert sd["encoder.patch_embed.weight"].shape == (W, 3, 16, 16)
    assert sd["encoder.transformer.0.attn.in_proj_weight"].shape == (3 * W, W)
    assert sd["encoder.transformer.0.mlp.c_fc.weight"].shape == (4 * W, W)
    assert sd["encoder.conv_out.weight"].shape == (12, W, 1, 1)
    assert sd["quantize.embedding.weight"].shape == (4096, 12)
    assert sd["decoder.mask_token"].shape == (1, 1, W)
    assert sd["decoder.ffn.2.weight"].shape == (1024, 2 * W, 1, 1)
    assert sd["pixel_quantize.embedding.weight"].shape == (1024, 256)
    assert sd["pixel_decoder.conv_in.weight"].shape == (512, 256, 3, 3)
    assert sd["pixel_decoder.up.3.block.0.nin_shortcut.weight"].shape == (256, 256, 1, 1)  # the output-side shortcut
    assert sd["pixel_decoder.conv_out.weight"].shape == (3, 128, 3, 3)
    assert sum(1 for k in sd if k.startswith("pixel_")) == 89


def test_the_pixel_decoding_variants_have_their_heads():
    with torch.device("meta"):
        vq8k = build_tokenizer(config_from_official(_official("base", "large", 64, legacy=False, codebook=8192,
                                                              token_size=64, l2=False)))
    sd = vq8k.state_dict()
    assert sd["decoder.ffn.0.weight"].shape == (16 * 16 * 3, 1024, 1, 1)
    assert sd["decoder.conv_out.weight"].shape == (3, 3, 3, 3)
    assert not any(k.startswith("pixel_") for k in sd) and "decoder.ffn.2.weight" not in sd


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_official_layout_folders_load_and_round_trip(tmp_path, legacy, weights):
    spec = make_tiny_titok(tmp_path / "t", legacy=legacy, weights=weights)
    backend = load_backend(spec)
    assert backend.token_count == 8 and not backend.is_grid and not backend.ordered
    x = torch.rand(2, 3, 32, 32)
    ids, z = backend.encode(x)
    assert ids.shape == (2, 8) and ids.dtype == torch.int64 and int(ids.min()) >= 0 and int(ids.max()) < 64
    assert z.shape == (2, 8, 8)
    rec = backend.decode_ids(ids)
    assert rec.shape == (2, 3, 32, 32) and float(rec.min()) >= 0 and float(rec.max()) <= 1
    torch.testing.assert_close(backend.decode_ids(ids), rec)  # deterministic
    # the ids are the nearest codes by cosine
    codes = torch.nn.functional.normalize(backend.model.quantize.embedding.weight, dim=-1)
    sims = torch.nn.functional.normalize(z, dim=-1) @ codes.T
    torch.testing.assert_close(ids, sims.argmax(-1))
    # every saved tensor was used: an extra or missing key is refused with its name
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["model"]["vq_model"]["is_legacy"] is legacy


def test_a_checkpoint_that_does_not_fit_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    spec = make_tiny_titok(tmp_path / "t", legacy=False)
    path = tmp_path / "t" / "model.safetensors"
    state = load_file(str(path))
    state.pop("decoder.mask_token")
    state["decoder.unknown"] = torch.zeros(1)
    save_file(state, str(path))
    with pytest.raises(ValueError, match="missing 1 .*decoder.mask_token.*unexpected 1 .*decoder.unknown"):
        load_tokenizer(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg["model"]["vq_model"]["quantize_mode"] = "vae"  # the VAE releases: continuous tokens
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="continuous tokens and no ids"):
        load_tokenizer(tmp_path / "t")
    (tmp_path / "t" / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        load_backend(spec)


def test_prefix_keep_and_the_codebook_mean(tmp_path):
    backend = load_backend(make_tiny_grid(tmp_path / "g"))
    assert backend.is_grid and backend.token_count == 16
    ids, _ = backend.encode(torch.rand(1, 3, 32, 32))
    keep_all = torch.ones(1, 16, dtype=torch.bool)
    torch.testing.assert_close(backend.decode_ids(ids, keep_all), backend.decode_ids(ids))
    keep = torch.arange(16)[None] < 4  # no tail token: the rest become the codebook's mean vector
    mean = backend.codebook().mean(0)
    vectors = backend.token_vectors(ids)
    vectors[:, 4:] = mean
    torch.testing.assert_close(backend.decode_ids(ids, keep), backend.decode_vectors(vectors))


def test_specs_and_offline_hub_ids(monkeypatch):
    demo = parse_model_spec("tok:demo")
    assert demo.kind == "tokenizer" and demo.is_demo and demo.canonical().startswith("tok:")
    assert parse_model_spec("tok:demo-grid").model.endswith("demo-tok-grid")
    assert parse_model_spec("tokenizer:demo").model == demo.model
    import explorer.backends.network as network

    monkeypatch.setattr(network, "hub_reachable", lambda timeout=1.0: False)
    with pytest.raises(ValueError, match="no network and not in the Hugging Face cache.*tok:/path"):
        load_backend("tok:someone/tokenizer_titok_l32_imagenet")
    with pytest.raises(ValueError, match="precision"):
        parse_model_spec("tok:demo?precision=fp8")


def test_a_tiny_legacy_config_is_the_official_form():
    cfg = tiny_titok_config(legacy=True)
    assert set(cfg) == {"experiment", "model", "dataset"} and "vq_model" in cfg["model"]
    tc = config_from_official(cfg)
    assert tc.is_legacy and tc.finetune_decoder and tc.image_size == 32 and tc.grid == 4


def test_recomputed_attention_equals_pytorch_multihead_attention():
    """The blocks keep the official nn.MultiheadAttention weights; the probabilities they keep for
    the maps are the ones PyTorch's own module computes."""
    from explorer.backends.titok import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(32, 4).eval()
    x = torch.randn(2, 7, 32)
    block.keep_attention = True
    out = block(x)
    h = block.ln_1(x).transpose(0, 1)  # sequence-first, as the official code calls it
    ref_attn, ref_w = block.attn(h, h, h, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(block.last_attention, ref_w, atol=1e-6, rtol=1e-5)
    y = x + ref_attn.transpose(0, 1)
    torch.testing.assert_close(out, y + block.mlp(block.ln_2(y)), atol=1e-5, rtol=1e-5)
    block.keep_attention = False
    torch.testing.assert_close(block(x), out, atol=1e-5, rtol=1e-5)  # the fused path computes the same
