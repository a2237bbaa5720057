"""Helpers shared by the golden-file tests (``test_golden_*.py``): they rebuild the tiny models the
golden files in ``tests/golden/`` were made with, load those files, and run a method through the
plugin host. Not a test module: it holds no tests and no fixtures, only plain functions.

* dense CLIP (``test_golden_clip_surgery.py``, ``test_golden_segearth_ov.py``, ``test_golden_gem.py``):
  :func:`build_dense_clip`, :func:`dense_clip_backend`, :func:`dense_clip_trace`;
* the tiny open_clip named by a golden file's ``meta`` (``test_golden_chefer.py``,
  ``test_golden_gscorecam.py``, ``test_golden_gradcam.py``): :func:`build_meta_clip`,
  :func:`meta_clip_backend`, :func:`text_feature_trace`, :func:`meta_clip_golden`;
* the tiny OpenAI-style CLIP (``test_golden_sclip.py``, ``test_golden_clearclip.py``,
  ``test_golden_naclip.py``): :func:`golden_clip`, :func:`openai_tiny_golden` and its pieces;
* the tests' ``tiny_clip`` fixture model (``test_golden_atc.py``, ``test_golden_clustering.py``):
  :func:`tiny_clip_checksum`, :func:`tiny_clip_real_trace`;
* every family: :func:`load_golden`, :func:`load_npz`, :func:`run_method`, :func:`run_on_golden`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from explorer.core.jobs import CancelToken, run_sync
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec, TextEncoding

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden"


# -- every family ------------------------------------------------------------------------------------

def load_npz(path: Path) -> dict:
    """Every array of the golden ``.npz`` file at ``path``, read into memory."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def load_golden(name: str) -> tuple[dict, dict]:
    """``tests/golden/<name>``: its arrays and its ``meta`` (the JSON string stored in the file)."""
    data = load_npz(GOLDEN_DIR / name)
    return data, json.loads(str(data["meta"][0]))


def run_method(method_id: str, backend, trace, **params):
    """The result of ``method_id`` on ``trace`` through the plugin host (``params`` over the
    method's defaults), targeting the trace's own prompts."""
    from explorer.plugin_host.host import PluginHost

    host = PluginHost()
    p = host.make_params(method_id, params)
    return run_sync(host.run(method_id, trace, p, target=Target(prompts=trace.text.prompts), cancel=CancelToken(),
                             backend=backend))


def run_on_golden(method_id: str, golden: tuple, **params):
    """:func:`run_method` on the backend and trace of a ``(g, meta, backend, trace)`` golden fixture."""
    _, _, backend, trace = golden
    return run_method(method_id, backend, trace, **params)


# -- dense CLIP: CLIP Surgery, SegEarth-OV, GEM ------------------------------------------------------

DENSE_CHECKSUM_KEYS = ("visual.conv1.weight", "visual.transformer.resblocks.6.attn.in_proj_weight",
                       "token_embedding.weight", "visual.transformer.resblocks.6.ln_1.bias")


def build_dense_clip(folder: Path, config: dict):
    """The tiny model of the dense-CLIP golden files (``clip_surgery.npz``, ``segearth_ov.npz``,
    ``gem.npz``): ``make_tiny_clip`` seed 0 with the file's ``config`` (7 blocks, width 128, 2 heads),
    QuickGELU (OpenAI's activation, which CLIP Surgery's official classes use), every bias and
    LayerNorm parameter moved by a ``0.1 * randn`` seeded 1 (open_clip initialises them to 0 and 1).
    Returns ``(backend, checksum)``, the checksum being the sums of four weight tensors."""
    from safetensors.torch import load_file, save_file

    from explorer.backends.clip import ClipBackend
    from explorer.testing.tiny import make_tiny_clip

    spec = make_tiny_clip(folder, name="golden-dense-vit", seed=0, **config)
    cfg = Path(spec.config)
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "quick_gelu": True}, indent=2))
    sd = load_file(spec.weights)
    g = torch.Generator().manual_seed(1)
    for k in sorted(sd):
        if k.endswith(".bias") or (k.endswith(".weight") and k.split(".")[-2].startswith("ln_")):
            sd[k] = sd[k] + 0.1 * torch.randn(sd[k].shape, generator=g)
    save_file(sd, spec.weights)
    checksum = np.array([float(sd[k].double().sum()) for k in DENSE_CHECKSUM_KEYS])
    return ClipBackend.load(spec), checksum


def dense_clip_backend(folder: Path, golden: dict):
    """:func:`build_dense_clip` with the golden file's ``config`` (``make_tiny_clip``'s keyword
    arguments), its checksum asserted against the stored one (rtol 1e-9): a different init (another
    torch, another ``make_tiny_clip``) shows up there, not as a method mismatch."""
    config = json.loads(str(golden["config"][0]))
    be, checksum = build_dense_clip(folder, config)
    np.testing.assert_allclose(checksum, golden["checksum"], rtol=1e-9)
    return be


