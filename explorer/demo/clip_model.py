"""The offline demo CLIP: a tiny open_clip ViT trained here on synthetic scenes.

New users without network see the program work with this model. It is a *plain* open_clip
model, saved and loaded exactly like a downloaded one::

    <out>/demo-clip/
        open_clip_config.json        {"model_cfg": {...}, "preprocess_cfg": {...}}
        open_clip_model.safetensors  the CLIP state dict
        tokenizer.json, tokenizer_config.json
                                     a word-level Hugging Face tokenizer (``hf_tokenizer_name``)
        demo_training.json           how it was trained (recipe, steps, seconds; informative)

so that ``open_clip.create_model_and_transforms("local-dir:<folder>")`` and
``open_clip.get_tokenizer("local-dir:<folder>")`` work offline, and so does
``ClipBackend.load(parse_model_spec("demo"))``.

Architecture (:func:`model_config`)
-----------------------------------
* Vision: open_clip's native ``VisionTransformer``, 96 x 96 input, 8 px patches (a 12 x 12 grid,
  sequence ``[CLS, patch(0, 0), patch(0, 1), ...]``), width 128, 5 blocks, 4 heads.
* Text: open_clip's causal text transformer over a word-level vocabulary built from
  :data:`explorer.demo.scenes.WORDS` plus ``"background"``; ids ``<pad>=0``, ``<unk>=1``, the
  words, ``<start>``, and ``<end>`` as the **largest** id, because open_clip's text pooling
  (``pool_type='argmax'``) takes the token at the largest id. Context length 32.
* Preprocessing: open_clip's validation transform (resize the shortest side to 96, bicubic,
  center crop 96 x 96, normalise with the OpenAI mean and std).

Training recipe (:func:`train`)
-------------------------------
Scenes are generated on the fly by :mod:`explorer.demo.scenes` at varied sizes and aspect ratios
and go through the model's own validation transform (:func:`explorer.backends.preprocess.
apply_with_geometry`, the code the program uses), so training sees what users' images become.
Three losses:

1. CLIP's symmetric contrastive loss (Radford et al., 2021, "Learning Transferable Visual Models
   From Natural Language Supervision") between the pooled image embedding and captions that name
   every visible object (scene captions), with all 35 single-object captions ("a red circle")
   always among the texts. A single-object caption of one object of a multi-object image is
   neither a positive nor a negative for that image (it is masked out).
2. A per-patch classification of the **MaskCLIP-form** patch features (Zhou, Loy & Dai, 2022,
   "Extract Free Dense Labels from CLIP": the last block rerun with identity attention, then
   ``ln_post`` and ``proj``) against the text embeddings of the 35 object captions and of
   ``"background"``, with soft targets: the fraction of each patch covered by each object's exact
   mask, resampled through the crop/resize geometry.
3. A "pointing" loss on the same features: for each object in the image, a softmax over the
   image's patches of the similarity with that object's caption, whose target is the patches
   whose central region the object covers. This is what the pointing game measures.

Losses 2 and 3 only shape the weights; the exported model is an ordinary CLIP. The run is seeded
(initialisation and data: batch ``k`` depends only on ``(seed, k)``), resumable
(:class:`~explorer.demo.training.ResumableRun`, state in ``work_dir/clip``) and time-boxed; the
learning rate follows a warm-up then a cosine decay over the *time* budget (or ``max_steps``).

Evaluation (:func:`evaluate`) goes through the program's own path (the :class:`Engine`,
``ClipBackend.trace``/``encode_text`` and the MaskCLIP plugin) on scenes from a base seed disjoint
from training.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .scenes import COLORS, SHAPES, WORDS, Scene, make_scene, object_phrase, scene_caption, scene_seed
from .training import ResumableRun, TrainSettings, cosine_lr, seed_everything

log = logging.getLogger(__name__)

__all__ = [
    "FOLDER_NAME",
    "PROMPTS",
    "BACKGROUND",
    "Recipe",
    "model_config",
    "vocabulary",
    "build_model",
    "save_tokenizer",
    "export_model",
    "maskclip_tokens",
    "make_batch",
    "train",
    "evaluate",
]

FOLDER_NAME = "demo-clip"
RUN_NAME = "clip"  # ResumableRun state lives in work_dir/clip (what `train --fresh` removes)
EVAL_SEED = 1_000_003

IMAGE_SIZE = 96
PATCH_SIZE = 8
GRID = IMAGE_SIZE // PATCH_SIZE  # 12 x 12 patches
CONTEXT_LENGTH = 32
VISION_WIDTH = 128
VISION_LAYERS = 5

#: The 35 single-object prompts, class ``k = color_index * len(SHAPES) + shape_index``.
PROMPTS: tuple[str, ...] = tuple(object_phrase(c, s) for c in COLORS for s in SHAPES)
#: The caption of the background class (class ``len(PROMPTS)`` of the dense losses).
BACKGROUND = "background"
N_CLASSES = len(PROMPTS) + 1
_CLASS_OF = {(c, s): i * len(SHAPES) + j for i, c in enumerate(COLORS) for j, s in enumerate(SHAPES)}

_PAD, _UNK, _START, _END = "<pad>", "<unk>", "<start>", "<end>"
_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OPENAI_DATASET_MEAN / STD
_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- configuration


@dataclass
class Recipe:
    """Training hyper-parameters; any field can be overridden through ``TrainSettings.extra``.

    Attributes
    ----------
    batch_size : int
        Images per step.
    lr, weight_decay, warmup_steps, lr_floor :
        AdamW and the schedule (linear warm-up, then cosine decay to ``lr_floor * lr`` over the
        time budget or ``max_steps``).
    w_contrastive, w_patch, w_point : float
        Weights of the three losses (module docstring).
    n_objects_p : tuple of float
        Probabilities of 1, 2, 3, 4 objects per training scene.
    short_side : (int, int)
        Range of the shorter side of training scenes (pixels).
    square_p : float
        Probability of a square scene; others have an aspect ratio in ``(1, max_aspect]``.
    max_aspect : float
    centre : int
        Side (model-input pixels) of the central region of a patch used by the pointing target.
    object_weight : float
        In the per-patch loss a patch weighs ``1 + object_weight * (fraction covered by objects)``.
    clip_grad : float
        Gradient norm clipping.
    sincos_init : float
        Scale of the 2-D sine-cosine initialisation of the patch position embeddings
        (:func:`build_model`).
    """

    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    lr_floor: float = 0.02
    w_contrastive: float = 1.0
    w_patch: float = 1.0
    w_point: float = 1.0
    w_text: float = 1.0
    w_heads: float = 0.0
    n_objects_p: tuple[float, float, float, float] = (0.5, 0.3, 0.12, 0.08)
    short_side: tuple[int, int] = (72, 200)
    square_p: float = 0.5
    max_aspect: float = 1.5
    centre: int = 4
    object_weight: float = 4.0
    sincos_init: float = 1.0
    prefetch: bool = True
    clip_grad: float = 1.0

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> "Recipe":
        """Defaults overridden by the matching keys of ``extra`` (others are ignored)."""
        names = {f.name for f in fields(cls)}
        given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (extra or {}).items() if k in names}
        return cls(**given)


def vocabulary() -> dict[str, int]:
    """Word-level vocabulary ``{token: id}``.

    ``<pad>`` is 0 and ``<unk>`` 1, then :data:`~explorer.demo.scenes.WORDS` and ``"background"``,
    then ``<start>`` and ``<end>``; ``<end>`` has the largest id so that open_clip's ``argmax``
    text pooling reads the end-of-text token.
    """
    vocab = {_PAD: 0, _UNK: 1}
    for w in (*WORDS, BACKGROUND):
        vocab.setdefault(w, len(vocab))
    vocab[_START] = len(vocab)
    vocab[_END] = len(vocab)
    return vocab


def model_config() -> dict[str, Any]:
    """The ``open_clip_config.json`` content: ``{"model_cfg": ..., "preprocess_cfg": ...}``."""
    vocab = vocabulary()
    return {
        "model_cfg": {
            "embed_dim": 128,
            "vision_cfg": {
                "image_size": IMAGE_SIZE,
                "patch_size": PATCH_SIZE,
                "width": VISION_WIDTH,
                "layers": VISION_LAYERS,
                "head_width": 32,
                "mlp_ratio": 4.0,
            },
            "text_cfg": {
                "context_length": CONTEXT_LENGTH,
                "vocab_size": len(vocab),
                "width": 128,
                "heads": 4,
                "layers": 3,
                "pad_id": vocab[_PAD],
                "pool_type": "argmax",
                "hf_tokenizer_name": "explorer-demo-clip-words",  # read from the folder itself
            },
        },
        "preprocess_cfg": {
            "size": IMAGE_SIZE,
            "mode": "RGB",
            "mean": list(_MEAN),
            "std": list(_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
            "fill_color": 0,
        },
    }


def build_model(seed: int | None = None, sincos_init: float = 1.0):
    """A randomly initialised open_clip ``CLIP`` of :func:`model_config` (seeded when given).

    The vision tower's (learnable) patch position embeddings start as ``sincos_init`` times a 2-D
    sine-cosine table (``open_clip.pos_embed.get_2d_sincos_pos_embed``) instead of noise, so that
    attention can use 2-D neighbourhoods from the first step; 0 keeps open_clip's random init.
    """
    from open_clip.model import CLIP
    from open_clip.pos_embed import get_2d_sincos_pos_embed

    if seed is not None:
        torch.manual_seed(seed)
    model = CLIP(**model_config()["model_cfg"])
    if sincos_init:
        pos = model.visual.positional_embedding
        table = torch.from_numpy(get_2d_sincos_pos_embed(pos.shape[1], GRID)).float()
        with torch.no_grad():
            pos[1:] = sincos_init * table
    return model


def _val_transform():
    """The validation transform open_clip builds from ``preprocess_cfg`` (what the program uses)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**model_config()["preprocess_cfg"]), is_train=False)


