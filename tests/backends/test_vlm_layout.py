"""VLM token layouts checked against the real transformers processors and packing code.

For every family a tiny model config and a processor are built locally (a word-level tokenizer
made with ``tokenizers`` and wrapped in ``PreTrainedTokenizerFast`` with the special tokens the
family's processor needs, the family's own image processor with small sizes), saved with
``save_pretrained`` and loaded back with ``AutoProcessor`` / ``AutoConfig`` (the real loading
path). Then, for square, wide and tall images:

1. every image-token position of ``input_ids`` is a grid cell of the layout or one of its
   ``cls``/``newline`` specials, and the counts agree;
2. a one-hot token map painted with nearest sampling lights exactly the token's box, for a few
   tokens of every segment;
3. a bright marker painted on the original image inside one token's box (from the layout) shows
   up where the model reads that token from the processor's ``pixel_values``. Where a token comes
   from is worked out here without the layout code: from the positions of the image tokens in
   ``input_ids``, the shape of ``pixel_values`` and, for LLaVA-NeXT/OneVision, the model's own
   ``pack_image_features`` fed with features that encode their tile-canvas coordinates.

No network, no weights: models are built with ``from_config`` at a few thousand parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from explorer.backends.vlm_layout import FAMILIES, family_of, vlm_layout  # noqa: E402
from explorer.core.layout import Box, TokenLayout  # noqa: E402
from explorer.testing.tiny_vlm import BACKGROUND, MARK, VARIANTS, Variant  # noqa: E402

SHAPES = {"square": (72, 72), "wide": (60, 100), "tall": (130, 56), "very-wide": (40, 150)}

@dataclass
class Loaded:
    variant: Variant
    processor: Any
    config: Any

    @property
    def family(self) -> str:
        return self.variant.family

    @property
    def image_id(self) -> int:
        return int(self.config.image_token_id)

    def run(self, arr: np.ndarray):
        return self.processor(images=Image.fromarray(arr), text=self.variant.prompt, return_tensors="pt")

    def layout(self, arr: np.ndarray) -> tuple[TokenLayout, Any]:
        inputs = self.run(arr)
        return vlm_layout(self.family, self.processor, self.config, inputs, arr.shape[:2]), inputs


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Each variant saved with save_pretrained and loaded back with the Auto classes (lazily).

    ``SmolVLMProcessor.__init__`` refuses to run without the ``num2words`` package, which it only
    uses to spell the frame count of *videos*; when the package is missing, a stand-in is put in
    place while the processor is built and loaded (images never reach it).
    """
    import transformers.models.smolvlm.processing_smolvlm as smol_processing
    from transformers import AutoConfig, AutoProcessor

    cache: dict[str, Loaded] = {}

    def get(name: str) -> Loaded:
        if name not in cache:
            variant = VARIANTS[name]
            folder = tmp_path_factory.mktemp(name)
            with pytest.MonkeyPatch.context() as mp:
                if variant.family == "smolvlm" and not smol_processing.num2words:
                    mp.setattr(smol_processing, "num2words", str)
                proc, cfg = variant.build()
                proc.save_pretrained(folder)
                cfg.save_pretrained(folder)
                loaded_proc = AutoProcessor.from_pretrained(folder)
            cache[name] = Loaded(variant, loaded_proc, AutoConfig.from_pretrained(folder))
        return cache[name]

    return get


def flat_image(shape: tuple[int, int]) -> np.ndarray:
    return np.full(shape + (3,), BACKGROUND, np.uint8)


def pixels_in_box(box: Box, size) -> tuple[np.ndarray, np.ndarray]:
    """Pixels whose centres lie in ``box`` (independent of the layout code), and the pixels whose
    centres sit on an edge of the box (up to float rounding: a scale such as 96/150 puts a cell
    edge exactly on a pixel centre, and which side wins is then a matter of the last bit)."""
    H, W = size
    yc, xc = np.arange(H) + 0.5, np.arange(W) + 0.5
    inside = ((yc >= box.y0) & (yc < box.y1))[:, None] & ((xc >= box.x0) & (xc < box.x1))[None, :]
    tie_y = np.isclose(yc, box.y0, rtol=0, atol=1e-9) | np.isclose(yc, box.y1, rtol=0, atol=1e-9)
    tie_x = np.isclose(xc, box.x0, rtol=0, atol=1e-9) | np.isclose(xc, box.x1, rtol=0, atol=1e-9)
    return inside, tie_y[:, None] | tie_x[None, :]