def dense_clip_trace(backend, golden: dict, capture: CaptureSpec | None = None):
    """A trace of the stored ``pixels (1, 3, 64, 64)`` (in place of the preprocessed seeded image
    ``random_image(64, 64, seed=3)``), capturing ``capture`` (default: everything), with the stored
    ``prompts`` encoded by the backend's default templates."""
    from explorer.testing.images import random_image

    if capture is None:
        capture = CaptureSpec.everything(backend.info.n_layers)
    prepared = dataclasses.replace(backend.prepare(random_image(64, 64, seed=3)),
                                   pixels=torch.from_numpy(golden["pixels"]))
    t = run_sync(backend.trace(prepared, capture))
    return t.with_text(backend.encode_text([str(p) for p in golden["prompts"]]))


# -- the tiny open_clip named by a golden file's meta: Chefer, gScoreCAM, Grad-CAM ---------------------

META_CHECKSUM_KEYS = ("visual.conv1.weight", "visual.transformer.resblocks.0.attn.in_proj_weight", "visual.proj",
                      "text_projection")


def build_meta_clip(folder: Path, meta: dict):
    """The tiny open_clip model of a golden file whose ``meta`` names it (``chefer_clip.npz``,
    ``gscorecam_clip.npz``, ``gradcam_albef.npz``): ``make_tiny_clip`` with ``meta``'s
    ``model_name``, ``seed`` and ``config``; ``meta["quick_gelu"]`` asks for QuickGELU, which has no
    weights (only the registered config changes). Loaded through the program's backend; returns
    ``(backend, checksum)``, the checksum being the sums of four weight tensors."""
    from safetensors.torch import load_file

    from explorer.backends.clip import ClipBackend
    from explorer.testing.tiny import make_tiny_clip

    spec = make_tiny_clip(folder, name=meta["model_name"], seed=meta["seed"], **meta["config"])
    if meta.get("quick_gelu"):
        cfg = json.loads(Path(spec.config).read_text())
        cfg["quick_gelu"] = True
        Path(spec.config).write_text(json.dumps(cfg, indent=2))
    state = load_file(spec.weights)
    checksum = np.array([float(state[k].double().sum()) for k in META_CHECKSUM_KEYS])
    return ClipBackend.load(spec), checksum


def meta_clip_backend(folder: Path, g: dict, meta: dict):
    """:func:`build_meta_clip`, its checksum asserted against the stored ``g["checksum"]`` (rtol 1e-6;
    a changed initialisation is reported as such)."""
    backend, checksum = build_meta_clip(folder, meta)
    np.testing.assert_allclose(checksum, g["checksum"], rtol=1e-6,
                               err_msg="the tiny CLIP's initialisation changed: rebuild the golden inputs")
    return backend


def unit_text_features(g: dict) -> np.ndarray:
    """The stored official ``text_features``, L2-normalised per prompt."""
    return g["text_features"] / np.linalg.norm(g["text_features"], axis=-1, keepdims=True)


def text_feature_trace(backend, image, g: dict, meta: dict):
    """A trace of ``image`` (``CaptureSpec()``) whose prompts are ``meta["prompts"]`` with the stored
    official text features (L2-normalised, float32) as their embeddings."""
    emb = unit_text_features(g)
    return run_sync(backend.trace(image, CaptureSpec())).with_text(
        TextEncoding(prompts=tuple(meta["prompts"]), embeddings=emb.astype(np.float32)))


def meta_clip_golden(folder: Path, name: str):
    """``(g, meta, backend, trace)`` of a golden file storing a 64x64 ``image`` and the model input
    the project makes of it (``pixels``, asserted to atol 1e-6): the checked :func:`meta_clip_backend`
    and the :func:`text_feature_trace` of that image (``chefer_clip.npz``, ``gscorecam_clip.npz``)."""
    from explorer.core.image_io import load_image
    from explorer.testing.images import png_bytes

    g, meta = load_golden(name)
    backend = meta_clip_backend(folder, g, meta)
    image = load_image(png_bytes(g["image"]))
    np.testing.assert_allclose(backend.prepare(image).pixels.numpy(), g["pixels"], rtol=0, atol=1e-6)
    return g, meta, backend, text_feature_trace(backend, image, g, meta)


# -- the tiny OpenAI-style CLIP: SCLIP, ClearCLIP, NACLIP -------------------------------------------

OPENAI_CHECKSUM_KEYS = ("visual.conv1.weight", "visual.transformer.resblocks.2.attn.in_proj_weight", "visual.proj",
                        "visual.transformer.resblocks.2.mlp.c_fc.weight")
PROMPTS = ("q0", "q1", "q2")


