"""The offline demo VLM: a tiny LLaVA (vision tower from the demo CLIP) trained to caption synthetic scenes.

The model is a real :class:`transformers.LlavaForConditionalGeneration` (the LLaVA
architecture of Liu et al., *Visual Instruction Tuning*, NeurIPS 2023, in its LLaVA-1.5 form:
a CLIP vision tower, a two-layer GELU MLP projector and a Llama decoder) shrunk so that it
trains on a laptop CPU in half an hour and ships in a few megabytes. It is saved with
``save_pretrained`` and loads offline through the library's own loaders
(``AutoProcessor.from_pretrained``, ``LlavaForConditionalGeneration.from_pretrained`` or
``AutoModelForImageTextToText.from_pretrained``), so the program's VLM backend treats it exactly
like a real LLaVA-1.5 checkpoint.

Architecture
------------
* Vision tower: ``CLIPVisionModel``, ``IMAGE_SIZE`` = 96 px input, ``PATCH_SIZE`` = 8 px
  patches, so a ``12 x 12`` patch grid plus one CLS token (145 tokens), 5 pre-LN blocks of width
  128 (4 heads of 32): the sizes of the demo CLIP's vision tower, which it starts from.
* Projector: LLaVA-1.5's ``Linear -> GELU -> Linear`` from the vision width to the text width.
* Language model: a Llama decoder (RMSNorm, SwiGLU, RoPE), 4 layers of width 128 (4 heads).
* Image tokens: the CLS token is dropped (``vision_feature_select_strategy="default"``) and the
  features of the last vision block are used (``vision_feature_layer=-1``), so every image gives
  exactly :data:`NUM_IMAGE_TOKENS` = 144 features, one per patch, in row-major order. The
  processor expands the single ``<image>`` placeholder into 144 contiguous ``<image>`` tokens
  (``config.image_seq_length`` = 144, ``config.image_token_index`` = the id of ``<image>``), the
  standard LLaVA-1.5 behaviour.

Preprocessing
-------------
A :class:`~transformers.CLIPImageProcessor` resizes every image (any size and aspect ratio)
straight to ``IMAGE_SIZE x IMAGE_SIZE`` with bicubic interpolation (a per-axis scale; no center
crop, so objects near the border of a wide or tall image are never cut off), then rescales and
normalises with the OpenAI CLIP mean/std. Patch ``(r, c)`` of the grid (image token ``12 r + c``)
therefore covers the rectangle ``[c W / 12, (c + 1) W / 12) x [r H / 12, (r + 1) H / 12)`` of an
``H x W`` original image. Training feeds the images through this very processor.

Tokenizer and prompts
---------------------
A word-level tokenizer (``tokenizers`` ``WordLevel`` model, whitespace split, wrapped in
``PreTrainedTokenizerFast``) over :data:`VOCAB`: the special tokens ``<pad>``, ``<s>``
(bos, prepended to every text), ``</s>`` (eos, ends every answer), ``<unk>``, ``<image>``, then
every caption word of :data:`explorer.demo.scenes.WORDS` and the prompt words. Decoding joins
words with single spaces. Two fixed prompts, one per task:

* :data:`CAPTION_PROMPT` ``"<image> describe the scene"`` -> the scene caption, e.g.
  ``"a red circle left of a blue square above an orange star"``;
* :data:`OBJECT_PROMPT` ``"<image> name the object"`` -> the caption of the single object a crop
  shows, e.g. ``"a red circle"`` (a crop may show pieces of neighbouring objects; this prompt asks
  for the central one only).

The model sees ``<s> <image> x 144 describe the scene`` and continues with the answer words and
``</s>``. The processor's chat template renders ``[{"role": "user", "content": [{"type":
"image"}, {"type": "text", "text": "describe the scene"}]}]`` to the same prompt string.

Training recipe
---------------
The vision tower starts from the trained demo CLIP (``Recipe.vision_init``, converted by
:func:`clip_visual_to_hf`; as LLaVA starts from a pretrained CLIP) and trains at
``Recipe.vision_lr_scale`` times the learning rate; the projector and the language model start
from random initialisation. Seeded and resumable through
:class:`~explorer.demo.training.ResumableRun`, time-boxed by ``settings.minutes``. Every step
renders fresh scenes (1-4 objects, sizes and aspect ratios from :func:`sample_scene_size`) with
seeds derived from ``(settings.seed, step, index)``, so a resumed run sees exactly the data an
uninterrupted run would. A batch mixes whole-scene examples (:data:`CAPTION_PROMPT`) and
single-object crop examples (:func:`~explorer.demo.scenes.object_crop` with random context,
:data:`OBJECT_PROMPT`) cut from the same rendered scenes; the share of crops falls from
:data:`CROP_SHARE_START` to :data:`CROP_SHARE_END` over the run (a curriculum: naming single
objects first). Teacher forcing on the answer in the caption order of the scene generator (left
to right or top to bottom); cross-entropy on the answer tokens and the final eos only (prompt and
image positions are masked with ``-100``), no label smoothing.

Shapes are what a small ViT learns slowest from a few caption words, so training adds an
auxiliary dense loss (not part of the exported model): two linear heads on the projected image
features (what the language model reads) classify every image token's colour and shape, with
exact labels from the scene masks (:func:`patch_targets`). AdamW with linear warm-up and cosine
decay driven by the fraction of the budget used (time, or steps when ``settings.max_steps`` is
given), gradient clipping at 1.

Evaluation (:func:`evaluate`) uses scenes from :data:`EVAL_SEED`; training draws from
``settings.seed`` through a different seed stream (:func:`_train_scene_seed`), so the two never
share a scene.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .scenes import COLORS, SHAPES, WORDS, Scene, make_scene, object_crop, object_crop_box, scene_seed
from .training import ResumableRun, TrainSettings, seed_everything

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SIZE",
    "PATCH_SIZE",
    "GRID_SIZE",
    "NUM_IMAGE_TOKENS",
    "IMAGE_TOKEN",
    "PAD_TOKEN",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "UNK_TOKEN",
    "CAPTION_PROMPT",
    "OBJECT_PROMPT",
    "PROMPT_WORDS",
    "VOCAB",
    "EVAL_SEED",
    "MODEL_FOLDER",
    "VLMArch",
    "Recipe",
    "build_tokenizer",
    "build_image_processor",
    "build_processor",
    "build_config",
    "build_model",
    "clip_visual_to_hf",
    "init_vision_from_clip",
    "sample_scene_size",
    "patch_targets",
    "encode_examples",
    "train",
    "export",
    "load",
    "generate_caption",
    "generate_captions",
    "names_all_objects",
    "evaluate",
]

#: Side of the square model input in pixels (the demo CLIP's input size).
IMAGE_SIZE = 96
#: Side of a vision patch in pixels (the demo CLIP's patch size).
PATCH_SIZE = 8
#: Patches per side: the image-token grid is ``GRID_SIZE x GRID_SIZE``.
GRID_SIZE = IMAGE_SIZE // PATCH_SIZE
#: Image tokens per image in ``input_ids`` (``config.image_seq_length``).
NUM_IMAGE_TOKENS = GRID_SIZE * GRID_SIZE

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN)

#: Prompt of the whole-scene task: the answer is the scene caption.
CAPTION_PROMPT = f"{IMAGE_TOKEN} describe the scene"
#: Prompt of the single-object task (crops): the answer is the object caption ``"a red circle"``.
OBJECT_PROMPT = f"{IMAGE_TOKEN} name the object"
#: Words of the prompts that are not caption words.
PROMPT_WORDS: tuple[str, ...] = ("describe", "the", "scene", "name", "object")
#: The whole vocabulary, in id order: special tokens, then the sorted words.
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + tuple(sorted(set(WORDS) | set(PROMPT_WORDS)))

#: Base seed of the evaluation scenes (training uses ``settings.seed`` in another seed stream).
EVAL_SEED = 3_000_017
#: Name of the exported folder under ``settings.out_dir``.
MODEL_FOLDER = "demo-vlm"
#: Name of the run under ``settings.work_dir`` (``python -m explorer.demo.train --only vlm``).
RUN_NAME = "vlm"

#: Share of crop (single-object) examples in a batch at the start and at the end of training.
CROP_SHARE_START = 0.6
CROP_SHARE_END = 0.3

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %} {% endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if not loop.first %} {% endif -%}"
    "{%- if item['type'] == 'image' -%}" + IMAGE_TOKEN + "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

_SCENE_STREAM = 1  # seed stream of the training scenes


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class VLMArch:
    """Sizes of the tiny LLaVA (defaults: ~2 M parameters, ~8 MB of float32 weights).

    The vision fields default to the demo CLIP's vision tower
    (:func:`explorer.demo.clip_model.model_config`), so that the tower can start from it
    (:func:`init_vision_from_clip`); ``vision_act`` is the activation of its MLPs (open_clip's
    default ``nn.GELU`` is transformers' ``"gelu"``).
    """

    image_size: int = IMAGE_SIZE
    patch_size: int = PATCH_SIZE
    vision_hidden: int = 128
    vision_layers: int = 5
    vision_heads: int = 4
    vision_mlp: int = 512
    vision_act: str = "gelu"
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_mlp: int = 384
    max_positions: int = 256


@dataclass(frozen=True)
class Recipe:
    """Optimisation settings of :func:`train` (override any field via ``settings.extra``)."""

    batch_size: int = 24
    lr: float = 1e-3
    warmup_steps: int = 100
    lr_floor: float = 0.05
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    crop_share_start: float = CROP_SHARE_START
    crop_share_end: float = CROP_SHARE_END
    crop_context: tuple[float, float] = (0.1, 0.45)
    object_count_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    min_side: int = 96
    max_side: int = 256
    max_aspect: float = 2.0
    aux_weight: float = 1.0
    aux_min_cover: float = 0.25
    aux_background_weight: float = 1.0
    vision_init: str = "demo-clip"
    vision_lr_scale: float = 0.3


def build_tokenizer():
    """The word-level tokenizer over :data:`VOCAB`.

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        Splits on whitespace (``<image>`` and the other special tokens are also recognised
        without spaces around them), maps unknown words to ``<unk>``, prepends ``<s>`` to every
        text, pads with ``<pad>`` and decodes by joining words with single spaces. The tokenizer
        has an ``image_token`` attribute (``"<image>"``) that :class:`~transformers.LlavaProcessor`
        reads.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos = vocab[BOS_TOKEN]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=VLMArch.max_positions,
        padding_side="left",
    )