def image_positions(inputs, image_id: int) -> np.ndarray:
    return np.nonzero(inputs["input_ids"][0].numpy() == image_id)[0]


def pick_cells(rows: int, cols: int) -> list[tuple[int, int]]:
    return sorted({(0, 0), (rows - 1, cols - 1), (rows // 2, cols // 2), (rows // 3, (2 * cols) // 3)})


def marker_image(layout: TokenLayout, seq: int) -> np.ndarray:
    """The flat image with the pixels of token ``seq``'s box painted bright."""
    H, W = layout.original_size
    arr = flat_image((H, W))
    _, box = layout.token_box(seq)
    rows, cols = box.pixel_slices((H, W))
    assert rows.stop > rows.start and cols.stop > cols.start, "the token's box holds no pixel"
    arr[rows, cols] = MARK
    return arr


def marker_tokens(layout: TokenLayout, seg, skip_first: bool = True) -> list[int]:
    """Sequence indices of a few tokens of ``seg`` whose boxes hold at least 2x2 image pixels
    (cells over padding, as in a pad-to-square frame, show nothing of the image)."""
    H, W = layout.original_size
    out = []
    cells = pick_cells(seg.rows, seg.cols)
    for r, c in cells[1:] if skip_first else cells:
        seq = seg.seq_start + r * seg.stride + c
        rows, cols = layout.token_box(seq)[1].pixel_slices((H, W))
        if rows.stop - rows.start >= 2 and cols.stop - cols.start >= 2:
            out.append(seq)
    assert out, f"no token of {seg.name} covers the image"
    return out


def block_means(img: np.ndarray, block: int) -> np.ndarray:
    """Mean of each ``block x block`` cell of a 2-D image whose sides are multiples of ``block``."""
    h, w = img.shape
    return img.reshape(h // block, block, w // block, block).mean((1, 3))


def argmax2(a: np.ndarray) -> tuple[int, ...]:
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(a)), a.shape))


# ----------------------------------------------------------------------------- 0. family and loading


def test_family_of_reads_model_type(loaded):
    from transformers import BertConfig

    for name in ("demo", "llava_next", "qwen2_5_vl", "smolvlm"):
        item = loaded(name)
        assert family_of(item.config) == item.family
    assert set(v.family for v in VARIANTS.values()) == set(FAMILIES)
    with pytest.raises(ValueError, match="no token layout"):
        family_of(BertConfig())


# ----------------------------------------------------------------------------- 1 + 2. counts and one-hot maps


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("name", list(VARIANTS))
def test_image_tokens_and_one_hot_maps(loaded, name, shape):
    item = loaded(name)
    H, W = SHAPES[shape]
    layout, inputs = item.layout(flat_image((H, W)))
    ids = inputs["input_ids"][0].numpy()
    assert layout.n_tokens == ids.size

    # 1. the image-token positions are exactly the grid cells plus the cls/newline features
    pos = image_positions(inputs, item.image_id)
    extra = [t.index for t in layout.special if t.kind in ("cls", "newline")]
    assert pos.size == layout.n_image_tokens + len(extra)
    np.testing.assert_array_equal(np.sort(np.concatenate([layout.image_token_indices(), extra])).astype(int), pos)
    assert all(ids[t.index] != item.image_id for t in layout.special if t.kind not in ("cls", "newline"))
    if item.family in ("llava_next", "llava_onevision"):
        tiles = layout.segment("tiles")
        assert sorted(extra) == list(tiles.extra_indices())  # one newline after each tile-grid row
        assert len(extra) == tiles.rows and tiles.stride == tiles.cols + 1

    # 2. one-hot maps land on their boxes, for a few tokens of every segment
    offsets = layout.segment_offsets()
    for seg, off in zip(layout.segments, offsets):
        lit_any = False
        for r, c in pick_cells(seg.rows, seg.cols):
            onehot = np.zeros(layout.n_image_tokens)
            onehot[off + r * seg.cols + c] = 1.0
            img = layout.to_image(onehot, mode="nearest", segments=[seg.name])
            seq = seg.seq_start + r * seg.stride + c
            name_, box = layout.token_box(seq)
            assert name_ == seg.name
            lit = np.nan_to_num(img) == 1.0
            expected, tie = pixels_in_box(box, (H, W))
            np.testing.assert_array_equal(lit[~tie], expected[~tie])
            assert tie.sum() <= 2 * (H + W)  # ties only along the box edges
            lit_any |= bool(lit.any())
        assert lit_any, f"segment {seg.name} lights no pixel"


# ----------------------------------------------------------------------------- 3. markers in the real preprocessing


def inside_image(layout: TokenLayout, seq: int) -> bool:
    H, W = layout.original_size
    box = layout.token_box(seq)[1]
    eps = 1e-6
    return box.x0 >= -eps and box.y0 >= -eps and box.x1 <= W + eps and box.y1 <= H + eps


def assert_marker_edges(diff: np.ndarray, cell: tuple[float, float, float, float], layout: TokenLayout, seq: int,
                        what: str, tol: float = 0.75):
    """The marker's edges in a view, to a fraction of a pixel.

    ``diff (h, w)`` is the marked minus the unmarked processed view; ``cell = (y0, x0, y1, x1)``
    the view-pixel rectangle that the model reads as token ``seq`` (worked out by the caller from
    the model's token order). The marker covers the whole pixels of the token's box, which differ
    from the exact box by under half an original pixel per edge; that difference, scaled to the
    view, is added to the expected edges. The half-height edges of the real (antialiased,
    bicubic/Lanczos) resampling must then land within ``tol`` view pixels.
    """
    H, W = layout.original_size
    box = layout.token_box(seq)[1]
    rows, cols = box.pixel_slices((H, W))
    sy, sx = (cell[2] - cell[0]) / box.height, (cell[3] - cell[1]) / box.width
    expected = np.array([
        cell[0] + (rows.start - box.y0) * sy, cell[1] + (cols.start - box.x0) * sx,
        cell[2] + (rows.stop - box.y1) * sy, cell[3] + (cols.stop - box.x1) * sx,
    ])
    mask = diff > diff.max() / 2
    ys, xs = np.nonzero(mask)
    got = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], dtype=float)
    assert np.all(np.abs(got - expected) <= tol), f"{what}: marker edges {got}, expected {expected.round(2)}"


