"""The offline demo SAM: a small Segment Anything model trained from scratch on synthetic scenes.

The model is the library's own :class:`segment_anything.modeling.Sam` (Kirillov et al.,
*Segment Anything*, ICCV 2023), built small by :func:`explorer.backends.sam_build.build_sam`
from :func:`demo_sam_config`, trained on :mod:`explorer.demo.scenes` and exported as
``<out>/demo-sam/`` (``sam_config.json`` + ``model.safetensors``), which
:func:`explorer.backends.sam_build.load_sam` loads and :class:`segment_anything.SamPredictor`
drives exactly like an official checkpoint.

Training recipe (SAM's, scaled down)
------------------------------------
* Images: one scene per step, of varied size and aspect ratio (long side 160-400 px, aspect
  up to 2:1, 1-4 objects), preprocessed exactly as ``SamPredictor.set_image`` does:
  ``ResizeLongestSide(img_size)`` (PIL resize through torchvision), normalisation with
  ``pixel_mean``/``pixel_std``, zero padding at the bottom/right to ``img_size x img_size``.
* Prompts per image, each aimed at one object's *visible* mask (every object gets one before
  any gets two): ``point_prompts`` single positive points at random interior pixels with the
  multimask output (the loss is the minimum over the 3 masks, as in SAM); then either
  ``box_prompts`` boxes (the tight box, each side jittered by up to ``box_jitter`` of the box
  size) or ``multi_point_prompts`` point sets (1 positive interior point plus 1-3 positive or
  negative points, negatives on other objects or the background), both with the single-mask
  output.
* Loss per mask: ``bce_weight * BCE + dice_weight * Dice`` on the low-resolution logits
  (``4 x`` the embedding grid, the frame ``Sam.postprocess_masks`` upsamples bilinearly) against
  the object's mask resized to the input frame and area-averaged to that grid (a soft,
  anti-aliased target, zero in the padding), plus ``iou_weight * MSE`` between the IoU head and
  the actual IoU of each binarised mask, so the scores ``SamPredictor.predict`` returns rank
  the 3 masks.
* AdamW (no decay on biases, norms, position tables, embeddings), linear warm-up then cosine
  decay over the time budget (or over ``max_steps`` when given), gradient clipping. Seeded and
  resumable (:class:`~explorer.demo.training.ResumableRun`): the data stream is indexed by step,
  so a resumed run sees the scenes an uninterrupted run would.

Why so small a decoder: trained from scratch, SAM first learns a prompt-independent answer
(all objects, whatever the click); the prompt pathway of the two-way transformer has to
"switch on" later. With a 64-wide decoder and a peak LR of 1e-3 that happened after roughly
800-1000 steps in every trial; a 96- or 128-wide decoder (or LR 2e-3) stayed stuck for
thousands of steps. The encoder can be wider than the decoder (the neck maps it to 64).

Training scenes use base seed ``settings.seed``; :func:`evaluate` uses ``2_000_003``
(disjoint streams of :func:`~explorer.demo.scenes.scene_seed`).

Coordinate conventions
----------------------
SAM point prompts are ``(x, y)`` in pixels of the *original* image, where the integer point
``(c, r)`` denotes the pixel in column ``c``, row ``r`` (SAM's prompt encoder adds 0.5 to
reach its centre); a point of the project's continuous convention (pixel centres at
``c + 0.5``) is passed as ``(x - 0.5, y - 0.5)``. Boxes are ``(x0, y0, x1, y1)`` in the same
pixel-index coordinates. Images are ``(H, W, 3) uint8`` RGB, masks ``(H, W) bool``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from explorer.backends.sam_build import build_sam, load_sam, save_sam, sam_config
from explorer.core.resources import demo_model_dir

from .scenes import Scene, make_scene, scene_seed
from .training import ResumableRun, TrainSettings, cosine_lr, seed_everything

log = logging.getLogger(__name__)

__all__ = [
    "EVAL_SEED",
    "SCENE_KWARGS",
    "Recipe",
    "demo_sam_config",
    "scene_size",
    "sample_scene",
    "interior_pixels",
    "train",
    "evaluate",
]

#: Base seed of the evaluation scenes (training uses ``settings.seed``, small integers).
EVAL_SEED = 2_000_003

#: Keyword arguments of :func:`~explorer.demo.scenes.make_scene` for training and evaluation.
SCENE_KWARGS: dict[str, Any] = {"n_objects": (1, 4)}

#: Range of the long side of the scenes, in pixels, and the largest aspect ratio.
LONG_SIDE = (160, 400)
MAX_ASPECT = 2.0

_RUN_NAME = "sam"
_FOLDER = "demo-sam"


def demo_sam_config(**overrides: Any) -> dict[str, Any]:
    """The demo architecture as a :func:`~explorer.backends.sam_build.sam_config` dict.

    256 px input, 16 px patches (16 x 16 embedding, 64 x 64 low-resolution masks), a 4-block
    ViT of width 128 (4 heads) with 8 x 8 windows in blocks 0 and 2 and global attention in
    blocks 1 and 3, a 64-channel image embedding, prompt encoder and two-way decoder (2 layers,
    2 heads, MLP 256). About 1.2 M parameters (4.7 MB in float32). Keyword arguments override
    :func:`~explorer.backends.sam_build.sam_config`'s parameters.
    """
    params: dict[str, Any] = dict(
        img_size=256,
        patch_size=16,
        embed_dim=128,
        depth=4,
        num_heads=4,
        window_size=8,
        global_attn_indexes=(1, 3),
        mlp_ratio=4.0,
        prompt_embed_dim=64,
        mask_in_chans=16,
        decoder_depth=2,
        decoder_mlp_dim=256,
        decoder_num_heads=2,
        iou_head_depth=3,
        iou_head_hidden_dim=64,
    )
    params.update(overrides)
    return sam_config(**params)


@dataclass
class Recipe:
    """Training hyper-parameters (``settings.extra["recipe"]`` overrides them by name)."""

    images_per_step: int = 1
    point_prompts: int = 6  #: single positive point, multimask, per image
    box_prompts: int = 2  #: boxes, single mask, per image (see ``alternate_secondary``)
    multi_point_prompts: int = 2  #: point sets, single mask, per image (see ``alternate_secondary``)
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    lr_floor: float = 0.05
    grad_clip: float = 1.0
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    box_jitter: float = 0.1  #: max shift of each box side, as a fraction of the box side
    loss_size: int = 0  #: side of the frame the loss is computed in (0: the low-res logits)
    alternate_secondary: bool = True  #: per image either the box or the multi-point group (not both)

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> "Recipe":
        given = dict(extra.get("recipe", {}))
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - names)
        if unknown:
            raise ValueError(f"unknown SAM recipe options: {', '.join(unknown)}")
        return cls(**given)


# ----------------------------------------------------------------------------- data


def scene_size(seed: int) -> tuple[int, int]:
    """``(H, W)`` of the scene with :func:`~explorer.demo.scenes.make_scene` seed ``seed``.

    Long side uniform in :data:`LONG_SIDE`, aspect ratio log-uniform up to :data:`MAX_ASPECT`,
    portrait or landscape; drawn from its own stream so it does not disturb the scene itself.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5A3]))
    long = int(rng.integers(LONG_SIDE[0], LONG_SIDE[1] + 1))
    aspect = math.exp(rng.uniform(0.0, math.log(MAX_ASPECT)))
    short = max(48, int(round(long / aspect)))
    return (long, short) if rng.random() < 0.5 else (short, long)