def save_tokenizer(folder: str | os.PathLike) -> None:
    """Write the Hugging Face tokenizer files (``tokenizer.json``, ``tokenizer_config.json``).

    Text is NFKC-normalised, lower-cased, punctuation becomes a space, words split on whitespace;
    unknown words map to ``<unk>``. Every sequence is ``<start> words... <end>`` padded with
    ``<pad>`` (open_clip's ``HFTokenizer`` pads to the context length and truncates before the end
    token).
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    tok = Tokenizer(models.WordLevel(vocab, unk_token=_UNK))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{_START} $A {_END}", special_tokens=[(_START, vocab[_START]), (_END, vocab[_END])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=_UNK, pad_token=_PAD, bos_token=_START, eos_token=_END,
        model_max_length=CONTEXT_LENGTH,
    )
    fast.save_pretrained(str(folder))


def _tokenizer(folder: Path):
    from open_clip.tokenizer import HFTokenizer

    return HFTokenizer(str(folder), context_length=CONTEXT_LENGTH)


def export_model(model, folder: str | os.PathLike, info: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a ``local-dir:`` open_clip folder (replacing ``folder`` atomically).

    Returns
    -------
    Path
        ``folder``.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "open_clip_config.json").write_text(json.dumps(model_config(), indent=2))
    state = {k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "open_clip_model.safetensors"))
    save_tokenizer(tmp)
    (tmp / "demo_training.json").write_text(json.dumps(info or {}, indent=2))
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)
    return folder


# ----------------------------------------------------------------------------- model pieces


def maskclip_tokens(model, x: torch.Tensor) -> torch.Tensor:
    """MaskCLIP-form features of every token (Zhou et al., 2022), differentiable.

    The last vision block is rerun from its input with the attention replaced by the identity
    (each token attends to itself, so the attention output is ``out_proj(v)``), then the MLP
    branch, ``ln_post`` and ``proj``: the same computation as the MaskCLIP plugin's
    ``dense_features``, batched and with gradients.

    Parameters
    ----------
    model : open_clip.model.CLIP
    x : torch.Tensor
        ``(B, N, D)`` input of the last vision block.

    Returns
    -------
    torch.Tensor
        ``(B, N, E)`` features, not normalised.
    """
    visual = model.visual
    block = visual.transformer.resblocks[-1]
    D = x.shape[-1]
    u = block.ln_1(x)
    v = F.linear(u, block.attn.in_proj_weight[2 * D:], block.attn.in_proj_bias[2 * D:])
    y = x + block.ls_1(F.linear(v, block.attn.out_proj.weight, block.attn.out_proj.bias))
    y = y + block.ls_2(block.mlp(block.ln_2(y)))
    return visual.ln_post(y) @ visual.proj


def _encode_images(model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pixels (B, 3, S, S)`` -> pooled image embeddings ``(B, E)`` and MaskCLIP-form patch
    features ``(B, P, E)`` (both L2-normalised; [CLS] dropped from the patches)."""
    visual = model.visual
    blocks = visual.transformer.resblocks
    x = visual._embeds(pixels)
    for block in blocks[:-1]:
        x = block(x)
    dense = maskclip_tokens(model, x)[:, 1:]
    # the pooled embedding only needs the [CLS] row of the last block (pool_type 'tok')
    last = blocks[-1]
    u = last.ln_1(x)
    cls = x[:, :1] + last.ls_1(last.attn(u[:, :1], u, u, need_weights=False)[0])
    cls = cls + last.ls_2(last.mlp(last.ln_2(cls)))
    pooled, _ = visual._pool(cls)
    image = pooled @ visual.proj
    return F.normalize(image, dim=-1), F.normalize(dense, dim=-1)


