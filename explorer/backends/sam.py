"""The Segment Anything backend: one image embedding per image, then cheap clicks.

Following SAM's own split (``SamPredictor.set_image`` once, ``predict`` per prompt), the image
encoder runs once per image (in the background, cancellable only between the image and the next
click since the encoder is one call) and its embedding ``features (1, C, h, w)`` (``C`` the prompt
embedding width, ``h = w = img_size / patch_size``, e.g. 256 x 64 x 64) is cached in memory (LRU)
and on disk (``<cache>/sam-embeddings/<model key>/<image sha256>.safetensors``, the model key being
the first 16 hex digits of the SHA-256 of the canonical spec). Every click runs only the prompt
encoder and the mask decoder (:meth:`SamBackend.predict`): points (positive and negative), a box,
and optionally the previous mask's low-resolution logits for refinement; it returns the three
candidate masks with their predicted IoU scores, at the original image size.

The disk cache is an optimisation, never a source of truth:

* An entry is read whole into memory (nothing stays mapped to the file, so another process
  truncating or replacing it cannot touch a loaded embedding) and verified before use: its
  metadata names the format, the model key, the image SHA-256, the tensor's shape and dtype, the
  original and resized input sizes, and a SHA-256 over these fields and the tensor bytes. The
  digest, the shape expected from the model, the sizes expected from the image, and finite values
  are all checked; an entry that fails any check is deleted, logged as a warning and recomputed.
* An entry is written to a temporary file in the same folder, flushed, fsynced and moved onto its
  name with ``os.replace``: readers and concurrent writers only ever see a complete file (the last
  one written wins). A failed write (read-only folder, full disk, serialization error) removes the
  temporary file, keeps any earlier entry, logs a warning and is reported in
  :attr:`SamEmbedding.note`; the embedding itself is still returned. Temporary files left by a
  process that died mid-write are removed once they are an hour old.

Official checkpoints are downloaded once into the cache with a progress callback and a SHA-256
check (the hash prefix in their file names; when their server cannot be reached the load fails at
once, :mod:`explorer.backends.network`), or read from a local path; the demo SAM is a folder
(see :mod:`explorer.backends.sam_build`). Prompt coordinates are ``(x, y)`` original-image pixels.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from explorer.core.image_io import LoadedImage
from explorer.core.jobs import CancelToken, Progress
from explorer.core.layout import Geometry, TokenLayout
from explorer.core.resources import cache_dir
from explorer.core.results import RegionMask
from explorer.core.trace import ModelInfo

from . import network
from .clip import ModelLoadError
from .devices import resolve_device
from .sam_build import OFFICIAL_ARCHITECTURES, load_sam
from .specs import SamSpec

__all__ = ["SamBackend", "SamEmbedding", "OFFICIAL_CHECKPOINTS", "download_checkpoint"]

log = logging.getLogger(__name__)

_CACHE_FORMAT = "explorer-sam-embedding/1"
_TMP_SUFFIX = ".tmp"
_STALE_TMP_SECONDS = 3600.0  # a temporary file this old was left by a process that died mid-write

# name -> (url, sha256 prefix from the official file name)
OFFICIAL_CHECKPOINTS = {
    "vit_b": ("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth", "01ec64"),
    "vit_l": ("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth", "0b3195"),
    "vit_h": ("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth", "4b8939"),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_checkpoint(name: str, folder: Path | None = None, progress: Callable[[float, str], None] | None = None,
                        cancel: CancelToken | None = None, url: str | None = None) -> Path:
    """The official checkpoint ``name``, downloaded once into ``folder`` (default the user cache)
    and verified against the SHA-256 prefix of its file name. A partial download is kept as
    ``*.part`` and never used; a mismatch deletes the file. ``ModelLoadError`` on failure."""
    if name not in OFFICIAL_CHECKPOINTS:
        raise ModelLoadError(f"no official checkpoint named {name!r}; known: {', '.join(OFFICIAL_CHECKPOINTS)}")
    official, prefix = OFFICIAL_CHECKPOINTS[name]
    src = url or official
    folder = Path(folder or cache_dir() / "sam-checkpoints")
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / Path(official).name
    if dst.is_file():
        if _sha256(dst).startswith(prefix):
            return dst
        dst.unlink()
    if not network.url_reachable(src):  # fail at once rather than after urllib's connection timeout
        raise ModelLoadError(
            f"could not download the SAM {name} checkpoint: no network and not in the cache ({folder}); "
            f"pass a local checkpoint (sam:{name}@/path/to/{dst.name})")
    part = dst.with_suffix(dst.suffix + ".part")
    try:
        with urllib.request.urlopen(src, timeout=30) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            while True:
                if cancel is not None and cancel.cancelled:
                    raise ModelLoadError("checkpoint download cancelled")
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done / total if total else 0.0, f"downloading {dst.name}: {done / 2**20:.0f} MiB")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise ModelLoadError(
            f"could not download the SAM {name} checkpoint ({getattr(exc, 'reason', exc)}); without network, "
            f"download {dst.name} elsewhere and use sam:{name}@/path/to/{dst.name}") from None
    digest = _sha256(part)
    if not digest.startswith(prefix):
        part.unlink(missing_ok=True)
        raise ModelLoadError(f"downloaded {dst.name} has SHA-256 {digest[:12]}..., expected a prefix {prefix}; deleted")
    part.replace(dst)
    return dst


@dataclass(frozen=True)
class SamEmbedding:
    """The image encoder's output for one image: ``features (1, C, h, w)``, the original
    ``(H, W)`` and the resized input ``(h_in, w_in)`` (before padding)."""

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    sha256: str
    source: str  # 'computed', 'memory' or 'disk'
    seconds: float = 0.0
    note: str = ""  # a non-fatal problem with the disk cache (not saved, damaged entry replaced)


class _BadEntry(Exception):
    """A disk-cache entry that failed verification (the message says which check)."""


def _digest(meta: dict[str, str], features: torch.Tensor) -> str:
    """SHA-256 over the metadata fields (all but the digest, as sorted JSON) and the tensor bytes."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    h.update(b"\0")
    h.update(features.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a serialized safetensors file (8-byte little-endian header length,
    then a JSON header); :class:`_BadEntry` when the header is malformed or has no metadata."""
    if len(data) < 8:
        raise _BadEntry("shorter than a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise _BadEntry("header longer than the file (truncated)")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, ValueError):
        raise _BadEntry("unreadable header") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _BadEntry("no metadata")
    return meta


class SamBackend:
    """A loaded SAM model with an embedding cache (memory and disk)."""

    kind = "sam"

    def __init__(self, spec: SamSpec, model, config: dict, device: torch.device, memory_items: int = 8,
                 disk_cache: Path | None = None) -> None:
        from segment_anything import SamPredictor

        self.spec = spec
        self.model = model
        self.config = config
        self.device = device
        self.predictor = SamPredictor(model)
        self.lock = threading.RLock()
        self.encoder_calls = 0  # image-encoder runs (tests count them)
        self._memory: OrderedDict[str, SamEmbedding] = OrderedDict()
        self._memory_items = memory_items
        key = hashlib.sha256(spec.canonical().encode()).hexdigest()[:16]
        self.model_key = key
        self.disk_cache = Path(disk_cache or cache_dir() / "sam-embeddings") / key
        self._swept_tmp = False
        enc = model.image_encoder
        img_size = int(enc.img_size)
        patch = int(config.get("patch_size", 16))
        encoder = config.get("encoder", {})
        self.info = ModelInfo(kind="sam", spec=spec.canonical(), name=spec.display_name, n_layers=len(enc.blocks),
                              n_heads=int(encoder.get("num_heads", enc.blocks[0].attn.num_heads)),
                              width=int(encoder.get("embed_dim", 0)), patch_size=(patch, patch),
                              input_size=(img_size, img_size), device=str(device), demo=spec.is_demo)

    @classmethod
    def load(cls, spec: SamSpec, progress: Callable[[float, str], None] | None = None,
             cancel: CancelToken | None = None, **kw) -> "SamBackend":
        device = resolve_device(spec.device)
        source, checkpoint = spec.model, spec.weights
        if source.startswith("local-dir:"):
            source = source[len("local-dir:"):]
        if source in OFFICIAL_ARCHITECTURES and checkpoint is None:
            checkpoint = str(download_checkpoint("vit_h" if source == "default" else source, progress=progress,
                                                 cancel=cancel))
        try:
            model, config = load_sam(source, checkpoint, device=device)
        except ValueError as exc:
            hint = " - train the demo models with `python -m explorer.demo.train`" if spec.is_demo else ""
            raise ModelLoadError(f"{str(exc).splitlines()[0]}{hint}") from None
        return cls(spec, model, config, device, **kw)

    # -- geometry ---------------------------------------------------------------------------------
    def layout(self, image_size: tuple[int, int]) -> TokenLayout:
        """The embedding grid on the original image: ``ResizeLongestSide(img_size)`` then zero
        padding at the bottom/right to a square; windowed attention blocks are recorded."""
        H, W = image_size
        S = self.info.input_size[0]
        scale = S * 1.0 / max(H, W)
        nh, nw = int(H * scale + 0.5), int(W * scale + 0.5)
        geo = Geometry.identity((H, W)).resize((nh, nw), f"resize longest side to {S}").pad(0, 0, S - nh, S - nw)
        g = S // self.info.patch_size[0]
        layout = TokenLayout.single_grid(geo, g, g, n_prefix=0, description=f"{self.info.name}: {g}x{g} embedding")
        window = int(self.config.get("encoder", {}).get("window_size", 0)) or None
        return replace(layout, window_size=window)

    # -- embeddings -------------------------------------------------------------------------------
    def _disk_path(self, sha256: str) -> Path:
        return self.disk_cache / f"{sha256}.safetensors"

    def cached_embedding(self, image: LoadedImage) -> SamEmbedding | None:
        """From memory, else from disk (verified, then kept in memory); ``None`` when neither has
        it. A disk entry that fails verification is deleted (with a logged warning)."""
        return self._cached(image)[0]

    def _cached(self, image: LoadedImage) -> tuple[SamEmbedding | None, str]:
        """The cached embedding or ``None``, and a note when a damaged disk entry was dropped."""
        with self.lock:
            emb = self._memory.get(image.sha256)
            if emb is not None:
                self._memory.move_to_end(image.sha256)
                return SamEmbedding(emb.features, emb.original_size, emb.input_size, emb.sha256, "memory"), ""
        path = self._disk_path(image.sha256)
        try:
            st = path.stat()
        except OSError:
            return None, ""
        try:
            emb = self._read_entry(path, st, image)
        except _BadEntry as exc:
            note = f"the cached SAM embedding {path.name} was damaged ({exc}); deleted and recomputed"
            log.warning("%s: %s", path, note)
            self._drop(path, st)
            return None, note
        except OSError as exc:  # unreadable (permissions, I/O error): skip it, leave it to its owner
            log.warning("could not read the cached SAM embedding %s (%s); recomputing", path, exc)
            return None, f"could not read the cached SAM embedding ({exc.strerror or exc})"
        self._remember(emb)
        return emb, ""

    def _expected_shape(self) -> tuple[int, ...]:
        pe = self.model.prompt_encoder
        return (1, int(pe.embed_dim), *(int(v) for v in pe.image_embedding_size))

    def _read_entry(self, path: Path, st: os.stat_result, image: LoadedImage) -> SamEmbedding:
        """Read ``path`` whole into memory and verify it; :class:`_BadEntry` names the failed check."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        shape = self._expected_shape()
        limit = 8 * int(np.prod(shape)) + (1 << 16)  # at most 8 bytes per value plus the header
        if st.st_size > limit:
            raise _BadEntry(f"{st.st_size} bytes, more than an embedding of shape {shape}")
        data = path.read_bytes()  # never memory-mapped: the file may change under us
        meta = _header_metadata(data)
        try:
            tensors = load(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise _BadEntry(f"unreadable tensors: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
                from None
        del data
        if set(tensors) != {"features"}:
            raise _BadEntry(f"unexpected tensors {sorted(tensors)}")
        features = tensors["features"]
        checks = [
            (meta.get("format") == _CACHE_FORMAT, f"format {meta.get('format')!r}"),
            (meta.get("model") == self.model_key, "written by another model"),
            (meta.get("image_sha256") == image.sha256, "written for another image"),
            (meta.get("shape") == json.dumps(list(features.shape)), "shape differs from its metadata"),
            (meta.get("dtype") == str(features.dtype), "dtype differs from its metadata"),
            (tuple(features.shape) == shape, f"shape {tuple(features.shape)}, the model makes {shape}"),
            (features.is_floating_point(), f"dtype {features.dtype}"),
            (meta.get("sha256") == _digest(meta, features), "content hash mismatch"),
        ]
        for ok, why in checks:
            if not ok:
                raise _BadEntry(why)
        try:
            original = tuple(int(v) for v in json.loads(meta["original_size"]))
            input_size = tuple(int(v) for v in json.loads(meta["input_size"]))
        except (KeyError, TypeError, ValueError):
            raise _BadEntry("unreadable sizes") from None
        if original != tuple(image.size):
            raise _BadEntry(f"original size {original}, the image is {tuple(image.size)}")
        expected_input = self.predictor.transform.get_preprocess_shape(*original, self.predictor.transform.target_length)
        if input_size != tuple(expected_input):
            raise _BadEntry(f"input size {input_size}, expected {tuple(expected_input)}")
        if not bool(torch.isfinite(features).all()):
            raise _BadEntry("non-finite values")
        # a tensor of its own (not a view of the bytes read), on the model's device
        features = features.to(self.device, copy=True)
        return SamEmbedding(features, original, input_size, image.sha256, "disk")

    def _drop(self, path: Path, st: os.stat_result) -> None:
        """Delete a bad entry unless another writer has replaced it since it was read."""
        try:
            now = path.stat()
            if (now.st_ino, now.st_size, now.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns):
                path.unlink()
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("could not delete the damaged SAM cache entry %s (%s)", path, exc)

    def _remember(self, emb: SamEmbedding) -> None:
        with self.lock:
            self._memory[emb.sha256] = emb
            self._memory.move_to_end(emb.sha256)
            while len(self._memory) > self._memory_items:
                self._memory.popitem(last=False)

    def embedding_job(self, image: LoadedImage, cancel: CancelToken | None = None):
        """Job: the image embedding, from the caches or computed once (then saved to disk).

        A problem with the disk cache never fails the job: it is logged as a warning and described
        in the returned embedding's ``note`` (and the final progress message)."""
        cached, note = self._cached(image)
        if cached is not None:
            return cached
        yield Progress(None, "SAM image encoder")
        if cancel is not None:
            cancel.raise_if_cancelled()
        t = time.perf_counter()
        with self.lock, torch.inference_mode():
            self.predictor.set_image(image.rgb, image_format="RGB")
            self.encoder_calls += 1
            emb = SamEmbedding(self.predictor.features.detach().clone(), tuple(self.predictor.original_size),
                               tuple(self.predictor.input_size), image.sha256, "computed", time.perf_counter() - t)
        if cancel is not None:
            cancel.raise_if_cancelled()
        self._remember(emb)
        notes = [n for n in (note, self._save(emb)) if n]
        if notes:
            emb = replace(emb, note="; ".join(notes))
        yield Progress(1.0, "SAM embedding ready" + (f" ({emb.note})" if emb.note else ""))
        return emb

    def _serialize(self, emb: SamEmbedding) -> bytes:
        from safetensors.torch import save

        features = emb.features.detach().cpu().contiguous()
        meta = {"format": _CACHE_FORMAT, "model": self.model_key, "image_sha256": emb.sha256,
                "shape": json.dumps(list(features.shape)), "dtype": str(features.dtype),
                "original_size": json.dumps(list(emb.original_size)), "input_size": json.dumps(list(emb.input_size))}
        meta["sha256"] = _digest(meta, features)
        return save({"features": features}, metadata=meta)

    def _sweep_stale_tmp(self) -> None:
        """Remove temporary files left by processes that died while writing (once per backend)."""
        self._swept_tmp = True
        cutoff = time.time() - _STALE_TMP_SECONDS
        for tmp in self.disk_cache.glob(f".*{_TMP_SUFFIX}"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
            except OSError:
                pass  # another process removed or replaced it

    def _save(self, emb: SamEmbedding) -> str:
        """Write ``emb`` to the disk cache atomically; ``""`` on success, else a note (also logged
        as a warning). The temporary file is removed on failure and an earlier entry is kept."""
        final = self._disk_path(emb.sha256)
        tmp: str | None = None
        try:
            payload = self._serialize(emb)
            self.disk_cache.mkdir(parents=True, exist_ok=True)
            if not self._swept_tmp:
                self._sweep_stale_tmp()
            fd, tmp = tempfile.mkstemp(dir=self.disk_cache, prefix=f".{emb.sha256[:16]}.", suffix=_TMP_SUFFIX)
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            tmp = None
            return ""
        except Exception as exc:  # noqa: BLE001 - the disk cache is optional: no failure may fail a click
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or type(exc).__name__)
            note = f"SAM embedding not saved to the disk cache ({reason.splitlines()[0]})"
            log.warning("%s: %s", final, note)
            return note
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    # -- clicks -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, embedding: SamEmbedding, points: np.ndarray | None = None, labels: np.ndarray | None = None,
                box: np.ndarray | None = None, mask_input: np.ndarray | None = None,
                multimask: bool = True) -> list[RegionMask]:
        """Masks for a prompt on an embedded image, best predicted IoU first.

        ``points (K, 2)`` are ``(x, y)`` original-image pixels with ``labels (K,)`` 1 = positive,
        0 = negative; ``box (4,)`` is ``(x0, y0, x1, y1)``; ``mask_input (1, 256, 256)`` the
        low-resolution logits of a previous mask (refinement). Each :class:`RegionMask` is at the
        original size and keeps its low-resolution logits in ``meta['logits']``.
        """
        if points is None and box is None:
            raise ValueError("a SAM prompt needs at least one point or a box")
        if points is not None:
            points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
            labels = np.ones(len(points), dtype=np.int64) if labels is None else np.asarray(labels).reshape(-1)
            if len(labels) != len(points):
                raise ValueError("one label per point")
        with self.lock:
            p = self.predictor
            p.reset_image()
            p.features = embedding.features
            p.original_size = embedding.original_size
            p.input_size = embedding.input_size
            p.is_image_set = True
            masks, scores, low = p.predict(point_coords=points, point_labels=labels,
                                           box=None if box is None else np.asarray(box, dtype=np.float32),
                                           mask_input=mask_input, multimask_output=multimask)
        order = np.argsort(-scores)
        return [RegionMask(mask=masks[i], score=float(scores[i]), label=f"candidate {k + 1}",
                           meta={"logits": low[i:i + 1], "points": None if points is None else points.tolist(),
                                 "point_labels": None if labels is None else np.asarray(labels).tolist(),
                                 "box": None if box is None else [float(v) for v in box]})
                for k, i in enumerate(order)]