def build_image_processor(image_size: int = IMAGE_SIZE):
    """CLIP preprocessing that resizes any image straight to ``image_size x image_size``.

    Returns
    -------
    transformers.CLIPImageProcessor
        Maps ``(H, W, 3) uint8`` RGB to ``(3, image_size, image_size) float32`` (bicubic resize
        per axis, no center crop, rescale to [0, 1], OpenAI CLIP mean/std normalisation).
    """
    from transformers import CLIPImageProcessor

    square = {"height": int(image_size), "width": int(image_size)}
    return CLIPImageProcessor(size=square, crop_size=square, do_center_crop=False)


def build_processor(arch: VLMArch | None = None):
    """The :class:`~transformers.LlavaProcessor` of the demo VLM.

    ``patch_size``, ``vision_feature_select_strategy="default"`` and
    ``num_additional_image_tokens=1`` make it expand ``<image>`` into
    ``(size // patch) ** 2 + 1 - 1`` = :data:`NUM_IMAGE_TOKENS` tokens, the number of features
    the model produces (the CLS feature is dropped).
    """
    from transformers import LlavaProcessor

    arch = arch or VLMArch()
    return LlavaProcessor(
        image_processor=build_image_processor(arch.image_size),
        tokenizer=build_tokenizer(),
        patch_size=arch.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def build_config(arch: VLMArch | None = None):
    """The :class:`~transformers.LlavaConfig` (CLIP vision tower + Llama text model)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    arch = arch or VLMArch()
    if arch.image_size % arch.patch_size:
        raise ValueError("image_size must be a multiple of patch_size")
    ids = {word: i for i, word in enumerate(VOCAB)}
    vision = CLIPVisionConfig(
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        hidden_size=arch.vision_hidden,
        intermediate_size=arch.vision_mlp,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.vision_heads,
        projection_dim=arch.vision_hidden,
        hidden_act=arch.vision_act,
    )
    text = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=arch.text_hidden,
        intermediate_size=arch.text_mlp,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        num_key_value_heads=arch.text_heads,
        max_position_embeddings=arch.max_positions,
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
        tie_word_embeddings=False,
    )
    grid = arch.image_size // arch.patch_size
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids[IMAGE_TOKEN],
        image_seq_length=grid * grid,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def build_model(arch: VLMArch | None = None, seed: int = 0):
    """A randomly initialised :class:`~transformers.LlavaForConditionalGeneration`."""
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(arch))
    ids = {word: i for i, word in enumerate(VOCAB)}
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
        do_sample=False,
        max_new_tokens=24,
    )
    return model


def clip_visual_to_hf(state: dict[str, torch.Tensor], prefix: str = "visual.") -> dict[str, torch.Tensor]:
    """Rename an open_clip ``VisionTransformer`` state dict to transformers' ``CLIPVisionModel``.

    Parameters
    ----------
    state : dict
        An open_clip ``CLIP`` state dict (keys ``visual.conv1.weight``,
        ``visual.transformer.resblocks.{i}.attn.in_proj_weight`` ...). Only the keys under
        ``prefix`` are read; the final ``ln_post``/``proj`` (the pooled embedding) and the text
        tower are not part of a LLaVA vision tower and are left out, except ``ln_post``, which
        becomes ``post_layernorm``.

    Returns
    -------
    dict
        Keys of ``CLIPVisionModel`` (``embeddings.patch_embedding.weight`` ...).
        The fused ``in_proj`` ``(3 D, D)`` of ``nn.MultiheadAttention`` is split into
        ``q_proj``, ``k_proj`` and ``v_proj`` (in that order). The two models then compute the
        same hidden states block by block (both are pre-LN ViTs with a class token, 2-D-free
        learned position embeddings and a LayerNorm before the first block).
    """
    src = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    out: dict[str, torch.Tensor] = {
        "embeddings.patch_embedding.weight": src["conv1.weight"],
        "embeddings.class_embedding": src["class_embedding"],
        "embeddings.position_embedding.weight": src["positional_embedding"],
    }
    for a, b in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        out[f"{b}.weight"] = src[f"{a}.weight"]
        out[f"{b}.bias"] = src[f"{a}.bias"]
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in src:
        s_, d = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        wq, wk, wv = src[s_ + "attn.in_proj_weight"].chunk(3, dim=0)
        bq, bk, bv = src[s_ + "attn.in_proj_bias"].chunk(3, dim=0)
        for name, w, b in (("q_proj", wq, bq), ("k_proj", wk, bk), ("v_proj", wv, bv)):
            out[d + f"self_attn.{name}.weight"] = w
            out[d + f"self_attn.{name}.bias"] = b
        pairs = (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                 ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))
        for a, b in pairs:
            out[d + f"{b}.weight"] = src[s_ + f"{a}.weight"]
            out[d + f"{b}.bias"] = src[s_ + f"{a}.bias"]
        i += 1
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def init_vision_from_clip(model, clip_dir: Path) -> None:
    """Start the VLM's vision tower from a trained demo CLIP (LLaVA starts from a pretrained CLIP).

    ``clip_dir`` is an exported demo-CLIP folder (``open_clip_model.safetensors``); its vision
    tower must have the sizes of the VLM's (:class:`VLMArch` defaults). Raises ``ValueError``
    naming the mismatch otherwise, ``FileNotFoundError`` when the folder has no weights.
    """
    from safetensors.torch import load_file

    weights = Path(clip_dir) / "open_clip_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"no demo CLIP weights at {weights}: train it first (python -m explorer.demo.train --only clip) "
            "or train the VLM's vision tower from scratch (extra vision_init='')"
        )
    tower = model.model.vision_tower
    state = clip_visual_to_hf(load_file(str(weights)))
    own = tower.state_dict()
    for k, v in state.items():
        if k not in own or own[k].shape != v.shape:
            raise ValueError(f"demo CLIP tower does not fit the VLM's: {k} {tuple(v.shape)} vs "
                             f"{None if k not in own else tuple(own[k].shape)}")
    missing, unexpected = tower.load_state_dict(state, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise ValueError(f"demo CLIP tower does not fit the VLM's: missing {missing}, unexpected {unexpected}")


# ----------------------------------------------------------------------------- data


def sample_scene_size(rng: np.random.Generator, min_side: int = 96, max_side: int = 256,
                      max_aspect: float = 2.0) -> tuple[int, int]:
    """Random scene size ``(H, W)``: a third square, the rest with aspect ratio up to ``max_aspect``.

    The shorter side is uniform in ``[min_side, max_side]``; the longer one is the shorter one
    times a log-uniform ratio in ``[1, max_aspect]`` (capped at ``2 * max_side``), on a random
    axis.
    """
    short = int(rng.integers(min_side, max_side + 1))
    if rng.random() < 1.0 / 3.0:
        return short, short
    ratio = math.exp(rng.uniform(0.0, math.log(max_aspect)))
    long = min(int(round(short * ratio)), 2 * max_side)
    return (short, long) if rng.random() < 0.5 else (long, short)


def _train_scene_seed(seed: int, stream: int, step: int, index: int) -> int:
    """Seed of training scene ``index`` of ``step`` (disjoint streams from :func:`scene_seed`)."""
    return int(np.random.SeedSequence([int(seed), 7919, int(stream), int(step), int(index)]).generate_state(1)[0])


def _eval_scene(seed: int, index: int) -> Scene:
    """Evaluation scene ``index``: size from :func:`sample_scene_size`, 1-4 objects."""
    s = scene_seed(seed, index)
    size = sample_scene_size(np.random.default_rng([s, 1]))
    return make_scene(s, size=size)


_COLOR_IDS = {c: i + 1 for i, c in enumerate(COLORS)}
_SHAPE_IDS = {s: i + 1 for i, s in enumerate(SHAPES)}


def patch_targets(instance_map: np.ndarray, scene: Scene, grid: int = GRID_SIZE,
                  min_cover: float = 0.25) -> np.ndarray:
    """Colour and shape class of every image token, for the auxiliary patch loss.

    Parameters
    ----------
    instance_map : np.ndarray
        ``(H, W) int`` instance ids of the image the model sees (0 = background, ``k`` =
        ``scene.objects[k - 1]``), e.g. :attr:`Scene.instance_map` or a crop of it.
    scene : Scene
        Provides the objects' colours and shapes.
    grid : int
        Tokens per side; pixel ``(i, j)`` falls in token ``(floor((i + .5) grid / H),
        floor((j + .5) grid / W))``, the per-axis resize of the processor.
    min_cover : float
        A token is labelled with the object covering most of its pixels when that object covers
        at least this fraction, else background; an object that labels no token this way labels
        the token holding most of its pixels.

    Returns
    -------
    np.ndarray
        ``(2, grid * grid) int64`` in row-major token order: row 0 the colour class (0 =
        background, ``1 + index`` in :data:`~explorer.demo.scenes.COLORS`), row 1 the shape class
        (0 = background, ``1 + index`` in :data:`~explorer.demo.scenes.SHAPES`).
    """
    H, W = instance_map.shape
    K = len(scene.objects) + 1
    rows = ((np.arange(H) + 0.5) * grid / H).astype(np.int64)
    cols = ((np.arange(W) + 0.5) * grid / W).astype(np.int64)
    code = (rows[:, None] * grid + cols[None, :]) * K + instance_map.astype(np.int64)
    counts = np.bincount(code.ravel(), minlength=grid * grid * K).reshape(grid * grid, K).astype(np.float64)
    frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    best = frac[:, 1:].argmax(axis=1)
    hit = frac[np.arange(grid * grid), best + 1] >= min_cover
    for k in range(K - 1):  # every object labels at least its peak token (small objects, rings)
        if counts[:, k + 1].any() and not np.any(hit & (best == k)):
            peak = int(counts[:, k + 1].argmax())
            best[peak], hit[peak] = k, True
    color_of = np.array([_COLOR_IDS[o.color] for o in scene.objects])
    shape_of = np.array([_SHAPE_IDS[o.shape] for o in scene.objects])
    out = np.zeros((2, grid * grid), dtype=np.int64)
    out[0, hit] = color_of[best[hit]]
    out[1, hit] = shape_of[best[hit]]
    return out


def _training_examples(seed: int, step: int, n_scene: int, n_crop: int, recipe: Recipe, grid: int = GRID_SIZE
                       ) -> tuple[list[np.ndarray], list[str], list[str], np.ndarray]:
    """Render one training batch (deterministic in the arguments).

    ``max(n_scene, n_crop)`` scenes are rendered; the first ``n_scene`` give whole-scene
    examples and the first ``n_crop`` give one crop example each (a random object, random
    context, mostly square), so rendering is shared between the two tasks.

    Returns
    -------
    images : list of np.ndarray
        ``n_scene`` whole scenes then ``n_crop`` crops, each ``(H_i, W_i, 3) uint8``.
    prompts, answers : list of str
        :data:`CAPTION_PROMPT` / scene caption, then :data:`OBJECT_PROMPT` / object caption.
    targets : np.ndarray
        ``(n_scene + n_crop, 2, grid * grid) int64`` from :func:`patch_targets`.
    """
    scenes = []
    for j in range(max(n_scene, n_crop)):
        s = _train_scene_seed(seed, _SCENE_STREAM, step, j)
        rng = np.random.default_rng([s, 1])
        size = sample_scene_size(rng, recipe.min_side, recipe.max_side, recipe.max_aspect)
        w = np.asarray(recipe.object_count_weights, dtype=np.float64)
        n_objects = 1 + int(rng.choice(len(w), p=w / w.sum()))
        scenes.append((make_scene(s, size=size, n_objects=n_objects), rng))
    images: list[np.ndarray] = []
    prompts: list[str] = []
    answers: list[str] = []
    targets: list[np.ndarray] = []
    for scene, _ in scenes[:n_scene]:
        images.append(scene.image)
        prompts.append(CAPTION_PROMPT)
        answers.append(scene.caption)
        targets.append(patch_targets(scene.instance_map, scene, grid, recipe.aux_min_cover))
    for scene, rng in scenes[:n_crop]:
        k = int(rng.integers(len(scene.objects)))
        context = float(rng.uniform(*recipe.crop_context))
        square = bool(rng.random() < 0.8)
        x0, y0, x1, y1 = object_crop_box(scene, k, context=context, square=square)
        images.append(object_crop(scene, k, context=context, square=square))
        prompts.append(OBJECT_PROMPT)
        answers.append(scene.objects[k].caption)
        targets.append(patch_targets(scene.instance_map[y0:y1, x0:x1], scene, grid, recipe.aux_min_cover))
    return images, prompts, answers, np.stack(targets)


def encode_examples(processor, images: Sequence[np.ndarray], prompts: Sequence[str],
                    answers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Model inputs and labels for teacher forcing.

    Parameters
    ----------
    processor : transformers.LlavaProcessor
        The demo processor (images are preprocessed exactly as at inference).
    images : sequence of np.ndarray
        ``B`` images, each ``(H_i, W_i, 3) uint8`` RGB of any size.
    prompts, answers : sequence of str
        ``B`` prompts (each with one ``<image>``) and answers (words of :data:`VOCAB`).

    Returns
    -------
    dict
        ``input_ids`` ``(B, L) int64``: ``<s>``, the expanded image tokens, the prompt words, the
        answer words and ``</s>``, right-padded with ``<pad>``; ``labels`` ``(B, L) int64``: the
        answer and ``</s>`` ids at their positions, ``-100`` elsewhere; ``attention_mask``
        ``(B, L) int64``; ``pixel_values`` ``(B, 3, S, S) float32``.
    """
    if not (len(images) == len(prompts) == len(answers)):
        raise ValueError("images, prompts and answers must have the same length")
    tok = processor.tokenizer
    enc = processor(images=list(images), text=list(prompts), return_tensors=None)
    eos = tok.eos_token_id
    rows: list[list[int]] = []
    labs: list[list[int]] = []
    for ids, answer in zip(enc["input_ids"], answers):
        ans = tok(answer, add_special_tokens=False)["input_ids"] + [eos]
        rows.append(list(ids) + ans)
        labs.append([-100] * len(ids) + ans)
    L = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), L), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), L), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labs)):
        input_ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(r)] = 1
    pixel_values = torch.as_tensor(np.asarray(enc["pixel_values"]), dtype=torch.float32)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "pixel_values": pixel_values}