def check_patch_marker(view: np.ndarray, flat_view: np.ndarray, patch: int, k: int, layout, seq, what: str):
    """``view``/``flat_view (3, h, w)``: the brightest ``patch`` cell is cell ``k`` in row-major
    order, and the marker's edges sit on that cell."""
    diff = view.mean(0) - flat_view.mean(0)
    means = block_means(diff, patch)
    r, c = divmod(k, means.shape[1])
    assert argmax2(means) == (r, c), what
    if inside_image(layout, seq):
        assert_marker_edges(diff, (r * patch, c * patch, (r + 1) * patch, (c + 1) * patch), layout, seq, what)


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("name", ["demo", "llava-crop", "llava-pad-full"])
def test_llava_marker(loaded, name, shape):
    """LLaVA: image token ``k`` (after a kept CLS) is CLIP patch ``k`` of ``pixel_values``,
    row-major (the conv patch embedding flattened)."""
    item = loaded(name)
    layout, flat = item.layout(flat_image(SHAPES[shape]))
    seg = layout.segments[0]
    patch = item.config.vision_config.patch_size
    cls = 1 if item.config.vision_feature_select_strategy == "full" else 0
    for seq in marker_tokens(layout, seg):
        marked = item.run(marker_image(layout, seq))
        k = int(np.searchsorted(image_positions(marked, item.image_id), seq)) - cls
        check_patch_marker(marked["pixel_values"][0].numpy(), flat["pixel_values"][0].numpy(), patch, k,
                           layout, seq, f"token {seq}")


