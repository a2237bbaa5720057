"""Which region of the image each discrete token of a tokenizer carries (see the manifest for
the citations): influence (decode with the token replaced), encoder attention (one block or
rollout), gradient, prefix reconstruction, token swap, and the tokens of a region.

Arrays: ids ``(N,)`` and images ``(3, S, S)`` stay where the model runs (the trace's extras);
maps come to the host as results. Pixel-level maps live in the model's frame (the ``S x S`` crop it
encoded) and are drawn through the tokenizer's one-cell-per-pixel layout
(:meth:`TokenizerModel.pixel_layout`), so they land on the right pixels of the original image.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from explorer.core.arrays import to_host
from explorer.core.image_io import ImageLoadError, list_images, load_image
from explorer.core.jobs import Progress
from explorer.core.results import CodebookUsage, Heatmap, Reconstruction, TokenScores
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.api import Method, ParamError, resolve_layer
from explorer.plugin_host.protocols import TokenizerModel
from explorer_plugins.common.attention import fuse_heads, residual_augment, rollout_row

__all__ = ["Influence", "EncoderAttention", "Gradient", "Prefix", "Swap", "RegionTokens", "influence_stack",
           "region_in_frame", "parse_tokens", "CodebookUse"]


def _backend(backend) -> TokenizerModel:
    if not isinstance(backend, TokenizerModel):
        raise ParamError("this method needs a loaded image tokenizer")
    return backend


def _extras(trace):
    ex = trace.extras or {}
    if "ids" not in ex:
        raise ParamError("this trace holds no tokenizer output: encode the image with a tokenizer first")
    return ex["ids"], ex["reconstruction"], ex["pixels"]


def selected(target, n: int) -> list[int]:
    """The tokens a map explains (the target's tokens; the first by default)."""
    tokens = list(target.tokens) or [0]
    bad = [t for t in tokens if not 0 <= t < n]
    if bad:
        raise ParamError(f"token(s) {bad} outside the tokenizer's {n} tokens")
    return tokens


def parse_tokens(text: str, n: int) -> list[int]:
    """``"0-7,12"`` -> ``[0, ..., 7, 12]`` (``""``: none), each in ``0..n-1``."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise ParamError(f"tokens {text!r}: use numbers and ranges like 0-7,12") from None
        if not (0 <= a <= b < n):
            raise ParamError(f"tokens {part!r} outside 0..{n - 1}")
        out.extend(range(a, b + 1))
    return sorted(set(out))


def frame_map(backend: TokenizerModel, trace, values, label: str, meta: dict | None = None) -> Heatmap:
    """A ``(S, S)`` map of the model's frame as a heatmap drawn through its pixel layout."""
    flat = to_host(values, np.float32).reshape(-1)
    return Heatmap(layout=backend.pixel_layout(trace.layout), token_values=flat, label=label, meta=meta or {})


def replaced(backend: TokenizerModel, ids, tokens: list[int], mode: str, seed: int = 0):
    """``(ids', keep)``: ``ids`` with ``tokens`` replaced (``nearest``/``random`` codes) or marked
    to stand aside (``tail``: ``keep`` False there)."""
    import torch

    ids2 = ids.clone()
    keep = None
    if mode == "tail":
        keep = torch.ones(ids.shape[-1], dtype=torch.bool, device=ids.device)
        keep[tokens] = False
        return ids2, keep
    codes = backend.codebook()
    K = codes.shape[0]
    if mode == "nearest":
        for t in tokens:
            sims = codes @ codes[ids[t]]
            sims[ids[t]] = -float("inf")
            ids2[t] = int(sims.argmax())
    elif mode == "random":
        rng = np.random.default_rng(seed)
        for t in tokens:
            choice = int(rng.integers(0, K - 1))
            ids2[t] = choice + int(choice >= int(ids[t]))  # any code but its own
    else:
        raise ParamError(f"unknown replacement {mode!r}")
    return ids2, keep


def influence_stack(backend: TokenizerModel, trace, mode: str = "tail", seed: int = 0, tokens=None, batch: int = 16):
    """``(T, S, S)``: for each token of ``tokens`` (default: every token), the mean absolute change
    of the reconstruction over the colour channels when that token alone is replaced."""
    ids, recon, _ = _extras(trace)
    return _influence(backend, ids, recon, mode, seed, tokens, batch)


def _influence(backend: TokenizerModel, ids, recon, mode: str = "tail", seed: int = 0, tokens=None, batch: int = 16):
    """:func:`influence_stack` from ``ids (N,)`` and their reconstruction ``(3, S, S)``."""
    import torch

    tokens = list(range(ids.shape[-1])) if tokens is None else list(tokens)
    out = []
    for i in range(0, len(tokens), batch):
        chunk = tokens[i:i + batch]
        rows, keeps = [], []
        for t in chunk:
            ids2, keep = replaced(backend, ids, [t], mode, seed + t)
            rows.append(ids2)
            keeps.append(keep)
        keep = torch.stack(keeps) if keeps[0] is not None else None
        dec = backend.decode_ids(torch.stack(rows), keep)
        out.append((dec - recon[None]).abs().mean(1))
    return torch.cat(out)


def region_in_frame(backend: TokenizerModel, trace, region: np.ndarray) -> np.ndarray:
    """The region ``(H, W)`` bool of the original image, sampled at the centres of the model
    frame's pixels: ``(S, S)`` bool (False where the frame shows no original pixel)."""
    seg = backend.pixel_layout(trace.layout).segments[0]
    region = np.asarray(region, dtype=bool)
    H, W = region.shape
    ys, xs = np.mgrid[0:seg.rows, 0:seg.cols].astype(np.float64) + 0.5
    ox, oy = seg.geometry.to_original(xs, ys)
    cols, rows = np.floor(ox).astype(np.int64), np.floor(oy).astype(np.int64)
    inside = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
    out = np.zeros(inside.shape, dtype=bool)
    out[inside] = region[rows[inside], cols[inside]]
    return out


class _Replace(BaseModel):
    model_config = ConfigDict(extra="forbid")
    replace: Literal["tail", "nearest", "random"] = Field(
        "tail", description="What stands in for the token: the tail token (absent), the nearest other code, "
                            "or a random code.")
    seed: int = Field(0, ge=0, description="Seed of the random replacement.")


class Influence(Method):
    Params = _Replace

    def run(self, trace, params, *, target, cancel, backend=None):
        b = _backend(backend)
        ids, recon, _ = _extras(trace)
        tokens = selected(target, ids.shape[-1])
        yield Progress(0.2, "decoding without the token")
        ids2, keep = replaced(b, ids, tokens, params.replace, params.seed)
        dec = b.decode_ids(ids2[None], None if keep is None else keep[None])[0]
        diff = (dec - recon).abs().mean(0)
        name = ", ".join(str(t) for t in tokens)
        return frame_map(b, trace, diff, f"influence of token {name} ({params.replace})",
                         {"tokens": tokens, "replace": params.replace, "ids": [int(ids[t]) for t in tokens]})


class EncoderAttention(Method):
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        layer: int = Field(-1, description="Encoder block (negative counts from the last).",
                           json_schema_extra={"role": "layer"})
        head: int = Field(-1, ge=-1, description="Attention head; -1 averages the heads.",
                          json_schema_extra={"role": "head"})
        rollout: bool = Field(False, description="Attention rollout through every block instead of one block.")

    def capture(self, params, model, target):
        layers = range(model.n_layers) if params.rollout else [resolve_layer(params.layer, model.n_layers)]
        return CaptureSpec(attention_layers=frozenset(layers))

    def run(self, trace, params, *, target, cancel, backend=None):
        b = _backend(backend)
        n = b.token_count
        tokens = selected(target, n)
        yield Progress(0.1, "encoder attention")
        rows = b.token_sequence_indices(trace.layout)
        patches = trace.layout.image_token_indices()
        L = trace.model.n_layers
        maps = []
        for t in tokens:
            r = int(rows[t])
            if params.rollout:
                a_hats = [residual_augment(fuse_heads(trace.attention(l), "mean")) for l in range(L)]
                row = rollout_row(a_hats, r)
            else:
                a = trace.attention_row(resolve_layer(params.layer, L), r)
                row = a.mean(0) if params.head < 0 else a[params.head]
            maps.append(to_host(row, np.float64)[patches])
        values = np.mean(maps, axis=0)
        what = "rollout" if params.rollout else f"block {resolve_layer(params.layer, L)}" + (
            f", head {params.head}" if params.head >= 0 else "")
        return Heatmap(layout=trace.layout, token_values=values.astype(np.float32),
                       label=f"encoder attention of token {', '.join(map(str, tokens))} ({what})",
                       meta={"tokens": tokens, "rollout": params.rollout})


class Gradient(Method):
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def run(self, trace, params, *, target, cancel, backend=None):
        b = _backend(backend)
        _, _, pixels = _extras(trace)
        tokens = selected(target, b.token_count)
        total = None
        for i, t in enumerate(tokens):
            cancel.raise_if_cancelled()
            yield Progress(i / len(tokens), f"gradient of token {t}")
            g = b.latent_gradient(pixels, t)
            total = g if total is None else total + g
        return frame_map(b, trace, total, f"gradient of token {', '.join(map(str, tokens))}", {"tokens": tokens})


def _reconstruction(b: TokenizerModel, trace, dec, reference, ids_used, k: int, label: str, meta: dict) -> Reconstruction:
    err = (dec - reference).abs().mean(0)
    mse = float(((dec - reference) ** 2).mean())
    psnr = 10 * np.log10(1.0 / max(mse, 1e-12))
    rgb = to_host(dec.permute(1, 2, 0), np.float32)
    return Reconstruction(rgb=rgb, error=frame_map(b, trace, err, f"error: {label}"), ids=to_host(ids_used),
                          k=int(k), psnr=float(psnr), label=label, meta=meta)


class Prefix(Method):
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        k: int = Field(0, ge=0, description="Tokens decoded, from the first (0: all of them).")

    def run(self, trace, params, *, target, cancel, backend=None):
        import torch

        b = _backend(backend)
        ids, _, pixels = _extras(trace)
        n = ids.shape[-1]
        if params.k > n:
            raise ParamError(f"k = {params.k}: the tokenizer has {n} tokens")
        k = params.k or n
        yield Progress(0.2, f"decoding the first {k} tokens")
        keep = torch.arange(n, device=ids.device) < k
        dec = b.decode_ids(ids[None], keep[None])[0]
        used = torch.where(keep, ids, torch.full_like(ids, -1))
        how = "" if b.ordered or k == n else " (no tail token: the rest set to the codebook mean)"
        return _reconstruction(b, trace, dec, pixels[0].float(), used, k, f"first {k} of {n} tokens{how}",
                               {"ordered": b.ordered})


class Swap(Method):
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        other: str = Field("", description="Image file whose tokens are taken.")
        tokens: str = Field("", description="Tokens taken from the other image, e.g. 0-7,12 (empty: the selected "
                                            "tokens).")

    def run(self, trace, params, *, target, cancel, backend=None):
        b = _backend(backend)
        ids, recon, _ = _extras(trace)
        n = ids.shape[-1]
        if not params.other:
            raise ParamError("give the other image (its file) whose tokens are swapped in")
        chosen = parse_tokens(params.tokens, n) if params.tokens else selected(target, n)
        yield Progress(0.2, "encoding the other image")
        other = b.prepare(load_image(params.other))
        other_ids, _ = b.encode(other.pixels)
        ids2 = ids.clone()
        ids2[chosen] = other_ids[0][chosen]
        dec = b.decode_ids(ids2[None])[0]
        return _reconstruction(b, trace, dec, recon, ids2, n, f"tokens {params.tokens or chosen} from "
                               f"{params.other.rsplit('/', 1)[-1]}", {"swapped": chosen, "other": params.other})


class RegionTokens(Method):
    Params = _Replace

    def run(self, trace, params, *, target, cancel, backend=None):
        b = _backend(backend)
        if target.region is None:
            raise ParamError("draw or select a region first")
        inside = region_in_frame(b, trace, target.region)
        if not inside.any():
            raise ParamError("the region lies outside what the tokenizer saw (its centre crop)")
        yield Progress(0.1, "influence of every token")
        stack = to_host(influence_stack(b, trace, params.replace, params.seed), np.float64)
        totals = stack.reshape(len(stack), -1).sum(1)
        shares = stack[:, inside].sum(1) / np.maximum(totals, 1e-12)
        return TokenScores(layout=trace.layout, scores=shares.astype(np.float32),
                           label=f"share of each token's influence inside the region ({params.replace})",
                           meta={"region_pixels": int(inside.sum()), "frame_pixels": int(inside.size)})


# the last folder counted (the picked token changes often; the folder's counts do not)
_USAGE_CACHE: dict[str, tuple] = {}


def _count_codes(b: TokenizerModel, files, K: int, R: int, regions: bool, cancel, device):
    """Job: ``(counts (K,), regions (K, R, R) or None, images encoded, skipped files)`` over
    ``files``; sums stay on the model's device, one host copy at the end."""
    import torch
    import torch.nn.functional as F

    counts = torch.zeros(K, dtype=torch.int64, device=device)
    sums = torch.zeros(K, R * R, dtype=torch.float32, device=device) if regions else None
    skipped, done = [], 0
    for i, path in enumerate(files):
        cancel.raise_if_cancelled()
        yield Progress(i / len(files), f"{i + 1}/{len(files)}: {path.name}")
        try:
            image = load_image(path)
        except ImageLoadError as exc:
            skipped.append(f"{path.name}: {exc}")
            continue
        prep = b.prepare(image)
        codes, _ = b.encode(prep.pixels)
        codes = codes[0]
        counts += torch.bincount(codes, minlength=K)
        if sums is not None:
            recon = b.decode_ids(codes[None])[0]
            stack = _influence(b, codes, recon).float()  # (N, S, S)
            stack = stack / stack.flatten(1).sum(1).clamp_min(1e-12)[:, None, None]
            small = F.adaptive_avg_pool2d(stack[:, None], R)[:, 0].flatten(1)  # (N, R*R)
            sums.index_add_(0, codes, small)
        done += 1
    mean = None
    if sums is not None:
        mean = sums / counts.clamp_min(1)[:, None].float()
        mean[counts == 0] = float("nan")
        mean = to_host(mean.reshape(K, R, R), np.float32)
    return to_host(counts, np.int64), mean, done, tuple(skipped)


class CodebookUse(Method):
    """Codebook usage over a folder: a histogram of the codes, the dead ones, and each code's mean
    region (where the influence of the tokens that got it lands, on average, in the model's
    frame). The canvas shows the mean region of the code the picked token of this image got."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        folder: str = Field("", description="Folder of images whose tokens are counted.")
        recursive: bool = Field(False, description="Include the images of its subfolders.")
        limit: int = Field(200, ge=1, le=100_000, description="At most this many images (sorted by path).")
        regions: bool = Field(True, description="Also average each code's influence region (one decode per token "
                                                "and image).")
        region_size: int = Field(32, ge=4, le=256, description="Side of the frame the mean regions are kept at.")

    def run(self, trace, params, *, target, cancel, backend=None):
        import torch
        import torch.nn.functional as F

        b = _backend(backend)
        ids, _, pixels = _extras(trace)
        if not params.folder:
            raise ParamError("give the folder of images whose codes are counted")
        files = list_images(params.folder, recursive=params.recursive)[:params.limit]
        if not files:
            raise ParamError(f"{params.folder}: no images there")
        K, R, S = int(b.codebook().shape[0]), params.region_size, int(pixels.shape[-1])
        stamp = []
        for f in files:
            try:
                st = f.stat()
                stamp.append((str(f), st.st_mtime_ns, st.st_size))
            except OSError:
                stamp.append((str(f), 0, -1))
        key = (id(b), b.info.spec, params.recursive, params.regions, R, tuple(stamp))
        cached = _USAGE_CACHE.get("last")
        if cached is not None and cached[0] == key:
            host_counts, regions, done, skipped = cached[1]
        else:
            host_counts, regions, done, skipped = yield from _count_codes(b, files, K, R, params.regions, cancel,
                                                                           ids.device)
            if done == 0:
                raise ParamError(f"{params.folder}: none of the {len(files)} images could be read ({skipped[0]})")
            _USAGE_CACHE["last"] = (key, (host_counts, regions, done, skipped))
        tokens = selected(target, ids.shape[-1])
        code = int(ids[tokens[0]])
        if regions is not None and host_counts[code] > 0:
            up = torch.from_numpy(regions[code])[None, None]
            frame = F.interpolate(up, size=(S, S), mode="nearest")[0, 0].numpy()
            frame = frame / max(float(frame.mean()), 1e-12)  # 1 = the influence spread evenly over the frame
            what = (f"mean region of code {code} (token {tokens[0]}) over {done} images, "
                    f"used {host_counts[code]} times (1 = spread evenly)")
        else:
            frame = np.zeros((S, S), np.float32)
            what = (f"code {code} (token {tokens[0]}) never occurs in the {done} images" if host_counts[code] == 0
                    else f"code {code} (token {tokens[0]}) used {host_counts[code]} times (regions not computed)")
        dead = int((host_counts == 0).sum())
        usage = CodebookUsage(counts=host_counts, map=frame_map(b, trace, frame, what), ids=to_host(ids),
                              images=done, regions=regions, skipped=tuple(skipped),
                              label=f"codebook usage over {done} images: {K - dead} of {K} codes used, {dead} dead; "
                                    f"{what}",
                              meta={"folder": params.folder, "token": tokens[0], "code": code})
        return usage