def sample_scene(base_seed: int, index: int) -> Scene:
    """Scene ``index`` of the stream ``base_seed`` (seed :func:`scene_seed`, size :func:`scene_size`)."""
    s = scene_seed(base_seed, index)
    return make_scene(s, size=scene_size(s), **SCENE_KWARGS)


def interior_pixels(mask: np.ndarray) -> np.ndarray:
    """``(K, 2)`` int ``(row, col)`` of the pixels of ``mask`` whose 4 neighbours are all in it.

    Falls back to every pixel of ``mask`` when the eroded mask is empty (thin objects).
    """
    m = np.asarray(mask, dtype=bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    inner[0, :] = inner[-1, :] = False
    inner[:, 0] = inner[:, -1] = False
    rc = np.argwhere(inner)
    return rc if len(rc) else np.argwhere(m)


def _random_interior_point(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random interior pixel as a SAM point ``(x, y) = (col, row)``, float ``(2,)``."""
    rc = interior_pixels(mask)
    r, c = rc[int(rng.integers(len(rc)))]
    return np.array([c, r], dtype=np.float64)


@dataclass
class _Prepared:
    image: torch.Tensor  # (1, 3, S, S) normalised and padded, as Sam.preprocess returns
    input_size: tuple[int, int]  # (h, w) after ResizeLongestSide
    original_size: tuple[int, int]  # (H, W)
    targets: list[torch.Tensor]  # per object (S, S) float in [0, 1], input frame, padded
    masks: list[np.ndarray]  # per object (H, W) bool


def _prepare(model, scene: Scene, transform) -> _Prepared:
    """Preprocess ``scene`` exactly as ``SamPredictor.set_image`` and map its masks to the input frame."""
    from PIL import Image

    S = model.image_encoder.img_size
    H, W = scene.size
    img = transform.apply_image(scene.image)  # (h, w, 3) uint8
    h, w = img.shape[:2]
    x = torch.as_tensor(img).permute(2, 0, 1).contiguous()[None].float()
    x = model.preprocess(x)
    targets = []
    for obj in scene.objects:
        m = Image.fromarray(obj.mask.astype(np.float32)).resize((w, h), Image.BILINEAR)
        t = torch.zeros(S, S)
        t[:h, :w] = torch.from_numpy(np.array(m, dtype=np.float32)).clamp_(0.0, 1.0)
        targets.append(t)
    return _Prepared(x, (h, w), (H, W), targets, [o.mask for o in scene.objects])


def _box_prompt(mask_box: tuple[int, int, int, int], size: tuple[int, int], jitter: float,
                rng: np.random.Generator) -> np.ndarray:
    """Jittered ``(x0, y0, x1, y1)`` box in original pixel-index coordinates (SAM's convention)."""
    x0, y0, x1, y1 = mask_box
    H, W = size
    bw, bh = x1 - x0, y1 - y0
    x1, y1 = x1 - 1, y1 - 1  # exclusive ends -> last pixel index, as SAM's boxes
    d = rng.uniform(-jitter, jitter, size=4) * np.array([bw, bh, bw, bh])
    box = np.array([x0, y0, x1, y1], dtype=np.float64) + d
    box[[0, 2]] = np.clip(box[[0, 2]], 0, W - 1)
    box[[1, 3]] = np.clip(box[[1, 3]], 0, H - 1)
    return box


def _multi_points(prep: _Prepared, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """1 positive interior point of object ``k`` plus 1-3 positive / negative points."""
    mask = prep.masks[k]
    pts = [_random_interior_point(mask, rng)]
    labels = [1]
    H, W = prep.original_size
    for _ in range(int(rng.integers(1, 4))):
        if rng.random() < 0.5:
            pts.append(_random_interior_point(mask, rng))
            labels.append(1)
        else:
            others = [i for i in range(len(prep.masks)) if i != k]
            if others and rng.random() < 0.6:
                pts.append(_random_interior_point(prep.masks[others[int(rng.integers(len(others)))]], rng))
            else:  # a background pixel (anything outside the object)
                out = np.argwhere(~mask)
                r, c = out[int(rng.integers(len(out)))]
                pts.append(np.array([c, r], dtype=np.float64))
            labels.append(0)
    return np.stack(pts), np.array(labels)


# ----------------------------------------------------------------------------- losses


def _mask_losses(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-mask BCE, Dice and actual IoU.

    ``logits`` ``(N, M, S, S)``, ``target`` ``(N, S, S)`` in [0, 1]; returns three ``(N, M)``.
    """
    t = target[:, None].expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none").mean(dim=(2, 3))
    p = logits.sigmoid()
    inter = (p * t).sum(dim=(2, 3))
    dice = 1.0 - (2.0 * inter + 1.0) / (p.sum(dim=(2, 3)) + t.sum(dim=(2, 3)) + 1.0)
    with torch.no_grad():
        pb = logits > 0
        tb = t > 0.5
        i = (pb & tb).sum(dim=(2, 3)).float()
        u = (pb | tb).sum(dim=(2, 3)).float()
        iou = torch.where(u > 0, i / u.clamp(min=1.0), torch.ones_like(u))
    return bce, dice, iou


def _decode(model, emb: torch.Tensor, pe: torch.Tensor, points, boxes, multimask: bool, size: int):
    """Prompt encoder + mask decoder; logits ``(N, M, size, size)`` (bilinear, as
    ``Sam.postprocess_masks``, when ``size`` differs from the low-res side) and IoU ``(N, M)``."""
    sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=None)
    low, iou_pred = model.mask_decoder(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                                       dense_prompt_embeddings=dense, multimask_output=multimask)
    if low.shape[-1] != size:
        low = F.interpolate(low, (size, size), mode="bilinear", align_corners=False)
    return low, iou_pred


def _loss_targets(prep: _Prepared, size: int) -> list[torch.Tensor]:
    """Per object ``(size, size)`` soft targets: the input-frame targets area-averaged."""
    S = prep.image.shape[-1]
    if size == S:
        return prep.targets
    t = torch.stack(prep.targets)[:, None]
    if S % size == 0:
        t = F.avg_pool2d(t, S // size)
    else:
        t = F.interpolate(t, (size, size), mode="area")
    return list(t[:, 0])


def _image_loss(model, prep: _Prepared, recipe: Recipe, transform,
                rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
    """Encode one prepared image and return its prompt losses (sum of per-group means)."""
    S = recipe.loss_size or model.prompt_encoder.mask_input_size[0]
    targets = _loss_targets(prep, S)
    emb = model.image_encoder(prep.image)  # (1, C, g, g)
    pe = model.prompt_encoder.get_dense_pe()
    n_obj = len(prep.masks)
    total = emb.new_zeros(())
    stats: dict[str, float] = {}

    def pick(k: int) -> np.ndarray:
        # cover every object first, then draw at random
        idx = list(rng.permutation(n_obj))
        while len(idx) < k:
            idx.append(int(rng.integers(n_obj)))
        return np.array(idx[:k], dtype=int)

    def group_loss(logits, iou_pred, tgt, multimask: bool) -> torch.Tensor:
        bce, dice, iou = _mask_losses(logits, tgt)
        seg = recipe.bce_weight * bce + recipe.dice_weight * dice  # (N, M)
        if multimask:
            best = seg.argmin(dim=1)
            seg_l = seg.gather(1, best[:, None]).mean()
        else:
            seg_l = seg.mean()
        iou_l = F.mse_loss(iou_pred, iou)
        return seg_l + recipe.iou_weight * iou_l, iou

    orig = prep.original_size
    use_box, use_multi = recipe.box_prompts > 0, recipe.multi_point_prompts > 0
    if recipe.alternate_secondary and use_box and use_multi:
        use_box = bool(rng.random() < 0.5)
        use_multi = not use_box
    if recipe.point_prompts > 0:
        ks = pick(recipe.point_prompts)
        pts = np.stack([_random_interior_point(prep.masks[k], rng) for k in ks])[:, None, :]  # (N, 1, 2)
        coords = torch.as_tensor(transform.apply_coords(pts, orig), dtype=torch.float)
        labels = torch.ones(len(ks), 1, dtype=torch.int)
        logits, iou_pred = _decode(model, emb, pe, (coords, labels), None, True, S)
        tgt = torch.stack([targets[k] for k in ks])
        loss, iou = group_loss(logits, iou_pred, tgt, True)
        total = total + loss
        with torch.no_grad():
            chosen = iou.gather(1, iou_pred.argmax(dim=1, keepdim=True)).mean()
        stats["point_iou"] = float(chosen)
    if use_box:
        ks = pick(recipe.box_prompts)
        boxes = np.stack([_box_prompt(_mask_box(prep.masks[k]), orig, recipe.box_jitter, rng) for k in ks])
        b = torch.as_tensor(transform.apply_boxes(boxes, orig), dtype=torch.float)
        logits, iou_pred = _decode(model, emb, pe, None, b, False, S)
        loss, iou = group_loss(logits, iou_pred, torch.stack([targets[k] for k in ks]), False)
        total = total + loss
        stats["box_iou"] = float(iou.mean())
    if use_multi:
        ks = pick(recipe.multi_point_prompts)
        sets = [_multi_points(prep, int(k), rng) for k in ks]
        n = max(len(p) for p, _ in sets)
        pts = np.zeros((len(ks), n, 2))
        lab = -np.ones((len(ks), n), dtype=np.int64)  # -1: padding ("not a point")
        for i, (p, l) in enumerate(sets):
            pts[i, : len(p)] = p
            lab[i, : len(l)] = l
        coords = torch.as_tensor(transform.apply_coords(pts, orig), dtype=torch.float)
        logits, iou_pred = _decode(model, emb, pe, (coords, torch.as_tensor(lab, dtype=torch.int)), None, False, S)
        loss, iou = group_loss(logits, iou_pred, torch.stack([targets[k] for k in ks]), False)
        total = total + loss
        stats["multi_iou"] = float(iou.mean())
    return total, stats


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


# ----------------------------------------------------------------------------- training


def _init_weights(model) -> None:
    """From-scratch init: the library zero-initialises the absolute position embedding (it
    expects pretrained weights); give it small random values instead."""
    with torch.no_grad():
        if model.image_encoder.pos_embed is not None:
            torch.nn.init.trunc_normal_(model.image_encoder.pos_embed, std=0.02)


def _param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices and kernels only: not on biases, norms, position
    tables, relative positions, prompt / output-token embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "pos_embed" in name or "rel_pos" in name or id(p) in embeddings:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _progress(run: ResumableRun, settings: TrainSettings) -> float:
    """Fraction of the budget used: by steps when ``max_steps`` is set, else by time."""
    if settings.max_steps:
        return min(1.0, run.step / max(1, int(settings.max_steps)))
    return min(1.0, run.elapsed / max(1e-9, settings.minutes * 60.0))


def train(settings: TrainSettings) -> Path:
    """Train the demo SAM and export it to ``settings.out_dir / "demo-sam"``.

    Parameters
    ----------
    settings : TrainSettings
        ``seed`` (training scene stream and init), ``minutes`` (time budget, across resumes),
        ``max_steps`` (optional cap; also makes the LR schedule step-based), ``threads``,
        ``resume``, ``log_every``, ``save_every``. ``extra["config"]`` overrides
        :func:`demo_sam_config` keys and ``extra["recipe"]`` :class:`Recipe` fields (an
        existing saved state must have been made with the same config).

    Returns
    -------
    Path
        The exported folder (``sam_config.json`` + ``model.safetensors``), loadable with
        :func:`explorer.backends.sam_build.load_sam`.

    Notes
    -----
    A run whose saved state already reached the budget is not repeated: its weights are only
    exported again. A larger budget (``minutes`` or ``max_steps``) continues it.
    """
    from segment_anything.utils.transforms import ResizeLongestSide

    if settings.threads:
        torch.set_num_threads(int(settings.threads))
    config = demo_sam_config(**dict(settings.extra.get("config", {})))
    recipe = Recipe.from_extra(settings.extra)
    seed_everything(settings.seed)
    model = build_sam(config)
    _init_weights(model)
    opt = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.999), foreach=True)
    run = ResumableRun(settings, _RUN_NAME, total_steps=10**12)
    try:
        run.restore(model, opt)
    except (RuntimeError, KeyError, ValueError) as exc:  # a state of another architecture / recipe
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"saved SAM training state {run.path} does not fit this config ({first}); "
                         f"start over with --fresh") from None
    transform = ResizeLongestSide(model.image_encoder.img_size)
    model.train()
    window: dict[str, list[float]] = {}
    t_last, cpu_last = time.perf_counter(), time.process_time()
    steps_at_last = run.step
    while not run.should_stop():
        p = _progress(run, settings)
        lr = cosine_lr(int(p * 10_000), 10_000, recipe.lr, warmup=0, floor=recipe.lr_floor)
        lr *= min(1.0, (run.step + 1) / max(1, recipe.warmup_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for b in range(recipe.images_per_step):
            index = run.step * recipe.images_per_step + b
            scene = sample_scene(settings.seed, index)
            rng = np.random.default_rng(np.random.SeedSequence([int(settings.seed), int(index), 1]))
            prep = _prepare(model, scene, transform)
            loss, stats = _image_loss(model, prep, recipe, transform, rng)
            (loss / recipe.images_per_step).backward()
            loss_sum += float(loss.detach())
            for k, v in stats.items():
                window.setdefault(k, []).append(v)
        if recipe.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        window.setdefault("loss", []).append(loss_sum / recipe.images_per_step)
        run.step += 1
        if run.step % max(1, settings.log_every) == 0:
            now, cpu = time.perf_counter(), time.process_time()
            n = run.step - steps_at_last
            sps, cpu_per_step = n / max(1e-9, now - t_last), (cpu - cpu_last) / max(1, n)
            t_last, cpu_last, steps_at_last = now, cpu, run.step
            run.log(lr=lr, steps_per_s=sps, cpu_s_per_step=cpu_per_step,
                    **{k: float(np.mean(v)) for k, v in window.items()})
            window = {}
        if run.step % max(1, settings.save_every) == 0:
            run.save(model, opt)
    run.save(model, opt, finished=True)
    model.eval()
    export = dict(config)
    export["training"] = {
        "steps": run.step,
        "seconds": round(run.elapsed, 1),
        "seed": int(settings.seed),
        "threads": settings.threads,
        "recipe": asdict(recipe),
        "data": {"scenes": "explorer.demo.scenes", "long_side": list(LONG_SIDE), "max_aspect": MAX_ASPECT,
                 **{k: list(v) if isinstance(v, tuple) else v for k, v in SCENE_KWARGS.items()}},
        "reference": "Kirillov et al., Segment Anything, ICCV 2023",
    }
    folder = save_sam(model, export, Path(settings.out_dir) / _FOLDER)
    log.info("demo SAM exported to %s after %d steps (%.0f s)", folder, run.step, run.elapsed)
    return folder


# ----------------------------------------------------------------------------- evaluation


def evaluate(model_dir: Path | None = None, n_scenes: int = 500, seed: int = EVAL_SEED,
             progress: Callable[[int, int], Any] | None = None) -> dict[str, float]:
    """Single-click mask quality through the program's path: ``load_sam`` + ``SamPredictor``.

    For each scene (:func:`sample_scene` ``(seed, i)``) ``set_image`` is called once; then for
    each object one positive point at a random interior pixel of its visible mask (a SAM point
    ``(x, y) = (col, row)`` in original pixels) is given to
    ``predict(point_coords, point_labels, multimask_output=True)`` and the mask with the highest
    predicted score is compared with the visible mask.

    Parameters
    ----------
    model_dir : Path, optional
        A demo-format folder; default :func:`explorer.core.resources.demo_model_dir` ``("sam")``.
    n_scenes : int
        Number of evaluation scenes.
    seed : int
        Base seed of the evaluation stream (disjoint from the training seeds).
    progress : callable, optional
        Called as ``progress(done, total)`` after each scene.

    Returns
    -------
    dict of str to float
        ``sam_point_iou`` (mean IoU over all objects), ``sam_point_iou_median``,
        ``sam_point_hit_50`` / ``sam_point_hit_75`` (fraction of objects with IoU >= 0.5 / 0.75),
        ``sam_oracle_iou`` (mean IoU of the best of the 3 masks: how much a perfect score head
        would add), ``sam_score_mae`` (mean |predicted score - IoU| of the chosen masks),
        ``n_scenes``, ``n_objects``, ``seconds_per_image`` (``set_image``) and
        ``seconds_per_prompt`` (``predict``).
    """
    from segment_anything import SamPredictor

    if n_scenes < 1:
        raise ValueError(f"n_scenes must be >= 1, got {n_scenes}")
    folder = Path(model_dir) if model_dir is not None else demo_model_dir("sam")
    model, _ = load_sam(folder)
    predictor = SamPredictor(model)
    ious, oracle, score_err = [], [], []
    t_img = t_pred = 0.0
    for i in range(int(n_scenes)):
        scene = sample_scene(seed, i)
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), i, 2]))
        t0 = time.perf_counter()
        predictor.set_image(scene.image)
        t_img += time.perf_counter() - t0
        for obj in scene.objects:
            point = _random_interior_point(obj.mask, rng)[None]
            t0 = time.perf_counter()
            masks, scores, _ = predictor.predict(point_coords=point, point_labels=np.array([1]),
                                                 multimask_output=True)
            t_pred += time.perf_counter() - t0
            per = [_iou(m, obj.mask) for m in masks]
            best = int(np.argmax(scores))
            ious.append(per[best])
            oracle.append(max(per))
            score_err.append(abs(float(scores[best]) - per[best]))
        if progress is not None:
            progress(i + 1, int(n_scenes))
    arr = np.asarray(ious)
    return {
        "sam_point_iou": float(arr.mean()),
        "sam_point_iou_median": float(np.median(arr)),
        "sam_point_hit_50": float((arr >= 0.5).mean()),
        "sam_point_hit_75": float((arr >= 0.75).mean()),
        "sam_oracle_iou": float(np.mean(oracle)),
        "sam_score_mae": float(np.mean(score_err)),
        "n_scenes": float(n_scenes),
        "n_objects": float(len(arr)),
        "seconds_per_image": t_img / n_scenes,
        "seconds_per_prompt": t_pred / max(1, len(arr)),
    }


def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    pred = np.asarray(pred, dtype=bool)
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0
