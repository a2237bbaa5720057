"""Build and load Segment Anything models with the library's own classes.

SAM (Kirillov et al., *Segment Anything*, ICCV 2023) is an image encoder (a ViTDet-style ViT
with windowed and global attention blocks), a prompt encoder (points, boxes, low-resolution
masks) and a two-way transformer mask decoder. This module builds
:class:`segment_anything.modeling.Sam` from a plain config dict, the same way
``segment_anything.build_sam._build_sam`` builds the official ViT-B/L/H models, so a small
model (the offline demo) and the official ones are the same Python objects and work with
:class:`segment_anything.SamPredictor` unchanged.

Sources accepted by :func:`load_sam`:

* ``"vit_b"``, ``"vit_l"``, ``"vit_h"`` (and the registry's ``"default"`` = ViT-H): the official
  architectures from ``segment_anything.sam_model_registry``, with a checkpoint path (an
  official ``.pth`` state dict, or a ``.safetensors`` copy). The registry builder is called
  *without* a checkpoint (it would ``torch.load`` without ``weights_only``); the weights are
  then loaded here with ``weights_only=True``.
* a local folder in the demo format: ``sam_config.json`` (see :func:`sam_config`) and
  ``model.safetensors`` (a ``checkpoint`` argument, ``.safetensors`` or ``.pth``, replaces the
  folder's weights file).

Coordinate conventions of the built models are SAM's: the encoder input is the image resized
so that its long side is ``img_size`` (``ResizeLongestSide``), normalised with
``pixel_mean``/``pixel_std`` and zero-padded at the bottom/right to ``img_size x img_size``;
the embedding is ``(out_chans, img_size // patch_size, img_size // patch_size)``; point prompts
are ``(x, y)`` in pixels of the original image, where the integer point ``(c, r)`` denotes the
pixel in column ``c`` and row ``r`` (SAM's prompt encoder adds 0.5 to reach its centre).

This module imports torch and segment_anything, never Qt.
"""

from __future__ import annotations

import copy
import json
import pickle
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "OFFICIAL_ARCHITECTURES",
    "DEFAULT_PIXEL_MEAN",
    "DEFAULT_PIXEL_STD",
    "sam_config",
    "validate_sam_config",
    "build_sam",
    "load_state_dict_file",
    "load_weights",
    "save_sam",
    "load_sam",
]

#: File names of the demo (folder) format.
CONFIG_NAME = "sam_config.json"
WEIGHTS_NAME = "model.safetensors"

#: Names accepted by ``segment_anything.sam_model_registry`` for the official models.
OFFICIAL_ARCHITECTURES: tuple[str, ...] = ("vit_b", "vit_l", "vit_h", "default")

#: ImageNet statistics in 0-255 units, as in the official SAM models.
DEFAULT_PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
DEFAULT_PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)

_FORMAT = "explorer-sam"
_FORMAT_VERSION = 1