def _encode_texts(model, ids: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` on ``ids (T, L)`` with trailing padding columns dropped first.

    The text transformer is causal and pools at the end token, so the pooled output does not
    depend on the padding after it; dropping it only saves time. Returns ``(T, E)`` normalised.
    """
    n = int((ids != 0).sum(1).max())
    x = model.token_embedding(ids[:, :n]) + model.positional_embedding[:n]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x = x[torch.arange(x.shape[0]), ids[:, :n].argmax(dim=-1)]
    proj = model.text_projection
    x = proj(x) if isinstance(proj, torch.nn.Module) else x @ proj
    return F.normalize(x, dim=-1)


# ----------------------------------------------------------------------------- data


@dataclass
class Batch:
    """One training batch.

    Attributes
    ----------
    pixels : torch.Tensor
        ``(B, 3, S, S)`` model input (the validation transform of each scene).
    captions : list of str
        ``B`` captions naming every visible object.
    classes : list of tuple of int
        Per image, the classes (index into :data:`PROMPTS`) of its visible objects.
    patch_area : torch.Tensor
        ``(B, P, C)`` fraction of each patch (row-major ``P = 12 * 12``) covered by each class
        (``C = 36``: the 35 objects, then background); rows sum to 1.
    patch_centre : torch.Tensor
        ``(B, P, C)`` the same over the central ``centre x centre`` pixels of each patch.
    """

    pixels: torch.Tensor
    captions: list[str]
    classes: list[tuple[int, ...]]
    patch_area: torch.Tensor
    patch_centre: torch.Tensor


def _patch_fractions(labels: np.ndarray, centre: int) -> tuple[np.ndarray, np.ndarray]:
    """``labels (S, S)`` class ids on the model input -> ``(P, C)`` area and centre fractions."""
    S = labels.shape[0]
    g = S // PATCH_SIZE
    rows = np.arange(S) // PATCH_SIZE
    patch = (rows[:, None] * g + rows[None, :]).ravel()
    flat = labels.ravel()
    area = np.bincount(patch * N_CLASSES + flat, minlength=g * g * N_CLASSES).reshape(g * g, N_CLASSES)
    off = np.arange(S) % PATCH_SIZE
    lo = (PATCH_SIZE - centre) // 2
    inner = (off >= lo) & (off < lo + centre)
    keep = (inner[:, None] & inner[None, :]).ravel()
    cen = np.bincount(patch[keep] * N_CLASSES + flat[keep], minlength=g * g * N_CLASSES).reshape(g * g, N_CLASSES)
    return area / area.sum(1, keepdims=True), cen / cen.sum(1, keepdims=True)


def _scene_sample(scene: Scene, transform, centre: int):
    """Model input and targets of one scene, or ``None`` when the center crop cuts an object.

    The frame pixel centres of the model input are mapped back to the original image through the
    preprocessing geometry and read the scene's instance map there (nearest pixel).
    """
    from PIL import Image

    from explorer.backends.preprocess import apply_with_geometry

    pixels, geo = apply_with_geometry(transform, Image.fromarray(scene.image))
    H, W = scene.size
    S = IMAGE_SIZE
    fc = np.arange(S) + 0.5
    ox, oy = geo.to_original(fc, fc)
    cols = np.clip(np.floor(ox).astype(np.int64), 0, W - 1)
    rows = np.clip(np.floor(oy).astype(np.int64), 0, H - 1)
    # which original pixels the crop keeps (their centres land inside the frame)
    fx, fy = geo.to_frame(np.arange(W) + 0.5, np.arange(H) + 0.5)
    kept = ((fy >= 0) & (fy < S))[:, None] & ((fx >= 0) & (fx < S))[None, :]
    lut = np.full(len(scene.objects) + 1, N_CLASSES - 1, dtype=np.int64)
    visible = []
    for k, obj in enumerate(scene.objects, start=1):
        frac = float((obj.mask & kept).sum()) / float(obj.mask.sum())
        if 0.02 < frac < 0.75:
            return None  # partly cropped: the caption would be ambiguous
        if frac >= 0.75:
            visible.append(obj)
        lut[k] = _CLASS_OF[(obj.color, obj.shape)]
    if not visible:
        return None
    labels = lut[scene.instance_map.astype(np.int64)[rows[:, None], cols[None, :]]]
    area, cen = _patch_fractions(labels, centre)
    classes = tuple(_CLASS_OF[(o.color, o.shape)] for o in visible)
    return pixels, scene_caption(visible), classes, area, cen


def make_batch(seed: int, step: int, recipe: Recipe, transform=None) -> Batch:
    """The training batch of ``step``: depends only on ``(seed, step, recipe)``.

    Scene ``j`` uses :func:`~explorer.demo.scenes.make_scene` with the seed
    ``scene_seed(seed, step * 4096 + draw)`` (``draw`` counts the scenes drawn for this step,
    including rejected ones), at a random size: the shorter side in ``recipe.short_side``,
    square with probability ``recipe.square_p``, else an aspect ratio up to ``recipe.max_aspect``
    in either orientation. Scenes whose center crop would cut an object are redrawn.
    """
    transform = transform or _val_transform()
    rng = np.random.default_rng([int(seed), int(step), 17])
    p = np.asarray(recipe.n_objects_p, dtype=np.float64)
    p = p / p.sum()
    out = []
    draw = 0
    while len(out) < recipe.batch_size:
        short = int(rng.integers(recipe.short_side[0], recipe.short_side[1] + 1))
        tries = 0
        while True:
            if rng.random() < recipe.square_p or tries >= 8:
                size = (short, short)
            else:
                long = int(round(short * rng.uniform(1.05, recipe.max_aspect)))
                size = (short, long) if rng.random() < 0.5 else (long, short)
            n = int(rng.choice(len(p), p=p)) + 1
            scene = make_scene(scene_seed(seed, step * 4096 + draw), size=size, n_objects=n)
            draw += 1
            tries += 1
            sample = _scene_sample(scene, transform, recipe.centre)
            if sample is not None:
                out.append(sample)
                break
    pixels, captions, classes, area, cen = zip(*out)
    return Batch(
        pixels=torch.stack(list(pixels)),
        captions=list(captions),
        classes=list(classes),
        patch_area=torch.from_numpy(np.stack(area)).float(),
        patch_centre=torch.from_numpy(np.stack(cen)).float(),
    )


class _Prefetcher:
    """Makes the batches of steps ``start, start + 1, ...`` ahead of time in a daemon thread.

    Scene rendering is numpy and Pillow work, much of it outside the GIL, and torch releases the
    GIL in its kernels, so rendering the next batches overlaps with the current step. Batches are
    the same as :func:`make_batch` would give in the loop (they depend only on ``(seed, step)``).
    """

    def __init__(self, seed: int, start: int, recipe: Recipe, depth: int = 2) -> None:
        import queue
        import threading

        self._queue: "queue.Queue[tuple[int, Batch | BaseException]]" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(seed, start, recipe), daemon=True,
                                        name="demo-clip-batches")
        self._thread.start()

    def _work(self, seed: int, step: int, recipe: Recipe) -> None:
        import queue

        transform = _val_transform()
        while not self._stop.is_set():
            try:
                item: Batch | BaseException = make_batch(seed, step, recipe, transform)
            except BaseException as exc:  # noqa: BLE001 - handed to the training loop, re-raised there
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put((step, item), timeout=0.2)
                    break
                except queue.Full:
                    continue
            step += 1

    def get(self, step: int) -> Batch:
        """The batch of ``step`` (steps must be asked for in order)."""
        got, item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if got != step:
            raise RuntimeError(f"prefetched batch of step {got}, expected {step}")
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


# ----------------------------------------------------------------------------- losses


def _masked_ce(logits: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of rows of ``logits (R, K)`` against distributions ``target (R, K)``, with
    ``ignore (R, K)`` entries left out of the softmax; rows with no target mass are skipped."""
    logits = logits.masked_fill(ignore, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1).masked_fill(ignore, 0.0)
    mass = target.sum(-1)
    rows = mass > 0
    if not bool(rows.any()):
        return logits.new_zeros(())
    t = target[rows] / mass[rows, None]
    return -(t * logp[rows]).sum(-1).mean()


class _Trainer(torch.nn.Module):
    """The CLIP being trained plus training-only classifier heads (never exported).

    ``image_head (35, E)`` and ``patch_head (36, E)`` are free class prototypes for cosine
    classifiers on the pooled image embedding and on the MaskCLIP-form patch features. Unlike the
    text embeddings (which start nearly identical for captions that differ in one word), they are
    distinct from the first step, so the image tower gets a full-strength gradient for shape as
    well as colour.
    """

    def __init__(self, clip) -> None:
        super().__init__()
        self.clip = clip
        dim = int(clip.visual.output_dim)
        self.image_head = torch.nn.Parameter(torch.randn(len(PROMPTS), dim))
        self.patch_head = torch.nn.Parameter(torch.randn(N_CLASSES, dim))


_HEAD_SCALE = 16.0


def _losses(trainer: _Trainer, tokenizer, batch: Batch, object_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """The losses of one batch (module docstring, :class:`Recipe`); also returns ``"scale"``."""
    model = trainer.clip
    B = len(batch.captions)
    multi = sorted({c for c, k in zip(batch.captions, batch.classes) if len(k) > 1})
    texts = list(PROMPTS) + [BACKGROUND] + multi
    index = {t: i for i, t in enumerate(texts)}
    text = _encode_texts(model, tokenizer(texts))  # (T, E)
    image, dense = _encode_images(model, batch.pixels)  # (B, E), (B, P, E)
    scale = model.logit_scale.exp()

    # 1. contrastive (CLIP) with every object named; partial captions are masked out
    T = len(texts)
    pos = torch.zeros(B, T)
    ignore = torch.zeros(B, T, dtype=torch.bool)
    for b, (cap, cls) in enumerate(zip(batch.captions, batch.classes)):
        pos[b, index[cap]] = 1.0
        if len(cls) > 1:
            ignore[b, list(cls)] = True
    logits = scale * image @ text.T
    contrastive = 0.5 * (_masked_ce(logits, pos, ignore) + _masked_ce(logits.T, pos.T, ignore.T))

    # 2. per-patch classification of MaskCLIP-form features against the object captions + background
    classes = text[:N_CLASSES]  # (C, E)
    patch_logits = scale * dense @ classes.T  # (B, P, C)
    ce = -(batch.patch_area * torch.log_softmax(patch_logits, dim=-1)).sum(-1)  # (B, P)
    weight = 1.0 + object_weight * (1.0 - batch.patch_area[..., -1])  # patches on objects count more
    patch = (weight * ce).sum() / weight.sum()

    # 3. pointing: per present object, softmax over the image's patches
    present = torch.zeros(B, N_CLASSES, dtype=torch.bool)
    for b, cls in enumerate(batch.classes):
        present[b, list(cls)] = True
    target = batch.patch_centre.transpose(1, 2)  # (B, C, P)
    fallback = batch.patch_area.transpose(1, 2)
    target = torch.where(target.sum(-1, keepdim=True) > 0, target, fallback)
    point_logits = patch_logits.transpose(1, 2)[present]  # (n_present, P)
    point = _masked_ce(point_logits, target[present], torch.zeros_like(point_logits, dtype=torch.bool))
    # 4. keep the class captions apart: each of the 36 is closest to itself (see Recipe.w_text)
    text_sep = F.cross_entropy(scale * classes @ classes.T, torch.arange(N_CLASSES))
    # 5. training-only heads: the image names its objects, each patch its class
    present_obj = present[:, : len(PROMPTS)].float()
    head_logits = _HEAD_SCALE * image @ F.normalize(trainer.image_head, dim=-1).T  # (B, 35)
    image_head = _masked_ce(head_logits, present_obj, torch.zeros_like(head_logits, dtype=torch.bool))
    ph_logits = _HEAD_SCALE * dense @ F.normalize(trainer.patch_head, dim=-1).T  # (B, P, C)
    ce = -(batch.patch_area * torch.log_softmax(ph_logits, dim=-1)).sum(-1)
    patch_head = (weight * ce).sum() / weight.sum()
    return {"contrastive": contrastive, "patch": patch, "point": point, "text": text_sep,
            "image_head": image_head, "patch_head": patch_head, "scale": scale.detach()}


# ----------------------------------------------------------------------------- training


def _param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr(run: ResumableRun, recipe: Recipe, step: int) -> float:
    """The learning rate at ``step``: cosine decay to ``lr_floor * lr`` over the fraction of the
    budget used (the larger of elapsed time / ``minutes`` and step / ``max_steps``), times a
    linear warm-up that ends after ``warmup_steps`` steps or 10 % of the budget, whichever is first.
    """
    frac = run.elapsed / max(1e-9, run.settings.minutes * 60.0)
    if run.settings.max_steps:
        frac = max(frac, step / run.settings.max_steps)
    frac = min(1.0, frac)
    warm = min(1.0, max((step + 1) / max(1, recipe.warmup_steps), frac / 0.1))
    n = 10_000
    return warm * cosine_lr(int(frac * n), n, recipe.lr, warmup=0, floor=recipe.lr_floor)


def train(settings: TrainSettings) -> Path:
    """Train (or continue training) the demo CLIP and export it.

    Parameters
    ----------
    settings : TrainSettings
        ``out_dir`` receives ``demo-clip/``; ``work_dir/clip/state.pt`` holds the resumable state
        (saved every ``save_every`` steps, every 5 minutes and at the end); ``minutes`` and
        ``max_steps`` bound the run (both count across resumes); ``seed`` seeds the
        initialisation and the training scenes; ``extra`` may override :class:`Recipe` fields, and
        ``extra["session_minutes"]`` ends this call early (state saved) without changing the budget.

    Returns
    -------
    Path
        The exported folder ``settings.out_dir / "demo-clip"``. A run whose budget is already
        spent only re-exports the saved weights.
    """
    if settings.threads:
        torch.set_num_threads(int(settings.threads))
    recipe = Recipe.from_extra(settings.extra)
    seed_everything(settings.seed)
    model = build_model(settings.seed, recipe.sincos_init)
    trainer = _Trainer(model)
    trainer.train()
    optimizer = torch.optim.AdamW(_param_groups(trainer, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6)
    run = ResumableRun(settings, RUN_NAME, total_steps=10**9)
    run.restore(trainer, optimizer)
    tok_dir = run.dir / "tokenizer"
    save_tokenizer(tok_dir)
    tokenizer = _tokenizer(tok_dir)

    session_end = time.perf_counter() + 60.0 * float(settings.extra.get("session_minutes", math.inf))
    last_save = time.perf_counter()
    sums: dict[str, float] = {}
    n_sum, t_log, cpu_log = 0, time.perf_counter(), time.process_time()
    trained = False
    batches = _Prefetcher(settings.seed, run.step, recipe) if recipe.prefetch and not run.should_stop() else None
    transform = _val_transform()
    try:
        while not run.should_stop() and time.perf_counter() < session_end:
            trained = True
            lr = _lr(run, recipe, run.step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = batches.get(run.step) if batches else make_batch(settings.seed, run.step, recipe, transform)
            parts = _losses(trainer, tokenizer, batch, recipe.object_weight)
            loss = (recipe.w_contrastive * parts["contrastive"] + recipe.w_patch * parts["patch"]
                    + recipe.w_point * parts["point"] + recipe.w_text * parts["text"]
                    + recipe.w_heads * (parts["image_head"] + parts["patch_head"]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainer.parameters(), recipe.clip_grad)
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0.0, math.log(100.0))
            run.step += 1
            for k, v in {"loss": loss, **parts, "grad_norm": grad_norm}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n_sum += 1
            if run.step % max(1, settings.log_every) == 0 or run.should_stop():
                dt, cpu = time.perf_counter() - t_log, time.process_time() - cpu_log
                run.log(**{k: v / n_sum for k, v in sums.items()}, lr=lr, steps_per_s=n_sum / max(dt, 1e-9),
                        cpu_s_per_step=cpu / n_sum)
                sums, n_sum, t_log, cpu_log = {}, 0, time.perf_counter(), time.process_time()
            if run.step % max(1, settings.save_every) == 0 or time.perf_counter() - last_save > 300:
                run.save(trainer, optimizer)
                last_save = time.perf_counter()
    finally:
        if batches is not None:
            batches.close()
    if trained or not run.path.is_file():
        run.save(trainer, optimizer, finished=run.should_stop())
    model.eval()
    info = {
        "recipe": asdict(recipe),
        "seed": settings.seed,
        "steps": run.step,
        "seconds": round(run.elapsed if trained else run._seconds_at_start, 1),
        "threads": torch.get_num_threads(),
        "last_log": run.history[-1] if run.history else None,
    }
    folder = export_model(model, Path(settings.out_dir) / FOLDER_NAME, info)
    log.info("demo CLIP: %d steps, exported to %s", run.step, folder)
    return folder


# ----------------------------------------------------------------------------- evaluation

_EVAL_SIZES = ((224, 224), (160, 160), (128, 128), (300, 300))


def evaluate(
    model_dir: Path | None = None,
    n_scenes: int = 500,
    seed: int = EVAL_SEED,
    progress: Callable[[Any], None] | None = None,
) -> dict[str, float]:
    """Score a demo CLIP the way users see it: through the program's engine and plugins.

    The model is loaded with ``ClipBackend.load`` (``local-dir:model_dir``, or the shipped demo
    model ``parse_model_spec("demo")`` when ``model_dir`` is None). Scenes are square (so the
    center crop keeps every object), of sizes cycling through 224, 160, 128 and 300 pixels, and
    come from the base seed ``seed`` (training uses a different one).

    * ``clip_zero_shot_top1``: ``n_scenes`` single-object scenes; top-1 accuracy of the traced
      image embedding against the text embeddings of the 35 :data:`PROMPTS`.
    * ``clip_pointing_game``: ``n_scenes`` two-object scenes; for each object, the MaskCLIP
      similarity map (``similarity.maskclip`` run by the :class:`Engine`, cosine mode) of its
      caption, rasterised on the original image with ``layout.to_image(values, mode="bilinear")``;
      a hit when the argmax pixel lies inside the object's visible mask. The score is the hit
      rate over objects.

    Parameters
    ----------
    model_dir : Path or None
        A folder written by :func:`export_model`.
    n_scenes : int
        Scenes per metric.
    seed : int
        Base seed of the evaluation scenes.
    progress : callable or None
        Called with an :class:`explorer.core.jobs.Progress` after each scene.

    Returns
    -------
    dict of str to float
        ``{"clip_zero_shot_top1": ..., "clip_pointing_game": ...}``, each in ``[0, 1]``.
    """
    from explorer.backends.specs import ClipSpec, parse_model_spec
    from explorer.core.image_io import load_image
    from explorer.core.jobs import Progress, run_sync
    from explorer.core.target import Target
    from explorer.core.trace import CaptureSpec
    from explorer.plugin_host.engine import Engine
    from explorer.testing.images import png_bytes

    if n_scenes < 1:
        raise ValueError("n_scenes must be >= 1")
    spec = parse_model_spec("demo") if model_dir is None else ClipSpec(model=f"local-dir:{Path(model_dir)}", device="cpu")
    engine = Engine()
    backend = run_sync(engine.backend_job(spec))
    target = Target(prompts=PROMPTS)
    text = engine.text_encoding(backend, target.prompts).embeddings  # (35, E), normalised
    total = 2 * n_scenes

    correct = 0
    for i in range(n_scenes):
        scene = make_scene(scene_seed(seed, 2 * i), size=_EVAL_SIZES[i % len(_EVAL_SIZES)], n_objects=1)
        image = load_image(png_bytes(scene.image))
        trace = run_sync(backend.trace(image, CaptureSpec()))
        obj = scene.objects[0]
        correct += int(int(np.argmax(text @ trace.image_embedding)) == _CLASS_OF[(obj.color, obj.shape)])
        if progress is not None:
            progress(Progress((i + 1) / total, f"zero-shot {i + 1}/{n_scenes}"))

    hits = count = 0
    for i in range(n_scenes):
        scene = make_scene(scene_seed(seed, 2 * i + 1), size=_EVAL_SIZES[i % len(_EVAL_SIZES)], n_objects=2)
        image = load_image(png_bytes(scene.image))
        for obj in scene.objects:
            params = {"prompt_index": _CLASS_OF[(obj.color, obj.shape)], "mode": "cosine"}
            heat = run_sync(engine.run_job(spec, image, "similarity.maskclip", params, target))
            raster = heat.layout.to_image(heat.token_values, mode="bilinear")
            r, c = np.unravel_index(int(np.nanargmax(raster)), raster.shape)
            hits += int(obj.mask[r, c])
            count += 1
        if progress is not None:
            progress(Progress((n_scenes + i + 1) / total, f"pointing game {i + 1}/{n_scenes}"))
    return {"clip_zero_shot_top1": correct / n_scenes, "clip_pointing_game": hits / max(1, count)}