# ----------------------------------------------------------------------------- training


def _recipe(settings: TrainSettings) -> Recipe:
    fields = Recipe.__dataclass_fields__
    over = {k: v for k, v in settings.extra.items() if k in fields}
    for key in ("betas", "crop_context", "object_count_weights"):
        if key in over:
            over[key] = tuple(over[key])
    return Recipe(**over)


def _arch(settings: TrainSettings) -> VLMArch:
    given = settings.extra.get("arch") or {}
    return VLMArch(**given)


class _Trainee(torch.nn.Module):
    """The VLM plus the auxiliary patch heads used only in training (not exported).

    The heads read the projected image features ``(B, N, D)`` (what the language model sees)
    and classify each token's colour and shape (:func:`patch_targets`): dense supervision that
    teaches the vision tower far faster than the few caption words alone.
    """

    def __init__(self, vlm) -> None:
        super().__init__()
        self.vlm = vlm
        dim = vlm.config.text_config.hidden_size
        self.aux_color = torch.nn.Linear(dim, len(COLORS) + 1)
        self.aux_shape = torch.nn.Linear(dim, len(SHAPES) + 1)
        self._features: torch.Tensor | None = None
        self._hook = vlm.model.multi_modal_projector.register_forward_hook(self._keep)

    def detach_hook(self) -> None:
        """Remove the feature hook from the VLM (before exporting it)."""
        self._hook.remove()

    def _keep(self, module, args, output) -> None:
        self._features = output

    def forward(self, batch: dict[str, torch.Tensor], targets: torch.Tensor | None, aux_weight: float,
                background_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(total loss, caption loss, auxiliary loss)`` (scalars).

        ``targets`` is ``(B, 2, N) int64`` (:func:`patch_targets`); background tokens count
        ``background_weight`` times as much as object tokens in the auxiliary loss.
        """
        self._features = None
        out = self.vlm(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], labels=batch["labels"])
        feats, self._features = self._features, None
        aux = out.loss.new_zeros(())
        if targets is not None and aux_weight > 0 and feats is not None:
            ce = torch.nn.functional.cross_entropy
            wc = feats.new_ones(self.aux_color.out_features)
            ws = feats.new_ones(self.aux_shape.out_features)
            wc[0] = ws[0] = background_weight
            aux = 0.5 * (ce(self.aux_color(feats).flatten(0, 1), targets[:, 0].flatten(), weight=wc)
                         + ce(self.aux_shape(feats).flatten(0, 1), targets[:, 1].flatten(), weight=ws))
        return out.loss + aux_weight * aux, out.loss.detach(), aux.detach()


def _optimizer(model: torch.nn.Module, recipe: Recipe, vision_scale: float = 1.0) -> torch.optim.Optimizer:
    """AdamW; the vision tower's groups carry ``lr_scale = vision_scale`` (a pretrained tower
    moves more slowly than the fresh projector and language model)."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (".vision_tower." in f".{name}", not (p.ndim < 2 or "embed" in name))
        groups.setdefault(key, []).append(p)
    params = [{"params": ps, "weight_decay": recipe.weight_decay if decay else 0.0,
               "lr_scale": vision_scale if vision else 1.0}
              for (vision, decay), ps in sorted(groups.items())]
    return torch.optim.AdamW(params, lr=recipe.lr, betas=recipe.betas)