def sam_config(
    *,
    img_size: int = 1024,
    patch_size: int = 16,
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    window_size: int = 14,
    global_attn_indexes: tuple[int, ...] | list[int] = (2, 5, 8, 11),
    mlp_ratio: float = 4.0,
    prompt_embed_dim: int = 256,
    mask_in_chans: int = 16,
    decoder_depth: int = 2,
    decoder_mlp_dim: int = 2048,
    decoder_num_heads: int = 8,
    iou_head_depth: int = 3,
    iou_head_hidden_dim: int = 256,
    num_multimask_outputs: int = 3,
    pixel_mean: tuple[float, ...] | list[float] = DEFAULT_PIXEL_MEAN,
    pixel_std: tuple[float, ...] | list[float] = DEFAULT_PIXEL_STD,
) -> dict[str, Any]:
    """A SAM config dict (the content of ``sam_config.json``). Defaults give ViT-B's shape.

    Parameters
    ----------
    img_size : int
        Side of the square encoder input; the long side of every image is resized to it.
    patch_size : int
        Patch size of the encoder; ``img_size`` must be a multiple. The embedding grid is
        ``img_size // patch_size`` on each side and low-resolution masks are 4x that.
    embed_dim, depth, num_heads, mlp_ratio : int, int, int, float
        Width, number of blocks, heads and MLP ratio of the ViT encoder.
    window_size : int
        Side of the attention windows of the non-global blocks (0: all blocks global).
    global_attn_indexes : sequence of int
        Blocks that attend globally.
    prompt_embed_dim : int
        Channels of the image embedding (the encoder's ``out_chans``) and width of the prompt
        encoder and mask decoder.
    mask_in_chans : int
        Hidden channels of the prompt encoder's mask-input downscaler.
    decoder_depth, decoder_mlp_dim, decoder_num_heads : int
        The mask decoder's two-way transformer.
    iou_head_depth, iou_head_hidden_dim : int
        The MLP that predicts each mask's IoU.
    num_multimask_outputs : int
        Masks returned with ``multimask_output=True`` (3 in SAM).
    pixel_mean, pixel_std : sequence of 3 float
        Normalisation in 0-255 units (RGB).

    Returns
    -------
    dict
        JSON-serialisable; ``build_sam(sam_config(...))`` builds the model.
    """
    return {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "img_size": int(img_size),
        "patch_size": int(patch_size),
        "encoder": {
            "embed_dim": int(embed_dim),
            "depth": int(depth),
            "num_heads": int(num_heads),
            "mlp_ratio": float(mlp_ratio),
            "window_size": int(window_size),
            "global_attn_indexes": [int(i) for i in global_attn_indexes],
            "out_chans": int(prompt_embed_dim),
        },
        "prompt_embed_dim": int(prompt_embed_dim),
        "mask_in_chans": int(mask_in_chans),
        "decoder": {
            "depth": int(decoder_depth),
            "mlp_dim": int(decoder_mlp_dim),
            "num_heads": int(decoder_num_heads),
            "iou_head_depth": int(iou_head_depth),
            "iou_head_hidden_dim": int(iou_head_hidden_dim),
            "num_multimask_outputs": int(num_multimask_outputs),
        },
        "pixel_mean": [float(v) for v in pixel_mean],
        "pixel_std": [float(v) for v in pixel_std],
    }


def _require(cfg: Mapping[str, Any], key: str, where: str = "config") -> Any:
    if key not in cfg:
        raise ValueError(f"SAM {where} lacks {key!r}")
    return cfg[key]


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"SAM config: {name} must be a positive integer, got {value!r}")
    return value


def validate_sam_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Check a config dict and return a normalised deep copy.

    Raises
    ------
    ValueError
        One line naming the first problem: a missing key, a non-positive size, ``img_size``
        not a multiple of ``patch_size``, a negative window size (windows need not divide the
        grid: the library pads), a head count that does not divide a width,
        ``out_chans != prompt_embed_dim``, a global block index out of range, or pixel
        statistics that are not 3 numbers (std > 0).
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"SAM config must be a mapping, got {type(config).__name__}")
    cfg = copy.deepcopy(dict(config))
    fmt = cfg.get("format", _FORMAT)
    if fmt != _FORMAT:
        raise ValueError(f"SAM config has format {fmt!r}, expected {_FORMAT!r}")
    img = _positive_int(_require(cfg, "img_size"), "img_size")
    patch = _positive_int(_require(cfg, "patch_size"), "patch_size")
    if img % patch:
        raise ValueError(f"SAM config: img_size {img} is not a multiple of patch_size {patch}")
    enc = _require(cfg, "encoder")
    dec = _require(cfg, "decoder")
    if not isinstance(enc, Mapping) or not isinstance(dec, Mapping):
        raise ValueError("SAM config: 'encoder' and 'decoder' must be mappings")
    dim = _positive_int(_require(enc, "embed_dim", "encoder config"), "encoder.embed_dim")
    depth = _positive_int(_require(enc, "depth", "encoder config"), "encoder.depth")
    heads = _positive_int(_require(enc, "num_heads", "encoder config"), "encoder.num_heads")
    if dim % heads:
        raise ValueError(f"SAM config: encoder.embed_dim {dim} is not divisible by num_heads {heads}")
    window = enc.get("window_size", 0)
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"SAM config: encoder.window_size must be an integer >= 0, got {window!r}")
    glob = enc.get("global_attn_indexes", [])
    if not isinstance(glob, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in glob):
        raise ValueError(f"SAM config: encoder.global_attn_indexes must be a list of integers, got {glob!r}")
    if any(not 0 <= i < depth for i in glob):
        raise ValueError(f"SAM config: encoder.global_attn_indexes {list(glob)} out of range for depth {depth}")
    prompt_dim = _positive_int(_require(cfg, "prompt_embed_dim"), "prompt_embed_dim")
    out_chans = enc.get("out_chans", prompt_dim)
    if out_chans != prompt_dim:
        raise ValueError(f"SAM config: encoder.out_chans {out_chans!r} must equal prompt_embed_dim {prompt_dim}")
    if prompt_dim % 8:
        raise ValueError(f"SAM config: prompt_embed_dim {prompt_dim} must be a multiple of 8")
    dheads = _positive_int(_require(dec, "num_heads", "decoder config"), "decoder.num_heads")
    if (prompt_dim // 2) % dheads:
        raise ValueError(f"SAM config: prompt_embed_dim / 2 = {prompt_dim // 2} is not divisible by "
                         f"decoder.num_heads {dheads}")
    _positive_int(_require(dec, "depth", "decoder config"), "decoder.depth")
    _positive_int(_require(dec, "mlp_dim", "decoder config"), "decoder.mlp_dim")
    for name in ("iou_head_depth", "iou_head_hidden_dim", "num_multimask_outputs"):
        if name in dec:
            _positive_int(dec[name], f"decoder.{name}")
    if "mask_in_chans" in cfg:
        _positive_int(cfg["mask_in_chans"], "mask_in_chans")
    for name in ("pixel_mean", "pixel_std"):
        vals = cfg.get(name, DEFAULT_PIXEL_MEAN if name == "pixel_mean" else DEFAULT_PIXEL_STD)
        if (not isinstance(vals, (list, tuple)) or len(vals) != 3
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in vals)):
            raise ValueError(f"SAM config: {name} must be 3 numbers, got {vals!r}")
        if name == "pixel_std" and any(v <= 0 for v in vals):
            raise ValueError(f"SAM config: pixel_std must be > 0, got {vals!r}")
        cfg[name] = [float(v) for v in vals]
    return cfg


