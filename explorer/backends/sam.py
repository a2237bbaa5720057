"""The Segment Anything backend: one image embedding per image, then cheap clicks.

Following SAM's own split (``SamPredictor.set_image`` once, ``predict`` per prompt), the image
encoder runs once per image (in the background, cancellable only between the image and the next
click since the encoder is one call) and its embedding is cached in memory (LRU) and on disk
(``<cache>/sam-embeddings/<model key>/<image sha256>.safetensors``). Every click runs only the
prompt encoder and the mask decoder (:meth:`SamBackend.predict`): points (positive and
negative), a box, and optionally the previous mask's low-resolution logits for refinement; it
returns the three candidate masks with their predicted IoU scores, at the original image size.

Official checkpoints are downloaded once into the cache with a progress callback and a SHA-256
check (the hash prefix in their file names; when their server cannot be reached the load fails at
once, :mod:`explorer.backends.network`), or read from a local path; the demo SAM is a folder
(see :mod:`explorer.backends.sam_build`). Prompt coordinates are ``(x, y)`` original-image pixels.
"""

from __future__ import annotations

import hashlib
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
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
        self.disk_cache = Path(disk_cache or cache_dir() / "sam-embeddings") / key
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
        from dataclasses import replace

        return replace(layout, window_size=window)

    # -- embeddings -------------------------------------------------------------------------------
    def _disk_path(self, sha256: str) -> Path:
        return self.disk_cache / f"{sha256}.safetensors"

    def cached_embedding(self, image: LoadedImage) -> SamEmbedding | None:
        """From memory, else from disk (then kept in memory); ``None`` when neither has it."""
        with self.lock:
            emb = self._memory.get(image.sha256)
            if emb is not None:
                self._memory.move_to_end(image.sha256)
                return SamEmbedding(emb.features, emb.original_size, emb.input_size, emb.sha256, "memory")
        path = self._disk_path(image.sha256)
        if path.is_file():
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                data = load_file(str(path), device=str(self.device))
                emb = SamEmbedding(data["features"], tuple(int(v) for v in data["original_size"]),
                                   tuple(int(v) for v in data["input_size"]), image.sha256, "disk")
            except (SafetensorError, OSError, KeyError):
                path.unlink(missing_ok=True)  # a damaged cache file is recomputed, never trusted
                return None
            if emb.original_size == image.size:
                self._remember(emb)
                return emb
        return None

    def _remember(self, emb: SamEmbedding) -> None:
        with self.lock:
            self._memory[emb.sha256] = emb
            self._memory.move_to_end(emb.sha256)
            while len(self._memory) > self._memory_items:
                self._memory.popitem(last=False)

    def embedding_job(self, image: LoadedImage, cancel: CancelToken | None = None):
        """Job: the image embedding, from the caches or computed once (then saved to disk)."""
        cached = self.cached_embedding(image)
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
        self._save(emb)
        yield Progress(1.0, "SAM embedding ready")
        return emb

    def _save(self, emb: SamEmbedding) -> None:
        from safetensors.torch import save_file

        try:
            self.disk_cache.mkdir(parents=True, exist_ok=True)
            tmp = self._disk_path(emb.sha256).with_suffix(".tmp")
            save_file({"features": emb.features.float().cpu().contiguous(),
                       "original_size": torch.tensor(emb.original_size), "input_size": torch.tensor(emb.input_size)},
                      str(tmp))
            tmp.replace(self._disk_path(emb.sha256))
        except OSError:
            pass  # the disk cache is an optimisation: a read-only cache folder is not an error

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