def _progress(run: ResumableRun, settings: TrainSettings) -> float:
    """Fraction of the budget used, in [0, 1]: the larger of time and step fractions."""
    frac = run.elapsed / max(1e-9, settings.minutes * 60.0)
    if settings.max_steps:
        frac = max(frac, run.step / max(1, settings.max_steps))
    return float(min(1.0, max(0.0, frac)))


def _lr(step: int, progress: float, recipe: Recipe) -> float:
    warm = min(1.0, (step + 1) / max(1, recipe.warmup_steps))
    cos = recipe.lr_floor + (1.0 - recipe.lr_floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return recipe.lr * warm * cos


def train(settings: TrainSettings) -> Path:
    """Train the demo VLM (vision tower from the demo CLIP) and export it to ``settings.out_dir / "demo-vlm"``.

    Seeded by ``settings.seed``, resumable (state in ``settings.work_dir / "vlm"``), stops when
    ``settings.minutes`` of training time (counted across resumes) are used or after
    ``settings.max_steps`` steps. ``settings.extra`` may override :class:`Recipe` fields (e.g.
    ``{"batch_size": 16, "lr": 2e-3}``), the architecture (``{"arch": {"text_layers": 3}}``)
    and ``session_minutes`` (leave this session after that many minutes, saving the state, so
    that a long budget can be trained in several sittings). See the module docstring for the
    recipe.

    Returns
    -------
    pathlib.Path
        The exported folder (``config.json``, ``model.safetensors``, ``generation_config.json``,
        processor, tokenizer and chat template files).
    """
    recipe = _recipe(settings)
    arch = _arch(settings)
    if settings.threads:
        torch.set_num_threads(int(settings.threads))
    seed_everything(settings.seed)
    processor = build_processor(arch)
    model = build_model(arch, seed=settings.seed)
    vision_scale = 1.0
    if recipe.vision_init:
        clip_dir = Path(recipe.vision_init)
        if not clip_dir.is_absolute():
            clip_dir = Path(settings.out_dir) / clip_dir
        init_vision_from_clip(model, clip_dir)
        vision_scale = recipe.vision_lr_scale
        log.info("vlm: vision tower starts from %s", clip_dir)
    trainee = _Trainee(model)
    optimizer = _optimizer(trainee, recipe, vision_scale)
    grid = arch.image_size // arch.patch_size
    # total_steps only caps the run; the time budget normally ends it first.
    run = ResumableRun(settings, RUN_NAME, total_steps=10**9)
    run.restore(trainee, optimizer)
    session_limit = float(settings.extra.get("session_minutes") or 0.0) * 60.0
    t_session = time.perf_counter()
    trainee.train()
    if not run.finished:
        sums, n_loss, t_log, step_log = np.zeros(2), 0, time.perf_counter(), run.step
        while not run.should_stop():
            if session_limit and time.perf_counter() - t_session >= session_limit:
                run.save(trainee, optimizer, finished=False)
                log.info("vlm: session limit reached at step %d; resume to continue", run.step)
                break
            progress = _progress(run, settings)
            lr = _lr(run.step, progress, recipe)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            share = recipe.crop_share_start + (recipe.crop_share_end - recipe.crop_share_start) * progress
            n_crop = int(round(recipe.batch_size * share))
            images, prompts, answers, targets = _training_examples(
                settings.seed, run.step, recipe.batch_size - n_crop, n_crop, recipe, grid
            )
            batch = encode_examples(processor, images, prompts, answers)
            loss, caption_loss, aux_loss = trainee(batch, torch.from_numpy(targets), recipe.aux_weight,
                                                      recipe.aux_background_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainee.parameters(), recipe.grad_clip)
            optimizer.step()
            run.step += 1
            sums += (float(caption_loss), float(aux_loss))
            n_loss += 1
            if run.step % max(1, settings.log_every) == 0:
                now = time.perf_counter()
                run.log(loss=sums[0] / n_loss, aux_loss=sums[1] / n_loss, lr=lr, crop_share=share,
                        steps_per_s=(run.step - step_log) / max(1e-9, now - t_log))
                sums, n_loss, t_log, step_log = np.zeros(2), 0, now, run.step
            if run.step % max(1, settings.save_every) == 0:
                run.save(trainee, optimizer)
        else:
            run.save(trainee, optimizer, finished=True)
    trainee.detach_hook()
    model.eval()
    folder = Path(settings.out_dir) / MODEL_FOLDER
    export(model, processor, folder, info={"steps": run.step, "seconds": round(run.elapsed, 1),
                                            "seed": settings.seed, "finished": run.finished,
                                            "recipe": asdict(recipe), "arch": asdict(arch)})
    return folder


def export(model, processor, folder: Path, info: dict | None = None) -> Path:
    """Save model and processor with ``save_pretrained`` into ``folder`` (replaced atomically).

    Weights go to ``model.safetensors`` (float32). ``info`` (training facts) is written to
    ``training.json`` next to them.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if info is not None:
        (tmp / "training.json").write_text(json.dumps(info, indent=2, default=str))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


# ----------------------------------------------------------------------------- inference


def load(model_dir: Path | str | None = None):
    """Load ``(model, processor)`` from a folder with ``from_pretrained`` (offline).

    ``model_dir`` defaults to :func:`explorer.core.resources.demo_model_dir` ``("vlm")``.
    The model is returned in eval mode on the CPU.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if model_dir is None:
        from explorer.core.resources import demo_model_dir

        model_dir = demo_model_dir("vlm")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no demo VLM in {model_dir}")
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, local_files_only=True)
    model.eval()
    return model, processor