def build_sam(config: Mapping[str, Any]):
    """Build a randomly initialised :class:`segment_anything.modeling.Sam` from a config.

    Mirrors ``segment_anything.build_sam._build_sam``: LayerNorm(eps=1e-6), ``qkv_bias`` and
    decomposed relative positions in the encoder, a 3-mask + 1 single-mask decoder, the model
    in ``eval()`` mode.

    Parameters
    ----------
    config : mapping
        As returned by :func:`sam_config` (validated with :func:`validate_sam_config`).

    Returns
    -------
    segment_anything.modeling.Sam
        Embedding ``(B, prompt_embed_dim, img_size // patch_size, img_size // patch_size)``;
        low-resolution mask logits ``4x`` the embedding grid.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    cfg = validate_sam_config(config)
    enc, dec = cfg["encoder"], cfg["decoder"]
    img, patch, dim = cfg["img_size"], cfg["patch_size"], cfg["prompt_embed_dim"]
    grid = img // patch
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=enc["depth"],
            embed_dim=enc["embed_dim"],
            img_size=img,
            mlp_ratio=float(enc.get("mlp_ratio", 4.0)),
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=enc["num_heads"],
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(enc.get("global_attn_indexes", ())),
            window_size=enc.get("window_size", 0),
            out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(img, img),
            mask_in_chans=int(cfg.get("mask_in_chans", 16)),
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=int(dec.get("num_multimask_outputs", 3)),
            transformer=TwoWayTransformer(
                depth=dec["depth"],
                embedding_dim=dim,
                mlp_dim=dec["mlp_dim"],
                num_heads=dec["num_heads"],
            ),
            transformer_dim=dim,
            iou_head_depth=int(dec.get("iou_head_depth", 3)),
            iou_head_hidden_dim=int(dec.get("iou_head_hidden_dim", 256)),
        ),
        pixel_mean=cfg["pixel_mean"],
        pixel_std=cfg["pixel_std"],
    )
    sam.eval()
    return sam


# ----------------------------------------------------------------------------- weights


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``).

    Raises
    ------
    ValueError
        The file is missing, unreadable, corrupt, or does not hold a flat mapping of names to
        tensors. Pickled code is never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"SAM checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ValueError(f"SAM checkpoint {path} is not a readable safetensors file: {exc}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError,
                ImportError, IndexError, KeyError, TypeError, UnicodeDecodeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"SAM checkpoint {path} is not a readable weights-only torch file: {first}") from None
    if not isinstance(state, Mapping) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"SAM checkpoint {path} does not hold a state dict (a mapping of names to tensors)")
    return dict(state)


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a checkpoint into ``model`` strictly (every key, every shape must match).

    Raises
    ------
    ValueError
        See :func:`load_state_dict_file`; also when the keys or shapes do not match the model
        (a checkpoint of another architecture), with a one-line summary of the mismatch.
    """
    _apply_state(model, load_state_dict_file(path), path)