def golden_clip(folder: Path, seed: int = 7):
    """The tiny OpenAI-style CLIP of the SCLIP / ClearCLIP / NACLIP goldens: 64 px, 8 px patches,
    3 blocks of width 128 with 2 heads of 64 (OpenAI's ``build_model`` derives heads = width / 64),
    QuickGELU, text width 64 with 1 head, every weight rounded through float16 (``build_model``
    converts to fp16, so the official loader gets the same numbers). Returns ``(spec, state)``."""
    import open_clip
    from safetensors.torch import save_file

    from explorer.backends.specs import ClipSpec
    from explorer.testing.tiny import tiny_clip_config

    name = "golden-openai-tiny"
    cfg = tiny_clip_config(width=128, heads=2, text_width=64)
    cfg["quick_gelu"] = True
    cfg["text_cfg"]["heads"] = 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / f"{name}.json")
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    state = {k: (v.detach().half().float() if v.is_floating_point() else v.detach()).contiguous().clone()
             for k, v in model.state_dict().items()}
    save_file(state, str(folder / f"{name}.safetensors"))
    return ClipSpec(model=name, weights=str(folder / f"{name}.safetensors"), config=str(folder / f"{name}.json"),
                    device="cpu"), state


def golden_clip_backend(folder: Path):
    """:func:`golden_clip` (seed 7) loaded through the program's backend: ``(backend, state)``."""
    from explorer.backends.clip import ClipBackend

    spec, state = golden_clip(folder)
    return ClipBackend.load(spec), state


def assert_checksum(state, z) -> None:
    """The sums of four weight tensors of :func:`golden_clip`'s ``state`` equal the golden file's
    ``weight_checksum`` (rtol and atol 1e-6)."""
    sums = [float(state[k].double().sum()) for k in OPENAI_CHECKSUM_KEYS]
    np.testing.assert_allclose(sums, z["weight_checksum"], rtol=1e-6, atol=1e-6,
                               err_msg="the tiny model's initialisation changed (torch or open_clip): "
                                       "the golden file no longer describes this model")


def golden_trace(backend, z):
    """A trace of the stored pixels (the backend's own preprocessing of ``random_image(64, 64,
    seed=0)`` replaced by them, the last block's hidden state captured) with the stored query
    vectors as the prompts' (``q0``..``q2``) text embeddings."""
    from explorer.testing.images import random_image

    prepared = backend.prepare(random_image(64, 64, seed=0))
    prepared = dataclasses.replace(prepared, pixels=torch.from_numpy(z["pixels"]))
    L = backend.info.n_layers
    trace = run_sync(backend.trace(prepared, CaptureSpec(hidden_layers={L - 1})))
    return trace.with_text(TextEncoding(prompts=PROMPTS, embeddings=z["query"].astype(np.float32)))


def openai_tiny_golden(folder: Path, name: str):
    """``(z, meta, backend, trace)`` for the golden file ``name`` (``sclip.npz``, ``clearclip.npz``,
    ``naclip.npz``): :func:`golden_clip_backend` built in ``folder``, the file loaded, the weight
    checksum asserted, and :func:`golden_trace` of the file's pixels and queries."""
    backend, state = golden_clip_backend(folder)
    z, meta = load_golden(name)
    assert_checksum(state, z)
    return z, meta, backend, golden_trace(backend, z)


def method_maps(method_id: str, trace, backend, **params) -> np.ndarray:
    """``(K, rows, cols)``: the plugin's cosine map of every prompt (``templates='none'``)."""
    seg = trace.layout.segments[0]
    out = []
    for i in range(len(trace.text.prompts)):
        r = run_method(method_id, backend, trace, **{"templates": "none", "prompt_index": i, **params})
        out.append(np.asarray(r.token_values).reshape(seg.rows, seg.cols))
    return np.stack(out)


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The official resize of the grid logits to the pixels (bilinear, ``align_corners=False``)."""
    return F.interpolate(torch.from_numpy(maps)[None], size=size, mode="bilinear", align_corners=False)[0].numpy()


# -- the tests' tiny_clip fixture model: ATC, K-Medoids, DPC-KNN ------------------------------------

TINY_CLIP_CHECK_KEYS = ["conv1.weight", "transformer.resblocks.1.attn.in_proj_weight",
                        "transformer.resblocks.0.mlp.c_fc.weight"]


def tiny_clip_checksum(tiny_clip) -> np.ndarray:
    """The sums of three image-tower weight tensors of the ``tiny_clip`` fixture's backend
    (``make_tiny_clip(folder, seed=0)``), as stored in ``real_checksum`` of ``atc.npz``,
    ``kmedoids.npz`` and ``dpcknn.npz``."""
    sd = tiny_clip.model.visual.state_dict()
    return np.array([float(sd[k].double().sum()) for k in TINY_CLIP_CHECK_KEYS])


def tiny_clip_real_trace(tiny_clip):
    """The ``tiny_clip`` trace (everything captured) of the seeded image the real-token cases were
    made from: a 64x80 RGB image of ``np.random.default_rng(11)`` integers."""
    from explorer.core.image_io import load_image
    from explorer.testing.images import png_bytes

    image = load_image(png_bytes(np.random.default_rng(11).integers(0, 256, (64, 80, 3), dtype=np.uint8)))
    return run_sync(tiny_clip.trace(image, CaptureSpec.everything(tiny_clip.info.n_layers)))
