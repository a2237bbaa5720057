"""Tiny image tokenizers for tests, saved in the layouts the program reads.

:func:`make_tiny_titok` writes an *official-layout* TiTok folder: ``config.json`` in the official
OmegaConf form (``model.vq_model``, ``dataset.preprocessing.crop_size``; tiny shapes given with
the project's explicit-shape keys) and the state dict with the official key names, as
``model.safetensors`` or a plain ``torch.save`` file (``pytorch_model.bin``), legacy (VQGAN
pixel decoder) or not. :func:`make_tiny_grid` writes a grid VQ tokenizer in the project's format.
Random weights: shapes and code paths are what the tests check.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["make_tiny_titok", "make_tiny_grid", "tiny_titok_config"]


def tiny_titok_config(legacy: bool = True, tokens: int = 8, image_size: int = 32, patch: int = 8) -> dict:
    """An official-form TiTok config with tiny explicit shapes."""
    vq = {"codebook_size": 64, "token_size": 8, "use_l2_norm": True, "commitment_cost": 0.25,
          "vit_enc_model_size": "small", "vit_dec_model_size": "small", "vit_enc_patch_size": patch,
          "vit_dec_patch_size": patch, "num_latent_tokens": tokens, "finetune_decoder": legacy, "is_legacy": legacy,
          "vit_enc_width": 32, "vit_enc_layers": 2, "vit_enc_heads": 2, "vit_dec_width": 32, "vit_dec_layers": 2,
          "vit_dec_heads": 2}
    if legacy:  # a pixel decoder from a grid of image_size/patch up to image_size: one upsampling per factor 2
        levels = 1 + (patch.bit_length() - 1)
        vq.update({"pixel_channels": 32, "pixel_mult": [1] + [2] * (levels - 1), "pixel_res_blocks": 1,
                   "pixel_codebook_size": 16, "pixel_token_size": 32})
    return {"experiment": {"name": "tiny"}, "model": {"vq_model": vq},
            "dataset": {"preprocessing": {"crop_size": image_size}}}


def make_tiny_titok(folder: str | Path, legacy: bool = True, weights: str = "safetensors", seed: int = 0, **kw):
    """Write a tiny official-layout TiTok to ``folder``; returns the :class:`TokenizerSpec`."""
    import torch

    from explorer.backends.specs import TokenizerSpec
    from explorer.backends.titok import build_tokenizer, config_from_official

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_titok_config(legacy, **kw)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    torch.manual_seed(seed)
    model = build_tokenizer(config_from_official(cfg))
    with torch.no_grad():  # a codebook spread over the sphere (the official init is near zero)
        model.quantize.embedding.weight.normal_()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if weights == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return TokenizerSpec(model=str(folder), device="cpu")


def make_tiny_grid(folder: str | Path, seed: int = 0, image_size: int = 32, patch: int = 8):
    """Write a tiny grid VQ tokenizer (the project's format); returns its spec."""
    import torch

    from explorer.backends.specs import TokenizerSpec
    from explorer.backends.titok import TokenizerConfig, build_tokenizer, save_tokenizer

    torch.manual_seed(seed)
    cfg = TokenizerConfig(kind="grid", image_size=image_size, patch_size=patch, enc_width=32, enc_layers=2,
                          enc_heads=2, dec_width=32, dec_layers=2, dec_heads=2, codebook_size=64, token_size=8,
                          is_legacy=False, finetune_decoder=False, name="tiny grid tokenizer")
    model = build_tokenizer(cfg)
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()
    save_tokenizer(model, folder)
    return TokenizerSpec(model=str(folder), device="cpu")