@torch.inference_mode()
def generate_captions(model, processor, images: Sequence[np.ndarray], prompt: str = CAPTION_PROMPT,
                      max_new_tokens: int = 24, batch_size: int = 32) -> list[str]:
    """Greedy answers for many images with one prompt.

    Parameters
    ----------
    images : sequence of np.ndarray
        ``(H_i, W_i, 3) uint8`` RGB images of any sizes.
    prompt : str
        A prompt with one ``<image>`` (:data:`CAPTION_PROMPT` or :data:`OBJECT_PROMPT`).

    Returns
    -------
    list of str
        The generated words up to (excluding) the first ``</s>``, joined by single spaces.
    """
    tok = processor.tokenizer
    out: list[str] = []
    for start in range(0, len(images), batch_size):
        chunk = [np.ascontiguousarray(im) for im in images[start : start + batch_size]]
        # one prompt for all images and a fixed number of image tokens: no padding is needed
        enc = processor(images=chunk, text=[prompt] * len(chunk), return_tensors="pt")
        gen = model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            pixel_values=enc["pixel_values"],
            max_new_tokens=int(max_new_tokens),
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        new = gen[:, enc["input_ids"].shape[1] :].tolist()
        for ids in new:
            if tok.eos_token_id in ids:
                ids = ids[: ids.index(tok.eos_token_id)]
            out.append(tok.decode(ids, skip_special_tokens=True).strip())
    return out