def canvas_of_tiles(tiles: np.ndarray, nph: int, npw: int) -> np.ndarray:
    """Reassemble ``tiles (nph*npw, h, w)`` (row-major, as divide_to_patches cuts them)."""
    t, h, w = tiles.shape
    return tiles.reshape(nph, npw, h, w).transpose(0, 2, 1, 3).reshape(nph * h, npw * w)


def packed_sources(item: Loaded, model, inputs) -> tuple[np.ndarray, int, int]:
    """For every image-token position: the (y, x) tile-canvas coordinate (in feature cells) that
    the model's own ``pack_image_features`` puts there; base-view patch ``k`` gets ``(-5 - k, -5)``
    and newline features ``(-1, -1)``."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
    )

    cfg = item.config
    vis = cfg.vision_config
    g = vis.image_size // vis.patch_size
    sizes = inputs["image_sizes"]
    nph, npw = get_anyres_image_grid_shape(sizes[0].tolist(), cfg.image_grid_pinpoints, vis.image_size)
    n = image_size_to_num_patches(sizes[0], cfg.image_grid_pinpoints, vis.image_size)
    assert n == 1 + nph * npw
    feat = torch.zeros(n, g * g, 2)
    ii, jj = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    feat[0, :, 0] = -5.0 - torch.arange(g * g, dtype=torch.float32)
    feat[0, :, 1] = -5.0
    for t in range(nph * npw):
        tr, tc = divmod(t, npw)
        feat[1 + t, :, 0] = (tr * g + ii + 0.5).reshape(-1).float()
        feat[1 + t, :, 1] = (tc * g + jj + 0.5).reshape(-1).float()
    newline = torch.tensor([-1.0, -1.0])
    with torch.no_grad():
        if item.family == "llava_onevision":
            packed, _ = model.model.pack_image_features([feat], sizes, image_newline=newline,
                                                        vision_aspect_ratio=cfg.vision_aspect_ratio)
        else:
            packed, _ = model.model.pack_image_features([feat], sizes, cfg.vision_feature_select_strategy,
                                                        image_newline=newline)
    out = packed[0].numpy()
    assert out.shape[0] == image_positions(inputs, item.image_id).size
    return out, nph, npw


@pytest.fixture(scope="module")
def anyres_models(loaded):
    from transformers import AutoModelForImageTextToText

    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = AutoModelForImageTextToText.from_config(loaded(name).config).eval()
        return cache[name]

    return get


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
def test_anyres_marker(loaded, anyres_models, name, shape):
    """LLaVA-NeXT/OneVision: base tokens are the patches of view 0; each tile-grid token is,
    according to the model's ``pack_image_features`` (unpadding, OneVision's bilinear downscale,
    newlines), centred on a point of the tile canvas reassembled from views 1..; the marker painted
    in the token's box must be centred there (its size is the layout's token size: OneVision's
    downscaled tokens blend several features)."""
    item = loaded(name)
    model = anyres_models(name)
    layout, flat = item.layout(flat_image(SHAPES[shape]))
    src, nph, npw = packed_sources(item, model, flat)
    pos = list(image_positions(flat, item.image_id))
    g = item.config.vision_config.image_size // item.config.vision_config.patch_size
    tile = item.config.vision_config.image_size
    # structure: newline features exactly at the layout's newline tokens
    newline_at = {pos[i] for i in range(len(pos)) if tuple(src[i]) == (-1.0, -1.0)}
    assert newline_at == {t.index for t in layout.special if t.kind == "newline"}

    base, tiles = layout.segment("base"), layout.segment("tiles")
    flat_views = flat["pixel_values"][0].numpy()
    for seq in marker_tokens(layout, base):
        k = int(-5 - src[pos.index(seq)][0])  # the base patch the model puts here
        marked = item.run(marker_image(layout, seq))
        check_patch_marker(marked["pixel_values"][0, 0].numpy(), flat_views[0], tile // g, k, layout, seq,
                           f"base token {seq}")

    flat_canvas = canvas_of_tiles(flat_views[1 : 1 + nph * npw].mean(1), nph, npw)
    h, w = tiles.rect.height / tiles.rows, tiles.rect.width / tiles.cols  # canvas px per token
    for seq in marker_tokens(layout, tiles, skip_first=False):
        y, x = src[pos.index(seq)] * (tile / g)  # canvas pixels
        marked = item.run(marker_image(layout, seq))
        canvas = canvas_of_tiles(marked["pixel_values"][0].numpy()[1 : 1 + nph * npw].mean(1), nph, npw)
        diff = canvas - flat_canvas
        assert diff[int(y), int(x)] > diff.max() / 2, f"tile token {seq}: model reads ({x:.1f}, {y:.1f}) off the marker"
        if inside_image(layout, seq):
            assert_marker_edges(diff, (y - h / 2, x - w / 2, y + h / 2, x + w / 2), layout, seq, f"tile token {seq}")


def unpatchify_qwen(pv: np.ndarray, gh: int, gw: int, patch: int, merge: int, tps: int) -> np.ndarray:
    """Undo Qwen2-VL's patch order: row ``n`` of ``pixel_values`` is patch ``(i, j)`` of merge
    group ``(gr, gc)`` with ``n = ((gr * gw/m + gc) * m + i) * m + j``, each row ``(C, tps, p, p)``."""
    img = np.zeros((gh * patch, gw * patch), np.float32)
    vals = pv.reshape(gh * gw, -1, tps, patch, patch).mean((1, 2))
    for n in range(gh * gw):
        group, within = divmod(n, merge * merge)
        gr, gc = divmod(group, gw // merge)
        i, j = divmod(within, merge)
        r, c = gr * merge + i, gc * merge + j
        img[r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = vals[n]
    return img


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_marker(loaded, name, shape):
    """Qwen2-VL/2.5-VL: ``pixel_values`` is ``(gh*gw, C*tps*p*p)``, patches permuted so each
    ``m x m`` merge group is ``m^2`` consecutive rows; the patch merger turns rows
    ``[k m^2, (k+1) m^2)`` into LLM image token ``k``. The marker of token ``k`` must make those
    rows the brightest group, and in the un-permuted image it must sit on merged cell ``k``."""
    item = loaded(name)
    layout, flat = item.layout(flat_image(SHAPES[shape]))
    ip = item.processor.image_processor
    patch, merge, tps = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    t, gh, gw = flat["image_grid_thw"][0].tolist()
    flat_img = unpatchify_qwen(flat["pixel_values"].numpy(), gh, gw, patch, merge, tps)
    seg = layout.segments[0]
    cell = patch * merge
    for seq in marker_tokens(layout, seg, skip_first=False):
        marked = item.run(marker_image(layout, seq))
        assert marked["image_grid_thw"][0].tolist() == [t, gh, gw]
        k = seq - int(image_positions(marked, item.image_id)[0])
        pv = marked["pixel_values"].numpy()
        groups = (pv - flat["pixel_values"].numpy()).reshape(gh * gw // merge**2, -1).mean(1)
        assert int(np.argmax(groups)) == k
        diff = unpatchify_qwen(pv, gh, gw, patch, merge, tps) - flat_img
        r, c = divmod(k, gw // merge)
        assert argmax2(block_means(diff, cell)) == (r, c)
        if inside_image(layout, seq):
            assert_marker_edges(diff, (r * cell, c * cell, (r + 1) * cell, (c + 1) * cell), layout, seq, f"token {seq}")


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("name", ["idefics3", "idefics3-odd", "smolvlm"])
def test_tiled_marker(loaded, name, shape):
    """Idefics3/SmolVLM: the ``v``-th run of image tokens in ``input_ids`` is frame ``v`` of
    ``pixel_values`` (tiles row-major, then the global view); inside a run, token ``j`` is pixel
    shuffle block ``(j // n, j % n)`` of ``scale_factor x scale_factor`` patches. The marker of a
    tile token must make that block of that tile the brightest among all tiles; the marker of a
    global token that block of the global frame; and its edges must sit on the block."""
    item = loaded(name)
    layout, flat = item.layout(flat_image(SHAPES[shape]))
    vis = item.config.vision_config
    block = vis.patch_size * item.config.scale_factor
    n = vis.image_size // block
    flat_frames = flat["pixel_values"][0].numpy().mean(1)
    chosen = [layout.segments[len(layout.segments) // 2], layout.segments[-1]]
    for seg in dict.fromkeys(chosen):
        for seq in marker_tokens(layout, seg):
            marked = item.run(marker_image(layout, seq))
            ids = marked["input_ids"][0].numpy()
            starts = [i for i in image_positions(marked, item.image_id) if ids[i - 1] != item.image_id]
            v = max(i for i, s in enumerate(starts) if s <= seq)
            r, c = divmod(seq - starts[v], n)
            diff = marked["pixel_values"][0].numpy().mean(1) - flat_frames  # (F, h, w)
            means = np.stack([block_means(f, block) for f in diff])  # (F, n, n)
            assert means.shape[1:] == (n, n)
            if v == diff.shape[0] - 1:
                assert argmax2(means[v]) == (r, c), f"global token {seq}"
            else:
                assert argmax2(means[:-1]) == (v, r, c), f"tile token {seq}"
            if inside_image(layout, seq):
                assert_marker_edges(diff[v], (r * block, c * block, (r + 1) * block, (c + 1) * block), layout, seq,
                                    f"token {seq} (view {v})")


# ----------------------------------------------------------------------------- the real models accept the inputs


@pytest.mark.parametrize("name", list(VARIANTS))
def test_tiny_model_consumes_the_inputs(loaded, name):
    """The model built from the saved config scatters exactly as many features as the layout
    accounts for (its own placeholder check would raise otherwise)."""
    from transformers import AutoModelForImageTextToText

    item = loaded(name)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(item.config).eval()
    layout, inputs = item.layout(flat_image(SHAPES["wide"]))
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[1] == layout.n_tokens


# ----------------------------------------------------------------------------- mismatches are reported


def test_mismatches_raise_clear_errors(loaded):
    arr = flat_image(SHAPES["wide"])
    item = loaded("llava_next")
    inputs = item.run(arr)
    with pytest.raises(ValueError, match="saw an image of"):
        vlm_layout(item.family, item.processor, item.config, inputs, (61, 100))
    ids = inputs["input_ids"].clone()
    pos = image_positions(inputs, item.image_id)
    cut = dict(inputs)
    cut["input_ids"] = torch.cat([ids[:, : pos[-1]], ids[:, pos[-1] + 1 :]], dim=1)
    with pytest.raises(ValueError, match=r"hold \d+ image tokens .* accounts for \d+ \(base"):
        vlm_layout(item.family, item.processor, item.config, cut, arr.shape[:2])

    item = loaded("qwen2_vl")
    inputs = dict(item.run(arr))
    inputs["image_grid_thw"] = inputs["image_grid_thw"] * torch.tensor([[1, 2, 1]])
    with pytest.raises(ValueError, match="patches, image_grid_thw says"):
        vlm_layout(item.family, item.processor, item.config, inputs, arr.shape[:2])

    item = loaded("demo")
    inputs = dict(item.run(arr))
    ids = inputs["input_ids"].clone()
    ids[0, int(image_positions(inputs, item.image_id)[3])] = 5
    inputs["input_ids"] = ids
    with pytest.raises(ValueError, match="one contiguous run"):
        vlm_layout(item.family, item.processor, item.config, inputs, arr.shape[:2])

    item = loaded("idefics3")
    inputs = item.run(arr)
    with pytest.raises(ValueError, match="frames"):
        vlm_layout(item.family, item.processor, item.config, inputs, (30, 100))
    with pytest.raises(ValueError, match="unknown VLM family"):
        vlm_layout("blip", item.processor, item.config, inputs, arr.shape[:2])