def _apply_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} with other shapes (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise ValueError(f"SAM checkpoint {path} does not match the architecture: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def save_sam(model: torch.nn.Module, config: Mapping[str, Any], folder: str | Path) -> Path:
    """Write ``model`` in the demo format: ``folder/sam_config.json`` + ``folder/model.safetensors``.

    Returns the folder. Tensors are saved as contiguous float32 CPU copies.
    """
    from safetensors.torch import save_file

    cfg = validate_sam_config(config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    tmp = folder / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": _FORMAT})
    tmp.replace(folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"SAM folder {folder} has no {CONFIG_NAME}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"SAM config {path} is not valid JSON: {exc}") from None
    return validate_sam_config(raw)


def load_sam(source: str | Path, checkpoint: str | Path | None = None, device: str | torch.device = "cpu"):
    """Load a SAM model for inference (``eval()`` mode).

    Parameters
    ----------
    source : str or Path
        ``"vit_b"``, ``"vit_l"``, ``"vit_h"`` (or ``"default"``): an official architecture built by
        ``segment_anything.sam_model_registry``; ``checkpoint`` is then required. Otherwise a
        folder holding ``sam_config.json`` and ``model.safetensors`` (the demo format).
    checkpoint : str or Path, optional
        Weights file, ``.pth``/``.pt`` (a plain state dict, read with ``weights_only=True``) or
        ``.safetensors``. For a folder source it replaces ``model.safetensors``.
    device : str or torch.device
        Where to put the model.

    Returns
    -------
    model : segment_anything.modeling.Sam
        Ready for :class:`segment_anything.SamPredictor`.
    config : dict
        The architecture: for a folder its validated ``sam_config.json``; for an official
        model the equivalent :func:`sam_config` (plus ``"architecture": name``).

    Raises
    ------
    ValueError
        One line: unknown architecture (neither a registry name nor a folder), missing folder,
        config or weights file, no checkpoint for an official architecture, a corrupt file,
        something that is not a state dict, or a state dict of another architecture.
    """
    src = str(source)
    if src in OFFICIAL_ARCHITECTURES:
        from segment_anything import sam_model_registry

        if checkpoint is None:
            raise ValueError(f"SAM architecture {src!r} needs a checkpoint file (e.g. the official .pth)")
        ckpt = Path(checkpoint)
        if not ckpt.is_file():
            raise ValueError(f"SAM checkpoint not found: {ckpt}")
        state = load_state_dict_file(ckpt)  # read (weights only) before the costly build
        model = sam_model_registry[src](checkpoint=None)  # the registry would torch.load unsafely
        _apply_state(model, state, ckpt)
        config = _official_config(src)
    else:
        folder = Path(src)
        if not folder.exists():
            known = ", ".join(OFFICIAL_ARCHITECTURES[:3])
            raise ValueError(f"unknown SAM architecture or missing folder: {src!r} (expected {known} or a folder "
                             f"with {CONFIG_NAME} and {WEIGHTS_NAME})")
        if not folder.is_dir():
            raise ValueError(f"SAM source {src!r} is a file; pass a folder with {CONFIG_NAME} (or an architecture "
                             f"name with checkpoint=)")
        config = _read_config(folder)
        weights = Path(checkpoint) if checkpoint is not None else folder / WEIGHTS_NAME
        if not weights.is_file():
            raise ValueError(f"SAM weights not found: {weights}")
        state = load_state_dict_file(weights)
        model = build_sam(config)
        _apply_state(model, state, weights)
    model.eval()
    model.to(device)
    return model, config


def _official_config(name: str) -> dict[str, Any]:
    """The :func:`sam_config` equivalent of the registry's ViT-B/L/H (for display and layouts)."""
    arch = {"vit_b": (768, 12, 12, (2, 5, 8, 11)), "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
            "vit_h": (1280, 32, 16, (7, 15, 23, 31))}
    key = "vit_h" if name == "default" else name
    dim, depth, heads, glob = arch[key]
    cfg = sam_config(img_size=1024, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads, window_size=14,
                     global_attn_indexes=glob)
    cfg["architecture"] = key
    return cfg