def generate_caption(model, processor, image: np.ndarray, max_new_tokens: int = 24,
                     prompt: str = CAPTION_PROMPT) -> str:
    """Greedy caption of one image.

    Parameters
    ----------
    model : transformers.LlavaForConditionalGeneration
    processor : transformers.LlavaProcessor
    image : np.ndarray
        ``(H, W, 3) uint8`` RGB, any size.
    max_new_tokens : int
        Most words to generate.
    prompt : str
        :data:`CAPTION_PROMPT` (whole scene) or :data:`OBJECT_PROMPT` (one object).

    Returns
    -------
    str
        Words of :data:`VOCAB` joined by single spaces (``"a red circle left of a blue square"``).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got {image.shape}")
    return generate_captions(model, processor, [image], prompt=prompt, max_new_tokens=max_new_tokens)[0]


def names_all_objects(caption: str, scene: Scene) -> bool:
    """True when every ``"color shape"`` phrase of ``scene``'s objects occurs in ``caption``."""
    padded = f" {' '.join(caption.split())} "
    return all(f" {obj.color} {obj.shape} " in padded for obj in scene.objects)


def evaluate(model_dir: Path | None = None, n_scenes: int = 500, seed: int = EVAL_SEED,
             progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Score the exported model on held-out scenes.

    Scene ``i`` is :func:`~explorer.demo.scenes.make_scene` with seed ``scene_seed(seed, i)``,
    default object settings (1-4 objects) and a size from :func:`sample_scene_size`; its crop
    example is :func:`~explorer.demo.scenes.object_crop` (default context, square) of object
    ``i % n_objects``.

    Parameters
    ----------
    model_dir : Path or None
        Folder saved by :func:`train` (default: the shipped ``demo-vlm``); loaded with
        ``from_pretrained`` as the program does.
    n_scenes : int
        Number of scenes (and crops).
    seed : int
        Base seed; the default :data:`EVAL_SEED` is disjoint from training.
    progress : callable or None
        Called as ``progress(done, total)`` after each batch.

    Returns
    -------
    dict
        ``vlm_crop_caption_exact``: fraction of crops whose caption (:data:`OBJECT_PROMPT`)
        equals the object caption; ``vlm_scene_names_all``: fraction of scenes whose caption
        (:data:`CAPTION_PROMPT`) names every object; ``vlm_scene_caption_exact``: fraction of
        scenes whose caption equals the scene caption. All in [0, 1].
    """
    n_scenes = int(n_scenes)
    if n_scenes < 1:
        raise ValueError("n_scenes must be >= 1")
    model, processor = load(model_dir)
    scenes = [_eval_scene(seed, i) for i in range(n_scenes)]
    crops = [object_crop(s, i % len(s.objects)) for i, s in enumerate(scenes)]
    crop_truth = [s.objects[i % len(s.objects)].caption for i, s in enumerate(scenes)]
    total = 2 * n_scenes
    done = 0
    batch = 50
    scene_caps: list[str] = []
    crop_caps: list[str] = []
    for start in range(0, n_scenes, batch):
        scene_caps += generate_captions(model, processor, [s.image for s in scenes[start : start + batch]],
                                        prompt=CAPTION_PROMPT, batch_size=batch)
        done += len(scenes[start : start + batch])
        if progress is not None:
            progress(done, total)
    for start in range(0, n_scenes, batch):
        crop_caps += generate_captions(model, processor, crops[start : start + batch], prompt=OBJECT_PROMPT,
                                       max_new_tokens=8, batch_size=batch)
        done += len(crops[start : start + batch])
        if progress is not None:
            progress(done, total)
    return {
        "vlm_crop_caption_exact": float(np.mean([c == t for c, t in zip(crop_caps, crop_truth)])),
        "vlm_scene_names_all": float(np.mean([names_all_objects(c, s) for c, s in zip(scene_caps, scenes)])),
        "vlm_scene_caption_exact": float(np.mean([c == s.caption for c, s in zip(scene_caps, scenes)])),
    }
