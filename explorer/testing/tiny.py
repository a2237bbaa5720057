"""Tiny real models for tests and plugin authors: built from configs, saved, and loaded back
through the libraries' own loaders (never mocks).

``make_tiny_clip(folder)`` registers a small open_clip ViT config, builds it with random weights,
saves the state dict as safetensors (or a torch ``.pt``) and returns the :class:`ClipSpec` that
loads it back through ``open_clip.create_model_and_transforms`` with the checkpoint path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from explorer.backends.specs import ClipSpec

__all__ = ["tiny_clip_config", "make_tiny_clip", "make_tiny_sam"]


def tiny_clip_config(image_size: int = 64, patch_size: int = 8, layers: int = 3, width: int = 64,
                     heads: int = 4, embed_dim: int = 32, text_layers: int = 1, text_width: int = 32,
                     context_length: int = 16) -> dict[str, Any]:
    """An open_clip model config (the JSON format of ``open_clip/model_configs``)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "layers": layers,
            "width": width,
            "head_width": width // heads,
            "patch_size": patch_size,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": 49408,
            "width": text_width,
            "heads": max(1, text_width // 16),
            "layers": text_layers,
        },
    }


def make_tiny_clip(folder: str | Path, name: str = "explorer-tiny-vit", seed: int = 0,
                   checkpoint_format: str = "safetensors", **config: Any) -> ClipSpec:
    """Build, save and describe a tiny open_clip ViT; returns the spec that loads it."""
    import open_clip
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / f"{name}.json"
    cfg_path.write_text(json.dumps(tiny_clip_config(**config), indent=2))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if checkpoint_format == "safetensors":
        from safetensors.torch import save_file

        ckpt = folder / f"{name}.safetensors"
        save_file(state, str(ckpt))
    elif checkpoint_format == "pt":
        ckpt = folder / f"{name}.pt"
        torch.save({"state_dict": state}, ckpt)
    else:
        raise ValueError(f"unknown checkpoint format {checkpoint_format!r}")
    return ClipSpec(model=name, weights=str(ckpt), config=str(cfg_path), device="cpu")


def make_tiny_sam(folder: str | Path, seed: int = 0, img_size: int = 64, patch_size: int = 8):
    """Build a tiny SAM (segment_anything's own classes), save it in the demo folder format
    and return the :class:`SamSpec` that loads it."""
    import torch

    from explorer.backends.sam_build import build_sam, sam_config, save_sam
    from explorer.backends.specs import SamSpec

    cfg = sam_config(img_size=img_size, patch_size=patch_size, embed_dim=32, depth=2, num_heads=2, window_size=4,
                     global_attn_indexes=(1,), prompt_embed_dim=32, mask_in_chans=4, decoder_depth=1,
                     decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32)
    torch.manual_seed(seed)
    model = build_sam(cfg)
    save_sam(model, cfg, folder)
    return SamSpec(model=str(Path(folder)), device="cpu")
